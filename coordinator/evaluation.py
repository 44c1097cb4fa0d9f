"""Versions evaluated on the app's held-out test set, off the event loop, into ``metrics.jsonl``.

The coordinator evaluates because it owns the stop condition and the test data; the
aggregator stays a lean, data-free fold.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import torch

from shared.app import App
from shared.ledger import JsonLines, read_lines
from shared.messages import ModelAnnouncement
from shared.tensors import FlatModel

METRICS_FILE = "metrics.jsonl"


class Evaluator:
    """Queue versions with ``submit``; ``next`` gives the newest queued (skipping those it
    overtook, when evaluation falls behind); ``evaluate`` records one."""

    def __init__(self, app: App, model_seed: int, out_dir: Path, log: Any) -> None:
        self.app = app
        self.model_seed = model_seed
        self.log = log
        path = out_dir / METRICS_FILE
        self.recorded: set[int] = {m.get("version", -1) for m in read_lines(path)}  # before a restart too
        self.evaluated_version = max(self.recorded, default=-1)
        self.metrics = JsonLines(path)
        self._queue: asyncio.Queue[ModelAnnouncement] = asyncio.Queue()

    def submit(self, ann: ModelAnnouncement) -> None:
        self._queue.put_nowait(ann)

    async def next(self) -> ModelAnnouncement:
        ann = await self._queue.get()
        while not self._queue.empty():
            ann = self._queue.get_nowait()
        return ann

    async def evaluate(
        self, ann: ModelAnnouncement, blob: bytes, *, t0: float | None, started: float
    ) -> float:
        """Evaluate ``blob`` (version ``ann.version``) in a thread and append its record; its accuracy."""
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
                "created_at": ann.created_at,
                "t": (ann.created_at - t0) if t0 is not None and ann.version > 0 else 0.0,
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
