"""The worker on the in-memory transport: each decision carried out by ``Worker.step``, and the
worker as a ``Service`` on the shared runtime (invalid tasks, failing training, heartbeat,
goodbye, a lost link). No RabbitMQ: the whole file runs in a few seconds."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from broker_config.names import REASON_HEADER, Names
from broker_config.topology import topology
from shared.app import PartitionSpec, TrainResult
from shared.codec import decode, encode
from shared.errors import BrokerError
from shared.messages import Hello, Task, TrainConfig, Update
from shared.signing import Keyring, Signer
from shared.store import model_key
from shared.tensors import FlatModel
from shared.transport import Delivery, Held
from shared.transport.memory import MemoryBroker, MemoryTransport
from tests.support.tiny import WAIT, LinearApp, events, until
from worker.config import WorkerConfig
from worker.decision import Decision
from worker.outbox import Outbox
from worker.service import Worker

JOB = "job1"


class CountingApp(LinearApp):
    """Counts its trainings; ``fail`` makes every one of them raise; ``then`` runs after each
    (in the training thread)."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.trained = 0
        self.then: Callable[[], object] = lambda: None

    def train(self, model: Any, data: Any, config: TrainConfig, seed: int) -> TrainResult:
        self.trained += 1
        if self.fail:
            raise RuntimeError("this app cannot train")
        result = super().train(model, data, config, seed)
        self.then()
        return result


@dataclass
class Rig:
    broker: MemoryBroker
    names: Names
    client: MemoryTransport  # the test's own connection: tasks in, updates and dead letters out
    transport: MemoryTransport  # the worker's
    worker: Worker
    app: CountingApp
    coordinator: Signer
    signer: Signer
    outbox: Outbox | None
    taken: asyncio.Queue[Delivery] = field(default_factory=asyncio.Queue)
    taking: bool = False

    @property
    def task_queue(self) -> str:
        return self.names.task_queue("cpu")

    def task(
        self, task_id: str | None = None, deadline: float | None = None, signer: Signer | None = None
    ) -> tuple[Task, bytes]:
        blob = FlatModel.from_state_dict(LinearApp().build_model(0).state_dict()).to_bytes()
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
            deadline=time.time() + 600 if deadline is None else deadline,
            issued_at=time.time(),
            model=blob,
        )
        return task, encode(task, signer or self.coordinator)

    def update(self, task_id: str) -> bytes:
        """A signed update of this worker's, as an earlier run would have left in its outbox."""
        update = Update(
            task_id, JOB, "w1", 0, 48, "none", 256, {"train_loss": 1.0}, time.time(), delta=b"\0" * 8
        )
        return encode(update, self.signer)

    async def send(self, body: bytes) -> None:
        await self.client.publish(self.names.tasks_exchange, self.names.task_key("cpu"), body)

    async def take(self) -> Delivery:
        """The next task delivery, as the worker's runtime would hand it over (for ``step``)."""
        if not self.taking:
            await self.client.consume(self.task_queue, self._hold, prefetch=1)
            self.taking = True
        return await asyncio.wait_for(self.taken.get(), WAIT)

    async def _hold(self, delivery: Delivery) -> None:
        await self.taken.put(delivery)

    async def drain(self, queue: str) -> list[Held]:
        """Every message now in ``queue``, taken off it."""
        out = []
        async with self.client.queue_pass(queue) as p:
            while (held := await p.take()) is not None:
                assert await p.ack(held) is None
                out.append(held)
        return out

    async def updates(self) -> list[tuple[Update, Held]]:
        ring = Keyring()
        ring.add(self.signer.public)
        out = []
        for held in await self.drain(self.names.updates_queue):
            update, _ = decode(held.body, ring, Update)
            assert isinstance(update, Update)
            out.append((update, held))
        return out

    async def dead(self) -> list[tuple[str, bytes]]:
        return [(str(h.headers.get(REASON_HEADER)), h.body) for h in await self.drain(self.names.dead_queue)]

    async def assert_settled(self) -> None:
        """The task queue is empty and nothing came back to the test's consumer: the task was acked
        or dead-lettered, not given back."""
        info = await self.client.queue_info(self.task_queue)
        assert info is not None and info.messages == 0
        assert self.taken.empty()


@contextlib.asynccontextmanager
async def rig(
    tmp_path: Path, *, app: CountingApp | None = None, outbox: bool = True, **config: Any
) -> AsyncIterator[Rig]:
    broker = MemoryBroker()
    names = Names(f"mem{uuid.uuid4().hex[:8]}", JOB)
    client = await MemoryTransport(broker, names, "test").connect()
    await client.declare(topology(names))
    transport = await MemoryTransport(broker, names, "worker-w1").connect()
    coordinator, signer = Signer.generate(), Signer.generate()
    pinned = Keyring()
    pinned.add(coordinator.public)
    app = app or CountingApp()
    box = Outbox(tmp_path / "outbox") if outbox else None
    worker = Worker(
        WorkerConfig("w1", ("cpu",), **{"heartbeat_interval": 60.0, "warm": False, **config}),
        transport=transport,
        app=app,
        data=app.load_partition(PartitionSpec(0, 1)),
        signer=signer,
        coordinator_keys=pinned,
        outbox=box,
    )
    try:
        yield Rig(broker, names, client, transport, worker, app, coordinator, signer, box)
    finally:
        await transport.close()
        await client.close()


@contextlib.contextmanager
def logged() -> Iterator[list[dict[str, Any]]]:
    with capture_logs() as logs:
        yield logs  # type: ignore[misc]


# -- each decision, carried out by Worker.step ---------------------------------------------------


async def test_train_sends_one_update_then_acks(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        task, body = r.task()
        await r.send(body)
        assert await r.worker.step(task, await r.take()) is Decision.TRAIN
        [(update, held)] = await r.updates()
        assert update.task_id == task.task_id and update.worker_id == "w1" and update.num_samples == 48
        assert held.message_id == task.task_id  # the aggregator deduplicates on it
        await r.assert_settled()
        assert r.app.trained == 1 and r.worker.completed == 1
        assert r.outbox is not None and len(r.outbox) == 0  # confirmed: gone from the outbox
        assert await r.dead() == []


async def test_a_task_whose_update_was_confirmed_is_acked_without_training(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        task, body = r.task()
        await r.send(body)
        await r.worker.step(task, await r.take())
        await r.updates()
        await r.send(body)  # its redelivery, after an ack lost with the link
        assert await r.worker.step(task, await r.take()) is Decision.ALREADY_SENT
        await r.assert_settled()
        assert await r.updates() == []  # not sent again
        assert r.app.trained == 1 and r.worker.completed == 1 and r.worker.received == 2


async def test_an_update_waiting_in_the_outbox_is_sent_instead_of_training(tmp_path: Path) -> None:
    async with rig(tmp_path, app=CountingApp(fail=True)) as r:
        task, body = r.task()
        waiting = r.update(task.task_id)
        assert r.outbox is not None
        r.outbox.put(task.task_id, waiting)  # trained and written, then the process died
        await r.send(body)
        assert await r.worker.step(task, await r.take()) is Decision.IN_OUTBOX
        [(_, held)] = await r.updates()
        assert held.body == waiting and held.message_id == task.task_id  # the exact bytes
        await r.assert_settled()
        assert len(r.outbox) == 0
        assert r.app.trained == 0 and r.worker.completed == 0


async def test_an_expired_task_is_dead_lettered(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        task, body = r.task(deadline=time.time() - 1)
        await r.send(body)
        assert await r.worker.step(task, await r.take()) is Decision.EXPIRED
        assert await r.dead() == [("expired", body)]
        await r.assert_settled()
        assert r.app.trained == 0 and r.worker.expired == 1
        assert await r.updates() == []


async def test_a_task_id_the_outbox_cannot_name_is_dead_lettered(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        task, body = r.task("x" * 101)
        await r.send(body)
        assert await r.worker.step(task, await r.take()) is Decision.BAD_TASK_ID
        assert await r.dead() == [("bad_task_id", body)]
        await r.assert_settled()
        assert r.app.trained == 0


async def test_without_an_outbox_any_task_id_is_trained(tmp_path: Path) -> None:
    async with rig(tmp_path, outbox=False) as r:
        task, body = r.task("x" * 101)
        await r.send(body)
        assert await r.worker.step(task, await r.take()) is Decision.TRAIN
        assert [u.task_id for u, _ in await r.updates()] == [task.task_id]


async def test_an_expired_task_whose_update_waits_sends_it(tmp_path: Path) -> None:
    """Trained before its deadline, sent after it: the work is done, it is not thrown away."""
    async with rig(tmp_path) as r:
        task, body = r.task(deadline=time.time() - 1)
        assert r.outbox is not None
        r.outbox.put(task.task_id, r.update(task.task_id))
        await r.send(body)
        assert await r.worker.step(task, await r.take()) is Decision.IN_OUTBOX
        assert len(await r.updates()) == 1 and await r.dead() == []


# -- the worker on the runtime ------------------------------------------------------------------


async def run(r: Rig, stop: asyncio.Event) -> asyncio.Task[None]:
    running = asyncio.create_task(r.worker.run(stop), name="worker")
    await until(lambda: r.broker.queue(r.task_queue).consumers or running.done(), "the worker to consume")
    return running


async def test_the_runtime_declares_its_queues_and_it_consumes_with_prefetch_1(tmp_path: Path) -> None:
    broker = MemoryBroker()
    names = Names(f"mem{uuid.uuid4().hex[:8]}", JOB)
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


async def test_a_task_signed_by_another_key_is_dead_lettered_by_the_runtime(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        stop = asyncio.Event()
        running = await run(r, stop)
        _, body = r.task(signer=Signer.generate())
        await r.send(body)
        await until(lambda: r.broker.queue(r.names.dead_queue).ready, "the dead letter")
        assert await r.dead() == [("unknown_signer", body)]
        assert r.worker.received == 0 and r.app.trained == 0 and not running.done()
        stop.set()
        await asyncio.wait_for(running, WAIT)


async def test_a_failing_training_gives_the_task_back_until_its_delivery_limit(tmp_path: Path) -> None:
    async with rig(tmp_path, app=CountingApp(fail=True)) as r:
        stop = asyncio.Event()
        running = await run(r, stop)
        _, body = r.task()
        await r.send(body)
        await until(lambda: r.broker.queue(r.names.dead_queue).ready, "the dead letter")
        [held] = await r.drain(r.names.dead_queue)
        # the broker's verdict at the delivery limit, not the runtime's handler_error
        assert held.body == body and held.headers["x-first-death-reason"] == "delivery_limit"
        assert REASON_HEADER not in held.headers
        assert r.app.trained == 6  # the first delivery and five redeliveries
        assert r.worker.redelivered == 5 and r.worker.completed == 0
        assert not running.done()  # a failing task never takes the worker down
        stop.set()
        await asyncio.wait_for(running, WAIT)


async def test_hellos_up_then_down_on_stop(tmp_path: Path) -> None:
    async with rig(tmp_path, heartbeat_interval=0.05) as r:
        hellos: list[Hello] = []
        ring = Keyring()
        ring.add(r.signer.public)

        async def on_hello(d: Delivery) -> None:
            await d.ack()
            hello, _ = decode(d.body, ring, Hello)
            assert isinstance(hello, Hello)
            hellos.append(hello)

        await r.client.subscribe(r.names.workers_exchange, (r.names.hello_key,), on_hello)
        stop = asyncio.Event()
        running = await run(r, stop)
        await until(lambda: len(hellos) >= 3, "a few heartbeats")
        stop.set()
        await asyncio.wait_for(running, WAIT)
        await asyncio.sleep(0.1)  # no heartbeat after the goodbye
        states = [h.state for h in hellos]
        assert states[-1] == "down" and set(states[:-1]) == {"up"}
        assert hellos[0].worker_id == "w1" and hellos[0].capabilities == ("cpu",)


async def test_a_heartbeat_that_cannot_be_published_stops_the_worker(tmp_path: Path) -> None:
    async with rig(tmp_path, heartbeat_interval=0.05) as r:
        r.transport.publish_retry_seconds = 0.2
        stop = asyncio.Event()
        running = await run(r, stop)
        r.broker.drop(r.transport)  # the link is lost and does not come back
        with pytest.raises(BrokerError, match="still down"):
            await asyncio.wait_for(running, WAIT)


async def test_a_lost_link_while_training_sends_the_update_once(tmp_path: Path) -> None:
    """The update goes out after the reconnect (the publish waits for the link); the task, given
    back with the lost link, comes back and is acked as already sent, without training again."""
    with logged() as logs:
        async with rig(tmp_path) as r:
            stop = asyncio.Event()
            running = await run(r, stop)
            loop = asyncio.get_running_loop()
            # the link goes after training, before the update's publish (the loop runs this first)
            r.app.then = lambda: loop.call_soon_threadsafe(r.broker.drop, r.transport)
            task, body = r.task()
            await r.send(body)
            await until(lambda: r.transport.state == "down", "the lost link")
            await until(lambda: r.outbox is not None and len(r.outbox) == 1, "the update in the outbox")
            await asyncio.sleep(0.1)
            assert r.broker.queue(r.names.updates_queue).ready == deque()  # nothing got through
            await r.transport.reconnect()
            await until(lambda: events(logs, "task_already_sent"), "the redelivered task")
            updates = await r.updates()
            assert [u.task_id for u, _ in updates] == [task.task_id]
            assert r.app.trained == 1 and r.worker.redelivered == 1
            assert events(logs, "reconnected")
            await until(lambda: r.outbox is not None and len(r.outbox) == 0, "an empty outbox")
            info = await r.client.queue_info(r.task_queue)
            assert info is not None and info.messages == 0
            stop.set()
            await asyncio.wait_for(running, WAIT)


async def test_an_outbox_entry_the_broker_refuses_stays_and_holds_up_nothing(tmp_path: Path) -> None:
    """Entries left by an earlier run go out at start; one the broker refuses stays in the outbox
    for the next flush, the others are sent, and the worker keeps running."""
    async with rig(tmp_path) as r:
        assert r.outbox is not None
        refused, good = uuid.uuid4().hex, uuid.uuid4().hex
        r.outbox.put(refused, r.update(refused))
        r.outbox.put(good, r.update(good))
        real_publish = r.transport.publish

        async def publish(exchange: str, routing_key: str, body: bytes, **options: Any) -> None:
            if options.get("message_id") == refused:
                raise BrokerError("the broker refused it")
            await real_publish(exchange, routing_key, body, **options)

        r.transport.publish = publish  # type: ignore[method-assign]
        stop = asyncio.Event()
        running = await run(r, stop)
        await until(lambda: len(r.outbox or ()) == 1, "the good entry sent")
        assert [u.task_id for u, _ in await r.updates()] == [good]
        assert r.outbox.get(refused) is not None
        assert not running.done()
        stop.set()
        await asyncio.wait_for(running, WAIT)
