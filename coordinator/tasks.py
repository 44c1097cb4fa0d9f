"""The model the coordinator hands out (version 0, or the latest stored) and the tasks that carry it."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch

from coordinator.config import CoordinatorConfig
from shared.app import App
from shared.errors import StoreError, UnsignedVersionError
from shared.messages import ModelAnnouncement, Task
from shared.quantize import payload_size
from shared.signing import Signer
from shared.store import Manifest, ModelStore, update_key
from shared.tensors import FlatModel, ModelSpec


@dataclass(frozen=True)
class Latest:
    """The latest version, as tasks carry it."""

    version: int
    sha256: str
    key: str
    blob: bytes


async def initial_version(
    store: ModelStore, app: App, model_seed: int, log: Any, signer: Signer
) -> tuple[Latest, ModelAnnouncement]:
    """Create version 0 from the app (signed by ``signer``, with a fresh incarnation), or resume
    from the latest version whose signature verifies."""
    if not await store.versions():
        torch.manual_seed(model_seed)
        model = await asyncio.to_thread(app.build_model, model_seed)
        flat = FlatModel.from_state_dict(model.state_dict())
        blob = flat.to_bytes()
        first = Manifest.first(store.job_id, blob, time.time()).signed_by(signer)
        await store.save(first, blob)
        log.info(
            "created_version_0",
            params=flat.spec.n_float + flat.spec.n_exact,
            bytes=len(blob),
            incarnation=first.incarnation,
        )
    latest = await store.latest_signed()
    if latest is None:
        raise UnsignedVersionError(
            f"job {store.job_id} has stored versions but none whose signature verifies: "
            "is the key that made them trusted (fedq keys list)?"
        )
    if latest:
        log.info("resuming", version=latest)
    manifest, blob = await store.load_bytes(latest)
    return Latest(latest, manifest.sha256, manifest.key, blob), manifest.announcement()


def sample_cap(config: CoordinatorConfig, app: App) -> int:
    """The most samples one update may count for: ``--max-samples``, or a fair share of the app's
    training set among ``--min-workers`` (0, no cap, when the app does not say its size). One fair
    share: a worker that claims more weighs no more than an honest worker with an even split."""
    if config.max_samples:
        return config.max_samples
    train_data = getattr(app, "train_data", None)
    if train_data is None:
        return 0
    try:
        size = len(train_data()[1])
    except Exception:  # an app that cannot say: no automatic cap (the aggregator still clips)
        return 0
    return max(1, math.ceil(size / max(config.min_workers, 1)))


async def applied_since(store: ModelStore, base: int, latest: int, task_ids: set[str]) -> set[str]:
    """Which of ``task_ids`` (based on ``base`` or later) the stored versions up to ``latest`` applied.
    A task based on version v can only be applied in a later one: the manifests after ``base`` suffice."""
    left, applied = set(task_ids), set()
    for version in range(latest, base, -1):
        if not left:
            break
        try:
            manifest = await store.manifest(version)
        except (StoreError, UnsignedVersionError):
            continue
        found = left.intersection(manifest.update_ids)
        applied |= found
        left -= found
    return applied


class TaskMaker:
    """Builds the task for one capability on the latest version, with presigned store URLs when
    the store can make them (S3), so workers without store credentials can use it. A worker's
    URLs reach two objects only, until the task's deadline: the model, to GET, and its task's own
    update key, to PUT exactly the update's size."""

    def __init__(self, config: CoordinatorConfig, store: ModelStore) -> None:
        self.config = config
        self.store = store
        self._spec: ModelSpec | None = None
        self.incarnation = ""  # the job's, from version 0 (set when the coordinator starts)
        self.max_samples = 0  # ``sample_cap``
        self.made = 0  # tasks made: with edge aggregation, each names the next shard in turn

    async def make(self, latest: Latest, capability: str, round_number: int, ttl: float, now: float) -> Task:
        c = self.config
        inline = len(latest.blob) <= c.inline_limit
        task_id = uuid.uuid4().hex
        key = update_key(self.store.job_id, task_id)
        lifetime, size, objects = url_lifetime(ttl), self.update_size(latest), self.store.objects
        model_url = "" if inline else await objects.presign_get(latest.key, lifetime)
        update_url = await objects.presign_put(key, lifetime, size) if size > c.inline_limit else ""
        shard = self.made % c.shards if c.shards else -1
        self.made += 1
        return Task(
            task_id=task_id,
            job_id=self.store.job_id,
            capability=capability,
            base_version=latest.version,
            model_sha256=latest.sha256,
            model_key=latest.key,
            train=c.train,
            quant=c.quant,
            block=c.block,
            deadline=now + ttl,
            issued_at=now,
            round=round_number,
            model_size=len(latest.blob),
            model_url=model_url or "",
            inline_limit=c.inline_limit,
            update_key=key,
            update_url=update_url or "",
            incarnation=self.incarnation,
            max_samples=self.max_samples,
            dp_clip=c.dp_clip,
            dp_noise=c.dp_noise,
            shard=shard,
            model=latest.blob if inline else b"",
        )

    def update_size(self, latest: Latest) -> int:
        """The exact size of an update of this model under the job's quantization (its scales too);
        0 for a quantization no worker can carry out (workers dead-letter such a task: bad_task)."""
        if self._spec is None:
            self._spec = FlatModel.from_bytes(latest.blob).spec
        try:
            return payload_size(self._spec, self.config.quant, self.config.block)
        except ValueError:
            return 0


def url_lifetime(ttl: float) -> int:
    """Seconds a task's presigned URLs live: its ``ttl``, rounded up, and one more, since a URL's
    clock starts at the whole second it is signed in; so a URL dies with its task, not before."""
    return math.ceil(ttl) + 1
