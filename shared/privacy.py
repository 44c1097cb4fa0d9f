"""Differential privacy: DP-FedAvg's clip and Gaussian noise (McMahan et al. 2018), and epsilon.

User-level DP, a worker being the user. Central (the default): the aggregator clips every update's
float delta to L2 norm ``clip``, weighs it by its staleness factor (<= 1) and nothing else, and adds
Gaussian noise of standard deviation ``noise * clip`` to each version's sum before dividing by the
number of updates. Local (``local``): each worker clips its own delta and adds that noise before
quantizing it (``worker.training``); the aggregator adds none.

Epsilon comes from dp-accounting's RDP accountant, never from a formula of ours. The coordinator
does no sampling (a sync round asks every live worker, async tasks go to whoever asks first), so
there is no amplification by sampling to claim: each version is a Gaussian mechanism on the whole
fleet. A worker that put ``m`` updates into one central version moved its sum by up to ``m * clip``,
so that version counts for it with multiplier ``noise / m``. With local noise, each update is its
own mechanism, and a worker's guarantee composes over the updates it sent: the epsilon reported is
the worst worker's. The release protected is the sequence of versions; which workers took part is
public (a manifest lists its updates). Integer tensors (BatchNorm's batch counters, which count a
worker's samples) are not updated under DP.

Noise is drawn from numpy's PCG64 seeded per version (``gaussian``), so ``fedq replay verify``
re-derives a noised version bit for bit from the seed the aggregator's ledger records. Whoever reads
that ledger can subtract the noise: it is as private as the updates the aggregator saw.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from shared.errors import ConfigError

# Rényi orders the accountant tries: dp-accounting's default grid, spelled out so a change of the
# library's default cannot move a reported epsilon silently.
ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128.0, 256.0, 512.0])


@dataclass(frozen=True)
class Dp:
    """The DP settings of a job: ``clip`` C, noise multiplier ``noise`` z, ``delta`` of the
    reported (epsilon, delta), and where the noise is added."""

    clip: float
    noise: float = 1.0
    delta: float = 1e-5
    local: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.clip < math.inf:
            raise ConfigError(f"--dp-clip must be a positive number, not {self.clip!r}")
        if not 0 < self.noise < math.inf:  # no noise, no privacy: epsilon would be infinite
            raise ConfigError(f"--dp-noise must be a positive number, not {self.noise!r}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"--dp-delta must be in (0, 1), not {self.delta!r}")

    @property
    def std(self) -> float:
        """The noise's standard deviation on a sum of clipped deltas."""
        return self.noise * self.clip

    def to_dict(self) -> dict[str, object]:
        return {"clip": self.clip, "noise": self.noise, "delta": self.delta, "local": self.local}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> Dp:
        return cls(float(d["clip"]), float(d["noise"]), float(d["delta"]), bool(d.get("local", False)))  # type: ignore[arg-type]


def gaussian(seed: int, n: int) -> np.ndarray:
    """``n`` standard normal float32 draws from PCG64(``seed``): the same bits on any CPU (numpy's
    ziggurat, no vector-width-dependent path; torch's ``normal_`` takes another on AVX2)."""
    return np.random.Generator(np.random.PCG64(seed)).standard_normal(n, dtype=np.float32)


# The key of a manifest's policy record that carries its DP accounting (epsilon after the version).
DP_ACCOUNTING = "dp_accounting"

Events = tuple[tuple[float, int], ...]  # (noise multiplier, how many versions), in order


def compose(events: Events, multiplier: float) -> Events:
    """``events`` and one more Gaussian mechanism with ``multiplier``, run-length encoded."""
    if events and events[-1][0] == multiplier:
        return (*events[:-1], (multiplier, events[-1][1] + 1))
    return (*events, (multiplier, 1))


def events_of(raw: Iterable[Sequence[float]]) -> Events:
    """Events as a manifest's JSON keeps them (lists)."""
    return tuple((float(z), int(n)) for z, n in raw)


def epsilon(events: Events, delta: float) -> float:
    """Epsilon of the composition of ``events`` at ``delta``, from dp-accounting's RDP accountant.
    0.0 for no event; infinite when any mechanism adds no noise."""
    if not events:
        return 0.0
    if any(z <= 0 for z, _ in events):
        return math.inf
    import dp_accounting  # about a second to import: only jobs with DP pay it
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant(list(ORDERS))
    accountant.compose(
        dp_accounting.ComposedDpEvent(
            [dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), n) for z, n in events]
        )
    )
    return float(accountant.get_epsilon(delta))


def noise_for(target: float, versions: int, delta: float) -> float:
    """The smallest noise multiplier (to 0.1%) whose epsilon after ``versions`` central versions,
    one update per worker each, is at most ``target``: for choosing ``--dp-noise``."""
    if not target > 0 or versions < 1:
        raise ConfigError("a target epsilon > 0 and at least one version are needed")
    lo, hi = 0.01, 1.0
    while epsilon(((hi, versions),), delta) > target:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ConfigError(f"no noise multiplier reaches epsilon {target} in {versions} versions")
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if epsilon(((mid, versions),), delta) > target else (lo, mid)
    return hi
