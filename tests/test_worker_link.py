"""Intermittent workers on the real broker: a worker whose link is cut (a TCP proxy), and the
outbox that carries its update across the cut; the outbox itself, and its settings.

A worker's trained update goes to its on-disk outbox, then to the broker; it leaves the
outbox only after the broker's confirm, and the task is acked only after that. These tests
cut the link silently (a TCP proxy that stops moving bytes: only heartbeats notice) or loudly,
and check that every update reaches the updates queue once. The worker's handling of what
its outbox holds at start or on a redelivered task is service logic, checked on the in-memory
broker in tests/test_worker_memory.py.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from broker_config.names import Names
from fedq.cli import _settings, build_parser
from shared.keys import load_or_create_signer, public_key_path
from shared.settings import Settings
from shared.signing import Signer
from shared.transport.rabbitmq import RabbitMQ, with_heartbeat
from tests.support.broker import Inbox, assert_settled, connect_like
from tests.support.messages import make_update
from tests.support.rigs import worker_rig
from tests.support.tcpproxy import TcpProxy
from tests.support.tiny import LinearApp
from tests.support.waiting import WAIT, events, until
from worker.outbox import Outbox, OutboxError, decode_task_id, encode_task_id
from worker.service import Worker, default_outbox, serve

JOB = "job1"
HEARTBEAT = 2  # AMQP heartbeat of the worker behind the proxy: it notices a silent cut in ~3 x (2 + 1) s


async def behind(proxy: TcpProxy, broker: RabbitMQ, amqp_url: str, heartbeat: int = 15) -> RabbitMQ:
    """The worker's own connection, through ``proxy``."""
    return await connect_like(
        broker, "test-worker-link", url=proxy.url(amqp_url), heartbeat=heartbeat, publish_retry_seconds=60
    )


# -- a silent partition while training -------------------------------------------------------


async def test_silent_cut_while_training(amqp_url: str, broker: RabbitMQ, names: Names, tmp_path: Path) -> None:
    async with TcpProxy(lifetime=90) as proxy:
        own = await behind(proxy, broker, amqp_url, heartbeat=HEARTBEAT)
        assert f"heartbeat={HEARTBEAT}" in own.url
        with capture_logs() as logs:
            async with worker_rig(
                broker, tmp_path, app=LinearApp(train_seconds=3), transport=own, start=True
            ) as rig:
                outbox = rig.outbox
                assert outbox is not None
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
                update, _ = await rig.next_update(WAIT + 5)
                assert update.task_id == first.task_id
                await until(lambda: len(outbox) == 0, "an empty outbox")
                # the task's ack died with the old channel: it comes back and is acked without training
                await until(
                    lambda: events(logs, "task_already_sent", task=first.task_id), "the redelivered task"
                )
                assert len(events(logs, "outbox_written", task=first.task_id)) == 1
                assert events(logs, "reconnected")

                # the consumer came back with the link: the worker takes and completes another task
                second = await rig.send_task()
                update, _ = await rig.next_update()
                assert update.task_id == second.task_id
                await rig.updates.expect_none()
                await until(lambda: rig.worker.completed == 2, "the second task's ack")
                assert len(outbox) == 0 and rig.app.trained == 2
            # every task was acked: nothing comes back once the worker's connection is closed
            await assert_settled(broker, names.task_queue("cpu"))


async def test_reset_connection_keeps_taking_tasks(
    amqp_url: str, broker: RabbitMQ, names: Names, tmp_path: Path
) -> None:
    """A link that drops loudly (connections closed): the worker reconnects and its consumer is back."""
    async with TcpProxy(lifetime=60) as proxy:
        own = await behind(proxy, broker, amqp_url)
        async with worker_rig(broker, tmp_path, transport=own, start=True) as rig:
            first = await rig.send_task()
            assert (await rig.next_update())[0].task_id == first.task_id
            await until(lambda: rig.worker.completed == 1, "the first task's ack")
            proxy.reset()
            async with asyncio.timeout(WAIT):
                await proxy.wait_accepted(2)
            await until(lambda: own.connection.connected.is_set(), "the reconnect")
            for _ in range(2):
                task = await rig.send_task()
                assert (await rig.next_update())[0].task_id == task.task_id
            await until(lambda: rig.worker.completed == 3, "the last task's ack")
            assert rig.outbox is not None and len(rig.outbox) == 0


# -- the outbox: fedq worker's wiring ---------------------------------------------------------


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
    _, body = make_update(Signer.generate(), task_id="t-left-over", job_id=names.job)
    outbox.put("t-left-over", body)
    inbox = await Inbox.on(broker, names.updates_queue)
    stop = asyncio.Event()
    serving = asyncio.create_task(serve(settings, LinearApp(), stop))
    try:
        assert (await inbox.next()).body == body
        await until(lambda: len(outbox) == 0, "an empty outbox")
    finally:
        stop.set()
        await asyncio.wait_for(serving, WAIT)


async def test_replicas_have_all_stopped_when_serve_returns(
    amqp_url: str, broker: RabbitMQ, names: Names, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fedq worker --replicas 3`` stopped (SIGTERM cancels serve): every replica says goodbye and
    closes before serve returns. It returned at the first one, and the process, cutting the
    others' shutdown short, hung on exit."""
    keys = tmp_path / "keys"
    load_or_create_signer(keys / "coordinator.key")
    settings = Settings(
        amqp_url=amqp_url,
        namespace=names.namespace,
        job=names.job,
        keys_dir=str(keys),
        worker_id="fleet",
        replicas=3,
        partition="0/3",
        store=str(tmp_path / "store"),
        heartbeat_interval=60.0,
    )
    goodbye = Worker.stopping

    async def one_slow_goodbye(worker: Worker) -> None:  # one replica takes longer to stop
        if worker.worker_id.endswith("-r2"):
            await asyncio.sleep(0.5)
        await goodbye(worker)

    monkeypatch.setattr(Worker, "stopping", one_slow_goodbye)
    serving = asyncio.create_task(serve(settings, LinearApp()))

    async def all_consume() -> bool:
        info = await broker.queue_info(names.task_queue("cpu"))
        return info is not None and info.consumers == 3

    await until(all_consume, "three replicas consuming")
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(serving, WAIT)
    replicas = [t for t in asyncio.all_tasks() if "_serve_one" in repr(t.get_coro())]
    assert replicas == [], replicas
    info = await broker.queue_info(names.task_queue("cpu"))
    assert info is not None and info.consumers == 0


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
