"""Messages and models for tests: a tiny model, signed tasks and updates, versions in a store."""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from typing import Any

import torch

from shared.codec import encode, open_envelope, task_token
from shared.messages import Hello, Task, TrainConfig, Update
from shared.quantize import encode_delta
from shared.signing import Keyring, Role, Signer
from shared.store import Manifest, ModelStore, model_key
from shared.store import update_key as store_update_key
from shared.tensors import FlatModel
from tests.support.tiny import LinearApp

JOB = "job1"  # the job of the tests' messages, unless one says otherwise
TRAIN = TrainConfig(epochs=1, batch_size=16)
OWNER = Signer.generate()  # the tests' coordinator key: version 0, tasks, rounds
MAKER = Signer.generate()  # the tests' aggregator key: every other version


def trust(
    *,
    workers: dict[str, Signer] | None = None,
    coordinator: Signer = OWNER,
    aggregators: tuple[Signer, ...] = (MAKER,),
) -> Keyring:
    """A trust set as a deployment lays it out: ``coordinator`` (by default ``OWNER``), the
    ``aggregators`` (by default ``MAKER``) and each worker key enrolled under its id."""
    ring = Keyring()
    ring.add(coordinator.public, Role.COORDINATOR)
    for key in aggregators:
        ring.add(key.public, Role.AGGREGATOR)
    for worker_id, key in (workers or {}).items():
        ring.add(key.public, Role.WORKER, worker_id=worker_id)
    return ring


def token_of(task_bytes: bytes) -> bytes:
    """The token an update carries for the task whose signed bytes these are."""
    return task_token(open_envelope(task_bytes))


def a_hello(worker: str, caps: tuple[str, ...] = ("cpu",), state: str = "up", **counts: int) -> Hello:
    """A worker's hello (unsigned: for the registry and the scheduler, which take it decoded)."""
    return Hello(worker, caps, "fp", state, 0.0, **counts)


def tiny_model(seed: int = 0) -> FlatModel:
    """``LinearApp``'s model (15 floats): what the tests' tasks carry and their updates change."""
    return FlatModel.from_state_dict(LinearApp().build_model(seed).state_dict())


def make_task(
    signer: Signer,
    *,
    task_id: str | None = None,
    job_id: str = JOB,
    model: bytes | None = None,
    train: TrainConfig = TRAIN,
    deadline: float | None = None,
    capability: str = "cpu",
    base_version: int = 0,
    incarnation: str = "",
    max_samples: int = 0,
    update_key: str | None = None,
    round_number: int = -1,
    shard: int = -1,
) -> tuple[Task, bytes]:
    """A task on version 0 of ``model`` (by default ``tiny_model()``, inline), signed by ``signer``;
    it is due in ten minutes unless ``deadline`` says otherwise, in sync round ``round_number``. Its update key (the one key a
    claim-checked update may name) is the task's own, as the coordinator names it, unless given."""
    blob = tiny_model().to_bytes() if model is None else model
    task_id = task_id or uuid.uuid4().hex
    task = Task(
        task_id=task_id,
        job_id=job_id,
        capability=capability,
        base_version=base_version,
        model_sha256=hashlib.sha256(blob).hexdigest(),
        model_key=model_key(job_id, 0),
        train=train,
        quant="int8",
        block=256,
        deadline=time.time() + 600 if deadline is None else deadline,
        issued_at=time.time(),
        incarnation=incarnation,
        max_samples=max_samples,
        update_key=store_update_key(job_id, task_id) if update_key is None else update_key,
        round=round_number,
        shard=shard,
        model=blob,
    )
    return task, encode(task, signer)


def an_update(
    model: FlatModel | None = None,
    *,
    task_id: str | None = None,
    job_id: str = JOB,
    worker_id: str = "w1",
    base_version: int = 0,
    quant: str = "int8",
    block: int = 256,
    floats: torch.Tensor | None = None,
    delta: bytes | None = None,
    num_samples: int = 10,
    task: bytes = b"",
) -> Update:
    """An update; by default a small valid delta (0.01 on every float) for ``model`` (``tiny_model()``)."""
    if delta is None:
        spec = (model or tiny_model()).spec
        if floats is None:
            floats = torch.full((spec.n_float,), 0.01, dtype=torch.float32)
        exact = torch.zeros(spec.n_exact, dtype=torch.int64)
        delta = encode_delta(floats, exact, spec, quant, block, torch.Generator().manual_seed(1))
    return Update(
        task_id=task_id or uuid.uuid4().hex,
        job_id=job_id,
        worker_id=worker_id,
        base_version=base_version,
        num_samples=num_samples,
        quant=quant,
        block=block,
        metrics={"train_loss": 0.5},
        sent_at=time.time(),
        task=task,
        delta=delta,
    )


def make_update(signer: Signer, model: FlatModel | None = None, **fields: Any) -> tuple[str, bytes]:
    """``an_update(model, **fields)`` signed by ``signer``: its task id and its bytes."""
    update = an_update(model, **fields)
    return update.task_id, encode(update, signer)


async def save_version(
    store: ModelStore,
    blob: bytes,
    version: int,
    update_ids: tuple[str, ...] = (),
    *,
    signer: Signer | None = None,
    **fields: Any,
) -> Manifest:
    """Store ``blob`` as ``version`` of the store's job (parent: the version before), as an
    aggregator or the coordinator would: signed by ``signer`` (by default ``OWNER`` for version 0,
    ``MAKER`` for the others), version 0 with a fresh incarnation that later versions carry."""
    if version == 0:
        fields.setdefault("incarnation", secrets.token_hex(8))
    else:
        fields.setdefault(
            "incarnation", (await ModelStore(store.objects, store.job_id).manifest(0)).incarnation
        )
    manifest = Manifest(
        job_id=store.job_id,
        version=version,
        parent=version - 1,
        sha256=hashlib.sha256(blob).hexdigest(),
        size=len(blob),
        key=model_key(store.job_id, version),
        update_ids=update_ids,
        **{"created_at": time.time(), **fields},
    ).signed_by(signer or (OWNER if version == 0 else MAKER))
    await store.save(manifest, blob)
    return manifest


async def save_v0(store: ModelStore, model: FlatModel) -> str:
    """Store ``model`` as version 0; its sha256."""
    return (await save_version(store, model.to_bytes(), 0)).sha256
