"""A worker warms up before its first hello: one tiny pass, once per process, in the thread it
trains in, that changes no training result. Workers run here in the test's process against the
real broker."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
import uuid
from typing import Any

import pytest
import torch
from structlog.testing import capture_logs
from torch import nn

import worker.training as training
from broker_config.names import Names
from shared.app import PartitionSpec
from shared.codec import decode, encode
from shared.messages import Task, TrainConfig, Update
from shared.signing import Keyring, Signer
from shared.store import model_key
from shared.tensors import FlatModel
from shared.transport import Delivery
from shared.transport.rabbitmq import RabbitMQ
from tests.support.tiny import WAIT, LinearApp, events, until
from worker.config import WorkerConfig
from worker.service import Worker
from worker.training import train_task, warm_up

JOB = "job"  # the job of these tests' tasks; the names fixture takes it too


class SpyApp(LinearApp):
    """Records, with the thread it ran in, every model built and every forward and backward pass."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def build_model(self, seed: int) -> nn.Module:
        self.seen.append(("build", threading.get_ident()))
        model = super().build_model(seed)
        spy = self

        def forward_hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            spy.seen.append(("forward", threading.get_ident()))
            if out.requires_grad:
                out.register_hook(lambda grad: spy.seen.append(("backward", threading.get_ident())))

        model.register_forward_hook(forward_hook)
        return model


def make_task(coordinator: Signer, app: LinearApp, task_id: str) -> tuple[Task, bytes, bytes]:
    blob = FlatModel.from_state_dict(app.build_model(0).state_dict()).to_bytes()
    task = Task(
        task_id=task_id,
        job_id=JOB,
        capability="cpu",
        base_version=0,
        model_sha256=hashlib.sha256(blob).hexdigest(),
        model_key=model_key(JOB, 0),
        train=TrainConfig(epochs=2, batch_size=16),
        quant="int8",
        block=256,
        deadline=time.time() + 600,
        issued_at=time.time(),
        model=blob,
    )
    return task, blob, encode(task, coordinator)


@pytest.fixture
def cold_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if this process had not warmed up yet (the warm-up runs once per process)."""
    monkeypatch.setattr(training, "_warmed", False)


async def test_worker_warms_up_in_its_training_thread_before_its_first_hello(
    broker: RabbitMQ, names: Names, amqp_url: str, cold_process: None
) -> None:
    app = SpyApp()
    data = app.load_partition(PartitionSpec(0, 1))
    coordinator, worker_signer = Signer.generate(), Signer.generate()
    pinned = Keyring()
    pinned.add(coordinator.public)
    seen_at_hello: list[list[tuple[str, int]]] = []

    async def on_hello(delivery: Delivery) -> None:
        await delivery.ack()
        seen_at_hello.append(list(app.seen))

    updates: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_update(delivery: Delivery) -> None:
        await delivery.ack()
        await updates.put(delivery.body)

    await broker.subscribe(names.workers_exchange, (names.hello_key,), on_hello)
    await broker.consume(names.updates_queue, on_update, prefetch=4)
    own = await RabbitMQ(amqp_url, names, "test-warm-worker").connect()
    stop = asyncio.Event()
    worker = Worker(
        WorkerConfig("w1", ("cpu",), heartbeat_interval=60.0),
        transport=own,
        app=app,
        data=data,
        signer=worker_signer,
        coordinator_keys=pinned,
    )
    running = asyncio.create_task(worker.run(stop))
    try:
        await until(lambda: seen_at_hello, "the worker's first hello")
        first = seen_at_hello[0]
        kinds = [kind for kind, _ in first]
        assert kinds == ["build", "forward", "backward"], first  # warmed up, and before the hello
        assert worker.warmed is not None and worker.warmed.how == "pass"
        warm_thread = first[0][1]
        assert warm_thread != threading.get_ident()  # off the event loop

        task, blob, body = make_task(coordinator, LinearApp(), uuid.uuid4().hex)
        app.seen.clear()
        await broker.publish(names.tasks_exchange, names.task_key("cpu"), body)
        ring = Keyring()
        ring.add(worker_signer.public)
        update, _ = decode(await asyncio.wait_for(updates.get(), WAIT), ring, Update)
        assert {thread for _, thread in app.seen} == {warm_thread}  # trained where it warmed up
        # the warm-up changed nothing: the same task trained here, in a warm process, gives the same bytes
        assert update.delta == train_task(LinearApp(), data, task, blob).delta
    finally:
        stop.set()
        await asyncio.wait_for(running, WAIT)
        await own.close()


class DropoutApp(LinearApp):
    """Training draws from torch's global RNG (dropout), and building a model does too (no seed):
    a warm-up that left the global RNG elsewhere would change the trained update."""

    def build_model(self, seed: int) -> nn.Module:
        return nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))


def test_warm_up_leaves_the_training_result_unchanged(cold_process: None) -> None:
    app = DropoutApp()
    data = app.load_partition(PartitionSpec(0, 1))
    task, blob, _ = make_task(Signer.generate(), app, "0123456789abcdef" * 2)

    torch.manual_seed(7)
    without = train_task(app, data, task, blob).delta
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    warmed = warm_up(app, data)
    assert warmed.how == "pass"
    assert torch.equal(torch.get_rng_state(), rng)
    assert train_task(app, data, task, blob).delta == without


def test_one_warm_up_per_process(cold_process: None) -> None:
    """--replicas M: M workers in one process; the first warms the process, the others skip."""
    app = SpyApp()
    data = app.load_partition(PartitionSpec(0, 1))
    results: list[training.WarmUp] = []
    threads = [threading.Thread(target=lambda: results.append(warm_up(app, data))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.how for r in results) == ["pass", "skipped", "skipped"]
    assert [kind for kind, _ in app.seen] == ["build", "forward", "backward"]


async def test_a_failing_warm_up_does_not_stop_the_worker(
    broker: RabbitMQ, names: Names, amqp_url: str, cold_process: None
) -> None:
    hellos: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_hello(delivery: Delivery) -> None:
        await delivery.ack()
        await hellos.put(delivery.body)

    await broker.subscribe(names.workers_exchange, (names.hello_key,), on_hello)
    own = await RabbitMQ(amqp_url, names, "test-cold-worker").connect()
    stop = asyncio.Event()
    app = LinearApp()
    wrong = (torch.zeros(4, 5), torch.zeros(4, dtype=torch.int64))  # 5 features for a 4-feature model
    with capture_logs() as logs:
        worker = Worker(
            WorkerConfig("w1", ("cpu",), heartbeat_interval=60.0),
            transport=own,
            app=app,
            data=wrong,
            signer=Signer.generate(),
            coordinator_keys=Keyring(),
        )
        running = asyncio.create_task(worker.run(stop))
        try:
            await asyncio.wait_for(hellos.get(), WAIT)
            assert events(logs, "warm_up_failed")
            assert not running.done()
        finally:
            stop.set()
            await asyncio.wait_for(running, WAIT)
            await own.close()
