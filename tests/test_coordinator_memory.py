"""The coordinator service on the in-memory transport: hellos in, tasks and rounds out, receipts
and versions adopted, evaluation into metrics.jsonl, a stop rule ends ``run`` (no RabbitMQ)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from broker_config.names import Names
from broker_config.topology import topology
from coordinator.config import CoordinatorConfig, Mode
from coordinator.service import Coordinator
from shared.codec import decode, encode
from shared.messages import Hello, Receipt, Receipts, Round, Task
from shared.signing import Keyring, Signer
from shared.store import ModelStore, open_store
from shared.tensors import FlatModel
from shared.transport import Delivery
from shared.transport.memory import MemoryBroker, MemoryTransport
from tests.support.messages import save_version
from tests.support.tiny import LinearApp
from tests.support.waiting import events, until

NAMES = Names("memcoord", "job-mem")
JOB = NAMES.job
METRIC_KEYS = {
    "version",
    "parent",
    "accuracy",
    "loss",  # the app's own figures, then the version's
    "updates_total",
    "updates_in_version",
    "mean_staleness",
    "created_at",
    "t",
    "wall",
}


@dataclass
class Rig:
    coordinator: Coordinator
    harness: MemoryTransport
    store: ModelStore
    worker: Signer
    aggregator: Signer
    running: asyncio.Task[str]
    logs: list[dict[str, Any]]
    tasks: list[Task] = field(default_factory=list)
    rounds: list[Round] = field(default_factory=list)

    async def hello(self, worker_id: str) -> None:
        hello = Hello(worker_id, ("cpu",), self.worker.fingerprint, "up", time.time())
        await self.harness.publish(NAMES.workers_exchange, NAMES.hello_key, encode(hello, self.worker))

    async def receipt(self, task: Task) -> None:
        receipt = Receipt(JOB, task.task_id, "w1", "buffered", "", task.base_version)
        body = encode(Receipts(JOB, (receipt,)), self.aggregator)
        await self.harness.publish(NAMES.models_exchange, Names.receipt_key(JOB), body)

    async def version(self, version: int, update_ids: tuple[str, ...]) -> None:
        """Store ``version`` (the same weights as v0) and announce it, as the aggregator does."""
        _, blob = await self.store.load_bytes(0)
        manifest = await save_version(
            self.store, blob, version, update_ids, updates_total=len(update_ids) * version
        )
        body = encode(manifest.announcement(), self.aggregator)
        await self.harness.publish(NAMES.models_exchange, Names.model_key(JOB), body)


@contextlib.asynccontextmanager
async def rig(out: Path, **config: Any) -> AsyncIterator[Rig]:
    broker = MemoryBroker()
    harness = await MemoryTransport(broker, NAMES, "harness").connect()
    await harness.declare(topology(NAMES, ("cpu",)))
    coordinator_key, worker, aggregator = Signer.generate(), Signer.generate(), Signer.generate()
    keyring = Keyring()
    for signer in (worker, aggregator):
        keyring.add(signer.public)
    seen = Keyring()
    seen.add(coordinator_key.public)
    store = ModelStore(open_store(str(out / "store")), JOB)
    own = await MemoryTransport(broker, NAMES, "coordinator").connect()
    config.setdefault("target_accuracy", 0.0)
    config.setdefault("max_seconds", 0.0)
    with capture_logs() as logs:
        coordinator = Coordinator(
            config=CoordinatorConfig(job_id=JOB, out_dir=out, **config),
            transport=own,
            store=store,
            app=LinearApp(),
            signer=coordinator_key,
            keyring=keyring,
        )
        running = asyncio.create_task(coordinator.run())
        r = Rig(coordinator, harness, store, worker, aggregator, running, logs)

        async def on_task(delivery: Delivery) -> None:
            task, _ = decode(delivery.body, seen, Task)
            r.tasks.append(task)
            await delivery.ack()

        async def on_update(delivery: Delivery) -> None:
            message, _ = decode(delivery.body, seen, Round)
            r.rounds.append(message)
            await delivery.ack()

        await harness.consume(NAMES.task_queue("cpu"), on_task, prefetch=100)
        await harness.consume(NAMES.updates_queue, on_update, prefetch=100)
        try:
            await until(lambda: events(logs, "started") or running.done(), "the coordinator to start")
            yield r
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            await own.close(grace=0.1)
            await harness.close(grace=0.1)


async def test_async_tasks_receipts_versions_and_the_stop(tmp_path: Path) -> None:
    async with rig(tmp_path, max_versions=1) as r:
        await r.hello("w1")
        await until(lambda: r.tasks, "a task for the worker")
        first = r.tasks[0]
        assert (first.job_id, first.capability, first.base_version, first.round) == (JOB, "cpu", 0, -1)
        assert FlatModel.from_bytes(first.model).spec.n_float == 15  # inline: a 4x3 linear layer
        await asyncio.sleep(0.3)
        assert len(r.tasks) == 1  # one live worker, one task in flight

        await r.harness.publish(NAMES.workers_exchange, NAMES.hello_key, b"not a message")
        await until(lambda: events(r.logs, "hello_rejected"), "the bad hello to be logged")
        dead = await r.harness.queue_info(NAMES.dead_queue)
        assert dead is not None and dead.messages == 0  # logged and acked, not dead-lettered

        await r.receipt(first)
        await until(lambda: len(r.tasks) == 2, "a task to replace the answered one")
        await r.version(1, (first.task_id, r.tasks[1].task_id))
        assert await asyncio.wait_for(r.running, 10.0) == "max_versions"

    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["version"] for m in metrics] == [0, 1]
    assert all(set(m) == METRIC_KEYS for m in metrics) and metrics[1]["updates_in_version"] == 2
    state = json.loads((tmp_path / "coordinator.json").read_text())
    assert (state["stop_reason"], state["latest_version"], state["tasks_issued"]) == ("max_versions", 1, 2)
    assert state["in_flight"] == {} and state["workers_seen"] == ["w1"] and state["t0"] is not None
    assert events(r.logs, "stopped")[0]["reason"] == "max_versions"


async def test_sync_rounds_open_close_and_follow_the_versions(tmp_path: Path) -> None:
    async with rig(tmp_path, mode=Mode.SYNC, round_timeout=0.3, min_workers=2, max_versions=2) as r:
        await r.hello("w1")
        await asyncio.sleep(0.6)
        assert r.tasks == [] and r.rounds == []  # the fleet gate: two workers
        await r.hello("w2")
        await until(lambda: len(r.tasks) == 2, "one task per worker")
        assert [(t.round, t.base_version) for t in r.tasks] == [(1, 0), (1, 0)]
        await until(lambda: len(r.rounds) == 2, "the round to close at its deadline")
        opening, closing = r.rounds
        assert (opening.round, opening.version, opening.size, opening.close) == (1, 0, 2, False)
        assert (closing.round, closing.close, closing.deadline) == (1, True, opening.deadline)

        await r.version(1, tuple(t.task_id for t in r.tasks))  # within the grace after the close
        await until(lambda: len(r.tasks) == 4, "the next round on the new version")
        assert [(t.round, t.base_version) for t in r.tasks[2:]] == [(2, 1), (2, 1)]
        assert (r.rounds[2].round, r.rounds[2].version) == (2, 1)
        await r.version(2, tuple(t.task_id for t in r.tasks[2:]))
        assert await asyncio.wait_for(r.running, 10.0) == "max_versions"
    state = json.loads((tmp_path / "coordinator.json").read_text())
    assert (state["mode"], state["round"], state["stop_reason"]) == ("sync", 2, "max_versions")
