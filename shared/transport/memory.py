"""An in-process broker and transport: the RabbitMQ semantics fedq relies on, without RabbitMQ.

``MemoryBroker`` is the shared "server"; each ``MemoryTransport`` is one process's connection
to it. The broker acts synchronously on the event loop (no locks needed); only handlers run in
tasks of their own, as with ``RabbitMQ``. The semantics kept are those of ``shared.transport``.

Not modelled: stream retention (x-max-age, x-max-length-bytes), queue length limits, headers
exchanges and exchange-to-exchange bindings, dead-letter cycle detection, consumer timeouts,
and a whole-broker restart (``drop`` cuts one connection at a time). A transport made with a
``user`` stamps it as every message's user_id, as ``RabbitMQ`` does (and the broker checks).
Timestamps are whole seconds, as in AMQP.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from broker_config.names import Names
from broker_config.topology import Queue, Topology
from shared.errors import BrokerError, TopologyConflictError
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

EXCHANGE_TYPES = frozenset({"direct", "fanout", "topic"})
# Annotations the broker adds when it delivers: they describe our reading, not the message.
DELIVERY_HEADERS = frozenset({"x-delivery-count", "x-acquired-count", "x-stream-offset"})
log = structlog.get_logger("fedq.broker")


def topic_matches(pattern: str, key: str) -> bool:
    """RabbitMQ's topic match: dot-separated words, ``*`` is exactly one word, ``#`` zero or more."""

    def match(p: list[str], k: list[str]) -> bool:
        if not p:
            return not k
        if p[0] == "#":
            return any(match(p[1:], k[i:]) for i in range(len(k) + 1))
        return bool(k) and p[0] in ("*", k[0]) and match(p[1:], k[1:])

    return match(pattern.split("."), key.split("."))


def _matches(exchange_type: str, binding_key: str, key: str) -> bool:
    if exchange_type == "topic":
        return topic_matches(binding_key, key)
    return exchange_type == "fanout" or binding_key == key


@dataclass
class _Message:
    """A message as one queue holds it: every queue it is routed to gets its own copy."""

    body: bytes
    headers: dict[str, Any]
    exchange: str
    routing_key: str
    message_id: str | None
    timestamp: float | None
    expiration: float | None = None  # seconds, as published
    expires_at: float | None = None  # monotonic deadline, set when it enters a queue
    redelivered: bool = False
    returns: int = 0  # times given back unsettled: a quorum queue's delivery count
    user_id: str | None = None  # the publishing connection's user


@dataclass(eq=False)
class _Queue:
    name: str
    arguments: dict[str, Any]
    owner: MemoryTransport | None = None  # the connection a private queue lives and dies with
    ready: deque[_Message] = field(default_factory=deque)
    log: list[_Message] = field(default_factory=list)  # a stream's entries; the index is the offset
    consumers: list[_Consumer] = field(default_factory=list)
    grown: asyncio.Event = field(default_factory=asyncio.Event)  # set (and replaced) on each append
    deleted: bool = False
    used: int = 0  # bumped on every use, so a pending x-expires check knows it is stale
    turn: int = 0  # round-robin over consumers

    @property
    def kind(self) -> str:
        return str(self.arguments.get("x-queue-type", "classic"))

    @property
    def is_stream(self) -> bool:
        return self.kind == "stream"


@dataclass(eq=False)
class _Consumer:
    """One consumer on one queue, for as long as its connection lasts (a new one after a reconnect)."""

    transport: MemoryTransport
    queue: _Queue
    handler: Handler
    prefetch: int
    position: int = 0  # next offset, when consuming a stream
    unsettled: dict[MemoryDelivery, None] = field(default_factory=dict)  # in delivery order

    def has_room(self) -> bool:
        return self.transport.live and (self.prefetch <= 0 or len(self.unsettled) < self.prefetch)


@dataclass(frozen=True)
class _Sub:
    """What ``consume`` or ``subscribe`` asked for, to restore it after a reconnect."""

    queue: str
    handler: Handler
    prefetch: int
    arguments: Mapping[str, Any]
    private_bindings: tuple[tuple[str, str], ...] | None = None  # a private queue's (exchange, key)s


def _stream_start(q: _Queue, offset: Any) -> int:
    """Where a reader of ``q`` starts: ``first``, ``last``, ``next``, an offset or a datetime."""
    n = len(q.log)
    if offset in (None, "first"):
        return 0
    if offset == "last":
        return max(n - 1, 0)
    if offset == "next":
        return n
    if isinstance(offset, datetime):
        return next((i for i, m in enumerate(q.log) if (m.timestamp or 0) >= offset.timestamp()), n)
    if isinstance(offset, int) and not isinstance(offset, bool):
        return max(offset, 0)
    raise BrokerError(f"invalid stream offset {offset!r}")


class MemoryBroker:
    """The shared in-process server: exchanges, queues, streams and bindings."""

    def __init__(self) -> None:
        self.exchanges: dict[str, str] = {"": "direct"}
        self.queues: dict[str, _Queue] = {}
        self.bindings: dict[str, set[tuple[str, str]]] = {"": set()}  # exchange -> (queue, key)

    def queue(self, name: str) -> _Queue:
        q = self.queues.get(name)
        if q is None:
            raise BrokerError(f"queue {name!r} does not exist: is --namespace right?")
        return q

    def declare_exchange(self, name: str, type_: str) -> None:
        if type_ not in EXCHANGE_TYPES:
            raise BrokerError(f"exchange type {type_!r} is not modelled")
        current = self.exchanges.setdefault(name, type_)
        self.bindings.setdefault(name, set())
        if current != type_:
            raise TopologyConflictError(
                f"exchange {name!r} already exists with type = {current}, but fedq declares type = {type_}."
            )

    def declare_queue(
        self, name: str, arguments: Mapping[str, Any], owner: MemoryTransport | None = None
    ) -> _Queue:
        args = dict(arguments)
        q = self.queues.get(name)
        if q is None:
            q = self.queues[name] = _Queue(name, args, owner)
        else:
            have = {"x-queue-type": "classic", **q.arguments}
            want = {"x-queue-type": "classic", **args}
            for arg in sorted(have.keys() | want.keys()):
                if have.get(arg) != want.get(arg):
                    raise TopologyConflictError(
                        f"queue {name!r} already exists with {arg} = {have.get(arg)!r}, but fedq declares "
                        f"{arg} = {want.get(arg)!r}. Delete the queue or run fedq with the same settings."
                    )
        self._touch(q)
        return q

    def bind(self, queue: str, exchange: str, key: str) -> None:
        self.queue(queue)
        if exchange not in self.exchanges or exchange == "":
            raise BrokerError(f"cannot bind {queue!r} to exchange {exchange!r}: no such exchange")
        self.bindings[exchange].add((queue, key))

    def delete_queue(self, name: str) -> None:
        q = self.queues.pop(name, None)
        if q is not None:
            q.deleted = True
            for bound in self.bindings.values():
                bound.difference_update({b for b in bound if b[0] == name})

    def route(self, exchange: str, key: str, message: _Message) -> int:
        """Put a copy of ``message`` on every queue ``exchange`` routes ``key`` to; how many."""
        type_ = self.exchanges.get(exchange)
        if type_ is None:
            raise BrokerError(f"exchange {exchange!r} does not exist: is --namespace right?")
        if exchange == "":
            targets = [key] if key in self.queues else []
        else:
            targets = sorted({q for q, bound in self.bindings[exchange] if _matches(type_, bound, key)})
        for name in targets:
            self._enqueue(self.queues[name], dataclasses.replace(message, headers=dict(message.headers)))
        return len(targets)

    def _enqueue(self, q: _Queue, m: _Message) -> None:
        if q.is_stream:
            q.log.append(m)
            q.grown.set()
            q.grown = asyncio.Event()
        else:
            ttl_ms = q.arguments.get("x-message-ttl")
            ttls = [
                t for t in (m.expiration, ttl_ms / 1000 if isinstance(ttl_ms, int) else None) if t is not None
            ]
            if ttls:
                m.expires_at = time.monotonic() + min(ttls)
                asyncio.get_running_loop().call_later(min(ttls) + 0.001, self.pump, q)
            q.ready.append(m)
        self.pump(q)

    def _expire_head(self, q: _Queue) -> None:
        """Messages expire when they reach the head of their queue, as in RabbitMQ."""
        now = time.monotonic()
        while q.ready and q.ready[0].expires_at is not None and q.ready[0].expires_at <= now:
            self._dead_letter(q, q.ready.popleft(), "expired")

    def pump(self, q: _Queue) -> None:
        """Hand ready messages to consumers with room: the first one only under single active consumer."""
        if q.deleted:
            return
        self._expire_head(q)
        if q.is_stream:
            for c in q.consumers:
                while c.has_room() and c.position < len(q.log):
                    c.transport._deliver(c, q.log[c.position], c.position)
                    c.position += 1
            return
        active = q.consumers[:1] if q.arguments.get("x-single-active-consumer") else q.consumers
        while q.ready:
            room = [c for c in active if c.has_room()]
            if not room:
                break
            q.turn += 1
            consumer = room[q.turn % len(room)]
            consumer.transport._deliver(consumer, q.ready.popleft(), None)
            self._expire_head(q)

    def give_back(self, q: _Queue, m: _Message) -> None:
        """A message returned unsettled goes back to the head, redelivered; past a quorum queue's
        ``x-delivery-limit`` it is dead-lettered instead (RabbitMQ 3.10+)."""
        if q.deleted or q.is_stream:
            return
        m.redelivered = True
        m.returns += 1
        limit = q.arguments.get("x-delivery-limit")
        if q.kind == "quorum" and isinstance(limit, int) and m.returns > limit:
            self._dead_letter(q, m, "delivery_limit")
        else:
            q.ready.appendleft(m)

    def _dead_letter(self, q: _Queue, m: _Message, reason: str) -> None:
        """Republish to the queue's dead-letter exchange with RabbitMQ's x-death headers, or drop."""
        dlx = q.arguments.get("x-dead-letter-exchange")
        if not isinstance(dlx, str) or dlx not in self.exchanges:
            return
        headers = dict(m.headers)
        deaths = [dict(d) for d in headers.get("x-death", []) if isinstance(d, Mapping)]
        same = next((d for d in deaths if d.get("queue") == q.name and d.get("reason") == reason), None)
        if same is not None:
            deaths.remove(same)
        death = {
            "count": (same or {}).get("count", 0) + 1,
            "reason": reason,
            "queue": q.name,
            "time": datetime.fromtimestamp(int(time.time()), UTC),
            "exchange": m.exchange,
            "routing-keys": [m.routing_key],
        }
        if m.expiration is not None:
            death["original-expiration"] = str(int(m.expiration * 1000))
        headers["x-death"] = [death, *deaths]
        for prefix in ("x-first-death-", "x-last-death-"):
            for part in ("queue", "reason", "exchange"):
                if prefix == "x-last-death-" or prefix + part not in headers:
                    headers[prefix + part] = death[part]
        key = q.arguments.get("x-dead-letter-routing-key", m.routing_key)
        self.route(dlx, str(key), _Message(m.body, headers, dlx, str(key), m.message_id, m.timestamp))

    def _touch(self, q: _Queue) -> None:
        """Note a use of ``q``; with ``x-expires``, delete it once unused (no consumer) that long."""
        q.used += 1
        ms = q.arguments.get("x-expires")
        if isinstance(ms, int) and not q.consumers:
            stamp = q.used

            def expire() -> None:
                if not q.deleted and q.used == stamp and not q.consumers:
                    self.delete_queue(q.name)

            asyncio.get_running_loop().call_later(ms / 1000, expire)

    def drop(self, transport: MemoryTransport) -> None:
        """Cut ``transport``'s connection: its consumers go, their unsettled deliveries and its
        passes' held messages go back (redelivered), its private queues are deleted."""
        if transport.state == "up":
            transport.state = "down"
            transport.up.clear()
        for p in list(transport.passes):
            p.close()
        touched: set[_Queue] = set()
        for c in transport.consumers:
            with contextlib.suppress(ValueError):
                c.queue.consumers.remove(c)
            for d in reversed(list(c.unsettled)):
                self.give_back(c.queue, d.message)
            c.unsettled.clear()
            touched.add(c.queue)
        transport.consumers.clear()
        for q in [q for q in self.queues.values() if q.owner is transport]:
            self.delete_queue(q.name)
        for q in touched:
            self._touch(q)
            self.pump(q)


class MemoryDelivery(Delivery):
    """A delivery from a ``MemoryBroker`` queue; settling it after its link was lost does nothing."""

    def __init__(self, consumer: _Consumer, message: _Message, offset: int | None) -> None:
        headers = dict(message.headers)
        if message.returns and consumer.queue.kind == "quorum":
            headers["x-delivery-count"] = message.returns
        if offset is not None:
            headers["x-stream-offset"] = offset
        super().__init__(
            consumer.transport,
            consumer.queue.name,
            message.body,
            headers=headers,
            redelivered=message.redelivered,
            message_id=message.message_id,
            timestamp=message.timestamp,
            user_id=message.user_id,
        )
        self.consumer = consumer
        self.message = message

    def _settle(self) -> bool:
        if self not in self.consumer.unsettled:
            return False  # given back with its lost link
        del self.consumer.unsettled[self]
        return True

    async def _ack(self) -> bool:
        if not self._settle():
            log.warning("ack_lost", source=self.source, error="link lost")
            return False
        self.consumer.transport.broker.pump(self.consumer.queue)
        return True

    async def _requeue(self) -> None:
        if not self._settle():
            log.warning("nack_lost", source=self.source, error="link lost")
            return
        broker = self.consumer.transport.broker
        broker.give_back(self.consumer.queue, self.message)
        broker.pump(self.consumer.queue)


class MemoryTransport(Transport):
    """One process's connection to a ``MemoryBroker``; ``lose_link`` simulates a lost, recovered link."""

    def __init__(
        self, broker: MemoryBroker, names: Names, connection_name: str = "memory", user: str | None = None
    ) -> None:
        self.broker = broker
        self.user_id = user
        self.names = names
        self.connection_name = connection_name
        self.publish_retry_seconds = 300.0
        self.bytes_published = 0
        self.state = "new"  # new | up | down | closed
        self.up = asyncio.Event()
        self.consumers: list[_Consumer] = []
        self.passes: set[_MemoryPass] = set()
        self._subs: list[_Sub] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self._callbacks: list[ReconnectCallback] = []
        self._closing = False

    @property
    def live(self) -> bool:
        """Whether deliveries may be handed to this connection's consumers."""
        return self.state == "up" and not self._closing

    def _check_open(self) -> None:
        if self.state in ("new", "closed"):
            what = "closed" if self.state == "closed" else "not connected"
            raise BrokerError(f"transport {self.connection_name!r} is {what}")

    async def _wait_link(self) -> None:
        """Wait out a lost link for up to ``publish_retry_seconds``, as ``RabbitMQ.publish`` does."""
        self._check_open()
        if self.state == "down":
            try:
                await asyncio.wait_for(self.up.wait(), self.publish_retry_seconds)
            except TimeoutError:
                raise BrokerError(f"link of {self.connection_name!r} still down") from None
            self._check_open()

    async def connect(self) -> MemoryTransport:
        if self.state == "closed":
            raise BrokerError(f"transport {self.connection_name!r} is closed")
        self.state = "up"
        self.up.set()
        return self

    async def declare(self, topo: Topology) -> None:
        self._check_open()
        for ex in topo.exchanges:
            self.broker.declare_exchange(ex.name, ex.type)
        for q in topo.queues:
            self.broker.declare_queue(q.name, q.arguments)
        for b in topo.bindings:
            self.broker.bind(b.queue, b.exchange, b.routing_key)

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
        self.check_publish_size(exchange, body)
        await self._wait_link()
        message = _Message(
            body,
            dict(headers or {}),
            exchange,
            routing_key,
            message_id,
            float(int(time.time())),
            expiration,
            user_id=self.user_id,
        )
        if self.broker.route(exchange, routing_key, message) == 0 and mandatory:
            raise BrokerError(
                f"broker refused a message to {exchange!r}/{routing_key!r}: unroutable (NO_ROUTE)"
            )
        self.bytes_published += len(body)

    def _deliver(self, consumer: _Consumer, message: _Message, offset: int | None) -> None:
        """Hand one message to ``consumer``'s handler, in a task of its own."""
        delivery = MemoryDelivery(consumer, message, offset)
        consumer.unsettled[delivery] = None

        async def run() -> None:
            await consumer.handler(delivery)

        task = asyncio.get_running_loop().create_task(run(), name=f"handle:{delivery.source}")
        self._handlers.add(task)
        task.add_done_callback(self._handler_done)

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        self._handlers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("handler_failed", task=task.get_name(), error=repr(task.exception()))

    def _attach(self, sub: _Sub) -> None:
        if sub.private_bindings is not None:
            self.broker.declare_queue(sub.queue, {}, owner=self)
            for exchange, key in sub.private_bindings:
                self.broker.bind(sub.queue, exchange, key)
        q = self.broker.queue(sub.queue)
        start = _stream_start(q, sub.arguments.get("x-stream-offset", "next")) if q.is_stream else 0
        consumer = _Consumer(self, q, sub.handler, sub.prefetch, start)
        q.consumers.append(consumer)
        q.used += 1
        self.consumers.append(consumer)
        self.broker.pump(q)

    async def consume(
        self, queue: str, handler: Handler, prefetch: int, arguments: Mapping[str, Any] | None = None
    ) -> None:
        self._check_open()
        sub = _Sub(queue, handler, prefetch, dict(arguments or {}))
        self._attach(sub)
        self._subs.append(sub)

    async def subscribe(
        self, exchange: str, routing_keys: tuple[str, ...], handler: Handler, queue: Queue | None = None
    ) -> None:
        self._check_open()
        if queue is None:
            sub = _Sub(
                f"amq.gen-{uuid.uuid4().hex}", handler, 64, {}, tuple((exchange, k) for k in routing_keys)
            )
        else:
            self.broker.declare_queue(queue.name, queue.arguments)
            for key in routing_keys:
                self.broker.bind(queue.name, exchange, key)
            sub = _Sub(queue.name, handler, 64, {})
        self._attach(sub)
        self._subs.append(sub)

    async def read_stream(
        self, stream: str, offset: Any = "first", idle: float = 1.5
    ) -> AsyncIterator[StreamEntry]:
        """Entries from ``offset`` on, waiting up to ``idle`` seconds for each new one."""
        self._check_open()
        q = self.broker.queue(stream)
        if not q.is_stream:
            raise BrokerError(f"{stream!r} is not a stream")
        position = _stream_start(q, offset)
        while True:
            if position < len(q.log):
                m = q.log[position]
                yield StreamEntry(position, m.timestamp, m.body, {**m.headers, "x-stream-offset": position})
                position += 1
                continue
            try:
                await asyncio.wait_for(q.grown.wait(), idle)
            except TimeoutError:
                return

    async def queue_info(self, queue: str) -> QueueInfo | None:
        self._check_open()
        q = self.broker.queues.get(queue)
        if q is None:
            return None
        self.broker.pump(q)
        return QueueInfo(queue, len(q.log) if q.is_stream else len(q.ready), len(q.consumers))

    async def exchange_exists(self, exchange: str) -> bool:
        self._check_open()
        return exchange in self.broker.exchanges

    async def purge(self, queue: str) -> int:
        self._check_open()
        q = self.broker.queue(queue)
        if q.is_stream:
            raise BrokerError(f"cannot purge stream {queue!r}")
        count = len(q.ready)
        q.ready.clear()
        return count

    @contextlib.asynccontextmanager
    async def queue_pass(self, queue: str) -> AsyncIterator[QueuePass]:
        self._check_open()
        q = self.broker.queues.get(queue)
        if q is None:
            raise BrokerError(f"no queue {queue!r} on the broker: is the namespace right?")
        p = _MemoryPass(self, q)
        self.passes.add(p)
        try:
            yield p
        finally:
            p.close()

    def on_reconnect(self, callback: ReconnectCallback) -> Callable[[], None]:
        self._callbacks.append(callback)

        def forget() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.remove(callback)

        return forget

    async def reconnect(self) -> None:
        """Come back after ``MemoryBroker.drop``: restore the consumers, then call the reconnect callbacks."""
        if self.state != "down":
            return
        self.state = "up"
        self.up.set()
        for sub in self._subs:
            try:
                self._attach(sub)
            except BrokerError as exc:
                log.warning("consumer_not_restored", queue=sub.queue, error=str(exc))
        for callback in list(self._callbacks):
            try:
                callback()
            except Exception as exc:
                log.error("reconnect_callback_failed", error=repr(exc))

    async def lose_link(self, downtime: float = 0.0) -> None:
        """Simulate a lost connection that recovers after ``downtime`` seconds (aio-pika's robust one)."""
        self.broker.drop(self)
        await asyncio.sleep(downtime)
        await self.reconnect()

    async def close(self, grace: float = 5.0) -> None:
        if self.state == "closed":
            return
        self._closing = True
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        if handlers:
            await asyncio.wait(handlers, timeout=grace)
        self.broker.drop(self)
        self.state = "closed"
        self.up.set()  # wakes publishes waiting for the link: they fail


class _MemoryPass(QueuePass):
    """``basic.get`` on a ``MemoryBroker`` queue; closing it gives back what is still held."""

    def __init__(self, transport: MemoryTransport, queue: _Queue) -> None:
        self.transport = transport
        self.queue = queue
        self.held: dict[int, _Message] = {}  # in the order taken
        self.tokens = itertools.count()
        self.closed = False

    async def take(self) -> Held | None:
        if self.closed:
            raise BrokerError(f"the pass over {self.queue.name!r} is closed (link lost)")
        broker = self.transport.broker
        broker._touch(self.queue)
        broker.pump(self.queue)
        if not self.queue.ready:
            return None
        m = self.queue.ready.popleft()
        token = next(self.tokens)
        self.held[token] = m
        headers = {
            **m.headers,
            **({"x-delivery-count": m.returns} if m.returns and self.queue.kind == "quorum" else {}),
        }
        return Held(
            m.body, headers, m.timestamp, m.redelivered, m.message_id, {"expiration": m.expiration}, token
        )

    async def copy_back(self, held: Held) -> BaseException | None:
        if self.closed or self.queue.deleted:
            return BrokerError(f"cannot copy back to {self.queue.name!r}: the pass or the queue is gone")
        headers = {k: v for k, v in held.headers.items() if k not in DELIVERY_HEADERS}
        expiration = held.properties.get("expiration")
        copy = _Message(held.body, headers, "", self.queue.name, held.message_id, held.timestamp, expiration)
        self.transport.broker.route("", self.queue.name, copy)
        return None

    async def ack(self, held: Held) -> BaseException | None:
        if self.closed or self.held.pop(held.token, None) is None:
            return BrokerError(
                f"cannot ack on {self.queue.name!r}: the pass is closed or the message not held"
            )
        return None

    def close(self) -> None:
        """Give back every message still held, so that they stay in their order at the head."""
        if self.closed:
            return
        self.closed = True
        self.transport.passes.discard(self)
        for m in reversed(list(self.held.values())):
            self.transport.broker.give_back(self.queue, m)
        self.held.clear()
        self.transport.broker.pump(self.queue)
