"""Open the transport that settings name: one place, for services and tools alike."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from broker_config.names import Names
from shared.settings import Settings
from shared.transport import Transport
from shared.transport.rabbitmq import RabbitMQ


def transport_for(settings: Settings, connection_name: str, *, publish_retry_seconds: float = 300.0) -> Transport:
    """An unconnected transport to the broker of ``settings``, named for the process holding it."""
    return RabbitMQ(
        settings.amqp_url,
        Names(settings.namespace, settings.job),
        connection_name,
        heartbeat=settings.amqp_heartbeat,
        publish_retry_seconds=publish_retry_seconds,
    )


@asynccontextmanager
async def connected(
    settings: Settings, connection_name: str, *, publish_retry_seconds: float = 300.0
) -> AsyncIterator[Transport]:
    """A connected transport, closed on leaving the block."""
    transport = await transport_for(
        settings, connection_name, publish_retry_seconds=publish_retry_seconds
    ).connect()
    try:
        yield transport
    finally:
        await transport.close()
