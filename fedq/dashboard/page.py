"""The dashboard's one HTML page: the template with its CSS and JS inlined (both ship in
``static/``), and for a report the data too, so the page needs nothing from the network."""

from __future__ import annotations

import json
import re
from functools import cache
from importlib import resources
from typing import Any

_SLOT = re.compile(r"/\*FEDQ_(CSS|JS|DATA|POLL_MS)\*/")


@cache
def _static(name: str) -> str:
    return resources.files("fedq.dashboard").joinpath("static", name).read_text(encoding="utf-8")


def inline_json(data: Any) -> str:
    """JSON that cannot end the <script> element it sits in."""
    return (
        json.dumps(data, allow_nan=False)
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
    )


def render(data: Any = None, poll_ms: int = 2000) -> str:
    """The page; ``data`` given, the page draws it and polls nothing (a report), else it polls
    ``api/data`` every ``poll_ms`` (the live dashboard)."""
    slots = {
        "CSS": _static("dashboard.css"),
        "JS": _static("dashboard.js"),
        "DATA": "" if data is None else inline_json(data),
        "POLL_MS": str(int(poll_ms)),
    }
    return _SLOT.sub(lambda m: slots[m.group(1)], _static("dashboard.html"))
