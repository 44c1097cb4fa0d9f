"""Read a RabbitMQ stream (the update log, the model history) from an offset, without disturbing
the live job: a consumer of its own, acking only its own stream deliveries."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika

from shared.errors import BrokerError, ConfigError

_RELATIVE = re.compile(r"^\d+[smhDMY]$")


@dataclass(frozen=True)
class StreamEntry:
    offset: int
    timestamp: float | None  # when it was published, if the publisher said
    body: bytes


def parse_offset(text: str) -> Any:
    """``first``, ``last``, ``next``, an integer offset, an ISO time, or a relative age like ``30m``."""
    text = text.strip()
    if text in ("first", "last", "next"):
        return text
    if text.isdigit():
        return int(text)
    if _RELATIVE.match(text):
        return text  # the broker understands intervals (s, m, h, D, M, Y) itself
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"bad offset {text!r}: use first, last, next, a number, an ISO time or an age like 30m"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


async def read_stream(
    amqp_url: str,
    stream: str,
    offset: Any = "first",
    idle: float = 1.5,
    limit: int = 0,
    connection_name: str = "fedq-reader",
) -> list[StreamEntry]:
    """Every entry from ``offset`` until the stream has been quiet for ``idle`` seconds."""
    try:
        conn = await aio_pika.connect(amqp_url, client_properties={"connection_name": connection_name})
    except Exception as exc:
        raise BrokerError(f"cannot reach RabbitMQ: {exc!r}") from exc
    entries: list[StreamEntry] = []
    done = asyncio.Event()
    try:
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=500)
        try:
            queue = await channel.declare_queue(stream, passive=True)
        except Exception as exc:
            raise BrokerError(f"stream {stream!r} does not exist: {exc}") from None
        last = time.monotonic()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal last
            last = time.monotonic()
            headers = message.headers or {}
            ts = message.timestamp.timestamp() if message.timestamp else None
            entries.append(StreamEntry(int(headers.get("x-stream-offset", -1)), ts, message.body))  # type: ignore[arg-type]
            await message.ack()
            if limit and len(entries) >= limit:
                done.set()

        await queue.consume(on_message, arguments={"x-stream-offset": offset})
        while not done.is_set() and time.monotonic() - last < idle:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.2)
    finally:
        await conn.close()
    return entries[:limit] if limit else entries
