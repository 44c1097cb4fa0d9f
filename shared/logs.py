"""structlog configuration: readable in a terminal, JSON lines otherwise; no password in any line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

from shared.redact import redact_text


def configure_logging(level: str = "info", json: bool | None = None) -> None:
    """Configure structlog for a service; ``json=None`` picks JSON unless stderr is a TTY."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_passwords,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def redact_passwords(logger: Any, method: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
    """Mask the password of every URL a log line holds (a value, an error's repr, a traceback)."""
    return {k: redact_text(v) if isinstance(v, str) else v for k, v in event.items()}


def get_logger(**context: Any) -> Any:
    return structlog.get_logger().bind(**context)
