"""One typed settings object, built from ``FEDQ_*`` environment variables and flags.

Every field ``name`` is read from ``FEDQ_<NAME>``; command-line flags override
the environment. Every knob has a default that works on a laptop.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import ConfigError


@dataclass(frozen=True)
class Settings:
    # where things are
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    namespace: str = "fedq"
    job: str = "default"
    store: str = ".fedq/store"
    # S3 store (--store s3://bucket/prefix); empty = botocore's own AWS_* settings. Keys: environment only
    s3_endpoint: str = ""  # e.g. http://127.0.0.1:9000 for MinIO
    s3_region: str = ""
    s3_access_key: str = field(default="", repr=False)
    s3_secret_key: str = field(default="", repr=False)
    keys_dir: str = ".fedq/keys"
    trusted_keys: str = ""  # default: <keys_dir>/trusted
    out: str = ""  # job folder for metrics and ledgers; default: .fedq/jobs/<job>
    app: str = "fedq.apps.mnist1d:app"
    log_level: str = "info"
    log_json: bool | None = None
    amqp_heartbeat: int = 15
    # data partition (the app reads these)
    alpha: float = 0.5
    partition_seed: int = 42
    partition_file: str = ""
    # coordinator
    mode: str = "async"
    capabilities: str = "cpu"
    concurrency: int = 0  # tasks in flight per capability; 0 = one per live worker
    target_accuracy: float = 0.85
    max_versions: int = 0
    max_updates: int = 0
    max_seconds: float = 300.0
    task_ttl: float = 120.0
    round_timeout: float = 60.0
    worker_timeout: float = 10.0
    min_workers: int = 1  # live workers (any capability) before the first task; fedq run: --workers
    min_workers_wait: float = 120.0  # seconds after the job's start to stop waiting for them
    local_epochs: int = 5
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    quant: str = "int8"
    block: int = 256
    inline_limit: int = 1024 * 1024
    model_seed: int = 0
    # aggregator
    buffer: int = 10
    server_lr: float = 1.0
    staleness: str = "polynomial:0.5"
    max_staleness: int = 20
    max_norm: float | None = None
    # worker
    capability: str = "cpu"
    partition: str = "0/1"
    worker_id: str = ""
    delay: float = 0.0
    heartbeat_interval: float = 2.0
    threads: int = 1  # torch threads for local training
    replicas: int = 1  # simulated workers hosted by one worker process
    coordinator_key: str = ""  # default: <keys_dir>/coordinator.pub
    key_file: str = ""  # default: <keys_dir>/<process>.key
    outbox: str = ""  # updates awaiting their confirm; default: <keys_dir>/../outbox/<worker_id>

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Environment first, then explicit overrides (flags); ``None`` overrides are ignored."""
        env = os.environ if env is None else env
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = env_name(f.name)
            if key in env:
                values[f.name] = _parse(env[key], hints[f.name], key)
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown settings {sorted(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    # Derived paths -------------------------------------------------------
    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(".fedq/jobs") / self.job

    @property
    def trusted_dir(self) -> Path:
        return Path(self.trusted_keys) if self.trusted_keys else Path(self.keys_dir) / "trusted"

    def key_path(self, process: str) -> Path:
        return Path(self.key_file) if self.key_file else Path(self.keys_dir) / f"{process}.key"

    @property
    def coordinator_key_path(self) -> Path:
        if self.coordinator_key:
            return Path(self.coordinator_key)
        return Path(self.keys_dir) / "coordinator.pub"

    @property
    def capability_list(self) -> tuple[str, ...]:
        return split_capabilities(self.capabilities)


def split_capabilities(text: str) -> tuple[str, ...]:
    caps = tuple(c.strip() for c in text.split(",") if c.strip())
    if not caps:
        raise ConfigError("at least one capability is needed (e.g. cpu or cpu,lowmem)")
    return caps


def env_name(field_name: str) -> str:
    return "FEDQ_" + field_name.upper()


def known_env_names() -> frozenset[str]:
    return frozenset(env_name(f.name) for f in dataclasses.fields(Settings))


def _parse(text: str, hint: Any, key: str) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if text.strip().lower() in ("", "none", "auto"):
            return None
        hint = next(a for a in args if a is not type(None))
    try:
        if hint is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if hint in (int, float):
            return hint(text)
    except ValueError:
        raise ConfigError(f"{key}={text!r} is not a valid {hint.__name__}") from None
    return text
