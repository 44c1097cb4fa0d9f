"""Aggregation math: FedBuff, FedAsync and synchronous FedAvg over flat vectors.

All three are the same fold: accumulate ``w_i * delta_i`` into a buffer with
``w_i = n_i * s(tau_i)``, then apply ``x <- x + eta * sum(w_i delta_i) / sum(n_i)``
(``normalize="samples"``, FedBuff: a uniformly stale buffer takes a smaller step) or
``/ sum(w_i)`` (``normalize="weights"``). They differ only in the weights and in
when the buffer is applied, which the ``Policy`` decides.
Accumulation is in arrival order, element-wise, in float32: the result is a
pure function of (parent, ordered updates, policy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from shared.errors import ConfigError, ScreeningError
from shared.reasons import Reason
from shared.staleness import Staleness

MODES = ("async", "sync")


@dataclass(frozen=True)
class Policy:
    """How updates become versions.

    ``async``: FedBuff with buffer ``k`` (``k=1`` with ``server_lr=alpha`` is FedAsync);
    weights are sample count times ``staleness.weight(tau)``; updates with
    ``tau > max_staleness`` are rejected. ``sync``: FedAvg rounds, weights are
    sample counts, only updates on the current version count.
    """

    mode: str = "async"
    k: int = 4
    server_lr: float = 1.0
    staleness: Staleness = field(default_factory=Staleness)
    max_staleness: int = 20
    max_norm: float | None = None
    normalize: str = "samples"

    def __post_init__(self) -> None:
        if self.normalize not in ("samples", "weights"):
            raise ConfigError("normalize must be samples or weights")
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; use async or sync")
        if self.k < 1:
            raise ConfigError("buffer size must be at least 1")
        if not self.server_lr > 0:
            raise ConfigError("server learning rate must be positive")
        if self.max_staleness < 0:
            raise ConfigError("max staleness must be non-negative")

    def norm_weight(self, num_samples: int, tau: int) -> float:
        """What the buffer's step divides by: sample counts alone, or the full weights."""
        return float(num_samples) if self.normalize == "samples" else self.weight(num_samples, tau)

    def weight(self, num_samples: int, tau: int) -> float:
        if self.mode == "sync":
            return float(num_samples)
        return float(num_samples) * self.staleness.weight(tau)

    def to_dict(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "k": self.k,
            "server_lr": self.server_lr,
            "staleness": self.staleness.describe(),
            "max_staleness": self.max_staleness,
            "max_norm": self.max_norm,
            "normalize": self.normalize,
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
        self, floats: torch.Tensor, exact: torch.Tensor, weight: float, norm_weight: float | None = None
    ) -> None:
        """Add ``weight * delta``; the step divides by the sum of ``norm_weight`` (default: ``weight``)."""
        if weight <= 0:
            raise ValueError("weight must be positive")
        self.floats.add_(floats, alpha=weight)
        if exact.numel():
            self.exact.add_(exact.to(torch.float64), alpha=weight)
        self.total_weight += weight
        self.total_norm += weight if norm_weight is None else norm_weight
        self.count += 1

    def apply(
        self, floats: torch.Tensor, exact: torch.Tensor, server_lr: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the new (floats, exact): x + eta * sum(w d) / sum(w)."""
        if self.count == 0:
            raise ValueError("nothing to apply")
        scale = server_lr / self.total_norm
        new_floats = floats + self.floats * scale
        new_exact = exact + torch.round(self.exact * scale).to(torch.int64)
        return new_floats, new_exact


def screen(floats: torch.Tensor, exact: torch.Tensor, max_norm: float | None) -> float:
    """Return the delta's L2 norm, or raise ``ScreeningError`` for non-finite or too-large deltas."""
    norm = float(torch.linalg.vector_norm(floats)) if floats.numel() else 0.0
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
