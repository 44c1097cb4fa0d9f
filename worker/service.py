"""The worker: consume tasks for its capabilities, train off the loop, send signed updates.

Before its first hello the worker warms up (``worker.training.warm_up``: one tiny pass on a
throwaway model, once per process) in the thread it trains in, so the process's one-time
start-up is paid before it counts as ready, not inside its first task. It trains in that one
thread, task after task, so per-thread settings such as ``torch.set_num_threads`` hold.

After training, the signed update is first written to the worker's on-disk outbox, then
published with a publisher confirm, removed from the outbox only after the confirm, and only
then is the task acked. So:

- a worker that dies or loses its link before the outbox write leaves its task to be
  redelivered (and trained again, here or elsewhere);
- an update in the outbox is published again when the worker starts and after every
  reconnection, so a trained update is not lost with the link or the process;
- a task whose ack was lost with its channel is redelivered; if its update is already
  confirmed it is acked without training again, and if it is still in the outbox that
  update is sent instead of a new one. Anything sent twice (a lost confirm, a restart
  between confirm and removal) carries the same task id, which the aggregator deduplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from broker_config.names import Names, check_token
from broker_config.topology import capability_topology
from shared.app import App, PartitionSpec
from shared.codec import decode, encode
from shared.errors import BrokerError, ConfigError, StoreError, WireError
from shared.http import http_get, http_put
from shared.keys import load_or_create_signer, load_public_key
from shared.logs import get_logger
from shared.messages import Hello, Task, Update
from shared.partition import parse_partition
from shared.settings import Settings, split_capabilities
from shared.signing import Keyring, Signer
from shared.store import ObjectStore, open_store
from shared.transport import Delivery, Transport
from shared.transport.rabbitmq import RabbitMQ
from worker.outbox import Outbox, OutboxError, encode_task_id
from worker.training import TrainingOutcome, WarmUp, train_task, warm_up

SENT_MEMORY = 10_000  # confirmed task ids remembered, to ack a redelivered task without training it again


class Worker:
    def __init__(
        self,
        *,
        worker_id: str,
        capabilities: tuple[str, ...],
        broker: Transport,
        app: App,
        data: Any,
        signer: Signer,
        coordinator_keys: Keyring,
        store: ObjectStore | None = None,
        partition: str = "",
        delay: float = 0.0,
        heartbeat_interval: float = 2.0,
        model_seed: int = 0,
        threads: int = 1,
        outbox: Outbox | None = None,
        flush_retry: float = 30.0,
        warm: bool = True,
    ) -> None:
        """``outbox``: where trained updates wait for their confirm (``None``: nowhere, so an update
        whose link is lost before its confirm is trained again after the task's redelivery).
        ``flush_retry``: seconds between attempts to flush entries a flush could not send.
        ``warm``: warm up before the first hello (see ``worker.training.warm_up``)."""
        self.worker_id = worker_id
        self.capabilities = capabilities
        self.broker = broker
        self.names: Names = broker.names
        self.app = app
        self.data = data
        self.signer = signer
        self.coordinator_keys = coordinator_keys
        self.store = store
        self.partition = partition
        self.delay = delay
        self.heartbeat_interval = heartbeat_interval
        self.model_seed = model_seed
        self.threads = threads
        self.outbox = outbox
        self.flush_retry = flush_retry
        self.warm = warm
        self.warmed: WarmUp | None = None
        self.busy = False
        self.completed = 0
        self.received = 0
        self.expired = 0
        self.redelivered = 0
        self.flushed = 0
        self._train_lock = asyncio.Lock()
        self._send_lock = asyncio.Lock()
        self._sent: OrderedDict[str, None] = OrderedDict()
        self._flush_wanted = asyncio.Event()
        self._trainer: ThreadPoolExecutor | None = None
        self.log = get_logger(service="worker", worker=worker_id)

    async def _in_training_thread(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in this worker's one training thread (made on first use)."""
        if self._trainer is None:
            self._trainer = ThreadPoolExecutor(1, thread_name_prefix=f"train-{self.worker_id}")
        return await asyncio.get_running_loop().run_in_executor(self._trainer, fn)

    async def warm_up(self) -> None:
        """Warm up in the training thread; a failure is logged, never fatal (the first task then
        pays the start-up, as it would have without a warm-up)."""
        try:
            self.warmed = await self._in_training_thread(
                functools.partial(warm_up, self.app, self.data, self.model_seed, self.threads)
            )
        except Exception as exc:
            self.log.warning("warm_up_failed", error=repr(exc))
            return
        self.log.info("warmed_up", how=self.warmed.how, seconds=round(self.warmed.seconds, 3))

    async def hello(self, state: str = "up") -> None:
        message = Hello(
            self.worker_id,
            self.capabilities,
            self.signer.fingerprint,
            state,
            time.time(),
            self.partition,
            self.busy,
            tasks_received=self.received,
            tasks_completed=self.completed,
            tasks_expired=self.expired,
            tasks_redelivered=self.redelivered,
        )
        await self._publish(self.names.workers_exchange, encode(message, self.signer), mandatory=False)

    async def _publish(self, exchange: str, body: bytes, **options: Any) -> None:
        await self.broker.publish(exchange, "", body, **options)

    async def heartbeat(self) -> None:
        while True:
            try:
                await self.hello()
            except Exception as exc:  # a flaky link must not kill the heartbeat
                self.log.warning("heartbeat_failed", error=repr(exc))
            await asyncio.sleep(self.heartbeat_interval)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        await self.broker.declare(capability_topology(self.names, self.capabilities))
        if self.warm:
            await self.warm_up()  # before the first hello: a worker that says hello is ready to train
        background = [asyncio.create_task(self.heartbeat(), name="heartbeat")]
        forget_reconnect: Callable[[], None] | None = None
        if self.outbox is not None:
            swept = await asyncio.to_thread(self.outbox.sweep_temp)
            if swept:
                self.log.info("outbox_swept", temp_files=swept)
            self._flush_wanted.set()  # entries left by an earlier run go first
            forget_reconnect = self.broker.on_reconnect(self._on_reconnect)
            background.append(asyncio.create_task(self._flusher(), name="outbox-flusher"))
        for cap in self.capabilities:
            # restored by the robust connection after a reconnect; each delivery is handled in a
            # task the broker shields from the channel's end, so training outlives a lost link
            await self.broker.consume(self.names.task_queue(cap), self.handle, prefetch=1)
        self.log.info(
            "started",
            capabilities=list(self.capabilities),
            partition=self.partition,
            outbox=str(self.outbox.root) if self.outbox is not None else "",
        )
        try:
            await (stop.wait() if stop else asyncio.Event().wait())
        finally:
            if forget_reconnect is not None:
                forget_reconnect()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.hello("down"), 2.0)
            if self._trainer is not None:
                self._trainer.shutdown(wait=False)
                self._trainer = None

    def _on_reconnect(self) -> None:
        self.log.info("reconnected")
        self._flush_wanted.set()

    async def handle(self, delivery: Delivery) -> None:
        async with self._train_lock:  # one task at a time, whatever the capability
            try:
                await self._handle(delivery)
            except Exception as exc:
                self.log.exception("task_failed", error=repr(exc))
                if self.outbox is not None:
                    self._flush_wanted.set()  # an update that could not be sent: the flusher retries it
                await delivery.retry_later()

    async def _handle(self, delivery: Delivery) -> None:
        try:
            task, _ = decode(delivery.body, self.coordinator_keys, Task)
        except WireError as exc:
            self.log.warning("task_rejected", reason=exc.reason, detail=str(exc))
            await delivery.dead_letter(exc.reason, str(exc))
            return
        log = self.log.bind(task=task.task_id, version=task.base_version)
        self.received += 1
        self.redelivered += bool(delivery.redelivered)
        if task.task_id in self._sent:  # a redelivery after a lost ack: the update is confirmed already
            log.info("task_already_sent", redelivered=delivery.redelivered)
            await delivery.ack()
            return
        if self.outbox is not None:
            try:
                encode_task_id(task.task_id)
            except OutboxError as exc:
                log.warning("task_rejected", reason="bad_task_id", detail=str(exc))
                await delivery.dead_letter("bad_task_id", str(exc))
                return
            pending = await asyncio.to_thread(self.outbox.get, task.task_id)
            if pending is not None:  # trained before the link or the process was lost: send that
                log.info("task_in_outbox", redelivered=delivery.redelivered)
                await self._send(task.task_id, pending)
                await delivery.ack()
                return
        if task.deadline < time.time():
            log.info("task_expired")
            self.expired += 1
            await delivery.dead_letter("expired", "deadline passed before training started")
            return
        try:
            blob = await self._model_bytes(task)
        except StoreError as exc:
            log.warning("model_unavailable", detail=str(exc))
            await delivery.dead_letter("bad_model", str(exc))
            return
        log.info("task_started", redelivered=delivery.redelivered)
        self.busy = True
        try:
            outcome: TrainingOutcome = await self._in_training_thread(
                functools.partial(train_task, self.app, self.data, task, blob, self.model_seed, self.threads)
            )
            if self.delay > 0:
                await asyncio.sleep(self.delay)
        finally:
            self.busy = False
        update = Update(
            task_id=task.task_id,
            job_id=task.job_id,
            worker_id=self.worker_id,
            base_version=task.base_version,
            num_samples=outcome.num_samples,
            quant=task.quant,
            block=task.block,
            metrics=outcome.metrics,
            sent_at=time.time(),
            **await self._claim_check(task, outcome.delta),
        )
        body = encode(update, self.signer)
        if self.outbox is not None:
            await asyncio.to_thread(self.outbox.put, task.task_id, body)
            log.info("outbox_written", bytes=len(body))
        await self._send(task.task_id, body)
        acked = await delivery.ack()  # False: the channel is gone and the task comes back
        self.completed += 1
        log.info(
            "update_sent",
            bytes=len(body),
            loss=round(outcome.metrics.get("train_loss", 0.0), 4),
            seconds=round(outcome.metrics["train_seconds"], 3),
            acked=acked,
        )

    async def _send(self, task_id: str, body: bytes) -> bool:
        """Publish an update and wait for its confirm, then forget its outbox entry.

        ``False`` when the update was confirmed before (by the flusher or an earlier delivery of
        its task): it is not published again. Raises ``BrokerError`` when it cannot be sent; the
        outbox entry stays for the next flush.
        """
        async with self._send_lock:  # the flusher and a task never publish the same entry together
            if task_id in self._sent:
                sent = False
            else:
                await self._publish(self.names.results_exchange, body, message_id=task_id)
                self._sent[task_id] = None
                if len(self._sent) > SENT_MEMORY:
                    self._sent.popitem(last=False)
                sent = True
            if self.outbox is not None:
                await asyncio.to_thread(self.outbox.remove, task_id)
            return sent

    async def flush_outbox(self) -> int:
        """Publish every entry of the outbox, oldest first; returns how many are left."""
        assert self.outbox is not None
        for entry in await asyncio.to_thread(self.outbox.entries):
            body = await asyncio.to_thread(self.outbox.read, entry)
            if body is None:  # sent and removed meanwhile
                continue
            try:
                sent = await self._send(entry.task_id, body)
            except BrokerError as exc:
                self.log.warning("outbox_flush_failed", task=entry.task_id, error=str(exc))
                continue
            if sent:
                self.flushed += 1
                self.log.info(
                    "outbox_flushed",
                    task=entry.task_id,
                    bytes=len(body),
                    age=round(time.time() - entry.written_ns / 1e9, 3),
                )
        return len(await asyncio.to_thread(self.outbox.entries))

    async def _flusher(self) -> None:
        """Flush the outbox at start and after every reconnection; retry while entries are left."""
        left = 0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush_wanted.wait(), self.flush_retry if left else None)
            self._flush_wanted.clear()
            try:
                left = await self.flush_outbox()
            except Exception as exc:  # a full disk or a vanished directory must not end the flusher
                self.log.warning("outbox_flush_failed", error=repr(exc))
                left = 1

    async def _claim_check(self, task: Task, delta: bytes) -> dict[str, Any]:
        """Large deltas go to the store (by presigned URL when given); the message carries the
        key, size and sha256, which the signature covers. Small ones travel inline."""
        if len(delta) <= task.inline_limit:
            return {"delta": delta}
        key = task.update_key or f"jobs/{task.job_id}/updates/{task.task_id}.bin"
        if task.update_url:
            await http_put(task.update_url, delta)
        elif self.store is not None:
            await self.store.put(key, delta)
        else:
            raise StoreError(f"a {len(delta)}-byte update needs the store, and this worker has none")
        return {
            "delta_key": key,
            "delta_sha256": hashlib.sha256(delta).hexdigest(),
            "delta_size": len(delta),
        }

    async def _model_bytes(self, task: Task) -> bytes:
        if task.model:
            blob = task.model
        elif task.model_url:
            blob = await http_get(task.model_url)
        elif self.store is not None:
            blob = await self.store.get(task.model_key)
        else:
            raise StoreError(f"task carries no model and this worker has no store to fetch {task.model_key}")
        if hashlib.sha256(blob).hexdigest() != task.model_sha256:
            raise StoreError(f"model {task.model_key} does not match the task's sha256")
        return blob


async def serve(settings: Settings, app: App, stop: asyncio.Event | None = None) -> None:
    """Build a worker from settings (its data partition, its key, the pinned coordinator key) and run it.

    ``--replicas M`` hosts M simulated workers in this process, each with its own identity, key,
    connection and partition (I, I+1, ..., I+M-1 of N): one machine standing in for a fleet.
    """
    index, count = parse_partition(settings.partition)
    if settings.replicas < 1 or index + settings.replicas > count:
        raise ConfigError(
            f"--replicas {settings.replicas} from partition {index}/{count} needs 1 <= M and I + M <= N"
        )
    if settings.replicas > 1 and settings.key_file:
        raise ConfigError("--key-file names one identity; replicas each keep theirs in --keys-dir")
    if not settings.coordinator_key_path.exists():
        raise ConfigError(
            f"the coordinator's public key is not at {settings.coordinator_key_path}: copy it there "
            "or point --coordinator-key at it (workers only train for the coordinator they pin)"
        )
    base_id = settings.worker_id or f"{socket.gethostname()}-p{index}"
    if settings.replicas == 1:
        await _serve_one(settings, app, base_id, index, count, stop)
        return
    await asyncio.gather(
        *(
            _serve_one(settings, app, f"{base_id}-r{j}", index + j, count, stop)
            for j in range(settings.replicas)
        )
    )


async def _serve_one(
    settings: Settings, app: App, worker_id: str, index: int, count: int, stop: asyncio.Event | None
) -> None:
    capabilities = split_capabilities(settings.capability)
    check_token("worker id", worker_id)
    signer = load_or_create_signer(settings.key_path(f"worker-{worker_id}"))
    pinned = Keyring()
    pinned.add(load_public_key(settings.coordinator_key_path))
    spec = PartitionSpec(index, count, settings.alpha, settings.partition_seed, settings.partition_file)
    data = await asyncio.to_thread(app.load_partition, spec)
    outbox = Outbox(
        Path(settings.outbox) / worker_id
        if settings.outbox and settings.replicas > 1
        else Path(settings.outbox)
        if settings.outbox
        else default_outbox(settings, worker_id)
    )
    names = Names(settings.namespace)
    broker = await RabbitMQ(
        settings.amqp_url, names, f"fedq-worker-{worker_id}", settings.amqp_heartbeat
    ).connect()
    try:
        worker = Worker(
            worker_id=worker_id,
            capabilities=capabilities,
            broker=broker,
            app=app,
            data=data,
            signer=signer,
            coordinator_keys=pinned,
            store=open_store(settings.store, settings),
            partition=f"{index}/{count}",
            delay=settings.delay,
            heartbeat_interval=settings.heartbeat_interval,
            model_seed=settings.model_seed,
            threads=settings.threads,
            outbox=outbox,
        )
        await worker.run(stop)
    finally:
        await broker.close()


def default_outbox(settings: Settings, worker_id: str) -> Path:
    """``<keys_dir>/../outbox/<worker_id>``: ``.fedq/outbox/<worker_id>`` by default, and inside
    the run folder under ``fedq run``, so one run never sends another run's leftovers."""
    return Path(settings.keys_dir).parent / "outbox" / worker_id
