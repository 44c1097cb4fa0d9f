"""Several AMQP URLs on the real broker: the transport connects to the first that answers and,
when its link is lost, goes on to the next ones in turn, its consumers restored there.

Each "node" is a TCP proxy to the shared broker (tests/support/tcpproxy.py): closing a proxy is a
node gone (its link closes, its port refuses), and a proxy's accepted count shows which URL a
connection dialled. The same over a real 3-node cluster, with node kills, is tests/test_cluster.py.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from broker_config.names import Names
from broker_config.topology import Binding, Exchange, Queue, Topology, topology
from shared.amqp_urls import join_urls
from shared.errors import BrokerError
from shared.transport import Delivery
from shared.transport.rabbitmq import RabbitMQ
from tests.support.broker import connect_like
from tests.support.private_broker import free_port
from tests.support.tcpproxy import TcpProxy

WAIT = 30.0


async def test_connects_to_the_first_url_that_answers_and_fails_over_in_turn(
    amqp_url: str, broker: RabbitMQ, names: Names
) -> None:
    async with TcpProxy(lifetime=90) as a, TcpProxy(lifetime=90) as b, TcpProxy(lifetime=90) as c:
        nowhere = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
        # each attempt 1 s after the one before (aio-pika's default is 5 s): the test waits less
        urls = join_urls([nowhere, *(p.url(amqp_url) + "?reconnect_interval=1" for p in (a, b, c))])
        transport = await RabbitMQ(urls, names, "test-failover").connect()
        try:
            assert (a.accepted, b.accepted, c.accepted) == (1, 0, 0), "not the first URL that answers"
            got: asyncio.Queue[bytes] = asyncio.Queue()

            async def on_task(delivery: Delivery) -> None:
                await got.put(delivery.body)
                await delivery.ack()

            await transport.declare(topology(names, ("cpu",)))
            await transport.consume(names.task_queue("cpu"), on_task, prefetch=1)
            reconnected = asyncio.Event()
            transport.on_reconnect(reconnected.set)

            for gone, next_up, body in ((a, b, b"via b"), (b, c, b"via c")):
                await gone.close()  # the node is gone: its link drops and its port refuses
                await asyncio.wait_for(next_up.wait_accepted(1), WAIT)
                await asyncio.wait_for(reconnected.wait(), WAIT)
                reconnected.clear()
                # the consumer was restored on the next node: a task published there reaches it
                # (one before it may come again: its ack may have been on the link that dropped)
                await transport.publish(names.tasks_exchange, names.task_key("cpu"), body, mandatory=True)
                while (seen := await asyncio.wait_for(got.get(), WAIT)) != body:
                    assert seen.startswith(b"via "), seen
            assert (b.accepted, c.accepted) == (1, 1)
        finally:
            await transport.close()


async def test_a_nacked_publish_is_retried_until_the_broker_takes_it(broker: RabbitMQ, names: Names) -> None:
    """The broker nacks a publish while a queue it routes to cannot take it (on a cluster: its leader
    was on the node just lost). Here the queue is full and rejects publishes: the publish is retried
    until the queue has room, and refused once the retry window has passed."""
    full = f"{names.namespace}.test.full"
    await broker.declare(
        Topology(
            (Exchange(names.tasks_exchange, "direct"),),
            (Queue(full, {"x-max-length": 1, "x-overflow": "reject-publish", "x-expires": 60_000}),),
            (Binding(full, names.tasks_exchange, "full"),),
        )
    )
    await broker.publish(names.tasks_exchange, "full", b"first")
    started = time.monotonic()
    publishing = asyncio.create_task(broker.publish(names.tasks_exchange, "full", b"second"))
    await asyncio.sleep(1.5)
    assert not publishing.done(), "a nacked publish was not retried"
    assert await broker.purge(full) == 1  # room again: the retry goes through
    await asyncio.wait_for(publishing, 30)
    assert time.monotonic() - started >= 1.5
    info = await broker.queue_info(full)
    assert info is not None and info.messages == 1
    impatient = await connect_like(broker, "test-nack-refused", publish_retry_seconds=1.0)
    try:
        with pytest.raises(BrokerError, match="refused"):
            await impatient.publish(names.tasks_exchange, "full", b"third")
    finally:
        await impatient.close()
