"""Time to accuracy with stragglers: asynchronous FedBuff against synchronous FedAvg rounds.

Runs ``fedq run`` twice as subprocesses, one after the other, on the same machine and
the same delay profile (20 workers: 12 add 0.2 s per task, 5 add 1 s, 3 add 5 s), each in a
namespace of its own, and reads both ``summary.json``. ``speedup_to_085`` is the sync
seconds to 0.85 test accuracy over the async seconds (both measured from the first task);
null if either run did not reach it. Both runs share the machine's load, so the ratio is
the figure to trust, not the seconds.

    .venv/bin/python benchmarks/stragglers.py [--json] [--quick] [--out DIR]
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import uuid
from pathlib import Path
from typing import Any

from _common import (
    Stopwatch,
    delete_namespace,
    emit,
    machine,
    parser,
    read_json,
    read_jsonl,
    run_fedq,
    say,
    table,
)

from broker_config.names import Names
from fedq.run import parse_delay_profile

SPEEDUP_TARGET = 3.0
APP = "fedq.apps.mnist1d:app"
GAP_TARGET_POINTS = 1.0


def calibrate(workers: int, local_epochs: int) -> dict[str, float]:
    """One task's training on one core, in this process before the runs (CPU seconds: the part of
    the machine's load that is not ours does not count)."""
    import torch

    from shared.app import PartitionSpec, load_app
    from shared.messages import TrainConfig

    torch.set_num_threads(1)
    app = load_app(APP)
    data = app.load_partition(PartitionSpec(0, workers))
    times = []
    for seed in range(4):
        model = app.build_model(0)
        with Stopwatch() as sw:
            app.train(model, data, TrainConfig(epochs=local_epochs), seed)
        times.append((sw.wall, sw.cpu))
    warm = times[1:]
    return {
        "first_cpu_s": times[0][1],  # the first task also pays autograd's and the optimizer's start-up
        "wall_s": min(t[0] for t in warm),
        "cpu_s": min(t[1] for t in warm),
    }


def train_seconds(run_dir: Path) -> list[float]:
    """Each task's training time in the run, from the workers' ``update_sent`` events."""
    out = []
    for log in sorted((run_dir / "logs").glob("w*.log")):
        for rec in read_jsonl(log):
            if rec.get("event") == "update_sent" and isinstance(rec.get("seconds"), int | float):
                out.append(float(rec["seconds"]))
    return out


def run_mode(mode: str, out_root: Path, args: Any) -> dict[str, Any]:
    names = Names(f"bench-{uuid.uuid4().hex[:8]}-{mode}")
    out = out_root / mode
    cmd = [
        "run",
        "--mode",
        mode,
        "--workers",
        str(args.workers),
        "--delay-profile",
        args.delay_profile,
        "--local-epochs",
        str(args.local_epochs),
        "--target-accuracy",
        str(args.target),
        "--max-seconds",
        str(args.max_seconds),
        "--no-progress",
        "--namespace",
        names.namespace,
        "--out",
        str(out),
    ]
    say(f"{mode}: fedq {' '.join(cmd)}")
    code, cpu = run_fedq(cmd, out_root / f"{mode}.log", args.max_seconds + 300, out)
    summary = read_json(out / "summary.json") if (out / "summary.json").exists() else {}
    asyncio.run(delete_namespace(names, job_ids=(summary.get("job_id") or out.name,)))
    if code != 0 or not summary:
        say(f"{mode}: fedq run exited with {code}; see {out_root / f'{mode}.log'}")
    to_acc = summary.get("seconds_to_accuracy", {})
    trained = train_seconds(out)
    return {
        "mode": mode,
        "exit_code": code,
        "seconds_to_080": to_acc.get("0.80"),
        "seconds_to_085": to_acc.get("0.85"),
        "final_accuracy": summary.get("final_accuracy"),
        "best_accuracy": summary.get("best_accuracy"),
        "versions": summary.get("versions"),
        "updates_applied": summary.get("updates_applied"),
        "updates_rejected": summary.get("updates_rejected"),
        "tasks_issued": summary.get("tasks_issued"),
        "mean_staleness": summary.get("mean_staleness"),
        "wall_seconds": summary.get("wall_seconds"),
        "stop_reason": summary.get("stop_reason"),
        "audit_ok": (summary.get("audit") or {}).get("ok"),
        "train_s_per_task_median": statistics.median(trained) if trained else None,
        "train_s_first_tasks_median": statistics.median(trained[: len(trained) // 10 + 1])
        if trained
        else None,
        "cpu": cpu,
        "fedq_cores": cpu["ours_cores"],
        "machine_busy_cores": cpu["machine_busy_cores"],
        "run_dir": str(out),
    }


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--workers", type=int, default=0, help="default 20 (quick 10)")
    p.add_argument("--delay-profile", default="", help="default 0.2*12,1.0*5,5.0*3 (quick 0.2*6,1.0*2,5.0*2)")
    p.add_argument("--local-epochs", type=int, default=5)
    p.add_argument("--target", type=float, default=0.85, help="stop at this test accuracy (default 0.85)")
    p.add_argument("--max-seconds", type=float, default=0, help="per run (default 600, quick 300)")
    p.add_argument("--out", default="", help="where the two run folders go (default: a new temp dir)")
    args = p.parse_args()
    args.workers = args.workers or (10 if args.quick else 20)
    args.delay_profile = args.delay_profile or ("0.2*6,1.0*2,5.0*2" if args.quick else "0.2*12,1.0*5,5.0*3")
    args.max_seconds = args.max_seconds or (300 if args.quick else 600)
    out_root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fedq-bench-stragglers-"))
    out_root.mkdir(parents=True, exist_ok=True)

    cal = calibrate(args.workers, args.local_epochs)
    delays = parse_delay_profile(args.delay_profile, args.workers)
    cores = os.cpu_count() or 1
    round_cpu = args.workers * cal["cpu_s"] / cores  # a sync round's training, spread over every core
    say(
        f"one task trains in {cal['cpu_s']:.2f} CPU-s ({cal['first_cpu_s']:.2f} the first time) on one core; a round of "
        f"{args.workers} tasks needs >= {round_cpu:.1f} s of this machine's {cores} cores, the slowest "
        f"straggler adds {max(delays):.1f} s"
    )
    runs = [run_mode(mode, out_root, args) for mode in ("async", "sync")]
    a, s = runs
    speedup = (
        s["seconds_to_085"] / a["seconds_to_085"] if a["seconds_to_085"] and s["seconds_to_085"] else None
    )
    speedup_080 = (
        s["seconds_to_080"] / a["seconds_to_080"] if a["seconds_to_080"] and s["seconds_to_080"] else None
    )
    gap = (
        (s["final_accuracy"] - a["final_accuracy"]) * 100
        if a["final_accuracy"] is not None and s["final_accuracy"] is not None
        else None
    )
    say(
        f"\nstragglers: {args.workers} workers, delay profile {args.delay_profile}, {args.local_epochs} local epochs"
    )
    fields = [
        "seconds_to_080",
        "seconds_to_085",
        "final_accuracy",
        "versions",
        "updates_applied",
        "mean_staleness",
        "wall_seconds",
        "stop_reason",
        "audit_ok",
        "train_s_per_task_median",
        "fedq_cores",
        "machine_busy_cores",
    ]
    say(table(["", *fields], [[r["mode"], *(r[f] for f in fields)] for r in runs]))
    say(f"speedup to 0.80: {speedup_080}; to 0.85: {speedup} (target >= {SPEEDUP_TARGET})")
    say(f"async final accuracy below sync by {gap} points (target <= {GAP_TARGET_POINTS})")
    for r in runs:
        slow = (r["train_s_per_task_median"] or 0.0) / max(cal["cpu_s"], 1e-9)
        r["train_slowdown_vs_alone"] = slow
        c = r["cpu"]
        r["cpu_bound"] = c["machine_busy_share"] > 0.9
        state = "CPU-bound" if r["cpu_bound"] else f"{1 - c['machine_busy_share']:.0%} of the CPU idle"
        say(
            f"{r['mode']}: {state}; a task trained in {r['train_s_per_task_median']} s (median) vs "
            f"{cal['cpu_s']:.2f} s alone ({slow:.0f}x); machine {c['machine_busy_share']:.0%} busy: fedq "
            f"{c['ours_cores']:.2f} cores, broker {c['broker_cores'] or 0:.2f}, everything else "
            f"{c['others_cores']:.2f}"
        )
    if a.get("cpu_bound"):
        say(
            "async was CPU-bound: its 20 simulated workers share this machine's cores, so its update rate "
            "is capped by the machine, not by its workers. With a processor per worker, as FedBuff's "
            "3x assumes, it would run faster while sync still waits for its slowest worker each round: "
            "the speedup measured here is most likely a lower bound."
        )
    say(f"run folders: {out_root}")
    emit(
        {
            "benchmark": "stragglers",
            "speedup_to_085": speedup,
            "speedup_to_080": speedup_080,
            "accuracy_gap_points": gap,
            "target_speedup": SPEEDUP_TARGET,
            "target_gap_points": GAP_TARGET_POINTS,
            "target_met": bool(speedup and speedup >= SPEEDUP_TARGET and gap is not None and gap <= 1.0),
            "workers": args.workers,
            "delay_profile": args.delay_profile,
            "local_epochs": args.local_epochs,
            "task_cpu_s_alone": cal["cpu_s"],
            "task_wall_s_alone": cal["wall_s"],
            "round_compute_s_min": round_cpu,
            "max_delay_s": max(delays),
            "compute_bound": round_cpu > max(delays),
            "async": a,
            "sync": s,
            "out": str(out_root),
            "machine": machine(),
        },
        args.json,
    )


if __name__ == "__main__":
    main()
