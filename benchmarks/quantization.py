"""What int8 costs in accuracy and saves in bytes: the same async run with ``--quant int8`` and ``none``.

Runs ``fedq run`` (10 workers, the default MNIST-1D task, ``--target-accuracy 0`` and a fixed
``--max-updates`` budget, so both runs fold the same number of updates) once per scheme,
alternating int8 / none for each repeat, each in a namespace of its own. Reports the final
test accuracy of each and ``accuracy_diff_points`` = (none - int8) x 100 over the mean of the
repeats (positive: int8 is worse), and ``bytes_ratio`` = bytes up per update with int8 over
bytes up per update without quantization (whole signed messages, from the ledger).

Async runs are not deterministic (arrival order differs), so a single pair also measures
run-to-run noise: ``--repeats`` gives a spread to judge the difference against.

    .venv/bin/python benchmarks/quantization.py [--json] [--quick] [--repeats R]
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import uuid
from pathlib import Path
from typing import Any

from _common import delete_namespace, emit, machine, parser, read_json, read_jsonl, run_fedq, say, table

from broker_config.names import Names

TARGET_POINTS = 0.5
TAIL = 5  # versions averaged for a steadier figure than the last one alone


def run_once(quant: str, rep: int, out_root: Path, args: Any) -> dict[str, Any]:
    names = Names(f"bench-{uuid.uuid4().hex[:8]}-{quant}")
    out = out_root / f"{quant}-{rep}"
    cmd = [
        "run",
        "--workers",
        str(args.workers),
        "--quant",
        quant,
        "--target-accuracy",
        "0",
        "--max-updates",
        str(args.max_updates),
        "--max-seconds",
        str(args.max_seconds),
        "--no-progress",
        "--namespace",
        names.namespace,
        "--out",
        str(out),
    ]
    say(f"{quant} #{rep}: fedq {' '.join(cmd)}")
    code, cpu = run_fedq(cmd, out_root / f"{quant}-{rep}.log", args.max_seconds + 300, out)
    summary = read_json(out / "summary.json") if (out / "summary.json").exists() else {}
    asyncio.run(delete_namespace(names, job_ids=(summary.get("job_id") or out.name,)))
    ledger = read_jsonl(out / "ledger.jsonl")
    curve = [m["accuracy"] for m in read_jsonl(out / "metrics.jsonl") if "accuracy" in m]
    tail = curve[-TAIL:]
    sized = [int(r.get("bytes", 0)) for r in ledger if r.get("bytes")]
    return {
        "quant": quant,
        "repeat": rep,
        "exit_code": code,
        "final_accuracy": summary.get("final_accuracy"),
        "best_accuracy": summary.get("best_accuracy"),
        "tail_accuracy": statistics.mean(tail) if tail else None,
        "versions": summary.get("versions"),
        "updates_applied": summary.get("updates_applied"),
        "bytes_up": summary.get("bytes_up"),
        "bytes_per_update": statistics.mean(sized) if sized else None,
        "wall_seconds": summary.get("wall_seconds"),
        "stop_reason": summary.get("stop_reason"),
        "fedq_cores": cpu["ours_cores"],
        "machine_busy_cores": cpu["machine_busy_cores"],
        "run_dir": str(out),
    }


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--workers", type=int, default=10)
    p.add_argument("--max-updates", type=int, default=0, help="updates per run (default 300, quick 150)")
    p.add_argument("--max-seconds", type=float, default=600)
    p.add_argument("--repeats", type=int, default=0, help="pairs of runs (default 2, quick 1)")
    p.add_argument("--out", default="", help="where the run folders go (default: a new temp dir)")
    args = p.parse_args()
    args.max_updates = args.max_updates or (150 if args.quick else 300)
    repeats = args.repeats or (1 if args.quick else 2)
    out_root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fedq-bench-quant-"))
    out_root.mkdir(parents=True, exist_ok=True)

    runs = [run_once(q, rep, out_root, args) for rep in range(repeats) for q in ("int8", "none")]
    by = {
        q: [r for r in runs if r["quant"] == q and r["final_accuracy"] is not None] for q in ("int8", "none")
    }
    acc = {q: statistics.mean(r["final_accuracy"] for r in rs) if rs else None for q, rs in by.items()}
    spread = {
        q: (max(r["final_accuracy"] for r in rs) - min(r["final_accuracy"] for r in rs)) * 100 if rs else None
        for q, rs in by.items()
    }
    per_update = {
        q: statistics.mean(r["bytes_per_update"] for r in rs if r["bytes_per_update"]) if rs else None
        for q, rs in by.items()
    }
    diff = (acc["none"] - acc["int8"]) * 100 if acc["none"] is not None and acc["int8"] is not None else None
    tail_acc = {
        q: statistics.mean(r["tail_accuracy"] for r in rs if r["tail_accuracy"]) if rs else None
        for q, rs in by.items()
    }
    tail_diff = (
        (tail_acc["none"] - tail_acc["int8"]) * 100
        if tail_acc["none"] is not None and tail_acc["int8"] is not None
        else None
    )
    ratio = per_update["int8"] / per_update["none"] if per_update["int8"] and per_update["none"] else None

    fields = [
        "final_accuracy",
        "tail_accuracy",
        "best_accuracy",
        "versions",
        "updates_applied",
        "bytes_per_update",
        "wall_seconds",
        "fedq_cores",
    ]
    say(f"\nquantization: {args.workers} workers, {args.max_updates} updates per run, {repeats} pair(s)")
    say(table(["quant", "#", *fields], [[r["quant"], r["repeat"], *(r[f] for f in fields)] for r in runs]))
    say(
        f"mean final accuracy int8 {acc['int8']}, none {acc['none']}; none - int8 = {diff} points "
        f"(target <= {TARGET_POINTS}); spread between repeats int8 {spread['int8']}, none {spread['none']} points"
    )
    say(f"mean of the last {TAIL} versions: none - int8 = {tail_diff} points")
    say(f"bytes per update int8 / none = {ratio}")
    say(f"run folders: {out_root}")
    emit(
        {
            "benchmark": "quantization",
            "accuracy_diff_points": diff,
            "bytes_ratio": ratio,
            "target_points": TARGET_POINTS,
            "target_met": diff is not None and diff <= TARGET_POINTS,
            "accuracy_diff_points_last5": tail_diff,
            "mean_final_accuracy": acc,
            "mean_last5_accuracy": tail_acc,
            "spread_points": spread,
            "bytes_per_update": per_update,
            "workers": args.workers,
            "max_updates": args.max_updates,
            "repeats": repeats,
            "runs": runs,
            "out": str(out_root),
            "machine": machine(),
        },
        args.json,
    )


if __name__ == "__main__":
    main()
