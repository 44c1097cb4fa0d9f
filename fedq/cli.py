"""The ``fedq`` command: one entry point, a subcommand per process, plus ``run``.

Parse flags, build ``Settings`` (flags override ``FEDQ_*`` variables), call the
service. Errors that reach here print one line and exit with their code.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from shared.errors import ConfigError, FedqError
from shared.logs import configure_logging
from shared.settings import Settings, env_name

Flag = tuple[str, str, Any, str]  # flag, settings field, type, help

COMMON: list[Flag] = [
    ("--amqp-url", "amqp_url", str, "RabbitMQ URL (default amqp://guest:guest@127.0.0.1:5672/)"),
    ("--namespace", "namespace", str, "prefix of every exchange and queue name (default fedq)"),
    ("--job", "job", str, "job id: letters, digits, - and _ (default 'default')"),
    ("--store", "store", str, "model store: a local directory or s3://bucket/prefix (default .fedq/store)"),
    ("--keys-dir", "keys_dir", str, "where this process keeps its key pair (default .fedq/keys)"),
    ("--trusted-keys", "trusted_keys", str, "directory of trusted *.pub keys (default <keys-dir>/trusted)"),
    (
        "--coordinator-key",
        "coordinator_key",
        str,
        "the coordinator's public key to pin (default <keys-dir>/coordinator.pub)",
    ),
    ("--key-file", "key_file", str, "this process's private key file (created on first start)"),
    ("--out", "out", str, "job folder for metrics, ledger and state (default .fedq/jobs/<job>)"),
    ("--app", "app", str, "the app as module:object (default fedq.apps.mnist1d:app)"),
    ("--log-level", "log_level", str, "debug, info, warning or error (default info)"),
    # S3 keys only through the environment (FEDQ_S3_ACCESS_KEY, FEDQ_S3_SECRET_KEY): flags show in ps
    ("--s3-endpoint", "s3_endpoint", str, "S3 endpoint URL, e.g. http://127.0.0.1:9000 (default: AWS)"),
    ("--s3-region", "s3_region", str, "S3 region (default: AWS_DEFAULT_REGION, else us-east-1)"),
]
DATA: list[Flag] = [
    ("--alpha", "alpha", float, "Dirichlet label-skew concentration; smaller is more skewed (default 0.5)"),
    ("--partition-seed", "partition_seed", int, "seed of the data split (default 42)"),
    (
        "--partition-file",
        "partition_file",
        str,
        "JSON list of index lists, one per worker, instead of Dirichlet",
    ),
]
JOB: list[Flag] = [
    ("--mode", "mode", str, "async (FedBuff) or sync (FedAvg rounds) (default async)"),
    ("--capabilities", "capabilities", str, "capabilities the job hands tasks to (default cpu)"),
    (
        "--concurrency",
        "concurrency",
        int,
        "tasks in flight per capability; 0 = one per live worker (default 0)",
    ),
    (
        "--target-accuracy",
        "target_accuracy",
        float,
        "stop when test accuracy reaches this; 0 = never (default 0.85)",
    ),
    ("--max-versions", "max_versions", int, "stop after this many versions; 0 = no limit"),
    ("--max-updates", "max_updates", int, "stop after this many applied updates; 0 = no limit"),
    ("--max-seconds", "max_seconds", float, "stop after this many seconds (default 300)"),
    ("--task-ttl", "task_ttl", float, "seconds a task may wait and run before it expires (default 120)"),
    ("--round-timeout", "round_timeout", float, "sync mode: round deadline in seconds (default 60)"),
    ("--local-epochs", "local_epochs", int, "local epochs per task (default 5)"),
    ("--batch-size", "batch_size", int, "local batch size (default 32)"),
    ("--optimizer", "optimizer", str, "local optimizer: sgd or adam (default sgd)"),
    ("--lr", "lr", float, "local learning rate (default 0.05)"),
    ("--momentum", "momentum", float, "local SGD momentum (default 0.9)"),
    ("--quant", "quant", str, "update encoding: int8 or none (default int8)"),
    ("--block", "block", int, "values per int8 quantization block (default 256)"),
    (
        "--inline-limit",
        "inline_limit",
        int,
        "models up to this many bytes travel inside the task (default 1 MiB)",
    ),
    ("--model-seed", "model_seed", int, "seed of version 0 (default 0)"),
    (
        "--worker-timeout",
        "worker_timeout",
        float,
        "seconds without a heartbeat before a worker counts as gone (default 10)",
    ),
    (
        "--min-workers",
        "min_workers",
        int,
        "hand out no task and open no round until this many live workers (any capability) have said "
        "hello; the job's clock starts at the first task (default 1; fedq run: --workers, or more when "
        "workers started elsewhere will join)",
    ),
    (
        "--min-workers-wait",
        "min_workers_wait",
        float,
        "seconds after the job's start to stop waiting for --min-workers and start with the workers "
        "there are, with a warning (default 120)",
    ),
]
POLICY: list[Flag] = [
    ("--buffer", "buffer", int, "FedBuff: updates per version, K (default 10; 1 = FedAsync)"),
    ("--server-lr", "server_lr", float, "server learning rate eta (default 1.0)"),
    ("--staleness", "staleness", str, "constant, polynomial[:a] or hinge[:a,b] (default polynomial:0.5)"),
    ("--max-staleness", "max_staleness", int, "reject updates staler than this many versions (default 20)"),
    ("--max-norm", "max_norm", float, "reject updates whose L2 norm exceeds this (default: no bound)"),
]
WORKER: list[Flag] = [
    (
        "--capability",
        "capability",
        str,
        "capabilities this worker serves, e.g. cpu or cpu,lowmem (default cpu)",
    ),
    ("--partition", "partition", str, "which share of the data this worker holds, I/N (default 0/1)"),
    ("--worker-id", "worker_id", str, "stable worker id (default <hostname>-p<I>)"),
    ("--delay", "delay", float, "simulated extra seconds per task, for straggler experiments (default 0)"),
    ("--threads", "threads", int, "torch threads for local training (default 1)"),
    (
        "--replicas",
        "replicas",
        int,
        "simulated workers in this process, each with its own identity, connection and partition "
        "I..I+M-1 (default 1)",
    ),
    ("--heartbeat-interval", "heartbeat_interval", float, "seconds between heartbeats (default 2)"),
    (
        "--outbox",
        "outbox",
        str,
        "directory of trained updates awaiting the broker's confirm (default <keys-dir>/../outbox/<worker-id>)",
    ),
]


def _add(parser: argparse.ArgumentParser, flags: list[Flag], title: str) -> None:
    group = parser.add_argument_group(title)
    for flag, dest, typ, help_text in flags:
        group.add_argument(flag, dest=dest, type=typ, default=None, help=f"{help_text} [{env_name(dest)}]")


def _given(args: argparse.Namespace, field: str, env: Any = None) -> bool:
    """Was this setting chosen, by its flag or its FEDQ_* variable (rather than left to its default)?"""
    env = os.environ if env is None else env
    return getattr(args, field, None) is not None or env_name(field) in env


def _settings(args: argparse.Namespace) -> Settings:
    fields = set(Settings.__dataclass_fields__)
    return Settings.from_env(**{k: v for k, v in vars(args).items() if k in fields})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedq",
        description=(
            "Asynchronous federated learning over RabbitMQ. Workers train on private data and "
            "send signed, int8-quantized updates; the aggregator folds them in with "
            "staleness-weighted FedAvg. Every flag can also be set as a FEDQ_* variable."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run a whole job on this machine: aggregator, coordinator and N workers",
        description="Declare the topology, start the aggregator, the coordinator and N workers as "
        "processes against the broker, show progress, stop at the target and write a run folder "
        "with summary.json, metrics.jsonl, ledger.jsonl and every process's log. The coordinator "
        "waits for all N workers to say hello (--min-workers) before the first task, so the job's "
        "clock starts when the fleet is up.",
    )
    run.add_argument("--workers", type=int, default=10, help="worker processes to start (default 10)")
    run.add_argument(
        "--delay-profile",
        default="",
        help="simulated extra seconds per task per worker, e.g. 0.2*12,1.0*5,5.0*3 (counts must add up to --workers)",
    )
    run.add_argument(
        "--no-progress", action="store_true", help="print plain progress lines instead of a live display"
    )
    run.add_argument(
        "--chaos",
        nargs="?",
        type=float,
        const=5.0,
        default=0.0,
        metavar="SECONDS",
        help="once the job has started (its first task), kill a random worker every SECONDS (default 5) and "
        "restart it later, and kill the aggregator once; the summary reports the audit balance",
    )
    run_common = [
        f for f in COMMON if f[1] not in ("keys_dir", "trusted_keys", "coordinator_key", "key_file")
    ]
    for flags, title in (
        (run_common, "connection and files"),
        (JOB, "the job"),
        (POLICY, "aggregation"),
        (DATA, "data"),
    ):
        _add(run, flags, title)

    coord = sub.add_parser(
        "coordinator",
        help="run the coordinator of a job",
        description="Create version 0, wait for --min-workers workers to say hello, hand out tasks, "
        "evaluate each version, stop at the target.",
    )
    for flags, title in ((COMMON, "connection and files"), (JOB, "the job")):
        _add(coord, flags, title)

    agg = sub.add_parser(
        "aggregator",
        help="run the aggregator of a job",
        description="Verify, screen and fold updates into new versions. Start two for a hot standby.",
    )
    _add(agg, COMMON, "connection and files")
    _add(agg, [f for f in JOB if f[1] in ("mode", "capabilities")], "the job")
    _add(agg, POLICY, "aggregation")

    work = sub.add_parser(
        "worker",
        help="run a worker that trains on its share of the data",
        description="Consume tasks for the given capabilities, train off the event loop, send signed updates.",
    )
    _add(work, COMMON, "connection and files")
    _add(work, WORKER, "this worker")
    _add(work, DATA, "data")

    aud = sub.add_parser(
        "audit",
        help="check that every update of a job was applied exactly once or rejected",
        description="Reconcile the version manifests, the update log stream and the aggregator's ledger. "
        "Exits 0 when balanced, 1 when an update is lost or applied twice, or the version chain is broken.",
    )
    aud.add_argument("target", metavar="RUN_OR_JOB", help="a run folder (from fedq run) or a job id")
    aud.add_argument("--json", action="store_true", help="print the balance as one JSON object")
    aud.add_argument(
        "--no-log", action="store_true", help="skip reading the update log stream from the broker"
    )
    _add(aud, [f for f in COMMON if f[1] in ("amqp_url", "namespace", "store", "out")], "where the job lives")

    log = sub.add_parser(
        "log",
        help="show the update log of a job: who sent what, when, and what became of it",
        description="Read the update log stream from an offset with a consumer of its own (the live job is "
        "not disturbed) and show each update: offset, time, task, worker, base version, staleness, samples, "
        "update norm, size, signature, and its fate from the ledger.",
    )
    log.add_argument("target", metavar="RUN_OR_JOB", help="a run folder (from fedq run) or a job id")
    log.add_argument(
        "--from",
        dest="offset",
        default="first",
        help="first, last, next, an offset, an ISO time, or an age such as 30m or 2h (default first)",
    )
    log.add_argument("--worker", help="only this worker's updates")
    log.add_argument("--task", help="only the task whose id starts with this")
    log.add_argument("--versions", help="only updates applied in (or based on) versions A:B")
    log.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    _add(
        log, [f for f in COMMON if f[1] in ("amqp_url", "namespace", "store", "out", "trusted_keys")], "where"
    )

    replay = sub.add_parser(
        "replay", help="re-derive stored versions from the log, or re-aggregate under another policy"
    )
    rsub = replay.add_subparsers(dest="replay_command", required=True, metavar="ACTION")
    verify = rsub.add_parser(
        "verify",
        help="re-derive versions from their parent and logged updates and compare sha256",
        description="Exits 1 and names the version when a re-derived version differs from the stored one, "
        "a stored model is corrupt, or a logged update was altered or is missing.",
    )
    verify.add_argument("target", metavar="RUN_OR_JOB")
    which = verify.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", type=int, help="one version")
    which.add_argument("--all", action="store_true", help="every stored version")
    verify.add_argument("--json", action="store_true", help="one JSON object per version")
    _add(
        verify,
        [f for f in COMMON if f[1] in ("amqp_url", "namespace", "store", "out", "trusted_keys")],
        "where",
    )
    whatif = rsub.add_parser(
        "what-if",
        help="re-aggregate a finished job's updates under another policy and plot it against the original",
        description="Replays the applied updates in their original order under the given policy (unset "
        "knobs keep the original's), evaluates each new version on the test set, prints both curves and "
        "writes a PNG to the run folder. With no changes it reproduces the original versions exactly.",
    )
    whatif.add_argument("target", metavar="RUN_OR_JOB")
    whatif.add_argument("--json", action="store_true", help="print the curves as one JSON object")
    whatif.add_argument("--plot-dir", help="where to write the PNG (default: the run folder)")
    _add(whatif, [f for f in POLICY if f[1] not in ("mode", "capabilities")], "the policy to try")
    _add(whatif, [f for f in COMMON if f[1] in ("amqp_url", "namespace", "store", "out", "app")], "where")

    declare = sub.add_parser(
        "declare",
        help="declare the broker topology and exit",
        description="Declare every exchange and queue (idempotent); fails clearly on a conflicting declaration.",
    )
    _add(declare, COMMON[:1] + COMMON[1:2], "connection")
    _add(declare, [f for f in JOB if f[1] == "capabilities"], "the job")
    _add_dlq(sub)
    _add_model(sub)
    return parser


def _range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    try:
        return (int(lo) if lo else 0, int(hi) if hi else 1 << 62) if sep else (int(lo), int(lo))
    except ValueError:
        raise ConfigError(f"bad version range {text!r}: use A:B, A: or :B") from None


def _add_dlq(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fedq dlq list | show | requeue``: the dead-letter queue, read and put back (fedq/dlq.py)."""
    dlq = sub.add_parser(
        "dlq",
        help="list, show and requeue dead-lettered messages",
        description="Look into the namespace's dead-letter queue (<namespace>.dead): why each message died, "
        "where it came from and what it is; then send fixed ones back. list and show leave every message "
        "in place (read without ack and handed back in order; each comes back marked redelivered).",
    )
    actions = dlq.add_subparsers(dest="dlq_action", required=True, metavar="ACTION")
    connection = [f for f in COMMON if f[1] in ("amqp_url", "namespace")]

    listing = actions.add_parser(
        "list",
        help="one line per dead letter, and a count per reason",
        description="List every dead letter: position, reason (fedq's x-fedq-reason, else the broker's "
        "x-first-death-reason such as expired or delivery_limit), source queue, message kind and task id "
        "(read from the envelope, signature not verified), size and time.",
    )
    listing.add_argument("--reason", help="only show dead letters with this reason, e.g. stale or expired")
    listing.add_argument(
        "--json", action="store_true", help="print one JSON object: total, by_reason, messages"
    )
    _add(listing, connection, "connection")

    show = actions.add_parser(
        "show",
        help="one dead letter in full: headers, envelope fields, detail",
        description="Show one dead letter: every header (x-death included), the reason's detail text and the "
        "envelope's kind, signer and fields (the payload only by its size). Nothing is verified or changed.",
    )
    show.add_argument("position", type=int, metavar="N", help="its position, as `fedq dlq list` shows it")
    show.add_argument("--json", action="store_true", help="print it as one JSON object")
    _add(show, connection, "connection")

    requeue = actions.add_parser(
        "requeue",
        help="send dead letters back to the queue they died in",
        description="Publish each chosen message's original body straight to its source queue (a task queue "
        "or the updates queue) without the dead-letter headers and x-death, and remove it from the "
        "dead-letter queue once the broker has confirmed the copy. Messages from an unknown source are "
        "skipped and stay. Fix the cause first, or they die again. Exits 1 if a publish failed.",
    )
    requeue.add_argument(
        "positions", type=int, nargs="*", metavar="N", help="positions, as `fedq dlq list` shows them"
    )
    requeue.add_argument("--all", action="store_true", help="every dead letter whose source is known")
    requeue.add_argument("--reason", help="every dead letter with this reason, e.g. stale")
    requeue.add_argument(
        "--dry-run", action="store_true", help="print what would be requeued; change nothing"
    )
    _add(requeue, connection, "connection")


def _dlq_request(args: argparse.Namespace) -> Any:
    from fedq.dlq import Choice, Request

    choice = None
    if args.dlq_action == "requeue":
        choice = Choice(all=args.all, reason=args.reason, positions=tuple(args.positions))
    return Request(
        args.dlq_action,
        reason=getattr(args, "reason", None),
        position=getattr(args, "position", 0),
        choice=choice,
        dry_run=getattr(args, "dry_run", False),
        as_json=getattr(args, "json", False),
    )


def _add_model(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fedq model list | show | export | verify | rollback``: a job's stored versions (fedq/models.py)."""
    model = sub.add_parser(
        "model",
        help="list, show, export and verify stored versions; roll a job back to an earlier one",
        description="Work on a job's stored model versions. RUN_OR_JOB is a run folder (from fedq run) or a "
        "job id with --store and --out.",
    )
    actions = model.add_subparsers(dest="model_action", required=True, metavar="ACTION")
    where = [
        f
        for f in COMMON
        if f[1]
        in ("amqp_url", "namespace", "store", "s3_endpoint", "s3_region", "out", "keys_dir", "trusted_keys")
    ]

    def action(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=help_text, description=description)
        parser.add_argument("target", metavar="RUN_OR_JOB", help="a run folder (from fedq run) or a job id")
        return parser

    listing = action(
        "list",
        "every version: parent, time, updates, staleness, sha256, size, accuracy",
        "One line per stored version: parent, creation time, updates applied, mean staleness, sha256 "
        "prefix, size, the test accuracy from the job's metrics.jsonl when known, and rollbacks.",
    )
    listing.add_argument("--json", action="store_true", help="one JSON object per version")
    show = action(
        "show", "one version's full manifest and metrics", "Print a version's manifest and metrics."
    )
    show.add_argument("version", type=int, metavar="N")
    show.add_argument("--json", action="store_true", help="one JSON object: manifest and metrics")
    export = action(
        "export",
        "write a version as a PyTorch state dict file",
        "Write version N as torch.save(state_dict): load it with model.load_state_dict(torch.load(FILE)). "
        "The model's sha256 is checked against its manifest first.",
    )
    export.add_argument("version", type=int, metavar="N")
    export.add_argument("file", metavar="FILE")
    verify = action(
        "verify",
        "check every stored version's model against its manifest's sha256 and size",
        "Recompute the sha256 of every stored model and compare it with its manifest (and a rollback "
        "version with the version it restores). Exits 1 and names each failing version.",
    )
    verify.add_argument("--json", action="store_true", help="one JSON object per version")
    back = action(
        "rollback",
        "make the job continue from an earlier version",
        "Store version L+1 (L = the latest) with version N's model, parent L and no updates; record it in "
        "the aggregator's ledger (<out>/ledger.jsonl) and announce it on the models exchange, signed with "
        "<keys-dir>/operator.key (created on first use). A running coordinator adopts it and hands out "
        "tasks on it, a running aggregator folds on from it. For a run folder the operator key is added to "
        "the run's trusted keys; elsewhere enrol operator.pub in the coordinator's trusted keys first.",
    )
    back.add_argument(
        "--to", dest="version", type=int, required=True, metavar="N", help="the version to restore"
    )
    back.add_argument(
        "--no-announce", action="store_true", help="store and record only (no broker): for a stopped job"
    )
    back.add_argument("--json", action="store_true", help="print the result as one JSON object")
    for parser in (listing, show, export, verify, back):
        _add(parser, where, "where the job lives")


def _model_request(args: argparse.Namespace) -> Any:
    from fedq.models import Request

    return Request(
        args.model_action,
        args.target,
        version=getattr(args, "version", None),
        path=getattr(args, "file", ""),
        as_json=getattr(args, "json", False),
        announce=not getattr(args, "no_announce", False),
    )


def _run_async(factory: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run a service; SIGTERM and SIGINT cancel it cleanly."""

    async def main() -> Any:
        task = asyncio.create_task(factory())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            return await task
        except asyncio.CancelledError:
            return None

    return asyncio.run(main())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
        configure_logging(settings.log_level, settings.log_json)
        if args.command == "run":
            from fedq.run import run_job

            return run_job(
                settings,
                args.workers,
                args.delay_profile,
                progress=not args.no_progress,
                chaos_every=args.chaos,
                min_workers=settings.min_workers if _given(args, "min_workers") else None,
            )
        if args.command == "coordinator":
            from coordinator.service import serve as serve_coordinator
            from shared.app import load_app

            app = load_app(settings.app)
            _run_async(lambda: serve_coordinator(settings, app))
            return 0
        if args.command == "aggregator":
            from aggregator.service import serve as serve_aggregator

            _run_async(lambda: serve_aggregator(settings))
            return 0
        if args.command == "worker":
            from shared.app import load_app
            from worker.service import serve as serve_worker

            app = load_app(settings.app)
            _run_async(lambda: serve_worker(settings, app))
            return 0
        if args.command == "audit":
            import json

            from fedq.audit import audit, render, settings_for

            result = asyncio.run(audit(settings_for(args.target, settings), read_log=not args.no_log))
            print(json.dumps(result.to_dict()) if args.json else render(result))
            return 0 if result.ok else 1
        if args.command in ("log", "replay"):
            from fedq import replay as rp
            from fedq.audit import settings_for
            from fedq.streams import parse_offset

            job_settings = settings_for(args.target, settings)
            if args.command == "log":
                versions = _range(args.versions) if args.versions else None
                return asyncio.run(
                    rp.show_log(
                        job_settings, parse_offset(args.offset), args.worker, args.task, versions, args.json
                    )
                )
            if args.replay_command == "verify":
                return asyncio.run(rp.run_verify(job_settings, None if args.all else args.version, args.json))
            from shared.app import load_app

            overrides = {
                "k": args.buffer,
                "server_lr": args.server_lr,
                "staleness": args.staleness,
                "max_staleness": args.max_staleness,
                "max_norm": args.max_norm,
            }
            plot_dir = Path(args.plot_dir) if args.plot_dir else None
            return asyncio.run(
                rp.run_what_if(job_settings, overrides, load_app(job_settings.app), args.json, plot_dir)
            )
        if args.command == "declare":
            from fedq.run import declare_only

            asyncio.run(declare_only(settings))
            print(f"topology declared under namespace {settings.namespace!r}")
            return 0
        if args.command == "dlq":
            from fedq.dlq import run as run_dlq

            output, code = asyncio.run(run_dlq(settings, _dlq_request(args)))
            print(output)
            return code
        if args.command == "model":
            from fedq.audit import settings_for
            from fedq.models import run as run_model

            return asyncio.run(run_model(settings_for(args.target, settings), _model_request(args)))
    except FedqError as exc:
        print(f"fedq: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into head, less...: not an error
        sys.stderr.close()
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
