"""Append-only JSON-lines records (ledger, metrics): one object per line, flushed each write."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from shared.messages import Update
from shared.org import received_org
from shared.reasons import Fate

# An update's metrics that the ledger keeps, under the ledger's names: what the task cost its worker
# (``worker.training.COST_METRICS``), which ``fedq cost`` sums.
COST_KEYS = {"cpu_seconds": "cpu_seconds", "train_seconds": "wall_seconds", "bytes_down": "bytes_down"}
# The most one update may claim of each (under the ledger's names): a claim beyond is cut down to it,
# so that no sum of claims overflows to infinity.
COST_CAPS = {"cpu_seconds": 1e7, "wall_seconds": 1e7, "bytes_down": 1e12}
UPDATE_FATES = (Fate.APPLIED, Fate.REJECTED, Fate.PENDING, Fate.FOLDED)  # the fates of an update's records
# which record of a message wins
_PRECEDENCE = {Fate.APPLIED: 2, Fate.REJECTED: 1, Fate.PENDING: 0, Fate.FOLDED: 0}


def claimed_costs(update: Update | None) -> dict[str, Any]:
    """What an update says it cost its worker, for its ledger record: CPU and wall seconds of
    training, bytes taken in, and the worker's ``org``. All are the worker's own word (a worker can
    claim any org); a figure that is not a finite number of 0 or more is left out, one above its
    ``COST_CAPS`` cut down to it, an org that fails ``check_org`` left out."""
    if update is None:
        return {}
    record: dict[str, Any] = {}
    for metric, key in COST_KEYS.items():
        value = update.metrics.get(metric)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
            record[key] = min(value, COST_CAPS[key])
    if org := received_org(update.org):
        record["org"] = org
    return record


def one_per_message(ledger: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The ledger's update records, one per message: of the records sharing a ``digest`` (a pending
    record then the same message applied after a restart, a duplicate of an applied message, a parked
    update rejected once per delivery) the applied one wins, else the rejected one, else the first.
    Under edge aggregation the root's applied record takes what only the edge knew (the message's
    size, the worker's claims, the task's capability) from the edge's folded record. Records
    without a digest (an old ledger) are kept as they are; records of no update (a DP noise seed,
    a rollback) are left out. In the order each message was first recorded."""
    out: list[Mapping[str, Any]] = []
    where: dict[str, int] = {}
    for r in ledger:
        fate = r.get("fate")
        if fate not in UPDATE_FATES or r.get("kind"):  # "kind": a record of no update (a root's refused partial)
            continue
        digest = r.get("digest")
        if not isinstance(digest, str) or not digest:
            out.append(r)
            continue
        i = where.get(digest)
        if i is None:
            where[digest] = len(out)
            out.append(r)
            continue
        kept, winner = out[i], r
        if _PRECEDENCE[Fate(fate)] <= _PRECEDENCE[Fate(kept["fate"])]:
            kept, winner = r, kept
        if kept.get("fate") == Fate.FOLDED and winner.get("fate") == Fate.APPLIED:
            winner = {**kept, **winner}
        out[i] = winner
    return out


def read_ledgers(out_dir: Path) -> list[dict[str, Any]]:
    """A job folder's ledgers: the aggregator's (``ledger.jsonl``; the root's under edge
    aggregation), then each edge aggregator's (``ledger-edge-<shard>.jsonl``)."""
    edges = sorted(out_dir.glob("ledger-edge-*.jsonl"))
    return [r for path in (out_dir / "ledger.jsonl", *edges) for r in read_lines(path)]


class JsonLines:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.write_all((record,))

    def write_all(self, records: Iterable[dict[str, Any]]) -> None:
        """Several records, flushed once (a version's updates: one write, not one per update)."""
        self._fh.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_lines(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a JSON-lines file; a torn last line (a crash mid-write) is skipped."""
    if not path.exists():
        return
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            try:
                yield json.loads(line)
            except ValueError:
                continue
