"""A worker's configuration: who it is, what it takes, how it paces itself. Plain data, no I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass

from broker_config.names import check_token
from shared.errors import ConfigError
from shared.org import check_org  # re-exported: where the worker checks its --org
from shared.settings import Settings, split_capabilities


@dataclass(frozen=True)
class WorkerConfig:
    worker_id: str
    capabilities: tuple[str, ...] = ("cpu",)
    partition: str = ""  # "I/N", reported in its hellos
    delay: float = 0.0  # seconds added after each training (a slow worker, for experiments)
    heartbeat_interval: float = 2.0  # seconds between hellos
    model_seed: int = 0
    threads: int = 1  # torch threads for local training
    flush_retry: float = 30.0  # seconds between attempts to flush outbox entries a flush could not send
    warm: bool = True  # warm up before the first hello (see ``worker.training.warm_up``)
    goodbye_seconds: float = 2.0  # at most this long for the "down" hello when stopping
    jobs: tuple[str, ...] = ()  # the jobs it trains for (--job a,b); empty: its transport's job
    dp_floor: tuple[float, float] | None = None  # its own local DP: (most clip, least noise)
    org: str = ""  # the organisation it says it belongs to (--org), for fedq cost; "": none

    @classmethod
    def from_settings(cls, settings: Settings, worker_id: str, partition: str) -> WorkerConfig:
        """The config of one worker of this process (``--replicas``: each has its own id and partition)."""
        return cls(
            worker_id=worker_id,
            capabilities=split_capabilities(settings.capability),
            partition=partition,
            delay=settings.delay,
            heartbeat_interval=settings.heartbeat_interval,
            model_seed=settings.model_seed,
            threads=settings.threads,
            jobs=split_jobs(settings.job),
            dp_floor=_dp_floor(settings),
            org=check_org(settings.org),
        )


def _dp_floor(settings: Settings) -> tuple[float, float] | None:
    clip, noise = settings.dp_floor_clip, settings.dp_floor_noise
    if clip is None:
        return None
    if not (0 < clip < math.inf and 0 < noise < math.inf):
        raise ConfigError(f"--dp-floor-clip and --dp-floor-noise must be positive numbers, not {clip} and {noise}")
    return clip, noise


def split_jobs(text: str) -> tuple[str, ...]:
    """``--job a,b`` for a worker: the jobs (of the app it holds) whose tasks it takes."""
    jobs = tuple(dict.fromkeys(j.strip() for j in text.split(",") if j.strip()))
    if not jobs:
        raise ConfigError("at least one job is needed (e.g. --job default, or --job a,b)")
    return tuple(check_token("job id", j) for j in jobs)
