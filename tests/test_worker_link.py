"""Intermittent workers: the outbox, and a worker whose link to the broker is cut, on the real broker.

A worker's trained update goes to its on-disk outbox, then to the broker; it leaves the
outbox only after the broker's confirm, and the task is acked only after that. These tests
cut the link silently (a TCP proxy that stops moving bytes: only heartbeats notice), restart
workers on a leftover outbox, and check that every update reaches ``fedq.updates`` once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from structlog.testing import capture_logs
from torch import nn

from broker_config.names import Names
from fedq.cli import _settings, build_parser
from shared.app import ClassificationApp, PartitionSpec, TrainResult
from shared.codec import decode, encode
from shared.keys import load_or_create_signer, public_key_path
from shared.messages import Task, TrainConfig, Update
from shared.settings import Settings
from shared.signing import Keyring, Signer
from shared.store import model_key
from shared.tensors import FlatModel
from shared.transport import Delivery
from shared.transport.rabbitmq import RabbitMQ, with_heartbeat
from tests.support.tcpproxy import TcpProxy
from worker.config import WorkerConfig
from worker.outbox import Outbox, OutboxError, decode_task_id, encode_task_id
from worker.service import Worker, default_outbox, serve

JOB = "job1"
WAIT = 10.0  # seconds any single expectation may take before the test fails
QUIET = 1.0  # seconds of silence that count as "nothing more arrives"
HEARTBEAT = 2  # AMQP heartbeat of the worker behind the proxy: it notices a silent cut in ~3 x (2 + 1) s


class TinyApp(ClassificationApp):
    """Four features, three classes, a linear model; ``train_seconds`` makes training last."""

    name = "tiny"

    def __init__(self, train_seconds: float = 0.0, fail: bool = False) -> None:
        self.train_seconds = train_seconds
        self.fail = fail

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Linear(4, 3)

    def train_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        return torch.randn(48, 4, generator=gen), torch.randint(0, 3, (48,), generator=gen)

    def test_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.train_data()

    def train(
        self, model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], config: TrainConfig, seed: int
    ) -> TrainResult:
        if self.fail:
            raise AssertionError("this worker must not train")
        time.sleep(self.train_seconds)  # in the training thread, as long local training would
        return super().train(model, data, config, seed)


def make_task(coordinator: Signer, task_id: str | None = None) -> tuple[Task, bytes]:
    blob = FlatModel.from_state_dict(TinyApp().build_model(0).state_dict()).to_bytes()
    task = Task(
        task_id=task_id or uuid.uuid4().hex,
        job_id=JOB,
        capability="cpu",
        base_version=0,
        model_sha256=hashlib.sha256(blob).hexdigest(),
        model_key=model_key(JOB, 0),
        train=TrainConfig(epochs=1, batch_size=16),
        quant="int8",
        block=256,
        deadline=time.time() + 600,
        issued_at=time.time(),
        model=blob,
    )
    return task, encode(task, coordinator)


def make_update(signer: Signer, task_id: str) -> bytes:
    update = Update(
        task_id=task_id,
        job_id=JOB,
        worker_id="w-old",
        base_version=0,
        num_samples=48,
        quant="none",
        block=256,
        metrics={"train_loss": 1.0},
        sent_at=time.time(),
        delta=b"\x00" * 8,
    )
    return encode(update, signer)


class Inbox:
    """What arrives on a queue, acked at once."""

    def __init__(self) -> None:
        self.got: asyncio.Queue[Delivery] = asyncio.Queue()

    async def on_message(self, delivery: Delivery) -> None:
        await delivery.ack()
        await self.got.put(delivery)

    async def next(self, wait: float = WAIT) -> Delivery:
        return await asyncio.wait_for(self.got.get(), wait)

    async def expect_none(self, wait: float = QUIET) -> None:
        with contextlib.suppress(TimeoutError):
            d = await self.next(wait)
            pytest.fail(f"unexpected message ({len(d.body)} bytes, message id {d.message.message_id})")


async def until(check: Callable[[], Any], what: str, wait: float = WAIT) -> None:
    """Poll ``check`` (plain or async) until it is truthy, for at most ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        value = check()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def update_task_id(body: bytes, signer: Signer) -> str:
    ring = Keyring()
    ring.add(signer.public)
    update, _ = decode(body, ring, Update)
    return update.task_id


async def assert_settled(broker: RabbitMQ, queue: str, wait: float = QUIET) -> None:
    """Nothing is left in ``queue`` (call it once the worker's connection is closed)."""
    inbox = Inbox()
    await broker.consume(queue, inbox.on_message, prefetch=16)
    await inbox.expect_none(wait)


@dataclass
class Rig:
    names: Names
    test_broker: RabbitMQ  # publishes tasks, reads updates; never behind the proxy
    worker_broker: RabbitMQ
    worker: Worker
    coordinator: Signer
    signer: Signer
    updates: Inbox
    running: asyncio.Task[None]
    stop: asyncio.Event

    async def send_task(self, task_id: str | None = None) -> Task:
        task, body = make_task(self.coordinator, task_id)
        await self.test_broker.publish(self.names.tasks_exchange, self.names.task_key("cpu"), body)
        return task

    async def next_update(self, wait: float = WAIT) -> tuple[str, bytes]:
        d = await self.updates.next(wait)
        return update_task_id(d.body, self.signer), d.body

    def check_alive(self) -> None:
        if self.running.done():
            raise AssertionError(f"the worker stopped: {self.running!r}")


@contextlib.asynccontextmanager
async def worker_rig(
    broker: RabbitMQ,
    names: Names,
    url: str,
    *,
    app: TinyApp,
    outbox: Outbox | None,
    heartbeat: int = 15,
) -> AsyncIterator[Rig]:
    """A ``Worker`` with its own connection to ``url``, and a consumer of the updates queue."""
    coordinator, signer = Signer.generate(), Signer.generate()
    pinned = Keyring()
    pinned.add(coordinator.public)
    updates = Inbox()
    await broker.consume(names.updates_queue, updates.on_message, prefetch=16)
    worker_broker = await asyncio.wait_for(
        RabbitMQ(url, names, "test-worker-link", heartbeat=heartbeat, publish_retry_seconds=60).connect(), WAIT
    )
    worker = Worker(
        WorkerConfig("w1", ("cpu",), heartbeat_interval=60.0),
        transport=worker_broker,
        app=app,
        data=app.load_partition(PartitionSpec(0, 1)),
        signer=signer,
        coordinator_keys=pinned,
        outbox=outbox,
    )
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop), name="worker")
    rig = Rig(names, broker, worker_broker, worker, coordinator, signer, updates, running, stop)
    try:
        yield rig
        rig.check_alive()
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running, WAIT)
        await worker_broker.close()


def events(logs: Sequence[Mapping[str, Any]], name: str, **match: Any) -> list[Mapping[str, Any]]:
    return [e for e in logs if e["event"] == name and all(e.get(k) == v for k, v in match.items())]


# -- a silent partition while training -------------------------------------------------------


async def test_silent_cut_while_training(amqp_url: str, broker: RabbitMQ, names: Names, tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox")
    async with TcpProxy(lifetime=90) as proxy:
        with capture_logs() as logs:
            async with worker_rig(
                broker,
                names,
                proxy.url(amqp_url),
                app=TinyApp(train_seconds=3),
                outbox=outbox,
                heartbeat=HEARTBEAT,
            ) as rig:
                assert f"heartbeat={HEARTBEAT}" in rig.worker_broker.url
                first = await rig.send_task()
                await until(lambda: rig.worker.busy, "training to start")
                proxy.cut()
                cut_at = time.monotonic()
                # training ends during the cut: the update goes to the outbox, its publish hangs
                await until(lambda: outbox.task_ids() == [first.task_id], "the update in the outbox")
                # only missed heartbeats reveal the cut; then the worker dials again
                async with asyncio.timeout(3 * (HEARTBEAT + 1) + WAIT):
                    await proxy.wait_accepted(2)
                assert time.monotonic() - cut_at > 2 * HEARTBEAT  # missed heartbeats, not a closed socket
                await rig.updates.expect_none(0.1)  # nothing got through the cut
                assert outbox.task_ids() == [first.task_id]
                proxy.heal()

                # the update arrives once, with the right task id, and leaves the outbox
                task_id, _ = await rig.next_update(WAIT + 5)
                assert task_id == first.task_id
                await until(lambda: len(outbox) == 0, "an empty outbox")
                # the task's ack died with the old channel: it comes back and is acked without training
                await until(
                    lambda: events(logs, "task_already_sent", task=first.task_id), "the redelivered task"
                )
                assert len(events(logs, "outbox_written", task=first.task_id)) == 1
                assert events(logs, "reconnected")

                # the consumer came back with the link: the worker takes and completes another task
                second = await rig.send_task()
                task_id, _ = await rig.next_update()
                assert task_id == second.task_id
                await rig.updates.expect_none()
                await until(lambda: rig.worker.completed == 2, "the second task's ack")
                assert len(outbox) == 0
            # every task was acked: nothing comes back once the worker's connection is closed
            await assert_settled(broker, names.task_queue("cpu"))


async def test_reset_connection_keeps_taking_tasks(
    amqp_url: str, broker: RabbitMQ, names: Names, tmp_path: Path
) -> None:
    """A link that drops loudly (connections closed): the worker reconnects and its consumer is back."""
    outbox = Outbox(tmp_path / "outbox")
    async with (
        TcpProxy(lifetime=60) as proxy,
        worker_rig(broker, names, proxy.url(amqp_url), app=TinyApp(), outbox=outbox) as rig,
    ):
        first = await rig.send_task()
        assert (await rig.next_update())[0] == first.task_id
        await until(lambda: rig.worker.completed == 1, "the first task's ack")
        proxy.reset()
        async with asyncio.timeout(WAIT):
            await proxy.wait_accepted(2)
        await until(lambda: rig.worker_broker.connection.connected.is_set(), "the reconnect")
        for _ in range(2):
            task = await rig.send_task()
            assert (await rig.next_update())[0] == task.task_id
        await until(lambda: rig.worker.completed == 3, "the last task's ack")
        assert len(outbox) == 0


# -- the outbox survives a restart -----------------------------------------------------------


async def test_outbox_is_flushed_when_a_worker_starts(
    amqp_url: str, broker: RabbitMQ, names: Names, tmp_path: Path
) -> None:
    old = Signer.generate()
    outbox = Outbox(tmp_path / "outbox")
    left = [uuid.uuid4().hex for _ in range(2)]
    bodies = {tid: make_update(old, tid) for tid in left}
    for tid in left:
        outbox.put(tid, bodies[tid])
    inbox = Inbox()
    await broker.consume(names.updates_queue, inbox.on_message, prefetch=16)
    await inbox.expect_none(0.3)  # entries on disk go nowhere by themselves
    with capture_logs() as logs:
        async with worker_rig(broker, names, amqp_url, app=TinyApp(), outbox=outbox) as rig:
            got = [await inbox.next(), await inbox.next()]
            # the exact bytes, oldest first, each once
            assert [d.body for d in got] == [bodies[tid] for tid in left]
            assert [d.message.message_id for d in got] == left
            await until(lambda: rig.worker.flushed == 2, "both entries flushed")
            assert len(outbox) == 0
            assert [e["task"] for e in events(logs, "outbox_flushed")] == left
            await inbox.expect_none()
            await rig.updates.expect_none(0.1)


async def test_redelivered_task_sends_its_outbox_entry_without_training(
    amqp_url: str, broker: RabbitMQ, names: Names, tmp_path: Path
) -> None:
    """A worker killed after training: its task comes back, and the update in its outbox is what goes out."""
    outbox = Outbox(tmp_path / "outbox")
    with capture_logs() as logs:
        async with worker_rig(broker, names, amqp_url, app=TinyApp(fail=True), outbox=outbox) as rig:
            await until(lambda: events(logs, "started"), "the worker to start")
            await asyncio.sleep(0.5)  # its first flush is over: the flusher runs again only on a reconnect
            task_id = uuid.uuid4().hex
            body = make_update(rig.signer, task_id)
            outbox.put(task_id, body)  # trained, written, then the process was killed
            await rig.send_task(task_id)  # the task's redelivery
            assert await rig.next_update() == (task_id, body)
            await until(lambda: len(outbox) == 0, "an empty outbox")
            await rig.updates.expect_none()
            assert events(logs, "task_in_outbox", task=task_id)
            assert rig.worker.flushed == 0 and rig.worker.completed == 0  # TinyApp(fail=True) never trained
    await assert_settled(broker, names.task_queue("cpu"))


async def test_serve_uses_the_default_outbox(
    amqp_url: str, broker: RabbitMQ, names: Names, tmp_path: Path
) -> None:
    """``fedq worker`` wiring: settings -> serve() -> <keys_dir>/../outbox/<worker_id>, flushed at start."""
    keys = tmp_path / "run" / "keys"
    load_or_create_signer(keys / "coordinator.key")
    settings = Settings(
        amqp_url=amqp_url,
        namespace=names.namespace,
        job=names.job,
        keys_dir=str(keys),
        coordinator_key=str(public_key_path(keys / "coordinator.key")),
        worker_id="w7",
        store=str(tmp_path / "store"),
        heartbeat_interval=60.0,
    )
    outbox = Outbox(default_outbox(settings, "w7"))
    assert outbox.root == tmp_path / "run" / "outbox" / "w7"
    body = make_update(Signer.generate(), "t-left-over")
    outbox.put("t-left-over", body)
    inbox = Inbox()
    await broker.consume(names.updates_queue, inbox.on_message, prefetch=16)
    stop = asyncio.Event()
    serving = asyncio.create_task(serve(settings, TinyApp(), stop))
    try:
        assert (await inbox.next()).body == body
        await until(lambda: len(outbox) == 0, "an empty outbox")
    finally:
        stop.set()
        await asyncio.wait_for(serving, WAIT)


# -- the proxy itself -------------------------------------------------------------------------

AMQP_HEADER = b"AMQP\x00\x00\x09\x01"


async def test_proxy_cut_heal_reset_and_bounds(amqp_url: str) -> None:
    async with TcpProxy(max_connections=2, lifetime=5.0) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        proxy.cut()
        writer.write(AMQP_HEADER)
        await writer.drain()
        with pytest.raises(TimeoutError):  # held in the cut: no Connection.Start comes back
            await asyncio.wait_for(reader.read(1), 0.5)
        proxy.heal()
        assert (await asyncio.wait_for(reader.read(1), WAIT)) == b"\x01"  # a method frame: Connection.Start
        proxy.reset()
        await asyncio.wait_for(reader.read(), WAIT)  # the rest of the frame, then EOF: the link is closed
        assert reader.at_eof()
        writer.close()
        await until(lambda: not proxy.links, "the reset link to end")
        # at most max_connections at a time
        held = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(3)]
        assert await asyncio.wait_for(held[2][0].read(), WAIT) == b""
        assert proxy.refused == 1
        for _, w in held:
            w.close()
    short = await TcpProxy(lifetime=0.3).start()
    await asyncio.sleep(0.6)
    assert short.closed  # it stopped by itself
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", short.port)


# -- settings and flags ----------------------------------------------------------------------


def test_outbox_and_heartbeat_settings() -> None:
    assert default_outbox(Settings(), "w1") == Path(".fedq/outbox/w1")
    assert Settings.from_env({"FEDQ_OUTBOX": "/var/fedq/outbox"}).outbox == "/var/fedq/outbox"
    args = build_parser().parse_args(["worker", "--outbox", "/tmp/ob", "--worker-id", "w2"])
    assert _settings(args).outbox == "/tmp/ob"
    heartbeat = Settings.from_env({"FEDQ_AMQP_HEARTBEAT": "2"}).amqp_heartbeat
    assert heartbeat == 2
    assert "heartbeat=2" in with_heartbeat("amqp://guest:guest@127.0.0.1:5672/", heartbeat)


# -- the outbox itself -----------------------------------------------------------------------


def test_put_get_remove(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "ob")
    assert box.entries() == [] and len(box) == 0 and box.get("a") is None
    entry = box.put("a", b"one")
    assert entry.path.read_bytes() == b"one" and box.get("a") == b"one"
    assert box.remove("a") is True
    assert box.remove("a") is False
    assert box.get("a") is None and list(box.root.iterdir()) == []


def test_entries_oldest_first_and_replaced(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    ids = ["c", "a", "b", "task-10", "task-9"]
    for tid in ids:
        box.put(tid, tid.encode())
    assert box.task_ids() == ids  # write order, not name order, even within one clock tick
    box.put("a", b"newer")  # a task id has one entry: the newest
    assert box.task_ids() == ["c", "b", "task-10", "task-9", "a"]
    assert box.get("a") == b"newer"
    # a new Outbox on the same directory (a restart) sees the same entries
    assert Outbox(tmp_path).task_ids() == box.task_ids()


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = Outbox(tmp_path)
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    box.put("a", b"one")
    assert len(synced) == 2  # the file, then the directory holding its new name

    def crash(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        box.put("b", b"two")
    assert box.task_ids() == ["a"]  # no half-written entry, no temp file left
    assert [p.name for p in tmp_path.iterdir()] == [box.entries()[0].path.name]


def test_temp_and_foreign_files_are_ignored(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    box.put("good", b"ok")
    (tmp_path / ".tmp-abc123").write_bytes(b"\x82\xa1v\x01")  # a crash mid-write: a partial message
    (tmp_path / "00000000000000000001.half.msg.tmp").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not an entry")
    (tmp_path / "00000000000000000002.~zz.msg").write_bytes(b"bad hex")
    (tmp_path / "00000000000000000003.dir.msg").mkdir()
    assert box.task_ids() == ["good"]
    assert box.sweep_temp(older_than=3600) == 0  # a fresh temp file may be a write in progress
    assert box.sweep_temp(older_than=-1) == 1
    assert not (tmp_path / ".tmp-abc123").exists()
    assert (tmp_path / "notes.txt").exists()
    assert box.task_ids() == ["good"]


@pytest.mark.parametrize("task_id", ["plain-id_1", "a/b", "..", ".hidden", "~tilde", "ünïcode", "x" * 100])
def test_any_task_id_names_one_entry(tmp_path: Path, task_id: str) -> None:
    box = Outbox(tmp_path)
    entry = box.put(task_id, b"body")
    assert entry.path.parent == tmp_path  # never outside the outbox
    assert decode_task_id(encode_task_id(task_id)) == task_id
    assert box.task_ids() == [task_id] and box.get(task_id) == b"body"
    assert box.remove(task_id) and len(box) == 0


@pytest.mark.parametrize("task_id", ["", "x" * 101])
def test_unusable_task_ids(tmp_path: Path, task_id: str) -> None:
    with pytest.raises(OutboxError):
        Outbox(tmp_path).put(task_id, b"body")
