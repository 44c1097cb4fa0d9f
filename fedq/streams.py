"""Stream offsets as users write them (``--from``): the reading itself is the transport's
``read_stream``, which never disturbs the live job."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from shared.errors import ConfigError

_RELATIVE = re.compile(r"^\d+[smhDMY]$")


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
