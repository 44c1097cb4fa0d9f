"""``--amqp-url`` as a list: the nodes of a RabbitMQ cluster, tried in turn.

The setting stays one string (``FEDQ_AMQP_URL`` and every reader of it are unchanged), a comma list
of URLs: ``amqp://u@node1:5672/,amqp://u@node2:5672/``. A comma splits the list only where a URL
begins after it (``scheme://``), so a password that holds a comma stays whole. Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from shared.errors import ConfigError

# a comma (and any spaces around it) followed by the next URL's scheme
_SEPARATOR = re.compile(r"\s*,\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def split_urls(text: str) -> list[str]:
    """The URLs of a comma list (one URL is a list of one), in order; an empty one is refused."""
    urls = [u.strip() for u in _SEPARATOR.split(text.strip().strip(","))]
    if not all(urls):
        raise ConfigError(f"--amqp-url names no broker: {text!r}")
    return urls


def join_urls(urls: Iterable[str]) -> str:
    """Several URLs as one ``--amqp-url`` value."""
    return ",".join(urls)


def each_url(text: str, change: Callable[[str], str]) -> str:
    """The list ``text`` with ``change`` applied to each of its URLs."""
    return join_urls(change(u) for u in split_urls(text))


def rotated(text: str, first: int) -> str:
    """The list ``text`` starting at its ``first``-th URL (counted modulo its length), the ones before
    it moved to the end: ``fedq run`` gives its i-th worker ``rotated(url, i)``, spreading the workers
    over the nodes while each keeps all of them to fail over to."""
    urls = split_urls(text)
    k = first % len(urls)
    return join_urls(urls[k:] + urls[:k])
