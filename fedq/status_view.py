"""``fedq status RUN_OR_JOB``: read a job's folder and the broker, build the snapshot (fedq/status.py,
pure) and show it: a live rich view refreshed every ``--interval`` seconds, or with ``--once`` one
snapshot (``--json``: as one JSON object, for scripts).

The broker is only looked at: a passive declare per queue (depth and consumers), nothing consumed.
A broker that cannot be reached leaves the queues' figures empty; the files still tell the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from broker_config.names import Names
from coordinator.state import FILE_NAME as STATE_FILE
from fedq.status import QueueReading, snapshot
from shared.errors import FedqError
from shared.settings import Settings, split_capabilities
from shared.store import ModelStore, open_store
from shared.transport import Transport
from shared.transport.connect import transport_for

CONNECTION_NAME = "fedq-status"
CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Request:
    once: bool = False
    as_json: bool = False
    interval: float = 2.0


class Tail:
    """The records of a JSON-lines file that another process appends to, read on from where the last
    read stopped (a torn last line waits for its end)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.records: list[dict[str, Any]] = []

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return self.records
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            for line in fh:
                if not line.endswith(b"\n"):
                    break
                self.offset += len(line)
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict):
                        self.records.append(record)
        return self.records


def capabilities(settings: Settings) -> tuple[str, ...]:
    """The job's capabilities: as its run folder's config.json says (fedq run), else as settings do."""
    config = settings.out_dir / "config.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(config.read_text())["settings"]["capabilities"]
        return split_capabilities(str(saved))
    return settings.capability_list


class Reader:
    """Everything one snapshot needs, read again at each refresh (files incrementally)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.names = Names(settings.namespace, settings.job)
        self.capabilities = capabilities(settings)
        self.metrics = Tail(settings.out_dir / "metrics.jsonl")
        self.ledger = Tail(settings.out_dir / "ledger.jsonl")
        self.transport: Transport | None = None
        self.broker_error: str | None = None

    async def close(self) -> None:
        if self.transport is not None:
            with contextlib.suppress(Exception):
                await self.transport.close()
            self.transport = None

    async def queues(self) -> list[QueueReading]:
        """Each task queue, then the updates queue; figures ``None`` when the broker cannot say."""
        wanted: list[tuple[str, str | None]] = [(self.names.task_queue(c), c) for c in self.capabilities]
        wanted.append((self.names.updates_queue, None))
        try:
            if self.transport is None:
                transport = transport_for(self.settings, CONNECTION_NAME)
                self.transport = await asyncio.wait_for(transport.connect(), CONNECT_TIMEOUT)
            readings, refused = [], []
            for name, cap in wanted:
                try:
                    info = await self.transport.queue_info(name)
                except FedqError:
                    raise
                except Exception as exc:  # e.g. a broker user not allowed to look at this queue
                    refused.append(f"{name}: {exc}")
                    info = None
                readings.append(
                    QueueReading(name, cap, info.messages if info else None, info.consumers if info else None)
                )
            self.broker_error = "; ".join(refused) or None
            return readings
        except (FedqError, OSError, TimeoutError) as exc:
            self.broker_error = str(exc) or type(exc).__name__
            await self.close()  # connect afresh next time
            return [QueueReading(name, cap, None, None) for name, cap in wanted]

    async def stored_version(self) -> int | None:
        """The newest version in the store (a listing, no manifest read); ``None`` when it cannot say."""
        if self.settings.store == "none":
            return None
        try:
            store = ModelStore(open_store(self.settings.store, self.settings), self.settings.job)
            return max(await store.versions(), default=None)
        except (FedqError, OSError):
            return None

    def coordinator(self) -> dict[str, Any] | None:
        try:
            data = json.loads((self.settings.out_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return None  # not written yet, or a coordinator elsewhere
        return data if isinstance(data, dict) else None

    async def snapshot(self) -> dict[str, Any]:
        queues = await self.queues()
        found = snapshot(
            self.settings.job,
            time.time(),
            self.coordinator(),
            self.metrics.read(),
            self.ledger.read(),
            queues,
            await self.stored_version(),
        )
        found["broker_error"] = self.broker_error
        return found


# -- rendering ------------------------------------------------------------------------------------


def _n(value: Any) -> str:
    return "-" if value is None else str(value)


def render(snap: dict[str, Any]) -> Group:
    """The snapshot as rich tables: the job line, queues, workers, updates and rejections."""
    v, u, w, t = snap["version"], snap["updates"], snap["workers"], snap["tasks"]
    acc = "-" if v["accuracy"] is None else f"{v['accuracy']:.4f}"
    best = "-" if v["best_accuracy"] is None else f"{v['best_accuracy']:.4f}"
    state = snap["state"] + (f" ({snap['stop_reason']})" if snap["stop_reason"] else "")
    head = Text.assemble(
        ("job ", "dim"), (snap["job"], "bold"), ("  state ", "dim"), state,
        ("  version ", "dim"), _n(v["latest"]), ("  accuracy ", "dim"), acc,
        (f" (v{_n(v['evaluated'])}, best {best})", "dim"),
        ("  tasks issued ", "dim"), _n(t["issued"]), ("  in flight ", "dim"), _n(t["in_flight"]),
    )  # fmt: skip
    queues = Table(title="queues", title_justify="left")
    for column in ("queue", "capability", "ready", "consumers"):
        queues.add_column(column, justify="right" if column in ("ready", "consumers") else "left")
    for q in snap["queues"]:
        queues.add_row(q["name"], q["capability"] or "(updates)", _n(q["messages"]), _n(q["consumers"]))
    workers = Table(title=f"workers: {len(w['live'])} live, {len(w['gone'])} gone", title_justify="left")
    for column in ("worker", "", "received", "completed", "expired", "redelivered"):
        workers.add_column(column, justify="left" if column in ("worker", "") else "right")
    for wid in sorted({*w["live"], *w["gone"]}):
        c = w["tasks"].get(wid, {})
        workers.add_row(
            wid, "live" if wid in w["live"] else Text("gone", "yellow"),
            *(_n(c.get(k)) for k in ("received", "completed", "expired", "redelivered")),
        )  # fmt: skip
    updates = Text.assemble(
        ("updates ", "dim"), f"{u['applied']} applied", ", ", f"{u['rejected']} rejected", ", ",
        f"{u['pending']} pending", ("  rate ", "dim"), f"{u['per_second']:.2f}/s",
        (f" (last {u['window']:.0f} s)", "dim"),
    )  # fmt: skip
    parts: list[Any] = [head, queues, workers, updates]
    if snap["rejections"]:
        rejections = Table(title="rejections", title_justify="left")
        rejections.add_column("reason")
        rejections.add_column("updates", justify="right")
        for reason, count in snap["rejections"].items():
            rejections.add_row(reason, str(count))
        parts.append(rejections)
    if snap.get("broker_error"):
        parts.append(Text(f"broker: {snap['broker_error']}", "red"))
    return Group(*parts)


# -- the command ----------------------------------------------------------------------------------


async def run(settings: Settings, request: Request, console: Console | None = None) -> str | None:
    """``--once``: one snapshot, returned (JSON or a table as text). Otherwise a live view until
    interrupted (it returns nothing)."""
    reader = Reader(settings)
    try:
        if request.once:
            snap = await reader.snapshot()
            if request.as_json:
                return json.dumps(snap, sort_keys=True)
            return _text(lambda c: c.print(render(snap)))
        console = console or Console()
        with Live(render(await reader.snapshot()), console=console, refresh_per_second=4) as live:
            while True:
                await asyncio.sleep(request.interval)
                live.update(render(await reader.snapshot()))
    finally:
        await reader.close()


def _text(draw: Callable[[Console], None]) -> str:
    out = io.StringIO()
    draw(Console(file=out, width=120, color_system=None))
    return out.getvalue().rstrip("\n")
