"""Model poisoning: what two compromised workers of ten cost, with the aggregator's defences and without.

Ten workers train MNIST-1D (``fedq.apps.mnist1d``, the partitions ``fedq run --workers 10`` makes:
Dirichlet alpha 0.5, seed 42) with the job's default training (5 local epochs, SGD); honest ones
through ``worker.training.train_task``, as a worker does. Two of them hold enrolled keys and
are malicious (the attacks live here, in ``benchmarks/``, nowhere in the product):

- ``flip`` (worker w08): trains on its partition, sends its delta x -20 and claims 10**9 samples;
- ``noise`` (worker w09): trains, then sends Gaussian noise 100 x the norm of its own delta
  (and its true sample count).

What runs is the real aggregator: ``aggregator.service.Aggregator`` with its binding (every
update carries a task signed by the coordinator's key, with the job's incarnation and the
coordinator's sample cap, ``coordinator.tasks.sample_cap``: one fair share = 1600), its norm
clip, robust fold and ledger, fed over the real broker (``--transport memory`` for the
in-process one), its versions signed and read back verified. Each update is signed by its
worker's key, enrolled under its id. This script plays the coordinator and the workers in
lockstep: for each version v it issues ten tasks on v, trains them (``--parallel`` at a time),
publishes the ten updates in an order shuffled by the seed, waits for the aggregator's
version v+1 (K = 10) and evaluates it on the test set. Lockstep keeps the three runs
comparable: the same versions, the same tasks (same ids, so the same training seeds), the
same arrival order; staleness is 0.

Runs, the same versions and updates each:

- **clean**: no attacker (w08 and w09 train honestly), the defaults;
- **defended**: the attack, the defaults (``--clip adaptive``, the coordinator's sample cap;
  ``--robust`` as given, default none);
- **undefended**: the attack, ``--clip off``, ``--robust none``, tasks with no sample cap.

``accuracy_drop_points`` = (clean - defended final accuracy) x 100. ``--defences`` may name
several defended runs (``default,trimmed-mean:0.2``): the headline is the defaults' if they meet
the target, else the best one's; every run's figures are in the JSON.

    .venv/bin/python benchmarks/poisoning.py [--json] [--quick] [--versions V] [--seed S]
        [--defences default,trimmed-mean:0.2] [--clean 10|8|10,8] [--transport rabbitmq|memory]
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import shutil
import statistics
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _common import AMQP_URL, delete_namespace, emit, machine, parser, save_v0, say, signed_task, table, trust

from aggregator.config import AggregatorConfig
from aggregator.service import Aggregator
from broker_config.names import Names
from broker_config.topology import topology
from coordinator.config import CoordinatorConfig
from coordinator.tasks import sample_cap
from fedq.apps.mnist1d import Mnist1dApp
from shared.app import PartitionSpec
from shared.codec import encode
from shared.ledger import JsonLines, read_lines
from shared.logs import configure_logging
from shared.messages import Task, Update
from shared.quantize import decode_delta, encode_delta
from shared.settings import Settings
from shared.signing import Signer
from shared.store import LocalStore, ModelStore
from shared.tensors import FlatModel
from shared.transport import Transport
from shared.transport.memory import MemoryBroker, MemoryTransport
from shared.transport.rabbitmq import RabbitMQ
from worker.training import train_task

TARGET_POINTS = 2.0
WORKERS = 10
FLIP, NOISE = "w08", "w09"  # the two compromised workers (their keys are enrolled, like the others')
FLIP_FACTOR = -20.0
FLIP_CLAIM = 10**9
NOISE_FACTOR = 100.0
JOB = "poison"
TAIL = 5  # versions averaged for a steadier figure than the last one alone


@dataclass(frozen=True)
class RunSpec:
    name: str  # clean | clean8 | defended | defended:<robust> | undefended
    attack: bool
    workers: int  # honest + malicious updates per version (K)
    clip: str
    robust: str
    capped: bool  # tasks carry the coordinator's sample cap

    def settings(self) -> dict[str, Any]:
        return {
            "attack": self.attack,
            "updates_per_version": self.workers,
            "clip": self.clip,
            "robust": self.robust,
            "sample_cap": "coordinator's (a fair share)" if self.capped else "none",
        }


@dataclass
class Outcome:
    update: Update
    honest_norm: float  # the norm of the delta the worker trained (before any attack)
    sent_norm: float


def task_id(seed: int, version: int, worker: str) -> str:
    """The same task ids in every run, so an honest worker trains with the same seed each time."""
    return hashlib.sha256(f"poisoning-{seed}-{version}-{worker}".encode()).hexdigest()[:32]


def work(
    app: Mnist1dApp,
    data: Any,
    task: Task,
    token: bytes,
    blob: bytes,
    worker: str,
    role: str,
    seed: int,
) -> Outcome:
    """One worker's answer to one task: honest training, then the attack if it has one."""
    out = train_task(app, data, task, blob)
    honest_norm = out.metrics["delta_norm"]
    delta, samples, metrics = out.delta, out.num_samples, dict(out.metrics)
    if role != "honest":
        spec = FlatModel.from_bytes(blob).spec
        floats, exact = decode_delta(out.delta, spec, task.quant, task.block)
        if role == "flip":
            floats = floats * FLIP_FACTOR
            samples = FLIP_CLAIM
        else:  # noise: Gaussian, 100 x the norm of the worker's own honest delta
            gen = torch.Generator().manual_seed(int(task.task_id[:12], 16) ^ seed)
            floats = torch.randn(spec.n_float, generator=gen)
            floats *= NOISE_FACTOR * honest_norm / float(torch.linalg.vector_norm(floats))
        delta = encode_delta(floats, exact, spec, task.quant, task.block, torch.Generator().manual_seed(seed))
        metrics["delta_norm"] = float(torch.linalg.vector_norm(floats))
    update = Update(
        task_id=task.task_id,
        job_id=task.job_id,
        worker_id=worker,
        base_version=task.base_version,
        num_samples=samples,
        quant=task.quant,
        block=task.block,
        metrics=metrics,
        sent_at=time.time(),
        task=token,
        delta=delta,
    )
    return Outcome(update, honest_norm, metrics["delta_norm"])


async def connect(kind: str, names: Names, label: str, broker: MemoryBroker | None) -> Transport:
    if kind == "memory":
        assert broker is not None
        return await MemoryTransport(broker, names, label).connect()
    return await RabbitMQ(AMQP_URL, names, label).connect()


async def run_one(
    spec: RunSpec, args: Any, app: Mnist1dApp, parts: list[Any], pool: ThreadPoolExecutor
) -> dict[str, Any]:
    """One job of ``args.versions`` versions under ``spec``; its accuracy curve and ledger figures."""
    started = time.perf_counter()
    names = Names(f"bench-{uuid.uuid4().hex[:8]}-poison", JOB)
    tmp = Path(tempfile.mkdtemp(prefix=f"fedq-bench-poison-{spec.name.replace(':', '-')}-"))
    worker_ids = [f"w{i:02d}" for i in range(spec.workers)]
    # keys are made per run: nothing carries over from one run to the next but the seeds
    coordinator, aggregator_key = Signer.generate(), Signer.generate()
    workers = {w: Signer.generate() for w in worker_ids}
    ring = trust(coordinator, workers, [aggregator_key])
    store = ModelStore(LocalStore(tmp / "store"), JOB, ring)
    incarnation = uuid.uuid4().hex[:16]
    v0 = FlatModel.from_state_dict(app.build_model(args.model_seed).state_dict())
    await save_v0(store, v0, coordinator, incarnation)
    job = CoordinatorConfig.from_settings(Settings(job=JOB, min_workers=spec.workers))
    cap = sample_cap(job, app) if spec.capped else 0
    policy = AggregatorConfig.from_settings(
        Settings(job=JOB, buffer=spec.workers, clip=spec.clip, robust=spec.robust)
    ).policy
    memory = MemoryBroker() if args.transport == "memory" else None
    admin = await connect(args.transport, names, f"bench-poison-admin-{names.namespace}", memory)
    service = await connect(args.transport, names, f"bench-poison-aggregator-{names.namespace}", memory)
    await admin.declare(topology(names))
    ledger_path = tmp / "ledger.jsonl"
    agg = Aggregator(
        AggregatorConfig(policy),
        transport=service,
        store=store,
        signer=aggregator_key,
        keyring=ring,
        ledger=JsonLines(ledger_path),
    )
    await agg.load()
    stop = asyncio.Event()
    running = asyncio.create_task(agg.run(stop))
    roles = {w: "honest" for w in worker_ids}
    if spec.attack:
        roles[FLIP], roles[NOISE] = "flip", "noise"
    curve: list[float] = []
    stalled: dict[str, Any] | None = None
    norms: dict[str, list[float]] = {"honest": [], "flip": [], "noise": []}
    loop = asyncio.get_running_loop()
    try:
        for v in range(args.versions):
            manifest, blob = await store.load_bytes(v)  # verified with the trust set, as a worker's
            jobs = []
            for w in worker_ids:
                task, token = signed_task(
                    coordinator,
                    JOB,
                    task_id=task_id(args.seed, v, w),
                    base_version=v,
                    incarnation=incarnation,
                    max_samples=cap,
                    model_sha256=manifest.sha256,
                    train=job.train,
                )
                data = parts[int(w[1:])]
                role = roles[w] if v >= args.attack_from else "honest"
                jobs.append(
                    loop.run_in_executor(pool, work, app, data, task, token, blob, w, role, args.seed + v)
                )
            outcomes = dict(zip(worker_ids, await asyncio.gather(*jobs), strict=True))
            for w, o in outcomes.items():
                norms[roles[w]].append(o.sent_norm)
            order = list(worker_ids)
            random.Random(f"{args.seed}-{v}").shuffle(order)  # the same arrival order in every run
            for w in order:
                body = encode(outcomes[w].update, workers[w])
                await admin.publish(names.results_exchange, names.results_key, body)
            rejected = await next_version(
                agg, running, ledger_path, v + 1, {o.update.task_id for o in outcomes.values()}
            )
            if rejected:  # the buffer cannot fill: the job is stuck on version v
                stalled = {"at_version": v, "rejected": rejected}
                say(
                    f"  {spec.name}: no version {v + 1}, the aggregator rejected {rejected}: the job is stuck on v{v}"
                )
                break
            _, model = await store.load(v + 1)
            curve.append(evaluate(app, model, args.model_seed))
            if args.verbose:
                say(f"  {spec.name} v{v + 1}: accuracy {curve[-1]:.4f}")
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running, 10)
        if not running.done():
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await running
        await service.close()
        await admin.close()
        if args.transport == "rabbitmq":
            await delete_namespace(names, job_ids=(JOB,))
    ledger = list(read_lines(ledger_path))
    shutil.rmtree(tmp, ignore_errors=True)
    versions_made = len(curve)
    if not curve:
        curve = [evaluate(app, v0, args.model_seed)]
    curve += [curve[-1]] * (args.versions - len(curve))  # a stuck job keeps its last version
    return {
        "name": spec.name,
        "settings": spec.settings(),
        "policy": policy.to_dict(),
        "max_samples": cap,
        "final_accuracy": curve[-1],
        "tail_mean_accuracy": statistics.fmean(curve[-TAIL:]),
        "best_accuracy": max(curve),
        "curve": [round(a, 4) for a in curve],
        "versions_made": versions_made,
        "stalled": stalled,
        "ledger": ledger_figures(ledger, roles),
        "sent_norm_median": {k: statistics.median(v) for k, v in norms.items() if v},
        "wall_s": time.perf_counter() - started,
    }


def evaluate(app: Mnist1dApp, model: FlatModel, model_seed: int) -> float:
    net = app.build_model(model_seed)
    net.load_state_dict(model.to_state_dict())
    acc = app.evaluate(net)["accuracy"]
    return acc if acc == acc else 0.0  # NaN weights: no better than nothing


async def next_version(
    agg: Aggregator, running: asyncio.Task[None], ledger_path: Path, version: int, task_ids: set[str]
) -> dict[str, int]:
    """Wait for ``version``; if the aggregator rejected some of this version's updates so that its
    buffer cannot fill, return the rejections by reason instead (empty: the version came)."""
    deadline = time.monotonic() + 300
    while agg.core is None or agg.core.version < version or not await agg.store.exists(version):
        if running.done() or time.monotonic() > deadline:
            raise SystemExit(f"no version {version} (aggregator done={running.done()})")
        pending = {a.task_id for a in agg.core.pending} if agg.core is not None else set()
        rejected = [
            r for r in read_lines(ledger_path) if r.get("fate") == "rejected" and r.get("task_id") in task_ids
        ]
        if rejected and len(pending) + len(rejected) >= len(task_ids):
            return dict(Counter(str(r.get("reason")) for r in rejected))
        await asyncio.sleep(0.02)
    return {}


def ledger_figures(ledger: Sequence[dict[str, Any]], roles: dict[str, str]) -> dict[str, Any]:
    """Applied, clipped and rejected updates per role, from the aggregator's ledger."""
    out: dict[str, Any] = {}
    for role in sorted(set(roles.values())):
        mine = [r for r in ledger if roles.get(str(r.get("worker_id"))) == role]
        applied = [r for r in mine if r.get("fate") == "applied"]
        clipped = [r for r in applied if float(r.get("clip", 1.0)) < 1.0]
        out[role] = {
            "applied": len(applied),
            "clipped": len(clipped),
            "left_out": sum(1 for r in applied if r.get("left_out")),  # --robust cosine: counted, not folded
            "clip_scale_median": statistics.median(float(r["clip"]) for r in clipped) if clipped else None,
            "num_samples_counted_max": max((int(r.get("num_samples", 0)) for r in applied), default=None),
            "rejected": dict(Counter(str(r.get("reason")) for r in mine if r.get("fate") == "rejected")),
        }
    return out


def plan(args: Any) -> list[RunSpec]:
    runs = []
    for n in args.clean.split(","):
        if n.strip() not in ("10", "8"):
            raise SystemExit("--clean takes 10, 8 or both (10,8)")
        runs.append(
            RunSpec("clean" if n.strip() == "10" else "clean8", False, int(n), "adaptive", "none", True)
        )
    for r in filter(
        None, args.clean_robust.split(",")
    ):  # diagnostic: what the robust fold costs with no attack
        runs.append(RunSpec(f"clean:{r.strip()}", False, WORKERS, "adaptive", r.strip(), True))
    for d in filter(None, (x.strip() for x in args.defences.split(","))):
        robust, _, clip = d.partition("@")  # ROBUST[@CLIP]: a --robust value (or default) and a --clip one
        name = "defended" if d == "default" else f"defended:{d}"
        runs.append(
            RunSpec(name, True, WORKERS, clip or "adaptive", "none" if robust == "default" else robust, True)
        )
    runs.append(RunSpec("undefended", True, WORKERS, "off", "none", False))
    return runs


async def main_async() -> None:
    p = parser(__doc__ or "")
    p.add_argument(
        "--versions", type=int, default=0, help="versions per run, K = 10 updates each (default 40: the clean run has levelled off; quick 6)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the task ids (training), arrival order and noise"
    )
    p.add_argument("--model-seed", type=int, default=0, help="seed of version 0 (default 0)")
    p.add_argument(
        "--defences",
        default="default,cosine",
        help="defended runs, comma-separated, each ROBUST[@CLIP]: default (adaptive clip + sample cap) or "
        "a --robust value with them, e.g. trimmed-mean:0.2, and optionally another --clip, e.g. "
        "trimmed-mean:0.2@adaptive:1.5 (default: default,cosine)",
    )
    p.add_argument(
        "--clean",
        default="10",
        help="clean runs: 10 honest workers, 8 (the attacked runs' honest ones), or 10,8",
    )
    p.add_argument(
        "--clean-robust",
        default="",
        help="also clean runs (10 honest) with these --robust values, comma-separated: what the fold costs alone",
    )
    p.add_argument("--transport", choices=("rabbitmq", "memory"), default="rabbitmq")
    p.add_argument(
        "--parallel", type=int, default=2, help="trainings at a time (default 2: the machine's cores)"
    )
    p.add_argument(
        "--attack-from",
        type=int,
        default=0,
        help="the attackers train honestly before this version (default 0)",
    )
    p.add_argument("--verbose", action="store_true", help="print every version's accuracy")
    args = p.parse_args()
    args.versions = args.versions or (6 if args.quick else 40)
    torch.set_num_threads(1)
    configure_logging("warning", json=False)
    app = Mnist1dApp()
    app.prepare()
    s = Settings()
    parts = [app.load_partition(PartitionSpec(i, WORKERS, s.alpha, s.partition_seed)) for i in range(WORKERS)]
    started = time.perf_counter()
    results = []
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        for spec in plan(args):
            say(f"{spec.name}: {args.versions} versions x {spec.workers} updates, {spec.settings()} ...")
            results.append(await run_one(spec, args, app, parts, pool))
            r = results[-1]
            say(
                f"  final accuracy {r['final_accuracy']:.4f} (last {TAIL} mean {r['tail_mean_accuracy']:.4f}), {r['wall_s']:.0f} s"
            )
    wall = time.perf_counter() - started
    by = {r["name"]: r for r in results}
    clean = by["clean"] if "clean" in by else by["clean8"]
    defended = [r for r in results if r["name"].startswith("defended")]
    for r in defended:
        r["drop_points"] = (clean["final_accuracy"] - r["final_accuracy"]) * 100
        r["tail_drop_points"] = (clean["tail_mean_accuracy"] - r["tail_mean_accuracy"]) * 100
    default = by.get("defended")
    chosen = (
        default
        if default is not None and default["drop_points"] <= TARGET_POINTS
        else min(defended, key=lambda r: r["drop_points"])
    )
    undefended = by["undefended"]

    say(
        f"\npoisoning: {WORKERS} workers, {FLIP} flips its delta x {FLIP_FACTOR:g} and claims {FLIP_CLAIM:,} samples, "
        f"{NOISE} sends noise {NOISE_FACTOR:g} x its delta's norm; {args.versions} versions of K updates; "
        f"seed {args.seed}; transport {args.transport}"
    )
    say(
        table(
            [
                "run",
                "clip",
                "robust",
                "sample cap",
                "final acc",
                f"last-{TAIL} mean",
                "best",
                "drop pts",
                "wall s",
            ],
            [
                [
                    r["name"],
                    r["settings"]["clip"],
                    r["settings"]["robust"],
                    r["max_samples"] or "none",
                    r["final_accuracy"],
                    r["tail_mean_accuracy"],
                    r["best_accuracy"],
                    (clean["final_accuracy"] - r["final_accuracy"]) * 100,
                    r["wall_s"],
                ]
                for r in results
            ],
        )
    )
    rows = []
    for r in results:
        for role, f in r["ledger"].items():
            rows.append(
                [
                    r["name"],
                    role,
                    f["applied"],
                    f["clipped"],
                    f["left_out"],
                    f["clip_scale_median"],
                    f["num_samples_counted_max"],
                    f["rejected"] or "-",
                ]
            )
    say("\nfrom each run's ledger:")
    say(
        table(
            ["run", "workers", "applied", "clipped", "left out", "median clip scale", "max samples counted", "rejected"],
            rows,
        )
    )
    drop = chosen["drop_points"]
    say(
        f"\naccuracy drop (clean - defended, {chosen['name']}): {drop:.2f} points; target <= {TARGET_POINTS:g}: "
        + ("holds" if drop <= TARGET_POINTS else "does NOT hold")
        + f"; undefended: {(clean['final_accuracy'] - undefended['final_accuracy']) * 100:.1f} points"
    )
    attackers = {role: chosen["ledger"].get(role, {}) for role in ("flip", "noise")}
    emit(
        {
            "benchmark": "poisoning",
            "accuracy_drop_points": drop,
            "target_points": TARGET_POINTS,
            "holds": drop <= TARGET_POINTS,
            "clean_accuracy": clean["final_accuracy"],
            "clean_run": f"{clean['settings']['updates_per_version']} honest workers",
            "defended_accuracy": chosen["final_accuracy"],
            "defended_with": {
                "run": chosen["name"],
                **chosen["settings"],
                "max_samples": chosen["max_samples"],
            },
            "undefended_accuracy": undefended["final_accuracy"],
            "undefended_drop_points": (clean["final_accuracy"] - undefended["final_accuracy"]) * 100,
            "attacker_updates": {
                role: {"applied": f.get("applied"), "clipped": f.get("clipped"), "left_out": f.get("left_out")}
                for role, f in attackers.items()
            },
            "settings": {
                "workers": WORKERS,
                "attackers": {
                    FLIP: f"delta x {FLIP_FACTOR:g}, claims {FLIP_CLAIM} samples",
                    NOISE: f"Gaussian noise, {NOISE_FACTOR:g} x its delta's norm",
                },
                "versions": args.versions,
                "updates_per_version": WORKERS,
                "app": "fedq.apps.mnist1d",
                "partitions": f"Dirichlet alpha {s.alpha}, seed {s.partition_seed}, {WORKERS} parts",
                "transport": args.transport,
                "lockstep": True,
            },
            "attack_from_version": args.attack_from,
            "stalled": {r["name"]: r["stalled"] for r in results if r["stalled"]},
            "seeds": {"seed": args.seed, "model_seed": args.model_seed, "partition_seed": s.partition_seed},
            "wall_s": wall,
            "runs": results,
            "machine": machine(),
        },
        args.json,
    )


if __name__ == "__main__":
    asyncio.run(main_async())
