"""Helpers for the tests that run whole jobs with ``fedq run`` and read the run folder it leaves."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog

from broker_config.names import Names
from fedq import keys as fedq_keys
from fedq.cli import main
from shared.keys import load_or_create_signer
from shared.signing import Role
from tests.support.broker import delete_namespace

ROOT = Path(__file__).resolve().parents[2]  # the repository: services started by a test import tests.support
# The tiny linear app (tests/support/tiny.py) for jobs whose point is not learning MNIST-1D: a task
# trains in milliseconds, so such a job's pace is set by ``--delay-profile`` (seconds a worker sleeps
# after each task), not by the load on the machine.
TINY_APP = ("--app", "tests.support.tiny:LinearApp")


def fedq(*args: str) -> list[str]:
    """The command line of ``fedq ARGS`` as a process of its own."""
    return [sys.executable, "-m", "fedq.cli", *args]


@dataclass(frozen=True)
class Ran:
    """What a ``fedq`` command run by ``cli`` returned and printed."""

    returncode: int
    stdout: str
    stderr: str


def cli(*args: str | Path) -> Ran:
    """``fedq ARGS`` run in this process through ``fedq.cli.main``, as the command line would run it
    (same parsing, settings, exit codes and output), without a process of its own: a tool such as
    ``fedq log`` or ``fedq model`` then costs no Python and PyTorch start-up (seconds each on a loaded
    machine). The logging configuration the command sets up is put back afterwards."""
    out, err = io.StringIO(), io.StringIO()
    logging = structlog.get_config()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:  # argparse refused the command line
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        structlog.configure(**logging)
    return Ran(code, out.getvalue(), err.getvalue())


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects a command printed one a line (``--json``), skipping anything else."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def service_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a service a test starts, able to import ``tests.support``
    (the tiny app) from any working directory."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **(extra or {})}


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
        env=service_env({**(env or {}), "FEDQ_LOG_LEVEL": "info"}),
    )


def worker_env(names: Names, out: Path) -> dict[str, str]:
    """The environment of a service started beside a run (``out``), outside ``fedq run``: its
    namespace, and its job and app as the run's config.json names them."""
    settings = json.loads((out / "config.json").read_text())["settings"]
    return service_env(
        {
            "FEDQ_NAMESPACE": names.namespace,
            "FEDQ_JOB": settings["job"],
            "FEDQ_APP": settings["app"],
            "FEDQ_KEYS_DIR": str(out / "keys"),
            "FEDQ_STORE": str(out / "store"),
            "FEDQ_LOG_JSON": "true",
            "OMP_NUM_THREADS": "1",
        }
    )


def enrol(keys: Path, name: str) -> Path:
    """A key ``keys/NAME.key`` whose public half the run trusts, as an operator enrols it:
    ``worker-<id>`` as that worker (``fedq keys enrol``), any other name as an aggregator."""
    key = keys / f"{name}.key"
    signer = load_or_create_signer(key)
    trusted = keys / "trusted"
    if name.startswith("worker-"):
        fedq_keys.enrol(trusted, name.removeprefix("worker-"), signer.public)
    else:
        fedq_keys.trust_role_key(trusted, Role.AGGREGATOR, signer.public)
    return key


def stop_run(proc: subprocess.Popen[str]) -> str:
    """Interrupt a run that is still going, as Ctrl-C would (it stops its processes), or kill it
    if it does not end in time; what it printed since. Nothing to do for a run that has ended (a
    test calls it on the way out, whatever happened)."""
    if proc.returncode is not None:
        return ""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=30)[0] or ""
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[0] or ""


def finish(proc: subprocess.Popen[str], timeout: float = 240, check: bool = True) -> str:
    """The run's output once it ends. ``check``: it must end within ``timeout`` with exit code 0;
    otherwise the caller reads ``proc.returncode`` (a run that outlives ``timeout`` is stopped)."""
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        output = stop_run(proc)
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


def audit(out: Path, *args: str) -> dict[str, Any]:
    """``fedq audit RUN --json ARGS``: the balance, read again from the store, the ledger and the broker."""
    result = cli("audit", out, "--json", *args)
    balance: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.returncode == (0 if balance["ok"] else 1), result.stderr
    return balance


def assert_balanced(out: Path, balance: dict[str, Any] | None = None) -> dict[str, Any]:
    """The audit balances: by default the one ``fedq run`` made once every process had stopped
    (``audit.json``)."""
    if balance is None:
        balance = json.loads((out / "audit.json").read_text())
    assert balance["ok"], balance
    assert balance["applied_twice"] == {} and balance["lost"] == 0 and balance["chain_ok"]
    assert balance["sent"] >= balance["applied"] > 0
    return balance


def stop_workers(workers: list[subprocess.Popen[bytes]], grace: float = 20) -> list[str]:
    """SIGTERM every worker, give them ``grace`` seconds to stop, kill those still running (no
    process outlives the test); the command lines of those that had to be killed."""
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    lingering = []
    for worker in workers:
        try:
            worker.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
            lingering.append(" ".join(map(str, worker.args[2:])))  # type: ignore[index]
    return lingering


def copy_run(src: Path, dst: Path) -> Path:
    """A run folder copied elsewhere, its config pointing at the copy (the job and broker stay): a
    test may change the copy without disturbing other readers of the run."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    for key, value in config["settings"].items():
        if isinstance(value, str) and value.startswith(str(src)):
            config["settings"][key] = str(dst) + value[len(str(src)) :]
    (dst / "config.json").write_text(json.dumps(config))
    return dst


# The finished run that the tools' tests read: the tiny app, two workers, K=3, seven versions (0-6).
FINISHED_RUN = (*TINY_APP, "--workers", "2", "--buffer", "3", "--target-accuracy", "0", "--max-versions", "6")
_finished_run = pytest.StashKey[tuple[Path, Names]]()


def finished_run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, amqp_url: str
) -> tuple[Path, Names]:
    """One finished ``fedq run`` (``FINISHED_RUN``) for the whole session, made when a test first
    needs it; its run folder and namespace. Tests only read it: one that changes a file works on a
    ``copy_run``. The namespace is deleted when the session ends."""
    stash = request.config.stash
    if _finished_run not in stash:
        names = Names(f"t-{uuid.uuid4().hex[:10]}")
        out = tmp_path_factory.mktemp("finished") / "run"
        request.config.add_cleanup(
            lambda: asyncio.run(delete_namespace(amqp_url, names, ("cpu",), (out.name,)))
        )
        finish(start_run(out, names, *FINISHED_RUN))
        stash[_finished_run] = (out, names)
    return stash[_finished_run]


@pytest.fixture
def cleanup(amqp_url: str, names: Names, tmp_path: Path) -> Iterator[None]:
    """Delete the test's namespace on the shared broker afterwards, with the queues of every job
    that a run under ``tmp_path`` started."""
    yield
    jobs = tuple(json.loads(p.read_text())["settings"]["job"] for p in tmp_path.rglob("config.json"))
    asyncio.run(delete_namespace(amqp_url, names, ("cpu",), jobs))
