"""The seam between fedq and its broker: what services, tools and tests may ask of a transport.

Two implementations hold to it: ``shared.transport.rabbitmq.RabbitMQ`` (aio-pika, the real
thing) and ``shared.transport.memory.MemoryTransport`` (in process, for fast tests of service
logic). Nothing above this interface sees aio-pika types or errors: a transport raises
``BrokerError`` (and its subclasses) only.

Semantics both implementations keep, because services rely on them:

- ``publish`` returns once the broker has confirmed the message (publisher confirms); a
  message the broker cannot route with ``mandatory=True`` raises ``BrokerError``. While the
  link is down a publish is retried for ``publish_retry_seconds``, so a publish may arrive
  twice: receivers deduplicate. A body above ``max_message_bytes`` is refused before it is
  sent (``TooLargeError``), except a dead letter: a body the broker already took.
- A delivery given back (``retry_later``), or left unsettled when its consumer goes away,
  comes back with ``redelivered=True``; once a quorum queue's ``x-delivery-limit`` is passed
  it goes to the queue's dead-letter exchange instead.
- A queue with ``x-single-active-consumer`` delivers to one consumer at a time; the next
  takes over when it goes away.
- Streams are read from an offset (``first``, ``last``, ``next``, an integer) and never
  lose what they hold by being read.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from broker_config.names import DETAIL_HEADER, REASON_HEADER, SOURCE_HEADER, USER_HEADER, Names
from broker_config.topology import Queue, Topology
from shared.codec import MAX_MESSAGE_BYTES, bounded_prefetch
from shared.errors import TooLargeError

__all__ = [
    "Delivery",
    "Handler",
    "Held",
    "QueueInfo",
    "QueuePass",
    "StreamEntry",
    "Transport",
    "dead_letter_headers",
]


@dataclass(frozen=True)
class StreamEntry:
    """One message read from a stream."""

    offset: int
    timestamp: float | None  # when it was published, if the publisher said
    body: bytes
    headers: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class QueueInfo:
    """What a passive look at a queue tells: messages ready (not counting unacked ones) and consumers."""

    name: str
    messages: int
    consumers: int


def dead_letter_headers(
    headers: Mapping[str, Any], reason: str, detail: str, source: str, user: str | None = None
) -> dict[str, Any]:
    """The headers of a message fedq dead-letters: its own, plus why, where it came from, and the
    broker user that published it (when the broker vouched for one: its ``user_id``)."""
    out = dict(headers)
    out.update({REASON_HEADER: reason, DETAIL_HEADER: detail[:1000], SOURCE_HEADER: source})
    if user:
        out[USER_HEADER] = user
    return out


class Delivery(abc.ABC):
    """One received message and the only place it gets settled (once: later calls do nothing)."""

    def __init__(
        self,
        transport: Transport,
        source: str,
        body: bytes,
        *,
        headers: Mapping[str, Any] | None = None,
        redelivered: bool = False,
        message_id: str | None = None,
        timestamp: float | None = None,
        user_id: str | None = None,
    ) -> None:
        self.transport = transport
        self.source = source
        self.body = body
        self.headers: Mapping[str, Any] = headers or {}
        self.redelivered = redelivered
        self.message_id = message_id
        self.timestamp = timestamp
        self.user_id = user_id
        self.settled = False

    @abc.abstractmethod
    async def _ack(self) -> bool: ...

    @abc.abstractmethod
    async def _requeue(self) -> None: ...

    async def ack(self) -> bool:
        """Ack; ``False`` when the channel it came on is gone (the broker will redeliver it)."""
        if self.settled:
            return True
        self.settled = True
        return await self._ack()

    async def retry_later(self) -> None:
        """Give the message back to its queue (counts toward its delivery limit)."""
        if not self.settled:
            self.settled = True
            await self._requeue()

    async def dead_letter(self, reason: str, detail: str = "") -> None:
        """Publish the raw message to the dead-letter exchange with its reason, then ack it."""
        if self.settled:
            return
        headers = dead_letter_headers(self.headers, reason, detail, self.source, self.user_id)
        await self.transport.publish(self.transport.names.dead_exchange, "", self.body, headers=headers)
        await self.ack()


Handler = Callable[[Delivery], Awaitable[None]]
ReconnectCallback = Callable[[], None]


@dataclass
class Held:
    """A message taken off a queue by a ``QueuePass``, not yet settled."""

    body: bytes
    headers: Mapping[str, Any]
    timestamp: float | None
    redelivered: bool
    message_id: str | None
    properties: Mapping[str, Any] = field(default_factory=dict)  # the rest, for an exact copy
    token: Any = None  # the implementation's handle on the message


class QueuePass(abc.ABC):
    """One ordered pass over a queue (``fedq dlq``): take every message, then settle each.

    Closing the pass gives back whatever is still held (the broker may reorder those)."""

    @abc.abstractmethod
    async def take(self) -> Held | None:
        """Hold the queue's next message; ``None`` when it is empty (this also waits until the
        acks sent before it are applied)."""

    @abc.abstractmethod
    async def copy_back(self, held: Held) -> BaseException | None:
        """Publish an exact copy of ``held`` to the tail of the queue and wait for its confirm;
        the error, if the broker refused or the link failed."""

    @abc.abstractmethod
    async def ack(self, held: Held) -> BaseException | None:
        """Remove ``held`` from the queue; the error, if that failed."""


class Transport(abc.ABC):
    """A connection to the broker under one namespace, named for the process that holds it."""

    names: Names
    publish_retry_seconds: float
    bytes_published: int
    # the largest body published or accepted (``Settings.max_message_bytes``, set by ``transport_for``)
    max_message_bytes: int = MAX_MESSAGE_BYTES

    def check_publish_size(self, exchange: str, body: bytes) -> None:
        """``TooLargeError`` for a body above the cap, before anything is sent. A dead letter is
        exempt: it is a body this broker already took, kept whole with its reason (``too_large``)."""
        if exchange != self.names.dead_exchange and len(body) > self.max_message_bytes:
            raise TooLargeError(
                f"refusing to publish {len(body)} bytes to {exchange!r}: above the cap of {self.max_message_bytes} "
                "bytes (--max-message-bytes)"
            )

    def prefetch(self, wanted: int, need: int = 1) -> int:
        """``wanted`` bounded so that the unacked deliveries a consumer holds stay under the byte
        budget (``shared.codec.bounded_prefetch``), never below ``need``."""
        return bounded_prefetch(wanted, self.max_message_bytes, need=need)

    @abc.abstractmethod
    async def connect(self) -> Transport:
        """Open the connection (``BrokerError`` with a clear message when the broker is unreachable)."""

    @abc.abstractmethod
    async def declare(self, topo: Topology) -> None:
        """Declare every exchange, queue and binding of ``topo``; idempotent."""

    @abc.abstractmethod
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
        """Publish persistently and wait for the broker's confirm (see the module docstring)."""

    @abc.abstractmethod
    async def consume(
        self, queue: str, handler: Handler, prefetch: int, arguments: Mapping[str, Any] | None = None
    ) -> None:
        """Consume an existing queue; ``handler`` must settle each delivery. The consumer comes
        back by itself after a reconnect."""

    @abc.abstractmethod
    async def subscribe(
        self, exchange: str, routing_keys: tuple[str, ...], handler: Handler, queue: Queue | None = None
    ) -> None:
        """Bind a queue to ``exchange`` and consume it: a private one that lives as long as this
        connection (live events only), or the given durable ``queue`` (events wait for us)."""

    @abc.abstractmethod
    def read_stream(self, stream: str, offset: Any = "first", idle: float = 1.5) -> AsyncIterator[StreamEntry]:
        """Entries of ``stream`` from ``offset``, until it has been quiet for ``idle`` seconds."""

    @abc.abstractmethod
    async def queue_info(self, queue: str) -> QueueInfo | None:
        """A passive look at ``queue``; ``None`` when it does not exist."""

    @abc.abstractmethod
    async def exchange_exists(self, exchange: str) -> bool:
        """Whether ``exchange`` is declared on the broker."""

    @abc.abstractmethod
    async def purge(self, queue: str) -> int:
        """Drop every ready message of ``queue``; how many went."""

    @abc.abstractmethod
    def queue_pass(self, queue: str) -> AbstractAsyncContextManager[QueuePass]:
        """An ordered pass over ``queue`` (see ``QueuePass``); ``BrokerError`` if it does not exist."""

    @abc.abstractmethod
    def on_reconnect(self, callback: ReconnectCallback) -> Callable[[], None]:
        """Call ``callback`` after every reconnection; returns what removes it."""

    @abc.abstractmethod
    async def close(self, grace: float = 5.0) -> None:
        """Cancel handlers still running, then close. Deliveries not settled go back to their queue."""

    async def read_all(self, stream: str, offset: Any = "first", idle: float = 1.5, limit: int = 0) -> list[StreamEntry]:
        """``read_stream`` into a list (at most ``limit`` entries when given)."""
        out: list[StreamEntry] = []
        async for entry in self.read_stream(stream, offset, idle):
            out.append(entry)
            if limit and len(out) >= limit:
                break
        return out
