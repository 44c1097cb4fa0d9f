"""Aggregation math: FedBuff, FedAsync and synchronous FedAvg over flat vectors.

All three are the same fold: accumulate ``w_i * delta_i`` into a buffer with
``w_i = n_i * s(tau_i)``, then apply ``x <- x + eta * sum(w_i delta_i) / sum(n_i)``
(``normalize="samples"``, FedBuff: a uniformly stale buffer takes a smaller step) or
``/ sum(w_i)`` (``normalize="weights"``). ``n_i`` is the update's sample count
(``weighting="samples"``) or 1 (``"uniform"``, FedBuff's unweighted mean). They differ only
in the weights and in when the buffer is applied, which the ``Policy`` decides.
Accumulation is in arrival order, element-wise, in float32: the result is a
pure function of (parent, ordered updates, policy), on any CPU. Every step is an
element-wise operation rounded on its own (IEEE 754 gives each the same bits whatever the
vector width) or a sum in an order fixed by the length alone: never a fused multiply-add
(torch fuses ``add_(x, alpha=w)`` on AVX2/AVX-512 and not on its default kernel) nor one of
torch's reductions, whose order follows the CPU's vector width.

Bounded influence: ``Clip`` scales a delta whose norm is out of line down to a bound (a
fixed one, or a multiple of the median norm of recently applied updates), and ``Robust``
swaps the weighted fold for a coordinate-wise trimmed mean or median of the buffer, or
(``cosine``) keeps the weighted fold but leaves out the updates that point away from the
buffer's coordinate-wise median (``CosineBuffer``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from shared.errors import ConfigError, ScreeningError
from shared.privacy import Dp
from shared.reasons import Reason
from shared.server_opt import ServerOpt
from shared.staleness import Staleness

MODES = ("async", "sync", "fedasync")
CLIPS = ("adaptive", "fixed", "off")
ROBUST = ("none", "trimmed-mean", "median", "cosine")
WEIGHTINGS = ("samples", "uniform")
# An integer delta (BatchNorm's num_batches_tracked and the like) beyond this is no training step.
MAX_EXACT_DELTA = 2**31
# The key of a manifest's policy record that carries the clip window after that version.
CLIP_WINDOW = "clip_window"
# Values per pass of ``add_scaled`` and ``sum_of_squares``: their scratch stays in cache.
_SLAB = 1 << 17
# The partial sums ``sum_of_squares`` carries from slab to slab.
_WIDTH = 1 << 11


@dataclass(frozen=True)
class Clip:
    """Norm clipping: a delta whose L2 norm (float part) exceeds the bound is scaled down to it.

    ``fixed``: the bound is ``bound``. ``adaptive``: ``factor`` times the median of the last
    ``window`` recorded norms, once ``warmup`` of them are known (nor while the median is 0).
    Until then the aggregator holds the updates back and clips them all against the median of
    their own norms once ``warmup`` are known (see ``AggregatorCore``), so a boosted update among
    a job's first ones is clipped too. A recorded norm is the norm after clipping, so an
    attacker's boosted deltas cannot drag the median up. ``off``: no clip (``--max-norm`` still
    rejects).
    """

    kind: str = "adaptive"
    bound: float = 0.0  # fixed only
    factor: float = 3.0
    window: int = 50
    warmup: int = 5

    def __post_init__(self) -> None:
        if self.kind not in CLIPS:
            raise ConfigError(f"unknown clip {self.kind!r}; use adaptive, a positive number or off")
        if self.kind == "fixed" and not 0 < self.bound < math.inf:
            raise ConfigError(f"the clip bound must be a positive number, not {self.bound!r}")
        if not 0 < self.factor < math.inf:
            raise ConfigError(f"the adaptive clip factor must be positive, not {self.factor!r}")
        if not 1 <= self.warmup <= self.window:
            raise ConfigError("the adaptive clip needs 1 <= warm-up <= window")

    def warming(self, known: int) -> bool:
        """Is an adaptive clip still in its warm-up with ``known`` norms recorded (and held)?"""
        return self.kind == "adaptive" and known < self.warmup

    def limit(self, history: Sequence[float], *, settle: bool = False) -> float | None:
        """The norm bound given the recorded norms so far (oldest first), or ``None``: no clip.

        ``settle``: the bound that ends a warm-up (``AggregatorCore`` holds the first updates of
        a job until ``warmup`` norms are known, or its version is made): the median of
        ``history`` however few norms it holds."""
        if self.kind == "fixed":
            return self.bound
        if self.kind == "off" or not history or (len(history) < self.warmup and not settle):
            return None
        recent = sorted(history[-self.window :])
        mid = len(recent) // 2
        median = recent[mid] if len(recent) % 2 else (recent[mid - 1] + recent[mid]) / 2
        return self.factor * median if median > 0 else None

    @classmethod
    def parse(cls, text: str) -> Clip:
        """``adaptive[:C[,window[,warmup]]]``, a positive number (a fixed bound) or ``off``."""
        kind, _, params = text.strip().partition(":")
        if kind == "off" and not params:
            return cls("off")
        parts = params.split(",") if params else []
        if kind == "adaptive" and len(parts) <= 3:
            try:
                factor = float(parts[0]) if parts else cls.factor
                window = int(parts[1]) if len(parts) > 1 else cls.window
                warmup = int(parts[2]) if len(parts) > 2 else min(cls.warmup, window)
            except ValueError:
                raise ConfigError(f"bad clip {text!r}: use adaptive[:C[,window[,warmup]]]") from None
            return cls("adaptive", factor=factor, window=window, warmup=warmup)
        try:
            bound = float(text)
        except ValueError:
            raise ConfigError(
                f"bad clip {text!r}: use adaptive, a positive number (a fixed bound) or off"
            ) from None
        return cls("fixed", bound)

    def describe(self) -> str:
        """What ``parse`` reads back to this same clip (floats in full, for exact replay)."""
        if self.kind == "fixed":
            return repr(self.bound)
        if self.kind == "off":
            return "off"
        return f"adaptive:{self.factor!r},{self.window},{self.warmup}"


@dataclass(frozen=True)
class Robust:
    """How the buffer combines: ``none`` is the weighted fold; ``trimmed-mean`` drops the
    fraction ``trim`` of the largest and of the smallest values of each coordinate and averages
    the rest; ``median`` takes each coordinate's median. The robust statistics are unweighted:
    sample counts do not count, each delta is scaled by its weight over its normalizing weight
    (its staleness factor with ``normalize=samples``, 1 with ``weights``) and by its clip.

    ``cosine`` is a filter, not a statistic: each delta (so scaled) is compared with the
    buffer's coordinate-wise median; one whose cosine similarity with it is <= 0 is left out,
    the others are folded with the ordinary weighted fold (``none``'s, bit for bit when none is
    left out). See ``CosineBuffer``."""

    kind: str = "none"
    trim: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ROBUST:
            raise ConfigError(
                f"unknown robust aggregation {self.kind!r}; use none, trimmed-mean:F, median or cosine"
            )
        if not 0 <= self.trim < 0.5:
            raise ConfigError(f"trimmed-mean's F must be in [0, 0.5), not {self.trim!r}")

    @classmethod
    def parse(cls, text: str) -> Robust:
        kind, colon, params = text.strip().partition(":")
        if kind in ("none", "median", "cosine") and not colon:
            return cls(kind)
        if kind == "trimmed-mean" and params:
            try:
                trim = float(params)
            except ValueError:
                raise ConfigError(f"bad robust {text!r}: F must be a number in [0, 0.5)") from None
            if not 0 <= trim < 0.5:
                raise ConfigError(f"bad robust {text!r}: F must be in [0, 0.5)")
            return cls(kind, trim)
        raise ConfigError(f"bad robust {text!r}: use none, trimmed-mean:F (0 <= F < 0.5), median or cosine")

    def describe(self) -> str:
        return f"trimmed-mean:{self.trim!r}" if self.kind == "trimmed-mean" else self.kind

    def combine(self, rows: Sequence[torch.Tensor]) -> torch.Tensor:
        """The coordinate-wise statistic of ``rows`` (one delta each, same dtype and length).

        Sorted per coordinate (stably, so ties such as -0.0 and 0.0 keep their arrival order),
        then summed row by row element-wise: no reduction whose order could vary."""
        k = len(rows)
        if k == 0:
            raise ValueError("nothing to combine")
        ordered = torch.sort(torch.stack(list(rows)), dim=0, stable=True).values
        if self.kind in ("median", "cosine"):  # cosine compares with the median
            mid = k // 2
            return ordered[mid].clone() if k % 2 else (ordered[mid - 1] + ordered[mid]) / 2
        cut = math.floor(self.trim * k + 1e-9) if self.kind == "trimmed-mean" else 0
        total = ordered[cut].clone()
        for row in ordered[cut + 1 : k - cut]:
            total.add_(row)
        return total / (k - 2 * cut)


def clip_window_of(record: Mapping[str, object]) -> tuple[float, ...]:
    """The recorded clip norms a manifest's policy record carries (none in older manifests)."""
    window = record.get(CLIP_WINDOW) or ()
    return tuple(float(v) for v in window)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Policy:
    """How updates become versions.

    ``async``: FedBuff with buffer ``k``; weights are sample count times ``staleness.weight(tau)``;
    updates with ``tau > max_staleness`` are rejected. ``sync``: FedAvg rounds, weights are
    sample counts, only updates on the current version count. ``weighting="uniform"``
    counts every update as one sample (FedBuff's plain mean), in either mode. ``fedasync``
    (Xie et al. 2019): every update is a version of its own, mixed in as
    ``x <- (1 - a_t) x + a_t x_local`` with ``x_local = x_base + delta`` (the worker's model) and
    ``a_t = alpha * staleness.weight(tau)``; ``k``, the weighting and ``server_lr`` do not apply.
    ``server_opt``: the FedOpt step over each version's mean delta (``shared.server_opt``).
    ``dp``: DP-FedAvg (``shared.privacy``): a fixed clip, uniform weights, Gaussian noise.
    """

    mode: str = "async"
    k: int = 4
    server_lr: float = 1.0
    staleness: Staleness = field(default_factory=Staleness)
    max_staleness: int = 20
    max_norm: float | None = None
    normalize: str = "samples"
    clip: Clip = field(default_factory=Clip)
    robust: Robust = field(default_factory=Robust)
    weighting: str = "samples"
    alpha: float = 0.6  # fedasync's mixing weight
    server_opt: ServerOpt = field(default_factory=ServerOpt)
    dp: Dp | None = None

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"unknown weighting {self.weighting!r}; use samples or uniform")
        if self.normalize not in ("samples", "weights"):
            raise ConfigError("normalize must be samples or weights")
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; use async, sync or fedasync")
        if self.k < 1:
            raise ConfigError("buffer size must be at least 1")
        if not self.server_lr > 0:
            raise ConfigError("server learning rate must be positive")
        if self.max_staleness < 0:
            raise ConfigError("max staleness must be non-negative")
        if not 0 < self.alpha <= 1:
            raise ConfigError(f"--fedasync-alpha must be in (0, 1], not {self.alpha!r}")
        if self.mode == "fedasync":
            if self.server_opt.stateful:
                raise ConfigError("--server-opt applies to buffered versions: use it with --mode async or sync")
            if self.robust.kind != "none":
                raise ConfigError("--robust combines a buffer; --mode fedasync makes a version of each update")
        dp = self.dp
        if dp is not None and not dp.local:
            # The noise is calibrated to one clipped update per worker: anything that weighs an
            # update by more than its staleness factor, or picks updates by what they hold, breaks it.
            if self.mode == "fedasync":
                raise ConfigError("central DP (--dp-clip) runs with --mode async or sync")
            if self.robust.kind != "none":
                raise ConfigError("central DP (--dp-clip) needs --robust none: a robust fold has another sensitivity")
            if self.clip.kind != "fixed" or self.clip.bound != dp.clip:
                raise ConfigError("central DP clips every update to --dp-clip (Policy.clip must be that fixed bound)")
            if self.weighting != "uniform":
                raise ConfigError("central DP weighs every update as one (--weighting uniform)")
            if self.normalize != "samples":
                raise ConfigError("central DP divides by the number of updates (normalize=samples)")

    @property
    def central_dp(self) -> Dp | None:
        """The DP the aggregator adds noise for (``None``: none, or local DP at the workers)."""
        return self.dp if self.dp is not None and not self.dp.local else None

    def count(self, num_samples: int) -> float:
        """What an update counts for before staleness: its sample count, or 1 (``uniform``)."""
        return float(num_samples) if self.weighting == "samples" else 1.0

    def norm_weight(self, num_samples: int, tau: int) -> float:
        """What the buffer's step divides by: the counts alone, or the full weights."""
        return self.count(num_samples) if self.normalize == "samples" else self.weight(num_samples, tau)

    def robust_factor(self, tau: int) -> float:
        """What scales a delta for robust aggregation, in place of its weight: the staleness
        factor when the fold would divide by sample counts (``normalize=samples``: a stale
        buffer takes a smaller step), else 1. Sample counts do not count."""
        if self.mode == "sync" or self.normalize == "weights":
            return 1.0
        return self.staleness.weight(tau)

    def weight(self, num_samples: int, tau: int) -> float:
        if self.mode == "sync":
            return self.count(num_samples)
        if self.mode == "fedasync":  # the mixing weight a_t
            return self.alpha * self.staleness.weight(tau)
        return self.count(num_samples) * self.staleness.weight(tau)

    def to_dict(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "k": self.k,
            "server_lr": self.server_lr,
            "staleness": self.staleness.describe(),
            "max_staleness": self.max_staleness,
            "max_norm": self.max_norm,
            "normalize": self.normalize,
            "clip": self.clip.describe(),
            "robust": self.robust.describe(),
            "weighting": self.weighting,
            "alpha": self.alpha,
            "server_opt": self.server_opt.describe(),
            "dp": None if self.dp is None else self.dp.to_dict(),
        }


class Accumulator:
    """Running weighted sum of deltas for one buffer."""

    def __init__(self, n_float: int, n_exact: int) -> None:
        self.floats = torch.zeros(n_float, dtype=torch.float32)
        self.exact = torch.zeros(n_exact, dtype=torch.float64)
        self.total_weight = 0.0
        self.total_norm = 0.0
        self.count = 0

    def add(
        self,
        floats: torch.Tensor,
        exact: torch.Tensor,
        weight: float,
        norm_weight: float | None = None,
        clip: float = 1.0,
    ) -> None:
        """Add ``weight * clip * delta`` (the clip scales the floats only); the step divides by the
        sum of ``norm_weight`` (default: ``weight``)."""
        if weight <= 0:
            raise ValueError("weight must be positive")
        add_scaled(self.floats, floats, weight * clip)  # weight * 1.0 is weight: unclipped is unchanged
        if exact.numel():
            self.exact.add_(exact.to(torch.float64) * weight)  # two roundings, as add_scaled
        self.total_weight += weight
        self.total_norm += weight if norm_weight is None else norm_weight
        self.count += 1

    def add_sum(self, floats: torch.Tensor, exact: torch.Tensor, weight: float, norm_weight: float, count: int) -> None:
        """Add an edge aggregator's partial: its sum of ``weight x clip x delta`` (flat order, as
        ``add`` makes it), its integer sum, their total weight and norm weight, and how many
        updates it holds."""
        if count < 1 or not 0 < weight < math.inf or not 0 < norm_weight < math.inf:
            raise ValueError("a partial needs updates and positive finite weights")
        self.floats.add_(floats)
        if exact.numel():
            self.exact.add_(exact)
        self.total_weight += weight
        self.total_norm += norm_weight
        self.count += count

    def add_noise(self, noise: np.ndarray, std: float) -> None:
        """Add ``std * noise`` to the float sum (flat order), as two roundings (``add_scaled``)."""
        add_scaled(self.floats, torch.from_numpy(noise), std)

    def step(self, server_lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The (float, integer) step: eta * sum(w d) / sum(w), the integers rounded."""
        if self.count == 0:
            raise ValueError("nothing to apply")
        scale = server_lr / self.total_norm
        return self.floats * scale, torch.round(self.exact * scale).to(torch.int64)

    def apply(
        self, floats: torch.Tensor, exact: torch.Tensor, server_lr: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the new (floats, exact): x + eta * sum(w d) / sum(w)."""
        step, exact_step = self.step(server_lr)
        return floats + step, exact + exact_step


class RobustBuffer:
    """The buffer's deltas kept one by one (in flat order) for a coordinate-wise statistic."""

    def __init__(self, robust: Robust) -> None:
        self.robust = robust
        self.floats: list[torch.Tensor] = []
        self.exact: list[torch.Tensor] = []
        self.count = 0

    def add(self, floats: torch.Tensor, exact: torch.Tensor, factor: float, clip: float = 1.0) -> None:
        """Keep ``factor * clip * floats`` (a copy: ``floats`` may be a scratch vector) and
        ``factor * exact`` in float64: the clip bounds the float norm, not integer tensors."""
        scale = factor * clip
        self.floats.append(floats * scale if scale != 1.0 else floats.clone())
        self.exact.append(exact.to(torch.float64) * factor)
        self.count += 1

    def step(self, server_lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The (float, integer) step: eta * statistic(deltas), the integers rounded."""
        if self.count == 0:
            raise ValueError("nothing to apply")
        step = self.robust.combine(self.floats) * server_lr
        if not self.exact[0].numel():
            return step, torch.zeros(0, dtype=torch.int64)
        return step, torch.round(self.robust.combine(self.exact) * server_lr).to(torch.int64)

    def apply(
        self, floats: torch.Tensor, exact: torch.Tensor, server_lr: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the new (floats, exact): x + eta * statistic(deltas)."""
        step, exact_step = self.step(server_lr)
        return floats + step, exact + exact_step


def _pair_down(v: np.ndarray, k: int, stop: int) -> int:
    """Add the last half of ``v[:k]`` onto its first half, in place, until at most ``stop``
    values are left; return how many. Element-wise adds: the order is fixed by ``k`` alone."""
    while k > stop:
        half = k // 2
        np.add(v[:half], v[k - half : k], out=v[:half])
        k -= half
    return k


def add_scaled(acc: torch.Tensor, x: torch.Tensor, alpha: float) -> None:
    """``acc += alpha * x`` for float32 vectors, as two rounded operations: the product rounded
    to float32, then the sum. torch's ``add_(x, alpha=)`` rounds once on AVX2/AVX-512 (a fused
    multiply-add) and twice on its default kernel, so a version's bits would follow the CPU.
    Slab by slab, so the product stays in cache: about an axpy's memory traffic."""
    if alpha == 1.0:
        acc.add_(x)  # no product to round
        return
    a, b, w = acc.numpy(), x.detach().numpy(), np.float32(alpha)  # torch, too, took alpha as float32
    product = np.empty(min(b.size, _SLAB), dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN as torch gives them, silently
        for start in range(0, b.size, _SLAB):
            stop = min(start + _SLAB, b.size)
            p = product[: stop - start]
            np.multiply(b[start:stop], w, out=p)
            np.add(a[start:stop], p, out=a[start:stop])


def sum_of_squares(x: torch.Tensor) -> float:
    """The sum of a float32 vector's squares, in an order fixed by its length alone.

    Each square is rounded to float32; a slab of ``_SLAB`` of them is added pairwise down to
    ``_WIDTH`` partial sums, which are added (in float64) to those of the slabs before it, and
    those are added pairwise at the end. Element-wise steps only: ``torch.linalg.vector_norm``
    sums in an order (and with fused multiply-adds) that depend on the CPU's vector width.
    Overflows and underflows as float32 squares do, as ``vector_norm`` did."""
    b = x.detach().numpy()
    if not b.size:
        return 0.0
    acc = np.zeros(min(b.size, _WIDTH), dtype=np.float64)
    squares = np.empty(min(b.size, _SLAB), dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is inf: screen rejects it
        for start in range(0, b.size, _SLAB):
            stop = min(start + _SLAB, b.size)
            v = squares[: stop - start]
            np.multiply(b[start:stop], b[start:stop], out=v)
            k = _pair_down(v, stop - start, acc.size)
            np.add(acc[:k], v[:k], out=acc[:k])
        _pair_down(acc, acc.size, 1)
    return float(acc[0])


def fixed_sum(values: torch.Tensor) -> float:
    """The sum of a float64 vector in an order fixed by its length alone: halves added
    element-wise (a pairwise tree), never a reduction whose order could vary with the thread
    count or the CPU's vector width, so replay elsewhere gets the same bits."""
    v = values.to(torch.float64).flatten()
    if not v.numel():
        return 0.0
    size = 1 << (v.numel() - 1).bit_length()
    if size != v.numel():
        v = torch.cat([v, v.new_zeros(size - v.numel())])
    while v.numel() > 1:
        half = v.numel() // 2
        v = v[:half] + v[half:]
    return float(v[0])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two float32 vectors, deterministically: float32 x float32 products
    are exact in float64, summed by ``fixed_sum``. 0.0 when either vector is zero."""
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    dot, aa, bb = fixed_sum(a64 * b64), fixed_sum(a64 * a64), fixed_sum(b64 * b64)
    if aa == 0.0 or bb == 0.0:
        return 0.0
    return dot / (math.sqrt(aa) * math.sqrt(bb))


class CosineBuffer:
    """``--robust cosine``: the buffer's deltas kept one by one; at ``apply`` each one (clipped and
    scaled by its robust factor, as ``RobustBuffer`` keeps them) is compared with the
    coordinate-wise median m of the others (leave one out: a row is never its own witness). One
    whose cosine similarity with m is <= 0 (a sign flip; most pure
    noise) is left out; the others go through an ``Accumulator`` in arrival order, with their
    weights and normalizing weights: exactly the ``none`` fold of the updates kept (element-wise,
    so the block order ``none`` sums in does not change a bit). If every update would be left
    out (no direction the majority agrees on), all are kept: a version is never empty, and that
    one is the ``none`` fold. Needs an honest majority: the median is theirs."""

    def __init__(self, n_float: int, n_exact: int) -> None:
        self.n_float, self.n_exact = n_float, n_exact
        self.task_ids: list[str] = []
        self.floats: list[torch.Tensor] = []  # flat, unscaled copies
        self.exact: list[torch.Tensor] = []
        self.args: list[tuple[float, float, float, float]] = []  # weight, norm_weight, factor, clip
        self.count = 0
        self.cosines: dict[str, float] = {}  # by task id, after ``apply``
        self.left_out: frozenset[str] = frozenset()

    def add(
        self,
        task_id: str,
        floats: torch.Tensor,
        exact: torch.Tensor,
        weight: float,
        norm_weight: float,
        factor: float,
        clip: float = 1.0,
    ) -> None:
        """Keep a copy of the flat ``floats`` (may be a scratch vector) and how to fold it."""
        self.task_ids.append(task_id)
        self.floats.append(floats.clone())
        self.exact.append(exact.clone())
        self.args.append((weight, norm_weight, factor, clip))
        self.count += 1

    def apply(
        self, floats: torch.Tensor, exact: torch.Tensor, server_lr: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the new (floats, exact); ``cosines`` and ``left_out`` say what was kept."""
        step, exact_step = self.step(server_lr)
        return floats + step, exact + exact_step

    def step(self, server_lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The (float, integer) step of the updates kept; sets ``cosines`` and ``left_out``."""
        if self.count == 0:
            raise ValueError("nothing to apply")
        rows = []
        for f, (_, _, factor, clip) in zip(self.floats, self.args, strict=True):
            scale = factor * clip
            rows.append(f * scale if scale != 1.0 else f)
        # Each is compared with the median of the *others*: with ten rows, a row's own values pull
        # the median towards it in every coordinate, enough to make pure noise or a sign flip look
        # agreeable (the poisoning benchmark left out 0 of 40 noise updates so).
        median = Robust("median")
        cos = [
            cosine(r, median.combine(rows[:i] + rows[i + 1 :])) if len(rows) > 1 else 1.0
            for i, r in enumerate(rows)
        ]
        self.cosines = dict(zip(self.task_ids, cos, strict=True))
        keep = [c > 0.0 for c in cos]
        if not any(keep):
            keep = [True] * self.count
        self.left_out = frozenset(t for t, k in zip(self.task_ids, keep, strict=True) if not k)
        acc = Accumulator(self.n_float, self.n_exact)
        for kept, f, e, (weight, norm_weight, _, clip) in zip(
            keep, self.floats, self.exact, self.args, strict=True
        ):
            if kept:
                acc.add(f, e, weight, norm_weight, clip)
        return acc.step(server_lr)


class MixBuffer:
    """``--mode fedasync``: each update mixed into the model on its own, in arrival order,
    ``x <- x + a_t (x_base + clip * delta - x)`` (``(1 - a_t) x + a_t x_local``). One update per
    version, except for the updates the adaptive clip's warm-up held: those are mixed in one after
    another into the version that ends it. Every step is one rounding (numpy float32 ufuncs)."""

    def __init__(self) -> None:
        self.floats: list[torch.Tensor] = []  # flat copies
        self.exact: list[torch.Tensor] = []
        self.args: list[tuple[int, float, float]] = []  # base version, a_t, clip
        self.count = 0

    def add(self, floats: torch.Tensor, exact: torch.Tensor, base: int, mix: float, clip: float = 1.0) -> None:
        self.floats.append(floats.clone())
        self.exact.append(exact.clone())
        self.args.append((base, mix, clip))
        self.count += 1

    def bases_needed(self) -> set[int]:
        return {base for base, _, _ in self.args}

    def apply(
        self, floats: torch.Tensor, exact: torch.Tensor, bases: Mapping[int, tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model after mixing every update in; ``bases`` holds each base version's (floats, exact)."""
        if self.count == 0:
            raise ValueError("nothing to apply")
        x, e = floats.detach().numpy().copy(), exact.to(torch.float64)
        for f, d_exact, (base, mix, clip) in zip(self.floats, self.exact, self.args, strict=True):
            base_floats, base_exact = bases[base]
            diff = base_floats.detach().numpy() - x  # x_base - x
            add_scaled(torch.from_numpy(diff), f, clip)  # + clip * delta: x_local - x
            add_scaled(torch.from_numpy(x), torch.from_numpy(diff), mix)
            if e.numel():
                e = e + torch.round((base_exact.to(torch.float64) - e + d_exact.to(torch.float64)) * mix)
        return torch.from_numpy(x), e.to(torch.int64)


def screen(floats: torch.Tensor, exact: torch.Tensor, max_norm: float | None) -> float:
    """Return the delta's L2 norm, or raise ``ScreeningError`` for non-finite or too-large deltas
    and for integer deltas out of range (|v| > 2**31: no training step moves a counter that far)."""
    # Not ``abs()``: the absolute value of int64's minimum is itself, negative.
    if exact.numel() and bool(((exact > MAX_EXACT_DELTA) | (exact < -MAX_EXACT_DELTA)).any()):
        raise ScreeningError(
            Reason.INT_OUT_OF_RANGE, f"an integer tensor's delta exceeds {MAX_EXACT_DELTA} in magnitude"
        )
    norm = math.sqrt(sum_of_squares(floats))  # in a fixed order: the clip scales by it
    if not math.isfinite(norm):
        # One pass in the common case; only a non-finite norm pays for the exact check.
        if not bool(torch.isfinite(floats).all()):
            raise ScreeningError(Reason.NON_FINITE, "update contains NaN or infinite values")
        raise ScreeningError(Reason.NORM_TOO_LARGE, "update norm overflows float32")
    if max_norm is not None and norm > max_norm:
        raise ScreeningError(Reason.NORM_TOO_LARGE, f"update norm {norm:.4g} exceeds {max_norm:.4g}")
    return norm


def weighted_average(
    base: torch.Tensor, deltas: list[torch.Tensor], weights: list[float], server_lr: float = 1.0
) -> torch.Tensor:
    """Reference form of the fold, for tests and replay: base + eta * sum(w d)/sum(w)."""
    acc = Accumulator(base.numel(), 0)
    for d, w in zip(deltas, weights, strict=True):
        acc.add(d, torch.zeros(0, dtype=torch.int64), w)
    return acc.apply(base, torch.zeros(0, dtype=torch.int64), server_lr)[0]
