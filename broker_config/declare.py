"""Declare a ``Topology`` on the broker, idempotently, with clear conflict errors."""

from __future__ import annotations

import re

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractConnection

from broker_config.topology import Topology
from shared.errors import TopologyConflictError

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


async def declare(connection: AbstractConnection, topo: Topology) -> None:
    """Declare every exchange, queue and binding; safe to call from every process."""
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
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        text = str(exc.args[0]) if exc.args else str(exc)
        raise TopologyConflictError(conflict_message(text)) from None
    finally:
        if not channel.is_closed:
            await channel.close()
