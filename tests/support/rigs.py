"""Services running in the test's own process, over any transport (the real RabbitMQ or the
in-memory broker): an aggregator rig, a worker rig and a coordinator rig, each with the test's
own connection beside the service's to send what the service consumes and collect what it sends."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from aggregator.config import AggregatorConfig
from aggregator.service import Aggregator
from broker_config.names import Names
from coordinator.config import CoordinatorConfig
from coordinator.service import Coordinator
from shared.aggregation import Clip, Policy
from shared.app import PartitionSpec
from shared.codec import decode, encode
from shared.ledger import JsonLines, read_lines
from shared.messages import Hello, Receipt, Receipts, Round, Task, Update
from shared.signing import Keyring, Role, Signer
from shared.store import LocalStore, ModelStore, open_store
from shared.tensors import FlatModel
from shared.transport import Delivery, Transport
from tests.support.broker import Inbox, assert_settled, connect_like
from tests.support.messages import (
    MAKER,
    OWNER,
    make_task,
    make_update,
    save_v0,
    save_version,
    tiny_model,
    token_of,
    trust,
)
from tests.support.tiny import LinearApp
from tests.support.waiting import WAIT, events, until
from worker.config import WorkerConfig
from worker.outbox import Outbox
from worker.service import Worker

# -- the aggregator ------------------------------------------------------------------------------


@dataclass
class AggregatorRig:
    client: Transport  # the test's connection: publishes updates and rounds, reads dead letters
    service: Transport  # the aggregator's own connection
    aggregator: Aggregator
    store: ModelStore
    model: FlatModel  # version 0
    worker: Signer  # signs the updates (trusted unless the rig says otherwise)
    coordinator: Signer  # signs the rounds
    ledger_path: Path
    v0_sha: str
    dead: Inbox  # the namespace's dead-letter queue
    task: asyncio.Task[None] | None = None
    checked: Counter[str] = field(default_factory=Counter)

    @property
    def names(self) -> Names:
        return self.client.names

    def update(self, model: FlatModel | None = None, **fields: Any) -> tuple[str, bytes]:
        """A signed update for this job's model (see ``tests.support.messages.an_update``),
        answering a task the rig's coordinator issued on its base version (unless ``task`` says
        otherwise: ``b""`` for none)."""
        fields = {"job_id": self.store.job_id, "task_id": uuid.uuid4().hex, **fields}
        if "task" not in fields:
            fields["task"] = self.token(fields["task_id"], fields.get("base_version", 0))
        return make_update(self.worker, model or self.model, **fields)

    def token(self, task_id: str, base_version: int = 0, **task: Any) -> bytes:
        """The token of a task this job's coordinator issued (``task``: ``make_task`` fields)."""
        assert self.aggregator.incarnation, "the aggregator has not loaded its job yet"
        _, raw = make_task(
            self.coordinator,
            task_id=task_id,
            job_id=self.store.job_id,
            base_version=base_version,
            incarnation=self.aggregator.incarnation,
            **task,
        )
        return token_of(raw)

    async def send(self, body: bytes) -> None:
        await self.client.publish(self.names.results_exchange, self.names.results_key, body)

    async def send_round(
        self, version: int, number: int, size: int, *, close: bool = False, signer: Signer | None = None
    ) -> bytes:
        """Open (or ``close``) sync round ``number`` of ``size`` tasks on ``version``, as the coordinator does."""
        message = Round(self.store.job_id, version, number, size, time.time() + 60, close)
        body = encode(message, signer or self.coordinator)
        await self.send(body)
        return body

    def ledger(self) -> list[dict[str, Any]]:
        return list(read_lines(self.ledger_path))

    async def ledger_entry(self, task_id: str, fate: str, count: int = 1) -> dict[str, Any]:
        """The ``count``-th ledger record of ``task_id`` with ``fate``, once it is written."""

        def find() -> list[dict[str, Any]]:
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

    async def held(self, count: int) -> None:
        """Wait until the aggregator holds ``count`` updates in its buffer."""
        await until(lambda: len(self.aggregator.held) >= count, f"{count} updates held")

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
        """Stop the aggregator and close its connection: every update must have been acked. A version
        is in the store before its updates are acked (under the aggregator's lock): let that finish."""
        self.check_alive()
        await until(lambda: not self.aggregator._lock.locked(), "the aggregator to finish what it holds the lock for")
        await self.stop()
        await assert_settled(self.client, self.names.updates_queue)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self.task, WAIT)
        await self.service.close()

    async def failed(self) -> BaseException:
        """The aggregator stops by itself with an error (returned); its connection is then closed."""
        assert self.task is not None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self.task), WAIT)
        assert self.task.done() and not self.task.cancelled(), "the aggregator is still running"
        error = self.task.exception()
        assert error is not None, "the aggregator stopped without an error"
        self.task = None
        await self.service.close()
        return error

    def check_alive(self) -> None:
        """The aggregator is still running (or was stopped by the test)."""
        if self.task is not None and self.task.done() and not self.task.cancelled():
            raise AssertionError(f"the aggregator stopped: {self.task.exception()!r}")


async def held_updates_survive_a_lost_link(rig: AggregatorRig, lose_link: Callable[[], Awaitable[None]]) -> None:
    """With K = 3, the aggregator holds two updates when ``lose_link`` cuts its connection (and
    it comes back): the broker gives them again, redelivered; each counts once, the new
    deliveries are the ones acked, and nothing is dead-lettered."""
    assert rig.aggregator.policy.k == 3
    sent = [rig.update() for _ in range(3)]
    for _, body in sent[:2]:
        await rig.send(body)
    await rig.held(2)
    await lose_link()
    await until(
        lambda: len(rig.aggregator.held) == 2 and all(len(h.deliveries) == 2 for h in rig.aggregator.held),
        "the redeliveries",
    )
    await rig.send(sent[2][1])
    await rig.wait_version(1)
    assert (await rig.store.manifest(1)).update_ids == tuple(tid for tid, _ in sent)
    applied = [r for r in rig.ledger() if r["fate"] == "applied"]
    assert [(r["task_id"], r["redelivered"]) for r in applied] == [
        (sent[0][0], True),
        (sent[1][0], True),
        (sent[2][0], False),
    ]
    await rig.stop_and_assert_all_acked()
    await rig.dead.expect_none()


@contextlib.asynccontextmanager
async def aggregator_rig(
    client: Transport,
    names: Names,
    tmp_path: Path,
    *,
    k: int = 2,
    max_staleness: int = 2,
    mode: str = "async",
    trust_worker: bool = True,
    service: Transport | None = None,
    policy: Policy | None = None,
) -> AsyncIterator[AggregatorRig]:
    """An ``Aggregator`` of job ``names.job`` on ``service`` (by default a connection of its own
    like ``client``), with a local store holding version 0 of ``tiny_model()``; rounds count
    only when the rig's coordinator signs them. ``policy`` replaces the one the other arguments make."""
    assert client.names == names
    agg_signer, worker, coordinator = Signer.generate(), Signer.generate(), OWNER
    ring = trust(workers={"w1": worker} if trust_worker else {}, aggregators=(agg_signer, MAKER))
    store = ModelStore(LocalStore(tmp_path / "store"), job_id=names.job, trust=ring)
    model = tiny_model()
    v0_sha = await save_v0(store, model)
    ledger_path = tmp_path / "ledger.jsonl"
    ledger = JsonLines(ledger_path)
    service = service or await connect_like(client, "test-aggregator")
    aggregator = Aggregator(
        AggregatorConfig(policy or Policy(mode=mode, k=k, max_staleness=max_staleness, clip=Clip("off"))),
        transport=service,
        store=store,
        signer=agg_signer,
        keyring=ring,
        ledger=ledger,
    )
    await asyncio.wait_for(aggregator.load(wait=5), WAIT)
    dead = await Inbox.on(client, names.dead_queue)
    rig = AggregatorRig(
        client, service, aggregator, store, model, worker, coordinator, ledger_path, v0_sha, dead
    )
    rig.task = asyncio.create_task(aggregator.run(), name="aggregator")
    try:
        yield rig
        rig.check_alive()
    finally:
        with contextlib.suppress(Exception):
            await rig.stop()
        ledger.close()


# -- the worker ----------------------------------------------------------------------------------


@dataclass
class WorkerRig:
    client: Transport  # the test's connection: tasks in, updates and dead letters out
    transport: Transport  # the worker's
    worker: Worker
    app: LinearApp
    coordinator: Signer  # signs the tasks; the worker trusts it
    signer: Signer  # the worker's key
    outbox: Outbox | None
    updates: Inbox  # the job's updates queue
    dead: Inbox  # the namespace's dead-letter queue
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    running: asyncio.Task[None] | None = None
    taken: asyncio.Queue[Delivery] | None = None  # task deliveries the test took (``take``)

    @property
    def names(self) -> Names:
        return self.client.names

    @property
    def task_queue(self) -> str:
        return self.names.task_queue("cpu")

    def task(
        self, task_id: str | None = None, deadline: float | None = None, signer: Signer | None = None
    ) -> tuple[Task, bytes]:
        """A task of this job, signed by the coordinator (or ``signer``)."""
        return make_task(signer or self.coordinator, task_id=task_id, job_id=self.names.job, deadline=deadline)

    def update(self, task_id: str) -> bytes:
        """A signed update of this worker's, as an earlier run would have left in its outbox."""
        return make_update(
            self.signer, task_id=task_id, job_id=self.names.job, num_samples=48, quant="none", delta=b"\0" * 8
        )[1]

    async def send(self, body: bytes) -> None:
        await self.client.publish(self.names.tasks_exchange, self.names.task_key("cpu"), body)

    async def send_task(self, task_id: str | None = None) -> Task:
        task, body = self.task(task_id)
        await self.send(body)
        return task

    async def take(self) -> Delivery:
        """The next task delivery, unsettled, as the worker's runtime would hand it over (for
        ``Worker.step``, with the worker not running)."""
        if self.taken is None:
            taken = self.taken = asyncio.Queue()

            async def hold(delivery: Delivery) -> None:
                await taken.put(delivery)

            await self.client.consume(self.task_queue, hold, prefetch=1)
        return await asyncio.wait_for(self.taken.get(), WAIT)

    async def assert_task_settled(self) -> None:
        """The task queue is empty and nothing came back to ``take``: the task was acked or
        dead-lettered, not given back (exact on the in-memory broker, which acts at once)."""
        info = await self.client.queue_info(self.task_queue)
        assert info is not None and info.messages == 0
        assert self.taken is None or self.taken.empty()

    async def next_update(self, wait: float = WAIT) -> tuple[Update, bytes]:
        """The next update on the updates queue, checked against the worker's key."""
        d = await self.updates.next(wait)
        update, _ = decode(d.body, trust(workers={"w1": self.signer}), Update)
        assert isinstance(update, Update)
        assert d.message_id == update.task_id  # the aggregator deduplicates on it
        return update, d.body

    async def start(self) -> asyncio.Task[None]:
        """Run the worker; returns once it consumes its task queue."""
        self.running = asyncio.create_task(self.worker.run(self.stop_event), name="worker")

        async def consuming() -> bool:
            info = await self.client.queue_info(self.task_queue)
            return self.running is not None and (self.running.done() or bool(info and info.consumers))

        await until(consuming, "the worker to consume")
        self.check_alive()
        return self.running

    async def stop(self) -> None:
        """Stop the worker cleanly (its goodbye, then its loops)."""
        self.stop_event.set()
        if self.running is not None:
            await asyncio.wait_for(self.running, WAIT)
            self.running = None

    def check_alive(self) -> None:
        if self.running is not None and self.running.done():
            raise AssertionError(f"the worker stopped: {self.running!r}")


@contextlib.asynccontextmanager
async def worker_rig(
    client: Transport,
    tmp_path: Path,
    *,
    app: LinearApp | None = None,
    outbox: bool = True,
    transport: Transport | None = None,
    start: bool = False,
    **config: Any,
) -> AsyncIterator[WorkerRig]:
    """A ``Worker`` "w1" of ``client``'s job on capability ``cpu``, with its outbox in
    ``tmp_path/outbox`` (or none), on ``transport`` (by default a connection of its own like
    ``client``); started with ``start``. ``config``: ``WorkerConfig`` fields."""
    coordinator, signer = OWNER, Signer.generate()
    pinned = trust()
    app = app or LinearApp()
    box = Outbox(tmp_path / "outbox") if outbox else None
    updates = await Inbox.on(client, client.names.updates_queue)
    dead = await Inbox.on(client, client.names.dead_queue)
    transport = transport or await connect_like(client, "test-worker-w1")
    worker = Worker(
        WorkerConfig("w1", ("cpu",), **{"heartbeat_interval": 60.0, "warm": False, **config}),
        transport=transport,
        app=app,
        data=app.load_partition(PartitionSpec(0, 1)),
        signer=signer,
        coordinator_keys=pinned,
        outbox=box,
    )
    rig = WorkerRig(client, transport, worker, app, coordinator, signer, box, updates, dead)
    try:
        if start:
            await rig.start()
        yield rig
        rig.check_alive()
    finally:
        rig.stop_event.set()
        if rig.running is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(rig.running, WAIT)
        await transport.close()


# -- the coordinator -----------------------------------------------------------------------------


@dataclass
class CoordinatorRig:
    client: Transport  # the test's connection: hellos, receipts and versions in; tasks and rounds out
    coordinator: Coordinator
    store: ModelStore
    trust: Keyring  # the coordinator's: each fake worker's key is enrolled on its first hello
    aggregator: Signer  # signs receipts and announcements
    running: asyncio.Task[Any]
    logs: list[dict[str, Any]]  # the coordinator's, captured
    workers: dict[str, Signer] = field(default_factory=dict)  # each fake worker's key
    tasks: list[Task] = field(default_factory=list)  # what the task queue got, acked at once
    rounds: list[Round] = field(default_factory=list)  # what the updates queue got
    fleet: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def names(self) -> Names:
        return self.client.names

    async def hello(self, worker_id: str) -> None:
        """One hello of ``worker_id`` (capability ``cpu``)."""
        key = self.workers.get(worker_id)
        if key is None:
            key = self.workers[worker_id] = Signer.generate()
            self.trust.add(key.public, Role.WORKER, worker_id=worker_id)
        hello = Hello(worker_id, ("cpu",), key.fingerprint, "up", time.time())
        await self.client.publish(self.names.workers_exchange, self.names.hello_key, encode(hello, key))

    def join(self, worker_id: str, every: float = 0.3) -> None:
        """A fake worker: a hello every ``every`` seconds, as a worker's heartbeat does."""

        async def beat() -> None:
            while True:
                await self.hello(worker_id)
                await asyncio.sleep(every)

        self.fleet.append(asyncio.create_task(beat(), name=f"hellos-{worker_id}"))

    async def receipt(self, task: Task) -> None:
        """The aggregator's word that ``task``'s update is buffered."""
        job = self.names.job
        receipt = Receipt(job, task.task_id, "w1", "buffered", "", task.base_version)
        body = encode(Receipts(job, (receipt,)), self.aggregator)
        await self.client.publish(self.names.models_exchange, Names.receipt_key(job), body)

    async def version(self, version: int, update_ids: tuple[str, ...]) -> None:
        """Store ``version`` (the same weights as v0) and announce it, as the aggregator does."""
        _, blob = await self.store.load_bytes(0)
        manifest = await save_version(
            self.store, blob, version, update_ids, updates_total=len(update_ids) * version
        )
        body = encode(manifest.announcement(), self.aggregator)
        await self.client.publish(self.names.models_exchange, Names.model_key(self.names.job), body)

    def check_alive(self) -> None:
        if self.running.done():
            raise AssertionError(f"the coordinator stopped: {self.running!r}")


@contextlib.asynccontextmanager
async def coordinator_rig(
    client: Transport, out: Path, *, trust_aggregator: bool = True, **config: Any
) -> AsyncIterator[CoordinatorRig]:
    """A ``Coordinator`` of ``client``'s job on a connection of its own, with its state, metrics
    and local store under ``out``, running ``LinearApp``; it stops on no target accuracy and no
    time limit unless ``config`` (``CoordinatorConfig`` fields) says otherwise. It trusts the
    rig's aggregator key (``MAKER``) unless ``trust_aggregator`` is false."""
    names = client.names
    coordinator_key, aggregator = OWNER, MAKER
    keyring = trust(aggregators=(MAKER,) if trust_aggregator else ())
    seen = trust()
    store = ModelStore(open_store(str(out / "store")), names.job, keyring)
    own = await connect_like(client, "test-coordinator")
    config = {"target_accuracy": 0.0, "max_seconds": 0.0, **config}
    with capture_logs() as logs:
        coordinator = Coordinator(
            config=CoordinatorConfig(job_id=names.job, out_dir=out, **config),
            transport=own,
            store=store,
            app=LinearApp(),
            signer=coordinator_key,
            keyring=keyring,
        )
        running = asyncio.create_task(coordinator.run(), name="coordinator")
        rig = CoordinatorRig(client, coordinator, store, keyring, aggregator, running, logs)

        async def on_task(delivery: Delivery) -> None:
            task, _ = decode(delivery.body, seen, Task)
            rig.tasks.append(task)
            await delivery.ack()

        async def on_round(delivery: Delivery) -> None:
            message, _ = decode(delivery.body, seen, Round)
            rig.rounds.append(message)
            await delivery.ack()

        await client.consume(names.task_queue("cpu"), on_task, prefetch=100)
        await client.consume(names.updates_queue, on_round, prefetch=100)
        try:
            await until(lambda: events(logs, "started") or running.done(), "the coordinator to start")
            yield rig
        finally:
            for beat in rig.fleet:
                beat.cancel()
            await asyncio.gather(*rig.fleet, return_exceptions=True)
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            await own.close(grace=0.1)
