"""The aggregator's rejections and redeliveries through the real RabbitMQ: what needs the broker's
own dead-letter exchange, quorum queue and channel recovery. Each rejection reason, the order
of a version's steps, catching up, receipts, rounds and handler errors are checked on the
in-memory broker, in tests/test_aggregator_memory.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

from broker_config.names import Names
from shared.transport.rabbitmq import RabbitMQ
from tests.support.broker import connect_like
from tests.support.rigs import aggregator_rig, held_updates_survive_a_lost_link
from tests.support.tcpproxy import TcpProxy
from tests.support.waiting import WAIT

JOB = "job1"


async def test_rejections_go_through_the_real_dead_letter_exchange(
    broker: RabbitMQ, names: Names, tmp_path: Path
) -> None:
    """A message the runtime cannot read and an update the core refuses while the first copy is
    held unacked: each reaches the dead-letter queue with its reason, source and original body,
    and is in the ledger; the good updates become a version and every message is acked."""
    async with aggregator_rig(broker, names, tmp_path, k=2) as rig:
        await rig.send(b"garbage")
        await rig.rejected(b"garbage", "undecodable")
        tid, body = rig.update()
        await rig.send(body)
        await rig.send(body)
        await rig.rejected(body, "duplicate", tid)
        tid2, body2 = rig.update()
        await rig.send(body2)
        await rig.wait_version(1)
        assert (await rig.store.manifest(1)).update_ids == (tid, tid2)
        await rig.assert_version(1)
        await rig.stop_and_assert_all_acked()
        await rig.dead.expect_none()
        assert [r["task_id"] for r in rig.ledger() if r["fate"] == "applied"] == [tid, tid2]


async def test_updates_held_across_a_lost_connection_count_once(
    amqp_url: str, broker: RabbitMQ, names: Names, tmp_path: Path
) -> None:
    """The aggregator's connection drops (through a TCP proxy) while it holds updates: RabbitMQ
    gives them again on the restored channel, redelivered, and each counts once."""
    async with TcpProxy(lifetime=60) as proxy:

        async def reset() -> None:
            proxy.reset()
            async with asyncio.timeout(WAIT):
                await proxy.wait_accepted(2)  # the robust connection dials again

        service = await connect_like(broker, "test-aggregator", url=proxy.url(amqp_url))
        async with aggregator_rig(broker, names, tmp_path, k=3, service=service) as rig:
            await held_updates_survive_a_lost_link(rig, reset)
