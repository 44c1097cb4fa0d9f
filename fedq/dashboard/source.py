"""Reading a run folder into ``RunRecords`` (thin I/O): its JSON files, and each listed pid's liveness."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fedq import cost
from fedq.dashboard.data import Process, Queues, RunRecords
from shared.errors import ConfigError
from shared.ledger import read_ledgers, read_lines

FINISHED = Queues("not looked at: the run has finished (no process of it is alive)")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def processes(run_dir: Path) -> tuple[Process, ...]:
    listed = read_json(run_dir / "processes.json")
    out = []
    for name, entry in listed.items():
        if isinstance(entry, int):  # an older processes.json: name -> pid
            entry = {"pid": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("pid"), int):
            continue
        out.append(Process(name, entry["pid"], pid_alive(entry["pid"]), int(entry.get("metrics_port") or 0)))
    return tuple(out)


def check_run_dir(run_dir: Path) -> None:
    if not (run_dir / "config.json").exists() and not (run_dir / "ledger.jsonl").exists():
        raise ConfigError(f"{run_dir} is not a fedq run folder (no config.json, no ledger.jsonl)")


def read_records(run_dir: Path, queues: Queues | None = None) -> RunRecords:
    """Everything the dashboard shows of ``run_dir`` as it is now; ``queues``: the broker's side,
    when something looked (a live job)."""
    check_run_dir(run_dir)
    settings = read_json(run_dir / "config.json").get("settings", {})
    state = read_json(run_dir / "coordinator.json")
    procs = processes(run_dir)
    live = any(p.alive for p in procs)
    ledger_path = run_dir / "ledger.jsonl"
    try:
        ledger_mtime: float | None = ledger_path.stat().st_mtime
    except OSError:
        ledger_mtime = None
    ledger = tuple(read_ledgers(run_dir))
    try:
        costs: cost.Records | None = cost.read_run(run_dir, state)
    except ConfigError:
        costs = None
    return RunRecords(
        run=str(run_dir),
        job=str(settings.get("job") or state.get("job_id") or ""),
        metrics=tuple(read_lines(run_dir / "metrics.jsonl")),
        ledger=ledger,
        coordinator=state,
        processes=procs,
        summary=read_json(run_dir / "summary.json"),
        cost=costs,
        queues=(
            queues if live and queues is not None else FINISHED if not live else Queues("no broker look yet")
        ),
        ledger_mtime=ledger_mtime,
        live=live,
    )
