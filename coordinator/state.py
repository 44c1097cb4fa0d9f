"""``coordinator.json``: the coordinator's state, for a restarted coordinator and for readers.

A restarted coordinator carries over the job's clock (``started``, ``t0``), its counters, the
round number, the accuracies, the workers' task counts and the in-flight tasks not yet expired.
The other keys are reports: ``fedq run``'s progress line and summary, ``fedq audit`` and the
benchmarks read them. The file is replaced atomically, so a reader never sees half of it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.files import write_atomic

FILE_NAME = "coordinator.json"


@dataclass
class InFlight:
    """A task handed out and not yet answered, expired or applied."""

    capability: str
    deadline: float
    version: int  # the task's base version


@dataclass
class CoordinatorState:
    job_id: str
    mode: str = "async"
    started: float = 0.0  # the coordinator's first start (the job's, over restarts); 0: not known
    min_workers: int = 1
    stop_reason: str | None = None
    t0: float | None = None  # the first task: the job's clock starts here
    stopped: float | None = None  # when this was written
    tasks_issued: int = 0
    bytes_down: int = 0
    latest_version: int | None = None
    best_accuracy: float = 0.0
    last_accuracy: float | None = None
    round: int = 0
    fleet_ready: bool = False
    workers_live: int = 0
    workers_seen: list[str] = field(default_factory=list)
    workers: dict[str, dict[str, int]] = field(default_factory=dict)  # task counts per worker
    orgs: dict[str, str] = field(default_factory=dict)  # each worker's --org, as its hellos claim it
    in_flight: dict[str, InFlight] = field(default_factory=dict)

    def resumable(self, job_id: str) -> bool:
        """Left by an interrupted coordinator of this job (a finished job starts afresh)."""
        return self.job_id == job_id and self.stop_reason is None

    def resumed(self, mode: str, min_workers: int, now: float) -> CoordinatorState:
        """What a new coordinator process carries over (see the module docstring)."""
        return CoordinatorState(
            job_id=self.job_id,
            mode=mode,
            started=self.started or now,
            min_workers=min_workers,
            t0=self.t0,
            tasks_issued=self.tasks_issued,
            bytes_down=self.bytes_down,
            best_accuracy=self.best_accuracy,
            last_accuracy=self.last_accuracy,
            round=self.round,
            workers={w: dict(c) for w, c in self.workers.items()},
            orgs=dict(self.orgs),
            in_flight={tid: f for tid, f in self.in_flight.items() if f.deadline > now},
        )

    # -- JSON -----------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CoordinatorState:
        """Missing keys take their defaults (an older or hand-written file); unknown ones are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["in_flight"] = {tid: InFlight(**f) for tid, f in data.get("in_flight", {}).items()}
        return cls(**values)

    def write(self, out_dir: Path) -> None:
        write_atomic(out_dir / FILE_NAME, json.dumps(self.to_json(), indent=2, sort_keys=True).encode())

    @classmethod
    def read(cls, out_dir: Path) -> CoordinatorState | None:
        """The saved state; ``None`` when there is none or it cannot be read."""
        path = out_dir / FILE_NAME
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            return cls.from_json(data)
        except (ValueError, TypeError, KeyError, AttributeError):
            return None
