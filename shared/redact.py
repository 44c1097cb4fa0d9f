"""Passwords out of what fedq writes and logs: a URL's password (``amqp://user:PASSWORD@host/``, a
management URL's) never reaches config.json, a log line or an error message."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from shared.amqp_urls import each_url, split_urls

MASK = "***"
# scheme://user:password@ anywhere in a text (a log line, an error's repr)
_LOGIN = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*):(?P<password>[^\s@/]*)@")


def redact(url: str) -> str:
    """``url`` for a message (each URL of a list, ``shared.amqp_urls``): its password masked, its
    query (heartbeat, auth) left out."""

    def one(url: str) -> str:
        parts = urlsplit(url)
        if parts.password is not None:
            user, _, host = parts.netloc.rpartition("@")
            parts = parts._replace(netloc=f"{user.partition(':')[0]}:{MASK}@{host}")
        return urlunsplit(parts._replace(query=""))

    return each_url(url, one)


def without_password(url: str) -> str:
    """``url`` as it may be written down (each URL of a list): the password left out, all else kept
    (the user too, so a password file or ``FEDQ_AMQP_PASSWORD`` completes it again)."""

    def one(url: str) -> str:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user, _, host = parts.netloc.rpartition("@")
        return urlunsplit(parts._replace(netloc=f"{user.partition(':')[0]}@{host}"))

    return each_url(url, one)


def redact_text(text: str) -> str:
    """Every ``scheme://user:password@`` in ``text`` with its password masked."""
    return _LOGIN.sub(rf"\g<head>:{MASK}@", text) if "://" in text else text


def public(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` fit for a file: every URL among them without its password."""
    return {k: without_password(v) if isinstance(v, str) and "://" in v else v for k, v in values.items()}


def same_broker(written: str, given: str) -> bool:
    """Whether ``given`` names the broker (scheme, host, port and vhost) of ``written`` (a URL written
    down without its password), or for lists a node of it: then ``given``'s login is the one to use
    there, whoever it names (an auditor reads a run with the observer's account, not the run's)."""

    def nodes(urls: str) -> set[tuple[str, str | None, int | None, str]]:
        return {(p.scheme, p.hostname, p.port, p.path.strip("/")) for p in map(urlsplit, split_urls(urls))}

    return bool(nodes(written) & nodes(given))
