"""What the coordinator needs from the settings, checked once: its own config object. No I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from broker_config.names import check_token
from shared.errors import ConfigError
from shared.messages import TrainConfig
from shared.settings import Settings

ROUND_GRACE = 5.0  # seconds a closed round waits for the aggregator's version before the next opens


class Mode(StrEnum):
    """Async (FedBuff top-ups) or sync (FedAvg rounds); the values are the settings' strings."""

    ASYNC = "async"
    SYNC = "sync"


@dataclass(frozen=True)
class CoordinatorConfig:
    job_id: str
    out_dir: Path = Path(".")
    mode: Mode = Mode.ASYNC
    capabilities: tuple[str, ...] = ("cpu",)
    concurrency: int = 0  # tasks in flight per capability; 0 = one per live worker
    task_ttl: float = 120.0
    round_timeout: float = 60.0
    round_grace: float = ROUND_GRACE
    worker_timeout: float = 10.0
    min_workers: int = 1
    min_workers_wait: float = 120.0
    max_samples: int = 0  # the cap on one update's sample count; 0: from the app's train set
    require_user_id: bool = False  # --broker-identity require: a hello must name its broker user
    # stop rules (0: off)
    target_accuracy: float = 0.85
    max_versions: int = 0
    max_updates: int = 0
    max_seconds: float = 300.0
    # what a task carries
    train: TrainConfig = field(default_factory=TrainConfig)
    quant: str = "int8"
    block: int = 256
    inline_limit: int = 1024 * 1024
    model_seed: int = 0
    # local differential privacy (--dp-local): the clip and noise multiplier each task carries; 0: off
    dp_clip: float = 0.0
    dp_noise: float = 0.0
    shards: int = 0  # edge aggregation: tasks name one of this many shards, in turn; 0: none

    @classmethod
    def from_settings(cls, s: Settings) -> CoordinatorConfig:
        """The coordinator's part of ``s``; ``ConfigError`` for a job id, mode or fleet setting it cannot use."""
        check_token("job id", s.job)
        if s.min_workers < 0:
            raise ConfigError(f"--min-workers must be 0 or more, not {s.min_workers}")
        if s.max_samples < 0:
            raise ConfigError(f"--max-samples must be 0 (automatic) or more, not {s.max_samples}")
        if s.min_workers_wait < 0:
            raise ConfigError(f"--min-workers-wait must be 0 or more, not {s.min_workers_wait}")
        try:  # fedasync differs from async at the aggregator only: tasks are topped up alike
            mode = Mode.ASYNC if s.mode == "fedasync" else Mode(s.mode)
        except ValueError:
            raise ConfigError(f"unknown mode {s.mode!r}; use async, sync or fedasync") from None
        if not math.isfinite(s.prox_mu) or s.prox_mu < 0:
            raise ConfigError(f"--prox-mu must be a finite number, 0 or more, not {s.prox_mu}")
        dp_clip, dp_noise = local_dp(s)
        return cls(
            job_id=s.job,
            out_dir=s.out_dir,
            mode=mode,
            capabilities=s.capability_list,
            concurrency=s.concurrency,
            task_ttl=s.task_ttl,
            round_timeout=s.round_timeout,
            worker_timeout=s.worker_timeout,
            min_workers=s.min_workers,
            min_workers_wait=s.min_workers_wait,
            max_samples=s.max_samples,
            require_user_id=s.user_id_required,
            target_accuracy=s.target_accuracy,
            max_versions=s.max_versions,
            max_updates=s.max_updates,
            max_seconds=s.max_seconds,
            train=TrainConfig(
                epochs=s.local_epochs,
                batch_size=s.batch_size,
                optimizer=s.optimizer,
                lr=s.lr,
                momentum=s.momentum,
                weight_decay=s.weight_decay,
                prox_mu=s.prox_mu,
            ),
            shards=s.shards,
            quant=s.quant,
            block=s.block,
            inline_limit=s.inline_limit,
            model_seed=s.model_seed,
            dp_clip=dp_clip,
            dp_noise=dp_noise,
        )


def local_dp(s: Settings) -> tuple[float, float]:
    """The clip and noise multiplier tasks carry: ``(--dp-clip, --dp-noise)`` with ``--dp-local``,
    else ``(0, 0)``; ``ConfigError`` when ``--dp-local`` lacks a usable clip or noise."""
    if not s.dp_local:
        return 0.0, 0.0
    if s.dp_clip is None:
        raise ConfigError("--dp-local needs --dp-clip: the L2 norm each worker clips its update to")
    if not math.isfinite(s.dp_clip) or s.dp_clip <= 0:
        raise ConfigError(f"--dp-clip must be a finite number above 0, not {s.dp_clip}")
    if not math.isfinite(s.dp_noise) or s.dp_noise < 0:
        raise ConfigError(f"--dp-noise must be a finite number, 0 or more, not {s.dp_noise}")
    return s.dp_clip, s.dp_noise
