"""The services' one door to RabbitMQ: a robust aio-pika connection with confirmed publishes.

Services receive a ``Broker`` as an argument; nothing else in fedq opens AMQP
connections. Settling deliveries (ack, dead-letter with a reason) happens in
``Delivery``, never in scattered calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import aio_pika
import aio_pika.exceptions
import aiormq.exceptions
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)

from broker_config.declare import declare
from broker_config.names import DETAIL_HEADER, REASON_HEADER, SOURCE_HEADER, Names
from broker_config.topology import Queue, Topology
from shared.errors import BrokerError


def with_heartbeat(url: str, heartbeat: int) -> str:
    parts = urlsplit(url)
    query = parts.query + ("&" if parts.query else "") + urlencode({"heartbeat": heartbeat})
    return urlunsplit(parts._replace(query=query)) if "heartbeat=" not in parts.query else url


@dataclass
class Delivery:
    """One received message and the only place it gets settled."""

    message: AbstractIncomingMessage
    broker: Broker
    source: str
    settled: bool = field(default=False)

    @property
    def body(self) -> bytes:
        return self.message.body

    @property
    def redelivered(self) -> bool:
        return bool(self.message.redelivered)

    async def ack(self) -> bool:
        """Ack; ``False`` when the channel it came on is gone (the broker will redeliver it)."""
        if self.settled:
            return True
        self.settled = True
        try:
            await self.message.ack()
        except LINK_ERRORS as exc:
            log.warning("ack_lost", source=self.source, error=repr(exc))
            return False
        return True

    async def retry_later(self) -> None:
        """Give the message back to the queue (counts toward its delivery limit)."""
        if not self.settled:
            self.settled = True
            try:
                await self.message.nack(requeue=True)
            except LINK_ERRORS as exc:
                log.warning("nack_lost", source=self.source, error=repr(exc))

    async def dead_letter(self, reason: str, detail: str = "") -> None:
        """Publish the raw message to the dead-letter exchange with its reason, then ack it."""
        if self.settled:
            return
        headers: dict[str, Any] = dict(self.message.headers or {})
        headers.update({REASON_HEADER: reason, DETAIL_HEADER: detail[:1000], SOURCE_HEADER: self.source})
        await self.broker.publish(self.broker.names.dead_exchange, "", self.body, headers=headers)
        await self.ack()


Handler = Callable[[Delivery], Awaitable[None]]

# Errors that mean "the link or channel is gone for now": a robust connection recovers from them.
LINK_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    asyncio.TimeoutError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ChannelClosed,
    aio_pika.exceptions.ChannelInvalidStateError,
)
log = structlog.get_logger("fedq.broker")


class Broker:
    """A named robust connection; one confirmed channel for publishing, one per consumer."""

    def __init__(
        self,
        url: str,
        names: Names,
        connection_name: str,
        heartbeat: int = 15,
        publish_retry_seconds: float = 300.0,
    ) -> None:
        self.url = with_heartbeat(url, heartbeat)
        self.names = names
        self.connection_name = connection_name
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._consumer_channels: list[AbstractChannel] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self._closing = False
        self.publish_retry_seconds = publish_retry_seconds
        self.bytes_published = 0

    @property
    def connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise BrokerError("broker is not connected")
        return self._connection

    async def connect(self, connect_timeout: float = 15.0) -> Broker:
        try:
            self._connection = await aio_pika.connect_robust(
                self.url,
                timeout=connect_timeout,
                client_properties={"connection_name": self.connection_name},
            )
        except (TimeoutError, OSError, aio_pika.exceptions.AMQPError) as exc:
            raise BrokerError(f"cannot reach RabbitMQ at {redact(self.url)}: {exc!r}") from exc
        self._publish_channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        return self

    async def declare(self, topo: Topology) -> None:
        await declare(self.connection, topo)

    async def _exchange(self, name: str) -> AbstractExchange:
        ex = self._exchanges.get(name)
        if ex is None:
            assert self._publish_channel is not None
            ex = await self._publish_channel.get_exchange(name, ensure=False)
            self._exchanges[name] = ex
        return ex

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        headers: Mapping[str, Any] | None = None,
        expiration: float | None = None,
        message_id: str | None = None,
        mandatory: bool = True,
    ) -> None:
        """Publish persistently and wait for the broker's confirm.

        While the link is down the publish is retried until ``publish_retry_seconds`` pass
        (a retried publish may arrive twice: receivers deduplicate by task id). A refusal by
        the broker (unroutable, nacked) raises ``BrokerError`` at once.
        """
        deadline = time.monotonic() + self.publish_retry_seconds
        while True:
            message = aio_pika.Message(
                body,
                headers=dict(headers or {}),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                expiration=expiration,
                message_id=message_id,
                timestamp=datetime.now(UTC),
            )
            try:
                ex = await self._exchange(exchange)
                await ex.publish(message, routing_key, mandatory=mandatory, timeout=30)
                break
            except aio_pika.exceptions.DeliveryError as exc:
                raise BrokerError(f"broker refused a message to {exchange!r}/{routing_key!r}: {exc}") from exc
            except LINK_ERRORS as exc:
                if time.monotonic() > deadline:
                    raise BrokerError(f"publish to {exchange!r} failed: {exc!r}") from exc
                log.warning("publish_retry", exchange=exchange, error=repr(exc))
                await asyncio.sleep(0.5)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.connection.ready(), max(0.1, deadline - time.monotonic()))
        self.bytes_published += len(body)

    async def _dispatch(self, handler: Handler, delivery: Delivery) -> None:
        """Run ``handler`` in a task of our own, shielded from the consumer's cancellation.

        aiormq runs each delivery's callback in a task of the channel and cancels it when the
        channel closes (a lost link, a broker restart, a consumer timeout). A handler cut off there
        would drop work already done (a trained update, a folded buffer) halfway through; shielded,
        it finishes: its publishes wait for the link (``publish``), its ack on the dead channel is
        lost (``Delivery.ack`` returns ``False``) and the broker redelivers the message, which the
        receivers recognise by task id. ``close`` cancels handlers still running.
        """

        if self._closing:
            return  # left unacked: the broker gives it back when the connection closes

        async def run() -> None:
            await handler(delivery)

        task = asyncio.create_task(run(), name=f"handle:{delivery.source}")
        self._handlers.add(task)
        task.add_done_callback(self._handler_done)
        await asyncio.shield(task)

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        self._handlers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            if self._closing:  # cut off by our own close: its delivery goes back to the queue
                log.info("handler_stopped_at_close", task=task.get_name(), error=repr(task.exception()))
            else:
                log.error("handler_failed", task=task.get_name(), error=repr(task.exception()))

    async def consume(
        self,
        queue: str,
        handler: Handler,
        prefetch: int,
        arguments: Mapping[str, Any] | None = None,
    ) -> None:
        """Consume an existing queue on a channel of its own; ``handler`` must settle each delivery.

        The queue is looked up with a passive declare, not ``get_queue(ensure=False)``: only a
        declared queue is tracked by aio-pika's robust channel, so only then is the consumer
        restored after a reconnect (with ``get_queue`` it silently was not: a broker restart
        left every service without its consumer).
        """
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        self._consumer_channels.append(channel)
        q = await channel.declare_queue(queue, passive=True)

        async def on_message(message: AbstractIncomingMessage) -> None:
            await self._dispatch(handler, Delivery(message, self, queue))

        await q.consume(on_message, arguments=dict(arguments or {}))

    async def subscribe(
        self,
        exchange: str,
        routing_keys: tuple[str, ...],
        handler: Handler,
        queue: Queue | None = None,
    ) -> None:
        """Bind a queue to ``exchange`` and consume it: a private auto-deleted one (live events
        only), or the given durable ``queue`` (events wait for us while we are away)."""
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=64)
        self._consumer_channels.append(channel)
        if queue is None:
            q = await channel.declare_queue(exclusive=True, auto_delete=True)
        else:
            q = await channel.declare_queue(queue.name, durable=True, arguments=dict(queue.arguments))
        ex = await channel.get_exchange(exchange, ensure=False)
        for key in routing_keys:
            await q.bind(ex, routing_key=key)

        async def on_message(message: AbstractIncomingMessage) -> None:
            await self._dispatch(handler, Delivery(message, self, q.name))

        await q.consume(on_message)

    async def purge(self, queue: str) -> int:
        channel = await self.connection.channel()
        try:
            q = await channel.get_queue(queue, ensure=False)
            result = await q.purge()
            return int(getattr(result, "message_count", 0) or 0)
        finally:
            await channel.close()

    async def close(self, grace: float = 5.0) -> None:
        """Cancel handlers still running (they would wait for a link that is going away), then close.
        Deliveries that arrive meanwhile are not handled: they go back to their queue."""
        self._closing = True
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        if handlers:
            await asyncio.wait(handlers, timeout=grace)
        if self._connection is not None and not self._connection.is_closed:
            await self._connection.close()


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts._replace(query=""))
