"""Brokers as the tests use them, real or in memory: a second connection like the test's own,
collectors of what arrives on a queue, the check that a queue holds nothing unacked, and a
namespace's cleanup on the real RabbitMQ."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TypeVar
from urllib.parse import quote, urlsplit

import aio_pika
import pytest

from broker_config.names import REASON_HEADER, SOURCE_HEADER, Names
from broker_config.topology import topology
from fedq.broker import Management
from shared.errors import BrokerError
from shared.transport import Delivery, Transport
from shared.transport.memory import MemoryTransport
from shared.transport.rabbitmq import RabbitMQ
from tests.support.waiting import QUIET, WAIT

AnyTransport = TypeVar("AnyTransport", MemoryTransport, RabbitMQ)


def quiet_for(transport: Transport) -> float:
    """How long a silence counts as "nothing more arrives": the in-memory broker delivers at once."""
    return 0.05 if isinstance(transport, MemoryTransport) else QUIET


async def connect_like(
    transport: AnyTransport,
    name: str,
    *,
    url: str | None = None,
    heartbeat: int = 15,
    publish_retry_seconds: float = 300.0,
) -> AnyTransport:
    """Another connection to ``transport``'s broker, on its namespace (a service's own, closable
    on its own); ``url`` (RabbitMQ only) reaches the broker another way, e.g. through a proxy."""
    if isinstance(transport, MemoryTransport):
        assert url is None, "an in-memory broker has no URL"
        other: MemoryTransport | RabbitMQ = MemoryTransport(transport.broker, transport.names, name)
        other.publish_retry_seconds = publish_retry_seconds
    else:
        other = RabbitMQ(url or transport.url, transport.names, name, heartbeat, publish_retry_seconds)
    return await asyncio.wait_for(other.connect(), WAIT)  # type: ignore[return-value]


class Inbox:
    """What arrives on a queue, acked at once, for the test to look at."""

    def __init__(self, quiet: float = QUIET) -> None:
        self.got: asyncio.Queue[Delivery] = asyncio.Queue()
        self.quiet = quiet

    @classmethod
    async def on(cls, transport: Transport, queue: str) -> Inbox:
        """An inbox consuming ``queue`` on ``transport``."""
        inbox = cls(quiet_for(transport))
        await transport.consume(queue, inbox.on_message, prefetch=16)
        return inbox

    async def on_message(self, delivery: Delivery) -> None:
        await delivery.ack()
        await self.got.put(delivery)

    async def next(self, wait: float = WAIT) -> Delivery:
        return await asyncio.wait_for(self.got.get(), wait)

    async def take(self, count: int, wait: float = WAIT) -> list[Delivery]:
        """The next ``count`` messages, then nothing more for a quiet spell."""
        got = [await self.next(wait) for _ in range(count)]
        await self.expect_none()
        return got

    async def expect(self, body: bytes, reason: str, source: str) -> Delivery:
        """The next message is ``body``, dead-lettered from ``source`` with ``reason``."""
        d = await self.next()
        assert d.headers.get(REASON_HEADER) == reason, dict(d.headers)
        assert d.headers.get(SOURCE_HEADER) == source
        assert d.body == body
        return d

    async def expect_none(self, wait: float | None = None) -> None:
        with contextlib.suppress(TimeoutError):
            d = await self.next(self.quiet if wait is None else wait)
            pytest.fail(
                f"unexpected message ({len(d.body)} bytes, message id {d.message_id}, headers {dict(d.headers)})"
            )


async def drain(transport: AnyTransport, queue: str, expect: int) -> list[Delivery]:
    """Consume ``queue`` on a connection of its own (the updates queue allows no basic.get):
    ``expect`` messages, acked, then a quiet spell in which nothing more may arrive."""
    reader = await connect_like(transport, "test-reader")
    try:
        inbox = await Inbox.on(reader, queue)
        return await inbox.take(expect)
    finally:
        await reader.close()


async def assert_settled(transport: AnyTransport, queue: str) -> None:
    """Nothing is left in ``queue``: call it once the consumer's connection is closed, so that
    anything it had not acked is back in the queue and would reach this fresh consumer."""
    await drain(transport, queue, expect=0)


TEST_SHARDS = 2  # the most shards a test's job has (edge aggregation): their queues go too


async def delete_namespace(
    amqp_url: str, names: Names, capabilities: tuple[str, ...], jobs: tuple[str, ...] = ()
) -> None:
    """Delete the namespace's exchanges and shared queues, and the queues of ``names.job`` and ``jobs``;
    each deletion on a channel of its own (a failed one closes its channel), all at once, beside
    the users' (round trips one after another cost ~0.1 s a test)."""
    users = asyncio.create_task(asyncio.to_thread(delete_users, amqp_url, names.namespace))
    conn = await aio_pika.connect(amqp_url)

    async def delete(queue: str = "", exchange: str = "") -> None:
        ch = await conn.channel()
        try:
            await (ch.queue_delete(queue) if queue else ch.exchange_delete(exchange))
        except Exception:
            pass
        finally:
            if not ch.is_closed:
                await ch.close()

    try:
        topo = topology(names, capabilities)
        queues = [
            q.name for j in {names.job, *jobs} for q in topology(names.for_job(j), capabilities, shards=TEST_SHARDS).queues
        ]
        queues += [names.for_job(j).coordinator_queue for j in {names.job, *jobs}]
        await asyncio.gather(*(delete(queue=q) for q in dict.fromkeys(queues)))
        await asyncio.gather(*(delete(exchange=ex.name) for ex in topo.exchanges))
    finally:
        await conn.close()
        await users


SHARED_MANAGEMENT = "http://127.0.0.1:15672/"


def delete_users(amqp_url: str, namespace: str) -> None:
    """The namespace's broker users and policies (``fedq run`` and ``fedq broker apply`` make them)
    on the shared broker, through its management API when it answers."""
    if urlsplit(amqp_url).port not in (None, 5672):
        return  # a private node: it goes with its data
    management = Management(SHARED_MANAGEMENT, "guest", "guest", timeout=5)
    with contextlib.suppress(BrokerError):  # housekeeping: it must never fail the test it follows
        _delete_namespace_access(management, namespace)


def _delete_namespace_access(management: Management, namespace: str) -> None:
    if management.answers():
        management.delete_users([u for u in management.users() if u.startswith(f"{namespace}.")])
        for policy in management.call("GET", "/api/policies/%2F") or []:
            if policy["name"].startswith(f"{namespace}."):
                management.call("DELETE", f"/api/policies/%2F/{quote(policy['name'], safe='')}")

