"""The aggregator service's logic on the in-memory broker: every rejection reason with its dead
letter and ledger record, the order of a version's steps (store, announce, ack), catching up
with versions another aggregator stored, receipts, sync rounds, a redelivery after a lost link,
and a handler that raises. No RabbitMQ: the real broker's part is in tests/test_rejections.py."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import time
import uuid
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch

from aggregator.core import NOISE_RECORD, DpRecord
from aggregator.service import CATCH_UP_SECONDS, Aggregator
from broker_config.names import USER_HEADER, Names
from broker_config.permissions import BrokerRole, user_name
from shared.aggregation import Clip, Policy
from shared.codec import decode, encode
from shared.errors import BrokerError, CorruptVersionError, StoreError, UnsignedVersionError
from shared.ledger import read_lines
from shared.messages import Receipt, Receipts, Update
from shared.privacy import Dp
from shared.reasons import Reason
from shared.server_opt import ServerOpt
from shared.signing import Keyring, Role, Signer
from shared.store import Manifest, manifest_key
from shared.tensors import FlatModel
from shared.transport import Delivery
from shared.transport.memory import MemoryTransport
from tests.support.broker import connect_like, drain
from tests.support.messages import JOB, an_update, save_version
from tests.support.rigs import AggregatorRig, aggregator_rig, held_updates_survive_a_lost_link
from tests.support.waiting import WAIT, until


def unacked(mem: MemoryTransport) -> int:
    """Deliveries of the updates queue its consumer holds unsettled."""
    return sum(len(c.unsettled) for c in mem.broker.queue(mem.names.updates_queue).consumers)


def aggregator_keys(rig: AggregatorRig) -> Keyring:
    ring = Keyring()
    ring.add(rig.aggregator.signer.public, Role.AGGREGATOR)
    return ring


# -- rejections -------------------------------------------------------------------------------


async def test_undecodable_bytes(mem: MemoryTransport, names: Names, tmp_path: Path) -> None:
    async with aggregator_rig(mem, names, tmp_path) as rig:
        await rig.send(b"garbage")
        entry = await rig.rejected(b"garbage", "undecodable")
        assert entry["signer"] == ""
        # a msgpack map that is not an envelope is undecodable too
        body = msgpack.packb({"v": 1, "kind": "update"})
        await rig.send(body)
        await rig.rejected(body, "undecodable")
        await rig.assert_version(0)
        await rig.stop_and_assert_all_acked()


async def test_unknown_signer(mem: MemoryTransport, names: Names, tmp_path: Path) -> None:
    async with aggregator_rig(mem, names, tmp_path, trust_worker=False) as rig:
        _, body = rig.update()
        await rig.send(body)
        entry = await rig.rejected(body, "unknown_signer")
        assert entry["signer"] == ""  # nothing of an untrusted message is believed
        await rig.assert_version(0)
        await rig.stop_and_assert_all_acked()


@pytest.mark.parametrize("field_name", ["sig", "head", "payload"])
async def test_bad_signature(mem: MemoryTransport, names: Names, tmp_path: Path, field_name: str) -> None:
    async with aggregator_rig(mem, names, tmp_path) as rig:
        _, good = rig.update()
        doc = msgpack.unpackb(good, raw=False)
        value = bytearray(doc[field_name])
        if field_name == "head":
            # flip a byte inside a string value so the head stays msgpack of the same shape
            i = value.index(b"w1")
            value[i + 1] ^= 0x01
        else:
            value[len(value) // 2] ^= 0x01
        doc[field_name] = bytes(value)
        body = msgpack.packb(doc, use_bin_type=True)
        assert body != good
        await rig.send(body)
        await rig.rejected(body, "bad_signature")
        await rig.assert_version(0)
        await rig.stop_and_assert_all_acked()


async def test_bad_shape_wrong_length(mem: MemoryTransport, names: Names, tmp_path: Path) -> None:
    async with aggregator_rig(mem, names, tmp_path) as rig:
        n = rig.model.spec.n_float + 1  # one value too many
        tid, body = rig.update(quant="none", delta=torch.zeros(n, dtype=torch.float32).numpy().tobytes())
        await rig.send(body)
        entry = await rig.rejected(body, "bad_shape", tid)
        assert entry["worker_id"] == "w1"
        tid2, truncated = rig.update(delta=b"\x00" * 7)
        await rig.send(truncated)
        await rig.rejected(truncated, "bad_shape", tid2)
        await rig.assert_version(0)
        await rig.stop_and_assert_all_acked()


async def test_bad_shape_other_model(mem: MemoryTransport, names: Names, tmp_path: Path) -> None:
    """A delta made for a different model (shape or dtype) does not fit this one's payload."""
    async with aggregator_rig(mem, names, tmp_path) as rig:
        bigger = FlatModel.from_state_dict(torch.nn.Linear(5, 3).state_dict())
        assert bigger.spec != rig.model.spec
        tid, body = rig.update(bigger)
        await rig.send(body)
        await rig.rejected(body, "bad_shape", tid)

        # same tensor names and shapes, but the bias is int64: its values travel as exact i64
        state = torch.nn.Linear(4, 3).state_dict()
        state["bias"] = torch.zeros(3, dtype=torch.int64)
        other_dtype = FlatModel.from_state_dict(state)
        assert other_dtype.spec != rig.model.spec
        tid2, body2 = rig.update(other_dtype, quant="none")
        await rig.send(body2)
        await rig.rejected(body2, "bad_shape", tid2)

        # an unknown quantization scheme is a shape error as well
        tid3, body3 = rig.update(delta=b"\x00" * 60, quant="fp4")
        await rig.send(body3)
        await rig.rejected(body3, "bad_shape", tid3)
        await rig.assert_version(0)
        await rig.stop_and_assert_all_acked()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
async def test_non_finite(mem: MemoryTransport, names: Names, tmp_path: Path, bad: float) -> None:
    async with aggregator_rig(mem, names, tmp_path, k=1) as rig:
        floats = torch.full((rig.model.spec.n_float,), 0.01, dtype=torch.float32)
        floats[3] = bad
        tid, body = rig.update(quant="none", floats=floats)
        await rig.send(body)
        entry = await rig.rejected(body, "non_finite", tid)
        assert entry["staleness"] == 0
        await rig.assert_version(0)
        await rig.stop_and_assert_all_acked()


async def test_duplicate_after_applied(mem: MemoryTransport, names: Names, tmp_path: Path) -> None:
    async with aggregator_rig(mem, names, tmp_path, k=1) as rig:
        tid, body = rig.update()
        await rig.send(body)
        await rig.wait_version(1)
        await rig.ledger_entry(tid, "applied")
        await rig.send(body)
        await rig.rejected(body, "duplicate", tid)
        await rig.assert_version(1)
        assert (await rig.store.manifest(1)).update_ids == (tid,)
        await rig.stop_and_assert_all_acked()


async def test_duplicate_while_buffered(mem: MemoryTransport, names: Names, tmp_path: Path) -> None:
    async with aggregator_rig(mem, names, tmp_path, k=2) as rig:
        tid, body = rig.update()
        await rig.send(body)
        await rig.send(body)
        await rig.rejected(body, "duplicate", tid)
        await rig.assert_version(0)
        assert rig.aggregator.core is not None
        assert rig.aggregator.core.pending_ids == {tid}
        # the first copy is still held, unacked, until a version contains it
        [held] = rig.aggregator.held
        assert held.update.task_id == tid and not held.deliveries[0].settled
        tid2, body2 = rig.update()
        await rig.send(body2)
        await rig.wait_version(1)
        assert (await rig.store.manifest(1)).update_ids == (tid, tid2)
        await rig.stop_and_assert_all_acked()
        await rig.dead.expect_none()
        applied = [r["task_id"] for r in rig.ledger() if r["fate"] == "applied"]
        assert applied == [tid, tid2]


async def test_stale(mem: MemoryTransport, names: Names, tmp_path: Path) -> None:
    async with aggregator_rig(mem, names, tmp_path, k=1, max_staleness=1) as rig:
        for v in range(3):
            _, body = rig.update(base_version=v)
            await rig.send(body)
            await rig.wait_version(v + 1)
        sha3 = (await rig.store.manifest(3)).sha256
        # tau = 3 - 0 > 1
        tid, body = rig.update(base_version=0)
        await rig.send(body)
        entry = await rig.rejected(body, "stale", tid)
        assert entry["staleness"] == 3
        # tau = 1 is still fine
        tid_ok, ok = rig.update(base_version=2)
        await rig.send(ok)
        await rig.wait_version(4)
        assert (await rig.store.manifest(4)).update_ids == (tid_ok,)
        assert (await rig.store.manifest(3)).sha256 == sha3
        await rig.assert_version(4)
        await rig.stop_and_assert_all_acked()


@pytest.mark.parametrize(
    ("fields", "reason"),
    [({"base_version": 5}, "future_version"), ({"num_samples": 0}, "bad_sample_count"), ({"job_id": "job2"}, "wrong_job")],
)
async def test_an_update_the_job_cannot_take(
    mem: MemoryTransport, names: Names, tmp_path: Path, fields: dict[str, Any], reason: str
) -> None:
    async with aggregator_rig(mem, names, tmp_path, k=1) as rig:
        tid, body = rig.update(**fields)
        await rig.send(body)
        await rig.rejected(body, reason, tid)
        await rig.assert_version(0)
        await rig.stop_and_assert_all_acked()


# -- a handler that raises ----------------------------------------------------------------------


async def test_an_update_whose_screening_raises_is_rejected_and_the_aggregator_goes_on(
    mem: MemoryTransport, names: Names, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with aggregator_rig(mem, names, tmp_path, k=1) as rig:
        bad_tid, bad = rig.update()
        core = rig.aggregator.core
        assert core is not None
        real_offer = core.offer

        def offer(update: Update, round_number: int | None = None) -> Any:
            if update.task_id == bad_tid:
                raise ZeroDivisionError("a bug this update found")
            return real_offer(update, round_number)

        monkeypatch.setattr(core, "offer", offer)
        await rig.send(bad)
        entry = await rig.rejected(bad, "internal_error", bad_tid)
        assert entry["detail"] == "ZeroDivisionError: a bug this update found"
        await rig.assert_version(0)
        tid, body = rig.update()
        await rig.send(body)
        await rig.wait_version(1)
        assert (await rig.store.manifest(1)).update_ids == (tid,)
        await rig.stop_and_assert_all_acked()


async def test_a_message_whose_handler_raises_is_dead_lettered_by_the_runtime(
    mem: MemoryTransport, names: Names, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside the update's own screening (here: the look for newer versions before it), what a
    handler raises dead-letters that message as ``handler_error``; the service keeps running."""
    async with aggregator_rig(mem, names, tmp_path, k=1) as rig:
        objects = rig.store.objects
        real_exists = objects.exists
        broken = [True]

        async def exists(key: str) -> bool:
            if broken:
                broken.clear()
                raise KeyError(key)  # a bug, not a StoreError: the store itself is fine
            return await real_exists(key)

        monkeypatch.setattr(objects, "exists", exists)
        _, body = rig.update()
        await rig.send(body)
        letter = await rig.dead.next()
        assert letter.body == body and letter.headers["x-fedq-reason"] == "internal_error"
        assert letter.headers["x-fedq-detail"].startswith("KeyError")
        rig.check_alive()
        await rig.send(body)  # sent again: now it is applied
        await rig.wait_version(1)
        await rig.stop_and_assert_all_acked()


# -- a version's steps in order -------------------------------------------------------------------


async def test_updates_are_acked_after_their_version_is_stored_and_announced(
    mem: MemoryTransport, names: Names, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with aggregator_rig(mem, names, tmp_path, k=2) as rig:
        steps: list[tuple[str, int | None, int]] = []
        real_save = rig.store.save

        async def save(manifest: Manifest, blob: bytes, state: bytes | None = None) -> None:
            steps.append(("save", manifest.version, unacked(mem)))
            await real_save(manifest, blob, state)
            steps.append(("stored", await rig.store.latest(), unacked(mem)))

        real_publish = rig.service.publish

        async def publish(exchange: str, routing_key: str, body: bytes, **options: Any) -> None:
            if routing_key == Names.model_key(JOB):
                steps.append(("announce", await rig.store.latest(), unacked(mem)))
            await real_publish(exchange, routing_key, body, **options)

        monkeypatch.setattr(rig.store, "save", save)
        monkeypatch.setattr(rig.service, "publish", publish)
        ids = []
        for _ in range(2):
            tid, body = rig.update()
            ids.append(tid)
            await rig.send(body)
        await rig.wait_version(1)
        await until(lambda: unacked(mem) == 0, "the acks")
        # both held unacked while the version is written, and announced once it is stored
        assert steps == [("save", 1, 2), ("stored", 1, 2), ("announce", 1, 2)]
        assert [r["task_id"] for r in rig.ledger() if r["fate"] == "applied"] == ids
        await rig.stop_and_assert_all_acked()


async def test_updates_whose_version_cannot_be_stored_are_not_acked(
    mem: MemoryTransport, names: Names, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store fails: the aggregator stops, and the updates go back to the queue for its
    restart or a standby, neither applied nor rejected."""
    async with aggregator_rig(mem, names, tmp_path, k=2) as rig:

        async def save(manifest: Manifest, blob: bytes, state: bytes | None = None) -> None:
            raise StoreError("the disk is full")

        monkeypatch.setattr(rig.store, "save", save)
        sent = [rig.update() for _ in range(2)]
        for _, body in sent:
            await rig.send(body)
        assert isinstance(await rig.failed(), StoreError)
        back = await drain(mem, names.updates_queue, expect=2)
        assert [d.body for d in back] == [body for _, body in sent]
        assert all(d.redelivered for d in back)
        assert [r for r in rig.ledger() if r["fate"] in ("applied", "rejected")] == []
        assert await rig.store.versions() == [0]
        await rig.dead.expect_none()


async def test_a_version_stored_before_the_aggregator_dies_is_in_its_ledger(
    mem: MemoryTransport, names: Names, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The version is stored, then announcing it fails (the process dies there): its updates are
    applied in the ledger already, as in the manifest, and go back to the queue unacked, where the
    restart finds them applied."""
    async with aggregator_rig(mem, names, tmp_path, k=2) as rig:
        real_publish = rig.service.publish

        async def publish(exchange: str, routing_key: str, body: bytes, **options: Any) -> None:
            if routing_key == Names.model_key(JOB):
                raise BrokerError("the link is gone for good")
            await real_publish(exchange, routing_key, body, **options)

        monkeypatch.setattr(rig.service, "publish", publish)
        sent = [rig.update() for _ in range(2)]
        for _, body in sent:
            await rig.send(body)
        await rig.failed()
        assert (await rig.store.manifest(1)).update_ids == tuple(tid for tid, _ in sent)
        assert [r["task_id"] for r in rig.ledger() if r["fate"] == "applied"] == [tid for tid, _ in sent]
        assert len(await drain(mem, names.updates_queue, expect=2)) == 2


async def test_updates_held_across_a_lost_link_count_once(
    mem: MemoryTransport, names: Names, tmp_path: Path
) -> None:
    async with aggregator_rig(mem, names, tmp_path, k=3) as rig:
        service = rig.service
        assert isinstance(service, MemoryTransport)
        await held_updates_survive_a_lost_link(rig, service.lose_link)


# -- the good path ----------------------------------------------------------------------------


async def test_k_updates_make_one_version(mem: MemoryTransport, names: Names, tmp_path: Path) -> None:
    k = 3
    async with aggregator_rig(mem, names, tmp_path, k=k) as rig:
        announced: list[bytes] = []

        async def on_model(delivery: Delivery) -> None:
            await delivery.ack()
            announced.append(delivery.body)

        await mem.subscribe(names.models_exchange, (Names.model_key(JOB),), on_model)
        ids = []
        for _ in range(k):
            tid, body = rig.update()
            ids.append(tid)
            await rig.send(body)
        await rig.wait_version(1)
        manifest, blob = await rig.store.load_bytes(1)
        assert manifest.update_ids == tuple(ids)
        assert manifest.parent == 0
        assert manifest.updates_total == k
        new = FlatModel.from_bytes(blob)
        assert not torch.equal(new.floats, rig.model.floats)
        await until(lambda: announced, "the announcement")
        announcement, _ = decode(announced[0], aggregator_keys(rig))
        assert (announcement.version, announcement.sha256) == (1, manifest.sha256)
        await rig.assert_version(1)
        await rig.stop_and_assert_all_acked()
        for tid in ids:
            entry = await rig.ledger_entry(tid, "applied")
            assert entry["version"] == 1
        await rig.dead.expect_none()


# -- another aggregator's versions ---------------------------------------------------------------


async def store_as_another_aggregator(rig: AggregatorRig, version: int, update_ids: tuple[str, ...]) -> str:
    """Write ``version`` (v0's weights + 1) straight into the store, as a second aggregator would."""
    model = rig.model.with_vectors(rig.model.floats + 1.0, rig.model.exact)
    manifest = await save_version(
        rig.store, model.to_bytes(), version, update_ids, updates_total=len(update_ids)
    )
    return manifest.sha256


async def test_the_store_is_not_asked_about_other_versions_on_every_update(
    mem: MemoryTransport, names: Names, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with aggregator_rig(mem, names, tmp_path, k=1000) as rig:
        objects = rig.store.objects
        real_exists = objects.exists
        asked = 0

        async def exists(key: str) -> bool:
            nonlocal asked
            asked += 1
            return await real_exists(key)

        monkeypatch.setattr(objects, "exists", exists)
        started = time.monotonic()
        for _ in range(30):
            await rig.send(rig.update()[1])
        await rig.held(30)
        elapsed = time.monotonic() - started
        assert asked <= 2 + elapsed / CATCH_UP_SECONDS < 30, (asked, elapsed)


async def test_a_version_another_aggregator_stored_is_adopted_before_writing_one(
    mem: MemoryTransport, names: Names, tmp_path: Path
) -> None:
    async with aggregator_rig(mem, names, tmp_path, k=2) as rig:
        first, body = rig.update()
        await rig.send(body)
        await rig.held(1)
        theirs = await store_as_another_aggregator(rig, 1, ("elsewhere",))
        second, body = rig.update()
        await rig.send(body)  # the buffer is full: the check before writing finds version 1
        await rig.wait_version(2)
        one, _ = await rig.store.load_bytes(1)
        assert one.sha256 == theirs  # not written over
        two, blob = await rig.store.load_bytes(2)
        assert (two.parent, set(two.update_ids)) == (1, {first, second})
        core = rig.aggregator.core
        assert core is not None and core.model.to_bytes() == blob
        # their model, plus our two identical deltas, now one version stale
        expected = rig.model.floats + 1.0 + 0.01 * core.policy.staleness.weight(1)
        assert torch.allclose(core.model.floats, expected, atol=1e-4)
        await rig.stop_and_assert_all_acked()


async def test_an_update_on_a_version_only_another_aggregator_stored_is_not_rejected(
    mem: MemoryTransport, names: Names, tmp_path: Path
) -> None:
    async with aggregator_rig(mem, names, tmp_path, k=3) as rig:
        await rig.send(rig.update()[1])
        await rig.held(1)  # the store was just checked: the next check waits CATCH_UP_SECONDS
        await store_as_another_aggregator(rig, 1, ("elsewhere",))
        await rig.send(rig.update(base_version=1)[1])
        await rig.held(2)
        await rig.dead.expect_none()
        assert rig.aggregator.core is not None
        assert rig.aggregator.core.version == 1
        await rig.send(rig.update(base_version=1)[1])
        await rig.wait_version(2)
        await rig.stop_and_assert_all_acked()


# -- receipts -----------------------------------------------------------------------------------


async def test_receipts_that_never_confirm_do_not_hold_up_updates(
    mem: MemoryTransport, names: Names, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with aggregator_rig(mem, names, tmp_path, k=2) as rig:
        real_publish = rig.service.publish
        stuck = asyncio.Event()  # never set: a receipt's confirm that never comes
        receipts: list[bytes] = []

        async def publish(exchange: str, routing_key: str, body: bytes, **options: Any) -> None:
            if routing_key == Names.receipt_key(JOB):
                receipts.append(body)
                await stuck.wait()
            await real_publish(exchange, routing_key, body, **options)

        monkeypatch.setattr(rig.service, "publish", publish)
        for _ in range(4):
            await rig.send(rig.update()[1])
        await rig.wait_version(2)
        assert len(receipts) == 1  # the first message is stuck; the rest wait behind it
        stuck_batch, _ = decode(receipts[0], aggregator_keys(rig), Receipts)
        assert len(stuck_batch.receipts) + len(rig.aggregator.receipts.pending) == 4
        await rig.stop_and_assert_all_acked()  # the stuck receipts do not keep the service up


async def test_receipts_that_pile_up_behind_a_slow_confirm_go_as_one_message(
    mem: MemoryTransport, names: Names, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with aggregator_rig(mem, names, tmp_path, k=100) as rig:
        inbox: asyncio.Queue[Delivery] = asyncio.Queue()

        async def on_receipts(delivery: Delivery) -> None:
            await delivery.ack()
            await inbox.put(delivery)

        await mem.subscribe(names.models_exchange, (Names.receipt_key(JOB),), on_receipts)
        real_publish = rig.service.publish
        publishing, release = asyncio.Event(), asyncio.Event()

        async def publish(exchange: str, routing_key: str, body: bytes, **options: Any) -> None:
            publishing.set()
            await release.wait()  # the first confirm is slow: until all five are held
            await real_publish(exchange, routing_key, body, **options)

        monkeypatch.setattr(rig.service, "publish", publish)
        sent = [rig.update() for _ in range(5)]
        await rig.send(sent[0][1])
        await asyncio.wait_for(publishing.wait(), WAIT)  # the first receipt awaits its confirm
        for _, body in sent[1:]:
            await rig.send(body)
        await rig.held(5)
        assert len(rig.aggregator.receipts.pending) == 4
        release.set()
        got: list[Receipt] = []
        messages = 0
        while len(got) < 5:
            delivery = await asyncio.wait_for(inbox.get(), WAIT)
            message, _ = decode(delivery.body, aggregator_keys(rig), Receipts)
            got.extend(message.receipts)
            messages += 1
        assert messages == 2  # the first receipt alone, then the four that piled up behind it
        assert sorted(r.task_id for r in got) == sorted(tid for tid, _ in sent)
        assert {(r.fate, r.job_id, r.version) for r in got} == {("buffered", JOB, 0)}
        await rig.stop()  # the five stay pending (K = 100) and go back to the queue


# -- sync rounds --------------------------------------------------------------------------------


async def test_a_sync_round_becomes_a_version_once_its_answers_are_in(
    mem: MemoryTransport, names: Names, tmp_path: Path
) -> None:
    async with aggregator_rig(mem, names, tmp_path, mode="sync") as rig:
        early, body = rig.update()
        await rig.send(body)  # no round is open: nothing to answer
        entry = await rig.rejected(body, "stale", early)
        assert "closed" in entry["detail"]
        await rig.send_round(0, 1, 2)
        ids = []
        for _ in range(2):
            tid, body = rig.update()
            ids.append(tid)
            await rig.send(body)
        await rig.wait_version(1)
        assert (await rig.store.manifest(1)).update_ids == tuple(ids)
        # a late answer to the round, on the version it was for: the round is over
        late, body = rig.update()
        await rig.send(body)
        entry = await rig.rejected(body, "stale", late)
        assert entry["staleness"] == 1
        await rig.assert_version(1)
        await rig.stop_and_assert_all_acked()


async def test_a_sync_round_closed_at_its_deadline_applies_what_arrived(
    mem: MemoryTransport, names: Names, tmp_path: Path
) -> None:
    async with aggregator_rig(mem, names, tmp_path, mode="sync") as rig:
        await rig.send_round(0, 1, 3)
        tid, body = rig.update()
        await rig.send(body)
        await rig.held(1)
        await rig.send_round(0, 1, 3, close=True)
        await rig.wait_version(1)
        assert (await rig.store.manifest(1)).update_ids == (tid,)
        await rig.send_round(1, 2, 3, close=True)  # a round that closes with nothing: no version
        await rig.send_round(0, 1, 3)  # a round on a version that is gone opens nothing
        late, body = rig.update(base_version=1)
        await rig.send(body)
        await rig.rejected(body, "stale", late)
        await rig.assert_version(1)
        await rig.stop_and_assert_all_acked()
        await rig.dead.expect_none()


def answer(rig: AggregatorRig, number: int, base_version: int = 0) -> tuple[str, bytes]:
    """An update answering a task of sync round ``number`` on ``base_version``."""
    tid = uuid.uuid4().hex
    token = rig.token(tid, base_version, round_number=number)
    return rig.update(task_id=tid, base_version=base_version, task=token)


async def test_a_late_answer_to_a_round_that_closed_with_nothing_is_stale(
    mem: MemoryTransport, names: Names, tmp_path: Path
) -> None:
    """Round 1 closes with no answer and round 2 opens on the same version: answers to round 1,
    before round 2 opens or after, are stale, and round 2 makes a version of its own answers."""
    async with aggregator_rig(mem, names, tmp_path, mode="sync") as rig:
        await rig.send_round(0, 1, 2)
        await rig.send_round(0, 1, 2, close=True)
        for opened in (False, True):
            if opened:
                await rig.send_round(0, 2, 2)
            late, body = answer(rig, 1)
            await rig.send(body)
            entry = await rig.rejected(body, "stale", late)
            assert entry["detail"] == "round 1 on version 0 is closed"
        ids = []
        for _ in range(2):
            tid, body = answer(rig, 2)
            ids.append(tid)
            await rig.send(body)
        await rig.wait_version(1)
        assert (await rig.store.manifest(1)).update_ids == tuple(ids)
        await rig.stop_and_assert_all_acked()
        await rig.dead.expect_none()


@pytest.mark.parametrize("takeover", ["restart", "standby"])
async def test_an_aggregator_that_takes_over_collects_the_open_round(
    mem: MemoryTransport, names: Names, tmp_path: Path, takeover: str
) -> None:
    """Round 1 of two answers is open and one answer is held when the aggregator stops. The round
    message is not acked until the round is over, so the aggregator that takes over (a fresh one
    on the same store, or a standby already waiting) gets it again with the answer: the round's
    other answer makes version 1 of both, and nothing is stale."""
    async with aggregator_rig(mem, names, tmp_path, mode="sync") as rig:
        await rig.send_round(0, 1, 2)
        first, body = answer(rig, 1)
        await rig.send(body)
        await rig.held(1)
        old = rig.aggregator
        service = await connect_like(rig.client, f"test-aggregator-{takeover}")
        fresh = Aggregator(
            old.config, transport=service, store=rig.store, signer=old.signer, keyring=old.keyring, ledger=old.ledger
        )
        if takeover == "restart":
            await rig.stop()
        task = asyncio.create_task(fresh.run(), name=takeover)
        await until(lambda: fresh.core is not None, f"the {takeover} aggregator loaded")
        if takeover == "standby":
            await rig.stop()
        rig.aggregator, rig.service, rig.task = fresh, service, task
        await rig.held(1)
        second, body = answer(rig, 1)
        await rig.send(body)
        await rig.wait_version(1)
        assert (await rig.store.manifest(1)).update_ids == (first, second)
        await rig.stop_and_assert_all_acked()
        await rig.dead.expect_none()


async def test_an_answer_that_comes_before_its_rounds_message_waits_for_it(
    mem: MemoryTransport, names: Names, tmp_path: Path
) -> None:
    """The broker gives an aggregator that takes over what the one before held in no set order:
    an answer to a round not heard of yet waits, unacked, for the round's message."""
    async with aggregator_rig(mem, names, tmp_path, mode="sync") as rig:
        first, body = answer(rig, 1)
        await rig.send(body)
        await until(lambda: len(rig.aggregator.parked) == 1, "the answer waiting")
        await rig.send_round(0, 1, 2)
        await rig.held(1)
        second, body = answer(rig, 1)
        await rig.send(body)
        await rig.wait_version(1)
        assert (await rig.store.manifest(1)).update_ids == (first, second)
        # an answer waiting for round 2 when round 3 opens on the same version: round 2 is over
        orphan, body = answer(rig, 2, base_version=1)
        await rig.send(body)
        await until(lambda: len(rig.aggregator.parked) == 1, "the answer waiting")
        await rig.send_round(1, 3, 2)
        entry = await rig.rejected(body, "stale", orphan)
        assert entry["detail"] == "round 2 on version 1 is closed"
        await rig.send_round(1, 3, 2, close=True)  # with nothing: no version, the round acked
        await until(lambda: not rig.aggregator.rounds, "round 3 over")
        await rig.assert_version(1)
        await rig.stop_and_assert_all_acked()
        await rig.dead.expect_none()


async def test_a_round_not_signed_by_the_coordinator_is_rejected(
    mem: MemoryTransport, names: Names, tmp_path: Path
) -> None:
    async with aggregator_rig(mem, names, tmp_path, mode="sync") as rig:
        body = await rig.send_round(0, 1, 1, signer=rig.worker)  # trusted, but not to run rounds
        await rig.rejected(body, "wrong_role")
        impostor = await rig.send_round(0, 1, 1, signer=Signer.generate())
        await rig.rejected(impostor, "unknown_signer")
        tid, update = rig.update()
        await rig.send(update)
        await rig.rejected(update, "stale", tid)  # no round was opened
        await rig.assert_version(0)
        await rig.stop_and_assert_all_acked()


async def test_the_ledger_takes_capability_and_lateness_from_the_coordinators_task(
    mem: MemoryTransport, names: Names, tmp_path: Path
) -> None:
    """The worker's word is not asked: the task's capability and deadline are recorded."""
    async with aggregator_rig(mem, names, tmp_path, k=2) as rig:
        on_time, late = uuid.uuid4().hex, uuid.uuid4().hex
        _, body = rig.update(task_id=on_time, task=rig.token(on_time, capability="gpu"))
        _, late_body = rig.update(task_id=late, task=rig.token(late, deadline=time.time() - 60))
        await rig.send(body)
        await rig.send(late_body)
        await rig.wait_version(1)
        first = await rig.ledger_entry(on_time, "applied")
        second = await rig.ledger_entry(late, "applied")
        assert (first["capability"], first["late"]) == ("gpu", False)
        assert (second["capability"], second["late"]) == ("cpu", True)
        await rig.stop_and_assert_all_acked()


async def test_a_garbage_manifest_in_the_store_is_refused_and_written_over(
    mem: MemoryTransport, names: Names, tmp_path: Path
) -> None:
    """Whoever can write the store puts junk where version 1's manifest goes: the aggregator does
    not stop on it (a crash loop), it refuses it like an unsigned version and stores its own."""
    async with aggregator_rig(mem, names, tmp_path, k=2) as rig:
        await rig.store.objects.put(manifest_key(names.job, 1), b"{not json")
        for _ in range(2):
            await rig.send(rig.update()[1])
        await until(lambda: rig.aggregator.core is not None and rig.aggregator.core.version == 1, "version 1")

        async def stored_over() -> bool:  # the core counts the version before it is stored
            try:
                await rig.store.manifest(1)  # verified with the rig's trust: the aggregator's key
            except CorruptVersionError:
                return False
            return True

        await until(stored_over, "version 1 stored over the junk")
        rig.check_alive()
        manifest = await rig.store.manifest(1)
        assert manifest.signer == rig.aggregator.signer.fingerprint
        await rig.stop_and_assert_all_acked()


async def test_a_signed_version_of_an_earlier_run_of_the_job_is_refused_and_written_over(
    mem: MemoryTransport, names: Names, tmp_path: Path
) -> None:
    """Whoever can write the store puts back version 1 of an earlier run that used the same job id:
    signed by this aggregator's own key, so its signature verifies, but made in another incarnation.
    The aggregator does not adopt it (its updates were never issued by this run's coordinator); it
    stores its own version 1 over it."""
    async with aggregator_rig(mem, names, tmp_path, k=2) as rig:
        foreign = rig.model.to_bytes()
        await save_version(rig.store, foreign, 1, ("earlier",), signer=rig.aggregator.signer, incarnation="0" * 16)
        with pytest.raises(UnsignedVersionError, match="incarnation"):
            await rig.store.manifest(1)
        assert await rig.store.latest_signed() == 0
        for _ in range(2):
            await rig.send(rig.update()[1])
        await until(lambda: rig.aggregator.core is not None and rig.aggregator.core.version == 1, "version 1")

        async def stored_over() -> bool:  # the core counts the version before it is stored
            try:
                await rig.store.manifest(1)
            except UnsignedVersionError:
                return False
            return True

        await until(stored_over, "version 1 stored over the earlier run's")
        manifest = await rig.store.manifest(1)
        assert manifest.incarnation == rig.aggregator.incarnation and "earlier" not in manifest.update_ids
        assert rig.aggregator._refused == {1}
        rig.check_alive()
        await rig.stop_and_assert_all_acked()


async def test_an_update_from_another_workers_broker_account_is_refused(
    mem: MemoryTransport, names: Names, tmp_path: Path
) -> None:
    """Signed by w1's key, published over w2's broker account (the user_id the broker vouches for):
    wrong_worker, dead-lettered with the account that sent it. Over w1's own account it is applied.
    With --broker-identity require, an update that names no account is refused too."""
    def account(worker: str) -> str:
        return user_name(names, BrokerRole.WORKER, worker)

    async with aggregator_rig(mem, names, tmp_path, k=1) as rig:
        as_w2 = await MemoryTransport(mem.broker, names, "w2", user=account("w2")).connect()
        as_w1 = await MemoryTransport(mem.broker, names, "w1", user=account("w1")).connect()
        tid, body = rig.update()
        await as_w2.publish(names.results_exchange, names.results_key, body)
        dead = await rig.dead.expect(body, "wrong_worker", names.updates_queue)
        assert dead.headers[USER_HEADER] == account("w2")
        entry = await rig.ledger_entry(tid, "rejected")
        assert entry["reason"] == "wrong_worker" and account("w2") in entry["detail"]
        await rig.assert_version(0)
        await as_w1.publish(names.results_exchange, names.results_key, body)
        await rig.wait_version(1)
        rig.aggregator.config = dataclasses.replace(rig.aggregator.config, require_user_id=True)
        tid, body = rig.update(base_version=1)
        await rig.send(body)  # the test's own connection names no user
        entry = await rig.rejected(body, "wrong_worker", tid)
        assert "names no broker user" in entry["detail"]
        await rig.assert_version(1)
        await as_w1.close(grace=0.1)
        await as_w2.close(grace=0.1)
        await rig.stop_and_assert_all_acked()


async def test_a_restarted_aggregator_goes_on_from_the_stored_moments_and_privacy_spent(
    mem: MemoryTransport, names: Names, tmp_path: Path
) -> None:
    """FedOpt's moments and DP's accounting are a version's state: the aggregator that takes over
    at version 1 starts from version 1's, read back from the store, not from scratch."""
    policy = Policy(
        k=2,
        clip=Clip("fixed", 5.0),
        weighting="uniform",
        dp=Dp(5.0, 0.5),
        server_opt=ServerOpt("adam"),
        server_lr=0.01,
    )
    async with aggregator_rig(mem, names, tmp_path, policy=policy) as rig:
        for _ in range(2):
            await rig.send(rig.update()[1])
        await rig.wait_version(1)
        one = await rig.store.manifest(1)
        state = await rig.store.load_state(one)
        assert state is not None and one.dp_epsilon is not None and one.dp_epsilon > 0
        old = rig.aggregator
        await rig.stop()
        service = await connect_like(rig.client, "test-aggregator-restart")
        fresh = Aggregator(
            old.config, transport=service, store=rig.store, signer=old.signer, keyring=old.keyring, ledger=old.ledger
        )
        task = asyncio.create_task(fresh.run(), name="restart")
        await until(lambda: fresh.core is not None, "the restarted aggregator loaded")
        assert fresh.core is not None and fresh.core.server_state is not None
        assert fresh.core.server_state.to_bytes() == state
        rig.aggregator, rig.service, rig.task = fresh, service, task
        for _ in range(2):
            await rig.send(rig.update(base_version=1)[1])
        await rig.wait_version(2)
        two = await rig.store.manifest(2)
        # one worker sent both updates of each version: each counts with noise z / 2, twice
        assert DpRecord.of(two.policy) is not None and DpRecord.of(two.policy).events == ((0.25, 2),)  # type: ignore[union-attr]
        assert two.dp_epsilon is not None and two.dp_epsilon > one.dp_epsilon
        seeds = [r for r in read_lines(rig.ledger_path) if r.get("kind") == NOISE_RECORD]
        assert [r["version"] for r in seeds] == [1, 2]
        await rig.stop_and_assert_all_acked()


async def test_an_inline_updates_claimed_size_never_counts_as_bytes(
    mem: MemoryTransport, names: Names, tmp_path: Path
) -> None:
    """``delta_size`` is checked only for a claim-checked delta; on an inline update it is the
    sender's word, so neither the ledger's bytes (cost accounting) nor the metrics take it."""
    async with aggregator_rig(mem, names, tmp_path, k=1) as rig:
        tid = uuid.uuid4().hex
        honest = an_update(rig.model, task_id=tid, job_id=rig.store.job_id, task=rig.token(tid))
        body = encode(dataclasses.replace(honest, delta_size=10**15), rig.worker)
        await rig.send(body)
        await rig.wait_version(1)
        applied = [r for r in read_lines(rig.ledger_path) if r.get("fate") == "applied"]
        assert [r["bytes"] for r in applied] == [len(body)]
        await rig.stop_and_assert_all_acked()


async def test_a_message_refused_as_too_large_is_not_hashed() -> None:
    """Its length alone was looked at: a flood of them must not cost a hash each on the event loop."""
    big = b"\0" * (3 << 20)
    assert await Aggregator._digest(big, Reason.TOO_LARGE) is None
    assert await Aggregator._digest(big, Reason.UNDECODABLE) == hashlib.sha256(big).hexdigest()
