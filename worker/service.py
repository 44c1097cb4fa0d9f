"""The worker: consume tasks for its capabilities, train off the loop, send signed updates.

A task is acked only after its update is confirmed by the broker, so a worker
that dies mid-task leaves the task to be redelivered to another worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import time
from typing import Any

from broker_config.names import Names, check_token
from broker_config.topology import capability_topology
from shared.app import App, PartitionSpec
from shared.broker import Broker, Delivery
from shared.codec import decode, encode
from shared.errors import ConfigError, StoreError, WireError
from shared.keys import load_or_create_signer, load_public_key
from shared.logs import get_logger
from shared.messages import Hello, Task, Update
from shared.partition import parse_partition
from shared.settings import Settings, split_capabilities
from shared.signing import Keyring, Signer
from shared.store import ObjectStore, open_store
from worker.training import train_task


class Worker:
    def __init__(
        self,
        *,
        worker_id: str,
        capabilities: tuple[str, ...],
        broker: Broker,
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
    ) -> None:
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
        self.busy = False
        self.completed = 0
        self._train_lock = asyncio.Lock()
        self.log = get_logger(service="worker", worker=worker_id)

    async def hello(self, state: str = "up") -> None:
        message = Hello(
            self.worker_id,
            self.capabilities,
            self.signer.fingerprint,
            state,
            time.time(),
            self.partition,
            self.busy,
        )
        await self.broker.publish(
            self.names.workers_exchange, "", encode(message, self.signer), mandatory=False
        )

    async def heartbeat(self) -> None:
        while True:
            try:
                await self.hello()
            except Exception as exc:  # a flaky link must not kill the heartbeat
                self.log.warning("heartbeat_failed", error=repr(exc))
            await asyncio.sleep(self.heartbeat_interval)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        await self.broker.declare(capability_topology(self.names, self.capabilities))
        beat = asyncio.create_task(self.heartbeat(), name="heartbeat")
        for cap in self.capabilities:
            await self.broker.consume(self.names.task_queue(cap), self.handle, prefetch=1)
        self.log.info("started", capabilities=list(self.capabilities), partition=self.partition)
        try:
            await (stop.wait() if stop else asyncio.Event().wait())
        finally:
            beat.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.hello("down"), 2.0)

    async def handle(self, delivery: Delivery) -> None:
        async with self._train_lock:  # one task at a time, whatever the capability
            try:
                await self._handle(delivery)
            except Exception as exc:
                self.log.exception("task_failed", error=repr(exc))
                await delivery.retry_later()

    async def _handle(self, delivery: Delivery) -> None:
        try:
            task, _ = decode(delivery.body, self.coordinator_keys, Task)
        except WireError as exc:
            self.log.warning("task_rejected", reason=exc.reason, detail=str(exc))
            await delivery.dead_letter(exc.reason, str(exc))
            return
        log = self.log.bind(task=task.task_id, version=task.base_version)
        if task.deadline < time.time():
            log.info("task_expired")
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
            outcome = await asyncio.to_thread(
                train_task, self.app, self.data, task, blob, self.model_seed, self.threads
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
            delta=outcome.delta,
        )
        body = encode(update, self.signer)
        await self.broker.publish(self.names.results_exchange, "", body, message_id=task.task_id)
        await delivery.ack()
        self.completed += 1
        log.info(
            "update_sent",
            bytes=len(body),
            loss=round(outcome.metrics.get("train_loss", 0.0), 4),
            seconds=round(outcome.metrics["train_seconds"], 3),
        )

    async def _model_bytes(self, task: Task) -> bytes:
        if task.model:
            blob = task.model
        elif self.store is not None:
            blob = await self.store.get(task.model_key)
        else:
            raise StoreError(f"task carries no model and this worker has no store to fetch {task.model_key}")
        if hashlib.sha256(blob).hexdigest() != task.model_sha256:
            raise StoreError(f"model {task.model_key} does not match the task's sha256")
        return blob


async def serve(settings: Settings, app: App, stop: asyncio.Event | None = None) -> None:
    """Build a worker from settings (its data partition, its key, the pinned coordinator key) and run it."""
    index, count = parse_partition(settings.partition)
    capabilities = split_capabilities(settings.capability)
    worker_id = settings.worker_id or f"{socket.gethostname()}-p{index}"
    check_token("worker id", worker_id)
    signer = load_or_create_signer(settings.key_path(f"worker-{worker_id}"))
    if not settings.coordinator_key_path.exists():
        raise ConfigError(
            f"the coordinator's public key is not at {settings.coordinator_key_path}: copy it there "
            "or point --coordinator-key at it (workers only train for the coordinator they pin)"
        )
    pinned = Keyring()
    pinned.add(load_public_key(settings.coordinator_key_path))
    spec = PartitionSpec(index, count, settings.alpha, settings.partition_seed, settings.partition_file)
    data = await asyncio.to_thread(app.load_partition, spec)
    names = Names(settings.namespace)
    broker = await Broker(
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
            store=open_store(settings.store),
            partition=settings.partition,
            delay=settings.delay,
            heartbeat_interval=settings.heartbeat_interval,
            model_seed=settings.model_seed,
            threads=settings.threads,
        )
        await worker.run(stop)
    finally:
        await broker.close()
