"""The aggregator service's hot path, on the real broker: receipts never hold an update up,
the store is not asked about other aggregators' versions on every update, and yet a version
another aggregator stored is adopted before this one writes or rejects on its account."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from typing import Any

import torch

from aggregator.service import CATCH_UP_SECONDS
from broker_config.names import Names
from shared.codec import decode
from shared.messages import Receipt, Receipts
from shared.signing import Keyring
from shared.store import Manifest, model_key
from shared.transport import Delivery
from shared.transport.rabbitmq import RabbitMQ
from tests.test_rejections import JOB, WAIT, Rig, aggregator_rig, until


async def store_as_another_aggregator(rig: Rig, version: int, update_ids: tuple[str, ...]) -> str:
    """Write ``version`` straight into the store, as a second aggregator would."""
    model = rig.model.with_vectors(rig.model.floats + 1.0, rig.model.exact)
    blob = model.to_bytes()
    manifest = Manifest(
        job_id=JOB,
        version=version,
        parent=version - 1,
        sha256=hashlib.sha256(blob).hexdigest(),
        size=len(blob),
        key=model_key(JOB, version),
        update_ids=update_ids,
        created_at=time.time(),
        updates_total=len(update_ids),
    )
    await rig.store.save(manifest, blob)
    return manifest.sha256


async def held(rig: Rig, count: int) -> None:
    async def enough() -> bool:
        return len(rig.aggregator.held) >= count

    await until(enough, f"{count} updates held")


async def test_receipts_that_never_confirm_do_not_hold_up_updates(
    broker: RabbitMQ, names: Names, tmp_path: Path
) -> None:
    async with aggregator_rig(broker, names, tmp_path, k=2) as rig:
        service = rig.service_broker
        real_publish = service.publish
        stuck = asyncio.Event()  # never set: a receipt's confirm that never comes
        receipts: list[bytes] = []

        async def publish(exchange: str, routing_key: str, body: bytes, **kwargs: Any) -> None:
            if routing_key == Names.receipt_key(JOB):
                receipts.append(body)
                await stuck.wait()
            await real_publish(exchange, routing_key, body, **kwargs)

        service.publish = publish  # type: ignore[method-assign]
        for _ in range(4):
            await rig.send(rig.update()[1])
        await rig.wait_version(2)
        assert len(receipts) == 1  # the first message is stuck; the rest wait behind it
        ring = Keyring()
        ring.add(rig.aggregator.signer.public)
        stuck_batch, _ = decode(receipts[0], ring, Receipts)
        assert len(stuck_batch.receipts) + len(rig.aggregator.receipts.pending) == 4
        await rig.stop_and_assert_all_acked()  # the stuck receipts do not keep the service up


async def test_the_store_is_not_asked_about_other_versions_on_every_update(
    broker: RabbitMQ, names: Names, tmp_path: Path
) -> None:
    async with aggregator_rig(broker, names, tmp_path, k=1000) as rig:
        objects = rig.store.objects
        real_exists = objects.exists
        asked = 0

        async def exists(key: str) -> bool:
            nonlocal asked
            asked += 1
            return await real_exists(key)

        objects.exists = exists  # type: ignore[method-assign]
        started = time.monotonic()
        for _ in range(30):
            await rig.send(rig.update()[1])
        await held(rig, 30)
        elapsed = time.monotonic() - started
        assert asked <= 2 + elapsed / CATCH_UP_SECONDS < 30, (asked, elapsed)


async def test_a_version_another_aggregator_stored_is_adopted_before_writing_one(
    broker: RabbitMQ, names: Names, tmp_path: Path
) -> None:
    async with aggregator_rig(broker, names, tmp_path, k=2) as rig:
        first, body = rig.update()
        await rig.send(body)
        await held(rig, 1)
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
    broker: RabbitMQ, names: Names, tmp_path: Path
) -> None:
    async with aggregator_rig(broker, names, tmp_path, k=3) as rig:
        await rig.send(rig.update()[1])
        await held(rig, 1)  # the store was just checked: the next check waits CATCH_UP_SECONDS
        await store_as_another_aggregator(rig, 1, ("elsewhere",))
        await rig.send(rig.update(base_version=1)[1])
        await held(rig, 2)
        await rig.dead.expect_none()
        assert rig.aggregator.core is not None
        assert rig.aggregator.core.version == 1
        await rig.send(rig.update(base_version=1)[1])
        await rig.wait_version(2)
        await rig.stop_and_assert_all_acked()


async def test_receipts_that_pile_up_behind_a_slow_confirm_go_as_one_message(
    broker: RabbitMQ, names: Names, tmp_path: Path
) -> None:
    async with aggregator_rig(broker, names, tmp_path, k=100) as rig:
        inbox: asyncio.Queue[Delivery] = asyncio.Queue()

        async def on_receipts(delivery: Delivery) -> None:
            await delivery.ack()
            await inbox.put(delivery)

        await broker.subscribe(names.models_exchange, (Names.receipt_key(JOB),), on_receipts)
        service = rig.service_broker
        real_publish = service.publish
        release = asyncio.Event()

        async def publish(exchange: str, routing_key: str, body: bytes, **kwargs: Any) -> None:
            await release.wait()  # the first confirm is slow: until all five are held
            await real_publish(exchange, routing_key, body, **kwargs)

        service.publish = publish  # type: ignore[method-assign]
        sent = [rig.update() for _ in range(5)]
        for _, body in sent:
            await rig.send(body)
        await held(rig, 5)
        release.set()
        ring = Keyring()
        ring.add(rig.aggregator.signer.public)
        got: list[Receipt] = []
        messages = 0
        while len(got) < 5:
            message, _ = decode((await asyncio.wait_for(inbox.get(), WAIT)).body, ring, Receipts)
            got.extend(message.receipts)
            messages += 1
        assert messages == 2  # the first receipt alone, then the four that piled up behind it
        assert sorted(r.task_id for r in got) == sorted(tid for tid, _ in sent)
        assert {(r.fate, r.job_id, r.version) for r in got} == {("buffered", JOB, 0)}
        await rig.stop()  # the five stay pending (K = 100) and go back to the queue
