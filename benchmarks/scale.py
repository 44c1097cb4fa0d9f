"""Scale: up to 1,000 simulated workers against one aggregator, then against 2 edges and a root.

For each topology the script starts a job of its own (its own namespace, keys, store and folder
under one temp dir), from the real commands:

- ``single``: ``fedq coordinator``, ``fedq aggregator --buffer K`` (today's topology);
- ``edges``: ``fedq coordinator --shards 2``, two ``fedq aggregator --tier edge --shard I
  --shards 2 --buffer K`` (each folds K updates into a signed partial) and one ``fedq aggregator
  --tier root --shards 2 --buffer R`` (R updates per version; ``edges``: R = K, a version per 10
  updates as the single aggregator makes; ``edges@R``: another R). Skipped, with the reason,
  while ``fedq aggregator`` has no ``--tier``;

plus P processes of ``fedq worker --replicas M`` (P x M = ``--workers``). The app is this file's
``ScaleApp``: MNIST-1D with a 104,682-parameter MLP (the "100k" size of intake.py and
kernel.py), one local epoch on a worker's 16 samples (of 16,000 over 1,000 workers), 500 test
samples for the coordinator's evaluation of every version. Tasks carry the model by reference (``--inline-limit 256 KiB``): a
419 kB model inline in 1,000 tasks in flight would be 419 MB of queue; updates (~106 kB) stay inline.

Once ``--warmup`` updates are applied, the script reads every process's CPU time
(``/proc/<pid>/stat``) and the applied count (``updates_total`` of the newest version's manifest
in the store); again after ``--updates`` more are applied (or ``--seconds`` passed). Reported per
topology, over that window:

- ``root_cpu_per_1000_updates``: CPU seconds of the aggregator (single) or of the root (edges)
  per 1,000 applied updates; ``edge_cpu_per_1000_updates``: the edges' together.
  ``root_cpu_ratio``: single's over ``edges``' (the target: at least 3);
- coordinator and broker CPU per 1,000 updates, a worker replica's CPU per update;
- updates applied per second, versions per second;
- memory per 100 replicas: the worker processes' RSS (mean over the window) / replicas x 100;
- the broker connections the fleet holds (management API, mid-window).

Every replica holds a connection of its own, and a RabbitMQ node takes about 0.9 x its
``ulimit -n`` in sockets (832 on this machine's shared node, whose limit is 1024). On the shared
broker the fleet is cut to what the node has free, less ``--socket-headroom`` for everyone else
using it, and the JSON says so. ``--private-broker`` starts a node of our own instead
(tests/support/private_broker.py: own name, ports and data in the temp dir; it inherits this
process's ``ulimit -n``), which 1,000 workers need; it is stopped at the end. Queues and
exchanges of each job are deleted when it ends, and the temp dir unless ``--keep``.

    .venv/bin/python benchmarks/scale.py [--json] [--quick] [--private-broker] [--workers N]
        [--topologies single,edges,edges@20] [--updates N] [--seconds S]
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _common import (
    AMQP_URL,
    ROOT,
    broker_pid,
    cpu_seconds,
    delete_namespace,
    emit,
    fedq_cmd,
    machine,
    parser,
    read_jsonl,
    rss_kib,
    say,
    table,
)
from torch import nn

from broker_config.names import Names
from fedq.apps.mnist1d import Mnist1dApp

HERE = Path(__file__).resolve().parent
TEST_SAMPLES = 500
# Models (419 kB) travel by reference to the store, updates (~106 kB of int8) inline, as at 100k
# parameters they would by default; the model inline in 1,000 tasks in flight would be 419 MB of queue.
INLINE_LIMIT = 256 * 1024


class ScaleApp(Mnist1dApp):
    """MNIST-1D with a ~100k-parameter MLP (40 -> 512 -> 160 -> 10: 104,682 parameters) and a
    500-sample test set, so that evaluating every version costs the coordinator little."""

    name = "mnist1d-scale"

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Flatten(), nn.Linear(40, 512), nn.ReLU(), nn.Linear(512, 160), nn.ReLU(), nn.Linear(160, 10)
        )

    def test_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super().test_data()
        return x[:TEST_SAMPLES], y[:TEST_SAMPLES]


app = ScaleApp()
APP_SPEC = "scale:app"  # importable by the services: PYTHONPATH holds this folder


# -- the broker: sockets, connections, clean-up ---------------------------------------------------


@dataclass
class Broker:
    """The broker measured: the shared one (``FEDQ_AMQP_URL``, default 127.0.0.1:5672) or, with
    ``--private-broker``, a node of our own (tests/support/private_broker.py)."""

    amqp_url: str = AMQP_URL
    management_url: str = ""  # default: the AMQP URL's host, port 15672
    node: str = ""  # a private node's name, to find its Erlang VM

    def pid(self) -> int | None:
        """The node's Erlang VM (its CPU is the broker's)."""
        if not self.node:
            return broker_pid()
        mark = f"RABBITMQ_NODENAME={self.node}".encode()  # the node's name is in its environment
        for proc in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                beam = proc.name.isdigit() and b"beam.smp" in (proc / "cmdline").read_bytes()
                if beam and mark in (proc / "environ").read_bytes().split(b"\0"):
                    return int(proc.name)
        return None


BROKER = Broker()


def start_private_broker(folder: Path) -> Any:
    """A RabbitMQ node of our own, with the management plugin, for more connections than the shared
    node allows: it inherits this process's ``ulimit -n``."""
    sys.path.insert(0, str(ROOT / "tests"))
    from support.private_broker import PrivateRabbit

    node = PrivateRabbit(folder, plugins=("rabbitmq_management",))
    node.start()
    BROKER.amqp_url, BROKER.management_url, BROKER.node = node.amqp_url, node.management_url, node.node
    deadline = time.monotonic() + 60
    while sockets() is None and time.monotonic() < deadline:  # the API answers a little after AMQP
        time.sleep(1.0)
    return node


def management() -> tuple[str, dict[str, str]]:
    """The management API's base URL and auth header, from the AMQP URL (its host, its login)."""
    url = urllib.parse.urlsplit(BROKER.amqp_url.split(",")[0])  # a cluster's list: its first node
    base = (
        BROKER.management_url
        or os.environ.get("FEDQ_MANAGEMENT_URL")
        or f"http://{url.hostname or '127.0.0.1'}:15672/"
    )
    login = f"{urllib.parse.unquote(url.username or 'guest')}:{urllib.parse.unquote(url.password or 'guest')}"
    return base.rstrip("/") + "/", {"Authorization": "Basic " + base64.b64encode(login.encode()).decode()}


def api(path: str, method: str = "GET") -> Any:
    base, headers = management()
    req = urllib.request.Request(base + "api/" + path, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=30) as resp:
        body = resp.read()
    return json.loads(body) if body else None


def sockets() -> tuple[int, int] | None:
    """(total, used) sockets of the broker node, None without the management API."""
    try:
        node = api("nodes")[0]
        return int(node["sockets_total"]), int(node["sockets_used"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def connections_named(prefix: str) -> int | None:
    """Open connections whose client-given name starts with ``prefix``."""
    try:
        conns = api("connections?columns=client_properties")
    except (OSError, ValueError):
        return None
    return sum(
        1
        for c in conns
        if str((c.get("client_properties") or {}).get("connection_name", "")).startswith(prefix)
    )


def sweep(namespace: str) -> int:
    """Delete every queue and exchange whose name starts with ``namespace.`` (the management API):
    whatever the job declared, shard and edge queues included. Returns how many were deleted."""
    deleted = 0
    for kind in ("queues", "exchanges"):
        try:
            found = api(f"{kind}/%2F?columns=name")
        except (OSError, ValueError):
            continue
        for item in found:
            name = str(item.get("name", ""))
            if name.startswith(namespace + "."):
                with contextlib.suppress(OSError, ValueError):
                    api(f"{kind}/%2F/{urllib.parse.quote(name, safe='')}", method="DELETE")
                    deleted += 1
    return deleted


# -- the job's processes --------------------------------------------------------------------------


def has_flag(command: str, flag: str) -> bool:
    out = subprocess.run(
        fedq_cmd(command, "--help"), capture_output=True, text=True, cwd=ROOT, check=False
    ).stdout
    return flag in out


@dataclass
class Job:
    """One topology's job: its folder, namespace, processes and their logs."""

    topology: str  # single, edges or edges@R (the root's --buffer R)
    folder: Path
    tag: str
    workers: int
    processes: int
    shards: int
    root_buffer: int
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def token(self) -> str:
        """The topology as a name may spell it (edges@20: edges20)."""
        return self.topology.replace("@", "")

    @property
    def names(self) -> Names:
        return Names(f"bench-{self.tag}-scale-{self.token}", self.job_id)

    @property
    def job_id(self) -> str:
        return f"scale-{self.tag}-{self.token}"

    @property
    def keys(self) -> Path:
        return self.folder / "keys"

    @property
    def store(self) -> Path:
        return self.folder / "store"

    @property
    def out(self) -> Path:
        return self.folder / "out"

    def replicas(self) -> list[int]:
        """Replicas per worker process: as even as can be."""
        base, extra = divmod(self.workers, self.processes)
        return [base + (1 if i < extra else 0) for i in range(self.processes)]

    def worker_id(self, process: int) -> str:
        return f"s{self.tag}{self.token}p{process}"

    def env(self) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if not k.startswith("FEDQ_") or k == "FEDQ_DATA_DIR"}
        return {
            **keep,
            "FEDQ_AMQP_URL": BROKER.amqp_url,
            "FEDQ_NAMESPACE": self.names.namespace,
            "FEDQ_JOB": self.job_id,
            "FEDQ_KEYS_DIR": str(self.keys),
            "FEDQ_TRUSTED_KEYS": str(self.keys / "trusted"),
            "FEDQ_STORE": str(self.store),
            "FEDQ_OUT": str(self.out),
            "FEDQ_APP": APP_SPEC,
            "FEDQ_LOG_JSON": "true",
            "FEDQ_LOG_LEVEL": "info",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }

    def start(self, name: str, *args: str) -> None:
        log = self.folder / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as fh:
            self.procs[name] = subprocess.Popen(
                fedq_cmd(*args),
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.folder,
                env=self.env(),
            )

    def pids(self, prefix: str) -> list[int]:
        return [p.pid for n, p in self.procs.items() if n.startswith(prefix) and p.poll() is None]

    def dead(self) -> list[str]:
        return [f"{n} (exit {p.returncode})" for n, p in self.procs.items() if p.poll() is not None]

    def stop(self) -> None:
        """Workers first (they say goodbye), then the coordinator, then the aggregators."""
        for group in ("fleet", "coordinator", "edge", "root", "aggregator"):
            procs = [p for n, p in self.procs.items() if n.startswith(group) and p.poll() is None]
            for p in procs:
                p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            for p in procs:
                try:
                    p.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def prepare_keys(job: Job) -> None:
    """The operator's, coordinator's and aggregator's keys (``fedq run``'s layout), an aggregator
    key per edge, and a key enrolled for every replica (where ``--replicas`` looks for it)."""
    from fedq.keys import create_key, enrol, init, run_key_file, trust_role_key
    from shared.keys import load_or_create_signer
    from shared.signing import Role

    trusted = job.keys / "trusted"
    init(job.keys, trusted, key_file=run_key_file)
    for i in range(job.shards):
        signer, _ = create_key(run_key_file(job.keys, f"edge{i}"))
        trust_role_key(trusted, Role.AGGREGATOR, signer.public)
    for p, count in enumerate(job.replicas()):
        for r in range(count):
            wid = f"{job.worker_id(p)}-r{r}"
            enrol(trusted, wid, load_or_create_signer(job.keys / f"worker-{wid}.key").public)


def start_job(job: Job, args: Any) -> None:
    from fedq.keys import run_key_file

    staleness = ["--max-staleness", str(args.max_staleness)]
    if job.shards:
        for i in range(job.shards):
            job.start(
                f"edge{i}",
                "aggregator",
                "--tier", "edge", "--shard", str(i), "--shards", str(job.shards),
                "--buffer", str(args.buffer), *staleness,
                "--key-file", str(run_key_file(job.keys, f"edge{i}")),
            )  # fmt: skip
        job.start(
            "root",
            "aggregator",
            "--tier", "root", "--shards", str(job.shards),
            "--buffer", str(job.root_buffer), *staleness,
            "--key-file", str(run_key_file(job.keys, "aggregator")),
        )  # fmt: skip
    else:
        job.start(
            "aggregator",
            "aggregator",
            "--buffer", str(args.buffer), *staleness,
            "--key-file", str(run_key_file(job.keys, "aggregator")),
        )  # fmt: skip
    job.start(
        "coordinator",
        "coordinator",
        *(["--shards", str(job.shards)] if job.shards else []),
        "--target-accuracy", "0",
        "--max-seconds", "0",
        "--min-workers", str(job.workers),
        "--min-workers-wait", "600",
        "--worker-timeout", "120",
        "--local-epochs", "1",
        "--inline-limit", str(INLINE_LIMIT),
        "--task-ttl", "600",
        "--key-file", str(run_key_file(job.keys, "coordinator")),
    )  # fmt: skip
    first = 0
    for p, count in enumerate(job.replicas()):
        job.start(
            f"fleet{p}",
            "worker",
            "--worker-id", job.worker_id(p),
            "--replicas", str(count),
            "--partition", f"{first}/{job.workers}",
            "--heartbeat-interval", str(args.heartbeat),
        )  # fmt: skip
        first += count


# -- measuring ------------------------------------------------------------------------------------


def applied(job: Job) -> tuple[int, int]:
    """(updates applied, version) of the newest version in the store (its manifest's updates_total)."""
    models = job.store / "jobs" / job.job_id / "models"
    try:
        manifests = sorted(p for p in os.listdir(models) if p.startswith("v") and p.endswith(".json"))
    except OSError:
        return 0, -1
    for name in reversed(manifests):
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads((models / name).read_text())
            return int(doc.get("updates_total", 0)), int(doc.get("version", -1))
    return 0, -1


@dataclass
class Snapshot:
    t: float
    updates: int
    version: int
    cpu: dict[str, float]  # process name -> CPU seconds so far


def snapshot(job: Job, broker: int | None) -> Snapshot:
    cpu = {name: cpu_seconds(p.pid) or 0.0 for name, p in job.procs.items()}
    if broker is not None:
        cpu["broker"] = cpu_seconds(broker) or 0.0
    updates, version = applied(job)
    return Snapshot(time.monotonic(), updates, version, cpu)


def per_1000(a: Snapshot, b: Snapshot, prefix: str) -> float | None:
    n = b.updates - a.updates
    used = sum(b.cpu[k] - a.cpu.get(k, b.cpu[k]) for k in b.cpu if k.startswith(prefix))
    return used / n * 1000 if n > 0 else None


def wait_for(job: Job, cond: Any, timeout: float, what: str) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = job.dead()
        if dead:
            raise RuntimeError(f"{job.topology}: {', '.join(dead)} exited while waiting for {what}")
        if cond():
            return True
        time.sleep(1.0)
    return False


def measure(job: Job, args: Any, sock0: int | None) -> dict[str, Any]:
    """Start the job, wait for the fleet and the warm-up, measure one window, stop."""
    broker = BROKER.pid()
    t_start = time.monotonic()
    start_job(job, args)
    say(
        f"  {job.topology}: started {len(job.procs)} processes; waiting for {job.workers} workers to say hello"
    )
    state = job.out / "coordinator.json"

    def started() -> bool:
        with contextlib.suppress(OSError, ValueError):
            return json.loads(state.read_text()).get("t0") is not None
        return False

    if not wait_for(job, started, 600, "the fleet"):
        raise RuntimeError(f"{job.topology}: the job did not start within 600 s (see {job.folder}/logs)")
    fleet_up_s = time.monotonic() - t_start
    say(f"  {job.topology}: first task after {fleet_up_s:.0f} s; warming up ({args.warmup} updates)")
    if not wait_for(job, lambda: applied(job)[0] >= args.warmup, args.seconds, "the warm-up"):
        raise RuntimeError(
            f"{job.topology}: {applied(job)[0]} updates applied in {args.seconds} s of warm-up"
        )
    a = snapshot(job, broker)
    rss: list[int] = []  # the fleet's RSS, KiB, once a second
    rss_by: dict[str, list[int]] = {}  # each fleet process's
    conns: int | None = None
    sock_mid: int | None = None
    deadline = a.t + args.seconds
    while time.monotonic() < deadline and applied(job)[0] < a.updates + args.updates:
        if job.dead():
            raise RuntimeError(f"{job.topology}: {', '.join(job.dead())} exited mid-window")
        now = {
            n: rss_kib(p.pid) or 0 for n, p in job.procs.items() if n.startswith("fleet") and p.poll() is None
        }
        rss.append(sum(now.values()))
        for name, kib in now.items():
            rss_by.setdefault(name, []).append(kib)
        if conns is None and time.monotonic() > a.t + 5:
            conns = connections_named("fedq-worker-" + job.worker_id(0)[:-1])
            s = sockets()
            sock_mid = s[1] if s else None
        time.sleep(1.0)
    b = snapshot(job, broker)
    job.stop()
    n = b.updates - a.updates
    wall = b.t - a.t
    fleet = per_1000(a, b, "fleet")
    rejected: dict[str, int] = {}  # the root's or single's ledger, and each edge's
    for rec in (r for path in sorted(job.out.glob("ledger*.jsonl")) for r in read_jsonl(path)):
        if rec.get("fate") == "rejected":
            reason = str(rec.get("reason"))
            rejected[reason] = rejected.get(reason, 0) + 1
    root = "root" if job.shards else "aggregator"
    return {
        "workers": job.workers,
        "processes": job.processes,
        "replicas_per_process": job.replicas(),
        "shards": job.shards,
        "seconds_to_first_task": fleet_up_s,
        "window_s": wall,
        "updates_measured": n,
        "versions_measured": b.version - a.version,
        "updates_per_s": n / wall if wall > 0 else None,
        "versions_per_s": (b.version - a.version) / wall if wall > 0 else None,
        "root_cpu_per_1000_updates": per_1000(a, b, root),
        "edge_cpu_per_1000_updates": per_1000(a, b, "edge") if job.shards else None,
        "coordinator_cpu_per_1000_updates": per_1000(a, b, "coordinator"),
        "broker_cpu_per_1000_updates": per_1000(a, b, "broker") if broker else None,
        "worker_cpu_ms_per_update": fleet,  # the fleet's CPU s per 1000 updates = ms per update
        "root_cpu_cores": (b.cpu[root] - a.cpu[root]) / wall if wall > 0 else None,
        "fleet_cpu_cores": (fleet or 0) * n / 1000 / wall if wall > 0 else None,
        "rss_per_100_replicas_mib": (sum(rss) / len(rss)) / 1024 / job.workers * 100 if rss else None,
        "rss_fleet_mib": (sum(rss) / len(rss)) / 1024 if rss else None,
        "rss_per_process_mib": {n: sum(v) / len(v) / 1024 for n, v in rss_by.items()},
        "fleet_connections": conns,
        "broker_sockets_used_mid": sock_mid,
        "broker_sockets_used_before": sock0,
        "rejected_by_reason": rejected,
        "updates_applied_total": b.updates,
        "folder": str(job.folder),
    }


def cleanup(job: Job) -> int:
    import asyncio

    from broker_config.topology import topology

    shards = {"shards": job.shards} if job.shards else {}
    extra: list[str] = []
    with contextlib.suppress(TypeError):  # a topology() that knows shards: its queues too
        extra = [q.name for q in topology(job.names, ("cpu",), **shards).queues]
    with contextlib.suppress(Exception):
        asyncio.run(
            delete_namespace(
                Names(job.names.namespace),
                job_ids=(job.job_id,),
                extra_queues=extra,
                amqp_url=BROKER.amqp_url,
            )
        )
    return sweep(job.names.namespace)


# -- the command ----------------------------------------------------------------------------------


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--workers", type=int, default=0, help="simulated workers (default 1000; quick 100)")
    p.add_argument("--processes", type=int, default=0, help="worker processes (default: 250 replicas each)")
    p.add_argument(
        "--updates", type=int, default=0, help="updates in the measured window (default 3000; quick 300)"
    )
    p.add_argument(
        "--warmup", type=int, default=0, help="updates applied before the window (default 300; quick 50)"
    )
    p.add_argument(
        "--seconds", type=float, default=0, help="longest window, and warm-up (default 300; quick 90)"
    )
    p.add_argument(
        "--topologies",
        default="single,edges,edges@20",
        help="comma list of single, edges (root --buffer = --buffer) and edges@R (root --buffer R); "
        "default single,edges,edges@20",
    )
    p.add_argument(
        "--buffer", type=int, default=10, help="K: the single aggregator's and each edge's (default 10)"
    )
    p.add_argument(
        "--root-buffer", type=int, default=0, help="the root's updates per version (default: --buffer)"
    )
    p.add_argument("--max-staleness", type=int, default=100_000, help="every aggregator's (default 100000)")
    p.add_argument("--heartbeat", type=float, default=15.0, help="worker heartbeat interval s (default 15)")
    p.add_argument("--socket-headroom", type=int, default=150, help="broker sockets left free for others")
    p.add_argument(
        "--private-broker",
        action="store_true",
        help="start a RabbitMQ node of our own for the run (more sockets than the shared node's 832)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (default: deleted)")
    args = p.parse_args()
    want = args.workers or (100 if args.quick else 1000)
    args.updates = args.updates or (300 if args.quick else 3000)
    args.warmup = args.warmup or (50 if args.quick else 300)
    args.seconds = args.seconds or (90 if args.quick else 300)
    topologies = [t.strip() for t in args.topologies.split(",") if t.strip()]
    for topo in topologies:
        if topo != "single" and not (topo == "edges" or (topo.startswith("edges@") and topo[6:].isdigit())):
            p.error(f"--topologies: {topo!r} is not single, edges or edges@R")
    tag = uuid.uuid4().hex[:6]
    tmp = Path(tempfile.mkdtemp(prefix="fedq-bench-scale-"))
    results: dict[str, Any] = {}
    notes: list[str] = []
    node = start_private_broker(tmp / "broker") if args.private_broker else None
    if node is not None:
        say(f"scale: private RabbitMQ node {node.node} on {node.host}:{node.port}")

    s0 = sockets()
    workers = want
    if s0 is not None:
        free = s0[0] - s0[1] - args.socket_headroom - 8  # our services' and the clean-up's own
        if free < want:
            workers = max(1, free)
            notes.append(
                f"{want} workers asked; the broker has {s0[0] - s0[1]} of {s0[0]} sockets free, "
                f"{args.socket_headroom} kept for others: {workers} workers (one connection each)"
            )
            say(f"scale: {notes[-1]}")
    processes = args.processes or max(1, math.ceil(workers / 250))
    edges_ok = has_flag("aggregator", "--tier") and has_flag("coordinator", "--shards")
    say(f"scale: {workers} workers in {processes} processes, K={args.buffer}, folder {tmp}")
    try:
        for topo in topologies:
            edges = topo.startswith("edges")
            if edges and not edges_ok:
                results[topo] = {
                    "skipped": "fedq aggregator has no --tier / fedq coordinator no --shards (edge tier not landed)"
                }
                say(f"  {topo}: skipped: {results[topo]['skipped']}")
                continue
            root_buffer = int(topo[6:]) if "@" in topo else args.root_buffer or args.buffer
            job = Job(
                topo, tmp / topo.replace("@", ""), tag, workers, processes, 2 if edges else 0, root_buffer
            )
            job.folder.mkdir(parents=True)
            say(f"  {topo}: making {workers} worker keys")
            prepare_keys(job)
            try:
                results[topo] = measure(job, args, (sockets() or (0, None))[1])
                results[topo]["root_buffer"] = root_buffer if edges else args.buffer
            except RuntimeError as exc:
                results[topo] = {"error": str(exc), "folder": str(job.folder)}
                say(f"  {topo}: ERROR {exc}")
            finally:
                job.stop()
                swept = cleanup(job)
                say(f"  {topo}: stopped; {swept} queues and exchanges deleted")
    finally:
        if node is not None:
            node.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    single = results.get("single", {}).get("root_cpu_per_1000_updates")
    for topo, r in results.items():
        root = r.get("root_cpu_per_1000_updates")
        if topo != "single" and single and root:
            r["root_cpu_ratio_vs_single"] = single / root
    headline = "edges" if "edges" in results else next((t for t in results if t != "single"), "")
    ratio = results.get(headline, {}).get("root_cpu_ratio_vs_single")
    result = {
        "benchmark": "scale",
        "broker": "private node" if node is not None else BROKER.amqp_url.rpartition("@")[2],
        "broker_sockets": {"total": s0[0], "used_before": s0[1]} if s0 else None,
        "workers_asked": want,
        "workers": workers,
        "processes": processes,
        "buffer": args.buffer,
        "root_buffer": args.root_buffer or args.buffer,
        "root_cpu_ratio_of": headline or None,  # the topology root_cpu_ratio compares with single
        "model_params": sum(t.numel() for t in app.build_model(0).parameters()),
        "heartbeat_s": args.heartbeat,
        "topologies": results,
        "root_cpu_ratio": ratio,
        "target_3x_holds": (ratio >= 3.0) if ratio is not None else None,
        "notes": notes,
        "machine": machine(),
        "kept": str(tmp) if args.keep else None,
    }
    rows = [
        ("workers (connections mid-window)", "workers", "fleet_connections"),
        ("updates measured", "updates_measured", None),
        ("window s", "window_s", None),
        ("updates applied /s", "updates_per_s", None),
        ("versions /s", "versions_per_s", None),
        ("updates per version (root --buffer)", "root_buffer", None),
        ("root CPU s / 1000 updates", "root_cpu_per_1000_updates", None),
        ("root CPU ratio single / this", "root_cpu_ratio_vs_single", None),
        ("edges' CPU s / 1000 updates", "edge_cpu_per_1000_updates", None),
        ("coordinator CPU s / 1000 updates", "coordinator_cpu_per_1000_updates", None),
        ("broker CPU s / 1000 updates", "broker_cpu_per_1000_updates", None),
        ("worker CPU ms / update", "worker_cpu_ms_per_update", None),
        ("RSS MiB / 100 replicas", "rss_per_100_replicas_mib", None),
        ("seconds to first task", "seconds_to_first_task", None),
    ]

    def cell(topo: str, key: str, extra: str | None) -> Any:
        r = results.get(topo, {})
        if "skipped" in r or "error" in r:
            return "skipped" if "skipped" in r else "error"
        return f"{r.get(key)} ({r.get(extra)})" if extra else r.get(key)

    say(f"\nscale: {workers} workers, K={args.buffer}, 100k-parameter model")
    say(
        table(
            ["figure", *topologies], [[label, *(cell(t, k, e) for t in topologies)] for label, k, e in rows]
        )
    )
    for topo in topologies:
        if results.get(topo, {}).get("rejected_by_reason"):
            say(f"{topo}: rejected {results[topo]['rejected_by_reason']}")
    for topo, r in results.items():
        if "root_cpu_ratio_vs_single" in r:
            mark = " (target >= 3)" if topo == headline else ""
            say(f"root CPU ratio single / {topo}: {r['root_cpu_ratio_vs_single']:.3g}{mark}")
    for note in notes:
        say(f"note: {note}")
    emit(result, args.json)
    sys.exit(0)


if __name__ == "__main__":
    main()
