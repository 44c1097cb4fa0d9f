"""The coordinator service: the scheduler's decisions carried out over a transport and a store.

It owns the job: version 0, the tasks (``coordinator.scheduler`` decides how many and when),
the evaluation of every version (``coordinator.evaluation``) and the stop condition. It runs on
the shared ``Runtime``: hellos come from the workers exchange, receipts and version
announcements wait in the job's durable inbox; three loops run beside them (the tick: expiry,
stop rules, the fleet gate, async top-ups and the state file; evaluation; sync rounds).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from broker_config.names import Names
from broker_config.permissions import publisher_problem
from broker_config.topology import Topology, coordinator_inbox, topology
from coordinator.config import CoordinatorConfig, Mode
from coordinator.evaluation import Evaluator, Pending
from coordinator.registry import WorkerChange
from coordinator.scheduler import CloseRound, Fleet, Gate, OpenRound, Scheduler, StopReason
from coordinator.state import CoordinatorState
from coordinator.tasks import Latest, TaskMaker, applied_since, initial_version, sample_cap
from shared import metrics
from shared.app import App
from shared.codec import Envelope, encode
from shared.errors import ConfigError, CorruptVersionError, StoreError, UnsignedVersionError, WireError
from shared.keys import DirectoryTrust, key_file_signer
from shared.logs import get_logger
from shared.messages import Hello, ModelAnnouncement, Receipt, Receipts, Round
from shared.reasons import Reason
from shared.runtime import InvalidHandler, Runtime, Service
from shared.settings import Settings
from shared.signing import Keyring, Role, Signer, TrustReminder
from shared.store import Manifest, ModelStore, open_store
from shared.transport import Delivery, Transport
from shared.transport.connect import connected

TICK = 0.1  # async mode; sync mode ticks every 0.5 s
WAITING_LOG_EVERY = 5.0  # seconds between waiting_for_workers lines
SAVE_EVERY = 1.0  # seconds between writes of coordinator.json
METRICS_EVERY = 1.0  # seconds between updates of the fleet's gauges (--metrics-port)
QUEUE_DEPTH_EVERY = 2.0  # seconds between passive declares of the task queues, for their depth


class Coordinator(Service):
    name = "coordinator"

    def __init__(
        self,
        *,
        config: CoordinatorConfig,
        transport: Transport,
        store: ModelStore,
        app: App,
        signer: Signer,
        keyring: Keyring,
    ) -> None:
        if transport.names.job != config.job_id:
            raise ConfigError(
                f"the transport's names are job {transport.names.job!r}'s, not {config.job_id!r}'s"
            )
        self.config = config
        self.transport = transport
        self.names: Names = transport.names
        # every version read is verified against the trust set: a store that was handed in without
        # one gets this coordinator's
        self.store = store if store.trust is not None else ModelStore(store.objects, store.job_id, keyring)
        self.job_id = config.job_id
        self.signer = signer
        self.keyring = keyring
        self.log = get_logger(service="coordinator", job=self.job_id)
        config.out_dir.mkdir(parents=True, exist_ok=True)
        self.scheduler = Scheduler.begin(config, CoordinatorState.read(config.out_dir), time.time())
        self.evaluator = Evaluator(app, config.model_seed, config.out_dir, self.log)
        self.tasks = TaskMaker(config, store)
        self.latest: Latest | None = None
        self.latest_announcement: ModelAnnouncement | None = None
        self._app = app
        self._runtime: Runtime | None = None
        self._wake = asyncio.Event()
        self._waiting_logged = 0.0
        self.fleet_gauges = metrics.FleetGauges(self.job_id, config.capabilities)
        self.trust_reminder = TrustReminder(self.keyring, (Role.AGGREGATOR, Role.WORKER), self.log)

    # -- the runtime's side -----------------------------------------------------------------
    def topology(self) -> Topology:
        return topology(self.names, self.config.capabilities, shards=self.config.shards)

    async def start(self, runtime: Runtime) -> None:
        self._runtime = runtime
        if self.scheduler.resumed:
            state = self.scheduler.state
            self.log.info("resumed_job", in_flight=len(state.in_flight), tasks_issued=state.tasks_issued)
        self.trust_reminder.say(force=True)
        self.latest, self.latest_announcement = await initial_version(
            self.store, self._app, self.config.model_seed, self.log, self.signer
        )
        self.tasks.incarnation = await self.store.incarnation()
        self.tasks.max_samples = await asyncio.to_thread(sample_cap, self.config, self._app)
        self.scheduler.adopt(self.latest.version, self.latest_announcement.updates_total)
        metrics.version(self.job_id, "coordinator", self.latest.version)
        if self.latest.version not in self.evaluator.recorded:
            self.evaluator.submit(self.latest_announcement)
        await self._forget_applied_in_flight()
        await runtime.subscribe_messages(
            self.names.workers_exchange,
            (self.names.hello_key,),
            Hello,
            self.keyring,
            self.on_hello,
            on_invalid=self._rejected("hello_rejected"),
        )
        await runtime.subscribe_messages(
            self.names.models_exchange,
            (Names.model_key(self.job_id), Names.receipt_key(self.job_id)),
            (ModelAnnouncement, Receipts, Receipt),
            self.keyring,
            self.on_model_event,
            on_invalid=self._rejected("model_event_rejected"),
            durable=coordinator_inbox(self.names),
        )
        runtime.spawn("evaluator", self._evaluation)
        if self.config.mode is Mode.SYNC:
            runtime.spawn("rounds", self._rounds)
        runtime.spawn("tick", self._tick)
        if metrics.serving():
            runtime.spawn("metrics", self._metrics)
        self.log.info("started", mode=self.config.mode.value, capabilities=list(self.config.capabilities))

    async def run(self, runtime: Runtime | None = None) -> str:
        """Run the job to its stop condition (on ``runtime``, or one of its own); the stop reason."""
        runtime = runtime or Runtime(self.transport, job=self.job_id)
        try:
            reason: StopReason = await runtime.run(self)
            if reason is not StopReason.TARGET_ACCURACY:  # the result: every version up to the final one
                for pending in self.evaluator.unfinished():
                    self.scheduler.evaluated(await self._evaluate(pending))
                last = self.latest_announcement
                if last and last.version > self.evaluator.evaluated_version:
                    self.scheduler.evaluated(await self._evaluate(Pending(last, time.time())))
        finally:
            self.write_state()
        self.log.info(
            "stopped",
            reason=reason.value,
            version=self.latest.version if self.latest else None,
            best_accuracy=round(self.scheduler.state.best_accuracy, 4),
        )
        return reason.value

    def write_state(self) -> None:
        self.scheduler.snapshot(time.time()).write(self.config.out_dir)

    # -- inputs -----------------------------------------------------------------------------
    def _rejected(self, event: str) -> InvalidHandler:
        """Hellos and model events that fail their checks are logged and dead-lettered with their
        reason; an unknown signer also says which keys this coordinator lacks."""

        async def on_invalid(delivery: Delivery, error: WireError) -> None:
            self.log.warning(event, reason=error.reason, detail=str(error))
            if error.reason is Reason.UNKNOWN_SIGNER:
                self.trust_reminder.say()
            await delivery.dead_letter(error.reason, str(error))

        return on_invalid

    async def on_hello(self, hello: Hello, envelope: Envelope, delivery: Delivery) -> None:
        problem = publisher_problem(self.names, delivery.user_id, hello.worker_id, self.config.require_user_id)
        if problem:
            self.log.warning("hello_rejected", reason=Reason.WRONG_WORKER, detail=problem)
            await delivery.dead_letter(Reason.WRONG_WORKER, problem)
            return
        change = self.scheduler.hello(hello, envelope.signer, time.time())
        if change is not WorkerChange.SEEN:
            self.log.info(
                f"worker_{change.value}", worker=hello.worker_id, capabilities=list(hello.capabilities)
            )
            self._wake.set()
        await delivery.ack()

    async def on_model_event(self, message: Any, envelope: Envelope, delivery: Delivery) -> None:
        if isinstance(message, Receipts | Receipt):
            batch = message.receipts if isinstance(message, Receipts) else (message,)
            if self.scheduler.done(r.task_id for r in batch if r.job_id == self.job_id):
                self._wake.set()
        elif isinstance(message, ModelAnnouncement) and message.job_id == self.job_id:
            problem = await self._adopt(message)
            if problem is not None:
                reason, detail = problem
                self.log.warning("announcement_rejected", version=message.version, reason=reason, detail=detail)
                await delivery.dead_letter(reason, detail)
                return
        await delivery.ack()

    async def _adopt(self, ann: ModelAnnouncement) -> tuple[Reason, str] | None:
        """Take the announced version if the store holds it, signed by a key allowed to make it and
        with the announced sha256; else why not (the announcement is dead-lettered, not retried)."""
        if ann.version <= self.scheduler.version:
            self.scheduler.done(ann.update_ids)
            return None
        try:
            if not await self.store.exists(ann.version):
                return Reason.PAYLOAD_MISSING, f"version {ann.version} is not in the store"
            manifest, blob = await self.store.load_bytes(ann.version)
        except (UnsignedVersionError, CorruptVersionError) as exc:
            self.trust_reminder.say()
            return Reason.UNSIGNED_VERSION, str(exc)
        except StoreError as exc:
            return Reason.BAD_PAYLOAD, str(exc)
        if manifest.sha256 != ann.sha256:
            return Reason.BAD_PAYLOAD, f"version {ann.version} is stored with another sha256 than announced"
        await self._evaluate_skipped(ann.version)
        self._take(manifest, blob)
        return None

    def _take(self, manifest: Manifest, blob: bytes) -> None:
        """Adopt a verified stored version: tasks now carry it, and it is evaluated. A version older
        than one adopted while this one was read from the store only settles its tasks."""
        ann = manifest.announcement()
        self.scheduler.done(ann.update_ids)
        if ann.version <= self.scheduler.version:
            return
        self.latest = Latest(ann.version, manifest.sha256, manifest.key, blob)
        self.scheduler.adopt(ann.version, ann.updates_total)
        metrics.version(self.job_id, "coordinator", ann.version)
        metrics.received(self.job_id, "coordinator", len(blob))
        self.latest_announcement = ann
        self.evaluator.submit(ann)
        self._wake.set()

    async def _forget_applied_in_flight(self) -> None:
        """After a restart: drop in-flight tasks that a stored version already applied.

        The saved state is up to a second old, so it can list tasks whose receipts and version
        announcement the last process consumed after its last write; nothing else would clear them
        before their TTL, and until then they hold the places of real work."""
        in_flight = self.scheduler.in_flight
        if not in_flight:
            return
        oldest = min(f.version for f in in_flight.values())
        applied = await applied_since(self.store, oldest, self.scheduler.version, set(in_flight))
        if dropped := self.scheduler.done(applied):
            self.log.info("in_flight_already_applied", count=dropped, in_flight=len(in_flight))

    # -- loops ------------------------------------------------------------------------------
    async def _tick(self) -> None:
        """Expiry, stop rules, the fleet gate, async top-ups, the state file."""
        assert self._runtime is not None
        last_saved = 0.0
        while True:
            now = time.time()
            swept = self.scheduler.sweep(now)
            if swept.tasks:
                metrics.tasks_expired(self.job_id, swept.tasks)
                self.log.info("tasks_expired", count=swept.tasks)
            for worker in swept.workers:
                self.log.info("worker_lost", worker=worker)
            reason = self.scheduler.stop(now)
            if reason is not None:
                self._runtime.finish(reason)
                return
            if self._fleet(now).open:
                for publish in self.scheduler.top_up(now):
                    for _ in range(publish.count):
                        await self._publish_task(publish.capability, publish.round, publish.ttl)
            if now - last_saved >= SAVE_EVERY:
                self.write_state()
                last_saved = now
                await self._look_in_store()
            await self._sleep_or_wake(TICK if self.config.mode is Mode.ASYNC else 0.5)

    async def _evaluation(self) -> None:
        while True:
            pending = await self.evaluator.next()
            reached = self.scheduler.evaluated(await self._evaluate(pending))
            self._wake.set()
            if reached:
                return  # the job ends on this version: later ones are not part of the result

    async def _rounds(self) -> None:
        """Sync mode: one round at a time (``Scheduler.round_step``)."""
        while True:
            now = time.time()
            self._fleet(now)
            step = self.scheduler.round_step(now)
            if isinstance(step, OpenRound):
                opening = Round(self.job_id, step.version, step.round, step.size, step.deadline)
                await self.transport.publish(
                    self.names.results_exchange, self.names.results_key, encode(opening, self.signer)
                )
                for publish in step.tasks:
                    for _ in range(publish.count):
                        await self._publish_task(publish.capability, publish.round, publish.ttl)
                self.log.info("round_open", round=step.round, version=step.version, size=step.size)
            elif isinstance(step, CloseRound):
                closing = Round(self.job_id, step.version, step.round, step.size, step.deadline, close=True)
                await self.transport.publish(
                    self.names.results_exchange, self.names.results_key, encode(closing, self.signer)
                )
                self.log.info("round_deadline", round=step.round, version=step.version)
            await self._sleep_or_wake(0.2 if self.scheduler.round_closed else 0.5)

    async def _metrics(self) -> None:
        """With --metrics-port: the fleet's gauges every second, the task queues' depth every few
        (a passive declare each: a broker round trip, so not per scrape). A failed look is logged
        and tried again; it never stops the job."""
        depth_at = 0.0
        while True:
            now = time.time()
            self.observe_fleet(now)
            if now - depth_at >= QUEUE_DEPTH_EVERY:
                depth_at = now
                try:
                    await self.observe_queues()
                except Exception as exc:  # a lost link, a deleted queue: the gauges wait
                    self.log.warning("queue_depth_unknown", error=repr(exc))
            await asyncio.sleep(METRICS_EVERY)

    def observe_fleet(self, now: float) -> None:
        """Tasks in flight and live workers per capability, and the redeliveries workers report."""
        registry = self.scheduler.registry
        in_flight: dict[str, int] = {}
        for f in self.scheduler.in_flight.values():
            in_flight[f.capability] = in_flight.get(f.capability, 0) + 1
        live = {cap: len(registry.live(cap, now)) for cap in self.config.capabilities}
        redelivered = sum(c.get("redelivered", 0) for c in registry.counts.values())
        self.fleet_gauges.observe(in_flight, live, redelivered)

    async def observe_queues(self) -> None:
        for cap in self.config.capabilities:
            info = await self.transport.queue_info(self.names.task_queue(cap))
            if info is not None:
                self.fleet_gauges.queue(cap, info.messages, info.consumers)

    # -- helpers ----------------------------------------------------------------------------
    async def _look_in_store(self) -> None:
        """Versions the store holds that no announcement brought (one was refused before its
        aggregator's key was trusted, or lost): adopt the newest one whose signature verifies."""
        if not await self.store.exists(self.scheduler.version + 1):
            return
        newest = await self.store.latest_signed()
        if newest is None or newest <= self.scheduler.version:
            self.trust_reminder.say()
            return
        manifest, blob = await self.store.load_bytes(newest)
        self.log.info("version_found_in_store", version=newest)
        await self._evaluate_skipped(newest)
        self._take(manifest, blob)

    async def _evaluate_skipped(self, version: int) -> None:
        """Queue for evaluation the signed versions between the adopted one and ``version``, which
        no announcement brought (every version is evaluated)."""
        for v in range(self.scheduler.version + 1, version):
            try:
                self.evaluator.submit((await self.store.manifest(v)).announcement())
            except (StoreError, UnsignedVersionError) as exc:  # gone, or not signed for this job
                self.log.warning("version_not_evaluated", version=v, detail=str(exc))

    def _fleet(self, now: float) -> Fleet:
        """The fleet gate, logged: when it opens, and every few seconds while it waits."""
        fleet = self.scheduler.fleet(now)
        seen = {"have": fleet.have, "need": fleet.need, "waited": round(fleet.waited, 3)}
        if fleet.gate is Gate.READY:
            self.log.info("fleet_ready", **seen)
        elif fleet.gate is Gate.WITHOUT_FLEET:
            self.log.warning("starting_without_fleet", **seen)
        elif fleet.gate is Gate.WAITING and now - self._waiting_logged >= WAITING_LOG_EVERY:
            self._waiting_logged = now
            self.log.info("waiting_for_workers", **seen)
        return fleet

    async def _publish_task(self, capability: str, round_number: int, ttl: float) -> None:
        assert self.latest is not None
        now = time.time()
        task = await self.tasks.make(self.latest, capability, round_number, ttl, now)
        body = encode(task, self.signer)
        self.scheduler.issued(task.task_id, capability, task.base_version, task.deadline, len(body), now)
        await self.transport.publish(
            self.names.tasks_exchange,
            self.names.task_key(capability),
            body,
            expiration=ttl,
            message_id=task.task_id,
        )
        metrics.task_issued(self.job_id, capability, len(body))  # published: a failed publish is no task

    async def _evaluate(self, pending: Pending) -> float:
        latest, version = self.latest, pending.ann.version
        blob = latest.blob if latest and latest.version == version else (await self.store.load_bytes(version))[1]
        state = self.scheduler.state
        accuracy = await self.evaluator.evaluate(pending, blob, t0=state.t0, started=state.started)
        metrics.evaluated(self.job_id, version, accuracy)
        return accuracy

    async def _sleep_or_wake(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()


async def serve(settings: Settings, app: App) -> str:
    """Build the coordinator from settings and run the job to its stop condition; the stop reason."""
    config = CoordinatorConfig.from_settings(settings)
    metrics.serve(settings.metrics_port, "coordinator", settings.metrics_host)
    signer = key_file_signer(settings.key_path("coordinator"))
    trust = DirectoryTrust(settings.trusted_dir)
    async with connected(settings, f"fedq-coordinator-{settings.job}") as transport:
        coordinator = Coordinator(
            config=config,
            transport=transport,
            store=ModelStore(open_store(settings.store, settings), settings.job, trust),
            app=app,
            signer=signer,
            keyring=trust,
        )
        return await coordinator.run()
