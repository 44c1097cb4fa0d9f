"""One typed settings object, built from ``FEDQ_*`` environment variables and flags.

Every field ``name`` is read from ``FEDQ_<NAME>``; command-line flags override
the environment. Every knob has a default that works on a laptop.

This is also the one schema of fedq's command line: each field says, in its
metadata, either which flag sets it (help text, group, the commands that offer
it) or why it is read from the environment only. ``fedq`` builds its flags from
:func:`flags`; ``fedq run`` hands its processes their settings by the same rules.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from shared.amqp_urls import split_urls
from shared.errors import ConfigError

# -- the command-line face of a setting ---------------------------------------------------------

# Flag groups, in the order help shows them.
CONNECTION = "connection and files"
JOB = "the job"
POLICY = "aggregation"
WORKER = "this worker"
DATA = "data"
GROUPS = (CONNECTION, JOB, POLICY, WORKER, DATA)

# Commands as ``fedq`` spells them (an action after its command: "replay verify").
SERVICES = ("coordinator", "aggregator", "worker")
PROCESSES = ("run", *SERVICES)
MODEL = tuple(f"model {a}" for a in ("list", "show", "export", "verify", "rollback"))
DLQ = tuple(f"dlq {a}" for a in ("list", "show", "requeue"))
KEYS = tuple(f"keys {a}" for a in ("init", "create", "enrol", "revoke", "list", "rotate"))
BROKER = ("broker apply",)
READERS = ("audit", "log", "replay verify", "replay what-if", *MODEL, "status", "dashboard")  # tools that read a job's files
EVERYWHERE = (*PROCESSES, *READERS, "declare", *DLQ, *BROKER)

_CLI = "fedq.cli"
_ENV_ONLY = "fedq.env_only"
_REPEATS = "fedq.repeats"


def cli(group: str, commands: Iterable[str], help_text: str, *, repeats: bool = False) -> dict[str, Any]:
    """Field metadata: the setting has a flag in ``group`` of every command in ``commands``;
    ``repeats``: the flag may be given several times, its values making one comma list."""
    return {_CLI: (group, tuple(commands), help_text), **({_REPEATS: True} if repeats else {})}


def env_only(why: str) -> dict[str, Any]:
    """Field metadata: the setting deliberately has no flag, only its ``FEDQ_*`` variable."""
    return {_ENV_ONLY: why}


@dataclass(frozen=True)
class Settings:
    # where things are
    amqp_url: str = field(
        default="amqp://guest:guest@127.0.0.1:5672/",
        metadata=cli(
            CONNECTION,
            EVERYWHERE,
            "RabbitMQ URL, amqp:// or amqps:// (default amqp://guest:guest@127.0.0.1:5672/). For a cluster, "
            "the nodes' URLs: the flag repeated, or a comma list (FEDQ_AMQP_URL too); a process connects "
            "to the first that answers and, when the link is lost, to the next ones in turn. For fedq worker "
            "--replicas, {worker} in it (and in --amqp-password-file, --amqp-cert, --amqp-key) stands for "
            "each replica's worker id: each logs in as its own broker user",
            repeats=True,
        ),
    )
    amqp_first: int = field(
        default=0,
        metadata=cli(
            CONNECTION,
            SERVICES,
            "which URL of the --amqp-url list to try first, counted from 0 (modulo the list's length); "
            "the others follow in turn. fedq run gives its i-th worker i, spreading the workers over "
            "a cluster's nodes (default 0)",
        ),
    )
    amqp_password_file: str = field(
        default="",
        metadata=cli(
            CONNECTION,
            EVERYWHERE,
            "file holding the password of the broker user named in --amqp-url (keep it 0600): the "
            "password then stays out of ps, config.json and logs",
        ),
    )
    amqp_password: str = field(default="", repr=False, metadata=env_only("a secret: flags show in ps"))
    amqp_ca: str = field(
        default="",
        metadata=cli(
            CONNECTION,
            EVERYWHERE,
            "CA certificate (PEM) that the broker's TLS certificate must chain to, for amqps:// URLs "
            "(default: the system's CAs)",
        ),
    )
    amqp_cert: str = field(
        default="",
        metadata=cli(
            CONNECTION,
            EVERYWHERE,
            "client certificate (PEM) to show the broker over amqps://; with no user in --amqp-url, fedq "
            "logs in as the certificate's CN (EXTERNAL) (default none)",
        ),
    )
    amqp_key: str = field(
        default="",
        metadata=cli(CONNECTION, EVERYWHERE, "private key (PEM) of --amqp-cert (default none)"),
    )
    max_message_bytes: int = field(
        default=16 * 1024 * 1024,
        metadata=cli(
            CONNECTION,
            EVERYWHERE,
            "largest message in bytes fedq publishes or accepts, checked before anything is unpacked; "
            "larger ones are dead-lettered as too_large. At least --inline-limit plus 65 KiB, at most the "
            "broker's max_message_size (default 16 MiB, as broker_config/rabbitmq.conf sets it)",
        ),
    )
    broker_users: str = field(
        default="auto",
        metadata=cli(
            CONNECTION,
            ("run",),
            "run each process as a broker user of its role (coordinator, aggregator, observer, one "
            "user per worker), made through the management API by the --amqp-url user: on, off, or "
            "auto (on when the management API answers) (default auto)",
        ),
    )
    management_url: str = field(
        default="",  # default: http://<the --amqp-url host>:15672/
        metadata=cli(
            CONNECTION,
            ("run", *BROKER),
            "RabbitMQ management API; its login is the --amqp-url user's (default http://<the --amqp-url "
            "host>:15672/)",
        ),
    )
    broker_identity: str = field(
        default="check",
        metadata=cli(
            CONNECTION,
            ("run", "coordinator", "aggregator"),
            "the broker user that published a worker's update or hello (its user_id, which the broker "
            "checks): check (when a message names a fedq account, it must be that worker's own) or "
            "require (and a message must name one; use it when every worker has its own broker user) "
            "(default check; fedq run with broker users: require)",
        ),
    )
    namespace: str = field(
        default="fedq",
        metadata=cli(CONNECTION, EVERYWHERE, "prefix of every exchange and queue name (default fedq)"),
    )
    job: str = field(
        default="default",
        metadata=cli(
            CONNECTION,
            (*PROCESSES, *BROKER),
            "job id: letters, digits, - and _ (default 'default'). Jobs in one namespace never see each "
            "other's tasks or updates; a worker may take several jobs of its app: --job a,b",
        ),
    )
    store: str = field(
        default=".fedq/store",
        metadata=cli(
            CONNECTION,
            (*PROCESSES, *READERS),
            "model store: a local directory or s3://bucket/prefix (default .fedq/store). A worker "
            "uses it only for a task without presigned URLs (an S3 store's coordinator presigns "
            "them); --store none: no store at all, nor its credentials",
        ),
    )
    # S3 store (--store s3://bucket/prefix); empty = botocore's own AWS_* settings. Keys: environment only
    s3_endpoint: str = field(
        default="",  # e.g. http://127.0.0.1:9000 for MinIO
        metadata=cli(
            CONNECTION,
            (*PROCESSES, *MODEL),
            "S3 endpoint URL, e.g. http://127.0.0.1:9000 (default: AWS)",
        ),
    )
    s3_region: str = field(
        default="",
        metadata=cli(
            CONNECTION,
            (*PROCESSES, *MODEL),
            "S3 region (default: AWS_DEFAULT_REGION, else us-east-1)",
        ),
    )
    s3_access_key: str = field(default="", repr=False, metadata=env_only("a secret: flags show in ps"))
    s3_secret_key: str = field(default="", repr=False, metadata=env_only("a secret: flags show in ps"))
    keys_dir: str = field(
        default=".fedq/keys",
        metadata=cli(
            CONNECTION,
            (*SERVICES, *MODEL, *KEYS, *BROKER),
            "where this process keeps its key pair (default .fedq/keys)",
        ),
    )
    trusted_keys: str = field(
        default="",  # default: <keys_dir>/trusted
        metadata=cli(
            CONNECTION,
            (*SERVICES, "log", "replay verify", *MODEL, *KEYS, *BROKER),
            "the trust directory: public keys by role (coordinator/, aggregator/, operator/, workers/<id>.pub) and the revoked list, as fedq keys lays it out (default <keys-dir>/trusted)",
        ),
    )
    out: str = field(
        default="",  # job folder for metrics and ledgers; default: .fedq/jobs/<job>
        metadata=cli(
            CONNECTION,
            (*PROCESSES, *READERS),
            "job folder for metrics, ledger and state (default .fedq/jobs/<job>)",
        ),
    )
    app: str = field(
        default="fedq.apps.mnist1d:app",
        metadata=cli(
            CONNECTION,
            (*PROCESSES, "replay what-if"),
            "the app as module:object (default fedq.apps.mnist1d:app)",
        ),
    )
    log_level: str = field(
        default="info",
        metadata=cli(CONNECTION, PROCESSES, "debug, info, warning or error (default info)"),
    )
    metrics_port: int = field(
        default=0,
        metadata=cli(
            CONNECTION,
            PROCESSES,
            "serve Prometheus metrics at http://127.0.0.1:PORT/metrics (fedq_* series; default 0: off). "
            "fedq run: its own on PORT, then one port each, in order, for the aggregator, the "
            "coordinator and every worker, listed in the run's processes.json",
        ),
    )
    metrics_host: str = field(
        default="127.0.0.1",
        metadata=cli(
            CONNECTION,
            PROCESSES,
            "the address --metrics-port listens on (default 127.0.0.1: this machine only); 0.0.0.0 for a "
            "Prometheus elsewhere, such as compose's prometheus service",
        ),
    )
    log_json: bool | None = field(
        default=None,
        metadata=env_only("how the process writes its log; fedq run and compose set it for their processes"),
    )
    amqp_heartbeat: int = field(
        default=15, metadata=env_only("a deployment knob for flaky links, not a per-job choice")
    )
    # data partition (the app reads these)
    alpha: float = field(
        default=0.5,
        metadata=cli(
            DATA,
            ("run", "worker"),
            "Dirichlet label-skew concentration; smaller is more skewed (default 0.5)",
        ),
    )
    partition_seed: int = field(
        default=42, metadata=cli(DATA, ("run", "worker"), "seed of the data split (default 42)")
    )
    partition_file: str = field(
        default="",
        metadata=cli(
            DATA, ("run", "worker"), "JSON list of index lists, one per worker, instead of Dirichlet"
        ),
    )
    # coordinator
    mode: str = field(
        default="async",
        metadata=cli(
            JOB,
            ("run", "coordinator", "aggregator"),
            "async (FedBuff), sync (FedAvg rounds) or fedasync (FedAsync: each update mixed in as "
            "x <- (1 - a_t) x + a_t x_local, a_t = --fedasync-alpha x s(tau)) (default async)",
        ),
    )
    capabilities: str = field(
        default="cpu",
        metadata=cli(
            JOB,
            ("run", "coordinator", "aggregator", "declare", *BROKER),
            "capabilities the job hands tasks to (default cpu)",
        ),
    )
    concurrency: int = field(
        default=0,
        metadata=cli(
            JOB,
            ("run", "coordinator"),
            "tasks in flight per capability; 0 = one per live worker (default 0)",
        ),
    )
    target_accuracy: float = field(
        default=0.85,
        metadata=cli(
            JOB,
            ("run", "coordinator"),
            "stop when test accuracy reaches this; 0 = never (default 0.85)",
        ),
    )
    max_versions: int = field(
        default=0,
        metadata=cli(JOB, ("run", "coordinator"), "stop after this many versions; 0 = no limit"),
    )
    max_updates: int = field(
        default=0,
        metadata=cli(JOB, ("run", "coordinator"), "stop after this many applied updates; 0 = no limit"),
    )
    max_seconds: float = field(
        default=300.0,
        metadata=cli(
            JOB,
            ("run", "coordinator"),
            "stop this many seconds after the job's first task, not counting the wait for the "
            "fleet; 0 = no limit (default 300)",
        ),
    )
    task_ttl: float = field(
        default=120.0,
        metadata=cli(
            JOB,
            ("run", "coordinator"),
            "seconds a task may wait and run before it expires (default 120)",
        ),
    )
    round_timeout: float = field(
        default=60.0,
        metadata=cli(JOB, ("run", "coordinator"), "sync mode: round deadline in seconds (default 60)"),
    )
    worker_timeout: float = field(
        default=10.0,
        metadata=cli(
            JOB,
            ("run", "coordinator"),
            "seconds without a heartbeat before a worker counts as gone (default 10)",
        ),
    )
    min_workers: int = field(
        default=1,  # live workers (any capability) before the first task; fedq run: --workers
        metadata=cli(
            JOB,
            ("run", "coordinator"),
            "hand out no task and open no round until this many live workers (any capability) have said "
            "hello; the job's clock starts at the first task (default 1; fedq run: --workers, or more when "
            "workers started elsewhere will join)",
        ),
    )
    min_workers_wait: float = field(
        default=120.0,  # seconds after the job's start to stop waiting for them
        metadata=cli(
            JOB,
            ("run", "coordinator"),
            "seconds after the job's start to stop waiting for --min-workers and start with the workers "
            "there are, with a warning (default 120)",
        ),
    )
    max_samples: int = field(
        default=0,  # 0: a fair share of the app's training set, when the app says its size
        metadata=cli(
            JOB,
            ("run", "coordinator"),
            "the most samples one update may count for, signed into each task: a worker's claim "
            "above it counts as this many (default: a fair share, train set / --min-workers)",
        ),
    )
    local_epochs: int = field(
        default=5, metadata=cli(JOB, ("run", "coordinator"), "local epochs per task (default 5)")
    )
    batch_size: int = field(
        default=32, metadata=cli(JOB, ("run", "coordinator"), "local batch size (default 32)")
    )
    optimizer: str = field(
        default="sgd",
        metadata=cli(JOB, ("run", "coordinator"), "local optimizer: sgd or adam (default sgd)"),
    )
    lr: float = field(
        default=0.05, metadata=cli(JOB, ("run", "coordinator"), "local learning rate (default 0.05)")
    )
    momentum: float = field(
        default=0.9, metadata=cli(JOB, ("run", "coordinator"), "local SGD momentum (default 0.9)")
    )
    weight_decay: float = field(
        default=0.0, metadata=env_only("a rarely tuned optimizer knob; fedq run passes it on")
    )
    prox_mu: float = field(
        default=0.0,
        metadata=cli(
            JOB,
            ("run", "coordinator"),
            "FedProx: the local proximal term (mu/2)||w - w_base||^2 added to each worker's loss "
            "(default 0: none)",
        ),
    )
    dp_local: bool = field(
        default=False,
        metadata=cli(
            JOB,
            ("run", "coordinator", "aggregator"),
            "differential privacy at the worker instead of the aggregator: each worker clips its "
            "update to --dp-clip and adds Gaussian noise --dp-noise x --dp-clip before quantizing it; "
            "the aggregator adds none and reports the worst worker's epsilon",
        ),
    )
    quant: str = field(
        default="int8",
        metadata=cli(JOB, ("run", "coordinator"), "update encoding: int8 or none (default int8)"),
    )
    block: int = field(
        default=256,
        metadata=cli(JOB, ("run", "coordinator"), "values per int8 quantization block (default 256)"),
    )
    inline_limit: int = field(
        default=1024 * 1024,
        metadata=cli(
            JOB,
            ("run", "coordinator"),
            "models up to this many bytes travel inside the task (default 1 MiB)",
        ),
    )
    model_seed: int = field(
        default=0, metadata=cli(JOB, ("run", "coordinator"), "seed of version 0 (default 0)")
    )
    # aggregator
    buffer: int = field(
        default=10,
        metadata=cli(
            POLICY,
            ("run", "aggregator", "replay what-if"),
            "FedBuff: updates per version, K (default 10); --mode fedasync is FedAsync",
        ),
    )
    shards: int = field(
        default=0,
        metadata=cli(
            JOB,
            ("run", "coordinator", "aggregator", "audit", "declare", *BROKER),
            "edge aggregation: spread the job's updates over N shards, each folded by an edge "
            "aggregator (fedq aggregator --tier edge --shard I) into partial aggregates that a root "
            "(--tier root) folds into versions; 0: one aggregator folds every update (default 0)",
        ),
    )
    tier: str = field(
        default="single",
        metadata=cli(
            JOB,
            ("aggregator",),
            "single (fold every update, default), edge (fold one shard's updates, --shard I, into "
            "signed partial aggregates of --buffer updates) or root (fold the edges' partials into "
            "versions of at least --buffer updates); edge and root need --shards",
        ),
    )
    shard: int = field(
        default=0,
        metadata=cli(JOB, ("aggregator",), "--tier edge: the shard this edge folds, 0..N-1 (default 0)"),
    )
    server_lr: float = field(
        default=1.0,
        metadata=cli(
            POLICY, ("run", "aggregator", "replay what-if"), "server learning rate eta (default 1.0)"
        ),
    )
    staleness: str = field(
        default="polynomial:0.5",
        metadata=cli(
            POLICY,
            ("run", "aggregator", "replay what-if"),
            "constant, polynomial[:a] or hinge[:a,b] (default polynomial:0.5)",
        ),
    )
    max_staleness: int = field(
        default=20,
        metadata=cli(
            POLICY,
            ("run", "aggregator", "replay what-if"),
            "reject updates staler than this many versions (default 20)",
        ),
    )
    max_norm: float | None = field(
        default=None,
        metadata=cli(
            POLICY,
            ("run", "aggregator", "replay what-if"),
            "reject updates whose L2 norm exceeds this (default: no bound)",
        ),
    )
    clip: str = field(
        default="adaptive",
        metadata=cli(
            POLICY,
            ("run", "aggregator", "replay what-if"),
            "scale an update whose L2 norm is above a bound down to it: adaptive[:C[,window[,warmup]]] "
            "(C x the median norm of the last window applied updates, once warmup are known; "
            "default adaptive = adaptive:3,50,5), a fixed bound such as 10, or off",
        ),
    )
    robust: str = field(
        default="none",
        metadata=cli(
            POLICY,
            ("run", "aggregator", "replay what-if"),
            "combine the buffer coordinate-wise: none (the weighted mean, default), trimmed-mean:F "
            "(drop the fraction F, 0 <= F < 0.5, of largest and smallest values per coordinate), median, "
            "or cosine (the weighted fold, leaving out updates whose cosine with the coordinate-wise "
            "median is <= 0)",
        ),
    )
    weighting: str = field(
        default="samples",
        metadata=cli(
            POLICY,
            ("run", "aggregator", "replay what-if"),
            "what an update weighs before staleness scaling: samples (its sample count n_i, capped "
            "by --max-samples; default) or uniform (1 for every update, FedBuff's plain mean): "
            "x <- x + eta * sum(n_i s(tau_i) d_i) / sum(n_i), with n_i = 1 under uniform",
        ),
    )
    fedasync_alpha: float = field(
        default=0.6,
        metadata=cli(
            POLICY,
            ("run", "aggregator"),
            "--mode fedasync: the mixing weight a in a_t = a x s(tau) (default 0.6)",
        ),
    )
    server_opt: str = field(
        default="sgd",
        metadata=cli(
            POLICY,
            ("run", "aggregator", "replay what-if"),
            "FedOpt: the server optimizer applied to each buffer's mean delta: sgd (x + eta d, "
            "default), avgm (server momentum), adam or yogi; their state is saved with each version",
        ),
    )
    server_beta1: float = field(
        default=0.9,
        metadata=cli(
            POLICY, ("run", "aggregator", "replay what-if"), "FedOpt's first-moment decay beta1 (default 0.9)"
        ),
    )
    server_beta2: float = field(
        default=0.99,
        metadata=cli(
            POLICY,
            ("run", "aggregator", "replay what-if"),
            "FedOpt's second-moment decay beta2, adam and yogi (default 0.99)",
        ),
    )
    server_tau: float = field(
        default=1e-3,
        metadata=cli(
            POLICY,
            ("run", "aggregator", "replay what-if"),
            "FedOpt's adaptivity tau, adam and yogi: x + eta m / (sqrt(v) + tau) (default 1e-3)",
        ),
    )
    dp_clip: float | None = field(
        default=None,
        metadata=cli(
            POLICY,
            ("run", "aggregator", "coordinator"),
            "differential privacy (DP-FedAvg): clip every update to this L2 norm and weigh each as "
            "one; turns DP on, in place of --clip and --weighting (default: off)",
        ),
    )
    dp_noise: float = field(
        default=1.0,
        metadata=cli(
            POLICY,
            ("run", "aggregator", "coordinator"),
            "DP noise multiplier z > 0: Gaussian noise of std z x --dp-clip on each version's sum of "
            "clipped updates (on each update with --dp-local) (default 1.0)",
        ),
    )
    dp_delta: float = field(
        default=1e-5,
        metadata=cli(
            POLICY,
            ("run", "aggregator", "coordinator"),
            "DP delta of the (epsilon, delta) guarantee reported as dp_epsilon (default 1e-5)",
        ),
    )
    # worker
    capability: str = field(
        default="cpu",
        metadata=cli(
            WORKER, ("worker",), "capabilities this worker serves, e.g. cpu or cpu,lowmem (default cpu)"
        ),
    )
    partition: str = field(
        default="0/1",
        metadata=cli(WORKER, ("worker",), "which share of the data this worker holds, I/N (default 0/1)"),
    )
    worker_id: str = field(
        default="", metadata=cli(WORKER, ("worker",), "stable worker id (default <hostname>-p<I>)")
    )
    delay: float = field(
        default=0.0,
        metadata=cli(
            WORKER, ("worker",), "simulated extra seconds per task, for straggler experiments (default 0)"
        ),
    )
    heartbeat_interval: float = field(
        default=2.0, metadata=cli(WORKER, ("worker",), "seconds between heartbeats (default 2)")
    )
    dp_floor_clip: float | None = field(
        default=None,
        metadata=cli(
            WORKER,
            ("worker",),
            "this worker's own local DP, whatever its tasks ask: clip every update to at most this "
            "L2 norm and add noise of at least --dp-floor-noise x the clip before it leaves (default: "
            "only what the task asks)",
        ),
    )
    dp_floor_noise: float = field(
        default=1.0,
        metadata=cli(
            WORKER, ("worker",), "with --dp-floor-clip: the least noise multiplier this worker adds (default 1.0)"
        ),
    )
    org: str = field(
        default="",
        metadata=cli(
            WORKER,
            ("worker",),
            "the organisation this worker counts under in fedq cost (e.g. hospital-3): its own claim, "
            "sent in its hellos and updates and recorded in the ledger as such (default: none)",
        ),
    )
    threads: int = field(
        default=1,  # torch threads for local training
        metadata=cli(WORKER, ("worker",), "torch threads for local training (default 1)"),
    )
    replicas: int = field(
        default=1,  # simulated workers hosted by one worker process
        metadata=cli(
            WORKER,
            ("worker",),
            "simulated workers in this process, each with its own identity, connection and partition "
            "I..I+M-1 (default 1)",
        ),
    )
    coordinator_key: str = field(
        default="",  # default: <keys_dir>/coordinator.pub
        metadata=cli(
            CONNECTION, SERVICES, "the coordinator's public key to pin (default <keys-dir>/coordinator.pub)"
        ),
    )
    key_file: str = field(
        default="",  # default: <keys_dir>/<process>.key
        metadata=cli(CONNECTION, SERVICES, "this process's private key file (created on first start)"),
    )
    outbox: str = field(
        default="",  # updates awaiting their confirm; default: <keys_dir>/../outbox/<worker_id>
        metadata=cli(
            WORKER,
            ("worker",),
            "directory of trained updates awaiting the broker's confirm "
            "(default <keys-dir>/../outbox/<worker-id>)",
        ),
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Environment first, then explicit overrides (flags); ``None`` overrides are ignored."""
        env = os.environ if env is None else env
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = env_name(f.name)
            if key in env:
                values[f.name] = _parse(env[key], hints[f.name], key)
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown settings {sorted(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    # Derived paths -------------------------------------------------------
    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(".fedq/jobs") / self.job

    @property
    def trusted_dir(self) -> Path:
        return Path(self.trusted_keys) if self.trusted_keys else Path(self.keys_dir) / "trusted"

    def key_path(self, process: str) -> Path:
        return Path(self.key_file) if self.key_file else Path(self.keys_dir) / f"{process}.key"

    @property
    def coordinator_key_path(self) -> Path:
        if self.coordinator_key:
            return Path(self.coordinator_key)
        return Path(self.keys_dir) / "coordinator.pub"

    @property
    def management(self) -> str:
        """``--management-url``, or port 15672 of the broker ``--amqp-url`` names (never another broker's)."""
        if self.management_url:
            return self.management_url
        host = urlsplit(split_urls(self.amqp_url)[0]).hostname or "127.0.0.1"
        return f"http://{f'[{host}]' if ':' in host else host}:15672/"

    @property
    def user_id_required(self) -> bool:
        """``--broker-identity require``."""
        if self.broker_identity not in ("check", "require"):
            raise ConfigError(f"--broker-identity must be check or require, not {self.broker_identity!r}")
        return self.broker_identity == "require"

    @property
    def capability_list(self) -> tuple[str, ...]:
        return split_capabilities(self.capabilities)

    @property
    def aggregator_tier(self) -> str:
        """``--tier``, checked against ``--shards`` and ``--shard``."""
        if self.tier not in ("single", "edge", "root"):
            raise ConfigError(f"--tier must be single, edge or root, not {self.tier!r}")
        if not 0 <= self.shards <= 1024:
            raise ConfigError(f"--shards must be between 0 and 1024, not {self.shards}")
        if self.tier != "single" and not self.shards:
            raise ConfigError(f"--tier {self.tier} needs --shards N: the number of edge aggregators' shards")
        if self.tier == "edge" and not 0 <= self.shard < self.shards:
            raise ConfigError(f"--shard must be between 0 and {self.shards - 1} (--shards {self.shards}), not {self.shard}")
        return self.tier


def split_capabilities(text: str) -> tuple[str, ...]:
    caps = tuple(c.strip() for c in text.split(",") if c.strip())
    if not caps:
        raise ConfigError("at least one capability is needed (e.g. cpu or cpu,lowmem)")
    return caps


def env_name(field_name: str) -> str:
    return "FEDQ_" + field_name.upper()


def known_env_names() -> frozenset[str]:
    return frozenset(env_name(f.name) for f in dataclasses.fields(Settings))


def _parse(text: str, hint: Any, key: str) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if text.strip().lower() in ("", "none", "auto"):
            return None
        hint = _plain(hint)
    try:
        if hint is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if hint in (int, float):
            return hint(text)
    except ValueError:
        raise ConfigError(f"{key}={text!r} is not a valid {hint.__name__}") from None
    return text


# -- the schema, read back ------------------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    """A setting's flag: ``name`` sets ``Settings.<setting>``; not given, ``FEDQ_<SETTING>`` or the
    default decides."""

    setting: str
    value_type: type[Any]  # str, int, float or bool, a switch (``X | None`` is ``X``: None means "not given")
    help: str
    group: str
    commands: tuple[str, ...]
    repeats: bool = False  # given several times, its values make one comma list

    @property
    def name(self) -> str:
        return "--" + self.setting.replace("_", "-")

    @property
    def env(self) -> str:
        return env_name(self.setting)


@functools.cache
def flags(command: str | None = None) -> tuple[Flag, ...]:
    """The flags ``command`` offers (every flag when ``None``): group by group, in field order."""
    hints = typing.get_type_hints(Settings)
    found = []
    for f in dataclasses.fields(Settings):
        if _CLI in f.metadata:
            group, commands, help_text = f.metadata[_CLI]
            if command is None or command in commands:
                found.append(
                    Flag(f.name, _plain(hints[f.name]), help_text, group, commands, _REPEATS in f.metadata)
                )
    return tuple(sorted(found, key=lambda flag: GROUPS.index(flag.group)))


def env_only_settings() -> dict[str, str]:
    """The settings deliberately read from ``FEDQ_*`` variables only, each with the reason."""
    return {f.name: f.metadata[_ENV_ONLY] for f in dataclasses.fields(Settings) if _ENV_ONLY in f.metadata}


def _plain(hint: Any) -> Any:
    """``X | None`` -> ``X``; any other type as it is."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint
