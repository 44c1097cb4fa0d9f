"""The worker on the in-memory transport: each decision carried out by ``Worker.step``, and the
worker as a ``Service`` on the shared runtime (invalid tasks, failing training, heartbeat,
goodbye, a lost link, its outbox). No RabbitMQ: the whole file runs in a few seconds; the
real broker's part (a link cut through a TCP proxy, real redelivery) is in
tests/test_worker_link.py."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from broker_config.names import REASON_HEADER, Names
from shared.codec import decode, encode
from shared.errors import BrokerError
from shared.messages import Hello
from shared.signing import Keyring, Role, Signer
from shared.transport import Delivery
from shared.transport.memory import MemoryBroker, MemoryTransport
from tests.support.messages import make_task
from tests.support.rigs import worker_rig
from tests.support.tiny import LinearApp
from tests.support.waiting import WAIT, events, until
from worker.config import WorkerConfig
from worker.decision import Decision
from worker.service import Worker
from worker.training import COST_METRICS

JOB = "job1"

# -- each decision, carried out by Worker.step ---------------------------------------------------


async def test_train_sends_one_update_then_acks(mem: MemoryTransport, tmp_path: Path) -> None:
    async with worker_rig(mem, tmp_path) as r:
        task, body = r.task()
        await r.send(body)
        assert await r.worker.step(task, await r.take()) is Decision.TRAIN
        update, _ = await r.next_update()  # its message id is the task id: the aggregator deduplicates on it
        assert update.task_id == task.task_id and update.worker_id == "w1" and update.num_samples == 48
        await r.updates.expect_none()
        await r.assert_task_settled()
        assert r.app.trained == 1 and r.worker.completed == 1
        assert r.outbox is not None and len(r.outbox) == 0  # confirmed: gone from the outbox
        await r.dead.expect_none()


async def test_a_task_whose_update_was_confirmed_is_acked_without_training(
    mem: MemoryTransport, tmp_path: Path
) -> None:
    async with worker_rig(mem, tmp_path) as r:
        task, body = r.task()
        await r.send(body)
        await r.worker.step(task, await r.take())
        await r.next_update()
        await r.send(body)  # its redelivery, after an ack lost with the link
        assert await r.worker.step(task, await r.take()) is Decision.ALREADY_SENT
        await r.assert_task_settled()
        await r.updates.expect_none()  # not sent again
        assert r.app.trained == 1 and r.worker.completed == 1 and r.worker.received == 2


async def test_an_update_waiting_in_the_outbox_is_sent_instead_of_training(
    mem: MemoryTransport, tmp_path: Path
) -> None:
    """A worker killed after training: its task comes back, and the update in its outbox is what
    goes out, not a new training's."""
    with capture_logs() as logs:
        async with worker_rig(mem, tmp_path, app=LinearApp(fail=True)) as r:
            task, body = r.task()
            waiting = r.update(task.task_id)
            assert r.outbox is not None
            r.outbox.put(task.task_id, waiting)  # trained and written, then the process died
            await r.send(body)  # the task's redelivery
            assert await r.worker.step(task, await r.take()) is Decision.IN_OUTBOX
            update, sent = await r.next_update()
            assert sent == waiting and update.task_id == task.task_id  # the exact bytes
            await r.updates.expect_none()
            await r.assert_task_settled()
            assert len(r.outbox) == 0
            assert events(logs, "task_in_outbox", task=task.task_id)
            assert r.app.trained == 0 and r.worker.completed == 0 and r.worker.flushed == 0


async def test_an_expired_task_is_dead_lettered(mem: MemoryTransport, tmp_path: Path) -> None:
    async with worker_rig(mem, tmp_path) as r:
        task, body = r.task(deadline=time.time() - 1)
        await r.send(body)
        assert await r.worker.step(task, await r.take()) is Decision.EXPIRED
        await r.dead.expect(body, "expired", r.task_queue)
        await r.assert_task_settled()
        assert r.app.trained == 0 and r.worker.expired == 1
        await r.updates.expect_none()


async def test_a_task_no_worker_can_carry_out_is_dead_lettered_without_training(
    mem: MemoryTransport, tmp_path: Path
) -> None:
    async with worker_rig(mem, tmp_path) as r:
        task, _ = r.task()
        impossible = dataclasses.replace(task, quant="fp4")
        body = encode(impossible, r.coordinator)
        await r.send(body)
        assert await r.worker.step(impossible, await r.take()) is Decision.BAD_TASK
        await r.dead.expect(body, "bad_task", r.task_queue)
        await r.assert_task_settled()
        assert r.app.trained == 0
        await r.updates.expect_none()


async def test_a_task_id_the_outbox_cannot_name_is_dead_lettered(mem: MemoryTransport, tmp_path: Path) -> None:
    async with worker_rig(mem, tmp_path) as r:
        task, body = r.task("x" * 101)
        await r.send(body)
        assert await r.worker.step(task, await r.take()) is Decision.BAD_TASK_ID
        await r.dead.expect(body, "bad_task_id", r.task_queue)
        await r.assert_task_settled()
        assert r.app.trained == 0


async def test_without_an_outbox_any_task_id_is_trained(mem: MemoryTransport, tmp_path: Path) -> None:
    async with worker_rig(mem, tmp_path, outbox=False) as r:
        task, body = r.task("x" * 101)
        await r.send(body)
        assert await r.worker.step(task, await r.take()) is Decision.TRAIN
        update, _ = await r.next_update()
        assert update.task_id == task.task_id


async def test_an_expired_task_whose_update_waits_sends_it(mem: MemoryTransport, tmp_path: Path) -> None:
    """Trained before its deadline, sent after it: the work is done, it is not thrown away."""
    async with worker_rig(mem, tmp_path) as r:
        task, body = r.task(deadline=time.time() - 1)
        assert r.outbox is not None
        r.outbox.put(task.task_id, r.update(task.task_id))
        await r.send(body)
        assert await r.worker.step(task, await r.take()) is Decision.IN_OUTBOX
        await r.next_update()
        await r.dead.expect_none()


# -- the worker on the runtime ------------------------------------------------------------------


async def test_the_runtime_declares_its_queues_and_it_consumes_with_prefetch_1(names: Names) -> None:
    broker = MemoryBroker()  # nothing declared on it yet
    transport = await MemoryTransport(broker, names, "worker").connect()
    worker = Worker(
        WorkerConfig("w1", ("cpu", "gpu"), heartbeat_interval=60.0, warm=False),
        transport=transport,
        app=LinearApp(),
        data=None,
        signer=Signer.generate(),
        coordinator_keys=Keyring(),
    )
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        # its capability topology is declared (by the runtime) before it consumes, prefetch 1
        await until(lambda: all(broker.queues.get(names.task_queue(c)) for c in ("cpu", "gpu")), "queues")
        for cap in ("cpu", "gpu"):
            q = broker.queue(names.task_queue(cap))
            await until(lambda q=q: q.consumers, f"a consumer on {cap}")  # type: ignore[misc]
            assert [c.prefetch for c in q.consumers] == [1]
            assert q.arguments["x-delivery-limit"] == 5
        # and the exchange its hellos go to, so a worker alone on the broker stays up
        assert broker.exchanges[names.workers_exchange] == "topic"
        assert not running.done()
    finally:
        stop.set()
        await asyncio.wait_for(running, WAIT)
        await transport.close()


async def test_a_task_signed_by_another_key_is_dead_lettered_by_the_runtime(
    mem: MemoryTransport, tmp_path: Path
) -> None:
    async with worker_rig(mem, tmp_path, start=True) as r:
        _, body = r.task(signer=Signer.generate())
        await r.send(body)
        await r.dead.expect(body, "unknown_signer", r.task_queue)
        await r.dead.expect_none()  # not given back and dead-lettered again
        assert r.worker.received == 0 and r.app.trained == 0
        await r.stop()
        await r.assert_task_settled()


async def test_a_task_of_a_job_the_worker_does_not_serve_is_dead_lettered(
    mem: MemoryTransport, tmp_path: Path
) -> None:
    async with worker_rig(mem, tmp_path, start=True) as r:
        task, body = r.task()
        other = make_task(r.coordinator, job_id="job2")[1]  # on this job's queue, for another job
        await r.send(other)
        await r.dead.expect(other, "wrong_job", r.task_queue)
        await r.send(body)
        update, _ = await r.next_update()
        assert update.task_id == task.task_id and r.app.trained == 1


async def test_a_failing_training_gives_the_task_back_until_its_delivery_limit(
    mem: MemoryTransport, tmp_path: Path
) -> None:
    async with worker_rig(mem, tmp_path, app=LinearApp(fail=True), start=True) as r:
        _, body = r.task()
        await r.send(body)
        held = await r.dead.next()
        # the broker's verdict at the delivery limit, not the runtime's handler_error
        assert held.body == body and held.headers["x-first-death-reason"] == "delivery_limit"
        assert REASON_HEADER not in held.headers
        assert r.app.trained == 6  # the first delivery and five redeliveries
        assert r.worker.redelivered == 5 and r.worker.completed == 0
        r.check_alive()  # a failing task never takes the worker down


async def test_hellos_up_then_down_on_stop(mem: MemoryTransport, tmp_path: Path) -> None:
    async with worker_rig(mem, tmp_path, heartbeat_interval=0.05) as r:
        hellos: list[Hello] = []
        ring = Keyring()
        ring.add(r.signer.public, Role.WORKER, worker_id="w1")

        async def on_hello(d: Delivery) -> None:
            await d.ack()
            hello, _ = decode(d.body, ring, Hello)
            assert isinstance(hello, Hello)
            hellos.append(hello)

        await r.client.subscribe(r.names.workers_exchange, (r.names.hello_key,), on_hello)
        await r.start()
        await until(lambda: len(hellos) >= 3, "a few heartbeats")
        await r.stop()
        await asyncio.sleep(0.1)  # no heartbeat after the goodbye
        states = [h.state for h in hellos]
        assert states[-1] == "down" and set(states[:-1]) == {"up"}
        assert hellos[0].worker_id == "w1" and hellos[0].capabilities == ("cpu",)


async def test_a_heartbeat_that_cannot_be_published_stops_the_worker(mem: MemoryTransport, tmp_path: Path) -> None:
    async with worker_rig(mem, tmp_path, heartbeat_interval=0.05) as r:
        r.transport.publish_retry_seconds = 0.2
        running = await r.start()
        assert isinstance(r.transport, MemoryTransport)
        mem.broker.drop(r.transport)  # the link is lost and does not come back
        with pytest.raises(BrokerError, match="still down"):
            await asyncio.wait_for(running, WAIT)
        r.running = None  # its end is what this test expects


async def test_a_lost_link_while_training_sends_the_update_once(mem: MemoryTransport, tmp_path: Path) -> None:
    """The update goes out after the reconnect (the publish waits for the link); the task, given
    back with the lost link, comes back and is acked as already sent, without training again."""
    with capture_logs() as logs:
        async with worker_rig(mem, tmp_path, start=True) as r:
            transport = r.transport
            assert isinstance(transport, MemoryTransport)
            loop = asyncio.get_running_loop()
            # the link goes after training, before the update's publish (the loop runs this first)
            r.app.then = lambda: loop.call_soon_threadsafe(mem.broker.drop, transport)
            task, body = r.task()
            await r.send(body)
            await until(lambda: transport.state == "down", "the lost link")
            await until(lambda: r.outbox is not None and len(r.outbox) == 1, "the update in the outbox")
            await r.updates.expect_none(0.1)  # nothing got through
            await transport.reconnect()
            await until(lambda: events(logs, "task_already_sent"), "the redelivered task")
            update, _ = await r.next_update()
            assert update.task_id == task.task_id
            await r.updates.expect_none()
            assert r.app.trained == 1 and r.worker.redelivered == 1
            assert events(logs, "reconnected")
            await until(lambda: r.outbox is not None and len(r.outbox) == 0, "an empty outbox")
            await r.assert_task_settled()


async def test_an_outbox_entry_the_broker_refuses_stays_and_holds_up_nothing(
    mem: MemoryTransport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries left by an earlier run go out at start; one the broker refuses stays in the outbox
    for the next flush, the others are sent, and the worker keeps running."""
    async with worker_rig(mem, tmp_path) as r:
        assert r.outbox is not None
        refused, good = uuid.uuid4().hex, uuid.uuid4().hex
        r.outbox.put(refused, r.update(refused))
        r.outbox.put(good, r.update(good))
        real_publish = r.transport.publish

        async def publish(exchange: str, routing_key: str, body: bytes, **options: Any) -> None:
            if options.get("message_id") == refused:
                raise BrokerError("the broker refused it")
            await real_publish(exchange, routing_key, body, **options)

        monkeypatch.setattr(r.transport, "publish", publish)
        await r.start()
        await until(lambda: len(r.outbox or ()) == 1, "the good entry sent")
        update, _ = await r.next_update()
        assert update.task_id == good
        await r.updates.expect_none()
        assert r.outbox.get(refused) is not None
        r.check_alive()


async def test_the_outbox_is_flushed_when_a_worker_starts(mem: MemoryTransport, tmp_path: Path) -> None:
    """Entries a killed worker left go out, oldest first, each once, as they were written."""
    with capture_logs() as logs:
        async with worker_rig(mem, tmp_path) as r:
            assert r.outbox is not None
            left = [uuid.uuid4().hex for _ in range(2)]
            bodies = [r.update(tid) for tid in left]
            for tid, body in zip(left, bodies, strict=True):
                r.outbox.put(tid, body)
            await r.updates.expect_none()  # entries on disk go nowhere by themselves
            await r.start()
            got = await r.updates.take(2)
            assert [d.body for d in got] == bodies  # the exact bytes
            assert [d.message_id for d in got] == left
            await until(lambda: r.worker.flushed == 2, "both entries flushed")
            assert len(r.outbox) == 0
            assert [e["task"] for e in events(logs, "outbox_flushed")] == left



async def test_a_worker_with_its_own_privacy_floor_noises_a_task_that_asks_for_none(
    mem: MemoryTransport, tmp_path: Path
) -> None:
    """--dp-floor-clip/--dp-floor-noise: a coordinator that asks for no privacy (or less) cannot
    make this worker send an exact update; the update carries no un-noised metrics either."""
    async with worker_rig(mem, tmp_path, dp_floor=(0.01, 2.0)) as r:
        task, body = r.task()
        assert task.dp_clip == task.dp_noise == 0.0
        await r.send(body)
        assert await r.worker.step(task, await r.take()) is Decision.TRAIN
        update, _ = await r.next_update()
        assert set(update.metrics) == COST_METRICS  # no loss, no norm: they are the data's
        await r.assert_task_settled()
