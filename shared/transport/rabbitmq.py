"""RabbitMQ through aio-pika: the real transport.

One robust connection per process, named after it; one confirmed channel for publishing and
one channel per consumer. aio-pika's and aiormq's errors stop here: above this module they are
``BrokerError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote, urlencode, urlsplit, urlunsplit

import aio_pika
import aio_pika.exceptions
import aiormq.exceptions
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from yarl import URL

from broker_config.names import Names
from broker_config.topology import Queue, Topology
from shared.amqp_urls import each_url, split_urls
from shared.errors import BrokerError, TopologyConflictError
from shared.redact import redact, redact_text
from shared.tls import ClientTls
from shared.transport import (
    Delivery,
    Handler,
    Held,
    QueueInfo,
    QueuePass,
    ReconnectCallback,
    StreamEntry,
    Transport,
)
from shared.transport.refusals import explain

# Errors that mean "the link or channel is gone for now": a robust connection recovers from them.
LINK_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    asyncio.TimeoutError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ChannelClosed,
    aio_pika.exceptions.ChannelInvalidStateError,
)
# A confirm lost with a link that aiormq dropped as stuck comes back as a CancelledError (see publish).
PUBLISH_RETRY_ERRORS: tuple[type[BaseException], ...] = (*LINK_ERRORS, asyncio.CancelledError)
# What a publish or an ack on a pass's channel raises when the broker refuses or the link is gone.
PASS_ERRORS: tuple[type[BaseException], ...] = (aio_pika.exceptions.AMQPError, *LINK_ERRORS)
# Annotations a quorum queue adds when it delivers a message: they describe our reading, not the message.
DELIVERY_HEADERS = frozenset({"x-delivery-count", "x-acquired-count"})
log = structlog.get_logger("fedq.broker")


def with_heartbeat(url: str, heartbeat: int) -> str:
    """Every URL of the list ``url`` asking for ``heartbeat`` (unless it asks for one already)."""

    def one(url: str) -> str:
        parts = urlsplit(url)
        query = parts.query + ("&" if parts.query else "") + urlencode({"heartbeat": heartbeat})
        return urlunsplit(parts._replace(query=query)) if "heartbeat=" not in parts.query else url

    return each_url(url, one)


def with_password(url: str, password: str) -> str:
    """Every URL of the list ``url`` with ``password`` for its user (a URL names the user, not the password)."""

    def one(url: str) -> str:
        parts = urlsplit(url)
        user, _, host = parts.netloc.rpartition("@")
        return urlunsplit(parts._replace(netloc=f"{user.partition(':')[0]}:{quote(password, safe='')}@{host}"))

    return each_url(url, one)


class FailoverConnection(aio_pika.RobustConnection):
    """A robust connection over the nodes of a cluster: each attempt to (re)connect dials the next of
    its URLs, round robin, forever (aio-pika's own dials its one URL again and again).

    The seam is ``RobustConnection.__connect_transport``, the one attempt of its reconnect loop
    (named, as Python mangles it, ``_RobustConnection__connect_transport``): the URL is chosen just
    before it, and the rest of the loop (back-off, channel and consumer restore, reconnect callbacks)
    stays aio-pika's."""

    def __init__(self, urls: list[str], **kwargs: Any) -> None:
        super().__init__(URL(urls[0]), **kwargs)
        self.urls = [URL(u) for u in urls]
        self.attempts = 0  # the next attempt dials urls[attempts % len(urls)]

    async def _RobustConnection__connect_transport(self) -> None:
        self.url = self.urls[self.attempts % len(self.urls)]
        self.attempts += 1
        await super()._RobustConnection__connect_transport()  # type: ignore[misc]  # private: see above


def refused_publish(exchange: str, routing_key: str, size: int, exc: BaseException) -> str:
    """The broker's PRECONDITION_FAILED on a publish, in words: a body above its max_message_size
    says which setting to change."""
    text = str(exc.args[0]) if exc.args else str(exc)
    if "larger than configured max size" in text:
        return (
            f"the broker refused a {size}-byte message to {exchange!r}/{routing_key!r}: it is larger than the "
            f"broker's max_message_size ({text}); keep --max-message-bytes at or below the broker's "
            "max_message_size (broker_config/rabbitmq.conf)"
        )
    return f"the broker refused a message to {exchange!r}/{routing_key!r}: {text}"


_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)' for (?P<what>queue|exchange) '(?P<name>[^']+)'"
    r" in vhost '[^']*': received (?P<received>.+?) but current is (?P<current>.+)$"
)


def conflict_message(reply_text: str) -> str:
    """Turn the broker's PRECONDITION_FAILED text into a message a user can act on."""
    m = _INEQUIVALENT.search(reply_text)
    if not m:
        return f"the broker refused a declaration: {reply_text}"
    return (
        f"{m['what']} {m['name']!r} already exists with {m['arg']} = {m['current']}, "
        f"but fedq declares {m['arg']} = {m['received']}. Delete the {m['what']} "
        f"(it must be empty or expendable) or run fedq with the same settings."
    )


async def declare(connection: AbstractConnection, topo: Topology, user: str | None = None) -> None:
    """Declare every exchange, queue and binding; safe to call from every process.

    A broker user without the right to configure them (a least-privilege account: the operator
    declared the topology with ``fedq broker apply``) only checks that they exist."""
    channel = await connection.channel()
    try:
        exchanges = {}
        for ex in topo.exchanges:
            exchanges[ex.name] = await channel.declare_exchange(
                ex.name, aio_pika.ExchangeType(ex.type), durable=True
            )
        queues = {}
        for q in topo.queues:
            queues[q.name] = await channel.declare_queue(
                q.name,
                durable=True,
                arguments=dict(q.arguments),  # type: ignore[arg-type]
            )
        for b in topo.bindings:
            await queues[b.queue].bind(exchanges[b.exchange], routing_key=b.routing_key)
    except aiormq.exceptions.ChannelAccessRefused:
        await expect_declared(connection, topo, user)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        text = str(exc.args[0]) if exc.args else str(exc)
        raise TopologyConflictError(conflict_message(text)) from None
    finally:
        if not channel.is_closed:
            await channel.close()


async def expect_declared(connection: AbstractConnection, topo: Topology, user: str | None) -> None:
    """Passive declares (which need no permission): every exchange and queue of ``topo`` exists,
    else say who must declare it."""
    who = f"broker user {user!r}" if user else "this broker user"
    for kind, name in [("exchange", ex.name) for ex in topo.exchanges] + [("queue", q.name) for q in topo.queues]:
        channel = await connection.channel()
        try:
            if kind == "exchange":
                await channel.get_exchange(name, ensure=True)
            else:
                await channel.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise BrokerError(
                f"{kind} {name!r} does not exist, and {who} may not declare it: the operator declares "
                "the job's topology (fedq broker apply --job ... --capabilities ...)"
            ) from None
        finally:
            if not channel.is_closed:
                await channel.close()


class RabbitDelivery(Delivery):
    """A delivery of an aio-pika message."""

    def __init__(self, message: AbstractIncomingMessage, transport: RabbitMQ, source: str) -> None:
        super().__init__(
            transport,
            source,
            message.body,
            headers=message.headers or {},
            redelivered=bool(message.redelivered),
            message_id=message.message_id,
            timestamp=message.timestamp.timestamp() if message.timestamp else None,
            user_id=message.user_id,
        )
        self.message = message

    async def _ack(self) -> bool:
        try:
            await self.message.ack()
        except LINK_ERRORS as exc:
            log.warning("ack_lost", source=self.source, error=repr(exc))
            return False
        return True

    async def _requeue(self) -> None:
        try:
            await self.message.nack(requeue=True)
        except LINK_ERRORS as exc:
            log.warning("nack_lost", source=self.source, error=repr(exc))


class RabbitMQ(Transport):
    """A named robust connection; one confirmed channel for publishing, one per consumer."""

    def __init__(
        self,
        url: str,
        names: Names,
        connection_name: str,
        heartbeat: int = 15,
        publish_retry_seconds: float = 300.0,
        connect_timeout: float = 15.0,
        *,
        tls: ClientTls | None = None,
        password: Callable[[], str] | None = None,
    ) -> None:
        """``tls``: how an ``amqps://`` URL verifies the broker (``shared.tls.client_tls``);
        ``password``: where the password of the URL's user comes from, asked at ``connect``, so
        that it stays out of ``url`` and of every message."""
        self.url = with_heartbeat(url, heartbeat)
        self.tls = tls
        self._password = password
        self.names = names
        self.connection_name = connection_name
        self.connect_timeout = connect_timeout
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._consumer_channels: list[AbstractChannel] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self._closing = False
        self.publish_retry_seconds = publish_retry_seconds
        self.bytes_published = 0

    @property
    def user_id(self) -> str | None:
        """The broker user this connection logs in as, set as the ``user_id`` of every message it
        publishes: the broker refuses a message whose ``user_id`` is not its connection's user, so a
        receiver may rely on it as a second identity beside the signature. With no user in the URL
        and a client certificate, the login is the certificate's CN (EXTERNAL); else None."""
        name = urlsplit(self.url).username
        if name:
            return unquote(name)
        return (self.tls.cert_login or None) if self.tls is not None else None

    @property
    def connection(self) -> AbstractRobustConnection:
        """The aio-pika connection, for tests that cut or inspect the link."""
        if self._connection is None:
            raise BrokerError("broker is not connected")
        return self._connection

    async def connect(self) -> RabbitMQ:
        """Open the connection to the first of the URLs that answers (the link, once lost, goes on to
        the next ones in turn); a refusal the user can fix (a certificate that does not verify,
        plain AMQP against a TLS port or the other way round, a refused login) says which flag to fix."""
        url = self.url if self._password is None else with_password(self.url, self._password())
        urls, plain = split_urls(url), split_urls(self.url)
        refusals: list[str] = []
        last: BaseException | None = None
        for i in range(len(urls)):
            connection = FailoverConnection(
                urls[i:] + urls[:i],
                client_properties={"connection_name": self.connection_name},
                ssl_context=self.tls.context if self.tls is not None else None,
            )
            try:
                await connection.connect(timeout=self.connect_timeout)
            except (TimeoutError, OSError, aio_pika.exceptions.AMQPError) as exc:
                await connection.close()
                last = exc
                why = await explain(plain[i], exc, self.tls)
                refusals.append(why or f"cannot reach RabbitMQ at {redact(plain[i])}: {redact_text(repr(exc))}")
                continue
            self._connection = connection
            break
        else:
            raise BrokerError(
                refusals[0] if len(refusals) == 1 else f"no RabbitMQ node answers: {'; '.join(refusals)}"
            ) from last
        self._publish_channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        return self

    async def declare(self, topo: Topology) -> None:
        await declare(self.connection, topo, self.user_id)

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

        While the link is down the publish is retried until ``publish_retry_seconds`` pass. A
        confirm lost with the link is retried too: when aiormq drops a connection as stuck
        (missed heartbeats: a silent partition) it fails the pending confirm with
        ``CancelledError`` although nobody cancelled the caller; that is a lost link, not a
        cancellation. A real cancellation of the caller is passed on. A publish the broker nacks
        (a queue it routes to has no leader for now: a cluster node was lost) is retried too, until
        the same deadline. A refusal by the broker (unroutable, above its ``max_message_size``) raises
        ``BrokerError`` at once; a body above our own cap is refused before it is sent (``TooLargeError``).
        """
        self.check_publish_size(exchange, body)
        deadline = time.monotonic() + self.publish_retry_seconds
        while True:
            message = aio_pika.Message(
                body,
                headers=dict(headers or {}),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                expiration=expiration,
                message_id=message_id,
                timestamp=datetime.now(UTC),
                user_id=self.user_id,
            )
            try:
                ex = await self._exchange(exchange)
                await ex.publish(message, routing_key, mandatory=mandatory, timeout=30)
                break
            except aio_pika.exceptions.DeliveryError as exc:
                # A nack is the broker's "not now": a queue or stream the message routes to has no
                # leader yet (a cluster node was lost and its members elect a new one). Retried like a
                # lost link; a message returned unroutable is refused at once.
                if not isinstance(exc.frame, aiormq.spec.Basic.Nack) or time.monotonic() > deadline:
                    raise BrokerError(f"broker refused a message to {exchange!r}/{routing_key!r}: {exc}") from exc
                log.warning("publish_retry", exchange=exchange, error="nacked by the broker")
                await asyncio.sleep(0.5)
            except aiormq.exceptions.ChannelNotFoundEntity as exc:
                self._exchanges.pop(exchange, None)
                raise BrokerError(f"exchange {exchange!r} does not exist: is --namespace right?") from exc
            except aiormq.exceptions.ChannelPreconditionFailed as exc:  # a ChannelClosed: not a lost link
                self._exchanges.pop(exchange, None)  # the broker closed the channel; the robust one reopens
                raise BrokerError(refused_publish(exchange, routing_key, len(body), exc)) from exc
            except PUBLISH_RETRY_ERRORS as exc:
                if isinstance(exc, asyncio.CancelledError):
                    current = asyncio.current_task()
                    if current is None or current.cancelling() or self._closing:
                        raise
                if time.monotonic() > deadline:
                    raise BrokerError(f"publish to {exchange!r} failed: {exc!r}") from exc
                log.warning("publish_retry", exchange=exchange, error=repr(exc) or "confirm lost with the link")
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
        try:
            q = await channel.declare_queue(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise BrokerError(f"queue {queue!r} does not exist: is --namespace right?") from None

        async def on_message(message: AbstractIncomingMessage) -> None:
            await self._dispatch(handler, RabbitDelivery(message, self, queue))

        await q.consume(on_message, arguments=dict(arguments or {}))

    async def subscribe(
        self,
        exchange: str,
        routing_keys: tuple[str, ...],
        handler: Handler,
        queue: Queue | None = None,
    ) -> None:
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=self.prefetch(64))
        self._consumer_channels.append(channel)
        if queue is None:  # named by us, under the job's listener prefix (see Names.listener_prefix)
            name = f"{self.names.listener_prefix}{secrets.token_hex(6)}"
            q = await channel.declare_queue(name, exclusive=True, auto_delete=True)
        else:
            q = await channel.declare_queue(queue.name, durable=True, arguments=dict(queue.arguments))
        ex = await channel.get_exchange(exchange, ensure=False)
        for key in routing_keys:
            await q.bind(ex, routing_key=key)

        async def on_message(message: AbstractIncomingMessage) -> None:
            await self._dispatch(handler, RabbitDelivery(message, self, q.name))

        await q.consume(on_message)

    async def read_stream(
        self, stream: str, offset: Any = "first", idle: float = 1.5
    ) -> AsyncIterator[StreamEntry]:
        """A consumer of its own on a channel of its own, acking only its own stream deliveries."""
        channel = await self.connection.channel()
        entries: asyncio.Queue[StreamEntry] = asyncio.Queue()
        try:
            await channel.set_qos(prefetch_count=self.prefetch(500))
            try:
                q = await channel.declare_queue(stream, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                raise BrokerError(f"stream {stream!r} does not exist: is --namespace right?") from None

            async def on_message(message: AbstractIncomingMessage) -> None:
                headers = dict(message.headers or {})
                ts = message.timestamp.timestamp() if message.timestamp else None
                raw_offset = headers.get("x-stream-offset", -1)
                number = raw_offset if isinstance(raw_offset, int) else -1
                entries.put_nowait(StreamEntry(number, ts, message.body, headers))
                await message.ack()

            last = await self._last_offset(stream)
            await q.consume(on_message, arguments={"x-stream-offset": offset})
            while True:
                try:
                    entry = await asyncio.wait_for(entries.get(), idle)
                except TimeoutError:
                    return
                yield entry
                if last is not None and entry.offset >= last:
                    return  # the log as it stood when the read began: no wait for quiet after it
        finally:
            if not channel.is_closed:
                with contextlib.suppress(*PASS_ERRORS):
                    await channel.close()

    async def _last_offset(self, stream: str, quiet: float = 0.25, wait: float = 1.0) -> int | None:
        """The offset of the stream's newest entry (``None``: empty, or none came within ``wait``):
        a consumer at ``last`` gets the newest chunk at once, which ends within ``quiet``."""
        newest: int | None = None
        got = asyncio.Event()
        async with self._channel() as channel:
            await channel.set_qos(prefetch_count=self.prefetch(500))
            q = await channel.declare_queue(stream, passive=True)

            async def on_message(message: AbstractIncomingMessage) -> None:
                nonlocal newest
                number = (message.headers or {}).get("x-stream-offset")
                if isinstance(number, int) and (newest is None or number > newest):
                    newest = number
                got.set()
                await message.ack()

            await q.consume(on_message, arguments={"x-stream-offset": "last"})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(got.wait(), wait)
                while True:  # the rest of the chunk follows at once
                    got.clear()
                    await asyncio.wait_for(got.wait(), quiet)
        return newest

    @contextlib.asynccontextmanager
    async def _channel(self, **options: Any) -> AsyncIterator[AbstractChannel]:
        """A channel for one errand, closed after it (a 404 closes it for us)."""
        channel = await self.connection.channel(**options)
        try:
            yield channel
        finally:
            if not channel.is_closed:
                await channel.close()

    async def queue_info(self, queue: str) -> QueueInfo | None:
        async with self._channel() as channel:
            try:
                declared = await channel.declare_queue(queue, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                return None
        result = declared.declaration_result
        return QueueInfo(queue, int(result.message_count or 0), int(result.consumer_count or 0))

    async def exchange_exists(self, exchange: str) -> bool:
        async with self._channel() as channel:
            try:
                await channel.get_exchange(exchange, ensure=True)  # passive: declares nothing
            except aiormq.exceptions.ChannelNotFoundEntity:
                return False
        return True

    async def purge(self, queue: str) -> int:
        async with self._channel() as channel:
            q = await channel.get_queue(queue, ensure=False)
            result = await q.purge()
            return int(getattr(result, "message_count", 0) or 0)

    @contextlib.asynccontextmanager
    async def queue_pass(self, queue: str) -> AsyncIterator[QueuePass]:
        # leaving the block closes the channel: anything still held goes back to the queue
        async with self._channel(publisher_confirms=True, on_return_raises=True) as channel:
            try:
                q = await channel.declare_queue(queue, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity as exc:
                raise BrokerError(f"no queue {queue!r} on the broker: is the namespace right?") from exc
            yield _RabbitPass(channel, q)

    def on_reconnect(self, callback: ReconnectCallback) -> Callable[[], None]:
        def relay(*_: Any) -> None:
            callback()

        callbacks = self.connection.reconnect_callbacks
        callbacks.add(relay)
        return lambda: callbacks.discard(relay)

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


class _RabbitPass(QueuePass):
    """``basic.get`` until empty; copies go to the tail through the default exchange."""

    def __init__(self, channel: AbstractChannel, queue: AbstractQueue) -> None:
        self.channel = channel
        self.queue = queue

    async def take(self) -> Held | None:
        message = await self.queue.get(no_ack=False, fail=False, timeout=30)
        if message is None:
            return None
        properties = {
            "content_type": message.content_type,
            "content_encoding": message.content_encoding,
            "priority": message.priority,
            "correlation_id": message.correlation_id,
            "reply_to": message.reply_to,
            "expiration": message.expiration,
            "type": message.type,
            "app_id": message.app_id,
            "raw_timestamp": message.timestamp,
        }
        return Held(
            body=message.body,
            headers=dict(message.headers or {}),
            timestamp=message.timestamp.timestamp() if message.timestamp else None,
            redelivered=bool(message.redelivered),
            message_id=message.message_id,
            properties=properties,
            token=message,
        )

    async def copy_back(self, held: Held) -> BaseException | None:
        p = held.properties
        copy = aio_pika.Message(
            held.body,
            headers={k: v for k, v in held.headers.items() if k not in DELIVERY_HEADERS},
            content_type=p.get("content_type"),
            content_encoding=p.get("content_encoding"),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            priority=p.get("priority"),
            correlation_id=p.get("correlation_id"),
            reply_to=p.get("reply_to"),
            expiration=p.get("expiration"),
            message_id=held.message_id,
            timestamp=p.get("raw_timestamp"),
            type=p.get("type"),
            app_id=p.get("app_id"),
        )
        try:
            await self.channel.default_exchange.publish(copy, self.queue.name, mandatory=True, timeout=30)
        except PASS_ERRORS as exc:
            return exc
        return None

    async def ack(self, held: Held) -> BaseException | None:
        message: AbstractIncomingMessage = held.token
        try:
            await message.ack()
        except PASS_ERRORS as exc:
            return exc
        return None
