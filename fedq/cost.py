"""``fedq cost``: what a job cost, per worker, per organisation or per version, from its run folder.

The pure part turns records into rows: the ledger's update records (``ledger.jsonl``), the
workers' task counts and orgs (``coordinator.json``) and the versions' stored sizes (their
manifests). Reading the folder and printing the table are thin layers on top.

Where each figure comes from:

- CPU and wall seconds of training, bytes down (the task message and any model fetched apart
  from it) and the org: the worker's own word, carried in its update and kept in its ledger
  record, counted for applied updates only (a rejected message's claims are its sender's word). A
  worker can claim any org, so an org is what the worker says, not what fedq checked.
- Tasks done (each task of an applied update, once), bytes up, updates applied and rejected,
  samples (of applied updates): the aggregator's ledger.
- Tasks expired and redelivered: the workers' own counts in their hellos, as the coordinator last
  heard them (``coordinator.json``): up to one heartbeat behind when the job ended.
- Store bytes: each version's model (its manifest's ``size``) plus its server optimizer state.

One update message counts once however often it was delivered or recorded (records with the same
``digest``: a resend after a lost confirm, a redelivery after a restart, a pending record then the
same message applied): one fate, an applied record winning (``shared.ledger.one_per_message``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

from coordinator.registry import TASK_COUNT_MAX
from shared.errors import ConfigError
from shared.ledger import COST_CAPS, one_per_message, read_ledgers
from shared.org import received_org
from shared.reasons import Fate
from shared.store import SERVER_STATE

GB = 1e9  # prices are per decimal gigabyte, as cloud bills count them
NO_ORG = "-"  # the org column of a worker that claims none
UNKNOWN_WORKER = "-"  # rejected messages whose sender could not be read
STORE_ROW = "(store)"  # the versions' storage, a row of its own when costs are by worker or org
TOTAL_ROW = "total"


class By(StrEnum):
    WORKER = "worker"
    ORG = "org"
    VERSION = "version"


class PriceError(ConfigError):
    """A price file fedq cannot use; the message names the file and the key."""


@dataclass(frozen=True)
class Prices:
    """Prices from a TOML file: every key optional, unknown keys refused."""

    cpu_hour: float = 0.0  # per hour of training CPU
    gb_transferred: float = 0.0  # per GB up or down
    gb_month_stored: float = 0.0  # per GB of stored versions for a month
    months_stored: float = 1.0  # how many months the versions are kept, for the storage cost
    currency: str = "USD"

    def of(self, usage: Usage) -> float:
        return (
            usage.cpu_seconds / 3600 * self.cpu_hour
            + (usage.bytes_up + usage.bytes_down) / GB * self.gb_transferred
            + usage.store_bytes / GB * self.gb_month_stored * self.months_stored
        )


def parse_prices(text: str, source: str = "the price file") -> Prices:
    """``Prices`` from TOML text; ``PriceError`` naming ``source`` and the key that is wrong."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PriceError(f"{source} is not TOML: {exc}") from None
    known = {f.name for f in fields(Prices)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PriceError(f"{source}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key == "currency":
            if not isinstance(value, str) or not value.strip() or not value.isprintable() or len(value) > 8:
                raise PriceError(f"{source}: 'currency' must be a short name such as \"EUR\", not {value!r}")
            values[key] = value.strip()
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise PriceError(f"{source}: {key!r} must be a number of 0 or more, not {value!r}")
        values[key] = float(value)
    return Prices(**values)


def load_prices(path: Path) -> Prices:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PriceError(f"cannot read the price file {path}: {exc}") from None
    return parse_prices(text, str(path))


@dataclass
class Usage:
    """What one worker, org or version used; every figure adds up."""

    tasks_done: int = 0
    tasks_expired: int = 0
    tasks_redelivered: int = 0
    updates_applied: int = 0
    updates_rejected: int = 0
    samples: int = 0
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    store_bytes: int = 0

    def add(self, other: Usage) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cpu_seconds"] = round(self.cpu_seconds, 6)
        d["wall_seconds"] = round(self.wall_seconds, 6)
        return d


@dataclass(frozen=True)
class StoredVersion:
    version: int
    model_bytes: int
    state_bytes: int = 0  # the server optimizer's state (FedOpt's moments) beside the model


@dataclass(frozen=True)
class Records:
    """A run folder's records that costs come from."""

    ledger: tuple[dict[str, Any], ...]
    task_counts: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # coordinator.json workers
    orgs: Mapping[str, str] = field(default_factory=dict)  # coordinator.json orgs: from the hellos
    versions: tuple[StoredVersion, ...] = ()
    versions_known: bool = True  # False: the store could not be read (store bytes unknown)


@dataclass(frozen=True)
class Row:
    key: str  # the worker id, the org, "v<N>", STORE_ROW or TOTAL_ROW
    org: str  # by worker: the worker's org; else ""
    usage: Usage
    cost: float | None = None  # in the price file's currency; None without prices


# -- from records to usage (pure) --------------------------------------------------------------


def _number(record: Mapping[str, Any], key: str) -> float:
    """A figure of a ledger record: 0 unless a finite number of 0 or more; a claim at most its cap."""
    value = record.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return 0.0
    return min(float(value), COST_CAPS.get(key, math.inf))


def _count(counts: Mapping[str, Any], key: str) -> int:
    """A task count of a worker's hellos (coordinator.json): an int from 0 to ``TASK_COUNT_MAX``, else 0."""
    value = counts.get(key, 0) if isinstance(counts, Mapping) else 0
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return min(max(value, 0), TASK_COUNT_MAX)


def _update_usage(ledger: Iterable[Mapping[str, Any]]) -> dict[tuple[str, int | None], Usage]:
    """Usage from the ledger per (worker id, version applied in: None when not applied), one record
    per message (``one_per_message``). What a worker claims (its task, CPU and wall seconds, bytes
    down) counts only for an applied update: a rejected message's claims are its sender's word."""
    out: dict[tuple[str, int | None], Usage] = {}
    done: set[str] = set()
    for r in one_per_message(ledger):
        fate = r["fate"]
        applied = fate == Fate.APPLIED
        key = (str(r.get("worker_id") or UNKNOWN_WORKER), int(r["version"]) if applied else None)
        u = out.setdefault(key, Usage())
        u.updates_rejected += fate == Fate.REJECTED
        u.bytes_up += int(_number(r, "bytes"))
        if not applied:
            continue
        u.updates_applied += 1
        u.samples += int(_number(r, "num_samples"))
        task = str(r.get("task_id") or "")
        if task and task not in done:  # a task is done once
            done.add(task)
            u.tasks_done += 1
        u.bytes_down += int(_number(r, "bytes_down"))
        u.cpu_seconds += _number(r, "cpu_seconds")
        u.wall_seconds += _number(r, "wall_seconds")
    return out


def worker_orgs(records: Records) -> dict[str, str]:
    """Each worker's org as it last claimed it: in its applied updates, else in its hellos (an org
    that fails ``check_org`` is none)."""
    claimed = {str(w): received_org(o) for w, o in records.orgs.items()}
    orgs = {w: o for w, o in claimed.items() if o}
    for r in records.ledger:
        if r.get("fate") == Fate.APPLIED and r.get("worker_id") and (org := received_org(r.get("org"))):
            orgs[str(r["worker_id"])] = org
    return orgs


def by_worker(records: Records) -> dict[str, Usage]:
    """Usage per worker id (``UNKNOWN_WORKER``: rejected messages whose sender could not be read)."""
    out: dict[str, Usage] = {}
    for (worker, _), u in _update_usage(records.ledger).items():
        out.setdefault(worker, Usage()).add(u)
    for worker, counts in records.task_counts.items():
        u = out.setdefault(worker, Usage())
        u.tasks_expired += _count(counts, "expired")
        u.tasks_redelivered += _count(counts, "redelivered")
    return dict(sorted(out.items()))


def by_version(records: Records) -> dict[int | None, Usage]:
    """Usage per version: the updates applied in it and its stored bytes. ``None``: what belongs
    to no version: updates rejected (or pending when the job stopped) and the tasks the workers
    let expire or had redelivered, so that the versions add up to ``totals``."""
    out: dict[int | None, Usage] = {
        v.version: Usage(store_bytes=v.model_bytes + v.state_bytes) for v in records.versions
    }
    for (_, version), u in _update_usage(records.ledger).items():
        out.setdefault(version, Usage()).add(u)
    tasks = Usage()
    for counts in records.task_counts.values():
        tasks.tasks_expired += _count(counts, "expired")
        tasks.tasks_redelivered += _count(counts, "redelivered")
    if tasks != Usage():
        out.setdefault(None, Usage()).add(tasks)
    return dict(sorted(out.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)))


def store_bytes(records: Records) -> int:
    return sum(v.model_bytes + v.state_bytes for v in records.versions)


def totals(records: Records) -> Usage:
    """Everything the job used: the workers' usage and the store's bytes."""
    total = Usage(store_bytes=store_bytes(records))
    for u in by_worker(records).values():
        total.add(u)
    return total


def rows(records: Records, by: By = By.WORKER, prices: Prices | None = None) -> list[Row]:
    """The table: a row per worker, org or version, then a total row. By worker or org, the
    versions' storage is a row of its own (``STORE_ROW``), so the rows add up to the total."""
    table: list[tuple[str, str, Usage]] = []
    if by is By.VERSION:
        for version, u in by_version(records).items():
            table.append(("-" if version is None else f"v{version}", "", u))
    else:
        orgs = worker_orgs(records)
        per_worker = by_worker(records)
        if by is By.WORKER:
            table = [(w, orgs.get(w, NO_ORG), u) for w, u in per_worker.items()]
        else:
            grouped: dict[str, Usage] = {}
            for w, u in per_worker.items():
                grouped.setdefault(orgs.get(w, NO_ORG), Usage()).add(u)
            table = [(o, "", u) for o, u in sorted(grouped.items())]
        table.append((STORE_ROW, "", Usage(store_bytes=store_bytes(records))))
    total = Usage()
    for _, _, u in table:
        total.add(u)
    table.append((TOTAL_ROW, "", total))
    return [Row(key, org, u, None if prices is None else prices.of(u)) for key, org, u in table]


def summary_totals(records: Records) -> dict[str, Any]:
    """``summary.json``'s ``cost``: the job's totals, by the rules of ``fedq cost``."""
    total = totals(records).to_dict()
    total["versions_stored"] = len(records.versions) if records.versions_known else None
    if not records.versions_known:
        total["store_bytes"] = None
    total["orgs"] = sorted(set(worker_orgs(records).values()))
    return total


# -- the run folder (thin I/O) -----------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def stored_versions(store_dir: Path, job: str) -> tuple[StoredVersion, ...]:
    """Each version's stored bytes, from the manifests of a local store (read as they are: a cost
    table vouches for nothing)."""
    found = []
    for path in sorted((store_dir / "jobs" / job / "models").glob("v*.json")):
        m = _read_json(path)
        if not isinstance(m.get("version"), int):
            continue
        state = (m.get("policy") or {}).get(SERVER_STATE) or {}
        found.append(StoredVersion(m["version"], int(m.get("size", 0)), int(state.get("size", 0))))
    return tuple(found)


def read_run(run_dir: Path, coordinator_state: Mapping[str, Any] | None = None) -> Records:
    """The records of a run folder (``coordinator_state``: coordinator.json as already read)."""
    if not (run_dir / "ledger.jsonl").exists() and not (run_dir / "config.json").exists():
        raise ConfigError(f"{run_dir} is not a fedq run folder (no ledger.jsonl, no config.json)")
    state = coordinator_state if coordinator_state is not None else _read_json(run_dir / "coordinator.json")
    settings = _read_json(run_dir / "config.json").get("settings", {})
    store, job = str(settings.get("store", "")), str(settings.get("job", ""))
    local = store and "://" not in store.removeprefix("file://")
    store_dir = Path(store.removeprefix("file://")) if local else run_dir / "store"
    known = bool(job) and store_dir.is_dir()
    return Records(
        ledger=tuple(read_ledgers(run_dir)),
        task_counts=state.get("workers") or {},
        orgs=state.get("orgs") or {},
        versions=stored_versions(store_dir, job) if known else (),
        versions_known=known,
    )


# -- printing ----------------------------------------------------------------------------------

COLUMNS = (
    ("tasks_done", "tasks"),
    ("tasks_expired", "expired"),
    ("tasks_redelivered", "redeliv"),
    ("updates_applied", "applied"),
    ("updates_rejected", "rejected"),
    ("samples", "samples"),
    ("cpu_seconds", "cpu_s"),
    ("wall_seconds", "wall_s"),
    ("bytes_up", "up"),
    ("bytes_down", "down"),
    ("store_bytes", "stored"),
)


def _shown(text: str) -> str:
    """A label as the terminal may show it: a claimed org is the worker's text, not ours."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _csv_label(text: str) -> str:
    """A label as a CSV cell a spreadsheet will not run: one that starts like a formula (= + - @,
    a tab or a carriage return) gets a leading quote; our own "-" (no org, no sender) stays."""
    return "'" + text if text != "-" and text.startswith(("=", "+", "-", "@", "\t", "\r")) else text


def _size(n: int) -> str:
    for unit, step in (("GB", GB), ("MB", 1e6), ("kB", 1e3)):
        if n >= step:
            return f"{n / step:.1f} {unit}"
    return f"{n} B"


def render(table: list[Row], by: By, prices: Prices | None = None, csv_out: bool = False) -> str:
    """The table as text (sizes readable), or as CSV (exact numbers)."""
    head = [by.value] + (["org"] if by is By.WORKER else []) + [c for c, _ in COLUMNS]
    if prices is not None:
        head.append(f"cost_{prices.currency}")
    lines: list[list[str]] = []
    for row in table:
        u = row.usage.to_dict()
        names = [_shown(row.key)] + ([_shown(row.org)] if by is By.WORKER else [])
        cells = [_csv_label(t) for t in names] if csv_out else names
        for name, _ in COLUMNS:
            value = u[name]
            if csv_out:
                cells.append(str(value))
            elif name.startswith(("bytes", "store")):
                cells.append(_size(int(value)))
            elif isinstance(value, float):
                cells.append(f"{value:.2f}")
            else:
                cells.append(str(value))
        if row.cost is not None:
            cells.append(f"{row.cost:.6f}" if csv_out else f"{row.cost:.4f}")
        lines.append(cells)
    if csv_out:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(head)
        writer.writerows(lines)
        return buf.getvalue().rstrip("\n")
    titles = [by.value] + (["org"] if by is By.WORKER else []) + [t for _, t in COLUMNS]
    if prices is not None:
        titles.append(prices.currency)
    widths = [max(len(t), *(len(r[i]) for r in lines)) for i, t in enumerate(titles)]
    labels = 2 if by is By.WORKER else 1  # left-aligned; the figures are right-aligned

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < labels else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    out = [fmt(titles)] + [fmt(r) for r in lines]
    out.insert(len(out) - 1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def run(run_dir: Path, by: By = By.WORKER, prices_file: Path | None = None, csv_out: bool = False) -> str:
    """``fedq cost RUN``: the table of a run folder."""
    prices = load_prices(prices_file) if prices_file is not None else None
    records = read_run(run_dir)
    text = render(rows(records, by, prices), by, prices, csv_out)
    if not records.versions_known and not csv_out:
        text += "\nstore bytes unknown: the run's store is not a local folder this can read"
    return text
