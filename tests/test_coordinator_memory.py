"""The coordinator service on the in-memory transport: hellos in, tasks and rounds out, receipts
and versions adopted, evaluation into metrics.jsonl, a stop rule ends ``run`` (no RabbitMQ)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from broker_config.names import Names
from coordinator.config import Mode
from shared.codec import encode
from shared.messages import ModelAnnouncement
from shared.signing import Role
from shared.tensors import FlatModel
from shared.transport.memory import MemoryTransport
from tests.support.messages import MAKER, save_version
from tests.support.rigs import coordinator_rig
from tests.support.waiting import WAIT, events, until

JOB = "job-mem"  # the names fixture takes it: the coordinator's transport is named for its job
METRIC_KEYS = {
    "version",
    "parent",
    "accuracy",
    "loss",  # the app's own figures, then the version's
    "updates_total",
    "updates_in_version",
    "mean_staleness",
    "created_at",
    "received_at",
    "t",
    "wall",
}


async def test_async_tasks_receipts_versions_and_the_stop(mem: MemoryTransport, tmp_path: Path) -> None:
    async with coordinator_rig(mem, tmp_path, max_versions=1) as r:
        await r.hello("w1")
        await until(lambda: r.tasks, "a task for the worker")
        first = r.tasks[0]
        assert (first.job_id, first.capability, first.base_version, first.round) == (JOB, "cpu", 0, -1)
        assert FlatModel.from_bytes(first.model).spec.n_float == 15  # inline: a 4x3 linear layer
        await asyncio.sleep(0.3)
        assert len(r.tasks) == 1  # one live worker, one task in flight

        await r.client.publish(r.names.workers_exchange, r.names.hello_key, b"not a message")
        await until(lambda: events(r.logs, "hello_rejected"), "the bad hello to be logged")
        dead = await r.client.queue_info(r.names.dead_queue)
        assert dead is not None and dead.messages == 1  # logged and dead-lettered with its reason

        await r.receipt(first)
        await until(lambda: len(r.tasks) == 2, "a task to replace the answered one")
        await r.version(1, (first.task_id, r.tasks[1].task_id))
        assert await asyncio.wait_for(r.running, WAIT) == "max_versions"

    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["version"] for m in metrics] == [0, 1]
    assert all(set(m) == METRIC_KEYS for m in metrics) and metrics[1]["updates_in_version"] == 2
    state = json.loads((tmp_path / "coordinator.json").read_text())
    assert (state["stop_reason"], state["latest_version"], state["tasks_issued"]) == ("max_versions", 1, 2)
    assert state["in_flight"] == {} and state["workers_seen"] == ["w1"] and state["t0"] is not None
    assert events(r.logs, "stopped")[0]["reason"] == "max_versions"


async def test_sync_rounds_open_close_and_follow_the_versions(mem: MemoryTransport, tmp_path: Path) -> None:
    async with coordinator_rig(
        mem, tmp_path, mode=Mode.SYNC, round_timeout=0.3, min_workers=2, max_versions=2
    ) as r:
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
        assert await asyncio.wait_for(r.running, WAIT) == "max_versions"
    state = json.loads((tmp_path / "coordinator.json").read_text())
    assert (state["mode"], state["round"], state["stop_reason"]) == ("sync", 2, "max_versions")


async def test_a_version_refused_for_want_of_its_key_is_adopted_once_the_key_is_trusted(
    mem: MemoryTransport, tmp_path: Path
) -> None:
    """Trust laid out wrong (the aggregator's key missing): the coordinator says which key it
    lacks, refuses the announcement, and once the key is trusted finds the version in the store."""
    async with coordinator_rig(mem, tmp_path, trust_aggregator=False, max_versions=1) as r:
        lacking = [e["problem"] for e in events(r.logs, "trust_incomplete")]
        assert any("no aggregator key is trusted" in p for p in lacking)
        await r.hello("w1")
        await until(lambda: r.tasks, "a task for the worker")
        await r.version(1, (r.tasks[0].task_id,))
        rejected = await until(lambda: events(r.logs, "model_event_rejected"), "the announcement refused")
        assert rejected[0]["reason"] == "unknown_signer"
        await asyncio.sleep(1.5)
        assert not r.running.done() and r.coordinator.scheduler.version == 0
        r.trust.add(MAKER.public, Role.AGGREGATOR)  # the operator fixes the trust set
        assert await asyncio.wait_for(r.running, WAIT) == "max_versions"
        assert events(r.logs, "version_found_in_store")[0]["version"] == 1


async def test_an_announcement_of_a_version_that_is_not_stored_is_dead_lettered(
    mem: MemoryTransport, tmp_path: Path
) -> None:
    async with coordinator_rig(mem, tmp_path, max_versions=1) as r:
        await r.hello("w1")
        await until(lambda: r.tasks, "a task for the worker")
        fake = ModelAnnouncement(r.names.job, 7, 6, "ab" * 32, "jobs/x/v7.bin", (), time.time())
        for _ in range(3):
            await r.client.publish(r.names.models_exchange, Names.model_key(r.names.job), encode(fake, MAKER))
        await until(lambda: len(events(r.logs, "announcement_rejected")) == 3, "three refusals")
        assert {e["reason"] for e in events(r.logs, "announcement_rejected")} == {"payload_missing"}
        await r.version(1, (r.tasks[0].task_id,))
        assert await asyncio.wait_for(r.running, WAIT) == "max_versions"


async def test_every_version_is_evaluated_in_order_on_the_coordinators_clock(
    mem: MemoryTransport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Evaluation slower than versions come: versions 1 to 3 announced at once are each evaluated, in
    order (none overtaken), and version 5, announced with version 4 never announced, brings 4's
    evaluation too. A version's time is when the coordinator received it, not its creator's clock."""
    async with coordinator_rig(mem, tmp_path, max_versions=5) as r:
        slow = r.coordinator.evaluator._evaluate

        def evaluate_slowly(blob: bytes) -> dict[str, float]:
            time.sleep(0.2)
            return slow(blob)

        monkeypatch.setattr(r.coordinator.evaluator, "_evaluate", evaluate_slowly)
        await r.hello("w1")
        await until(lambda: r.tasks, "a task for the worker")
        for v in (1, 2, 3):
            await r.version(v, ())
        _, blob = await r.store.load_bytes(0)
        await save_version(r.store, blob, 4, (), created_at=1.0)  # stored, its announcement lost
        await r.version(5, ())
        assert await asyncio.wait_for(r.running, WAIT) == "max_versions"
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["version"] for m in metrics] == [0, 1, 2, 3, 4, 5]
    state = json.loads((tmp_path / "coordinator.json").read_text())
    four = next(m for m in metrics if m["version"] == 4)
    assert four["created_at"] == 1.0 and four["t"] == pytest.approx(four["received_at"] - state["t0"])
    assert four["t"] > 0  # the coordinator's clock: not 1.0 - t0


async def test_a_version_brought_twice_is_evaluated_once(tmp_path: Path) -> None:
    """An announcement and a look in the store may both bring a version: it is queued once."""
    from coordinator.evaluation import Evaluator
    from shared.logs import get_logger
    from tests.support.tiny import LinearApp

    evaluator = Evaluator(LinearApp(), 0, tmp_path, get_logger())
    ann = ModelAnnouncement(JOB, 1, 0, "0" * 64, "k", (), 1.0)
    evaluator.submit(ann)
    evaluator.submit(ann)
    assert [p.ann.version for p in evaluator.unfinished()] == [1]
