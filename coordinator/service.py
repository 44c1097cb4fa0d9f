"""The coordinator: owns the job, hands out tasks, evaluates versions, decides when to stop.

Nothing is handed out until ``min_workers`` live workers have said hello (or
``min_workers_wait`` seconds have passed), so the job's clock, which starts at the
first task, does not count the fleet's start-up. Async mode keeps ``concurrency``
tasks in flight per capability (default: one per live worker), topping up as
updates land or tasks expire. Sync mode runs
rounds: one task per live worker on the same version, closed when all answered
or at the round deadline. Every new version is evaluated here, on the held-out
test set, because the coordinator owns the stop condition and the test data;
the aggregator stays a lean, data-free fold.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from broker_config.names import Names, check_token
from broker_config.topology import coordinator_inbox, topology
from coordinator.registry import Registry
from shared.app import App
from shared.codec import decode, encode
from shared.errors import ConfigError, FedqError, StoreError, WireError
from shared.keys import DirectoryKeyring, load_or_create_signer
from shared.ledger import JsonLines, read_lines
from shared.logs import get_logger
from shared.messages import Hello, ModelAnnouncement, Receipt, Receipts, Round, Task, TrainConfig
from shared.settings import Settings
from shared.signing import Keyring, Signer
from shared.store import Manifest, ModelStore, model_key, open_store
from shared.tensors import FlatModel, ModelSpec
from shared.transport import Delivery, Transport
from shared.transport.rabbitmq import RabbitMQ

TICK = 0.1
WAITING_LOG_EVERY = 5.0  # seconds between waiting_for_workers lines


@dataclass
class InFlight:
    capability: str
    deadline: float
    version: int


@dataclass
class Latest:
    version: int
    sha256: str
    key: str
    blob: bytes


class Coordinator:
    def __init__(
        self,
        *,
        settings: Settings,
        broker: Transport,
        store: ModelStore,
        app: App,
        signer: Signer,
        keyring: Keyring,
        out_dir: Path,
    ) -> None:
        self.s = settings
        self.broker = broker
        self.names: Names = broker.names
        self.store = store
        self.job_id = store.job_id
        self.app = app
        self.signer = signer
        self.keyring = keyring
        self.out_dir = out_dir
        self.registry = Registry(settings.worker_timeout)
        self.in_flight: dict[str, InFlight] = {}
        self.latest: Latest | None = None
        self._spec: ModelSpec | None = None
        self.train = TrainConfig(
            epochs=settings.local_epochs,
            batch_size=settings.batch_size,
            optimizer=settings.optimizer,
            lr=settings.lr,
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
        )
        self.started = time.time()
        self.t0: float | None = None  # first task published
        self.tasks_issued = 0
        self.bytes_down = 0
        self.updates_total = 0
        self.best_accuracy = 0.0
        self.last_accuracy: float | None = None
        self.stop_reason: str | None = None
        self.target_reached = False
        self.evaluated_version = -1
        self.latest_announcement: ModelAnnouncement | None = None
        self.round = 0
        self.fleet_ready = False  # enough workers said hello (or the wait ran out): tasks may go out
        self._waiting_logged = 0.0
        self._eval_queue: asyncio.Queue[ModelAnnouncement] = asyncio.Queue()
        self._wake = asyncio.Event()
        self.metrics = JsonLines(out_dir / "metrics.jsonl")
        self.log = get_logger(service="coordinator", job=self.job_id)

    # -- the model --------------------------------------------------------
    async def ensure_initial_version(self) -> None:
        """Create version 0 from the app, or resume from the latest stored version."""
        latest = await self.store.latest()
        if latest is None:
            torch.manual_seed(self.s.model_seed)
            model = await asyncio.to_thread(self.app.build_model, self.s.model_seed)
            flat = FlatModel.from_state_dict(model.state_dict())
            blob = flat.to_bytes()
            manifest = Manifest(
                job_id=self.job_id,
                version=0,
                parent=-1,
                sha256=hashlib.sha256(blob).hexdigest(),
                size=len(blob),
                key=model_key(self.job_id, 0),
                update_ids=(),
                created_at=time.time(),
            )
            await self.store.save(manifest, blob)
            self.log.info("created_version_0", params=flat.spec.n_float + flat.spec.n_exact, bytes=len(blob))
            latest = 0
        else:
            self.log.info("resuming", version=latest)
        manifest, blob = await self.store.load_bytes(latest)
        self.latest = Latest(latest, manifest.sha256, manifest.key, blob)
        self.updates_total = manifest.updates_total
        evaluated = [m.get("version", -1) for m in read_lines(self.out_dir / "metrics.jsonl")]
        self.evaluated_version = max(evaluated, default=-1)
        self.latest_announcement = ModelAnnouncement(
            self.job_id,
            latest,
            manifest.parent,
            manifest.sha256,
            manifest.key,
            manifest.update_ids,
            manifest.created_at,
            manifest.mean_staleness,
            manifest.updates_total,
        )
        if latest not in evaluated:
            await self._eval_queue.put(self.latest_announcement)

    def resume_state(self) -> bool:
        """Pick an interrupted job up where the last coordinator process left it."""
        path = self.out_dir / "coordinator.json"
        if not path.exists():
            return False
        try:
            state = json.loads(path.read_text())
        except ValueError:
            return False
        if state.get("job_id") != self.job_id or state.get("stop_reason") is not None:
            return False
        now = time.time()
        self.started = state.get("started", self.started)
        self.t0 = state.get("t0")
        self.tasks_issued = state.get("tasks_issued", 0)
        self.bytes_down = state.get("bytes_down", 0)
        self.round = state.get("round", 0)
        self.best_accuracy = state.get("best_accuracy", 0.0)
        self.last_accuracy = state.get("last_accuracy")
        self.registry.counts.update(state.get("workers", {}))
        for tid, f in state.get("in_flight", {}).items():
            if f["deadline"] > now:
                self.in_flight[tid] = InFlight(f["capability"], f["deadline"], f["version"])
        self.log.info("resumed_job", in_flight=len(self.in_flight), tasks_issued=self.tasks_issued)
        return True

    async def forget_applied_in_flight(self) -> None:
        """After a restart: drop in-flight tasks that a stored version already applied.

        The saved state is up to a second old, so it can list tasks whose receipts and version
        announcement the last process consumed after its last write; nothing else would clear them
        before their TTL, and until then they hold the places of real work. A task based on version
        v can only be applied in a later version, so the manifests after the oldest base suffice."""
        if not self.in_flight or self.latest is None:
            return
        oldest = min(f.version for f in self.in_flight.values())
        dropped = 0
        for version in range(self.latest.version, oldest, -1):
            try:
                manifest = await self.store.manifest(version)
            except StoreError:
                continue
            for tid in manifest.update_ids:
                dropped += self.in_flight.pop(tid, None) is not None
            if not self.in_flight:
                break
        if dropped:
            self.log.info("in_flight_already_applied", count=dropped, in_flight=len(self.in_flight))

    # -- inputs -----------------------------------------------------------
    async def on_hello(self, delivery: Delivery) -> None:
        try:
            hello, env = decode(delivery.body, self.keyring, Hello)
        except WireError as exc:
            self.log.warning("hello_rejected", reason=exc.reason, detail=str(exc))
            await delivery.ack()
            return
        change = self.registry.observe(hello, env.signer, time.time())
        if change != "seen":
            self.log.info(f"worker_{change}", worker=hello.worker_id, capabilities=list(hello.capabilities))
            self._wake.set()
        await delivery.ack()

    async def on_model_event(self, delivery: Delivery) -> None:
        try:
            message, _ = decode(delivery.body, self.keyring, (ModelAnnouncement, Receipts, Receipt))
        except WireError as exc:
            self.log.warning("model_event_rejected", reason=exc.reason, detail=str(exc))
            await delivery.ack()
            return
        if isinstance(message, Receipts | Receipt):
            batch = message.receipts if isinstance(message, Receipts) else (message,)
            done = [self.in_flight.pop(r.task_id, None) for r in batch if r.job_id == self.job_id]
            if any(task is not None for task in done):
                self._wake.set()
        elif isinstance(message, ModelAnnouncement) and message.job_id == self.job_id:
            await self._adopt(message)
        await delivery.ack()

    async def _adopt(self, ann: ModelAnnouncement) -> None:
        assert self.latest is not None
        for tid in ann.update_ids:
            self.in_flight.pop(tid, None)
        if ann.version <= self.latest.version:
            return
        manifest, blob = await self.store.load_bytes(ann.version)
        if manifest.sha256 != ann.sha256:
            self.log.error("announcement_mismatch", version=ann.version)
            return
        self.latest = Latest(ann.version, manifest.sha256, manifest.key, blob)
        self.updates_total = max(self.updates_total, ann.updates_total)
        self.latest_announcement = ann
        await self._eval_queue.put(ann)
        self._wake.set()

    # -- evaluation -------------------------------------------------------
    async def evaluator(self) -> None:
        while True:
            ann = await self._eval_queue.get()
            while not self._eval_queue.empty():  # falling behind: evaluate the newest only
                ann = self._eval_queue.get_nowait()
            acc = await self._evaluate_and_record(ann)
            self._wake.set()
            if self.s.target_accuracy > 0 and acc >= self.s.target_accuracy:
                self.target_reached = True
                return  # the job ends on this version: later ones are not part of the result

    async def _evaluate_and_record(self, ann: ModelAnnouncement) -> float:
        """Evaluate one version on the test set and append it to metrics.jsonl."""
        blob = (
            self.latest.blob
            if self.latest and self.latest.version == ann.version
            else ((await self.store.load_bytes(ann.version))[1])
        )
        result = await asyncio.to_thread(self._evaluate, blob)
        acc = float(result.get("accuracy", 0.0))
        self.last_accuracy = acc
        self.best_accuracy = max(self.best_accuracy, acc)
        record = {
            "version": ann.version,
            "parent": ann.parent,
            **result,
            "updates_total": ann.updates_total,
            "updates_in_version": len(ann.update_ids),
            "mean_staleness": ann.mean_staleness,
            "created_at": ann.created_at,
            "t": (ann.created_at - self.t0) if self.t0 is not None and ann.version > 0 else 0.0,
            "wall": time.time() - self.started,
        }
        self.metrics.write(record)
        self.evaluated_version = ann.version
        self.log.info("evaluated", version=ann.version, accuracy=round(acc, 4))
        return acc

    def _evaluate(self, blob: bytes) -> dict[str, float]:
        torch.set_num_threads(1)
        model = self.app.build_model(self.s.model_seed)
        model.load_state_dict(FlatModel.from_bytes(blob).to_state_dict())
        return {k: float(v) for k, v in self.app.evaluate(model).items()}

    # -- output -----------------------------------------------------------
    async def _publish_task(self, capability: str, round_number: int = -1, ttl: float | None = None) -> None:
        assert self.latest is not None
        ttl = ttl or self.s.task_ttl
        now = time.time()
        inline = len(self.latest.blob) <= self.s.inline_limit
        task_id = uuid.uuid4().hex
        update_key = f"jobs/{self.job_id}/updates/{task_id}.bin"
        # presigned URLs let workers without store credentials use the store (S3); a local store has none
        model_url = "" if inline else await self._presign("get", self.latest.key, ttl)
        update_url = await self._presign("put", update_key, ttl) if self._large_updates() else ""
        task = Task(
            task_id=task_id,
            job_id=self.job_id,
            capability=capability,
            base_version=self.latest.version,
            model_sha256=self.latest.sha256,
            model_key=self.latest.key,
            train=self.train,
            quant=self.s.quant,
            block=self.s.block,
            deadline=now + ttl,
            issued_at=now,
            round=round_number,
            model_size=len(self.latest.blob),
            model_url=model_url,
            inline_limit=self.s.inline_limit,
            update_key=update_key,
            update_url=update_url,
            model=self.latest.blob if inline else b"",
        )
        body = encode(task, self.signer)
        self.in_flight[task.task_id] = InFlight(capability, task.deadline, task.base_version)
        await self.broker.publish(
            self.names.tasks_exchange, capability, body, expiration=ttl, message_id=task.task_id
        )
        if self.t0 is None:
            self.t0 = now
        self.tasks_issued += 1
        self.bytes_down += len(body)

    def _large_updates(self) -> bool:
        """Will an update of this model exceed the inline limit? (int8: ~1 byte per value)"""
        if self._spec is None:
            assert self.latest is not None
            self._spec = FlatModel.from_bytes(self.latest.blob).spec
        spec = self._spec
        per_value = 1 if self.s.quant == "int8" else 4
        return per_value * spec.n_float + 8 * spec.n_exact > self.s.inline_limit

    async def _presign(self, method: str, key: str, ttl: float) -> str:
        presign = getattr(self.store.objects, f"presign_{method}", None)
        if presign is None:
            return ""
        url = presign(key, int(ttl) + 600)
        if inspect.isawaitable(url):
            url = await url
        return str(url or "")

    def _check_fleet(self, now: float) -> bool:
        """May tasks go out? Once ``min_workers`` live workers have said hello, or ``min_workers_wait``
        seconds after the job started, and from then on for good. A resumed job that had already
        handed out work (``t0`` set) does not wait again."""
        if self.fleet_ready:
            return True
        have, need = self.registry.live_count(now), self.s.min_workers
        waited = now - self.started
        if self.t0 is not None or have >= need:
            self.fleet_ready = True
            if self.t0 is None:
                self.log.info("fleet_ready", have=have, need=need, waited=round(waited, 3))
        elif waited >= self.s.min_workers_wait:
            self.fleet_ready = True
            self.log.warning("starting_without_fleet", have=have, need=need, waited=round(waited, 3))
        elif now - self._waiting_logged >= WAITING_LOG_EVERY:
            self._waiting_logged = now
            self.log.info("waiting_for_workers", have=have, need=need, waited=round(waited, 3))
        return self.fleet_ready

    def _sweep(self, now: float) -> None:
        expired = [tid for tid, f in self.in_flight.items() if f.deadline < now]
        for tid in expired:
            del self.in_flight[tid]
        if expired:
            self.log.info("tasks_expired", count=len(expired))
        for worker in self.registry.expire(now):
            self.log.info("worker_lost", worker=worker)

    async def _top_up(self, now: float) -> None:
        counts = self.registry.primary_counts(self.s.capability_list, now)
        for cap, live in counts.items():
            if live == 0:
                continue
            target = self.s.concurrency or live
            have = sum(1 for f in self.in_flight.values() if f.capability == cap)
            for _ in range(target - have):
                await self._publish_task(cap)

    async def _sync_rounds(self) -> None:
        """One round at a time: open, hand out one task per live worker, close at the deadline."""
        while self.stop_reason is None:
            assert self.latest is not None
            now = time.time()
            counts = self.registry.primary_counts(self.s.capability_list, now)
            size = sum(counts.values())
            if size == 0 or not self._check_fleet(now):
                await self._sleep_or_wake(0.5)
                continue
            version = self.latest.version
            self.round += 1
            deadline = now + self.s.round_timeout
            opening = Round(self.job_id, version, self.round, size, deadline)
            await self.broker.publish(self.names.results_exchange, "", encode(opening, self.signer))
            for cap, n in counts.items():
                for _ in range(n):
                    await self._publish_task(cap, self.round, ttl=self.s.round_timeout)
            self.log.info("round_open", round=self.round, version=version, size=size)
            while self.latest.version == version and time.time() < deadline and self.stop_reason is None:
                await self._sleep_or_wake(0.5)
            if self.latest.version == version and self.stop_reason is None:
                closing = Round(self.job_id, version, self.round, size, deadline, close=True)
                await self.broker.publish(self.names.results_exchange, "", encode(closing, self.signer))
                self.log.info("round_deadline", round=self.round, version=version)
                until = time.time() + 5.0
                while self.latest.version == version and time.time() < until:
                    await self._sleep_or_wake(0.2)
            self.in_flight.clear()

    async def _sleep_or_wake(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    def _check_stop(self, now: float) -> str | None:
        s = self.s
        if (
            self.last_accuracy is not None
            and s.target_accuracy > 0
            and self.last_accuracy >= s.target_accuracy
        ):
            return "target_accuracy"
        if self.latest and s.max_versions and self.latest.version >= s.max_versions:
            return "max_versions"
        if s.max_updates and self.updates_total >= s.max_updates:
            return "max_updates"
        if s.max_seconds and now - self.started >= s.max_seconds:
            return "max_seconds"
        return None

    # -- main ---------------------------------------------------------------
    async def run(self) -> str:
        self.resume_state()
        await self.ensure_initial_version()
        await self.forget_applied_in_flight()
        await self.broker.subscribe(self.names.workers_exchange, ("",), self.on_hello)
        await self.broker.subscribe(
            self.names.models_exchange,
            (Names.model_key(self.job_id), Names.receipt_key(self.job_id)),
            self.on_model_event,
            queue=coordinator_inbox(self.names, self.job_id),
        )
        tasks = [asyncio.create_task(self.evaluator(), name="evaluator")]
        if self.s.mode == "sync":
            tasks.append(asyncio.create_task(self._sync_rounds(), name="rounds"))
        self.log.info("started", mode=self.s.mode, capabilities=list(self.s.capability_list))
        last_saved = 0.0
        try:
            while True:
                now = time.time()
                for t in tasks:
                    if t.done() and not t.cancelled() and t.exception() is not None:
                        raise FedqError(f"coordinator {t.get_name()} failed: {t.exception()!r}")
                self._sweep(now)
                self.stop_reason = self._check_stop(now)
                if self.stop_reason:
                    break
                if self.s.mode == "async" and self._check_fleet(now):
                    await self._top_up(now)
                elif self.s.mode == "sync":
                    self._check_fleet(now)  # the rounds wait on it; checked here too, so it is logged
                if now - last_saved >= 1.0:
                    self.write_state()
                    last_saved = now
                await self._sleep_or_wake(TICK if self.s.mode == "async" else 0.5)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            last = self.latest_announcement
            if (
                self.stop_reason not in (None, "target_accuracy")
                and last
                and last.version > self.evaluated_version
            ):
                await self._evaluate_and_record(last)  # the result is the final version, evaluated
            self.write_state()
        self.log.info(
            "stopped",
            reason=self.stop_reason,
            version=self.latest.version if self.latest else None,
            best_accuracy=round(self.best_accuracy, 4),
        )
        return self.stop_reason

    def write_state(self) -> None:
        state: dict[str, Any] = {
            "job_id": self.job_id,
            "mode": self.s.mode,
            "stop_reason": self.stop_reason,
            "started": self.started,
            "t0": self.t0,
            "stopped": time.time(),
            "tasks_issued": self.tasks_issued,
            "bytes_down": self.bytes_down,
            "latest_version": self.latest.version if self.latest else None,
            "best_accuracy": self.best_accuracy,
            "last_accuracy": self.last_accuracy,
            "workers_seen": sorted(self.registry.workers),
            "workers": self.registry.counts,
            "round": self.round,
            "fleet_ready": self.fleet_ready,
            "workers_live": self.registry.live_count(time.time()),
            "min_workers": self.s.min_workers,
            "in_flight": {
                tid: {"capability": f.capability, "deadline": f.deadline, "version": f.version}
                for tid, f in self.in_flight.items()
            },
        }
        path = self.out_dir / "coordinator.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
        tmp.replace(path)


def check_fleet_settings(settings: Settings) -> None:
    if settings.min_workers < 0:
        raise ConfigError(f"--min-workers must be 0 or more, not {settings.min_workers}")
    if settings.min_workers_wait < 0:
        raise ConfigError(f"--min-workers-wait must be 0 or more, not {settings.min_workers_wait}")


async def serve(settings: Settings, app: App) -> str:
    """Build the coordinator from settings and run the job to its stop condition."""
    names = Names(settings.namespace)
    check_token("job id", settings.job)
    check_fleet_settings(settings)
    signer = load_or_create_signer(settings.key_path("coordinator"))
    broker = await RabbitMQ(
        settings.amqp_url, names, f"fedq-coordinator-{settings.job}", settings.amqp_heartbeat
    ).connect()
    try:
        await broker.declare(topology(names, settings.capability_list))
        coordinator = Coordinator(
            settings=settings,
            broker=broker,
            store=ModelStore(open_store(settings.store, settings), settings.job),
            app=app,
            signer=signer,
            keyring=DirectoryKeyring(settings.trusted_dir),
            out_dir=settings.out_dir,
        )
        return await coordinator.run()
    finally:
        await broker.close()
