"""The declared topology on the real broker: idempotent, clear on conflict, and behaving as designed."""

from __future__ import annotations

import asyncio
import time

import aio_pika
import pytest

from broker_config.names import Names
from broker_config.topology import Limits, topology
from shared.errors import BrokerError, TopologyConflictError
from shared.transport import Delivery
from shared.transport.rabbitmq import RabbitMQ
from tests.support.broker import Inbox


async def test_declare_is_idempotent(broker: RabbitMQ, names: Names) -> None:
    await broker.declare(topology(names, ("cpu",)))
    await broker.declare(topology(names, ("cpu",)))


async def test_conflicting_declaration_names_queue_and_argument(broker: RabbitMQ, names: Names) -> None:
    with pytest.raises(TopologyConflictError) as info:
        await broker.declare(topology(names, ("cpu",), Limits(task_delivery_limit=3)))
    message = str(info.value)
    assert names.task_queue("cpu") in message
    assert "x-delivery-limit" in message
    assert "5" in message and "3" in message


async def test_updates_queue_has_a_single_active_consumer(broker: RabbitMQ, names: Names) -> None:
    seen: dict[str, list[bytes]] = {"a": [], "b": []}

    def collect(tag: str):  # type: ignore[no-untyped-def]
        async def on(d: Delivery) -> None:
            seen[tag].append(d.body)
            await d.ack()

        return on

    await broker.consume(names.updates_queue, collect("a"), prefetch=10)
    await broker.consume(names.updates_queue, collect("b"), prefetch=10)
    for i in range(20):
        await broker.publish(names.results_exchange, names.results_key, f"m{i}".encode())
    for _ in range(100):
        if len(seen["a"]) + len(seen["b"]) == 20:
            break
        await asyncio.sleep(0.05)
    assert sorted([len(seen["a"]), len(seen["b"])]) == [0, 20]


async def test_update_log_stream_keeps_every_update(broker: RabbitMQ, names: Names, amqp_url: str) -> None:
    for i in range(5):
        await broker.publish(names.results_exchange, names.results_key, f"u{i}".encode())
    conn = await aio_pika.connect(amqp_url)
    try:
        ch = await conn.channel()
        await ch.set_qos(prefetch_count=10)
        q = await ch.get_queue(names.update_log, ensure=False)
        got: list[bytes] = []
        done = asyncio.Event()

        async def on(m: aio_pika.abc.AbstractIncomingMessage) -> None:
            got.append(m.body)
            await m.ack()
            if len(got) == 5:
                done.set()

        await q.consume(on, arguments={"x-stream-offset": "first"})
        await asyncio.wait_for(done.wait(), 10)
        assert got == [f"u{i}".encode() for i in range(5)]
    finally:
        await conn.close()


async def test_expired_task_is_dead_lettered(broker: RabbitMQ, names: Names) -> None:
    await broker.publish(names.tasks_exchange, names.task_key("cpu"), b"task", expiration=0.2)
    dead = await Inbox.on(broker, names.dead_queue)
    d = await dead.next(15)
    assert d.body == b"task"
    death = d.headers["x-death"][0]
    assert death["reason"] == "expired" and death["queue"] == names.task_queue("cpu")


async def test_unroutable_publish_is_an_error(broker: RabbitMQ, names: Names) -> None:
    with pytest.raises(BrokerError):
        await broker.publish(names.tasks_exchange, names.task_key("no-such-capability"), b"x")


async def test_a_publish_to_a_missing_exchange_is_an_error_at_once(broker: RabbitMQ, names: Names) -> None:
    """The broker closes the channel (404): that is a wrong name, not a lost link to wait out."""
    started = time.monotonic()
    with pytest.raises(BrokerError, match="does not exist"):
        await broker.publish(f"{names.namespace}.nowhere", "", b"x")
    assert time.monotonic() - started < broker.publish_retry_seconds
    await broker.publish(names.results_exchange, names.results_key, b"still works")  # the channel came back
