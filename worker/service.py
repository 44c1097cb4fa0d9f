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

What to do with a received task is decided by ``worker.decision.decide`` (pure);
``Worker.step`` gathers what it needs and carries the decision out. The worker is a
``shared.runtime.Service``: the runtime declares its queues, checks each task's signature
(an invalid one is dead-lettered with its ``WireError`` reason) and runs its heartbeat and
outbox flusher. A hello that cannot be published, even after the transport's retries, stops
the worker; an outbox entry that cannot be sent stays for the next flush. A task whose
training, store or broker step fails is given back to its queue (``retry_later``), never dead-lettered: its delivery limit ends a task that always fails.
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
from dataclasses import replace
from pathlib import Path
from typing import Any

from broker_config.names import Names, check_token
from broker_config.topology import Topology, capability_topology
from shared import metrics
from shared.app import App, PartitionSpec
from shared.codec import Envelope, decode_head, encode, open_envelope, read_task_token, task_token
from shared.errors import BrokerError, ConfigError, StoreError, WireError
from shared.http import http_get, http_put
from shared.keys import DirectoryTrust, load_or_create_signer, load_public_key, role_dir
from shared.logs import get_logger
from shared.messages import Hello, Task, Update
from shared.partition import parse_partition
from shared.quantize import SCHEMES
from shared.reasons import Reason
from shared.runtime import Runtime, Service, first_error
from shared.settings import Settings
from shared.signing import Keyring, Role, Signer
from shared.store import ObjectStore, open_store
from shared.transport import Delivery, Transport
from shared.transport.connect import connected
from worker.config import WorkerConfig
from worker.decision import Decision, Known, decide, outbox_matters, task_problem
from worker.outbox import Outbox, OutboxError, encode_task_id
from worker.training import TrainingOutcome, WarmUp, train_task, warm_up, with_floor

SENT_MEMORY = 10_000  # confirmed task ids remembered, to ack a redelivered task without training it again
NO_STORE = ("", "none")  # ``--store`` values for a worker with no store at all
NO_STORE_HINT = (
    "the store: the task has no presigned URL for it (the coordinator's store cannot presign: a "
    "directory), and this worker runs with --store none; give it the job's --store"
)


class Worker(Service):
    name = "worker"

    def __init__(
        self,
        config: WorkerConfig,
        *,
        transport: Transport,
        app: App,
        data: Any,
        signer: Signer,
        coordinator_keys: Keyring,
        store: ObjectStore | None = None,
        outbox: Outbox | None = None,
    ) -> None:
        """``outbox``: where trained updates wait for their confirm (``None``: nowhere, so an update
        whose link is lost before its confirm is trained again after the task's redelivery)."""
        self.config = config
        self.worker_id = config.worker_id
        self.transport = transport
        self.names: Names = transport.names
        self.jobs: tuple[str, ...] = config.jobs or (transport.names.job,)
        self.app = app
        self.data = data
        self.signer = signer
        self.coordinator_keys = coordinator_keys
        self.store = store
        self.outbox = outbox
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
        self._forget_reconnect: Callable[[], None] | None = None
        self._stopping = False
        self.log = get_logger(service="worker", worker=config.worker_id)

    # -- the service ------------------------------------------------------------------------
    def topology(self) -> Topology:
        """Its jobs' task queues for its capabilities, and the exchanges: a worker that starts
        before the coordinator says hello to nobody, rather than to a missing exchange (which,
        since a heartbeat that cannot be published stops the worker, would stop it)."""
        parts = [capability_topology(self.names.for_job(job), self.config.capabilities) for job in self.jobs]
        return Topology(
            parts[0].exchanges,
            tuple(q for p in parts for q in p.queues),
            tuple(b for p in parts for b in p.bindings),
        )

    async def start(self, runtime: Runtime) -> None:
        if self.config.warm:
            await self.warm_up()  # before the first hello: a worker that says hello is ready to train
        runtime.every("heartbeat", self.config.heartbeat_interval, self._heartbeat)
        if self.outbox is not None:
            swept = await asyncio.to_thread(self.outbox.sweep_temp)
            if swept:
                self.log.info("outbox_swept", temp_files=swept)
            self._flush_wanted.set()  # entries left by an earlier run go first
            self._forget_reconnect = self.transport.on_reconnect(self._on_reconnect)
            runtime.spawn("outbox-flusher", self._flusher)
        for job in self.jobs:
            for cap in self.config.capabilities:
                # restored by the transport after a reconnect; each delivery is handled in a task the
                # transport shields from the channel's end, so training outlives a lost link
                await runtime.consume_messages(
                    self.names.for_job(job).task_queue(cap),
                    Task,
                    self.coordinator_keys,
                    self.on_task,
                    prefetch=1,
                )
        self.log.info(
            "started",
            jobs=list(self.jobs),
            capabilities=list(self.config.capabilities),
            partition=self.config.partition,
            outbox=str(self.outbox.root) if self.outbox is not None else "",
        )

    async def stopping(self) -> None:
        """Say goodbye (bounded), forget the reconnect hook, let the training thread go."""
        self._stopping = True
        if self._forget_reconnect is not None:
            self._forget_reconnect()
            self._forget_reconnect = None
        try:
            await asyncio.wait_for(self.hello("down"), self.config.goodbye_seconds)
        finally:
            if self._trainer is not None:
                self._trainer.shutdown(wait=False)
                self._trainer = None

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run on the shared runtime over this worker's transport (already connected)."""
        await Runtime(self.transport, worker=self.worker_id).run(self, stop)

    # -- hellos -----------------------------------------------------------------------------
    async def hello(self, state: str = "up") -> None:
        message = Hello(
            self.worker_id,
            self.config.capabilities,
            self.signer.fingerprint,
            state,
            time.time(),
            self.config.partition,
            self.busy,
            tasks_received=self.received,
            tasks_completed=self.completed,
            tasks_expired=self.expired,
            tasks_redelivered=self.redelivered,
            org=self.config.org,
        )
        body = encode(message, self.signer)
        for job in self.jobs:  # each job's coordinator counts it among its fleet
            names = self.names.for_job(job)
            await self.transport.publish(names.workers_exchange, names.hello_key, body, mandatory=False)

    async def _heartbeat(self) -> None:
        if not self._stopping:  # once "down" is said, no "up" follows it
            await self.hello()

    # -- training ---------------------------------------------------------------------------
    async def _in_training_thread(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in this worker's one training thread (made on first use)."""
        if self._trainer is None:
            self._trainer = ThreadPoolExecutor(1, thread_name_prefix=f"train-{self.worker_id}")
        return await asyncio.get_running_loop().run_in_executor(self._trainer, fn)

    async def warm_up(self) -> None:
        """Warm up in the training thread; a failure is logged, never fatal (the first task then
        pays the start-up, as it would have without a warm-up)."""
        cfg = self.config
        try:
            self.warmed = await self._in_training_thread(
                functools.partial(warm_up, self.app, self.data, cfg.model_seed, cfg.threads)
            )
        except Exception as exc:
            self.log.warning("warm_up_failed", error=repr(exc))
            return
        self.log.info("warmed_up", how=self.warmed.how, seconds=round(self.warmed.seconds, 3))

    # -- tasks ------------------------------------------------------------------------------
    async def on_task(self, task: Task, envelope: Envelope, delivery: Delivery) -> None:
        """A verified task (the runtime dead-letters the others). Whatever fails here gives the task
        back to its queue, to be tried again here or elsewhere, up to its delivery limit."""
        async with self._train_lock:  # one task at a time, whatever the capability or job
            if task.job_id not in self.jobs:  # its update would go to a job this worker does not serve
                self.log.warning("task_rejected", reason=Reason.WRONG_JOB, task=task.task_id, job=task.job_id)
                await delivery.dead_letter(
                    Reason.WRONG_JOB, f"job {task.job_id!r} is not one of {list(self.jobs)}"
                )
                return
            try:
                await self.step(task, delivery, task_token(envelope))
            except Exception as exc:
                self.log.exception("task_failed", task=task.task_id, error=repr(exc))
                if self.outbox is not None:
                    self._flush_wanted.set()  # an update that could not be sent: the flusher retries it
                await delivery.retry_later()

    async def step(self, task: Task, delivery: Delivery, token: bytes = b"") -> Decision:
        """Decide what to do with ``task`` (``worker.decision``) and do it; returns the decision.
        ``token``: the task as the coordinator signed it (``shared.codec.task_token``), which the
        update carries so that the aggregator believes the coordinator, not this worker."""
        log = self.log.bind(task=task.task_id, version=task.base_version)
        self.received += 1
        self.redelivered += bool(delivery.redelivered)
        metrics.received(task.job_id, "worker", len(delivery.body))
        already_sent = task.task_id in self._sent
        bad_id = self._task_id_problem(task.task_id)
        pending: bytes | None = None
        if self.outbox is not None and outbox_matters(already_sent, not bad_id):
            pending = await asyncio.to_thread(self.outbox.get, task.task_id)
        t = task.train
        problem = task_problem(
            task.quant, task.block, t.epochs, t.batch_size, SCHEMES, task.dp_clip, task.dp_noise, t.prox_mu
        )
        known = Known(already_sent, not bad_id, pending is not None, task.deadline, time.time(), problem)
        decision = decide(known)
        match decision:
            case Decision.ALREADY_SENT:  # a redelivery after a lost ack: the update is confirmed already
                log.info("task_already_sent", redelivered=delivery.redelivered)
                await delivery.ack()
            case Decision.BAD_TASK_ID:
                log.warning("task_rejected", reason=decision.value, detail=bad_id)
                await delivery.dead_letter(decision.value, bad_id)
            case Decision.BAD_TASK:
                log.warning("task_rejected", reason=decision.value, detail=problem)
                await delivery.dead_letter(decision.value, problem)
            case Decision.IN_OUTBOX:  # trained before the link or the process was lost: send that
                assert pending is not None
                log.info("task_in_outbox", redelivered=delivery.redelivered)
                await self._send(task.task_id, pending, task.job_id, task.shard)
                await delivery.ack()
            case Decision.EXPIRED:
                log.info("task_expired")
                self.expired += 1
                await delivery.dead_letter(decision.value, "deadline passed before training started")
            case Decision.TRAIN:
                await self._train(task, delivery, log, token)
        return decision

    def _task_id_problem(self, task_id: str) -> str:
        """Why the outbox cannot name an entry for ``task_id`` ("" when it can, or there is no outbox)."""
        if self.outbox is None:
            return ""
        try:
            encode_task_id(task_id)
        except OutboxError as exc:
            return str(exc) or "unusable task id"
        return ""

    async def _train(self, task: Task, delivery: Delivery, log: Any, token: bytes) -> None:
        """Fetch the model, train, write the update to the outbox, send it, then ack the task."""
        cfg = self.config
        try:
            blob = await self._model_bytes(task)
        except StoreError as exc:
            log.warning("model_unavailable", detail=str(exc))
            await delivery.dead_letter(Reason.BAD_MODEL, str(exc))
            return
        if not task.model:  # fetched apart from the task
            metrics.received(task.job_id, "worker", len(blob))
        log.info("task_started", redelivered=delivery.redelivered)
        self.busy = True
        try:
            outcome: TrainingOutcome = await self._in_training_thread(
                functools.partial(
                    train_task, self.app, self.data, with_floor(task, cfg.dp_floor), blob, cfg.model_seed, cfg.threads
                )
            )
            if cfg.delay > 0:
                await asyncio.sleep(cfg.delay)
        finally:
            self.busy = False
        metrics.trained(task.job_id, outcome.metrics["train_seconds"])
        update = Update(
            task_id=task.task_id,
            job_id=task.job_id,
            worker_id=self.worker_id,
            base_version=task.base_version,
            num_samples=outcome.num_samples,
            quant=task.quant,
            block=task.block,
            # what the task cost this worker, beside the training's own figures (fedq cost): the
            # task message and any model fetched apart from it
            metrics={**outcome.metrics, "bytes_down": float(len(delivery.body) + (0 if task.model else len(blob)))},
            sent_at=time.time(),
            task=token,
            org=self.config.org,
            **await self._claim_check(task, outcome.delta),
        )
        body = encode(update, self.signer)
        if self.outbox is not None:
            await asyncio.to_thread(self.outbox.put, task.task_id, body)
            log.info("outbox_written", bytes=len(body))
        await self._send(task.task_id, body, task.job_id, task.shard)
        acked = await delivery.ack()  # False: the channel is gone and the task comes back
        self.completed += 1
        log.info(
            "update_sent",
            bytes=len(body),
            loss=round(outcome.metrics.get("train_loss", 0.0), 4),
            seconds=round(outcome.metrics["train_seconds"], 3),
            acked=acked,
        )

    # -- sending and the outbox -------------------------------------------------------------
    async def _send(self, task_id: str, body: bytes, job: str, shard: int = -1) -> bool:
        """Publish an update to ``job``'s aggregator (``shard``'s edge aggregator, when the task
        names one) and wait for its confirm, then forget its outbox entry.

        ``False`` when the update was confirmed before (by the flusher or an earlier delivery of
        its task): it is not published again. Raises ``BrokerError`` when it cannot be sent (the
        transport retried it for its ``publish_retry_seconds``); the outbox entry stays.
        """
        async with self._send_lock:  # the flusher and a task never publish the same entry together
            if task_id in self._sent:
                sent = False
            else:
                names = self.names.for_job(job)
                await self.transport.publish(
                    names.results_exchange, names.update_key(shard), body, message_id=task_id
                )
                metrics.sent(job, "worker", len(body))
                self._sent[task_id] = None
                if len(self._sent) > SENT_MEMORY:
                    self._sent.popitem(last=False)
                sent = True
            if self.outbox is not None:
                await asyncio.to_thread(self.outbox.remove, task_id)
            return sent

    async def flush_outbox(self) -> int:
        """Publish every entry of the outbox, oldest first; returns how many are left.

        An entry the broker refuses, or that cannot be sent even after the transport's retries,
        stays in the outbox for the next flush (``flush_retry`` seconds later): one bad entry
        must neither hold up the others nor stop the worker, which would meet it again first
        thing after a restart."""
        assert self.outbox is not None
        for entry in await asyncio.to_thread(self.outbox.entries):
            body = await asyncio.to_thread(self.outbox.read, entry)
            if body is None:  # sent and removed meanwhile
                continue
            try:
                sent = await self._send(entry.task_id, body, *_route_of(body))
            except (BrokerError, WireError) as exc:  # refused, or not an update of ours: it waits
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
                await asyncio.wait_for(self._flush_wanted.wait(), self.config.flush_retry if left else None)
            self._flush_wanted.clear()
            try:
                left = await self.flush_outbox()
            except OSError as exc:  # a full disk or a vanished directory: try again later
                self.log.warning("outbox_flush_failed", error=repr(exc))
                left = 1

    def _on_reconnect(self) -> None:
        self.log.info("reconnected")
        self._flush_wanted.set()

    # -- models and deltas in the store -----------------------------------------------------
    async def _claim_check(self, task: Task, delta: bytes) -> dict[str, Any]:
        """Large deltas go to the task's update key in the store (by its presigned URL when given);
        the message carries the key, size and sha256, which the signature covers. Small ones travel
        inline."""
        if len(delta) <= task.inline_limit:
            return {"delta": delta}
        if not task.update_key:  # the aggregator takes a claim check only at the key its task names
            raise StoreError(
                f"a {len(delta)}-byte update needs a store key, and task {task.task_id} names none"
            )
        if task.update_url:
            await http_put(task.update_url, delta)
        elif self.store is not None:
            await self.store.put(task.update_key, delta)
        else:
            raise StoreError(f"a {len(delta)}-byte update needs {NO_STORE_HINT}")
        metrics.sent(task.job_id, "worker", len(delta))
        return {
            "delta_key": task.update_key,
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
            raise StoreError(f"model {task.model_key} is not in the task and needs {NO_STORE_HINT}")
        if hashlib.sha256(blob).hexdigest() != task.model_sha256:
            raise StoreError(f"model {task.model_key} does not match the task's sha256")
        return blob


async def serve(settings: Settings, app: App, stop: asyncio.Event | None = None) -> None:
    """Build a worker from settings (its data partition, its key, the pinned coordinator key) and run it.

    ``--replicas M`` hosts M simulated workers in this process, each with its own identity, key,
    connection and partition (I, I+1, ..., I+M-1 of N): one machine standing in for a fleet. Replica
    j starts at URL ``--amqp-first`` + j of an ``--amqp-url`` list.
    """
    metrics.serve(settings.metrics_port, "worker", settings.metrics_host)
    index, count = parse_partition(settings.partition)
    if settings.replicas < 1 or index + settings.replicas > count:
        raise ConfigError(
            f"--replicas {settings.replicas} from partition {index}/{count} needs 1 <= M and I + M <= N"
        )
    if settings.replicas > 1 and settings.key_file:
        raise ConfigError("--key-file names one identity; replicas each keep theirs in --keys-dir")
    if (
        not settings.coordinator_key_path.exists()
        and not role_dir(settings.trusted_dir, Role.COORDINATOR).is_dir()
    ):
        raise ConfigError(
            f"the coordinator's public key is not at {settings.coordinator_key_path} and "
            f"{role_dir(settings.trusted_dir, Role.COORDINATOR)} does not exist: copy the key there "
            "or point --coordinator-key at it (workers only train for the coordinator they pin)"
        )
    base_id = settings.worker_id or f"{socket.gethostname()}-p{index}"
    if settings.replicas == 1:
        await _serve_one(settings, app, base_id, index, count, stop)
        return
    # A task group, not gather: on a stop it waits until every replica has said goodbye and closed
    # (gather returns at the first one, and the process then cut the others' shutdown short and hung)
    try:
        async with asyncio.TaskGroup() as replicas:
            for j in range(settings.replicas):
                # each replica starts at the next node of an --amqp-url list: the fleet spreads over a cluster
                own = replace(settings, amqp_first=settings.amqp_first + j)
                replicas.create_task(_serve_one(own, app, f"{base_id}-r{j}", index + j, count, stop))
    except BaseExceptionGroup as failed:  # one replica failed: the others stopped; say why
        raise first_error(failed) from None


WORKER_PLACEHOLDER = "{worker}"
LOGIN_SETTINGS = ("amqp_url", "amqp_password_file", "amqp_cert", "amqp_key")


def own_login(settings: Settings, worker_id: str) -> Settings:
    """``{worker}`` in the broker login settings stands for the worker's id, so that each replica
    of ``--replicas`` logs in as its own broker user (e.g. ``amqp://fedq.demo.worker.{worker}@host/``
    with ``--amqp-password-file /keys/{worker}.password``)."""
    return replace(
        settings, **{f: getattr(settings, f).replace(WORKER_PLACEHOLDER, worker_id) for f in LOGIN_SETTINGS}
    )


async def _serve_one(
    settings: Settings, app: App, worker_id: str, index: int, count: int, stop: asyncio.Event | None
) -> None:
    check_token("worker id", worker_id)
    settings = own_login(settings, worker_id)
    config = WorkerConfig.from_settings(settings, worker_id, f"{index}/{count}")
    signer = load_or_create_signer(settings.key_path(f"worker-{worker_id}"))
    coordinator_keys = coordinator_trust(settings)
    spec = PartitionSpec(index, count, settings.alpha, settings.partition_seed, settings.partition_file)
    data = await asyncio.to_thread(app.load_partition, spec)
    outbox = Outbox(
        Path(settings.outbox) / worker_id
        if settings.outbox and settings.replicas > 1
        else Path(settings.outbox)
        if settings.outbox
        else default_outbox(settings, worker_id)
    )
    first_job = config.jobs[0]  # the transport's own names; the worker takes every job of config.jobs
    async with connected(replace(settings, job=first_job), f"fedq-worker-{worker_id}") as transport:
        worker = Worker(
            config,
            transport=transport,
            app=app,
            data=data,
            signer=signer,
            coordinator_keys=coordinator_keys,
            store=worker_store(settings),
            outbox=outbox,
        )
        await worker.run(stop)


def worker_store(settings: Settings) -> ObjectStore | None:
    """The store a worker reads models from and writes large updates to when a task carries no
    presigned URL for them: ``--store none`` (or empty) for none at all, as on a machine that holds
    no store credentials and takes everything by the coordinator's URLs. Opening one reaches
    nothing yet: a worker whose tasks carry URLs never uses it."""
    if settings.store.strip().lower() in NO_STORE:
        return None
    return open_store(settings.store, settings)


def coordinator_trust(settings: Settings) -> Keyring:
    """The keys a worker takes tasks from: the trust directory's coordinator folder (which follows
    a ``fedq keys rotate coordinator``) when there is one, else the one pinned key file."""
    if role_dir(settings.trusted_dir, Role.COORDINATOR).is_dir():
        return DirectoryTrust(settings.trusted_dir)
    pinned = Keyring()
    pinned.add(load_public_key(settings.coordinator_key_path), Role.COORDINATOR)
    return pinned


def _route_of(update: bytes) -> tuple[str, int]:
    """The job a signed update of ours belongs to, and the shard its task named (read from its
    head and its task's token; we made it, and the aggregator verifies it anyway)."""
    message = decode_head(open_envelope(update))
    if not isinstance(message, Update):
        raise WireError("an outbox entry that is not an update")
    shard = read_task_token(message.task).shard if message.task else -1
    return message.job_id, shard


def default_outbox(settings: Settings, worker_id: str) -> Path:
    """``<keys_dir>/../outbox/<worker_id>``: ``.fedq/outbox/<worker_id>`` by default, and inside
    the run folder under ``fedq run``, so one run never sends another run's leftovers."""
    return Path(settings.keys_dir).parent / "outbox" / worker_id
