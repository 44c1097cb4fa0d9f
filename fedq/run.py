"""``fedq run``: a whole job on one machine, each service its own process, all through the broker."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aggregator.config import AggregatorConfig
from broker_config.permissions import BrokerRole
from broker_config.topology import topology
from coordinator.config import CoordinatorConfig
from fedq.audit import audit
from fedq.broker import Account, login_flags, management_for, run_accounts
from fedq.keys import create_key, enrol, init, run_key_file
from fedq.progress import Progress
from fedq.summary import build_summary
from shared import metrics
from shared.app import load_app
from shared.codec import check_message_cap
from shared.errors import BrokerError, ConfigError, FedqError
from shared.files import private_dir, write_atomic
from shared.ledger import JsonLines
from shared.redact import public
from shared.settings import CONNECTION, Settings, env_name, env_only_settings, flags
from shared.store import ModelStore, open_store
from shared.transport.connect import connected


def parse_delay_profile(text: str, workers: int) -> list[float]:
    """``"0.2*12,1.0*5,5.0*3"`` -> one delay per worker; an empty profile means no delay."""
    if not text.strip():
        return [0.0] * workers
    delays: list[float] = []
    for part in text.split(","):
        value, _, count = part.strip().partition("*")
        try:
            d, n = float(value), int(count) if count else 1
        except ValueError:
            raise ConfigError(f"bad delay profile entry {part!r}: use SECONDS*COUNT, e.g. 0.2*12") from None
        if d < 0 or n < 1:
            raise ConfigError(f"bad delay profile entry {part!r}: seconds >= 0 and count >= 1")
        delays.extend([d] * n)
    if len(delays) != workers:
        raise ConfigError(f"delay profile {text!r} describes {len(delays)} workers, --workers is {workers}")
    return delays


def prepare_keys(run_dir: Path, worker_ids: list[str]) -> Path:
    """The run's keys, laid out as an operator would (``fedq keys``): the operator's, the coordinator's
    and the aggregator's public keys in their role folders of ``keys/trusted``, each worker enrolled
    under its id (no worker enrols itself). Each private key is in a folder of its own, mode 0700,
    that only its process is pointed at (``fedq.keys.run_key_file``): ``keys/coordinator/``,
    ``keys/aggregator/``, ``keys/operator/``, ``keys/workers/<id>/``."""
    keys = run_dir / "keys"
    trusted = keys / "trusted"
    init(keys, trusted, key_file=run_key_file)
    private_dir(keys / "workers")
    for wid in worker_ids:
        path = run_key_file(keys, f"worker-{wid}")
        private_dir(path.parent)
        signer, _ = create_key(path)
        enrol(trusted, wid, signer.public)
    return keys


async def declare_only(settings: Settings, purge: bool = False) -> None:
    async with connected(settings, "fedq-declare") as transport:
        names = transport.names
        await transport.declare(topology(names, settings.capability_list, shards=settings.shards))
        if purge:
            edges = [names.partials_queue] if settings.shards else []
            for i in range(settings.shards):
                edges += [names.shard_queue(i), names.edge_inbox(i)]
            for queue in [names.task_queue(c) for c in settings.capability_list] + [names.updates_queue, *edges]:
                await transport.purge(queue)


def _env(settings: Settings, run_dir: Path, keys: Path) -> dict[str, str]:
    """The environment of every process of the run: none of the caller's ``FEDQ_*`` variables, but the
    run's connection settings and its environment-only ones (S3 keys among them: flags show in ps)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDQ_") or k == "FEDQ_DATA_DIR"}
    values: dict[str, Any] = {
        f.setting: getattr(settings, f.setting) for f in flags("run") if f.group == CONNECTION
    }
    values.update({name: getattr(settings, name) for name in env_only_settings()})
    values.update(keys_dir=str(keys), trusted_keys=str(keys / "trusted"), out=str(run_dir), log_json="true")
    env.update({env_name(k): str(v) for k, v in values.items() if v is not None})
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")  # many processes share the cores: no oversubscription
    return env


def _public(settings: Settings) -> dict[str, Any]:
    """The settings fit for a file on disk: no secrets (the fields kept out of repr), and no URL
    with its password (``--amqp-url``, ``--management-url``: the tools take it from their own)."""
    return public({f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.repr})


def _flags(settings: Settings, command: str) -> list[str]:
    """The run's own job settings that ``command`` takes, as its flags (``fedq run`` and ``command``
    share them in the schema); connection settings travel in the environment instead."""
    run = {f.setting for f in flags("run")}
    out = []
    for f in flags(command):
        value = getattr(settings, f.setting)
        if f.setting in run and f.group != CONNECTION and value is not None:
            if f.value_type is bool:  # a switch: on or left out
                out += [f.name] if value else []
            else:
                out += [f.name, str(value)]
    return out


def edge_names(shards: int) -> list[str]:
    """The run's edge aggregators' process names, one per shard (``--shards``)."""
    return [f"edge-{i}" for i in range(shards)]


def service_role(name: str) -> str:
    """Whose key and broker login a run's process uses: an edge aggregator's are the aggregator's."""
    return "aggregator" if name.startswith("edge-") else name


def check_metrics_ports(base: int, workers: int) -> None:
    """``--metrics-port P`` gives the run P and its processes the ports after it: all must be ports."""
    last = base + 2 + workers  # the run, the aggregator, the coordinator, each worker
    if base and not (base > 0 and last <= 65535):
        raise ConfigError(
            f"--metrics-port {base}: the run and its {workers + 2} processes take ports {base}-{last}, "
            "which must lie within 1-65535 (0: no metrics)"
        )


async def latest_epsilon(settings: Settings) -> float | None:
    """Epsilon after the newest stored version of the run's job (``None``: none, or no DP)."""
    store = ModelStore(open_store(settings.store, settings), settings.job)
    latest = await store.latest()
    return None if latest is None else (await store.manifest(latest)).dp_epsilon


class Launcher:
    """Starts, restarts and stops the processes of one run; every process logs to ``<run>/logs``."""

    def __init__(self, settings: Settings, run_dir: Path, keys: Path) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self.keys = keys
        self.env = _env(settings, run_dir, keys)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.args: dict[str, list[str]] = {}
        self.restarts: Counter[str] = Counter()
        self.logins: dict[str, list[str]] = {}  # per process: the flags of its own broker user
        # --metrics-port P: the run's own endpoint on P, each process its own on P+1, P+2, ... in
        # the order they first start (a restarted process keeps its port); 0: none
        self.metrics_base = settings.metrics_port
        self.ports: dict[str, int] = {}
        self.env.pop(env_name("metrics_port"), None)
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.run_dir / "logs" / f"{name}.log").open("ab")
        port = self.metrics_port(name)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedq.cli",
                *args,
                *self.key_flags(name),
                *self.logins.get(service_role(name), []),
                *(["--metrics-port", str(port)] if port else []),
            ],
            env=self.env,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        self.procs[name] = proc
        self.args[name] = args
        self.write_pids()
        return proc

    def key_flags(self, name: str) -> list[str]:
        """``--key-file`` of the process ``name``: its own key, in its own folder (``prepare_keys``);
        an edge aggregator's is the aggregator's."""
        role = service_role(name)
        process = role if role in ("aggregator", "coordinator") else f"worker-{name}"
        return ["--key-file", str(run_key_file(self.keys, process))]

    def metrics_port(self, name: str) -> int:
        """The port the process ``name`` serves its metrics on (0: none)."""
        if not self.metrics_base:
            return 0
        return self.ports.setdefault(name, self.metrics_base + len(self.ports) + 1)

    def restart(self, name: str) -> subprocess.Popen[bytes]:
        self.restarts[name] += 1
        metrics.RUN_RESTARTS.labels(self.settings.job, name).inc()
        return self.start(name, self.args[name])

    def wait(self, name: str, seconds: float) -> bool:
        """Wait up to ``seconds`` for the process ``name`` to end, returning as soon as it does; has it?"""
        try:
            self.procs[name].wait(seconds)
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    def write_pids(self) -> None:
        """``processes.json``: each process by name, its pid and its metrics port (0: none)."""
        listed = {name: {"pid": p.pid, "metrics_port": self.ports.get(name, 0)} for name, p in self.procs.items()}
        write_atomic(self.run_dir / "processes.json", (json.dumps(listed, indent=2) + "\n").encode())

    def start_worker(self, worker_id: str, index: int, count: int, delay: float) -> subprocess.Popen[bytes]:
        s = self.settings
        return self.start(
            worker_id,
            [
                "worker",
                "--worker-id",
                worker_id,
                "--partition",
                f"{index}/{count}",
                "--delay",
                str(delay),
                "--amqp-first",  # a cluster's nodes (--amqp-url lists them) take the workers in turn
                str(index),
                "--capability",
                s.capabilities,
                *_flags(s, "worker"),
            ],
        )

    def supervise(self, name: str, max_restarts: int = 5) -> None:
        """Restart a job service that was killed or crashed; a configuration error (exit 2) is fatal."""
        proc = self.procs[name]
        rc = proc.poll()
        if rc is None:
            return
        log = f"{self.run_dir}/logs/{name}.log"
        if rc == 2 or self.restarts[name] >= max_restarts:
            raise FedqError(f"the {name} exited with code {rc}; see {log}")
        print(f"fedq: the {name} exited with code {rc}; restarting it", flush=True)
        self.restart(name)

    def stop_all(self, grace: float = 5.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Chaos:
    """For humans checking the guarantees: kill a random worker every ``every`` seconds and bring
    it back a few seconds later; kill the aggregator once, and each edge aggregator once (``edges``, from
    1.5 x ``every`` on, before the aggregator). Every act goes to ``chaos.jsonl``."""

    def __init__(
        self, launcher: Launcher, worker_ids: list[str], every: float, seed: int = 0, edges: Sequence[str] = ()
    ) -> None:
        self.launcher = launcher
        self.worker_ids = worker_ids
        self.every = every
        self.rng = random.Random(seed)
        self.started = time.monotonic()
        self.next_kill = self.started + every
        self.down: dict[str, float] = {}
        self.aggregator_at = self.started + 2.5 * every
        self.aggregator_killed = 0
        # the edges one after another, half ``every`` apart, from 1.5 x every: all of them while a
        # short job still runs
        self.edges_at = {name: self.started + (1.5 + 0.5 * i) * every for i, name in enumerate(edges)}
        self.edges_killed = 0
        self.workers_killed = 0
        self.log = JsonLines(launcher.run_dir / "chaos.jsonl")

    def step(self) -> None:
        now = time.monotonic()
        for wid, back in list(self.down.items()):
            if now >= back:
                del self.down[wid]
                self.launcher.restart(wid)
                self.log.write({"t": time.time(), "event": "worker_restarted", "worker": wid})
        if now >= self.next_kill:
            self.next_kill = now + self.every
            alive = [w for w in self.worker_ids if w not in self.down]
            if len(alive) > 1:
                wid = self.rng.choice(alive)
                self.launcher.kill(wid)
                self.down[wid] = now + self.rng.uniform(2.0, 3.0 * self.every)
                self.workers_killed += 1
                self.log.write({"t": time.time(), "event": "worker_killed", "worker": wid})
        if not self.aggregator_killed and now >= self.aggregator_at:
            self.launcher.kill("aggregator")  # the supervisor restarts it
            self.aggregator_killed += 1
            self.log.write({"t": time.time(), "event": "aggregator_killed"})
        for name, at in list(self.edges_at.items()):
            if now >= at:
                del self.edges_at[name]
                self.launcher.kill(name)  # the supervisor restarts it; its updates wait in its shard's queue
                self.edges_killed += 1
                self.log.write({"t": time.time(), "event": "edge_killed", "edge": name})

    def summary(self) -> dict[str, int]:
        killed = {"workers_killed": self.workers_killed, "aggregator_killed": self.aggregator_killed}
        return killed | ({"edges_killed": self.edges_killed} if self.edges_killed else {})


def run_pids(run_dir: Path) -> dict[str, int]:
    """The pid of each process ``processes.json`` lists, by name."""
    listed = json.loads((run_dir / "processes.json").read_text())
    return {name: int(entry["pid"]) for name, entry in listed.items()}


def job_started(run_dir: Path) -> bool:
    """Has the coordinator handed out its first task (its state file has ``t0``)?"""
    try:
        return json.loads((run_dir / "coordinator.json").read_text()).get("t0") is not None
    except (OSError, ValueError):
        return False


def new_run_dir(settings: Settings) -> Path:
    if settings.out:
        return Path(settings.out)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{settings.mode}"


def run_job(
    settings: Settings,
    workers: int,
    delay_profile: str = "",
    progress: bool = True,
    chaos_every: float = 0.0,
    min_workers: int | None = None,
) -> int:
    """``min_workers``: live workers the coordinator waits for before the first task; ``None``
    (not chosen): all ``workers``, so the job's clock starts when the fleet is up."""
    if workers < 1:
        raise ConfigError("--workers must be at least 1")
    need = workers if min_workers is None else min_workers  # more: workers started elsewhere join
    delays = parse_delay_profile(delay_profile, workers)
    # a bad policy flag stops us here, not in a child a while later
    AggregatorConfig.from_settings(Settings(**{**settings.__dict__, "tier": "root" if settings.shards else "single"}))
    CoordinatorConfig.from_settings(settings)
    check_message_cap(settings.max_message_bytes, settings.inline_limit)  # before any folder is made
    check_metrics_ports(settings.metrics_port, workers + settings.shards)
    run_dir = new_run_dir(settings)
    if (run_dir / "summary.json").exists():
        raise ConfigError(f"{run_dir} already holds a finished run; choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    job = settings.job if settings.job != "default" else run_dir.name.replace(".", "-")
    home = run_dir.resolve()  # tools like fedq audit find everything from config.json, from any directory
    store = settings.store if settings.store != Settings.store else str(home / "store")
    settings = Settings(
        **{
            **settings.__dict__,
            "job": job,
            "store": store,
            "out": str(home),
            "keys_dir": str(home / "keys"),
            "trusted_keys": str(home / "keys" / "trusted"),
            "min_workers": need,
        }
    )
    worker_ids = [f"w{i:02d}" for i in range(workers)]
    keys = prepare_keys(run_dir, worker_ids)
    app = load_app(settings.app)
    prepare = getattr(app, "prepare", None)
    if callable(prepare):
        prepare()  # e.g. generate the data set once instead of once per worker
    asyncio.run(declare_only(settings, purge=True))
    (run_dir / "config.json").write_text(
        json.dumps(
            {"settings": _public(settings), "workers": workers, "delays": delays}, indent=2, default=str
        )
    )

    launcher = Launcher(settings, run_dir, keys)
    metrics.serve(settings.metrics_port, "run", settings.metrics_host)  # a port in use stops the run before any process starts
    accounts = run_accounts(settings, keys / "broker", worker_ids)
    if accounts is not None:
        launcher.logins = {
            a.user.worker_id or str(a.user.role): login_flags(a, settings.amqp_url)
            for a in accounts
            if a.user.role is not BrokerRole.OBSERVER
        }
        # the processes' environment holds no administrator's login: each has its own
        launcher.env[env_name("amqp_url")] = Account.anonymous_url(settings.amqp_url)
        for secret in ("amqp_password", "amqp_password_file"):
            launcher.env.pop(env_name(secret), None)
    started = time.time()
    print(f"fedq: run folder {run_dir}", flush=True)
    chaos: Chaos | None = None
    try:
        services = ["coordinator", "aggregator", *edge_names(settings.shards)]
        tier = ["--tier", "root"] if settings.shards else []
        launcher.start("aggregator", ["aggregator", *tier, *_flags(settings, "aggregator")])
        for shard, name in enumerate(edge_names(settings.shards)):
            edge = ["--tier", "edge", "--shard", str(shard)]
            launcher.start(name, ["aggregator", *edge, *_flags(settings, "aggregator")])
        launcher.start("coordinator", ["coordinator", *_flags(settings, "coordinator")])
        for i, (wid, delay) in enumerate(zip(worker_ids, delays, strict=True)):
            launcher.start_worker(wid, i, workers, delay)
        display = Progress(run_dir, settings, live=progress and sys.stdout.isatty())
        with display:
            while launcher.procs["coordinator"].poll() != 0:
                for name in services:
                    launcher.supervise(name)
                if chaos_every > 0 and chaos is None and job_started(run_dir):
                    # the job, not the fleet's start-up
                    chaos = Chaos(launcher, worker_ids, chaos_every, edges=edge_names(settings.shards))
                if chaos is not None:
                    chaos.step()
                display.update()
                launcher.wait("coordinator", 0.5)  # back at once when it ends: the stop starts then
            display.update()
    finally:
        launcher.stop_all()
        if accounts is not None:  # the run's own accounts end with it
            try:
                ended = [a.user.name for a in accounts if a.user.role is not BrokerRole.OBSERVER]  # the namespace's
                management_for(settings).delete_users(ended)
            except BrokerError as exc:
                print(f"fedq: the run's broker users are left on the broker: {exc}", flush=True)
    wall = time.time() - started
    state_path = run_dir / "coordinator.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    summary = build_summary(run_dir, state, workers, wall)
    summary["mode"] = settings.mode  # the coordinator tops fedasync's tasks up as async's
    if settings.dp_clip is not None:  # what every version made cost, evaluated or not
        summary["dp_epsilon"] = asyncio.run(latest_epsilon(settings))
    summary["restarts"] = dict(launcher.restarts)
    if chaos is not None:
        summary["chaos"] = chaos.summary()
    balance = asyncio.run(audit(settings))
    (run_dir / "audit.json").write_text(json.dumps(balance.to_dict(), indent=2) + "\n")
    summary["audit"] = {k: v for k, v in balance.to_dict().items() if k != "per_worker"}
    summary["run_dir"] = str(run_dir)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)
    print(
        f"fedq: {summary['stop_reason']}; final accuracy {summary['final_accuracy']}; run folder {run_dir}",
        flush=True,
    )
    return 0
