"""Tasks that cannot be done: a task that keeps failing stops at the delivery limit, and tasks
nobody takes in time expire to the dead-letter queue while the job goes on with fresh work."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import torch
from torch import nn

from broker_config.names import Names
from shared.app import ClassificationApp, TrainResult
from shared.codec import encode
from shared.messages import Task, TrainConfig
from shared.signing import Keyring, Role, Signer
from shared.store import model_key
from shared.tensors import FlatModel
from shared.transport import Delivery
from shared.transport.rabbitmq import RabbitMQ
from tests.support.jobs import TINY_APP, cleanup, finish, log_events, records, start_run
from worker.config import WorkerConfig
from worker.service import Worker

JOB = "job"  # the job of these tests' tasks; the names fixture takes it too

__all__ = ["cleanup"]


class BrokenApp(ClassificationApp):
    """Trains by raising: the worker gives the task back every time."""

    name = "broken"

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Linear(4, 2)

    def train(self, model: nn.Module, data: Any, config: TrainConfig, seed: int) -> TrainResult:
        raise RuntimeError("this app cannot train")


async def test_failing_task_stops_at_the_delivery_limit(broker: RabbitMQ, names: Names) -> None:
    coordinator = Signer.generate()
    pinned = Keyring()
    pinned.add(coordinator.public, Role.COORDINATOR)
    own = await RabbitMQ(broker.url, names, "test-broken-worker").connect()
    app = BrokenApp()
    worker = Worker(
        WorkerConfig("w1", ("cpu",), heartbeat_interval=60.0),
        transport=own,
        app=app,
        data=None,
        signer=Signer.generate(),
        coordinator_keys=pinned,
    )
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    dead: asyncio.Queue[Delivery] = asyncio.Queue()

    async def on_dead(d: Delivery) -> None:
        await d.ack()
        await dead.put(d)

    await broker.consume(names.dead_queue, on_dead, prefetch=4)
    try:
        blob = FlatModel.from_state_dict(app.build_model(0).state_dict()).to_bytes()
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
        body = encode(task, coordinator)
        await broker.publish(names.tasks_exchange, names.task_key("cpu"), body)
        d = await asyncio.wait_for(dead.get(), 60)
        assert d.body == body
        headers = d.message.headers
        assert headers.get("x-first-death-reason") == "delivery_limit", dict(headers)
        assert headers.get("x-first-death-queue") == names.task_queue("cpu")
        assert worker.completed == 0
        assert not running.done()  # a failing task never takes the worker down
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)
        await own.close()


@pytest.mark.slow
def test_expired_tasks_are_dead_lettered_and_replaced(
    tmp_path: Path, names: Names, cleanup: None, amqp_url: str
) -> None:
    out = tmp_path / "run"
    # one slow worker (the tiny app, 3 s a task), three tasks in flight, a 2 s TTL: tasks queued
    # behind the one in hand expire
    finish(
        start_run(
            out,
            names,
            *TINY_APP,
            "--workers",
            "1",
            "--delay-profile",
            "3*1",
            "--concurrency",
            "3",
            "--task-ttl",
            "2",
            "--buffer",
            "1",
            "--clip",
            "adaptive:3,50,1",  # a warm-up of one buffer: the default's 5 would hold version 1 to 5 updates
            "--target-accuracy",
            "0",
            "--max-updates",
            "3",
            "--max-seconds",
            "120",
        )
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "max_updates", summary
    assert log_events(out / "logs" / "coordinator.log", "tasks_expired")
    assert summary["tasks_issued"] > summary["updates_applied"] + 2  # fresh tasks replaced expired ones
    applied = [r for r in records(out / "ledger.jsonl") if r["fate"] == "applied"]
    assert len(applied) >= 3

    async def expired_in_dead_queue() -> int:
        conn = await aio_pika.connect(amqp_url)
        try:
            channel = await conn.channel()
            queue = await channel.get_queue(names.dead_queue, ensure=False)
            count = 0
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                count += message.headers.get("x-first-death-reason") == "expired"
            return count
        finally:
            await conn.close()

    assert asyncio.run(expired_in_dead_queue()) >= 1
