"""Replay the update log: show it (``fedq log``), re-derive stored versions (``fedq replay verify``)
and re-aggregate a finished job under another policy (``fedq replay what-if``).

A version is a pure function of (parent, ordered applied updates, policy): the
aggregator folds updates one by one in arrival order, element-wise in float32,
single-threaded per element, so the same inputs give the same bytes. The adaptive
clip's window of recent norms is part of the parent: its manifest records it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aggregator.binding import bound
from aggregator.core import NOISE_RECORD, PARTIALS, Accepted, AggregatorCore, DpRecord, NewVersion
from shared.aggregation import Clip, Policy, Robust, clip_window_of
from shared.app import App
from shared.codec import MAX_MESSAGE_BYTES, decode_head, open_envelope, read_task_token
from shared.errors import FedqError, StoreError, UnknownTaskError, UnsignedVersionError, WireError
from shared.keys import DirectoryTrust
from shared.ledger import read_lines
from shared.messages import Partial, Round, Update
from shared.privacy import Dp
from shared.quantize import decode_delta
from shared.reasons import Fate, Reason
from shared.server_opt import ServerOpt, ServerState
from shared.settings import Settings
from shared.signing import Keyring, Role
from shared.staleness import Staleness
from shared.store import SERVER_STATE, Manifest, ModelStore, open_store
from shared.tensors import FlatModel
from shared.transport import StreamEntry
from shared.transport.connect import connected


@dataclass(frozen=True)
class LoggedUpdate:
    entry: StreamEntry
    update: Update
    digest: str
    signature_ok: bool


def _logged(
    entries: Iterable[StreamEntry], kind: type[Update] | type[Partial], job_id: str, keyring: Keyring | None,
    max_bytes: int, role: Role,
) -> Iterator[tuple[StreamEntry, Update | Partial, bool]]:
    """The job's messages of one kind among raw stream entries, each with whether its signature
    verifies by a key of ``role`` (always, without a keyring); garbage, entries above ``max_bytes``
    (never unpacked) and other jobs are skipped."""
    name = "update" if kind is Update else "partial"
    for entry in entries:
        try:
            envelope = open_envelope(entry.body, max_bytes)
            if envelope.kind != name:
                continue
            message = decode_head(envelope)
        except WireError:
            continue
        if not isinstance(message, kind) or message.job_id != job_id:
            continue
        signature_ok = True
        if keyring is not None:
            try:
                signature_ok = role in keyring.verify(envelope.signer, envelope.sig, envelope.signed_bytes()).roles
            except WireError:
                signature_ok = False
        yield entry, message, signature_ok


def decode_entries(
    entries: Iterable[StreamEntry], job_id: str, keyring: Keyring | None, max_bytes: int = MAX_MESSAGE_BYTES
) -> list[LoggedUpdate]:
    """The job's updates among raw stream entries."""
    return [
        LoggedUpdate(entry, update, hashlib.sha256(entry.body).hexdigest(), ok)
        for entry, update, ok in _logged(entries, Update, job_id, keyring, max_bytes, Role.WORKER)
        if isinstance(update, Update)
    ]


@dataclass(frozen=True)
class LoggedPartial:
    partial: Partial
    signature_ok: bool


def decode_partials(
    entries: Iterable[StreamEntry], job_id: str, keyring: Keyring | None, max_bytes: int = MAX_MESSAGE_BYTES
) -> dict[str, LoggedPartial]:
    """The job's edge partials among raw stream entries (they travel on the results exchange too),
    by partial id; one not signed by an aggregator key is marked."""
    return {
        partial.partial_id: LoggedPartial(partial, ok)
        for _, partial, ok in _logged(entries, Partial, job_id, keyring, max_bytes, Role.AGGREGATOR)
        if isinstance(partial, Partial)
    }


def policy_of(manifest: Manifest) -> Policy:
    p = manifest.policy
    if not p:
        raise FedqError(f"version {manifest.version} records no policy: it cannot be re-derived")
    return Policy(
        mode=p["mode"],
        k=p["k"],
        server_lr=p["server_lr"],
        staleness=Staleness.parse(p["staleness"]),
        max_staleness=p["max_staleness"],
        max_norm=p.get("max_norm"),
        normalize=p.get("normalize", "samples"),
        # A manifest from before clipping and robust aggregation: neither was applied.
        clip=Clip.parse(p.get("clip", "off")),
        robust=Robust.parse(p.get("robust", "none")),
        weighting=p.get("weighting", "samples"),  # older manifests: sample weighting, the only one
        alpha=p.get("alpha", 0.6),
        server_opt=ServerOpt.parse(p.get("server_opt", "sgd")),
        dp=Dp.from_dict(p["dp"]) if p.get("dp") else None,
    )


@dataclass
class Job:
    """A finished (or running) job's records: store, ledger, trusted keys and its update log."""

    settings: Settings
    store: ModelStore
    manifests: dict[int, Manifest]
    updates: list[LoggedUpdate]
    ledger: list[dict[str, Any]]
    unsigned: dict[int, str] = field(default_factory=dict)  # versions whose signature does not verify
    partials: dict[str, LoggedPartial] = field(default_factory=dict)  # edge aggregation's, by id

    @property
    def by_digest(self) -> dict[str, LoggedUpdate]:
        return {u.digest: u for u in self.updates}

    def by_task(self, task_id: str) -> list[LoggedUpdate]:
        return [u for u in self.updates if u.update.task_id == task_id]


async def load_job(settings: Settings, offset: Any = "first") -> Job:
    store = ModelStore(open_store(settings.store, settings), settings.job)
    manifests = {v: await store.manifest(v) for v in await store.versions()}
    if not manifests:
        raise FedqError(f"job {settings.job} has no versions in the store at {settings.store}")
    keyring = DirectoryTrust(settings.trusted_dir)
    checked = ModelStore(store.objects, settings.job, keyring)
    unsigned: dict[int, str] = {}
    for v, manifest in manifests.items():  # not signed for this run by a key allowed to make it: refused
        try:
            await checked.vouch(manifest)
        except UnsignedVersionError as exc:
            unsigned[v] = str(exc)
    async with connected(settings, "fedq-replay") as transport:
        entries = await transport.read_all(transport.names.update_log, offset)
    updates = decode_entries(entries, settings.job, keyring, settings.max_message_bytes)
    partials = decode_partials(entries, settings.job, keyring, settings.max_message_bytes)
    ledger = list(read_lines(settings.out_dir / "ledger.jsonl"))
    return Job(settings, store, manifests, updates, ledger, unsigned, partials)


# -- verify -------------------------------------------------------------------------------------


@dataclass
class Verdict:
    version: int
    ok: bool
    expected: str
    derived: str | None
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _logged_update(job: Job, manifest: Manifest, i: int, problems: list[str]) -> Update | None:
    tid = manifest.update_ids[i]
    digest = manifest.update_digests[i] if i < len(manifest.update_digests) else None
    found = job.by_digest.get(digest) if digest else None
    if found is not None and found.update.task_id != tid:
        problems.append(f"the version lists update {tid} with the digest of update {found.update.task_id}")
        return None
    if found is None:
        copies = job.by_task(tid)
        if not copies:
            problems.append(f"update {tid} is not in the update log (past its retention?)")
            return None
        if digest is not None:
            bad = [c for c in copies if not c.signature_ok]
            problems.append(
                f"logged update {tid} differs from the one applied"
                + (" and its signature does not verify: the log entry was tampered with" if bad else "")
            )
            return None
        found = copies[0]
    if not found.signature_ok:
        problems.append(f"logged update {tid} has an invalid signature")
    return found.update


async def _verify_rollback(job: Job, manifest: Manifest, n: int) -> Verdict:
    """A rollback version (``fedq model rollback``) re-stores version ``n``'s model: derived from
    version n's stored bytes, it applies no updates and must hash like version n."""
    problems = []
    if manifest.update_ids:
        problems.append(f"a rollback applies no updates, this one lists {len(manifest.update_ids)}")
    try:
        derived = hashlib.sha256((await job.store.load_bytes(n))[1]).hexdigest()
    except StoreError as exc:
        return Verdict(manifest.version, False, manifest.sha256, None, [f"rollback of v{n}: {exc}"])
    if derived != manifest.sha256:
        problems.append(f"rollback of v{n}, whose sha256 {derived[:16]} differs from {manifest.sha256[:16]}")
    try:
        await job.store.load_bytes(manifest.version)
    except StoreError as exc:
        problems.append(f"stored model: {exc}")
    return Verdict(manifest.version, not problems, manifest.sha256, derived, problems)


async def verify_version(job: Job, version: int) -> Verdict:
    manifest = job.manifests.get(version)
    if manifest is None:
        raise FedqError(f"job {job.settings.job} has no version {version}")
    problems: list[str] = []
    if version in job.unsigned:
        return Verdict(version, False, manifest.sha256, None, [f"{Reason.UNSIGNED_VERSION}: {job.unsigned[version]}"])
    if version == 0:
        try:
            await job.store.load_bytes(0)
        except StoreError as exc:
            problems.append(str(exc))
        return Verdict(0, not problems, manifest.sha256, None, problems)
    if manifest.rollback_of is not None:
        return await _verify_rollback(job, manifest, manifest.rollback_of)
    try:
        stored, parent = await job.store.load(manifest.parent)
        parent_manifest = job.manifests.get(manifest.parent, stored)  # the job's reading of it
        policy = policy_of(manifest)
        state_blob = await job.store.load_state(parent_manifest) if policy.server_opt.stateful else None
    except StoreError as exc:
        return Verdict(version, False, manifest.sha256, None, [f"parent: {exc}"])
    if PARTIALS in manifest.policy:
        return await _verify_through_partials(job, manifest, parent, parent_manifest, policy, state_blob)
    updates = []
    for i in range(len(manifest.update_ids)):
        updates.append(await _materialized(job, _logged_update(job, manifest, i, problems), problems))
    bases: dict[int, tuple[torch.Tensor, torch.Tensor]] = {manifest.parent: (parent.floats, parent.exact)}
    if policy.mode == "fedasync":  # each update mixes with the version it was trained on
        for u in updates:
            if u is not None and u.base_version not in bases:
                try:
                    base = (await job.store.load(u.base_version))[1]
                except StoreError as exc:
                    problems.append(f"base version {u.base_version} of update {u.task_id}: {exc}")
                    continue
                bases[u.base_version] = (base.floats, base.exact)
    if problems:
        return Verdict(version, False, manifest.sha256, None, problems)
    # Central DP: the noise seed the aggregator's ledger recorded for this version (a version made
    # again after a failed save has several records: one of them is this version's).
    seeds: list[int | None] = [None]
    if policy.central_dp is not None:
        seeds = [int(r["noise_seed"]) for r in job.ledger if r.get("kind") == NOISE_RECORD and r.get("version") == version]
        if not seeds:
            return Verdict(version, False, manifest.sha256, None, [f"the ledger records no DP noise seed for v{version}"])
    for seed in seeds:
        core = _parent_core(job, parent, parent_manifest, policy, state_blob, dict(bases))
        if policy.mode == "sync":
            core.open_round(Round(job.settings.job, manifest.parent, 0, len(manifest.update_ids), 0.0))
        refused = []
        for tid, update in zip(manifest.update_ids, updates, strict=True):
            assert update is not None
            result = core.offer(update)
            if not isinstance(result, Accepted):
                refused.append(f"update {tid} is refused on replay: {result.reason} ({result.detail})")
        if refused:
            return Verdict(version, False, manifest.sha256, None, refused)
        new = core.flush(seed)
        if hashlib.sha256(new.model.to_bytes()).hexdigest() == manifest.sha256:
            break
    return await _compare(job, manifest, new, problems)


def _parent_core(
    job: Job,
    parent: FlatModel,
    parent_manifest: Manifest,
    policy: Policy,
    state_blob: bytes | None,
    bases: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> AggregatorCore:
    """A core at a version's parent, as the aggregator that made the version held it: the parent's
    clip window, server optimizer state and DP accounting."""
    return AggregatorCore(
        parent,
        parent_manifest.version,
        policy,
        job.settings.job,
        clip_window=clip_window_of(parent_manifest.policy),
        server_state=None if state_blob is None else ServerState.from_bytes(state_blob),
        dp=DpRecord.of(parent_manifest.policy),
        bases=bases or {},
    )


async def _compare(job: Job, manifest: Manifest, new: NewVersion, problems: list[str]) -> Verdict:
    """The re-derived version against its manifest and the stored objects: the model's sha256,
    then its server state and DP accounting, and that the state and model objects are there."""
    derived = hashlib.sha256(new.model.to_bytes()).hexdigest()
    if derived != manifest.sha256:
        problems.append(f"re-derived sha256 {derived[:16]} differs from the manifest's {manifest.sha256[:16]}")
    else:
        problems += _state_problems(manifest, new)
    try:
        await job.store.load_state(manifest)
    except StoreError as exc:
        problems.append(str(exc))
    try:
        await job.store.load_bytes(manifest.version)
    except StoreError as exc:
        problems.append(f"stored model: {exc}")
    return Verdict(manifest.version, not problems, manifest.sha256, derived, problems)


async def _verify_through_partials(
    job: Job, manifest: Manifest, parent: FlatModel, parent_manifest: Manifest, policy: Policy, state_blob: bytes | None
) -> Verdict:
    """A root's version (edge aggregation): each partial it names re-derived from its updates (as
    its edge folded them, against the root version it names), then the version from the partials."""
    problems: list[str] = []
    partials: list[Partial] = []
    offset = 0
    for record in manifest.policy[PARTIALS]:
        pid = str(record.get("id", ""))
        logged = job.partials.get(pid)
        if logged is None:
            problems.append(f"partial {pid[:12]} is not in the update log (past its retention?)")
            continue
        partial = logged.partial
        n = len(partial.update_ids)
        if not logged.signature_ok:
            problems.append(f"partial {pid[:12]} is not signed by an aggregator key")
        elif partial.sums_sha256 != record.get("sums_sha256") or hashlib.sha256(partial.sums).hexdigest() != partial.sums_sha256:
            problems.append(f"partial {pid[:12]}'s sums differ from the ones its version folded")
        elif tuple(manifest.update_ids[offset : offset + n]) != partial.update_ids:
            problems.append(f"partial {pid[:12]} holds other updates than its version lists")
        else:
            problems += await _rederive_partial(job, partial, manifest, offset, parent)
        partials.append(partial)
        offset += n
    if offset != len(manifest.update_ids):
        problems.append(f"the partials hold {offset} updates, the version lists {len(manifest.update_ids)}")
    if problems:
        return Verdict(manifest.version, False, manifest.sha256, None, problems)
    core = _parent_core(job, parent, parent_manifest, policy, state_blob)
    for partial in partials:
        result = core.offer_partial(partial)
        if not isinstance(result, list):
            return Verdict(manifest.version, False, manifest.sha256, None, [f"partial {partial.partial_id[:12]} is refused on replay: {result.reason} ({result.detail})"])
    return await _compare(job, manifest, core.flush(), problems)


async def _rederive_partial(job: Job, partial: Partial, manifest: Manifest, offset: int, model: FlatModel) -> list[str]:
    """Fold the partial's updates as its edge did: against root version ``partial.version``, with
    that version's clip window; the sums, weights and clips must come out the same."""
    pid = partial.partial_id[:12]
    at = job.manifests.get(partial.version)
    if at is None:
        return [f"partial {pid} was folded against version {partial.version}, which the store lacks"]
    problems: list[str] = []
    core = AggregatorCore(model, partial.version, policy_of(manifest), job.settings.job, clip_window=clip_window_of(at.policy))
    updates = []
    for i in range(len(partial.update_ids)):
        update = await _materialized(job, _logged_update(job, manifest, offset + i, problems), problems)
        if update is None:
            return problems
        result = core.offer(update)
        if not isinstance(result, Accepted):
            return [f"update {update.task_id} of partial {pid} is refused on replay: {result.reason} ({result.detail})"]
        updates.append((manifest.update_digests[offset + i], update.worker_id, update.num_samples))
    # the same updates, folded to the same bytes, with every column the root read
    derived = core.take_partial().message(partial.job_id, partial.partial_id, partial.shard, updates, partial.created_at)
    if derived.sums_sha256 != partial.sums_sha256:
        problems.append(f"partial {pid} re-derives to other sums than its edge sent")
    if derived != dataclasses.replace(partial, sums=derived.sums):
        problems.append(f"partial {pid} re-derives to other weights, norms, clips, staleness or workers than its edge sent")
    return problems


def _state_problems(manifest: Manifest, new: NewVersion) -> list[str]:
    """What differs between a re-derived version's server state and DP accounting and its manifest's."""
    problems = []
    named = manifest.policy.get(SERVER_STATE) or {}
    derived_state = None if new.server_state is None else new.server_state.sha256()
    if derived_state != named.get("sha256"):
        problems.append("the re-derived server optimizer state differs from the one the manifest names")
    recorded = DpRecord.of(manifest.policy)
    if (new.dp is None) != (recorded is None) or (
        new.dp is not None
        and recorded is not None
        and (new.dp.events, new.dp.counts) != (recorded.events, recorded.counts)
    ):
        problems.append("the re-derived DP accounting differs from the manifest's")
    elif new.dp is not None and recorded is not None and not math.isclose(new.dp.epsilon, recorded.epsilon, rel_tol=1e-9):
        problems.append(f"epsilon re-computes as {new.dp.epsilon:.6g}, the manifest says {recorded.epsilon:.6g}")
    return problems


# -- what-if --------------------------------------------------------------------------------------


@dataclass
class Curve:
    label: str
    updates: list[int]  # applied updates when each version was made
    accuracy: list[float]
    shas: list[str]


async def _materialized(job: Job, update: Update | None, problems: list[str]) -> Update | None:
    """The update as the aggregator folded it: bound to its task (base version and sample cap
    from the coordinator's token, ``aggregator.binding``), and with a claim-checked delta fetched
    from the store (while the blob is retained)."""
    if update is None:
        return None
    if update.task:
        try:
            update = bound(update, read_task_token(update.task))
        except UnknownTaskError as exc:
            problems.append(f"update {update.task_id}: {exc}")
            return None
    if not update.delta_key:
        return update
    from aggregator.service import resolve_claim

    resolved = await resolve_claim(job.store, update)
    if isinstance(resolved, Update):
        return resolved
    gone = " (its blob is gone from the store)" if resolved.reason == "payload_missing" else ""
    problems.append(f"update {update.task_id}: {resolved.detail}{gone}")
    return None


async def applied_sequence(job: Job) -> list[tuple[Update, int]]:
    """The applied updates in arrival order, each with the arrival count at which its base
    version was created (so staleness can be recomputed under another policy)."""
    if job.unsigned:
        raise FedqError(
            f"{Reason.UNSIGNED_VERSION}: versions {sorted(job.unsigned)} of job {job.settings.job} are not "
            f"signed by a key allowed to make them ({next(iter(job.unsigned.values()))})"
        )
    created_at = {v: m.updates_total for v, m in job.manifests.items()}
    seq: list[tuple[Update, int]] = []
    for v in sorted(job.manifests):
        m = job.manifests[v]
        for i in range(len(m.update_ids)):
            problems: list[str] = []
            update = await _materialized(job, _logged_update(job, m, i, problems), problems)
            if update is None:
                raise FedqError("; ".join(problems))
            seq.append((update, created_at.get(update.base_version, 0)))
    return seq


async def what_if(job: Job, policy: Policy, app: App | None, label: str) -> Curve:
    """Re-aggregate the applied updates, in their original order, under ``policy``.

    An update trained on original version b arrives, in the new world, against the
    version that was current when b was made: its staleness is recomputed from that.
    Updates the original run rejected are not replayed.
    """
    if policy.mode != "async":
        raise FedqError("what-if replays --mode async (FedBuff) policies only")
    if policy.central_dp is not None:
        raise FedqError(
            "what-if does not re-aggregate a job run with central DP: other versions would need noise "
            "drawn anew, and their curve would not compare with the original's"
        )
    _, v0 = await job.store.load(0)
    core = AggregatorCore(v0, 0, policy, job.settings.job)
    version_after: list[int] = [0]  # new-world version after i arrivals
    curve = Curve(label, [0], [_evaluate(app, v0)], [v0.sha256()])
    for i, (update, base_arrivals) in enumerate(await applied_sequence(job)):
        base = version_after[min(base_arrivals, len(version_after) - 1)]
        result = core.offer(dataclasses.replace(update, base_version=base))
        if isinstance(result, Accepted) and core.ready():
            new = core.flush()
            curve.updates.append(i + 1)
            curve.accuracy.append(_evaluate(app, new.model))
            curve.shas.append(hashlib.sha256(new.model.to_bytes()).hexdigest())
        version_after.append(core.version)
    return curve


async def original_curve(job: Job, app: App | None) -> Curve:
    """The run's own curve: accuracies from its metrics, evaluated here where the run did not."""
    metrics = {m["version"]: m.get("accuracy") for m in read_lines(job.settings.out_dir / "metrics.jsonl")}
    versions = sorted(job.manifests)
    accuracy = []
    for v in versions:
        acc = metrics.get(v)
        if acc is None:
            acc = _evaluate(app, (await job.store.load(v))[1])
        accuracy.append(float(acc))
    return Curve(
        "original",
        [job.manifests[v].updates_total for v in versions],
        accuracy,
        [job.manifests[v].sha256 for v in versions],
    )


def _evaluate(app: App | None, model: FlatModel) -> float:
    if app is None:
        return float("nan")
    torch.set_num_threads(1)
    net = app.build_model(0)
    net.load_state_dict(model.to_state_dict())
    return float(app.evaluate(net).get("accuracy", float("nan")))


def plot(curves: list[Curve], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for c in curves:
        ax.plot(c.updates, c.accuracy, marker=".", label=c.label)
    ax.set_xlabel("updates applied")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- log view -------------------------------------------------------------------------------------


def log_rows(job: Job, spec_model: FlatModel) -> list[dict[str, Any]]:
    """One row per logged update: where, when, who, what, and its fate from the ledger."""
    fate: dict[str, dict[str, Any]] = {}
    for r in job.ledger:
        if r.get("task_id") and (r.get("fate") == Fate.APPLIED or r["task_id"] not in fate):
            fate[r["task_id"]] = r
    applied_in = {tid: v for v, m in job.manifests.items() for tid in m.update_ids}
    rows = []
    for u in job.updates:
        up = u.update
        try:
            floats, _ = decode_delta(up.delta, spec_model.spec, up.quant, up.block)
            norm: float | None = float(torch.linalg.vector_norm(floats))
        except FedqError:
            norm = None
        record = fate.get(up.task_id, {})
        if up.task_id in applied_in:
            outcome = f"applied v{applied_in[up.task_id]}"
        elif record.get("fate") == Fate.REJECTED:
            outcome = f"rejected {record.get('reason')}"
        elif record.get("fate") == Fate.PENDING:
            outcome = "pending"
        else:
            outcome = "unknown"
        rows.append(
            {
                "offset": u.entry.offset,
                "time": u.entry.timestamp or up.sent_at,
                "task": up.task_id,
                "worker": up.worker_id,
                "base_version": up.base_version,
                "staleness": record.get("staleness"),
                "samples": up.num_samples,
                "norm": norm,
                "bytes": len(u.entry.body) + up.delta_size,
                "by_reference": bool(up.delta_key),
                "signature": "valid" if u.signature_ok else "INVALID",
                "fate": outcome,
                "version": applied_in.get(up.task_id),
            }
        )
    return rows


# -- command-line faces ---------------------------------------------------------------------------


def _fmt(value: Any, width: int, digits: int = 3) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, float):
        text = f"{value:.{digits}f}"
    else:
        text = str(value)
    return text[:width].rjust(width)


async def show_log(
    settings: Settings,
    offset: Any,
    worker: str | None,
    task: str | None,
    versions: tuple[int, int] | None,
    as_json: bool,
) -> int:
    import json
    from datetime import UTC, datetime

    job = await load_job(settings, offset)
    _, v0 = await job.store.load(min(job.manifests))
    rows = log_rows(job, v0)
    if worker:
        rows = [r for r in rows if r["worker"] == worker]
    if task:
        rows = [r for r in rows if r["task"].startswith(task)]
    if versions:
        lo, hi = versions
        rows = [
            r for r in rows if lo <= (r["version"] if r["version"] is not None else r["base_version"]) <= hi
        ]
    if as_json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print(
        f"{'offset':>7} {'time':>8} {'task':>10} {'worker':>8} {'base':>5} {'tau':>4} {'n':>6} "
        f"{'norm':>8} {'bytes':>7} {'sig':>7}  fate"
    )
    for r in rows:
        t = datetime.fromtimestamp(r["time"], UTC).strftime("%H:%M:%S") if r["time"] else "-"
        print(
            f"{_fmt(r['offset'], 7)} {t:>8} {r['task'][:10]:>10} {_fmt(r['worker'], 8)} "
            f"{_fmt(r['base_version'], 5)} {_fmt(r['staleness'], 4)} {_fmt(r['samples'], 6)} "
            f"{_fmt(r['norm'], 8)} {_fmt(r['bytes'], 7)} {r['signature']:>7}  {r['fate']}"
        )
    print(f"{len(rows)} updates of job {settings.job}")
    return 0


async def run_verify(settings: Settings, version: int | None, as_json: bool) -> int:
    import json

    job = await load_job(settings)
    versions = sorted(job.manifests) if version is None else [version]
    verdicts = [await verify_version(job, v) for v in versions]
    for v in verdicts:
        if as_json:
            print(json.dumps(v.to_dict()))
        else:
            status = "ok      " if v.ok else "MISMATCH"
            print(f"v{v.version:<6} {status} {v.expected[:16]}" + "".join(f"\n    {p}" for p in v.problems))
    bad = [v.version for v in verdicts if not v.ok]
    if not as_json:
        print(
            f"{len(verdicts) - len(bad)}/{len(verdicts)} versions re-derived to their stored sha256"
            + (f"; failing: {bad}" if bad else "")
        )
    return 1 if bad else 0


async def run_what_if(
    settings: Settings, overrides: dict[str, Any], app: App | None, as_json: bool, out: Path | None
) -> int:
    import json

    job = await load_job(settings)
    original_policy = policy_of(job.manifests[max(job.manifests)])
    fields = {k: v for k, v in overrides.items() if v is not None}
    if "staleness" in fields:
        fields["staleness"] = Staleness.parse(fields["staleness"])
    if "clip" in fields:
        fields["clip"] = Clip.parse(fields["clip"])
    if "robust" in fields:
        fields["robust"] = Robust.parse(fields["robust"])
    opt = {k: fields.pop(k) for k in ("server_opt", "server_beta1", "server_beta2", "server_tau") if k in fields}
    if opt:
        was = original_policy.server_opt
        fields["server_opt"] = ServerOpt(
            opt.get("server_opt", was.kind),
            opt.get("server_beta1", was.beta1),
            opt.get("server_beta2", was.beta2),
            opt.get("server_tau", was.tau),
        )
    policy = dataclasses.replace(original_policy, **fields)
    label = ", ".join(f"{k}={overrides[k]}" for k in fields) or "original policy"
    original = await original_curve(job, app)
    replayed = await what_if(job, policy, app, label)
    reproduces = replayed.shas == original.shas
    png = (out or settings.out_dir) / f"what-if-{_slug(label)}.png"
    plot([original, replayed], png, f"job {settings.job}: original vs {label}")
    if as_json:
        print(
            json.dumps(
                {
                    "policy": policy.to_dict(),
                    "original": dataclasses.asdict(original),
                    "what_if": dataclasses.asdict(replayed),
                    "reproduces_original": reproduces,
                    "plot": str(png),
                }
            )
        )
        return 0
    print(f"{'updates':>8} {'original':>9} {'what-if':>9}")
    orig = dict(zip(original.updates, original.accuracy, strict=True))
    new = dict(zip(replayed.updates, replayed.accuracy, strict=True))
    for n in sorted(set(orig) | set(new)):
        print(f"{n:>8} {_fmt(orig.get(n), 9, 4)} {_fmt(new.get(n), 9, 4)}")
    print(
        f"original: {len(original.updates) - 1} versions, final {original.accuracy[-1]:.4f}; "
        f"what-if ({label}): {len(replayed.updates) - 1} versions, final {replayed.accuracy[-1]:.4f}"
    )
    print(f"reproduces the original versions byte for byte: {'yes' if reproduces else 'no'}")
    print(f"plot: {png}")
    return 0


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "-" for c in text).strip("-") or "original"
