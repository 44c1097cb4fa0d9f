"""The aggregator service: verify, screen and fold updates; store and announce versions.

It consumes ``<ns>.updates`` (single active consumer: a standby aggregator
takes over when this one dies). An update is acked only after the version that
contains it is stored; a rejected one is dead-lettered with its reason first.

Sync rounds come on the same queue. A round's opening message is acked only once the
round is over (its version stored, or it closed with nothing), so an aggregator that
takes over, a restarted one or a standby, gets it again with the round's answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

import torch

from aggregator.binding import bind
from aggregator.config import AggregatorConfig
from aggregator.core import (
    NOISE_RECORD,
    Accepted,
    AggregatorCore,
    DpRecord,
    NewVersion,
    Rejected,
    RoundFit,
)
from broker_config.names import Names
from broker_config.permissions import publisher_problem
from broker_config.topology import Topology, topology
from shared import metrics
from shared.aggregation import CLIP_WINDOW, clip_window_of
from shared.codec import MAX_HEAD_BYTES, Envelope, encode
from shared.errors import (
    CorruptVersionError,
    FedqError,
    ServiceFailure,
    StoreError,
    UnsignedVersionError,
    WireError,
)
from shared.keys import DirectoryTrust, key_file_signer
from shared.ledger import JsonLines, claimed_costs
from shared.logs import get_logger
from shared.messages import Message, Receipt, Receipts, Round, Task, Update
from shared.privacy import DP_ACCOUNTING
from shared.reasons import Fate, Reason
from shared.runtime import FATAL, Runtime, Service
from shared.server_opt import ServerState
from shared.settings import Settings
from shared.signing import Keyring, Role, Signer, TrustReminder
from shared.store import SERVER_STATE, Manifest, ModelStore, model_key, open_store
from shared.tensors import FlatModel
from shared.transport import Delivery, Transport
from shared.transport.connect import connected

OFFLOAD_BYTES = 1 << 20  # screen large updates off the event loop
CATCH_UP_SECONDS = 0.5  # how often to look for versions another aggregator stored


@dataclass
class Held:
    """An accepted update waiting in the buffer; its deliveries are acked once its version is stored."""

    update: Update
    accepted: Accepted
    size: int
    deliveries: list[Delivery]
    task: Task | None = None  # the coordinator's task it answers (from its token)

    @functools.cached_property
    def digest(self) -> str:
        """Names the exact message applied (a redone task has the same id but other bytes)."""
        return hashlib.sha256(self.deliveries[0].body).hexdigest()


@dataclass
class Parked:
    """A sync answer to a round this aggregator has not heard of yet (its round message comes
    later, e.g. given again after a restart): held unacked and unscreened until it does."""

    update: Update  # bound to its task
    task: Task
    deliveries: list[Delivery]
    signer: str


async def resolve_claim(store: ModelStore, update: Update) -> Update | Rejected:
    """Fetch a claim-checked delta from the store and check it against the signed key, size and sha256."""
    tid = update.task_id
    prefix = f"jobs/{update.job_id}/updates/"
    if update.delta:
        return Rejected(tid, Reason.UNDECODABLE, "an update carries either a delta or a claim check, not both")
    if not update.delta_key.startswith(prefix) or ".." in update.delta_key:
        return Rejected(tid, Reason.BAD_PAYLOAD, f"claim check {update.delta_key!r} is outside {prefix}")
    try:
        blob = await store.objects.get(update.delta_key)
    except StoreError as exc:
        return Rejected(tid, Reason.PAYLOAD_MISSING, str(exc))
    except OSError as exc:  # a key naming a directory, a file we may not read: this update only
        return Rejected(tid, Reason.BAD_PAYLOAD, f"claim check {update.delta_key!r}: {exc.strerror or exc}")
    if len(blob) != update.delta_size or hashlib.sha256(blob).hexdigest() != update.delta_sha256:
        return Rejected(tid, Reason.BAD_PAYLOAD, f"{update.delta_key} does not match the signed size and sha256")
    return dataclasses.replace(update, delta=blob)


class Aggregator(Service):
    name = "aggregator"

    def __init__(
        self,
        config: AggregatorConfig,
        *,
        transport: Transport,
        store: ModelStore,
        signer: Signer,
        keyring: Keyring,
        ledger: JsonLines,
    ) -> None:
        """``keyring``: the trust set (roles decide who may send what; the coordinator's keys
        vouch for tasks, aggregator keys for versions); every version read is verified with it."""
        self.config = config
        self.transport = transport
        self.names: Names = transport.names
        self.store = store if store.trust is not None else ModelStore(store.objects, store.job_id, keyring)
        self.job_id = store.job_id
        self.incarnation = ""  # the job's, from version 0
        self.policy = config.policy
        self.signer = signer
        self.keyring = keyring
        self.ledger = ledger
        self._refused: set[int] = set()  # unsigned versions already logged
        self.core: AggregatorCore | None = None
        self.held: list[Held] = []
        self.parked: list[Parked] = []
        # Sync rounds heard of and not yet over, by number, with their deliveries. Their acks wait
        # for the round's end (``_settle_rounds``): until then the broker keeps the message, and
        # gives it again to whichever aggregator consumes next. That is what a restart and a
        # standby have in common (the queue); the store only learns of a round when it ends,
        # and a coordinator re-announcing rounds would leave a gap in which answers are refused.
        self.rounds: dict[int, tuple[Round, list[Delivery]]] = {}
        self._lock = asyncio.Lock()
        self.receipts = ReceiptSender(transport, signer, self.job_id)
        self._checked_store_at = -math.inf
        self.log = get_logger(service="aggregator", job=self.job_id)
        # updates need an enrolled worker; rounds and tasks a coordinator
        self.trust_reminder = TrustReminder(self.keyring, (Role.WORKER, Role.COORDINATOR), self.log)

    async def load(self, wait: float = 120.0) -> AggregatorCore:
        """Resume from the latest stored version (waiting for v0 if the job is new)."""
        deadline = time.monotonic() + wait
        latest = await self.store.latest_signed()
        while latest is None:
            if time.monotonic() > deadline:
                raise FedqError(
                    f"no signed version 0 of job {self.job_id} appeared in the store"
                    + "".join(f"; {p}" for p in self.keyring.missing(Role.COORDINATOR))
                )
            self.log.info("waiting_for_version_0", missing=self.keyring.missing(Role.COORDINATOR))
            await asyncio.sleep(0.5)
            latest = await self.store.latest_signed()
        self.incarnation = await self.store.incarnation()
        manifest, model = await self.store.load(latest)
        applied: set[str] = set()
        for v in await self.store.versions():
            if v > latest:
                continue
            try:
                applied.update((await self.store.manifest(v)).update_ids)
            except (UnsignedVersionError, CorruptVersionError) as exc:  # history rewritten without the key
                self.log.error("unsigned_version_refused", version=v, detail=str(exc))
        self.core = AggregatorCore(
            model,
            latest,
            self.policy,
            self.job_id,
            applied,
            manifest.updates_total,
            clip_window_of(manifest.policy),
            await self._server_state(manifest),
            DpRecord.of(manifest.policy),
            await self._bases(latest, model),
        )
        metrics.version(self.job_id, "aggregator", latest)
        self.log.info("resumed", version=latest, applied=len(applied), policy=self.policy.to_dict())
        return self.core

    async def _server_state(self, manifest: Manifest) -> ServerState | None:
        """FedOpt's moments as of ``manifest``'s version (none: a fresh optimizer; so after a
        rollback, whose version carries none)."""
        if not self.policy.server_opt.stateful:
            return None
        blob = await self.store.load_state(manifest)
        return None if blob is None else ServerState.from_bytes(blob)

    async def _bases(self, latest: int, model: FlatModel) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """--mode fedasync: the versions updates may be based on (max staleness back), from the store."""
        if self.policy.mode != "fedasync":
            return {}
        bases = {latest: (model.floats, model.exact)}
        for v in range(max(0, latest - self.policy.max_staleness), latest):
            with contextlib.suppress(StoreError, UnsignedVersionError, CorruptVersionError):
                older = (await self.store.load(v))[1]
                bases[v] = (older.floats, older.exact)
        return bases

    async def _catch_up(self, force: bool = False) -> bool:
        """Another aggregator wrote newer versions (we were the standby, or lost our link):
        adopt the newest stored version and re-offer what we still hold that it lacks.

        The store is asked at most every ``CATCH_UP_SECONDS`` (an S3 HEAD per update would
        cost more than the update), and always (``force``) before writing a version or
        rejecting an update as based on a version we do not know. Returns whether it adopted."""
        assert self.core is not None
        now = time.monotonic()
        if not force and now - self._checked_store_at < CATCH_UP_SECONDS:
            return False
        self._checked_store_at = now
        if await self._stored(self.core.version + 1) is None:
            return False
        held, self.held = self.held, []
        await self.load()
        assert self.core is not None
        for number in sorted(self.rounds):  # the new core has heard of no round yet
            self.core.open_round(self.rounds[number][0])
        await self._reoffer(held)
        await self._settle_rounds()
        self.log.info("caught_up", version=self.core.version, still_held=len(self.held))
        return True

    async def _stored(self, version: int) -> Manifest | None:
        """``version``'s manifest, if another aggregator stored it and signed it with a key that may
        make versions (a refused one is logged once)."""
        if not await self.store.exists(version):
            return None
        try:
            return await self.store.manifest(version)
        except (UnsignedVersionError, CorruptVersionError) as exc:  # its writer holds no key that may make versions
            if version not in self._refused:
                self._refused.add(version)
                self.log.error("unsigned_version_refused", version=version, detail=str(exc))
            return None

    async def _reoffer(self, held: list[Held]) -> None:
        """Offer held updates to a core that adopted a newer version: one it already holds in a
        stored version is acked, one it refuses now (stale) is rejected."""
        assert self.core is not None
        for h in held:
            if h.update.task_id in self.core.applied:
                for d in h.deliveries:
                    await d.ack()  # already in a stored version; the copy we hold is done
                continue
            result = self.core.offer(h.update, self._round_of(h.task))
            if isinstance(result, Accepted):
                self.held.append(Held(h.update, result, h.size, h.deliveries, h.task))
            else:
                for d in h.deliveries:
                    await self._reject(d, h.update, result, "")

    def _kept(self) -> list[Held | Parked]:
        """The updates this aggregator holds unacked (a redelivery of one of them counts once)."""
        return [*self.held, *self.parked]

    # -- the service ------------------------------------------------------------------------
    def topology(self) -> Topology:
        return topology(self.names, self.config.capabilities, shards=self.config.shards)

    async def start(self, runtime: Runtime) -> None:
        if self.core is None:
            await self.load(self.config.load_wait)
        prefetch = 1024 if self.policy.mode == "sync" else max(4 * self.policy.k, 64)
        # unacked until their version is stored: a buffer (or the clip's warm-up), a whole sync round
        need = prefetch if self.policy.mode == "sync" else max(self.policy.k, self.policy.clip.warmup) + 1
        runtime.spawn("receipts", self.receipts.run)
        # Decoding and verifying happen in the runtime, before the lock: they overlap the fold of
        # the update before (in a thread, on another core, for large ones).
        await runtime.consume_messages(
            self.names.updates_queue,
            (Update, Round),
            self.keyring,
            self.handle,
            prefetch=prefetch,
            need=need,
            on_invalid=self._on_invalid,
        )
        self.log.info("consuming", queue=self.names.updates_queue, prefetch=prefetch)

    async def stopping(self) -> None:
        self.record_pending()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run on the shared runtime over this aggregator's transport (already connected)."""
        await Runtime(self.transport, job=self.job_id).run(self, stop)

    def record_pending(self) -> None:
        """On a clean stop: what we hold unacked goes back to the queue; say so in the ledger."""
        for h in self.held:
            self.ledger.write(
                {
                    "t": time.time(),
                    "task_id": h.update.task_id,
                    "worker_id": h.update.worker_id,
                    "fate": Fate.PENDING,
                    "bytes": h.size,
                    "staleness": h.accepted.staleness,
                    "digest": h.digest,
                    **claimed_costs(h.update),
                }
            )
        for p in self.parked:
            self.ledger.write(
                {
                    "t": time.time(),
                    "task_id": p.update.task_id,
                    "worker_id": p.update.worker_id,
                    "fate": Fate.PENDING,
                    "bytes": len(p.deliveries[0].body),
                    "staleness": 0,
                    "digest": hashlib.sha256(p.deliveries[0].body).hexdigest(),
                    **claimed_costs(p.update),
                }
            )
        if self.held or self.parked:
            self.log.info("stopped_with_pending", pending=len(self.held), parked=len(self.parked))

    async def _on_invalid(self, delivery: Delivery, error: WireError) -> None:
        if error.reason is Reason.UNKNOWN_SIGNER:
            self.trust_reminder.say()
        await self._reject(delivery, None, Rejected("", error.reason, str(error)), signer="")

    async def handle(self, message: Message, envelope: Envelope, delivery: Delivery) -> None:
        async with self._lock:
            await self._catch_up()
            assert self.core is not None
            if isinstance(message, Round):
                await self._on_round(delivery, message, envelope.signer)
            elif isinstance(message, Update):
                await self._on_update(delivery, message, envelope.signer)

    async def _on_update(self, delivery: Delivery, message: Update, signer: str) -> None:
        assert self.core is not None
        raw = delivery.body
        metrics.received(self.job_id, "aggregator", len(raw))  # its claim-checked delta once fetched
        if delivery.redelivered:
            # The broker gave us again a message we already hold (our channel was restored):
            # the new delivery is the one to ack; the update counts once.
            same = next((h for h in self._kept() if h.update.task_id == message.task_id), None)
            if same is not None and raw == same.deliveries[0].body:
                same.deliveries.append(delivery)
                return
        try:
            task: Task | None = None
            bound = bind(message, self.keyring, self.job_id, self.incarnation)
            if problem := publisher_problem(self.names, delivery.user_id, message.worker_id, self.config.require_user_id):
                bound = Rejected(message.task_id, Reason.WRONG_WORKER, problem)
            if isinstance(bound, Rejected):
                result: tuple[Accepted, Update] | Rejected = bound
            else:
                bound_update, task = bound
                if bound_update.base_version > self.core.version:
                    await self._catch_up(force=True)  # the round it answers may be on that version
                if self._unheard(bound_update, task):
                    self.parked.append(Parked(bound_update, task, [delivery], signer))
                    self.log.info("update_waits_for_round", task=message.task_id, round=task.round)
                    return
                result = await self._screen(bound_update, self._round_of(task))
        except FATAL:
            raise
        except Exception as exc:  # a bug or a hostile payload we did not foresee: this update only
            self.log.exception("update_failed", task=message.task_id)
            result = Rejected(message.task_id, Reason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
        if isinstance(result, Rejected):
            await self._reject(delivery, message, result, signer)
            return
        accepted, message = result
        self.held.append(Held(message, accepted, self._wire_size(raw, message), [delivery], task))
        self.log.debug("update_buffered", task=message.task_id, buffered=len(self.held))
        self._receipt(message, "buffered", "", accepted.staleness)
        if self.core.ready():
            try:
                await self._flush()
            except FATAL:
                raise
            except Exception as exc:  # the core may be half-changed: start again from the store
                raise ServiceFailure(f"making a version failed: {exc!r}") from exc

    def _round_of(self, task: Task | None) -> int | None:
        """The sync round an update's task was issued for (``None``: async, or a task of no round)."""
        if self.policy.mode != "sync" or task is None or task.round < 0:
            return None
        return task.round

    def _unheard(self, update: Update, task: Task) -> bool:
        """Does ``update`` answer a round on the current version this aggregator has not heard of?"""
        assert self.core is not None
        number = self._round_of(task)
        return (
            number is not None
            and update.base_version == self.core.version
            and self.core.round_fit(number) is RoundFit.UNHEARD
        )

    async def _screen(self, message: Update, round_number: int | None = None) -> tuple[Accepted, Update] | Rejected:
        """Resolve a claim check, then offer the update to the core."""
        if message.delta_key:
            resolved = await resolve_claim(self.store, message)
            if isinstance(resolved, Rejected):
                return resolved
            message = resolved
        result = await self._offer(message, round_number)
        if isinstance(result, Rejected) and result.reason is Reason.FUTURE_VERSION and await self._catch_up(True):
            result = await self._offer(message, round_number)
        return result if isinstance(result, Rejected) else (result, message)

    async def _offer(self, message: Update, round_number: int | None) -> Accepted | Rejected:
        assert self.core is not None
        if len(message.delta) > OFFLOAD_BYTES:
            return await asyncio.to_thread(self.core.offer, message, round_number)
        return self.core.offer(message, round_number)

    async def _on_round(self, delivery: Delivery, message: Round, signer: str) -> None:
        assert self.core is not None  # only a coordinator key gets here (shared.codec.decode)
        if message.job_id != self.job_id:
            await delivery.ack()
            return
        if message.version > self.core.version:
            await self._catch_up(force=True)  # another aggregator stored the round's version
        if message.close:
            # A restart may hear of a round first from its close: its parked answers count.
            self.core.open_round(dataclasses.replace(message, close=False))
            await self._offer_parked()
            if self.core.close_round(message):
                await self._flush()
            await self._offer_parked()  # answers to a round that closed with nothing are stale
            await delivery.ack()
        elif self.core.round_over(message):
            await delivery.ack()  # its version is made, or it closed: nothing to collect
        else:
            self.rounds.setdefault(message.round, (message, []))[1].append(delivery)
            self.core.open_round(message)
            self.log.info("round_open", version=message.version, round=message.round, size=message.size)
            await self._offer_parked()
            if self.core.ready():
                await self._flush()
        await self._settle_rounds()

    async def _offer_parked(self) -> None:
        """Screen the parked answers whose round is now known (or over: they are rejected)."""
        waiting, self.parked = self.parked, []
        for p in waiting:
            if self._unheard(p.update, p.task):
                self.parked.append(p)
                continue
            try:
                result = await self._screen(p.update, self._round_of(p.task))
            except FATAL:
                raise
            except Exception as exc:  # as in ``_on_update``: this update only
                self.log.exception("update_failed", task=p.update.task_id)
                result = Rejected(p.update.task_id, Reason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
            if isinstance(result, Rejected):
                for d in p.deliveries:
                    await self._reject(d, p.update, result, p.signer)
                continue
            accepted, update = result
            self.held.append(Held(update, accepted, self._wire_size(p.deliveries[0].body, update), p.deliveries, p.task))
            self._receipt(update, "buffered", "", accepted.staleness)

    def _wire_size(self, raw: bytes, update: Update) -> int:
        """What an accepted update cost on the wire: its message, and its claim-checked delta, whose
        size was checked when it was fetched. An inline update's ``delta_size`` is the sender's
        word only (it could claim any figure), so it never counts."""
        if not update.delta_key:
            return len(raw)
        metrics.received(self.job_id, "aggregator", update.delta_size)
        return len(raw) + update.delta_size

    async def _settle_rounds(self) -> None:
        """Ack the opening messages of the rounds that are over."""
        assert self.core is not None
        for number, (message, deliveries) in list(self.rounds.items()):
            if self.core.round_over(message):
                del self.rounds[number]
                for d in deliveries:
                    await d.ack()

    async def _flush(self) -> None:
        assert self.core is not None
        if await self._catch_up(force=True) and not self.core.ready():
            return  # never write over a version another aggregator stored
        seed = secrets.randbits(63) if self.policy.central_dp is not None else None
        new: NewVersion = self.core.flush(seed)
        manifest = await self._save_version(new, tuple(h.digest for h in self.held), seed)
        clips = new.clips  # final: an update held in the clip's warm-up learns its clip only now
        held, self.held = self.held, []
        stored_at = time.time()
        # The ledger first, right after the store: a process killed on the way through the acks
        # and the announcement leaves no stored version whose updates the ledger lacks.
        for h in held:
            metrics.applied(self.job_id, h.accepted.staleness, h.update.sent_at, stored_at)
        self.ledger.write_all(
            {
                "t": stored_at,
                "task_id": h.update.task_id,
                "worker_id": h.update.worker_id,
                "fate": Fate.APPLIED,
                "version": new.version,
                "staleness": h.accepted.staleness,
                "weight": h.accepted.weight,
                "norm": h.accepted.norm,
                "clip": clips.get(h.update.task_id, h.accepted.clip),  # the norm clip's scale (1.0: none)
                # --robust cosine: an update pointing away from the buffer's median (cosine <= 0)
                # is left out of the version; it is still applied in the ledger's sense (in
                # the version's update_ids, acked, its task done) but contributed nothing.
                "left_out": h.update.task_id in new.left_out,
                "cosine": new.cosines.get(h.update.task_id),  # None unless --robust cosine
                # from the coordinator's task: what it was issued for, and whether the worker
                # sent it after the deadline (counted all the same: staleness weighs it)
                "capability": h.task.capability if h.task else "",
                "late": bool(h.task and h.update.sent_at > h.task.deadline),
                "bytes": h.size,
                "num_samples": h.update.num_samples,
                "digest": h.digest,
                "redelivered": any(d.redelivered for d in h.deliveries),
                **claimed_costs(h.update),  # the worker's org and what it says the update cost it
            }
            for h in held
        )
        await self._announce(manifest)
        for h in held:
            for delivery in h.deliveries:
                await delivery.ack()
        self.log.info(
            "version",
            version=new.version,
            updates=len(new.update_ids),
            mean_staleness=round(new.mean_staleness, 3),
            sha256=manifest.sha256[:12],
        )
        await self._settle_rounds()

    async def _save_version(
        self, new: NewVersion, digests: tuple[str, ...], seed: int | None = None, more: dict[str, Any] | None = None
    ) -> Manifest:
        """Sign and store ``new`` (its updates' message digests in order); ``more`` joins the
        manifest's policy record. ``_announce`` tells the fleet."""
        assert self.core is not None
        state = None if new.server_state is None else new.server_state.to_bytes()
        record: dict[str, Any] = {**self.policy.to_dict(), CLIP_WINDOW: list(new.clip_window), **(more or {})}
        if state is not None:
            record[SERVER_STATE] = {"sha256": hashlib.sha256(state).hexdigest(), "size": len(state)}
        if new.dp is not None:
            record[DP_ACCOUNTING] = new.dp.to_dict()
        blob = new.model.to_bytes()
        manifest = Manifest(
            job_id=self.job_id,
            version=new.version,
            parent=new.parent,
            sha256=hashlib.sha256(blob).hexdigest(),
            size=len(blob),
            key=model_key(self.job_id, new.version),
            update_ids=new.update_ids,
            update_digests=digests,
            created_at=time.time(),
            policy=record,
            mean_staleness=new.mean_staleness,
            updates_total=self.core.updates_total,
            incarnation=self.incarnation,
        ).signed_by(self.signer)
        if seed is not None:
            # Before the version exists: replay needs the seed to re-derive it. A version made again
            # after a failed save has a record of its own; replay tries each (``NOISE_RECORD``).
            self.ledger.write({"t": time.time(), "kind": NOISE_RECORD, "version": new.version, "noise_seed": seed})
        await self.store.save(manifest, blob, state)
        metrics.version_made(self.job_id, new.version, len(blob))
        return manifest

    async def _announce(self, manifest: Manifest) -> None:
        """A stored version, announced on the models exchange (signed)."""
        await self.transport.publish(
            self.names.models_exchange,
            Names.model_key(self.job_id),
            encode(manifest.announcement(), self.signer),
        )

    @staticmethod
    async def _digest(body: bytes, reason: Reason) -> str | None:
        """A rejected message's sha256, hashed off the event loop when large; none for one refused
        as too large: a flood of them must cost no more than their length was looked at."""
        if reason is Reason.TOO_LARGE:
            return None
        if len(body) > OFFLOAD_BYTES:
            return await asyncio.to_thread(lambda: hashlib.sha256(body).hexdigest())
        return hashlib.sha256(body).hexdigest()

    async def _reject(
        self, delivery: Delivery, update: Update | None, rejected: Rejected, signer: str
    ) -> None:
        await delivery.dead_letter(rejected.reason, rejected.detail)
        metrics.rejected(self.job_id, rejected.reason)
        record: dict[str, Any] = {
            "t": time.time(),
            "task_id": rejected.task_id,
            "fate": Fate.REJECTED,
            "reason": rejected.reason,
            "detail": rejected.detail,
            "bytes": len(delivery.body),
            "signer": signer,
            "staleness": rejected.staleness,
            "worker_id": update.worker_id if update else "",
            "redelivered": delivery.redelivered,
            "digest": await self._digest(delivery.body, rejected.reason),  # one message, however often delivered
            **claimed_costs(update),
        }
        self.ledger.write(record)
        self.log.warning(
            "update_rejected", reason=rejected.reason, detail=rejected.detail, task=rejected.task_id
        )
        if update is not None:
            self._receipt(update, "rejected", rejected.reason, rejected.staleness)

    def _receipt(self, update: Update, fate: str, reason: str, staleness: int) -> None:
        assert self.core is not None
        if update.job_id == self.job_id:
            self.receipts.add(
                Receipt(
                    self.job_id, update.task_id, update.worker_id, fate, reason, self.core.version, staleness
                )
            )


class ReceiptSender:
    """Receipts go to the coordinator in the background, batched: one message in flight at a
    time, carrying every receipt that piled up while the last one awaited its confirm.

    They are advisory (the coordinator also learns from announcements), so no update waits
    for one, and a receipt the broker will not take is logged and dropped."""

    LIMIT = 256  # receipts per message (about 40 kB with the usual ids; longer ones are split)

    def __init__(self, transport: Transport, signer: Signer, job_id: str) -> None:
        self.transport = transport
        self.signer = signer
        self.job_id = job_id
        self.pending: list[Receipt] = []
        self._wake = asyncio.Event()
        self.log = get_logger(service="aggregator", job=job_id)

    def add(self, receipt: Receipt) -> None:
        self.pending.append(receipt)
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.pending:
                batch, self.pending = self.pending[: self.LIMIT], self.pending[self.LIMIT :]
                await self._send(batch)

    async def _send(self, batch: list[Receipt]) -> None:
        body = encode(Receipts(self.job_id, tuple(batch)), self.signer)
        if len(body) > MAX_HEAD_BYTES and len(batch) > 1:  # long ids: split until each fits
            half = len(batch) // 2
            await self._send(batch[:half])
            await self._send(batch[half:])
            return
        key = Names.receipt_key(self.job_id)  # no listener bound is no error
        try:
            await self.transport.publish(self.transport.names.models_exchange, key, body, mandatory=False)
        except FedqError as exc:
            self.log.warning("receipts_not_sent", receipts=len(batch), error=str(exc))


def ledger_name(config: AggregatorConfig) -> str:
    """The ledger's file in the out folder: ``ledger.jsonl`` (an edge's: ``ledger-edge-<shard>.jsonl``)."""
    return f"ledger-edge-{config.shard}.jsonl" if config.tier == "edge" else "ledger.jsonl"


async def serve(settings: Settings) -> None:
    """Build the aggregator from settings and run it until stopped or failed."""
    config = AggregatorConfig.from_settings(settings)
    metrics.serve(settings.metrics_port, "aggregator", settings.metrics_host)
    signer = key_file_signer(settings.key_path("aggregator"))
    trust = DirectoryTrust(settings.trusted_dir)
    from aggregator.tiers import EdgeAggregator, RootAggregator

    kind = {"single": Aggregator, "edge": EdgeAggregator, "root": RootAggregator}[config.tier]
    name = f"fedq-aggregator-{settings.job}" + (f"-edge-{config.shard}" if config.tier == "edge" else "")
    async with connected(settings, name) as transport:
        ledger = JsonLines(settings.out_dir / ledger_name(config))
        aggregator = kind(
            config,
            transport=transport,
            store=ModelStore(open_store(settings.store, settings), settings.job, trust),
            signer=signer,
            keyring=trust,
            ledger=ledger,
        )
        await aggregator.run()
