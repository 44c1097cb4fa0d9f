"""Versions evaluated on the app's held-out test set, off the event loop, into ``metrics.jsonl``.

The coordinator evaluates because it owns the stop condition and the test data; the
aggregator stays a lean, data-free fold. Every version is evaluated, in order, even when
evaluation falls behind: the first version to reach the target is the one the job stops on, and
its time (``t``) is when the coordinator received it, on the coordinator's own clock (the one
``t0``, the job's first task, was read from), not the aggregator's.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared.app import App
from shared.ledger import JsonLines, read_lines
from shared.messages import ModelAnnouncement
from shared.tensors import FlatModel

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class Pending:
    """A version waiting for its evaluation, and when the coordinator received it (its clock)."""

    ann: ModelAnnouncement
    received_at: float


class Evaluator:
    """Queue versions with ``submit``; ``next`` gives the oldest queued (every version is
    evaluated, in order); ``evaluate`` records one."""

    def __init__(self, app: App, model_seed: int, out_dir: Path, log: Any) -> None:
        self.app = app
        self.model_seed = model_seed
        self.log = log
        path = out_dir / METRICS_FILE
        self.recorded: set[int] = {m.get("version", -1) for m in read_lines(path)}  # before a restart too
        self.evaluated_version = max(self.recorded, default=-1)
        self.metrics = JsonLines(path)
        self._queue: asyncio.Queue[Pending] = asyncio.Queue()
        self._taken: Pending | None = None  # the version being evaluated
        self._queued: set[int] = set()  # versions ever queued: each is evaluated once

    def submit(self, ann: ModelAnnouncement, received_at: float | None = None) -> None:
        """Queue ``ann`` (received now, unless ``received_at`` says when), unless its version was
        queued or evaluated already (an announcement and a look in the store may both bring it)."""
        if ann.version in self._queued or ann.version in self.recorded:
            return
        self._queued.add(ann.version)
        self._queue.put_nowait(Pending(ann, time.time() if received_at is None else received_at))

    async def next(self) -> Pending:
        self._taken = await self._queue.get()
        return self._taken

    def unfinished(self) -> list[Pending]:
        """Versions received and not evaluated, in order: the one taken when the job stopped (its
        evaluation cut off), then those still queued."""
        out = [self._taken] if self._taken is not None and self._taken.ann.version not in self.recorded else []
        while not self._queue.empty():
            out.append(self._queue.get_nowait())
        return out

    async def evaluate(self, pending: Pending, blob: bytes, *, t0: float | None, started: float) -> float:
        """Evaluate ``blob`` (version ``pending.ann.version``) in a thread and append its record; its accuracy."""
        ann = pending.ann
        result = await asyncio.to_thread(self._evaluate, blob)
        acc = float(result.get("accuracy", 0.0))
        self.metrics.write(
            {
                "version": ann.version,
                "parent": ann.parent,
                **result,
                "updates_total": ann.updates_total,
                "updates_in_version": len(ann.update_ids),
                "mean_staleness": ann.mean_staleness,
                **({} if ann.dp_epsilon is None else {"dp_epsilon": ann.dp_epsilon}),
                "created_at": ann.created_at,  # the aggregator's clock
                "received_at": pending.received_at,  # the coordinator's, as t0
                "t": (pending.received_at - t0) if t0 is not None and ann.version > 0 else 0.0,
                "wall": time.time() - started,
            }
        )
        self.recorded.add(ann.version)
        self.evaluated_version = ann.version
        self.log.info("evaluated", version=ann.version, accuracy=round(acc, 4))
        return acc

    def _evaluate(self, blob: bytes) -> dict[str, float]:
        torch.set_num_threads(1)
        model = self.app.build_model(self.model_seed)
        model.load_state_dict(FlatModel.from_bytes(blob).to_state_dict())
        return {k: float(v) for k, v in self.app.evaluate(model).items()}
