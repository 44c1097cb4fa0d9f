"""Edge aggregation: edges fold a shard's updates into partial aggregates, a root folds partials.

An edge (``fedq aggregator --tier edge --shard I``) consumes shard I's updates queue (single
active consumer: a standby edge takes over) and screens, clips and weighs each update as a
single aggregator would, against the newest root version it has read from the store. Every
``--buffer`` updates it publishes a signed ``Partial``: the weighted sum, the weights and, per
update, its id and message digest. It holds the updates unacked until its inbox tells it what
became of the partial: a version announced whose manifest holds them (they are stored), or the
root's ``Verdict`` refusing it.
A refused partial's updates that a version already holds (another partial had them: a standby
folded a dead edge's updates again) are acked; the rest are folded again, or rejected by the
edge with their reason (stale by now). So an update is acked only once a stored version holds
it, and a killed edge loses nothing: its unacked updates go back to the shard's queue.

The root (``--tier root``) consumes the partials queue, refuses a partial holding an update it
already applied or holds (with the duplicates named in its verdict), and makes a version once
it holds ``--buffer`` updates. The version's manifest lists every update id and digest, and
which partials they came through, so ``fedq audit`` counts each update once and ``fedq replay
verify`` re-derives each partial from its updates and each version from its partials.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from typing import Any

from aggregator.core import PARTIALS, Accepted, AggregatorCore, DpRecord, NewVersion, Rejected
from aggregator.service import OFFLOAD_BYTES, Aggregator, Held, Parked
from broker_config.names import Names
from shared import metrics
from shared.aggregation import clip_window_of
from shared.codec import MAX_HEAD_BYTES, Envelope, encode, read_task_token
from shared.errors import ConfigError, ServiceFailure
from shared.ledger import claimed_costs
from shared.messages import Message, ModelAnnouncement, Partial, Update, Verdict
from shared.reasons import Fate, Reason
from shared.runtime import FATAL, Runtime
from shared.store import Manifest
from shared.transport import Delivery

# Why a root refuses a partial whose updates an edge should fold again (the rest: reject them).
REFOLD = frozenset({Reason.DUPLICATE, Reason.STALE, Reason.FUTURE_VERSION})


@dataclass
class Sent:
    """A partial an edge published, with the updates it holds unacked until the root's verdict."""

    partial: Partial
    held: list[Held]


class EdgeAggregator(Aggregator):
    name = "edge"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shard = self.config.shard
        self.sent: dict[str, Sent] = {}
        self.log = self.log.bind(tier="edge", shard=self.shard)

    async def start(self, runtime: Runtime) -> None:
        if self.core is None:
            await self.load(self.config.load_wait)
        assert self.core is not None
        spec, cap = self.core.model.spec, self.transport.max_message_bytes
        if 4 * spec.n_float + 8 * spec.n_exact + MAX_HEAD_BYTES > cap:
            raise ConfigError(
                f"a partial of this model ({spec.n_float} floats, {4 * spec.n_float} bytes of sums) does not fit "
                f"in --max-message-bytes {cap}: raise it (and the broker's max_message_size), or fold this job "
                "with one aggregator"
            )
        k = self.policy.k
        # a buffer of updates, and those in partials that wait for a version to hold them
        prefetch = max(8 * k, 64)
        need = max(k, self.policy.clip.warmup) + 1
        runtime.spawn("receipts", self.receipts.run)
        await runtime.consume_messages(
            self.names.edge_inbox(self.shard), (Verdict, ModelAnnouncement), self.keyring, self.on_inbox, prefetch=64
        )
        queue = self.names.shard_queue(self.shard)
        await runtime.consume_messages(
            queue, (Update,), self.keyring, self.handle, prefetch=prefetch, need=need, on_invalid=self._on_invalid
        )
        self.log.info("consuming", queue=queue, prefetch=prefetch)

    def _expired(self, partial: Partial) -> bool:
        """Would the root refuse ``partial`` as stale at the current version (``offer_partial``)?"""
        assert self.core is not None
        return self.core.version - partial.version + max(partial.staleness) > self.policy.max_staleness

    def _kept(self) -> list[Held | Parked]:
        return [*super()._kept(), *(h for s in self.sent.values() for h in s.held)]

    def _in_flight(self, task_id: str) -> bool:
        return any(h.update.task_id == task_id for s in self.sent.values() for h in s.held)

    async def _screen(self, message: Update, round_number: int | None = None) -> tuple[Accepted, Update] | Rejected:
        tid = message.task_id
        shard = read_task_token(message.task).shard if message.task else -1  # its token is checked (bind)
        if shard != self.shard:  # a worker may publish to any shard: one update, many partials
            return Rejected(tid, Reason.WRONG_SHARD, f"its task names shard {shard}, this edge folds shard {self.shard}")
        if self._in_flight(tid):
            return Rejected(tid, Reason.DUPLICATE, f"task {tid} is in a partial already")
        return await super()._screen(message, round_number)

    async def _catch_up(self, force: bool = False) -> bool:
        """Adopt the newest root versions in the store (their manifests only: an edge folds deltas,
        not the model): their updates count as applied, the clip window is theirs, and the
        buffer is offered again against the newest. Partials all of whose updates a version
        holds are settled even if their verdict never came."""
        assert self.core is not None
        now = time.monotonic()
        if not force and now - self._checked_store_at < 0.5:
            return False
        self._checked_store_at = now
        manifests: list[Manifest] = []
        while (m := await self._stored(self.core.version + len(manifests) + 1)) is not None:
            manifests.append(m)
        if not manifests:
            return False
        applied = self.core.applied  # grown in place: a copy per version would cost the whole history
        for m in manifests:
            applied.update(m.update_ids)
        last = manifests[-1]
        held, self.held = self.held, []
        self.core = AggregatorCore(
            self.core.model,
            last.version,
            self.policy,
            self.job_id,
            applied,
            last.updates_total,
            clip_window_of(last.policy),
            dp=DpRecord.of(last.policy),
        )
        await self._reoffer(held)
        for pid in [pid for pid, s in self.sent.items() if all(h.update.task_id in applied for h in s.held)]:
            await self._settle(self.sent.pop(pid), Verdict(self.job_id, pid, self.shard, Fate.APPLIED, last.version))
        # A partial the root can no longer apply (too stale now) is as good as refused, whether or
        # not its verdict comes: its updates that a version holds are acked, the rest folded again.
        for pid in [pid for pid, s in self.sent.items() if self._expired(s.partial)]:
            why = f"folded against version {self.sent[pid].partial.version}: too stale for {last.version}"
            refused = Verdict(self.job_id, pid, self.shard, Fate.REJECTED, last.version, Reason.STALE, why)
            await self._settle(self.sent.pop(pid), refused)
        return True

    async def _flush(self) -> None:
        """Publish the buffer as a partial, folded against the newest root version."""
        assert self.core is not None
        if await self._catch_up(force=True) and not self.core.ready():
            return
        fold = self.core.take_partial()
        held, self.held = self.held, []
        accepted = fold.accepted
        updates = [(h.digest, h.update.worker_id, h.update.num_samples) for h in held]
        partial = fold.message(self.job_id, secrets.token_hex(16), self.shard, updates, time.time())
        try:
            await self.transport.publish(
                self.names.results_exchange, self.names.partials_key, encode(partial, self.signer)
            )
        except FATAL:
            raise
        except Exception as exc:  # its updates are in no partial and no buffer: start again from the queue
            raise ServiceFailure(f"publishing a partial failed: {exc!r}") from exc
        self.sent[partial.partial_id] = Sent(partial, held)
        for h, a in zip(held, accepted, strict=True):
            self.ledger.write(
                {
                    "t": time.time(),
                    "task_id": h.update.task_id,
                    "worker_id": h.update.worker_id,
                    "fate": Fate.FOLDED,
                    "partial": partial.partial_id,
                    "shard": self.shard,
                    "version": fold.version,
                    "staleness": a.staleness,
                    "weight": a.weight,
                    "norm": a.norm,
                    "clip": a.clip,
                    "capability": h.task.capability if h.task else "",
                    "bytes": h.size,
                    "num_samples": h.update.num_samples,
                    "digest": h.digest,
                    **claimed_costs(h.update),
                }
            )
        self.log.info("partial", partial=partial.partial_id[:12], version=fold.version, updates=len(held))

    async def on_inbox(self, message: Message, envelope: Envelope, delivery: Delivery) -> None:
        """A version announced (its manifest in the store says which updates it holds: partials
        all of whose updates it holds are applied), or the root's refusal of a partial."""
        async with self._lock:
            if isinstance(message, ModelAnnouncement):
                if message.job_id == self.job_id and self.core is not None and message.version > self.core.version:
                    await self._catch_up(force=True)
            elif isinstance(message, Verdict):
                sent = self.sent.pop(message.partial_id, None) if message.job_id == self.job_id else None
                if sent is not None:
                    await self._settle(sent, message)
            await delivery.ack()  # a refusal of another edge's partial (we are its standby): nothing held

    async def _settle(self, sent: Sent, verdict: Verdict) -> None:
        """Ack what a stored version holds; fold again, or reject, the rest of a refused partial."""
        assert self.core is not None
        if verdict.fate == Fate.APPLIED:  # the root counts them in its metrics
            for h in sent.held:
                for d in h.deliveries:
                    await d.ack()
            return
        self.log.warning("partial_refused", partial=verdict.partial_id[:12], reason=verdict.reason, detail=verdict.detail)
        await self._catch_up(force=True)
        again = []
        for h in sent.held:
            # the verdict names duplicates; the store says which a signed version holds, and only
            # those are acked (a duplicate of an update the root holds unstored is folded again)
            if h.update.task_id in self.core.applied:
                for d in h.deliveries:
                    await d.ack()  # a version holds it, through another partial
            elif verdict.reason in REFOLD:
                again.append(h)
            else:
                reason = Reason(verdict.reason) if verdict.reason in Reason.__members__.values() else Reason.INTERNAL_ERROR
                why = Rejected(h.update.task_id, reason, f"the root refused its partial: {verdict.reason}: {verdict.detail}")
                for d in h.deliveries:
                    await self._reject(d, h.update, why, "")
        await self._reoffer(again)
        if self.core.ready():
            await self._flush()

    def record_pending(self) -> None:
        """On a clean stop: the buffer and the partials awaiting a verdict go back to the queue."""
        waiting = [h for s in self.sent.values() for h in s.held]
        self.held = [*self.held, *waiting]
        super().record_pending()


@dataclass
class HeldPartial:
    """A partial in the root's buffer; its delivery is acked once its version is stored."""

    partial: Partial
    accepted: list[Accepted]
    deliveries: list[Delivery]
    signer: str


class RootAggregator(Aggregator):
    name = "root"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.partials: list[HeldPartial] = []
        self.deferred: list[HeldPartial] = []  # repeating updates of this buffer: taken after its version
        self.log = self.log.bind(tier="root")

    async def start(self, runtime: Runtime) -> None:
        if self.core is None:
            await self.load(self.config.load_wait)
        prefetch = max(4 * self.policy.k, 64)
        await runtime.consume_messages(
            self.names.partials_queue,
            (Partial,),
            self.keyring,
            self.handle,
            prefetch=prefetch,
            need=self.policy.k + 1,
            on_invalid=self._on_invalid,
        )
        self.log.info("consuming", queue=self.names.partials_queue, prefetch=prefetch)

    async def handle(self, message: Message, envelope: Envelope, delivery: Delivery) -> None:
        assert isinstance(message, Partial)
        async with self._lock:
            await self._catch_up()
            await self._on_partial(delivery, message, envelope.signer)

    async def _on_partial(self, delivery: Delivery, partial: Partial, signer: str) -> None:
        assert self.core is not None
        if delivery.redelivered:
            same = next((p for p in [*self.partials, *self.deferred] if p.partial.partial_id == partial.partial_id), None)
            if same is not None and delivery.body == same.deliveries[0].body:
                same.deliveries.append(delivery)
                return
        if partial.version > self.core.version:
            await self._catch_up(force=True)
        if await self._take(HeldPartial(partial, [], [delivery], signer)) and self.core.ready():
            await self._flush()

    async def _take(self, held: HeldPartial) -> bool:
        """Offer a partial to the core: into the buffer, or refused with a verdict saying why. One
        that repeats updates this buffer holds waits (unacked) for the version that stores them,
        and is refused then: a verdict names only updates a stored version holds, since the edge
        acks those."""
        assert self.core is not None
        partial = held.partial
        applied, buffered, twice = self.core.partial_overlap(partial)
        result: list[Accepted] | Rejected
        if buffered and not twice:
            self.deferred.append(held)
            self.log.info("partial_deferred", partial=partial.partial_id[:12], held=len(buffered))
            return False
        if twice:
            result = Rejected(partial.partial_id, Reason.BAD_PAYLOAD, f"it lists {len(twice)} updates twice")
        elif applied:
            result = Rejected(partial.partial_id, Reason.DUPLICATE, f"{len(applied)} of its updates are in stored versions")
        elif len(partial.sums) > OFFLOAD_BYTES:
            result = await asyncio.to_thread(self.core.offer_partial, partial)
        else:
            result = self.core.offer_partial(partial)
        if isinstance(result, Rejected):
            for d in held.deliveries:
                await self._refuse(d, partial, result, held.signer, tuple(applied))
            return False
        held.accepted = result
        self.partials.append(held)
        return True

    async def _take_deferred(self) -> None:
        """After a version (or adopting another root's): the partials that waited for it."""
        waiting, self.deferred = self.deferred, []
        for held in waiting:
            await self._take(held)

    async def _refuse(
        self, delivery: Delivery, partial: Partial, why: Rejected, signer: str, duplicates: tuple[str, ...] = ()
    ) -> None:
        verdict = Verdict(
            self.job_id, partial.partial_id, partial.shard, Fate.REJECTED, self.core.version if self.core else -1,
            why.reason, why.detail, duplicates,
        )
        await self._verdict(verdict)  # first: a partial dead-lettered with no verdict sent would hold its edge's updates
        await delivery.dead_letter(why.reason, why.detail)
        metrics.rejected(self.job_id, why.reason)
        self.ledger.write(
            {
                "t": time.time(),
                "kind": "partial",
                "partial": partial.partial_id,
                "shard": partial.shard,
                "fate": Fate.REJECTED,
                "reason": why.reason,
                "detail": why.detail,
                "signer": signer,
                "updates": len(partial.update_ids),
                "duplicates": list(duplicates),
            }
        )
        self.log.warning("partial_refused", partial=partial.partial_id[:12], reason=why.reason, detail=why.detail)

    async def _verdict(self, verdict: Verdict) -> None:
        key = Names.verdict_key(self.job_id, verdict.shard)
        await self.transport.publish(self.names.models_exchange, key, encode(verdict, self.signer), mandatory=False)

    async def _catch_up(self, force: bool = False) -> bool:
        """As a single aggregator's (another root stored versions), with the partials it holds
        offered to the newer version."""
        held, self.partials = self.partials, []
        adopted = await super()._catch_up(force)
        if not adopted:
            self.partials = held
            return False
        for p in held:
            await self._take(p)
        await self._take_deferred()
        return True

    async def _flush(self) -> None:
        assert self.core is not None
        if await self._catch_up(force=True) and not self.core.ready():
            return  # never write over a version another aggregator stored
        new: NewVersion = self.core.flush()
        held, self.partials = self.partials, []
        digests = tuple(d for p in held for d in p.partial.update_digests)
        record = [
            {
                "id": p.partial.partial_id,
                "shard": p.partial.shard,
                "version": p.partial.version,
                "updates": len(p.partial.update_ids),
                "sums_sha256": p.partial.sums_sha256,
                "signer": p.signer,
            }
            for p in held
        ]
        manifest = await self._save_version(new, digests, more={PARTIALS: record})
        stored_at = time.time()
        records = []
        for p in held:  # the ledger first, as a single aggregator's
            for a, digest, worker, n in zip(
                p.accepted, p.partial.update_digests, p.partial.worker_ids, p.partial.num_samples, strict=True
            ):
                metrics.applied(self.job_id, a.staleness, 0.0, stored_at)
                records.append(
                    {
                        "t": stored_at,
                        "task_id": a.task_id,
                        "worker_id": worker,
                        "fate": Fate.APPLIED,
                        "version": new.version,
                        "partial": p.partial.partial_id,
                        "shard": p.partial.shard,
                        "staleness": a.staleness,
                        "weight": a.weight,
                        "norm": a.norm,
                        "clip": a.clip,
                        "num_samples": n,
                        "digest": digest,
                    }
                )
        self.ledger.write_all(records)
        await self._announce(manifest)
        for p in held:  # the announcement tells the edges: no verdict of its own
            for d in p.deliveries:
                await d.ack()
        await self._take_deferred()
        self.log.info("version", version=new.version, partials=len(held), updates=len(new.update_ids))

    def record_pending(self) -> None:
        for p in [*self.partials, *self.deferred]:
            for tid, worker, digest in zip(p.partial.update_ids, p.partial.worker_ids, p.partial.update_digests, strict=True):
                self.ledger.write(
                    {"t": time.time(), "task_id": tid, "worker_id": worker, "fate": Fate.PENDING, "digest": digest}
                )
