"""Live progress of a run, read from the coordinator's metrics file: a rich display or plain lines.

Before the job starts (no task yet), the coordinator's state file says how many workers have said
hello of how many it waits for; the display shows that instead.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from shared.settings import Settings


class Progress:
    def __init__(self, run_dir: Path, settings: Settings, live: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.state_path = run_dir / "coordinator.json"
        self.waiting: tuple[int, int] | None = None  # (have, need) while the coordinator waits for workers
        self.job_started = False
        self.settings = settings
        self.offset = 0
        self.records: list[dict[str, Any]] = []
        self.started = time.time()
        self.last_print = 0.0
        self.live = Live(console=Console(), refresh_per_second=4, transient=False) if live else None

    def __enter__(self) -> Progress:
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.live:
            self.live.__exit__(t, e, tb)

    def _read(self) -> None:
        if not self.path.exists():
            return
        with self.path.open() as fh:
            fh.seek(self.offset)
            for line in fh:
                if not line.endswith("\n"):
                    break
                self.offset += len(line.encode())
                try:
                    self.records.append(json.loads(line))
                except ValueError:
                    continue

    def _read_state(self) -> None:
        """Until the first task: is the coordinator waiting for workers, and for how many?"""
        if self.job_started:
            return
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return  # not written yet (or being replaced): keep what we knew
        if state.get("t0") is not None or state.get("fleet_ready"):
            self.job_started, self.waiting = state.get("t0") is not None, None
        elif "workers_live" in state and "min_workers" in state:
            self.waiting = (int(state["workers_live"]), int(state["min_workers"]))

    def stats(self) -> dict[str, Any]:
        elapsed = time.time() - self.started
        if not self.records:
            return {
                "elapsed": elapsed,
                "version": 0,
                "accuracy": None,
                "best": None,
                "ups": 0.0,
                "staleness": None,
            }
        last = self.records[-1]
        window = [r for r in self.records if r.get("wall", 0) >= last.get("wall", 0) - 10]
        ups = 0.0
        if len(window) >= 2:
            du = window[-1]["updates_total"] - window[0]["updates_total"]
            dt = window[-1]["wall"] - window[0]["wall"]
            ups = du / dt if dt > 0 else 0.0
        return {
            "elapsed": elapsed,
            "version": last["version"],
            "accuracy": last.get("accuracy"),
            "best": max(r.get("accuracy", 0.0) for r in self.records),
            "ups": ups,
            "staleness": last.get("mean_staleness"),
            "updates": last.get("updates_total", 0),
        }

    def update(self) -> None:
        self._read()
        self._read_state()
        s = self.stats()
        waiting = f"waiting for workers {self.waiting[0]}/{self.waiting[1]}" if self.waiting else ""
        if self.live:
            table = Table(
                title=f"fedq {self.settings.mode} - job {self.settings.job}",
                caption=waiting or None,
                expand=False,
            )
            for col in ("elapsed", "version", "test acc", "best", "target", "updates/s", "staleness"):
                table.add_column(col, justify="right")
            table.add_row(
                f"{s['elapsed']:.0f}s",
                str(s["version"]),
                _pct(s["accuracy"]),
                _pct(s["best"]),
                _pct(self.settings.target_accuracy),
                f"{s['ups']:.1f}",
                "-" if s["staleness"] is None else f"{s['staleness']:.2f}",
            )
            self.live.update(table)
        elif time.time() - self.last_print >= 5.0:
            self.last_print = time.time()
            if waiting:
                print(f"fedq: t={s['elapsed']:.0f}s {waiting}", flush=True)
                return
            print(
                f"fedq: t={s['elapsed']:.0f}s version={s['version']} acc={_pct(s['accuracy'])} "
                f"best={_pct(s['best'])} updates/s={s['ups']:.1f} staleness="
                f"{'-' if s['staleness'] is None else format(s['staleness'], '.2f')}",
                flush=True,
            )


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"
