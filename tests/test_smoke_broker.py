"""The broker adapter against the real RabbitMQ: confirmed publish, consume, dead-letter with a reason."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from broker_config.names import Names
from shared.transport import Delivery
from shared.transport.rabbitmq import RabbitMQ
from tests.support.broker import Inbox


async def test_publish_consume_and_dead_letter(broker: RabbitMQ, names: Names) -> None:
    got: asyncio.Queue[Delivery] = asyncio.Queue()

    async def on_update(d: Delivery) -> None:
        await got.put(d)

    await broker.consume(names.updates_queue, on_update, prefetch=4)
    await broker.publish(names.results_exchange, names.results_key, b"hello")
    delivery = await asyncio.wait_for(got.get(), 10)
    assert delivery.body == b"hello"
    await delivery.dead_letter("undecodable", "not msgpack")

    dead = await Inbox.on(broker, names.dead_queue)
    await dead.expect(b"hello", "undecodable", names.updates_queue)


async def test_a_handler_cut_off_by_close_is_not_logged_as_an_error(broker: RabbitMQ, names: Names) -> None:
    """A clean stop is not an error: a handler that fails because its own service is closing
    is logged at info, and its delivery goes back to the queue for the next consumer."""
    own = await RabbitMQ(broker.url, names, "test-closing").connect()
    started = asyncio.Event()

    async def on_update(d: Delivery) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise Exception() from None  # what a handler's I/O on a closing link may raise

    await own.consume(names.updates_queue, on_update, prefetch=4)
    await broker.publish(names.results_exchange, names.results_key, b"cut off")
    await asyncio.wait_for(started.wait(), 10)
    with capture_logs() as logs:
        await own.close()
    assert not [e for e in logs if e["log_level"] == "error"], logs
    assert [e["event"] for e in logs if e["log_level"] == "info"] == ["handler_stopped_at_close"]

    again: asyncio.Queue[Delivery] = asyncio.Queue()

    async def on_again(d: Delivery) -> None:
        await again.put(d)
        await d.ack()

    await broker.consume(names.updates_queue, on_again, prefetch=4)
    assert (await asyncio.wait_for(again.get(), 10)).body == b"cut off"


async def test_a_stream_read_ends_at_its_newest_entry_without_waiting_for_quiet(broker: RabbitMQ, names: Names) -> None:
    """The update log as it stood when the read began: every entry, in order, and the read returns
    as soon as it has the newest one, not after ``idle`` seconds without entries."""
    bodies = [f"entry {i}".encode() for i in range(40)]
    for body in bodies:
        await broker.publish(names.results_exchange, names.results_key, body)
    began = asyncio.get_running_loop().time()
    entries = await broker.read_all(names.update_log, idle=30.0)
    assert [e.body for e in entries] == bodies
    assert asyncio.get_running_loop().time() - began < 10.0  # it waited no 30 s for quiet
