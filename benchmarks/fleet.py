"""Many workers on one machine: a job with 200 simulated workers hosted by a few processes.

Starts a job with ``fedq run --workers 1`` (aggregator, coordinator, one worker), enrols
P x M more worker keys in the run's trusted directory, and starts P processes of
``fedq worker --replicas M`` (each replica has its own identity, key, connection and data
partition I..I+M-1 of P*M). The job runs ``--duration`` seconds (``--max-seconds``); then the
fleet is stopped and the script reports:

- errors: log lines at level error in every process's log (and the top warning events);
- the ``fedq audit`` balance of the run (after everything stopped);
- updates per second and versions per second over the active window;
- publish -> applied latency p50 / p99: each update's ``sent_at`` (read from the update log
  stream, signed by its worker) against the ledger's applied time ``t``;
- broker connections held by the fleet (``rabbitmqctl list_connections name``, mid-run);
- resident memory (VmRSS) of every process, sampled every few seconds: peak and last.

Defaults: 4 x 50 replicas, 1 local epoch (the default tiny CNN; 5 epochs for 200 workers
would keep 2 cores saturated by training alone), 300 s (``--quick``: 60 s).

    .venv/bin/python benchmarks/fleet.py [--json] [--quick] [--processes P] [--replicas M]
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from _common import (
    ROOT,
    CpuAccount,
    delete_namespace,
    emit,
    fedq_cmd,
    machine,
    parser,
    quantiles,
    read_json,
    read_jsonl,
    rss_kib,
    say,
    table,
)

from broker_config.names import Names
from fedq.keys import enrol
from shared.keys import load_or_create_signer


def wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {path}")
        time.sleep(0.2)


def count_connections(tag: str) -> int | None:
    """Broker connections whose client-given name contains ``tag`` (every fleet worker's does).

    On RabbitMQ 3.10 ``list_connections name`` is the peer address; the name a client gives
    (aio-pika's ``connection_name``) is in ``client_properties``."""
    try:
        out = subprocess.run(
            ["rabbitmqctl", "-q", "list_connections", "client_properties"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return sum(1 for line in out.splitlines() if tag in line)


def scan_logs(paths: list[Path]) -> tuple[list[str], Counter[str]]:
    """Error-level lines (verbatim, first few) and a count of warning events."""
    errors: list[str] = []
    warnings: Counter[str] = Counter()
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                if "Traceback" in line or "error" in line.lower():
                    errors.append(f"{path.name}: {line[:300]}")
                continue
            if not isinstance(rec, dict):
                continue
            level = rec.get("level")
            if level in ("error", "critical", "exception"):
                errors.append(f"{path.name}: {line[:300]}")
            elif level == "warning":
                warnings[str(rec.get("event"))] += 1
    return errors, warnings


def latencies(out: Path) -> tuple[list[float], int]:
    """publish -> applied seconds for every applied update (sent_at from the update log stream)."""
    from fedq.audit import settings_for
    from fedq.replay import load_job
    from shared.settings import Settings

    settings = settings_for(str(out), Settings.from_env())
    job = asyncio.run(load_job(settings))
    sent = {u.update.task_id: u.update.sent_at for u in job.updates}
    applied = [r for r in job.ledger if r.get("fate") == "applied"]
    lat = [r["t"] - sent[r["task_id"]] for r in applied if r["task_id"] in sent]
    return lat, len(applied) - len(lat)


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--processes", type=int, default=4, help="worker processes (default 4)")
    p.add_argument("--replicas", type=int, default=50, help="simulated workers per process (default 50)")
    p.add_argument("--duration", type=float, default=0, help="seconds of job (default 300, quick 60)")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--out", default="", help="run folder (default: a new temp dir)")
    args = p.parse_args()
    duration = args.duration or (60 if args.quick else 300)
    tag = uuid.uuid4().hex[:6]
    names = Names(f"bench-{tag}-fleet")
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fedq-bench-fleet-"))
    out = root / f"fleet-{tag}"  # the job id is the folder's name: it carries the tag too
    total = args.processes * args.replicas
    env = {**os.environ, "FEDQ_LOG_LEVEL": "info", "OMP_NUM_THREADS": "1"}
    run_cmd = fedq_cmd(
        "run",
        "--workers",
        "1",
        "--target-accuracy",
        "0",
        "--max-seconds",
        str(duration),
        "--local-epochs",
        str(args.local_epochs),
        "--no-progress",
        "--namespace",
        names.namespace,
        "--out",
        str(out),
    )
    root.mkdir(parents=True, exist_ok=True)
    say(f"fleet: {' '.join(run_cmd[2:])}")
    say(f"  + {args.processes} x fedq worker --replicas {args.replicas} ({total} workers), run folder {out}")
    run_log = (root / "run.log").open("w")
    t_start = time.time()
    run = subprocess.Popen(run_cmd, stdout=run_log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    fleet: list[subprocess.Popen[bytes]] = []
    fleet_logs: list[Path] = []
    samples: dict[str, list[int]] = {}
    connections: list[int | None] = []
    account = CpuAccount()
    names_of: dict[int, str] = {}
    try:
        wait_for(out / "keys" / "coordinator" / "coordinator.pub", 120)  # fedq run has made its keys
        keys = out / "keys"
        for i in range(args.processes):
            for j in range(args.replicas):
                signer = load_or_create_signer(keys / f"worker-fl{tag}p{i}-r{j}.key")
                enrol(keys / "trusted", f"fl{tag}p{i}-r{j}", signer.public)  # as `fedq keys enrol` does
        worker_env = {
            **env,
            "FEDQ_NAMESPACE": names.namespace,
            "FEDQ_JOB": out.name.replace(".", "-"),  # the job id fedq run gives the run: its folder's name
            "FEDQ_KEYS_DIR": str(keys),
            "FEDQ_STORE": str(out / "store"),
            "FEDQ_LOG_JSON": "true",
        }
        for i in range(args.processes):
            log_path = out / "logs" / f"fleet-p{i}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            fleet_logs.append(log_path)
            with log_path.open("w") as fh:
                fleet.append(
                    subprocess.Popen(
                        fedq_cmd(
                            "worker",
                            "--worker-id",
                            f"fl{tag}p{i}",
                            "--replicas",
                            str(args.replicas),
                            "--partition",
                            f"{i * args.replicas}/{total}",
                        ),
                        stdout=fh,
                        stderr=subprocess.STDOUT,
                        cwd=ROOT,
                        env=worker_env,
                    )
                )
        next_conn = time.monotonic() + min(45.0, duration / 2)
        while run.poll() is None:
            pids = {"launcher": run.pid, **{f"fleet-p{i}": f.pid for i, f in enumerate(fleet)}}
            with contextlib.suppress(OSError, ValueError):
                pids.update({n: p["pid"] for n, p in read_json(out / "processes.json").items()})
            account.sample(int(pid) for pid in pids.values())
            names_of.update({int(pid): name for name, pid in pids.items()})
            for name, pid in pids.items():
                kib = rss_kib(int(pid))
                if kib is not None:
                    samples.setdefault(name, []).append(kib)
            if time.monotonic() >= next_conn:
                connections.append(count_connections(f"fl{tag}p"))
                next_conn = time.monotonic() + 60
            time.sleep(3)
    finally:
        for f in fleet:
            if f.poll() is None:
                f.send_signal(signal.SIGTERM)
        for f in fleet:
            try:
                f.wait(30)
            except subprocess.TimeoutExpired:
                f.kill()
                f.wait()
        if run.poll() is None:
            run.send_signal(signal.SIGINT)
            run.wait(60)
        run_log.close()
    wall = time.time() - t_start
    cpu = account.result()
    cpu_by_process = {name: account.used(pid) / cpu["wall_s"] for pid, name in names_of.items()}

    audit_proc = subprocess.run(
        fedq_cmd("audit", str(out), "--json"), capture_output=True, text=True, cwd=ROOT, env=env, check=False
    )
    try:
        balance: dict[str, Any] = json.loads(audit_proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        balance = {"error": audit_proc.stderr[-500:]}
    lat, unmatched = latencies(out)
    summary = read_json(out / "summary.json") if (out / "summary.json").exists() else {}
    state = read_json(out / "coordinator.json") if (out / "coordinator.json").exists() else {}
    ledger = read_jsonl(out / "ledger.jsonl")
    applied_t = sorted(r["t"] for r in ledger if r.get("fate") == "applied")
    active = (state["stopped"] - state["t0"]) if state.get("stopped") and state.get("t0") else None
    applied_by = Counter(r.get("worker_id") for r in ledger if r.get("fate") == "applied")
    fleet_workers_applied = sum(1 for w in applied_by if str(w).startswith(f"fl{tag}p"))
    rejected_by = Counter(str(r.get("reason")) for r in ledger if r.get("fate") == "rejected")
    staleness = [r["staleness"] for r in ledger if r.get("fate") == "applied" and "staleness" in r]
    errors, warnings = scan_logs(sorted((out / "logs").glob("*.log")))
    asyncio.run(delete_namespace(names, job_ids=(summary.get("job_id") or out.name,)))

    q = quantiles(lat)
    versions = summary.get("versions") or 0
    rss = {
        name: {"peak_mib": max(v) / 1024, "last_mib": v[-1] / 1024, "samples": len(v)}
        for name, v in samples.items()
    }
    fleet_rss = [rss[f"fleet-p{i}"]["peak_mib"] for i in range(args.processes) if f"fleet-p{i}" in rss]
    result = {
        "benchmark": "fleet",
        "workers": total + 1,
        "processes": args.processes,
        "replicas": args.replicas,
        "local_epochs": args.local_epochs,
        "duration_s": duration,
        "wall_s": wall,
        "errors": len(errors),
        "error_lines": errors[:10],
        "warning_events": dict(warnings.most_common(10)),
        "audit_ok": balance.get("ok"),
        "audit": {k: v for k, v in balance.items() if k != "per_worker"},
        "updates_applied": len(applied_t),
        "active_s": active,
        "updates_per_s": len(applied_t) / active if active else None,
        "versions": versions,
        "versions_per_s": versions / active if active else None,
        "latency_s": q,
        "rejected_by_reason": dict(rejected_by),
        "staleness_applied": quantiles(staleness),
        "latency_unmatched": unmatched,
        "fleet_workers_with_applied_updates": fleet_workers_applied,
        "fleet_connections": connections,
        "rss": rss,
        "cpu": cpu,
        "cpu_cores_by_process": cpu_by_process,
        "rss_per_fleet_process_peak_mib": max(fleet_rss) if fleet_rss else None,
        "rss_per_replica_mib": (max(fleet_rss) / args.replicas) if fleet_rss else None,
        # what one more replica costs: a fleet process against the launcher's one-worker process
        "rss_marginal_per_replica_mib": (
            (max(fleet_rss) - rss["w00"]["peak_mib"]) / (args.replicas - 1)
            if fleet_rss and "w00" in rss and args.replicas > 1
            else None
        ),
        "stop_reason": summary.get("stop_reason"),
        "final_accuracy": summary.get("final_accuracy"),
        "run_dir": str(out),
        "machine": machine(),
    }
    say(
        f"\nfleet: {total + 1} workers ({args.processes} x {args.replicas} replicas + 1), {duration:.0f} s job"
    )
    say(
        table(
            ["figure", "value"],
            [
                ["errors (log level error)", len(errors)],
                ["audit balanced", balance.get("ok")],
                ["sent / applied / rejected / pending / queued / lost", _balance_text(balance)],
                ["updates applied", len(applied_t)],
                ["updates/s", result["updates_per_s"]],
                ["versions", versions],
                ["versions/s", result["versions_per_s"]],
                ["rejected, by reason", dict(rejected_by)],
                [
                    "staleness of applied updates p50 / max",
                    f"{result['staleness_applied']['p50']} / {result['staleness_applied']['max']}",
                ],
                ["publish->applied p50 s", q["p50"]],
                ["publish->applied p99 s", q["p99"]],
                ["fleet workers with an applied update", f"{fleet_workers_applied} / {total}"],
                ["fleet broker connections (mid-run)", connections],
                ["final accuracy", summary.get("final_accuracy")],
                ["RSS per fleet process, peak MiB", result["rss_per_fleet_process_peak_mib"]],
                ["RSS per extra replica MiB", result["rss_marginal_per_replica_mib"]],
            ],
        )
    )
    say(
        table(
            ["process", "peak RSS MiB", "last RSS MiB", "CPU cores (mean)"],
            [
                [name, v["peak_mib"], v["last_mib"], cpu_by_process.get(name)]
                for name, v in sorted(rss.items())
            ],
        )
    )
    say(
        f"machine {cpu['machine_busy_share']:.0%} busy over the run: fedq {cpu['ours_cores']:.2f} cores, "
        f"broker {cpu['broker_cores']}, everything else {cpu['others_cores']:.2f} (of {cpu['cores']})"
    )
    if warnings:
        say(f"warning events: {dict(warnings.most_common(8))}")
    for line in errors[:5]:
        say(f"ERROR {line}")
    emit(result, args.json)


def _balance_text(b: dict[str, Any]) -> str:
    rejected = b.get("rejected")
    n_rej = sum(rejected.values()) if isinstance(rejected, dict) else rejected
    return f"{b.get('sent')} / {b.get('applied')} / {n_rej} / {b.get('pending')} / {b.get('in_queue')} / {b.get('lost')}"


if __name__ == "__main__":
    main()
