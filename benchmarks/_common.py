"""Helpers shared by the benchmark scripts: flags, tables, the machine, synthetic models, cleanup.

Benchmarks are not tests: they print figures and never fail CI. Every script accepts
``--json`` (one JSON object as the last line of output) and ``--quick``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import torch

from broker_config.names import Names
from broker_config.topology import topology
from shared.codec import encode, open_envelope, task_token
from shared.messages import Task, TrainConfig, Update
from shared.quantize import DEFAULT_BLOCK, encode_delta
from shared.signing import Keyring, Role, Signer
from shared.store import Manifest, ModelStore, model_key
from shared.tensors import FlatModel

ROOT = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("FEDQ_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
SIZES = {"100k": 100_000, "1M": 1_000_000, "10M": 10_000_000}


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--quick", action="store_true", help="a smaller, faster smoke run")
    return p


def machine() -> dict[str, Any]:
    """Where and when the figures were taken: they mean little without it."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024**2, 1)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "mem_gib": mem_gib,
        "cpu": cpu,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "code": CODE_AT_START,
    }


def code_version() -> str:
    """The commit measured, and whether library files differed from it (others edit concurrently)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    changed = [line[3:] for line in status.splitlines() if not line[3:].startswith("benchmarks/")]
    return head + (f" + uncommitted changes in {len(changed)} files" if changed else "")


CODE_AT_START = code_version()  # what this process imported (others commit while benchmarks run)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain fixed-width table; floats get 4 significant digits (no exponent above 1000)."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
        return str(v)

    body = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(lines)


def emit(result: dict[str, Any], as_json: bool) -> None:
    """The JSON object goes last, on one line, so that ``tail -1`` finds it."""
    if as_json:
        print(json.dumps(result, default=str), flush=True)


def say(*parts: Any) -> None:
    print(*parts, flush=True)


def quantiles(values: Sequence[float]) -> dict[str, float | None]:
    """min / p50 / p99 / max of a sample (None when empty)."""
    if not values:
        return {"min": None, "p50": None, "p99": None, "max": None}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"min": ordered[0], "p50": statistics.median(ordered), "p99": pick(0.99), "max": ordered[-1]}


def synthetic_state(n_params: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict of exactly ``n_params`` float parameters in several tensors of awkward sizes
    (none a multiple of the 256-value quantization block), plus one int64 buffer as a real
    BatchNorm has. Shapes scale with ``n_params``; values are small, like a model's."""
    g = torch.Generator().manual_seed(seed)
    rows = max(3, (n_params * 45 // 100) // 63)  # an embedding with an odd width
    emb = rows * 63
    a = max(3, int((n_params * 35 // 100) ** 0.5) | 1)  # a square-ish odd matrix
    b = max(3, (n_params * 35 // 100) // a)
    lin = a * b
    head = max(1, (n_params - emb - lin - 2 * a - 97) // 2)
    rest = n_params - emb - lin - 2 * a - head - 97
    shapes: dict[str, tuple[int, ...]] = {
        "embed.weight": (rows, 63),
        "fc1.weight": (a, b),
        "fc1.bias": (a,),
        "norm.weight": (a,),
        "head.weight": (head,),
        "head.bias": (97,),
        "out.weight": (rest,),
    }
    state = {name: torch.randn(shape, generator=g) * 0.05 for name, shape in shapes.items()}
    state["norm.num_batches_tracked"] = torch.tensor(12, dtype=torch.int64)
    assert sum(t.numel() for t in state.values() if t.is_floating_point()) == n_params
    return state


def synthetic_delta(n_float: int, n_exact: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A plausible delta: small Gaussian steps with a heavier tail in a few places."""
    g = torch.Generator().manual_seed(seed)
    floats = torch.randn(n_float, generator=g) * 1e-3
    floats[:: max(1, n_float // 1000)] *= 20.0  # a few large coordinates, as real deltas have
    return floats, torch.full((n_exact,), 5, dtype=torch.int64)


def trust(coordinator: Signer, workers: dict[str, Signer], aggregators: Sequence[Signer] = ()) -> Keyring:
    """A trust set as a deployment lays it out: the coordinator's key, the aggregators' keys and
    each worker key enrolled under its worker id (a key trusted in no role is no key at all)."""
    ring = Keyring()
    ring.add(coordinator.public, Role.COORDINATOR)
    for key in aggregators:
        ring.add(key.public, Role.AGGREGATOR)
    for worker_id, key in workers.items():
        ring.add(key.public, Role.WORKER, worker_id=worker_id)
    return ring


def worker_keys(count: int, prefix: str = "w") -> dict[str, Signer]:
    """``count`` worker ids, each with a key of its own (a worker key may speak only for its id)."""
    return {f"{prefix}{i:02d}": Signer.generate() for i in range(count)}


def signed_task(
    coordinator: Signer,
    job_id: str,
    *,
    task_id: str | None = None,
    base_version: int = 0,
    incarnation: str = "",
    max_samples: int = 0,
    model_sha256: str = "0" * 64,
    train: TrainConfig | None = None,
) -> tuple[Task, bytes]:
    """A task as the coordinator issues it (the model by reference, not inline), signed by
    ``coordinator``: the task and the token an update answering it carries."""
    task = Task(
        task_id=task_id or uuid.uuid4().hex,
        job_id=job_id,
        capability="cpu",
        base_version=base_version,
        model_sha256=model_sha256,
        model_key=model_key(job_id, base_version),
        train=train or TrainConfig(epochs=1, batch_size=32),
        quant="int8",
        block=DEFAULT_BLOCK,
        deadline=time.time() + 3600,
        issued_at=time.time(),
        incarnation=incarnation,
        max_samples=max_samples,
    )
    return task, task_token(open_envelope(encode(task, coordinator)))


async def save_v0(store: ModelStore, model: FlatModel, coordinator: Signer, incarnation: str) -> Manifest:
    """Store ``model`` as version 0 of the store's job, signed by the coordinator, with a known
    incarnation (the one the benchmark's tasks carry)."""
    blob = model.to_bytes()
    manifest = dataclasses.replace(Manifest.first(store.job_id, blob, time.time()), incarnation=incarnation)
    manifest = manifest.signed_by(coordinator)
    await store.save(manifest, blob)
    return manifest


def signed_updates(
    model: FlatModel,
    count: int,
    workers: dict[str, Signer],
    coordinator: Signer,
    job_id: str,
    incarnation: str = "",
) -> list[bytes]:
    """``count`` real signed int8 updates on version 0, each answering a task of its own that the
    coordinator signed (with the job's ``incarnation``), each signed by its worker's key (two
    distinct payloads, alternating: quantizing a 10M delta takes seconds, signing does not)."""
    spec = model.spec
    sha = hashlib.sha256(model.to_bytes()).hexdigest()
    payloads = []
    for seed in (1, 2):
        floats, exact = synthetic_delta(spec.n_float, spec.n_exact, seed)
        payloads.append(
            encode_delta(floats, exact, spec, "int8", DEFAULT_BLOCK, torch.Generator().manual_seed(seed))
        )
    ids = sorted(workers)
    out = []
    for i in range(count):
        task, token = signed_task(coordinator, job_id, incarnation=incarnation, model_sha256=sha)
        worker_id = ids[i % len(ids)]
        update = Update(
            task_id=task.task_id,
            job_id=job_id,
            worker_id=worker_id,
            base_version=0,
            num_samples=320 + i % 7,
            quant="int8",
            block=DEFAULT_BLOCK,
            metrics={"train_loss": 0.5},
            sent_at=time.time(),
            task=token,
            delta=payloads[i % 2],
        )
        out.append(encode(update, workers[worker_id]))
    return out


def rss_kib(pid: int) -> int | None:
    """Resident memory of a live process (``VmRSS``), None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (from /proc/<pid>/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def broker_pid() -> int | None:
    """The RabbitMQ node's Erlang VM, to report the broker's CPU next to ours (None if not visible)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            if cmd and cmd[0].endswith(b"beam.smp") and any(b"rabbit" in c for c in cmd):
                return int(proc.name)
    return None


async def delete_namespace(
    names: Names,
    capabilities: tuple[str, ...] = ("cpu",),
    job_ids: Sequence[str] = (),
    extra_queues: Sequence[str] = (),
    amqp_url: str = AMQP_URL,
) -> None:
    """Delete every queue and exchange a benchmark (or a ``fedq run`` under this namespace) declared."""
    topo = topology(names, capabilities)
    jobs = [topology(names.for_job(j), capabilities) for j in job_ids]
    queues = (
        [q.name for q in topo.queues]
        + [q.name for t in jobs for q in t.queues]
        + [names.for_job(j).coordinator_queue for j in job_ids]
        + list(extra_queues)
    )
    conn = await aio_pika.connect(amqp_url, client_properties={"connection_name": "bench-cleanup"})
    try:
        for name in queues:
            ch = await conn.channel()
            with contextlib.suppress(Exception):
                await ch.queue_delete(name)
            if not ch.is_closed:
                await ch.close()
        for ex in topo.exchanges:
            ch = await conn.channel()
            with contextlib.suppress(Exception):
                await ch.exchange_delete(ex.name)
            if not ch.is_closed:
                await ch.close()
    finally:
        await conn.close()


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(fields[:8]) - idle) / hz, sum(fields[:8]) / hz


class CpuAccount:
    """Who used the CPU during a run: the whole machine, a set of processes (sampled, so processes
    that come and go are counted up to their last sample), and the broker."""

    def __init__(self) -> None:
        self.broker = broker_pid()
        self.busy0, self.total0 = machine_cpu()
        self.broker0 = cpu_seconds(self.broker) if self.broker else None
        self.seen: dict[int, tuple[float, float]] = {}  # pid -> (first, last) CPU seconds
        self.t0 = time.monotonic()

    def sample(self, pids: Iterable[int]) -> None:
        for pid in pids:
            c = cpu_seconds(pid)
            if c is not None:
                first = self.seen.get(pid, (0.0, c))[0]  # processes we start are counted from 0
                self.seen[pid] = (first, c)

    def used(self, pid: int) -> float:
        """CPU seconds ``pid`` used while sampled (0 if never seen)."""
        first, last = self.seen.get(pid, (0.0, 0.0))
        return last - first

    def result(self) -> dict[str, Any]:
        busy1, total1 = machine_cpu()
        wall = time.monotonic() - self.t0
        cores = os.cpu_count() or 1
        ours = sum(last - first for first, last in self.seen.values())
        b1 = cpu_seconds(self.broker) if self.broker else None
        broker = b1 - self.broker0 if b1 is not None and self.broker0 is not None else None
        busy = busy1 - self.busy0
        return {
            "wall_s": wall,
            "machine_busy_share": busy / max(total1 - self.total0, 1e-9),
            "machine_busy_cores": busy / wall,
            "ours_cores": ours / wall,
            "broker_cores": broker / wall if broker is not None else None,
            "others_cores": (busy - ours - (broker or 0.0)) / wall,
            "cores": cores,
        }


def fedq_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedq.cli", *args]


def run_fedq(
    args: Sequence[str], log: Path, timeout: float, run_dir: Path | None = None
) -> tuple[int, dict[str, Any]]:
    """Run ``fedq ...`` as a subprocess, output to ``log``; return its exit code (-9: killed on
    timeout) and the CPU account of the run (its processes from ``<run_dir>/processes.json``)."""
    account = CpuAccount()
    with log.open("w") as fh:
        proc = subprocess.Popen(
            fedq_cmd(*args), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT
        )
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            pids = [proc.pid]
            if run_dir is not None:
                with contextlib.suppress(OSError, ValueError):
                    pids += [int(p["pid"]) for p in read_json(run_dir / "processes.json").values()]
            account.sample(pids)
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(1.0)
        code = proc.wait()
    return (-9 if code < 0 else code), account.result()


def read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if isinstance(rec, dict):
                out.append(rec)
    return out


class Stopwatch:
    """Wall and CPU time (this thread) of a block, in seconds."""

    def __enter__(self) -> Stopwatch:
        self.wall0, self.cpu0 = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.thread_time() - self.cpu0
