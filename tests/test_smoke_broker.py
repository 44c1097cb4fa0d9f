"""The broker adapter against the real RabbitMQ: confirmed publish, consume, dead-letter with a reason."""

from __future__ import annotations

import asyncio

from broker_config.names import REASON_HEADER, SOURCE_HEADER, Names
from shared.broker import Broker, Delivery


async def test_publish_consume_and_dead_letter(broker: Broker, names: Names) -> None:
    got: asyncio.Queue[Delivery] = asyncio.Queue()

    async def on_update(d: Delivery) -> None:
        await got.put(d)

    await broker.consume(names.updates_queue, on_update, prefetch=4)
    await broker.publish(names.results_exchange, "", b"hello")
    delivery = await asyncio.wait_for(got.get(), 10)
    assert delivery.body == b"hello"
    await delivery.dead_letter("undecodable", "not msgpack")

    dead: asyncio.Queue[Delivery] = asyncio.Queue()

    async def on_dead(d: Delivery) -> None:
        await dead.put(d)

    await broker.consume(names.dead_queue, on_dead, prefetch=4)
    d = await asyncio.wait_for(dead.get(), 10)
    assert d.body == b"hello"
    assert d.message.headers[REASON_HEADER] == "undecodable"
    assert d.message.headers[SOURCE_HEADER] == names.updates_queue
    await d.ack()
