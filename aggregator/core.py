"""The aggregator's state machine, free of I/O: offer updates, get versions.

``AggregatorCore.offer`` screens one verified update and either buffers it or
says why it is rejected; when the policy says the buffer is full (or a sync
round closes), ``flush`` folds the buffer into a new version. Replaying the
same updates in the same order through a fresh core gives the same bytes.

The core also keeps the clip window: the (clipped) norms of the last applied updates,
which the adaptive clip takes its median from. It is part of a version's state like
the model: ``NewVersion.clip_window`` is what the next version starts from, the
manifest records it, and a core resumed or replayed at a version is given it back.

The adaptive clip's warm-up: while fewer than ``warmup`` norms are recorded, an update is not
added to the buffer at once but held (a copy of its delta), in arrival order. As soon as
recorded and held norms reach ``warmup``, or at ``flush`` in any case, the bound is the clip's
over all of them, and the held updates are added in arrival order, each clipped to it. So an
attacker among a job's first updates is clipped like any other, as long as fewer than half of
them are malicious. An async buffer is not ``ready`` while updates are held; the warm-up is a
pure function of the offers, so replay re-derives it.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import torch

from shared.aggregation import Accumulator, CosineBuffer, MixBuffer, Policy, RobustBuffer, screen
from shared.errors import ScreeningError
from shared.messages import Partial, Round, Update
from shared.privacy import DP_ACCOUNTING, Events, compose, epsilon, events_of, gaussian
from shared.quantize import DEFAULT_BLOCK, BlockLayout, block_layout, decode_delta_wire, to_flat, to_wire
from shared.reasons import Reason
from shared.server_opt import ServerState
from shared.tensors import FlatModel


@dataclass(frozen=True)
class Accepted:
    task_id: str
    staleness: int
    weight: float
    norm: float  # before clipping
    # The scale the clip applied to the delta's floats (1.0: not clipped). An update held in the
    # adaptive clip's warm-up is returned by ``offer`` before its clip is known, with 1.0: its
    # final verdict replaces it in ``AggregatorCore.pending`` and is in ``NewVersion.accepted``.
    clip: float = 1.0


@dataclass(frozen=True)
class Rejected:
    task_id: str
    reason: Reason
    detail: str
    staleness: int = 0


@dataclass(frozen=True)
class NewVersion:
    version: int
    parent: int
    model: FlatModel
    update_ids: tuple[str, ...]
    mean_staleness: float
    clip_window: tuple[float, ...] = ()  # recorded norms after this version, oldest first
    accepted: tuple[Accepted, ...] = ()  # the final verdicts, in the order of ``update_ids``
    # ``--robust cosine``: each update's cosine similarity with the buffer's coordinate-wise
    # median, and the updates left out of this version for it. A left-out update is still
    # counted in ``update_ids`` (applied, acked, its task done) but contributed nothing.
    cosines: dict[str, float] = field(default_factory=dict)
    left_out: frozenset[str] = frozenset()
    server_state: ServerState | None = None  # FedOpt's moments after this version (sgd: none)
    dp: DpRecord | None = None  # what DP did to this version and the guarantee after it

    @property
    def clips(self) -> dict[str, float]:
        """The clip scale each update was folded with, by task id."""
        return {a.task_id: a.clip for a in self.accepted}


# The manifest's policy record of a version a root made (edge aggregation): the partials it folded.
PARTIALS = "partials"
# The ledger record ("kind") of the seed a version's central DP noise was drawn from.
NOISE_RECORD = "dp_noise"


@dataclass(frozen=True)
class DpRecord:
    """Differential privacy as of a version: the accountant's events (central DP) or each
    worker's update count (local DP), epsilon after it, and the seed of its noise (central)."""

    epsilon: float
    events: Events = ()
    counts: dict[str, int] = field(default_factory=dict)
    noise_seed: int | None = None

    def to_dict(self) -> dict[str, object]:
        """For the manifest's policy record (the seed stays out: it is the ledger's)."""
        return {"epsilon": self.epsilon, "events": [list(e) for e in self.events], "counts": self.counts}

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> DpRecord | None:
        """The accounting a manifest's policy record carries (``None``: a version made without DP)."""
        d = record.get(DP_ACCOUNTING)
        if not d:
            return None
        counts = {str(k): int(v) for k, v in (d.get("counts") or {}).items()}
        return cls(float(d["epsilon"]), events_of(d.get("events") or ()), counts)


@dataclass(frozen=True)
class PartialFold:
    """An edge's buffer taken as a partial aggregate (``AggregatorCore.take_partial``): what it was
    folded against and the sums, in flat order, that the root adds (``AggregatorCore.offer_partial``)."""

    version: int
    accepted: tuple[Accepted, ...]
    recorded: tuple[float, ...]  # each update's norm after clipping: the root's clip window grows by them
    floats: torch.Tensor  # float32, sum of weight x clip x delta
    exact: torch.Tensor  # float64, sum of weight x integer delta
    norm_total: float  # what the step divides by

    def sums(self) -> bytes:
        """The partial's payload: the float sums, then the integer sums (little-endian)."""
        return self.floats.numpy().astype("<f4").tobytes() + self.exact.numpy().astype("<f8").tobytes()

    def message(
        self,
        job_id: str,
        partial_id: str,
        shard: int,
        updates: Sequence[tuple[str, str, int]],
        created_at: float = 0.0,
    ) -> Partial:
        """The partial as the edge signs it; ``updates``: each folded update's (message digest,
        worker id, sample count), in fold order."""
        sums = self.sums()
        digests, workers, samples = zip(*updates, strict=True) if updates else ((), (), ())
        a = self.accepted
        return Partial(
            job_id=job_id,
            partial_id=partial_id,
            shard=shard,
            version=self.version,
            update_ids=tuple(x.task_id for x in a),
            update_digests=tuple(digests),
            worker_ids=tuple(workers),
            staleness=tuple(x.staleness for x in a),
            weights=tuple(x.weight for x in a),
            norms=tuple(x.norm for x in a),
            clips=tuple(x.clip for x in a),
            recorded=self.recorded,
            num_samples=tuple(samples),
            norm_total=self.norm_total,
            n_float=self.floats.numel(),
            n_exact=self.exact.numel(),
            sums_sha256=hashlib.sha256(sums).hexdigest(),
            created_at=created_at,
            sums=sums,
        )


def partial_sums(sums: bytes, n_float: int, n_exact: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A partial's payload as (float32, float64) tensors; ``None`` when it has another length."""
    if len(sums) != 4 * n_float + 8 * n_exact:
        return None
    buffer = bytearray(sums)  # one copy, which the tensors share
    floats = torch.frombuffer(buffer, dtype=torch.float32, count=n_float) if n_float else torch.zeros(0)
    exact = (
        torch.frombuffer(buffer, dtype=torch.float64, count=n_exact, offset=4 * n_float)
        if n_exact
        else torch.zeros(0, dtype=torch.float64)
    )
    return floats, exact


def edge_problem(policy: Policy) -> str:
    """Why ``policy`` cannot be folded by edge aggregators ('' when it can): edges sum weighted
    deltas, which serves the weighted mean of async FedBuff (with FedOpt at the root, a norm
    clip, local DP), not a rule that needs every delta at once or the root's noise."""
    if policy.mode != "async":
        return f"--mode {policy.mode} needs every update at one aggregator; edge aggregation folds --mode async"
    if policy.robust.kind != "none":
        return f"--robust {policy.robust.describe()} needs every delta at one aggregator; edges fold the weighted mean"
    if policy.central_dp is not None:
        return "central DP (--dp-clip without --dp-local) adds its noise at one aggregator; use --dp-local with edges"
    return ""


@dataclass
class _Held:
    """An update held in the adaptive clip's warm-up: what adding it to the buffer takes."""

    index: int  # in ``pending``
    accepted: Accepted
    floats: torch.Tensor  # a copy, in the order ``layout`` says (flat when ``None``)
    exact: torch.Tensor
    layout: BlockLayout | None
    norm_weight: float
    factor: float  # the robust buffer's scale


@dataclass
class _Round:
    version: int
    number: int
    size: int


class RoundFit(StrEnum):
    """Where a sync round named by an answer's task stands, on the current version."""

    OPEN = "open"  # the round this aggregator collects
    CLOSED = "closed"  # closed, or a newer round is open: its answers are stale
    UNHEARD = "unheard"  # no word of it yet (its round message may come after its answers)


@dataclass
class AggregatorCore:
    model: FlatModel
    version: int
    policy: Policy
    job_id: str
    applied: set[str] = field(default_factory=set)
    updates_total: int = 0
    clip_window: tuple[float, ...] = ()  # the recorded norms as of ``version`` (its manifest's)
    server_state: ServerState | None = None  # FedOpt's moments as of ``version``
    dp: DpRecord | None = None  # DP's accounting as of ``version``
    # --mode fedasync: the (floats, exact) of recent versions, by version, that updates are based
    # on; the core adds each version it makes and forgets those older than max staleness
    bases: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._reset_buffer()
        self._round: _Round | None = None
        # The newest sync round closed on ``version``: a late answer to it is stale, even when a
        # newer round on the same version is open (round numbers only grow).
        self._closed = -1
        # Each update is dequantized into this one vector, then added to the buffer: a fresh
        # output per update would cost more in page faults than the arithmetic.
        self._scratch = torch.empty(self.model.spec.n_float, dtype=torch.float32)

    def _scratch_for(self, model: FlatModel) -> torch.Tensor:
        if self._scratch.numel() != model.spec.n_float:  # a model of another shape was adopted
            self._scratch = torch.empty(model.spec.n_float, dtype=torch.float32)
        return self._scratch

    def _reset_buffer(self) -> None:
        self.buffer: Accumulator | RobustBuffer | CosineBuffer | MixBuffer
        if self.policy.mode == "fedasync":
            self.buffer = MixBuffer()
        elif self.policy.robust.kind == "none":
            self.buffer = Accumulator(self.model.spec.n_float, self.model.spec.n_exact)
        elif self.policy.robust.kind == "cosine":
            self.buffer = CosineBuffer(self.model.spec.n_float, self.model.spec.n_exact)
        else:
            self.buffer = RobustBuffer(self.policy.robust)
        self._layout: BlockLayout | None = None  # the block order the buffer sums in
        self.pending: list[Accepted] = []
        self._recorded: list[float] = []  # the pending updates' norms after clipping
        self._held: list[_Held] = []  # the warm-up's updates, not yet in the buffer
        self._pending_ids: set[str] = set()  # kept beside the list: checked on every offer
        self._by_worker: Counter[str] = Counter()  # the pending updates per worker (DP's sensitivity)

    @property
    def pending_ids(self) -> set[str]:
        return set(self._pending_ids)

    def offer(self, update: Update, round_number: int | None = None) -> Accepted | Rejected:
        """Screen an update whose signature is already verified; buffer it if it passes.

        ``round_number``: in sync mode, the round its task was issued for; it must be the open one.
        ``None`` (replay, a task of no round): the open round is taken as the update's."""
        tid = update.task_id
        if update.job_id != self.job_id:
            return Rejected(
                tid, Reason.WRONG_JOB, f"update for job {update.job_id!r}, this is {self.job_id!r}"
            )
        if tid in self.applied or tid in self._pending_ids:
            return Rejected(tid, Reason.DUPLICATE, f"task {tid} was already counted")
        tau = self.version - update.base_version
        if tau < 0:
            return Rejected(
                tid, Reason.FUTURE_VERSION, f"base version {update.base_version} > current {self.version}"
            )
        if self.policy.mode == "sync":
            r = self._round
            if tau > 0 or r is None or r.version != self.version or round_number not in (None, r.number):
                named = "" if round_number is None else f"{round_number} "
                return Rejected(tid, Reason.STALE, f"round {named}on version {update.base_version} is closed", tau)
        elif tau > self.policy.max_staleness:
            return Rejected(tid, Reason.STALE, f"staleness {tau} > max {self.policy.max_staleness}", tau)
        elif self.policy.mode == "fedasync" and update.base_version not in self.bases:
            return Rejected(tid, Reason.STALE, f"base version {update.base_version} is not held to mix with", tau)
        if update.num_samples < 1:
            return Rejected(tid, Reason.BAD_SAMPLE_COUNT, f"num_samples={update.num_samples}", tau)
        try:
            floats, exact, layout = decode_delta_wire(
                update.delta, self.model.spec, update.quant, update.block, self._scratch_for(self.model)
            )
            norm = screen(floats, exact, self.policy.max_norm)
        except ScreeningError as exc:
            return Rejected(tid, exc.reason, str(exc), tau)
        weight = self.policy.weight(update.num_samples, tau)
        if not 0 < weight < math.inf:
            return Rejected(tid, Reason.STALE, f"staleness weight {weight} leaves nothing to apply", tau)
        norm_weight = self.policy.norm_weight(update.num_samples, tau)
        factor = self.policy.robust_factor(tau)
        known = len(self.clip_window) + len(self._recorded) + len(self._held)
        if self.policy.clip.warming(known):
            # No bound yet: hold a copy (``floats`` is the scratch vector) until there is one.
            accepted = Accepted(tid, tau, weight, norm)
            self._held.append(
                _Held(len(self.pending), accepted, floats.clone(), exact, layout, norm_weight, factor)
            )
            self.pending.append(accepted)
            self._pending_ids.add(tid)
            self._by_worker[update.worker_id] += 1
            if not self.policy.clip.warming(known + 1):
                self._settle()
            return self.pending[-1]
        # Clipped against the norms recorded before it: the window of the parent version, then
        # this buffer's, in arrival order. A clipped update is recorded at the bound.
        bound = self.policy.clip.limit([*self.clip_window, *self._recorded])
        accepted = self._add(
            Accepted(tid, tau, weight, norm), floats, exact, layout, norm_weight, factor, bound
        )
        self.pending.append(accepted)
        self._pending_ids.add(tid)
        self._by_worker[update.worker_id] += 1
        return accepted

    def _add(
        self,
        accepted: Accepted,
        floats: torch.Tensor,
        exact: torch.Tensor,
        layout: BlockLayout | None,
        norm_weight: float,
        factor: float,
        bound: float | None,
    ) -> Accepted:
        """Add a screened delta to the buffer, clipped to ``bound``; record its norm after clipping."""
        norm = accepted.norm
        clip = bound / norm if bound is not None and norm > bound else 1.0
        if isinstance(self.buffer, MixBuffer):
            flat = floats if layout is None else to_flat(floats, layout)
            self.buffer.add(flat, exact, self.version - accepted.staleness, accepted.weight, clip)
        elif isinstance(self.buffer, RobustBuffer):
            flat = floats if layout is None else to_flat(floats, layout)
            self.buffer.add(flat, exact, factor, clip)
        elif isinstance(self.buffer, CosineBuffer):
            flat = floats if layout is None else to_flat(floats, layout)
            self.buffer.add(accepted.task_id, flat, exact, accepted.weight, norm_weight, factor, clip)
        else:
            # The buffer sums in the block order of its first update; others are reordered to
            # match (a copy; free in the usual case where every update uses the job's block size).
            if self._layout is None:
                self._layout = layout or block_layout(self.model.spec.float_sizes, DEFAULT_BLOCK)
            if layout is not self._layout:
                floats = to_wire(floats if layout is None else to_flat(floats, layout), self._layout)
            self.buffer.add(floats, exact, accepted.weight, norm_weight, clip)
        self._recorded.append(norm if bound is None or norm <= bound else bound)
        return accepted if clip == accepted.clip else replace(accepted, clip=clip)

    def _settle(self) -> None:
        """End the warm-up: one bound from the median of every norm known, recorded and held
        (as the clip once warm), then the held updates into the buffer in arrival order."""
        held, self._held = self._held, []
        norms = [*self.clip_window, *self._recorded, *(h.accepted.norm for h in held)]
        bound = self.policy.clip.limit(norms, settle=True)
        for h in held:
            self.pending[h.index] = self._add(
                h.accepted, h.floats, h.exact, h.layout, h.norm_weight, h.factor, bound
            )

    def open_round(self, message: Round) -> None:
        """Collect round ``message.round`` on the current version. A close, a round closed
        already, or one older than the open one, opens nothing."""
        if message.close or message.version != self.version or self.round_fit(message.round) is RoundFit.CLOSED:
            return
        self._round = _Round(message.version, message.round, message.size)

    def round_fit(self, number: int) -> RoundFit:
        """Where sync round ``number`` on the current version stands."""
        r = self._round if self._round is not None and self._round.version == self.version else None
        if number <= self._closed or (r is not None and number < r.number):
            return RoundFit.CLOSED
        return RoundFit.OPEN if r is not None and number == r.number else RoundFit.UNHEARD

    def round_over(self, message: Round) -> bool:
        """Is the round ``message`` names over (its version made or gone, or the round closed)?"""
        if message.version != self.version:
            return message.version < self.version
        return self.round_fit(message.round) is RoundFit.CLOSED

    def ready(self) -> bool:
        """Is the buffer due to become a version?"""
        if not self.pending:
            return False
        if self.policy.mode == "sync":  # the round is due: held updates are settled at flush
            return self._round is not None and len(self.pending) >= self._round.size
        k = 1 if self.policy.mode == "fedasync" else self.policy.k
        return not self._held and len(self.pending) >= k  # not while the bound is unknown

    def close_round(self, message: Round) -> bool:
        """A sync round's deadline passed: returns whether to flush what arrived. A round that
        closes with nothing is over all the same: its late answers are stale from now on."""
        if self.policy.mode != "sync" or not message.close or message.version != self.version:
            return False
        r = self._round
        if r is not None and r.number <= message.round:
            if self.pending:
                return True
            self._round = None
        self._closed = max(self._closed, message.round)
        return False

    def flush(self, noise_seed: int | None = None) -> NewVersion:
        """The buffer as a new version. ``noise_seed``: central DP's noise is drawn from it (the
        caller draws it fresh, and records it where replay finds it); required with central DP."""
        if self._held:
            self._settle()
        if isinstance(self.buffer, Accumulator) and self._layout is not None:
            self.buffer.floats = to_flat(self.buffer.floats, self._layout)  # flat order, once per version
        floats, exact = self._step(noise_seed)
        cosines, left_out = {}, frozenset[str]()
        if isinstance(self.buffer, CosineBuffer):
            cosines, left_out = self.buffer.cosines, self.buffer.left_out
        ids = tuple(a.task_id for a in self.pending)
        mean_tau = sum(a.staleness for a in self.pending) / len(self.pending)
        window = (*self.clip_window, *self._recorded)[-self.policy.clip.window :]
        new = NewVersion(
            self.version + 1,
            self.version,
            self.model.with_vectors(floats, exact),
            ids,
            mean_tau,
            window,
            tuple(self.pending),
            cosines,
            left_out,
            self.server_state,
            self._account(noise_seed),
        )
        self.model = new.model
        self.version = new.version
        self.clip_window = window
        self.dp = new.dp
        if self.policy.mode == "fedasync":
            self.bases[new.version] = (new.model.floats, new.model.exact)
            for v in [v for v in self.bases if v < new.version - self.policy.max_staleness]:
                del self.bases[v]
        self.applied.update(ids)
        self.updates_total += len(ids)
        self._round = None
        self._closed = -1  # round numbers are per version here: the new one has none closed yet
        self._reset_buffer()
        return new

    def take_partial(self) -> PartialFold:
        """An edge: the buffer as a partial aggregate for the root, against the current version.
        The core stays at its version; the buffer starts afresh."""
        if self._held:
            self._settle()
        buffer = self.buffer
        if not isinstance(buffer, Accumulator) or not self.pending:
            raise ValueError("a partial folds a non-empty weighted-mean buffer")
        if self._layout is not None:
            buffer.floats = to_flat(buffer.floats, self._layout)
        fold = PartialFold(
            self.version, tuple(self.pending), tuple(self._recorded), buffer.floats, buffer.exact, buffer.total_norm
        )
        self._reset_buffer()
        return fold

    def partial_overlap(self, partial: Partial) -> tuple[list[str], list[str], list[str]]:
        """The root: the partial's updates already in a stored version (``applied``), those in this
        buffer (not stored yet), and those it lists twice."""
        applied, held, twice = [], [], []
        seen: set[str] = set()
        for tid in partial.update_ids:
            if tid in seen:
                twice.append(tid)
            elif tid in self.applied:
                applied.append(tid)
            elif tid in self._pending_ids:
                held.append(tid)
            seen.add(tid)
        return applied, held, twice

    def offer_partial(self, partial: Partial) -> list[Accepted] | Rejected:
        """The root: add an edge's partial aggregate (its signature checked, its overlap with what
        is applied or held refused by the caller, ``partial_overlap``) to the buffer. Each update's staleness
        becomes versions behind this root; its weight is the one the edge gave it."""
        pid = partial.partial_id
        if partial.job_id != self.job_id:
            return Rejected(pid, Reason.WRONG_JOB, f"partial for job {partial.job_id!r}, this is {self.job_id!r}")
        if problem := edge_problem(self.policy):
            return Rejected(pid, Reason.BAD_PAYLOAD, problem)
        n = len(partial.update_ids)
        columns = (partial.update_digests, partial.worker_ids, partial.staleness, partial.weights, partial.norms)
        if n == 0 or any(len(c) != n for c in (*columns, partial.clips, partial.recorded, partial.num_samples)):
            return Rejected(pid, Reason.BAD_PAYLOAD, "a partial lists each of its updates once in every column")
        lag = self.version - partial.version
        if lag < 0:
            return Rejected(pid, Reason.FUTURE_VERSION, f"folded against version {partial.version} > current {self.version}")
        if lag + max(partial.staleness) > self.policy.max_staleness or min(partial.staleness) < 0:
            return Rejected(pid, Reason.STALE, f"folded against version {partial.version}: too stale for {self.version}", lag)
        spec = self.model.spec
        if (partial.n_float, partial.n_exact) != (spec.n_float, spec.n_exact):
            return Rejected(pid, Reason.BAD_SHAPE, "the partial's sums are not of this model's shape")
        sums = partial_sums(partial.sums, spec.n_float, spec.n_exact)
        weight = math.fsum(partial.weights)
        if sums is None or not all(0 < w < math.inf for w in (*partial.weights, partial.norm_total)):
            return Rejected(pid, Reason.BAD_PAYLOAD, "the partial's sums or weights are malformed")
        floats, exact = sums
        # float32 at first; only a length that overflows it is taken again in float64, in which no
        # float32 sum overflows: there the length is finite exactly when every value is
        length = float(torch.linalg.vector_norm(floats))
        if not math.isfinite(length):
            length = float(torch.linalg.vector_norm(floats, dtype=torch.float64))
        if not math.isfinite(length) or not bool(torch.isfinite(exact).all()):
            return Rejected(pid, Reason.NON_FINITE, "the partial's sums are not finite")
        if problem := self._partial_out_of_bounds(partial, length):
            return Rejected(pid, Reason.NORM_TOO_LARGE, problem)
        assert isinstance(self.buffer, Accumulator)  # edge_problem allows no other fold
        self.buffer.add_sum(floats, exact, weight, partial.norm_total, n)
        accepted = [
            Accepted(tid, lag + tau, w, norm, clip)
            for tid, tau, w, norm, clip in zip(
                partial.update_ids, partial.staleness, partial.weights, partial.norms, partial.clips, strict=True
            )
        ]
        self.pending.extend(accepted)
        self._pending_ids.update(partial.update_ids)
        self._recorded.extend(partial.recorded)
        self._by_worker.update(partial.worker_ids)
        return accepted

    def _partial_out_of_bounds(self, partial: Partial, length: float) -> str:
        """Why a partial claims more than its updates could move the model ('' when it does not):
        each clipped norm within its norm and the job's fixed clip or --max-norm, and the sum no
        longer (``length``) than the weighted clipped norms allow (the triangle inequality). An edge cannot
        then move the model further than the updates it names, with the weights it names."""
        bounds = [b for b in (self.policy.max_norm, self.policy.clip.bound if self.policy.clip.kind == "fixed" else None) if b]
        cap = min(bounds) * (1 + 1e-6) if bounds else math.inf
        for norm, rec in zip(partial.norms, partial.recorded, strict=True):
            if not (0 <= rec <= norm * (1 + 1e-6) and rec <= cap) or (self.policy.max_norm and norm > self.policy.max_norm):
                return f"a clipped norm {rec} exceeds its norm {norm} or the job's bound"
        total = 0.0  # summed as the edge's buffer did, update by update
        for n, tau, w in zip(partial.num_samples, partial.staleness, partial.weights, strict=True):
            if n < 1 or w != self.policy.weight(n, tau):
                return f"a weight {w} is not the policy's for {n} samples at staleness {tau}"
            total += self.policy.norm_weight(n, tau)
        if total != partial.norm_total:
            return f"its norm weight {partial.norm_total} is not the policy's ({total})"
        allowed = math.fsum(w * r for w, r in zip(partial.weights, partial.recorded, strict=True))
        if length > allowed * (1 + 1e-4) + 1e-9:
            return f"its sum is {length:.6g} long; its weights and clipped norms allow {allowed:.6g}"
        return ""

    def _step(self, noise_seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The new (floats, exact): the buffer's step, noised for central DP, through FedOpt's
        optimizer. Sets ``server_state`` to the moments after it."""
        x, e = self.model.floats, self.model.exact
        buffer, policy = self.buffer, self.policy
        if isinstance(buffer, MixBuffer):
            return buffer.apply(x, e, self.bases)
        dp = policy.central_dp
        if dp is not None:
            if noise_seed is None:
                raise ValueError("central DP needs the seed of the version's noise")
            assert isinstance(buffer, Accumulator)  # Policy allows no robust fold with DP
            buffer.add_noise(gaussian(noise_seed, x.numel()), dp.std)
        opt = policy.server_opt
        if not opt.stateful:
            step, exact_step = buffer.step(policy.server_lr)
            floats = x + step
        else:
            step, exact_step = buffer.step(1.0)  # the pseudo-gradient: the mean delta
            floats, self.server_state = opt.step(x, step, policy.server_lr, self.server_state)
            exact_step = torch.round(exact_step.to(torch.float64) * policy.server_lr).to(torch.int64)
        if dp is not None or (policy.dp is not None and policy.dp.local):
            return floats, e.clone()  # integer tensors (batch counters) count samples: not under DP
        return floats, e + exact_step

    def _account(self, noise_seed: int | None) -> DpRecord | None:
        """DP's accounting after the version being made (``None`` without DP)."""
        dp = self.policy.dp
        if dp is None:
            return None
        before = self.dp or DpRecord(0.0)
        if dp.local:  # each update its own mechanism: the worker that sent the most is the worst off
            counts = dict(before.counts)
            for worker, n in self._by_worker.items():
                counts[worker] = counts.get(worker, 0) + n
            worst = max(counts.values(), default=0)
            return DpRecord(epsilon(((dp.noise, worst),), dp.delta) if worst else 0.0, (), counts)
        # one version, one Gaussian mechanism; a worker with m updates in it moved the sum by m clips
        m = max(self._by_worker.values(), default=1)
        events = compose(before.events, dp.noise / m)
        return DpRecord(epsilon(events, dp.delta), events, {}, noise_seed)
