"""Append-only JSON-lines records (ledger, metrics): one object per line, flushed each write."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shared.messages import Update

# An update's metrics that the ledger keeps, under the ledger's names: what the task cost its worker
# (``worker.training.COST_METRICS``), which ``fedq cost`` sums.
COST_KEYS = {"cpu_seconds": "cpu_seconds", "train_seconds": "wall_seconds", "bytes_down": "bytes_down"}


def claimed_costs(update: Update | None) -> dict[str, Any]:
    """What an update says it cost its worker, for its ledger record: CPU and wall seconds of
    training, bytes taken in, and the worker's ``org``. All are the worker's own word (a worker can
    claim any org); a figure that is not a finite number of 0 or more is left out."""
    if update is None:
        return {}
    record: dict[str, Any] = {}
    for metric, key in COST_KEYS.items():
        value = update.metrics.get(metric)
        if isinstance(value, int | float) and math.isfinite(value) and value >= 0:
            record[key] = value
    if update.org:
        record["org"] = update.org
    return record


class JsonLines:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, sort_keys=True) + "\n")
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
