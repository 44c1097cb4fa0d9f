"""The aggregator's per-update kernel on one core: parameters per second, stage by stage.

One process, no broker, ``torch.set_num_threads(1)``. For each model size, R distinct signed
int8 updates are pre-encoded; then each is put through exactly what the aggregator does:
``shared.codec.decode`` (msgpack, sha256 of the payload, Ed25519 check, typed head),
``aggregator.binding.bind`` (the coordinator's signed task the update carries: a second Ed25519
check, on a small head) and ``aggregator.core.AggregatorCore.offer`` (dequantize into its reused output vector, screen,
weighted accumulate into the buffer; K is huge so no version is folded). That end-to-end time is the headline. A second
pass times each stage on its own so the bottleneck is visible.

Figures are per update; "best" is the fastest of R (least disturbed by the other load on a
shared machine), "median" the typical one; CPU time is this thread's own. Baselines measured
in the same run: an fp32 axpy over the same vector (the accumulate floor) and touching a fresh
fp32 vector of that size (what a new allocation costs in page faults here).

``--what-if`` (on by default) also reruns the kernel in a child process with
``THP_MEM_ALLOC_ENABLE=1``: PyTorch's allocator then asks for 2 MiB pages, so a fresh
40 MB vector costs ~20 page faults instead of ~10,000 (a deployment knob, no code change).

    .venv/bin/python benchmarks/kernel.py [--json] [--quick] [--no-what-if]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any

import torch
from _common import (
    SIZES,
    Stopwatch,
    emit,
    machine,
    parser,
    say,
    signed_updates,
    synthetic_state,
    table,
    trust,
    worker_keys,
)

from aggregator.binding import bind
from aggregator.core import Accepted, AggregatorCore, Rejected
from shared.aggregation import Accumulator, Policy, screen
from shared.codec import decode, decode_head, open_envelope
from shared.messages import Update
from shared.quantize import decode_delta_wire
from shared.signing import Keyring, Signer
from shared.tensors import FlatModel

TARGET = 250e6  # params/s at 10M
JOB = "bench-job"
INCARNATION = "bench-incarnation"


def summarize(walls: list[float], cpus: list[float], n: int) -> dict[str, float]:
    best, med = min(walls), statistics.median(walls)
    return {
        "best_ms": best * 1e3,
        "median_ms": med * 1e3,
        "cpu_ms": statistics.median(cpus) * 1e3,
        "params_per_s_best": n / best,
        "params_per_s_median": n / med,
        "params_per_s_cpu": n / statistics.median(cpus),
    }


def end_to_end(model: FlatModel, raws: list[bytes], keyring: Keyring) -> dict[str, float]:
    """decode + bind + AggregatorCore.offer, exactly the aggregator's path for an inline update."""
    core = AggregatorCore(model, 0, Policy(mode="async", k=10**9, max_staleness=10**6), JOB)
    walls, cpus = [], []
    for raw in raws:
        with Stopwatch() as sw:
            message, _ = decode(raw, keyring, Update)
            bound = bind(message, keyring, JOB, INCARNATION)
            result = bound if isinstance(bound, Rejected) else core.offer(bound[0])
        if not isinstance(result, Accepted):
            raise SystemExit(f"the benchmark's update was rejected: {result}")
        walls.append(sw.wall)
        cpus.append(sw.cpu)
    return summarize(walls, cpus, model.spec.n_float)


def stages(model: FlatModel, raws: list[bytes], keyring: Keyring) -> dict[str, dict[str, float]]:
    """The same work cut into stages, each timed on its own."""
    spec = model.spec
    acc = Accumulator(spec.n_float, spec.n_exact)
    scratch = torch.empty(spec.n_float)  # as AggregatorCore does: one output, reused
    names = ["unpack", "sha256", "ed25519", "head", "bind (task token)", "dequantize", "screen", "accumulate"]
    walls: dict[str, list[float]] = {k: [] for k in names}
    cpus: dict[str, list[float]] = {k: [] for k in names}

    def note(name: str, sw: Stopwatch) -> None:
        walls[name].append(sw.wall)
        cpus[name].append(sw.cpu)

    for raw in raws:
        with Stopwatch() as sw:
            env = open_envelope(raw)
        note("unpack", sw)
        with Stopwatch() as sw:
            signed = env.signed_bytes()  # sha256(payload) + the small msgpack that is signed
        note("sha256", sw)
        with Stopwatch() as sw:
            keyring.verify(env.signer, env.sig, signed)
        note("ed25519", sw)
        with Stopwatch() as sw:
            msg = decode_head(env)
        note("head", sw)
        assert isinstance(msg, Update)
        with Stopwatch() as sw:
            bound = bind(msg, keyring, JOB, INCARNATION)
        note("bind (task token)", sw)
        assert not isinstance(bound, Rejected), bound
        with Stopwatch() as sw:
            floats, exact, _ = decode_delta_wire(msg.delta, spec, msg.quant, msg.block, scratch)
        note("dequantize", sw)
        with Stopwatch() as sw:
            screen(floats, exact, None)
        note("screen", sw)
        with Stopwatch() as sw:
            acc.add(floats, exact, 1000.0, 1000.0)
        note("accumulate", sw)
    return {k: summarize(walls[k], cpus[k], spec.n_float) for k in names}


def baselines(n: int, reps: int) -> dict[str, dict[str, float]]:
    x, y = torch.zeros(n), torch.randn(n)
    axpy_w, axpy_c, fresh_w, fresh_c = [], [], [], []
    for _ in range(reps):
        with Stopwatch() as sw:
            x.add_(y, alpha=0.5)
        axpy_w.append(sw.wall)
        axpy_c.append(sw.cpu)
        with Stopwatch() as sw:
            torch.empty(n).fill_(1.0)
        fresh_w.append(sw.wall)
        fresh_c.append(sw.cpu)
    return {"axpy": summarize(axpy_w, axpy_c, n), "fresh_fp32_vector": summarize(fresh_w, fresh_c, n)}


def run_size(label: str, n: int, reps: int) -> dict[str, Any]:
    model = FlatModel.from_state_dict(synthetic_state(n))
    coordinator, workers = Signer.generate(), worker_keys(4)
    keyring = trust(coordinator, workers)
    raws = signed_updates(model, reps, workers, coordinator, JOB, INCARNATION)
    end_to_end(model, raws[:2], keyring)  # warm up caches and lazy imports
    result: dict[str, Any] = {
        "label": label,
        "params": n,
        "message_bytes": len(raws[0]),
        "reps": reps,
        "end_to_end": end_to_end(model, raws, keyring),
        "stages": stages(model, raws, keyring),
        "baselines": baselines(n, reps),
    }
    return result


def child_run(sizes: list[tuple[str, int]], reps: int, env_extra: dict[str, str]) -> dict[str, Any] | None:
    """The same kernel in a fresh process with extra environment (e.g. THP_MEM_ALLOC_ENABLE=1)."""
    cmd = [sys.executable, __file__, "--json", "--child", "--reps", str(reps), "--no-what-if"]
    cmd += ["--sizes", ",".join(label for label, _ in sizes)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env_extra}, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        say(f"child run with {env_extra} failed: {proc.stderr[-2000:]}")
        return None
    data: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return data


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--reps", type=int, default=0, help="updates per size (default 12, quick 6)")
    p.add_argument("--sizes", default="1M,10M", help="comma-separated of 100k, 1M, 10M (default 1M,10M)")
    p.add_argument("--no-what-if", dest="what_if", action="store_false", help="skip the THP child run")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(1)
    reps = args.reps or (6 if args.quick else 12)
    sizes = [(label, SIZES[label]) for label in args.sizes.split(",")]
    results = [run_size(label, n, reps) for label, n in sizes]
    if args.child:
        emit({"results": results}, True)
        return
    thp = child_run(sizes, reps, {"THP_MEM_ALLOC_ENABLE": "1"}) if args.what_if else None

    say(f"kernel: decode+verify, bind, dequantize, screen, accumulate on one core; {reps} updates per size")
    for r in results:
        n = r["params"]
        say(f"\n{r['label']} parameters ({n:,}; message {r['message_bytes']:,} bytes)")
        rows = [
            [name, s["best_ms"], s["median_ms"], s["cpu_ms"], s["params_per_s_best"] / 1e6]
            for name, s in r["stages"].items()
        ]
        total_best = sum(s["best_ms"] for s in r["stages"].values())
        rows.append(["sum of stages", total_best, None, None, n / total_best / 1e3])
        e2e = r["end_to_end"]
        rows.append(
            ["END TO END", e2e["best_ms"], e2e["median_ms"], e2e["cpu_ms"], e2e["params_per_s_best"] / 1e6]
        )
        b = r["baselines"]
        rows.append(
            ["(baseline) fp32 axpy", b["axpy"]["best_ms"], b["axpy"]["median_ms"], b["axpy"]["cpu_ms"], None]
        )
        fresh = b["fresh_fp32_vector"]
        rows.append(
            ["(baseline) fresh fp32 vector", fresh["best_ms"], fresh["median_ms"], fresh["cpu_ms"], None]
        )
        if thp is not None:
            t = next(x for x in thp["results"] if x["label"] == r["label"])
            te = t["end_to_end"]
            rows.append(
                [
                    "(what-if) end to end, THP alloc",
                    te["best_ms"],
                    te["median_ms"],
                    te["cpu_ms"],
                    te["params_per_s_best"] / 1e6,
                ]
            )
        say(table(["stage", "best ms", "median ms", "cpu ms", "M params/s (best)"], rows))
        slowest = max(r["stages"].items(), key=lambda kv: kv[1]["best_ms"])
        say(f"bottleneck: {slowest[0]} ({slowest[1]['best_ms'] / total_best:.0%} of the stages' time)")

    ten = next((r for r in results if r["params"] == SIZES["10M"]), results[-1])
    headline = ten["end_to_end"]["params_per_s_best"]
    say(
        f"\n{ten['label']}: {headline / 1e6:.0f} M params/s best, {ten['end_to_end']['params_per_s_median'] / 1e6:.0f} "
        f"M median, {ten['end_to_end']['params_per_s_cpu'] / 1e6:.0f} M by CPU time; target >= {TARGET / 1e6:.0f} M: "
        + ("holds" if headline >= TARGET else "does NOT hold")
    )
    out: dict[str, Any] = {
        "benchmark": "kernel",
        "params_per_s": headline,
        "params_per_s_median": ten["end_to_end"]["params_per_s_median"],
        "params_per_s_cpu": ten["end_to_end"]["params_per_s_cpu"],
        "target": TARGET,
        "target_met": headline >= TARGET,
        "results": results,
        "machine": machine(),
    }
    if thp is not None:
        t10 = next(x for x in thp["results"] if x["label"] == ten["label"])
        out["thp_params_per_s"] = t10["end_to_end"]["params_per_s_best"]
        out["thp"] = thp["results"]
    emit(out, args.json)


if __name__ == "__main__":
    main()
