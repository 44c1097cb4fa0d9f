"""Waiting in tests: how long an expectation may take, polling until it holds, and log events."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest

WAIT = 10.0  # seconds any single expectation may take before the test fails
QUIET = 0.5  # seconds of silence that count as "nothing more arrives" on the real broker


async def until(check: Callable[[], Any], what: str, wait: float = WAIT, poll: float = 0.02) -> Any:
    """Poll ``check`` (plain or async) until it returns something truthy, for at most ``wait``
    seconds; returns that value."""
    deadline = time.monotonic() + wait
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(poll)


def events(logs: Sequence[Mapping[str, Any]], name: str, **match: Any) -> list[Mapping[str, Any]]:
    """The captured log events called ``name`` whose fields have the values in ``match``."""
    return [e for e in logs if e.get("event") == name and all(e.get(k) == v for k, v in match.items())]
