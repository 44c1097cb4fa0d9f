"""Helpers for the tests that run whole jobs with ``fedq run`` and read the run folder it leaves."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from broker_config.names import Names
from shared.keys import load_or_create_signer, public_key_path
from tests.support.broker import delete_namespace


def fedq(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedq.cli", *args]


def start_run(
    out: Path,
    names: Names,
    *args: str,
    amqp_url: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[str]:
    """``fedq run`` in the background, output piped; ``env`` is added to this process's environment."""
    broker = ("--amqp-url", amqp_url) if amqp_url else ()
    return subprocess.Popen(
        fedq("run", *broker, "--namespace", names.namespace, "--out", str(out), "--no-progress", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {}), "FEDQ_LOG_LEVEL": "info"},
    )


def worker_env(names: Names, out: Path) -> dict[str, str]:
    """The environment of a worker started beside a run (``out``), outside ``fedq run``: its
    namespace, and its job as the run's config.json names it."""
    job = json.loads((out / "config.json").read_text())["settings"]["job"]
    return {
        **os.environ,
        "FEDQ_NAMESPACE": names.namespace,
        "FEDQ_JOB": job,
        "FEDQ_KEYS_DIR": str(out / "keys"),
        "FEDQ_STORE": str(out / "store"),
        "FEDQ_LOG_JSON": "true",
        "OMP_NUM_THREADS": "1",
    }


def enrol(keys: Path, name: str) -> Path:
    """A key ``keys/NAME.key`` whose public half is trusted by the run (``keys/trusted/NAME.pub``)."""
    key = keys / f"{name}.key"
    load_or_create_signer(key)
    (keys / "trusted" / f"{name}.pub").write_bytes(public_key_path(key).read_bytes())
    return key


def finish(proc: subprocess.Popen[str], timeout: float = 240, check: bool = True) -> str:
    """The run's output once it ends. ``check``: it must end within ``timeout`` with exit code 0;
    otherwise the caller reads ``proc.returncode`` (a run that outlives ``timeout`` is killed)."""
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        if check:
            raise AssertionError(f"fedq run did not finish in {timeout}s:\n{output[-3000:]}") from None
        return f"fedq run did not finish in {timeout}s\n{output}"
    if check:
        assert proc.returncode == 0, output[-3000:]
    return output


def records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a file; none when it does not exist (yet)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def log_records(path: Path) -> list[dict[str, Any]]:
    """Every line of a process log as a record; a line that is not a JSON object is ``{"event": "raw"}``."""
    out = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            rec = json.loads(line)
        except ValueError:
            rec = {"event": "raw", "line": line}
        out.append(rec if isinstance(rec, dict) else {"event": "raw", "line": line})
    return out


def log_events(path: Path, event: str) -> list[dict[str, Any]]:
    return [rec for rec in log_records(path) if rec.get("event") == event]


def wait_for(predicate: Any, timeout: float, what: str, proc: subprocess.Popen[str] | None = None) -> None:
    """Until ``predicate()`` holds; fails at once if ``proc`` (the run) exits meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"fedq run exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def problems_in_logs(out: Path) -> str:
    """Errors, tracebacks and broker warnings from every process log, for the failure message."""
    lines = []
    for log in sorted((out / "logs").glob("*.log")):
        for rec in log_records(log):
            level = str(rec.get("level", ""))
            text = json.dumps(rec)[:600]
            if level in ("error", "critical") or "Traceback" in text or rec.get("event") == "raw":
                lines.append(f"{log.name}: {text}")
    return "\n".join(lines[-60:]) or "(no errors in the process logs)"


def manifests(out: Path) -> dict[int, dict[str, Any]]:
    found: dict[int, dict[str, Any]] = {}
    for path in (out / "store").rglob("v*.json"):
        m = json.loads(path.read_text())
        found[int(m["version"])] = m
    return found


def check_exact_accounting(out: Path) -> Counter[str]:
    """Every applied task id once in the ledger and once across the version manifests; the version
    chain is 0..N with each parent the version before."""
    ledger = records(out / "ledger.jsonl")
    applied = Counter(r["task_id"] for r in ledger if r["fate"] == "applied")
    assert applied, "nothing was applied"
    twice = [t for t, n in applied.items() if n > 1]
    assert not twice, f"task ids applied more than once in the ledger: {twice}"
    versions = manifests(out)
    assert sorted(versions) == list(range(len(versions))), f"version numbers have gaps: {sorted(versions)}"
    for v, m in versions.items():
        assert m["parent"] == v - 1, f"version {v} has parent {m['parent']}"
    in_manifests = Counter(t for m in versions.values() for t in m["update_ids"])
    twice = [t for t, n in in_manifests.items() if n > 1]
    assert not twice, f"task ids in more than one version: {twice}"
    assert in_manifests == applied, (
        f"ledger and manifests disagree: only in ledger {set(applied) - set(in_manifests)}, "
        f"only in manifests {set(in_manifests) - set(applied)}"
    )
    for r in ledger:
        if r["fate"] == "applied":
            assert r["task_id"] in versions[r["version"]]["update_ids"], r
    rejected_applied = {r["task_id"] for r in ledger if r["fate"] == "rejected"} & set(applied)
    rejected_reasons = {r["reason"] for r in ledger if r["fate"] == "rejected" and r["task_id"] in applied}
    # A rejected copy of an applied task may only be a recognised duplicate.
    assert rejected_reasons <= {"duplicate"}, (rejected_applied, rejected_reasons)
    return applied


@pytest.fixture
def cleanup(amqp_url: str, names: Names, tmp_path: Path) -> Iterator[None]:
    """Delete the test's namespace on the shared broker afterwards, with the queues of every job
    that a run under ``tmp_path`` started."""
    yield
    jobs = tuple(json.loads(p.read_text())["settings"]["job"] for p in tmp_path.rglob("config.json"))
    asyncio.run(delete_namespace(amqp_url, names, ("cpu",), jobs))
