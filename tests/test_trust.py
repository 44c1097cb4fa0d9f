"""Trust between parties (issue 11), against the real RabbitMQ: who may send what (``wrong_role``,
``wrong_worker``), updates bound to the coordinator's signed task (``unknown_task``, the sample
cap, a job id reused), versions adopted only when signed by a key allowed to make them
(``unsigned_version``), a revocation reaching a running aggregator, a claim check naming a
directory, and announcements of versions that do not exist. Every refused message is
dead-lettered with its reason and leaves the model as it was; the services stay up."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgpack
import pytest
import torch

from aggregator.config import AggregatorConfig
from aggregator.service import Aggregator
from broker_config.names import Names
from fedq import keys
from shared.aggregation import Clip, Policy
from shared.codec import encode
from shared.errors import UnsignedVersionError
from shared.keys import RELOAD_SECONDS, DirectoryTrust
from shared.ledger import JsonLines
from shared.messages import Hello, ModelAnnouncement, Update
from shared.signing import Role, Signer
from shared.store import LocalStore, Manifest, ModelStore, model_key
from shared.transport.rabbitmq import RabbitMQ
from tests.support.broker import Inbox, connect_like
from tests.support.messages import MAKER, OWNER, make_task, save_v0, save_version, tiny_model, token_of
from tests.support.rigs import AggregatorRig, CoordinatorRig, aggregator_rig, coordinator_rig
from tests.support.waiting import WAIT, events, until

JOB = "job1"


async def unchanged(rig: AggregatorRig) -> None:
    """Nothing was applied: the aggregator is alive, at version 0, holding nothing."""
    rig.check_alive()
    await rig.assert_version(0)
    assert rig.aggregator.held == []


def at_version(rig: AggregatorRig, version: int) -> Callable[[], bool]:
    return lambda: rig.aggregator.core is not None and rig.aggregator.core.version == version


# -- who may send what ----------------------------------------------------------------------------


async def test_wrong_role_at_the_aggregator(broker: RabbitMQ, names: Names, tmp_path: Path) -> None:
    """An update signed by an aggregator's or the coordinator's key, a round signed by a worker's or
    an aggregator's: all trusted keys, none allowed to send that kind."""
    async with aggregator_rig(broker, names, tmp_path, k=1) as rig:
        for key in (rig.aggregator.signer, MAKER, OWNER):
            update = Update(
                task_id=uuid.uuid4().hex, job_id=JOB, worker_id="w1", base_version=0, num_samples=10,
                quant="int8", block=256, task=rig.token("t"), delta=b"\0" * 8,
            )  # fmt: skip
            body = encode(update, key)
            await rig.send(body)
            await rig.rejected(body, "wrong_role")
        for key in (rig.worker, rig.aggregator.signer):
            body = await rig.send_round(0, 1, 1, signer=key)
            await rig.rejected(body, "wrong_role")
        await unchanged(rig)
        assert rig.aggregator.core is not None and rig.aggregator.core._round is None  # no round opened
        await rig.stop_and_assert_all_acked()
        await rig.dead.expect_none()


async def coordinator_dead(rig: CoordinatorRig) -> Inbox:
    return await Inbox.on(rig.client, rig.names.dead_queue)


async def announce(rig: CoordinatorRig, message: ModelAnnouncement, key: Signer) -> bytes:
    body = encode(message, key)
    await rig.client.publish(rig.names.models_exchange, Names.model_key(rig.names.job), body)
    return body


async def test_wrong_role_at_the_coordinator(broker: RabbitMQ, tmp_path: Path) -> None:
    """An announcement signed by an enrolled worker's key, and one of version 1 signed by the
    coordinator's own key (only aggregators make versions after 0): ``wrong_role``, not adopted."""
    async with coordinator_rig(broker, tmp_path) as rig:
        dead = await coordinator_dead(rig)
        worker = Signer.generate()
        rig.trust.add(worker.public, Role.WORKER, worker_id="w1")
        manifest = await save_version(rig.store, (await rig.store.load_bytes(0))[1], 1)
        for key in (worker, OWNER):
            body = await announce(rig, manifest.announcement(), key)
            await dead.expect(body, "wrong_role", rig.names.coordinator_queue)
        rig.check_alive()
        assert rig.coordinator.scheduler.version == 0
        await dead.expect_none()


async def test_wrong_worker_update(broker: RabbitMQ, names: Names, tmp_path: Path) -> None:
    """Worker w1's key signs an update naming w2: ``wrong_worker``, nothing applied."""
    async with aggregator_rig(broker, names, tmp_path, k=1) as rig:
        _, body = rig.update(worker_id="w2")
        await rig.send(body)
        await rig.rejected(body, "wrong_worker")
        await unchanged(rig)
        await rig.stop_and_assert_all_acked()


async def test_wrong_worker_hello(broker: RabbitMQ, tmp_path: Path) -> None:
    """Worker w1's key signs a hello naming w2: ``wrong_worker``; w2 joins no fleet."""
    async with coordinator_rig(broker, tmp_path) as rig:
        dead = await coordinator_dead(rig)
        await rig.hello("w1")  # enrols w1's key in the coordinator's trust
        await until(lambda: "w1" in rig.coordinator.scheduler.registry.workers, "w1 to join")
        key = rig.workers["w1"]
        hello = encode(Hello("w2", ("cpu",), key.fingerprint, "up", time.time()), key)
        await rig.client.publish(rig.names.workers_exchange, rig.names.hello_key, hello)
        got = await dead.next()
        assert got.headers.get("x-fedq-reason") == "wrong_worker" and got.body == hello
        assert "w2" not in rig.coordinator.scheduler.registry.workers
        rig.check_alive()
        await dead.expect_none()


# -- updates answer a task the coordinator signed ----------------------------------------------------


def garbled(token: bytes) -> bytes:
    """The token with one byte of its signed head changed (the signature no longer covers it)."""
    signer, head, digest, sig = msgpack.unpackb(token, raw=False)
    head = bytearray(head)
    head[len(head) // 2] ^= 0x01
    return bytes(msgpack.packb([signer, bytes(head), digest, sig]))


async def test_unknown_task(broker: RabbitMQ, names: Names, tmp_path: Path) -> None:
    """No token; a token signed by a worker's key; a token of another task; a forged token (its
    head changed under the coordinator's signature); garbage: ``unknown_task`` each time."""
    async with aggregator_rig(broker, names, tmp_path, k=1) as rig:
        task, raw = make_task(rig.worker, job_id=JOB, incarnation=rig.aggregator.incarnation)
        tokens = {
            "none": b"",
            "worker-signed": token_of(raw),
            "other task": rig.token(uuid.uuid4().hex),
            "forged": garbled(rig.token("x")),
            "garbage": b"\xc1\xff not msgpack",
            "wrong shape": msgpack.packb(["a", b"b"]),
        }
        for what, token in tokens.items():
            tid = task.task_id if what == "worker-signed" else uuid.uuid4().hex
            if what == "forged":  # the forged token names this update's task id... under a bad signature
                token = garbled(rig.token(tid))
            tid, body = rig.update(task_id=tid, task=token)
            await rig.send(body)
            entry = await rig.rejected(body, "unknown_task", tid)
            assert entry["worker_id"] == "w1", what
        await unchanged(rig)
        # and the aggregator goes on: a good update is applied
        tid, body = rig.update()
        await rig.send(body)
        await rig.wait_version(1)
        assert (await rig.store.manifest(1)).update_ids == (tid,)
        await rig.stop_and_assert_all_acked()


async def test_sample_count_is_capped_by_the_task(broker: RabbitMQ, names: Names, tmp_path: Path) -> None:
    """An update claiming 10**15 samples for a task with max_samples=50 weighs as 50."""
    async with aggregator_rig(broker, names, tmp_path, k=1) as rig:
        tid = uuid.uuid4().hex
        _, body = rig.update(task_id=tid, num_samples=10**15, task=rig.token(tid, max_samples=50))
        await rig.send(body)
        await rig.wait_version(1)
        entry = await rig.ledger_entry(tid, "applied")
        assert entry["num_samples"] == 50
        assert entry["weight"] == rig.aggregator.policy.weight(50, 0)
        await rig.stop_and_assert_all_acked()
        await rig.dead.expect_none()


async def test_a_job_id_reused_refuses_the_old_incarnations_updates(
    broker: RabbitMQ, names: Names, tmp_path: Path
) -> None:
    """A real signed update applied in one incarnation of job1 is replayed, byte for byte, into a
    new job1 (a fresh version 0, another incarnation): ``unknown_task``, the new model unchanged."""
    first = await connect_like(broker, "test-first-incarnation")
    try:
        async with aggregator_rig(first, names, tmp_path / "a", k=1) as old:
            tid, old_body = old.update()
            await old.send(old_body)
            await old.wait_version(1)
            await old.stop_and_assert_all_acked()
            old_incarnation, worker = old.aggregator.incarnation, old.worker
    finally:
        await first.close()
    async with aggregator_rig(broker, names, tmp_path / "b", k=1) as rig:
        assert rig.aggregator.incarnation != old_incarnation
        rig.aggregator.keyring.add(worker.public, Role.WORKER, worker_id="w1")  # the same worker key
        await rig.send(old_body)
        entry = await rig.rejected(old_body, "unknown_task", tid)
        assert "incarnation" in entry["detail"]
        await unchanged(rig)
        await rig.stop_and_assert_all_acked()


# -- versions are signed ----------------------------------------------------------------------------


async def test_unsigned_versions_are_not_adopted_by_the_aggregator(
    broker: RabbitMQ, names: Names, tmp_path: Path
) -> None:
    """Version 1 written into the store unsigned, then version 2 signed by a worker's key (both with
    other weights): the aggregator folds on its own versions; the ones it stores over them are
    signed by it, chain 0 -> 1 -> 2, and carry exactly its updates."""
    async with aggregator_rig(broker, names, tmp_path, k=2) as rig:
        store, incarnation = rig.store, rig.aggregator.incarnation
        foreign = tiny_model(seed=7).to_bytes()
        assert foreign != rig.model.to_bytes()
        unsigned = Manifest(
            job_id=JOB, version=1, parent=0, sha256=hashlib.sha256(foreign).hexdigest(), size=len(foreign),
            key=model_key(JOB, 1), update_ids=("forged",), created_at=time.time(), incarnation=incarnation,
        )  # fmt: skip
        await store.save(unsigned, foreign)
        await save_version(store, foreign, 2, ("forged",), signer=rig.worker)
        expected = rig.model.floats.clone()
        for version in (1, 2):
            sent = [rig.update(base_version=version - 1) for _ in range(2)]
            for _, body in sent:
                await rig.send(body)
            await until(at_version(rig, version), f"version {version}")

            async def stored_over(version: int = version) -> bool:  # the core counts it before it is stored
                try:
                    await store.manifest(version)  # verifies: signed by a key allowed to make it
                except UnsignedVersionError:
                    return False
                return True

            await until(stored_over, f"version {version} stored over the forged one")
            manifest = await store.manifest(version)
            assert manifest.signer == rig.aggregator.signer.fingerprint
            assert manifest.parent == version - 1 and manifest.incarnation == incarnation
            assert manifest.update_ids == tuple(tid for tid, _ in sent)
            _, model = await store.load(version)
            expected += 0.01  # two updates of +0.01 on every float, equally weighted
            torch.testing.assert_close(model.floats, expected, atol=1e-4, rtol=0)
        assert rig.aggregator._refused == {1, 2}
        await rig.stop_and_assert_all_acked()
        await rig.dead.expect_none()


async def test_unsigned_versions_are_dead_lettered_by_the_coordinator(
    broker: RabbitMQ, tmp_path: Path
) -> None:
    """An announcement (by the aggregator's key) of a version stored unsigned, or signed by a worker's
    key: ``unsigned_version``, not adopted, not even from the store later; a signed one is adopted."""
    async with coordinator_rig(broker, tmp_path) as rig:
        dead = await coordinator_dead(rig)
        worker = Signer.generate()
        rig.trust.add(worker.public, Role.WORKER, worker_id="w1")
        _, blob = await rig.store.load_bytes(0)
        incarnation = await rig.store.incarnation()
        unsigned = Manifest(
            job_id=rig.names.job, version=1, parent=0, sha256=hashlib.sha256(blob).hexdigest(), size=len(blob),
            key=model_key(rig.names.job, 1), update_ids=(), created_at=time.time(), incarnation=incarnation,
        )  # fmt: skip
        await rig.store.save(unsigned, blob)
        body = await announce(rig, unsigned.announcement(), MAKER)
        await dead.expect(body, "unsigned_version", rig.names.coordinator_queue)
        by_worker = await save_version(rig.store, blob, 1, signer=worker)
        body = await announce(rig, by_worker.announcement(), MAKER)
        await dead.expect(body, "unsigned_version", rig.names.coordinator_queue)
        await asyncio.sleep(1.5)  # the coordinator looks in the store every second: still nothing to adopt
        assert rig.coordinator.scheduler.version == 0
        rig.check_alive()
        await rig.version(1, ())  # signed by the aggregator's key
        await until(lambda: rig.coordinator.scheduler.version == 1, "version 1 to be adopted")
        await dead.expect_none()


# -- revocation in a live job ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def directory_rig(
    client: RabbitMQ, names: Names, tmp_path: Path
) -> AsyncIterator[tuple[AggregatorRig, Path]]:
    """An aggregator (K = 1) as ``aggregator_rig`` makes one, whose trust is a ``DirectoryTrust`` over
    ``tmp_path/trusted`` laid out by ``fedq.keys``: the coordinator's and the aggregator's keys, and
    worker w1's enrolled."""
    trusted = tmp_path / "trusted"
    agg_signer, worker = Signer.generate(), Signer.generate()
    keys.make_layout(trusted)
    keys.trust_role_key(trusted, Role.COORDINATOR, OWNER.public)
    keys.trust_role_key(trusted, Role.AGGREGATOR, agg_signer.public)
    keys.enrol(trusted, "w1", worker.public)
    ring = DirectoryTrust(trusted)
    store = ModelStore(LocalStore(tmp_path / "store"), job_id=names.job, trust=ring)
    model = tiny_model()
    v0_sha = await save_v0(store, model)
    ledger_path = tmp_path / "ledger.jsonl"
    ledger = JsonLines(ledger_path)
    service = await connect_like(client, "test-aggregator")
    aggregator = Aggregator(
        AggregatorConfig(Policy(mode="async", k=1, max_staleness=2, clip=Clip("off"))),
        transport=service,
        store=store,
        signer=agg_signer,
        keyring=ring,
        ledger=ledger,
    )
    await asyncio.wait_for(aggregator.load(wait=5), WAIT)
    dead = await Inbox.on(client, names.dead_queue)
    rig = AggregatorRig(client, service, aggregator, store, model, worker, OWNER, ledger_path, v0_sha, dead)
    rig.task = asyncio.create_task(aggregator.run(), name="aggregator")
    try:
        yield rig, trusted
        rig.check_alive()
    finally:
        with contextlib.suppress(Exception):
            await rig.stop()
        ledger.close()


async def test_a_revocation_takes_effect_in_a_live_job(
    broker: RabbitMQ, names: Names, tmp_path: Path
) -> None:
    """w1's update is applied; ``fedq keys revoke w1``; within the trust directory's reload bound, and
    with no restart, w1's next update is ``unknown_signer``."""
    async with directory_rig(broker, names, tmp_path) as (rig, trusted):
        tid, body = rig.update()
        await rig.send(body)
        await rig.wait_version(1)
        await rig.ledger_entry(tid, "applied")
        fp, removed = keys.revoke(trusted, "w1")
        assert fp == rig.worker.fingerprint and removed
        revoked_at = time.monotonic()
        await asyncio.sleep(RELOAD_SECONDS + 0.1)  # the directory is looked at no more often than this
        _, body = rig.update(base_version=1)
        await rig.send(body)
        entry = await rig.rejected(body, "unknown_signer")
        assert time.monotonic() - revoked_at < RELOAD_SECONDS + 3
        assert entry["signer"] == ""
        await rig.wait_version(1)  # nothing more was applied
        assert await rig.store.versions() == [0, 1]
        await rig.stop_and_assert_all_acked()


# -- a claim check naming a directory ----------------------------------------------------------------


async def test_a_claim_check_naming_a_directory(broker: RabbitMQ, names: Names, tmp_path: Path) -> None:
    """``delta_key`` names a directory of the store: its task's own key, made a directory by
    someone who can write the store, or the updates folder itself (not its task's key): each
    dead-lettered, the aggregator stays up and applies the next update."""
    async with aggregator_rig(broker, names, tmp_path, k=1) as rig:
        own = uuid.uuid4().hex
        await rig.store.objects.put(f"jobs/{JOB}/updates/{own}.bin/blob.bin", b"x")
        for tid, key, says in (
            (own, f"jobs/{JOB}/updates/{own}.bin", "directory"),
            (uuid.uuid4().hex, f"jobs/{JOB}/updates/", "not its task's update key"),
        ):
            update = Update(
                task_id=tid, job_id=JOB, worker_id="w1", base_version=0, num_samples=10, quant="int8",
                block=256, delta_key=key, delta_sha256=hashlib.sha256(b"x").hexdigest(), delta_size=1,
                task=rig.token(tid),
            )  # fmt: skip
            body = encode(update, rig.worker)
            await rig.send(body)
            entry = await rig.rejected(body, "bad_payload", tid)
            assert says in entry["detail"].lower(), entry
        await unchanged(rig)
        tid, body = rig.update()
        await rig.send(body)
        await rig.wait_version(1)
        assert (await rig.store.manifest(1)).update_ids == (tid,)
        await rig.stop_and_assert_all_acked()


# -- announcements of versions that do not exist ------------------------------------------------------


async def test_fake_announcements_do_not_stall_the_coordinator(
    broker: RabbitMQ, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """70 announcements of a version 99 that is not in the store (more than the coordinator's inbox
    prefetches: 16 with the default message cap), signed by the aggregator's key: each is dead-lettered ``payload_missing``;
    a real version announced afterwards is adopted, from its announcement (the coordinator's look
    in the store is switched off here, so nothing else could have brought it)."""
    async with coordinator_rig(broker, tmp_path) as rig:

        async def nothing() -> None:
            return None

        monkeypatch.setattr(rig.coordinator, "_look_in_store", nothing)
        dead = await coordinator_dead(rig)
        fakes = []
        for i in range(70):
            fake = ModelAnnouncement(
                job_id=rig.names.job, version=99, parent=98, sha256=f"{i:064x}", key=model_key(rig.names.job, 99),
                update_ids=(), created_at=time.time(),
            )  # fmt: skip
            fakes.append(await announce(rig, fake, MAKER))
        got = [await dead.next() for _ in fakes]  # handled concurrently: in any order
        assert sorted(d.body for d in got) == sorted(fakes)
        assert {(d.headers.get("x-fedq-reason"), d.headers.get("x-fedq-source")) for d in got} == {
            ("payload_missing", rig.names.coordinator_queue)
        }
        rig.check_alive()
        assert rig.coordinator.scheduler.version == 0
        await rig.version(1, ())
        await until(lambda: rig.coordinator.scheduler.version == 1, "version 1 to be adopted")
        assert not events(rig.logs, "version_found_in_store")
        await dead.expect_none()
        info = await rig.client.queue_info(rig.names.coordinator_queue)
        assert info is not None and info.messages == 0
