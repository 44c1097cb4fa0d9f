"""Open the transport that settings name: one place, for services and tools alike."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlencode, urlsplit, urlunsplit

from broker_config.names import Names
from shared.amqp_urls import each_url, rotated, split_urls
from shared.codec import check_message_cap
from shared.errors import ConfigError
from shared.settings import Settings
from shared.tls import client_tls, uses_tls
from shared.transport import Transport
from shared.transport.rabbitmq import RabbitMQ


def transport_for(
    settings: Settings, connection_name: str, *, publish_retry_seconds: float = 300.0
) -> Transport:
    """An unconnected transport to the broker of ``settings``, named for the process holding it.

    TLS flags are checked here (a missing CA file is a ``ConfigError`` before any connection);
    the password of ``--amqp-password-file`` or ``FEDQ_AMQP_PASSWORD`` is read when it connects."""
    tls = client_tls(settings)
    password = broker_password(settings)
    check_message_cap(settings.max_message_bytes, settings.inline_limit)
    transport = RabbitMQ(
        rotated(broker_url(settings), settings.amqp_first),
        Names(settings.namespace, settings.job),
        connection_name,
        heartbeat=settings.amqp_heartbeat,
        publish_retry_seconds=publish_retry_seconds,
        tls=tls,
        password=None if password is None else functools.partial(read_password, settings),
    )
    transport.max_message_bytes = settings.max_message_bytes
    return transport


def broker_url(settings: Settings) -> str:
    """``--amqp-url`` as the transport dials it (no password added here), each URL of the list: with
    a client certificate and no user named, an ``amqps://`` URL logs in by certificate (``auth=external``)."""

    def one(url: str) -> str:
        parts = urlsplit(url)
        if uses_tls(url) and settings.amqp_cert and not parts.username and "auth=" not in parts.query:
            query = parts.query + ("&" if parts.query else "") + urlencode({"auth": "external"})
            url = urlunsplit(parts._replace(query=query))
        return url

    return each_url(settings.amqp_url, one)


def broker_password(settings: Settings) -> str | None:
    """Where the broker password comes from, if not from the URL: a file or the environment (never
    both, and not beside a password in the URL). ``None``: the URL holds the login as it is."""
    sources = [
        name
        for name, given in (
            ("--amqp-password-file", settings.amqp_password_file),
            ("FEDQ_AMQP_PASSWORD", settings.amqp_password),
        )
        if given
    ]
    if not sources:
        return None
    if len(sources) > 1:
        raise ConfigError(
            "give the broker password once: --amqp-password-file or FEDQ_AMQP_PASSWORD, not both"
        )
    for url in split_urls(settings.amqp_url):
        parts = urlsplit(url)
        if parts.password is not None:
            raise ConfigError(
                f"--amqp-url holds a password and {sources[0]} gives one too: name only the user in the URL "
                f"({parts.scheme}://USER@{parts.hostname}...)"
            )
        if not parts.username:
            raise ConfigError(f"{sources[0]} gives a password, but --amqp-url names no user: amqp://USER@HOST/")
    return sources[0]


def read_password(settings: Settings) -> str:
    """The broker password from ``--amqp-password-file`` (its text, surrounding whitespace and the
    final newline left out), else ``FEDQ_AMQP_PASSWORD``."""
    if not settings.amqp_password_file:
        return settings.amqp_password
    path = Path(settings.amqp_password_file)
    try:
        password = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read --amqp-password-file {path}: {exc}") from exc
    if not password:
        raise ConfigError(f"--amqp-password-file {path} is empty")
    return password


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
