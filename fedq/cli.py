"""The ``fedq`` command: one entry point, a subcommand per process, plus ``run`` and the tools.

Parse flags, build ``Settings`` (flags override ``FEDQ_*`` variables), call the
service or tool, print what it returns. Errors that reach here print one line
and exit with their code.

Every flag that sets a ``Settings`` field comes from the schema in
``shared/settings.py`` (its help, group and the commands that offer it); only a
command's own options (``fedq run --workers``, ``fedq log --from``, ...) are
written here.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import gc
import json
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

from shared.errors import ConfigError, FedqError
from shared.logs import configure_logging
from shared.settings import CONNECTION, POLICY, Settings, env_name, flags

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
TARGET_HELP = "a run folder (from fedq run) or a job id"


def _given(args: argparse.Namespace, field: str, env: Any = None) -> bool:
    """Was this setting chosen, by its flag or its FEDQ_* variable (rather than left to its default)?"""
    env = os.environ if env is None else env
    return getattr(args, field, None) is not None or env_name(field) in env


def _settings(args: argparse.Namespace) -> Settings:
    fields = set(Settings.__dataclass_fields__)
    # a repeated flag (--amqp-url) comes as a list: its values make one comma list
    given: dict[str, Any] = {k: ",".join(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in fields}
    return Settings.from_env(**given)


# -- the parser ---------------------------------------------------------------------------------


def _add_settings(
    parser: argparse.ArgumentParser, command: str, titles: Mapping[str, str] | None = None
) -> None:
    """The flags of every setting ``command`` takes, in their groups (``titles`` renames a group).
    Each defaults to None: not given, the FEDQ_* variable or the field's default decides."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for flag in flags(command):
        title = (titles or {}).get(flag.group, flag.group)
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        if flag.value_type is bool:  # a switch: given, it is on; the variable takes 1/0, yes/no
            groups[title].add_argument(
                flag.name, dest=flag.setting, action="store_const", const=True, default=None,
                help=f"{flag.help} [{flag.env}]",
            )
            continue
        groups[title].add_argument(
            flag.name,
            dest=flag.setting,
            type=flag.value_type,
            default=None,
            action="append" if flag.repeats else "store",
            help=f"{flag.help} [{flag.env}]",
        )


def _command(
    sub: Subparsers,
    command: str,
    help: str,
    description: str | None = None,
    titles: Mapping[str, str] | None = None,
    target: bool = False,
) -> argparse.ArgumentParser:
    """A subcommand (``command`` as the schema names it, e.g. "replay verify") with its settings'
    flags; ``target``: it takes RUN_OR_JOB first."""
    parser = sub.add_parser(command.rpartition(" ")[2], help=help, description=description)
    if target:
        parser.add_argument("target", metavar="RUN_OR_JOB", help=TARGET_HELP)
    _add_settings(parser, command, titles)
    return parser


def _json_flag(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--json", action="store_true", help=help)


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
    _add_run(sub)
    _add_services(sub)
    _add_audit_and_log(sub)
    _add_replay(sub)
    _command(
        sub,
        "declare",
        "declare the broker topology and exit",
        "Declare every exchange and queue (idempotent); fails clearly on a conflicting declaration.",
        titles={CONNECTION: "connection"},
    )
    _add_dlq(sub)
    _add_model(sub)
    _add_keys(sub)
    _add_broker(sub)
    _add_cost(sub)
    _add_status(sub)
    _add_dashboard(sub)
    return parser


def _add_run(sub: Subparsers) -> None:
    run = _command(
        sub,
        "run",
        "run a whole job on this machine: aggregator, coordinator and N workers",
        "Declare the topology, start the aggregator (with --shards S: a root and S edge aggregators), "
        "the coordinator and N workers as "
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
        "restart it later, and kill the aggregator once (and, with --shards, each edge aggregator once); "
        "the summary reports the audit balance",
    )


def _add_services(sub: Subparsers) -> None:
    _command(
        sub,
        "coordinator",
        "run the coordinator of a job",
        "Create version 0, wait for --min-workers workers to say hello, hand out tasks, "
        "evaluate each version, stop at the target.",
    )
    _command(
        sub,
        "aggregator",
        "run the aggregator of a job",
        "Verify, screen and fold updates into new versions. Start two for a hot standby. With --shards N: "
        "--tier edge --shard I folds shard I's updates into signed partial aggregates, --tier root folds "
        "the partials into versions.",
    )
    _command(
        sub,
        "worker",
        "run a worker that trains on its share of the data",
        "Consume tasks for the given capabilities, train off the event loop, send signed updates.",
    )


def _add_audit_and_log(sub: Subparsers) -> None:
    aud = _command(
        sub,
        "audit",
        "check that every update of a job was applied exactly once or rejected",
        "Reconcile the version manifests, the update log stream and the aggregator's ledger. "
        "Exits 0 when balanced, 1 when an update is lost or applied twice, or the version chain is broken.",
        titles={CONNECTION: "where the job lives"},
        target=True,
    )
    _json_flag(aud, "print the balance as one JSON object")
    aud.add_argument(
        "--no-log", action="store_true", help="skip reading the update log stream from the broker"
    )

    log = _command(
        sub,
        "log",
        "show the update log of a job: who sent what, when, and what became of it",
        "Read the update log stream from an offset with a consumer of its own (the live job is "
        "not disturbed) and show each update: offset, time, task, worker, base version, staleness, samples, "
        "update norm, size, signature, and its fate from the ledger.",
        titles={CONNECTION: "where"},
        target=True,
    )
    log.add_argument(
        "--from",
        dest="offset",
        default="first",
        help="first, last, next, an offset, an ISO time, or an age such as 30m or 2h (default first)",
    )
    log.add_argument("--worker", help="only this worker's updates")
    log.add_argument("--task", help="only the task whose id starts with this")
    log.add_argument("--versions", help="only updates applied in (or based on) versions A:B")
    _json_flag(log, "JSON lines instead of a table")


def _add_replay(sub: Subparsers) -> None:
    """``fedq replay verify | what-if``: re-derive stored versions, or re-aggregate (fedq/replay.py)."""
    replay = sub.add_parser(
        "replay", help="re-derive stored versions from the log, or re-aggregate under another policy"
    )
    actions = replay.add_subparsers(dest="replay_command", required=True, metavar="ACTION")
    verify = _command(
        actions,
        "replay verify",
        "re-derive versions from their parent and logged updates and compare sha256",
        "Exits 1 and names the version when a re-derived version differs from the stored one, "
        "a stored model is corrupt, or a logged update was altered or is missing.",
        titles={CONNECTION: "where"},
        target=True,
    )
    which = verify.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", type=int, help="one version")
    which.add_argument("--all", action="store_true", help="every stored version")
    _json_flag(verify, "one JSON object per version")

    whatif = _command(
        actions,
        "replay what-if",
        "re-aggregate a finished job's updates under another policy and plot it against the original",
        "Replays the applied updates in their original order under the given policy (unset "
        "knobs keep the original's), evaluates each new version on the test set, prints both curves and "
        "writes a PNG to the run folder. With no changes it reproduces the original versions exactly.",
        titles={CONNECTION: "where", POLICY: "the policy to try"},
        target=True,
    )
    _json_flag(whatif, "print the curves as one JSON object")
    whatif.add_argument("--plot-dir", help="where to write the PNG (default: the run folder)")


def _range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    try:
        return (int(lo) if lo else 0, int(hi) if hi else 1 << 62) if sep else (int(lo), int(lo))
    except ValueError:
        raise ConfigError(f"bad version range {text!r}: use A:B, A: or :B") from None


def _add_dlq(sub: Subparsers) -> None:
    """``fedq dlq list | show | requeue``: the dead-letter queue, read and put back (fedq/dlq.py)."""
    dlq = sub.add_parser(
        "dlq",
        help="list, show and requeue dead-lettered messages",
        description="Look into the namespace's dead-letter queue (<namespace>.dead): why each message died, "
        "where it came from and what it is; then send fixed ones back. list and show leave every message "
        "in place (read without ack and handed back in order; each comes back marked redelivered).",
    )
    actions = dlq.add_subparsers(dest="dlq_action", required=True, metavar="ACTION")
    connection = {CONNECTION: "connection"}

    listing = _command(
        actions,
        "dlq list",
        "one line per dead letter, and a count per reason",
        "List every dead letter: position, reason (fedq's x-fedq-reason, else the broker's "
        "x-first-death-reason such as expired or delivery_limit), source queue, message kind and task id "
        "(read from the envelope, signature not verified), size and time.",
        titles=connection,
    )
    listing.add_argument("--reason", help="only show dead letters with this reason, e.g. stale or expired")
    _json_flag(listing, "print one JSON object: total, by_reason, messages")

    show = _command(
        actions,
        "dlq show",
        "one dead letter in full: headers, envelope fields, detail",
        "Show one dead letter: every header (x-death included), the reason's detail text and the "
        "envelope's kind, signer and fields (the payload only by its size). Nothing is verified or changed.",
        titles=connection,
    )
    show.add_argument("position", type=int, metavar="N", help="its position, as `fedq dlq list` shows it")
    _json_flag(show, "print it as one JSON object")

    requeue = _command(
        actions,
        "dlq requeue",
        "send dead letters back to the queue they died in",
        "Publish each chosen message's original body straight to its source queue (a task queue "
        "or the updates queue) without the dead-letter headers and x-death, and remove it from the "
        "dead-letter queue once the broker has confirmed the copy. Messages from an unknown source are "
        "skipped and stay. Fix the cause first, or they die again. Exits 1 if a publish failed.",
        titles=connection,
    )
    requeue.add_argument(
        "positions", type=int, nargs="*", metavar="N", help="positions, as `fedq dlq list` shows them"
    )
    requeue.add_argument("--all", action="store_true", help="every dead letter whose source is known")
    requeue.add_argument("--reason", help="every dead letter with this reason, e.g. stale")
    requeue.add_argument(
        "--dry-run", action="store_true", help="print what would be requeued; change nothing"
    )


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


def _add_model(sub: Subparsers) -> None:
    """``fedq model list | show | export | verify | rollback``: a job's stored versions (fedq/models.py)."""
    model = sub.add_parser(
        "model",
        help="list, show, export and verify stored versions; roll a job back to an earlier one",
        description="Work on a job's stored model versions. RUN_OR_JOB is a run folder (from fedq run) or a "
        "job id with --store and --out.",
    )
    actions = model.add_subparsers(dest="model_action", required=True, metavar="ACTION")

    def action(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        return _command(
            actions,
            f"model {name}",
            help_text,
            description,
            titles={CONNECTION: "where the job lives"},
            target=True,
        )

    listing = action(
        "list",
        "every version: parent, time, updates, staleness, sha256, size, accuracy",
        "One line per stored version: parent, creation time, updates applied, mean staleness, sha256 "
        "prefix, size, the test accuracy from the job's metrics.jsonl when known, and rollbacks.",
    )
    _json_flag(listing, "one JSON object per version")
    show = action(
        "show", "one version's full manifest and metrics", "Print a version's manifest and metrics."
    )
    show.add_argument("version", type=int, metavar="N")
    _json_flag(show, "one JSON object: manifest and metrics")
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
    _json_flag(verify, "one JSON object per version")
    back = action(
        "rollback",
        "make the job continue from an earlier version",
        "Store version L+1 (L = the latest) with version N's model, parent L and no updates; record it in "
        "the aggregator's ledger (<out>/ledger.jsonl) and announce it on the models exchange, signed with "
        "<keys-dir>/operator.key (a run folder's keys/operator/operator.key; created on first use). A "
        "running coordinator adopts it and hands out tasks on it, a running aggregator folds on from it. For a run folder the operator key is added to "
        "the run's trusted keys; elsewhere enrol operator.pub in the coordinator's trusted keys first.",
    )
    back.add_argument(
        "--to", dest="version", type=int, required=True, metavar="N", help="the version to restore"
    )
    back.add_argument(
        "--no-announce", action="store_true", help="store and record only (no broker): for a stopped job"
    )
    _json_flag(back, "print the result as one JSON object")


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


def _add_keys(sub: Subparsers) -> None:
    """``fedq keys init | create | enrol | revoke | list | rotate``: keys and the trust directory (fedq/keys.py)."""
    keys = sub.add_parser(
        "keys",
        help="make keys, enrol and revoke workers, rotate the coordinator's or aggregator's key",
        description="The operator's side of fedq's trust: every trusted public key sits in a role folder of the "
        "trust directory (--trusted-keys, default <keys-dir>/trusted): coordinator/, aggregator/, operator/ and "
        "workers/<worker id>.pub, with <trusted>/revoked listing keys never to trust again. The services only "
        "read it and follow every change within a second.",
    )
    actions = keys.add_subparsers(dest="keys_action", required=True, metavar="ACTION")
    where = {CONNECTION: "where the keys live"}

    def action(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        parser = _command(actions, f"keys {name}", help_text, description, titles=where)
        return parser

    init = action(
        "init",
        "make the operator's, coordinator's and aggregator's keys and the trust directory",
        "Make DIR/operator.key, DIR/coordinator.key and DIR/aggregator.key (mode 0600, .pub beside) and the "
        "trust directory (DIR/trusted, or --trusted-keys) with each public key in its role folder as "
        "<fingerprint>.pub. Keys already there are kept: a re-run changes nothing. Prints which file goes "
        "to which machine.",
    )
    init.add_argument(
        "directory", nargs="?", default="", metavar="DIR", help="where to make the keys (default --keys-dir)"
    )
    _json_flag(init, "print what was made as one JSON object")
    create = action(
        "create",
        "make a worker's key pair (on the worker's machine) to send to the operator",
        "Make <keys-dir>/worker-WORKER_ID.key (mode 0600) and its .pub, the key `fedq worker --worker-id "
        "WORKER_ID` signs with; an existing key is kept. Send the .pub to the operator to enrol.",
    )
    create.add_argument("worker", metavar="WORKER_ID")
    _json_flag(create, "print the key's files and fingerprint as one JSON object")
    enrol = action(
        "enrol",
        "trust a worker's public key for its worker id",
        "Write <trusted>/workers/WORKER_ID.pub: the key then speaks for WORKER_ID only. Refuses a revoked key, "
        "a key trusted in another role or for another worker, and a worker id enrolled with another key "
        "(unless --replace). Running services trust it within a second.",
    )
    enrol.add_argument("worker", metavar="WORKER_ID")
    enrol.add_argument("pubkey", metavar="PUBKEY_FILE", help="the worker's Ed25519 public key (PEM)")
    enrol.add_argument(
        "--replace", action="store_true", help="give an enrolled worker id this key instead of its old one"
    )
    _json_flag(enrol, "print the result as one JSON object")
    revoke = action(
        "revoke",
        "never trust a key again: a worker id or a fingerprint",
        "Add the key's fingerprint to <trusted>/revoked (with who and when) and remove every .pub that holds "
        "it, in any role. A fingerprint is revoked even if its file is gone. Running services drop it within "
        "a second.",
    )
    revoke.add_argument("what", metavar="WORKER_ID|FINGERPRINT")
    _json_flag(revoke, "print the result as one JSON object")
    listing = action(
        "list",
        "every trusted key: role, worker id, fingerprint, file; revoked keys and problems",
        "List the trust directory as the services read it, and what they would skip or miss.",
    )
    _json_flag(listing, "print one JSON object: keys, revoked, problems")
    rotate = action(
        "rotate",
        "give the coordinator or the aggregator a new key without stopping the job",
        "Make a new key pair, trust its public key (the role folder) first, then replace "
        "<keys-dir>/ROLE.key atomically: the running service signs with the new key within a second. The old "
        "public key stays trusted, so what it signed still verifies; revoke it when the job no longer needs it.",
    )
    rotate.add_argument("what", metavar="ROLE", choices=["coordinator", "aggregator"])
    _json_flag(rotate, "print the result as one JSON object")


def _keys_request(args: argparse.Namespace) -> Any:
    from fedq.keys import Request

    return Request(
        args.keys_action,
        directory=getattr(args, "directory", ""),
        worker_id=getattr(args, "worker", ""),  # not args.worker_id: that is the --worker-id setting
        pubkey=getattr(args, "pubkey", ""),
        what=getattr(args, "what", ""),
        replace=getattr(args, "replace", False),
        as_json=getattr(args, "json", False),
    )


def _add_cost(sub: Subparsers) -> None:
    """``fedq cost RUN``: what a job cost, from its run folder (fedq/cost.py)."""
    cost = _command(
        sub,
        "cost",
        "what a job cost: CPU, bytes and storage per worker, organisation or version",
        "Read a run folder (ledger.jsonl, coordinator.json, the store's manifests) and print per worker, "
        "per organisation (each worker's own --org claim) or per version: tasks done, expired and "
        "redelivered, updates applied and rejected, samples, training CPU and wall seconds, bytes up and "
        "down, and stored bytes. With --prices, a cost column in the file's currency.",
    )
    cost.add_argument("run_dir", metavar="RUN", help="a run folder (from fedq run)")
    cost.add_argument("--by", choices=("worker", "org", "version"), default="worker", help="rows per (default worker)")
    cost.add_argument(
        "--prices",
        metavar="PRICES_TOML",
        help="a TOML file: cpu_hour, gb_transferred, gb_month_stored, months_stored (default 1), currency",
    )
    cost.add_argument("--csv", action="store_true", help="CSV with exact numbers instead of a table")


def _add_status(sub: Subparsers) -> None:
    """``fedq status RUN_OR_JOB``: a live terminal view of one job (fedq/status_view.py)."""
    status = _command(
        sub,
        "status",
        "a live view of one job: queues, workers, version and accuracy, update rate, rejections",
        "Read the job folder (coordinator.json, metrics.jsonl, ledger.jsonl), the store's newest version and "
        "the broker's queues (a passive look: depth and consumers; nothing consumed) and show them, refreshed "
        "every --interval seconds until interrupted. --once: one snapshot; --once --json: as one JSON object.",
        titles={CONNECTION: "where the job lives"},
        target=True,
    )
    status.add_argument("--once", action="store_true", help="print one snapshot and exit")
    _json_flag(status, "with --once: the snapshot as one JSON object")
    status.add_argument(
        "--interval", type=float, default=2.0, metavar="SECONDS", help="seconds between refreshes (default 2)"
    )


def _add_dashboard(sub: Subparsers) -> None:
    """``fedq dashboard RUN_OR_JOB`` and ``fedq report RUN``: a job's views in a browser (fedq/dashboard/)."""
    dash = _command(
        sub,
        "dashboard",
        "a web page of a live job or a finished run: accuracy, workers, updates, queues, services, cost",
        "Serve a page that redraws every 2 s from the job folder (metrics.jsonl, ledger.jsonl, coordinator.json, "
        "processes.json) and, while the job is live, the broker's queues (passive declares: depth and consumers). "
        "Charts are drawn by fedq's own JS: nothing is fetched from the internet. Bound to 127.0.0.1 by default; "
        "bound to any other address, every request needs the token (--token, or one made up and printed).",
        titles={CONNECTION: "where the job lives"},
        target=True,
    )
    dash.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    dash.add_argument("--port", type=int, default=8642, help="port to listen on (default 8642; 0: any free port)")
    dash.add_argument("--token", default=None, help="the token requests must carry off the loopback (default: made up)")
    dash.add_argument("--no-broker", action="store_true", help="do not look at the broker's queues")
    report = _command(
        sub,
        "report",
        "the dashboard's views of a run as one self-contained HTML file, to attach to an audit",
        "Write the dashboard of a run folder, its data, CSS and JS inlined, as one HTML file that opens offline.",
    )
    report.add_argument("run_dir", metavar="RUN", help="a run folder (from fedq run)")
    report.add_argument("-o", "--output", required=True, metavar="FILE", help="the HTML file to write")


def _add_broker(sub: Subparsers) -> None:
    """``fedq broker apply``: broker users, permissions, policies and topology (fedq/broker.py)."""
    broker = sub.add_parser(
        "broker",
        help="set up the broker for a job: a user per role, least-privilege permissions, policies",
        description="The operator's side of the broker. Each party gets its own broker user, allowed only what "
        "its role needs (see README, Deploying across organisations).",
    )
    actions = broker.add_subparsers(dest="broker_action", required=True, metavar="ACTION")
    apply = _command(
        actions,
        "broker apply",
        "make the job's broker users, permissions, policies and topology",
        "Make (or update) one broker user per role for the job: <ns>.<job>.coordinator, <ns>.<job>.aggregator, "
        "<ns>.observer (fedq log, audit, replay) and <ns>.<job>.worker.<id> for every worker enrolled in the "
        "trust directory (or --workers), each allowed only what its role needs; the dead-letter bound policy; "
        "and the job's exchanges and queues. Passwords are made once, kept in --secrets/<user>.password "
        "(mode 0600), and kept on a re-run. Sent through the management API as the --amqp-url user (an "
        "administrator), or written to --definitions-file for a broker that loads definitions at boot. Exits "
        "non-zero, saying why, when the broker refuses or cannot be reached.",
        titles={CONNECTION: "connection"},
    )
    apply.add_argument(
        "--workers",
        default="",
        metavar="IDS",
        help="worker ids, comma-separated, each optionally with the capabilities whose tasks it may take, "
        "e.g. w1,w2:gpu+lowmem (default: every enrolled worker, all the job's capabilities)",
    )
    apply.add_argument(
        "--secrets", default="", metavar="DIR", help="where the users' password files go (default <keys-dir>/broker)"
    )
    apply.add_argument(
        "--definitions-file",
        default="",
        metavar="FILE",
        help="write the definitions document (mode 0600) instead of sending it to the management API",
    )
    _json_flag(apply, "print the users made and their password files as one JSON object")
    certs = _command(
        actions,
        "broker certs",
        "make a CA and TLS certificates for the broker and its clients",
        "Write a private CA (ca.pem, ca.key), the broker's certificate (server.pem, server.key) naming localhost, "
        "127.0.0.1 and every --host, and for every --client CN a client certificate (CN.pem, CN.key) that logs "
        "in as broker user CN by certificate (EXTERNAL). Keys are mode 0600. A re-run keeps what is there and "
        "adds what is asked (a new client; a new --host remakes server.pem). Prints which file goes where and "
        "the broker's rabbitmq.conf lines.",
    )
    certs.add_argument("--out", dest="directory", required=True, metavar="DIR", help="where to write them")
    certs.add_argument(
        "--host",
        dest="hosts",
        action="append",
        default=[],
        metavar="NAME",
        help="a DNS name or IP address clients dial the broker by (repeat; localhost and 127.0.0.1 always)",
    )
    certs.add_argument(
        "--client",
        dest="clients",
        action="append",
        default=[],
        metavar="CN",
        help="a client certificate for broker user CN (repeat)",
    )
    _json_flag(certs, "print the files made or kept as one JSON object")


def _cost(args: argparse.Namespace, settings: Settings) -> Outcome:
    from fedq.cost import By, run

    return 0, run(Path(args.run_dir), By(args.by), Path(args.prices) if args.prices else None, args.csv)


def _status(args: argparse.Namespace, settings: Settings) -> Outcome:
    from fedq.audit import settings_for
    from fedq.status_view import Request, run

    if args.json and not args.once:
        raise ConfigError("--json prints one snapshot: give --once too")
    request = Request(once=args.once, as_json=args.json, interval=max(0.2, args.interval))
    return 0, _run_async(lambda: run(settings_for(args.target, settings), request))


def _dashboard(args: argparse.Namespace, settings: Settings) -> Outcome:
    from fedq.dashboard.server import run

    run(args.target, settings, args.host, args.port, args.token, not args.no_broker)
    return 0, None


def _report(args: argparse.Namespace, settings: Settings) -> Outcome:
    from fedq.report import run

    return 0, run(Path(args.run_dir), Path(args.output))


def _broker(args: argparse.Namespace, settings: Settings) -> Outcome:
    if args.broker_action == "certs":
        from fedq import certs

        return certs.run(certs.Request(args.directory, tuple(args.hosts), tuple(args.clients), args.json))
    from fedq.broker import Request, run

    request = Request(
        workers=args.workers, secrets_dir=args.secrets, definitions_file=args.definitions_file, as_json=args.json
    )
    return 0, run(settings, request)


# -- running a command --------------------------------------------------------------------------

# What a command hands back: its exit code, and what to print (None: nothing, or the tool printed it).
Outcome = tuple[int, str | Mapping[str, Any] | None]


def _render(output: str | Mapping[str, Any] | None) -> None:
    """The one place a command's result is printed: text as it is, a mapping as one JSON object."""
    if output is None:
        return
    print(output if isinstance(output, str) else json.dumps(output))


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


def _run(args: argparse.Namespace, settings: Settings) -> Outcome:
    from fedq.run import run_job

    code = run_job(
        settings,
        args.workers,
        args.delay_profile,
        progress=not args.no_progress,
        chaos_every=args.chaos,
        min_workers=settings.min_workers if _given(args, "min_workers") else None,
    )
    return code, None


def _coordinator(args: argparse.Namespace, settings: Settings) -> Outcome:
    from coordinator.service import serve
    from shared.app import load_app

    app = load_app(settings.app)
    _run_async(lambda: serve(settings, app))
    return 0, None


def _aggregator(args: argparse.Namespace, settings: Settings) -> Outcome:
    from aggregator.service import serve

    _run_async(lambda: serve(settings))
    return 0, None


def _worker(args: argparse.Namespace, settings: Settings) -> Outcome:
    from shared.app import load_app
    from worker.service import serve

    app = load_app(settings.app)
    _run_async(lambda: serve(settings, app))
    return 0, None


def _audit(args: argparse.Namespace, settings: Settings) -> Outcome:
    from fedq.audit import audit, render, settings_for

    result = asyncio.run(audit(settings_for(args.target, settings), read_log=not args.no_log))
    return (0 if result.ok else 1), (result.to_dict() if args.json else render(result))


def _log(args: argparse.Namespace, settings: Settings) -> Outcome:
    from fedq.audit import settings_for
    from fedq.replay import show_log
    from fedq.streams import parse_offset

    versions = _range(args.versions) if args.versions else None
    job = settings_for(args.target, settings)
    offset = parse_offset(args.offset)
    return asyncio.run(show_log(job, offset, args.worker, args.task, versions, args.json)), None


def _replay(args: argparse.Namespace, settings: Settings) -> Outcome:
    from fedq.audit import settings_for
    from fedq.replay import run_verify, run_what_if

    job = settings_for(args.target, settings)
    if args.replay_command == "verify":
        return asyncio.run(run_verify(job, None if args.all else args.version, args.json)), None
    from shared.app import load_app

    overrides = {
        "k": args.buffer,
        "server_lr": args.server_lr,
        "staleness": args.staleness,
        "max_staleness": args.max_staleness,
        "max_norm": args.max_norm,
        "clip": args.clip,
        "robust": args.robust,
        "weighting": args.weighting,
        "server_opt": args.server_opt,
        "server_beta1": args.server_beta1,
        "server_beta2": args.server_beta2,
        "server_tau": args.server_tau,
    }
    plot_dir = Path(args.plot_dir) if args.plot_dir else None
    return asyncio.run(run_what_if(job, overrides, load_app(job.app), args.json, plot_dir)), None


def _declare(args: argparse.Namespace, settings: Settings) -> Outcome:
    from fedq.run import declare_only

    asyncio.run(declare_only(settings))
    return 0, f"topology declared under namespace {settings.namespace!r}"


def _dlq(args: argparse.Namespace, settings: Settings) -> Outcome:
    from fedq.dlq import run

    output, code = asyncio.run(run(settings, _dlq_request(args)))
    return code, output


def _model(args: argparse.Namespace, settings: Settings) -> Outcome:
    from fedq.audit import settings_for
    from fedq.models import run

    return asyncio.run(run(settings_for(args.target, settings), _model_request(args))), None


def _keys(args: argparse.Namespace, settings: Settings) -> Outcome:
    from fedq.keys import run

    return run(settings, _keys_request(args))


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], Outcome]] = {
    "run": _run,
    "coordinator": _coordinator,
    "aggregator": _aggregator,
    "worker": _worker,
    "audit": _audit,
    "log": _log,
    "replay": _replay,
    "declare": _declare,
    "dlq": _dlq,
    "model": _model,
    "keys": _keys,
    "broker": _broker,
    "cost": _cost,
    "status": _status,
    "dashboard": _dashboard,
    "report": _report,
}


def main(argv: Sequence[str] | None = None) -> int:
    # At exit, Python's last garbage collections walk every object still alive, PyTorch's hundreds of
    # thousands among them: up to seconds of CPU in each process of a run as it stops. Frozen, they
    # are skipped. What a command writes is written and flushed by then, and no __del__ of what is
    # left at exit was ever promised to run.
    atexit.unregister(gc.freeze)  # once, however often main is called in one process
    atexit.register(gc.freeze)
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
        configure_logging(settings.log_level, settings.log_json)
        code, output = COMMANDS[args.command](args, settings)
        _render(output)
        return code
    except FedqError as exc:
        print(f"fedq: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into head, less...: not an error
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
