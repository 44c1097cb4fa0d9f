"""Every rejection reason of the aggregator (and the worker's task check) end to end, on the real broker.

Each test runs an ``Aggregator`` on its own namespace, publishes raw bytes to the
results exchange and checks that a bad update lands in the dead-letter queue with
its reason header and original body, is recorded as rejected in the ledger, and
leaves the model untouched; a good batch becomes a version and is acked.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch

from aggregator.service import Aggregator
from broker_config.names import REASON_HEADER, SOURCE_HEADER, Names
from shared.aggregation import Policy
from shared.codec import encode
from shared.ledger import JsonLines, read_lines
from shared.messages import Task, TrainConfig, Update
from shared.quantize import encode_delta
from shared.signing import Keyring, Signer
from shared.store import LocalStore, Manifest, ModelStore, model_key
from shared.tensors import FlatModel
from shared.transport import Delivery
from shared.transport.rabbitmq import RabbitMQ
from worker.config import WorkerConfig
from worker.service import Worker

JOB = "job1"
WAIT = 10.0  # seconds any single expectation may take before the test fails
QUIET = 0.5  # seconds of silence that count as "nothing more arrives"


def tiny_model(seed: int = 0) -> FlatModel:
    torch.manual_seed(seed)
    return FlatModel.from_state_dict(torch.nn.Linear(5, 3).state_dict())


async def save_v0(store: ModelStore, model: FlatModel) -> str:
    blob = model.to_bytes()
    manifest = Manifest(
        job_id=store.job_id,
        version=0,
        parent=-1,
        sha256=hashlib.sha256(blob).hexdigest(),
        size=len(blob),
        key=model_key(store.job_id, 0),
        update_ids=(),
        created_at=time.time(),
    )
    await store.save(manifest, blob)
    return manifest.sha256


def make_update(
    signer: Signer,
    model: FlatModel,
    *,
    task_id: str | None = None,
    job_id: str = JOB,
    base_version: int = 0,
    quant: str = "int8",
    block: int = 256,
    floats: torch.Tensor | None = None,
    delta: bytes | None = None,
    num_samples: int = 10,
) -> tuple[str, bytes]:
    """A signed update (task id, wire bytes); by default a small valid delta for ``model``."""
    tid = task_id or uuid.uuid4().hex
    spec = model.spec
    if delta is None:
        if floats is None:
            floats = torch.full((spec.n_float,), 0.01, dtype=torch.float32)
        exact = torch.zeros(spec.n_exact, dtype=torch.int64)
        delta = encode_delta(floats, exact, spec, quant, block, torch.Generator().manual_seed(1))
    update = Update(
        task_id=tid,
        job_id=job_id,
        worker_id="w1",
        base_version=base_version,
        num_samples=num_samples,
        quant=quant,
        block=block,
        metrics={"train_loss": 0.5},
        sent_at=time.time(),
        delta=delta,
    )
    return tid, encode(update, signer)


class DeadLetters:
    """Collects what arrives on the namespace's dead-letter queue."""

    def __init__(self) -> None:
        self.got: asyncio.Queue[Delivery] = asyncio.Queue()

    async def on_message(self, delivery: Delivery) -> None:
        await delivery.ack()
        await self.got.put(delivery)

    async def next(self, wait: float = WAIT) -> Delivery:
        return await asyncio.wait_for(self.got.get(), wait)

    async def expect(self, body: bytes, reason: str, source: str) -> Delivery:
        d = await self.next()
        assert d.message.headers.get(REASON_HEADER) == reason, dict(d.message.headers)
        assert d.message.headers.get(SOURCE_HEADER) == source
        assert d.body == body
        return d

    async def expect_none(self, wait: float = QUIET) -> None:
        with contextlib.suppress(TimeoutError):
            d = await self.next(wait)
            pytest.fail(f"unexpected dead letter: {dict(d.message.headers)}")


async def until(check: Callable[[], Awaitable[Any]], what: str, wait: float = WAIT) -> Any:
    """Poll ``check`` until it returns something truthy, for at most ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def assert_settled(broker: RabbitMQ, queue: str, wait: float = QUIET) -> None:
    """Nothing is left in ``queue``: call it after the consumer's connection is closed, so that
    anything it had not acked is back in the queue and would reach this fresh consumer."""
    got: asyncio.Queue[Delivery] = asyncio.Queue()

    async def on_message(delivery: Delivery) -> None:
        await got.put(delivery)

    await broker.consume(queue, on_message, prefetch=16)
    with contextlib.suppress(TimeoutError):
        d = await asyncio.wait_for(got.get(), wait)
        pytest.fail(f"{queue} still holds a message ({len(d.body)} bytes): it was never acked")


async def connect_like(broker: RabbitMQ, name: str) -> RabbitMQ:
    """A second connection on the same namespace (a service's own, closable on its own)."""
    return await asyncio.wait_for(RabbitMQ(broker.url, broker.names, name).connect(), WAIT)


@dataclass
class Rig:
    broker: RabbitMQ  # the test's connection: publishes updates, reads dead letters
    service_broker: RabbitMQ  # the aggregator's own connection
    names: Names
    aggregator: Aggregator
    store: ModelStore
    model: FlatModel
    worker: Signer
    ledger_path: Path
    v0_sha: str
    dead: DeadLetters
    task: asyncio.Task[None] | None = field(default=None)
    checked: Counter[str] = field(default_factory=Counter)

    def update(self, **kwargs: Any) -> tuple[str, bytes]:
        return make_update(self.worker, self.model, **kwargs)

    async def send(self, body: bytes) -> None:
        await self.broker.publish(self.names.results_exchange, self.names.results_key, body)

    def ledger(self) -> list[dict[str, Any]]:
        return list(read_lines(self.ledger_path))

    async def ledger_entry(self, task_id: str, fate: str, count: int = 1) -> dict[str, Any]:
        async def find() -> list[dict[str, Any]]:
            hits = [r for r in self.ledger() if r["task_id"] == task_id and r["fate"] == fate]
            return hits if len(hits) >= count else []

        hits: list[dict[str, Any]] = await until(find, f"ledger entry {fate} for {task_id!r}")
        return hits[count - 1]

    async def rejected(self, body: bytes, reason: str, task_id: str = "") -> dict[str, Any]:
        """The message is dead-lettered with ``reason`` and recorded as rejected."""
        await self.dead.expect(body, reason, self.names.updates_queue)
        self.checked[task_id] += 1  # the n-th rejection of this task id checked here
        entry = await self.ledger_entry(task_id, "rejected", count=self.checked[task_id])
        assert entry["reason"] == reason
        assert entry["bytes"] == len(body)
        self.check_alive()
        return entry

    async def wait_version(self, version: int) -> None:
        async def stored() -> bool:
            latest = await self.store.latest()
            return latest is not None and latest >= version

        await until(stored, f"version {version} in the store")
        assert self.aggregator.core is not None
        assert self.aggregator.core.version == version

    async def assert_version(self, version: int) -> None:
        assert self.aggregator.core is not None
        assert self.aggregator.core.version == version
        assert await self.store.versions() == list(range(version + 1))
        manifest, blob = await self.store.load_bytes(0)
        assert manifest.sha256 == self.v0_sha == hashlib.sha256(blob).hexdigest()

    async def stop_and_assert_all_acked(self) -> None:
        """Stop the aggregator and close its connection: every update must have been acked."""
        self.check_alive()
        await self.stop()
        await assert_settled(self.broker, self.names.updates_queue)

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self.task, WAIT)
        await self.service_broker.close()

    def check_alive(self) -> None:
        assert self.task is not None
        if self.task.done() and not self.task.cancelled():
            raise AssertionError(f"the aggregator stopped: {self.task.exception()!r}")


@contextlib.asynccontextmanager
async def aggregator_rig(
    broker: RabbitMQ,
    names: Names,
    tmp_path: Path,
    *,
    k: int = 2,
    max_staleness: int = 2,
    trust_worker: bool = True,
) -> AsyncIterator[Rig]:
    store = ModelStore(LocalStore(tmp_path / "store"), job_id=JOB)
    model = tiny_model()
    v0_sha = await save_v0(store, model)
    agg_signer, worker = Signer.generate(), Signer.generate()
    ring = Keyring()
    ring.add(agg_signer.public)
    if trust_worker:
        ring.add(worker.public)
    ledger_path = tmp_path / "ledger.jsonl"
    ledger = JsonLines(ledger_path)
    service_broker = await connect_like(broker, "test-aggregator")
    aggregator = Aggregator(
        broker=service_broker,
        store=store,
        policy=Policy(mode="async", k=k, max_staleness=max_staleness),
        signer=agg_signer,
        keyring=ring,
        ledger=ledger,
    )
    await asyncio.wait_for(aggregator.load(wait=5), WAIT)
    dead = DeadLetters()
    await broker.consume(names.dead_queue, dead.on_message, prefetch=16)
    rig = Rig(broker, service_broker, names, aggregator, store, model, worker, ledger_path, v0_sha, dead)
    rig.task = asyncio.create_task(aggregator.run(), name="aggregator")
    try:
        yield rig
        rig.check_alive()
    finally:
        with contextlib.suppress(Exception):
            await rig.stop()
        ledger.close()


# -- rejections -------------------------------------------------------------------------------


async def test_undecodable_bytes(broker: RabbitMQ, names: Names, tmp_path: Path) -> None:
    async with aggregator_rig(broker, names, tmp_path) as rig:
        await rig.send(b"garbage")
        entry = await rig.rejected(b"garbage", "undecodable")
        assert entry["signer"] == ""
        # a msgpack map that is not an envelope is undecodable too
        body = msgpack.packb({"v": 1, "kind": "update"})
        await rig.send(body)
        await rig.rejected(body, "undecodable")
        await rig.assert_version(0)
        await rig.stop_and_assert_all_acked()


async def test_unknown_signer(broker: RabbitMQ, names: Names, tmp_path: Path) -> None:
    async with aggregator_rig(broker, names, tmp_path, trust_worker=False) as rig:
        _, body = rig.update()
        await rig.send(body)
        entry = await rig.rejected(body, "unknown_signer")
        assert entry["signer"] == ""  # nothing of an untrusted message is believed
        await rig.assert_version(0)
        await rig.stop_and_assert_all_acked()


@pytest.mark.parametrize("field_name", ["sig", "head", "payload"])
async def test_bad_signature(broker: RabbitMQ, names: Names, tmp_path: Path, field_name: str) -> None:
    async with aggregator_rig(broker, names, tmp_path) as rig:
        _, good = rig.update()
        doc = msgpack.unpackb(good, raw=False)
        value = bytearray(doc[field_name])
        if field_name == "head":
            # flip a byte inside a string value so the head stays msgpack of the same shape
            i = value.index(b"w1")
            value[i + 1] ^= 0x01
        else:
            value[len(value) // 2] ^= 0x01
        doc[field_name] = bytes(value)
        body = msgpack.packb(doc, use_bin_type=True)
        assert body != good
        await rig.send(body)
        await rig.rejected(body, "bad_signature")
        await rig.assert_version(0)
        await rig.stop_and_assert_all_acked()


async def test_bad_shape_wrong_length(broker: RabbitMQ, names: Names, tmp_path: Path) -> None:
    async with aggregator_rig(broker, names, tmp_path) as rig:
        spec = rig.model.spec
        n = spec.n_float + 1  # one value too many
        tid, body = rig.update(quant="none", delta=torch.zeros(n, dtype=torch.float32).numpy().tobytes())
        await rig.send(body)
        entry = await rig.rejected(body, "bad_shape", tid)
        assert entry["worker_id"] == "w1"
        tid2, truncated = rig.update(delta=b"\x00" * 7)
        await rig.send(truncated)
        await rig.rejected(truncated, "bad_shape", tid2)
        await rig.assert_version(0)
        await rig.stop_and_assert_all_acked()


async def test_bad_shape_other_model(broker: RabbitMQ, names: Names, tmp_path: Path) -> None:
    """A delta made for a different model (shape or dtype) does not fit this one's payload."""
    async with aggregator_rig(broker, names, tmp_path) as rig:
        bigger = FlatModel.from_state_dict(torch.nn.Linear(6, 3).state_dict())
        tid, body = make_update(rig.worker, bigger)
        await rig.send(body)
        await rig.rejected(body, "bad_shape", tid)

        # same tensor names and shapes, but the bias is int64: its values travel as exact i64
        state = torch.nn.Linear(5, 3).state_dict()
        state["bias"] = torch.zeros(3, dtype=torch.int64)
        other_dtype = FlatModel.from_state_dict(state)
        assert other_dtype.spec != rig.model.spec
        tid2, body2 = make_update(rig.worker, other_dtype, quant="none")
        await rig.send(body2)
        await rig.rejected(body2, "bad_shape", tid2)

        # an unknown quantization scheme is a shape error as well
        tid3, body3 = rig.update(delta=b"\x00" * 60, quant="fp4")
        await rig.send(body3)
        await rig.rejected(body3, "bad_shape", tid3)
        await rig.assert_version(0)
        await rig.stop_and_assert_all_acked()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
async def test_non_finite(broker: RabbitMQ, names: Names, tmp_path: Path, bad: float) -> None:
    async with aggregator_rig(broker, names, tmp_path, k=1) as rig:
        floats = torch.full((rig.model.spec.n_float,), 0.01, dtype=torch.float32)
        floats[3] = bad
        tid, body = rig.update(quant="none", floats=floats)
        await rig.send(body)
        entry = await rig.rejected(body, "non_finite", tid)
        assert entry["staleness"] == 0
        await rig.assert_version(0)
        await rig.stop_and_assert_all_acked()


async def test_duplicate_after_applied(broker: RabbitMQ, names: Names, tmp_path: Path) -> None:
    async with aggregator_rig(broker, names, tmp_path, k=1) as rig:
        tid, body = rig.update()
        await rig.send(body)
        await rig.wait_version(1)
        await rig.ledger_entry(tid, "applied")
        await rig.send(body)
        await rig.rejected(body, "duplicate", tid)
        await rig.assert_version(1)
        assert (await rig.store.manifest(1)).update_ids == (tid,)
        await rig.stop_and_assert_all_acked()


async def test_duplicate_while_buffered(broker: RabbitMQ, names: Names, tmp_path: Path) -> None:
    async with aggregator_rig(broker, names, tmp_path, k=2) as rig:
        tid, body = rig.update()
        await rig.send(body)
        await rig.send(body)
        await rig.rejected(body, "duplicate", tid)
        await rig.assert_version(0)
        assert rig.aggregator.core is not None
        assert rig.aggregator.core.pending_ids == {tid}
        # the first copy is still held, unacked, until a version contains it
        [held] = rig.aggregator.held
        assert held.update.task_id == tid and not held.deliveries[0].settled
        tid2, body2 = rig.update()
        await rig.send(body2)
        await rig.wait_version(1)
        assert (await rig.store.manifest(1)).update_ids == (tid, tid2)
        await rig.stop_and_assert_all_acked()
        await rig.dead.expect_none()
        applied = [r["task_id"] for r in rig.ledger() if r["fate"] == "applied"]
        assert applied == [tid, tid2]


async def test_stale(broker: RabbitMQ, names: Names, tmp_path: Path) -> None:
    async with aggregator_rig(broker, names, tmp_path, k=1, max_staleness=1) as rig:
        for v in range(3):
            _, body = rig.update(base_version=v)
            await rig.send(body)
            await rig.wait_version(v + 1)
        sha3 = (await rig.store.manifest(3)).sha256
        # tau = 3 - 0 > 1
        tid, body = rig.update(base_version=0)
        await rig.send(body)
        entry = await rig.rejected(body, "stale", tid)
        assert entry["staleness"] == 3
        # tau = 1 is still fine
        tid_ok, ok = rig.update(base_version=2)
        await rig.send(ok)
        await rig.wait_version(4)
        assert (await rig.store.manifest(4)).update_ids == (tid_ok,)
        assert (await rig.store.manifest(3)).sha256 == sha3
        await rig.assert_version(4)
        await rig.stop_and_assert_all_acked()


async def test_future_version(broker: RabbitMQ, names: Names, tmp_path: Path) -> None:
    async with aggregator_rig(broker, names, tmp_path, k=1) as rig:
        tid, body = rig.update(base_version=5)
        await rig.send(body)
        await rig.rejected(body, "future_version", tid)
        await rig.assert_version(0)
        await rig.stop_and_assert_all_acked()


async def test_bad_sample_count(broker: RabbitMQ, names: Names, tmp_path: Path) -> None:
    async with aggregator_rig(broker, names, tmp_path, k=1) as rig:
        tid, body = rig.update(num_samples=0)
        await rig.send(body)
        await rig.rejected(body, "bad_sample_count", tid)
        await rig.assert_version(0)
        await rig.stop_and_assert_all_acked()


async def test_wrong_job(broker: RabbitMQ, names: Names, tmp_path: Path) -> None:
    async with aggregator_rig(broker, names, tmp_path, k=1) as rig:
        tid, body = rig.update(job_id="job2")
        await rig.send(body)
        await rig.rejected(body, "wrong_job", tid)
        await rig.assert_version(0)
        await rig.stop_and_assert_all_acked()


# -- the good path ----------------------------------------------------------------------------


async def test_k_updates_make_one_version(broker: RabbitMQ, names: Names, tmp_path: Path) -> None:
    k = 3
    async with aggregator_rig(broker, names, tmp_path, k=k) as rig:
        ids = []
        for _ in range(k):
            tid, body = rig.update()
            ids.append(tid)
            await rig.send(body)
        await rig.wait_version(1)
        manifest, blob = await rig.store.load_bytes(1)
        assert manifest.update_ids == tuple(ids)
        assert manifest.parent == 0
        assert manifest.updates_total == k
        new = FlatModel.from_bytes(blob)
        assert not torch.equal(new.floats, rig.model.floats)
        await rig.assert_version(1)
        await rig.stop_and_assert_all_acked()
        for tid in ids:
            entry = await rig.ledger_entry(tid, "applied")
            assert entry["version"] == 1
        await rig.dead.expect_none()


# -- the worker side --------------------------------------------------------------------------


async def test_worker_rejects_task_from_unpinned_key(broker: RabbitMQ, names: Names, tmp_path: Path) -> None:
    from fedq.apps.mnist1d import app

    coordinator, impostor = Signer.generate(), Signer.generate()
    pinned = Keyring()
    pinned.add(coordinator.public)
    service_broker = await connect_like(broker, "test-worker")
    worker = Worker(
        WorkerConfig("w1", ("cpu",), heartbeat_interval=60.0),
        transport=service_broker,
        app=app,
        data=None,
        signer=Signer.generate(),
        coordinator_keys=pinned,
    )
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop), name="worker")
    dead = DeadLetters()
    await broker.consume(names.dead_queue, dead.on_message, prefetch=16)
    try:
        blob = tiny_model().to_bytes()
        task = Task(
            task_id=uuid.uuid4().hex,
            job_id=JOB,
            capability="cpu",
            base_version=0,
            model_sha256=hashlib.sha256(blob).hexdigest(),
            model_key=model_key(JOB, 0),
            train=TrainConfig(epochs=1),
            quant="int8",
            block=256,
            deadline=time.time() + 600,
            issued_at=time.time(),
            model=blob,
        )
        body = encode(task, impostor)
        await broker.publish(names.tasks_exchange, names.task_key("cpu"), body)
        await dead.expect(body, "unknown_signer", names.task_queue("cpu"))
        await dead.expect_none(1.0)  # not redelivered and dead-lettered again
        assert worker.completed == 0
        assert not running.done()
        stop.set()
        await asyncio.wait_for(running, WAIT)
        await service_broker.close()
        # the task was acked, not left for redelivery: nothing comes back once the worker is gone
        await assert_settled(broker, names.task_queue("cpu"))
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running, WAIT)
        await service_broker.close()
