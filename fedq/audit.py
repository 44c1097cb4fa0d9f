"""``fedq audit``: prove that every update of a job was applied exactly once or rejected with a reason.

Sources, from most to least authoritative: the version manifests in the store
(what is in the model), the broker's update log stream (what workers sent), the
aggregator's ledger (what it decided, including rejections and what it held
when it stopped), and the coordinator's state (per-worker task counts).
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aggregator.core import PARTIALS
from shared.codec import decode_head, open_envelope
from shared.errors import BrokerError, ConfigError, WireError
from shared.ledger import read_ledgers
from shared.messages import Update
from shared.reasons import Fate
from shared.redact import same_broker
from shared.settings import Settings
from shared.store import ModelStore, open_store
from shared.transport import Transport
from shared.transport.connect import connected


@dataclass
class Balance:
    job_id: str
    versions: int
    chain_ok: bool
    chain_problems: list[str]
    applied: int
    applied_twice: dict[str, int]
    rejected: dict[str, int]
    pending: list[str]
    unaccounted: list[str]
    sent: int | None  # distinct task ids in the update log; None when the log was not read
    in_queue: int | None
    per_worker: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        """Updates the broker recorded that are neither applied, rejected, pending nor still queued."""
        waiting = self.in_queue or 0
        return max(0, len(self.unaccounted) - waiting)

    @property
    def ok(self) -> bool:
        return self.chain_ok and not self.applied_twice and self.lost == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "ok": self.ok,
            "versions": self.versions,
            "chain_ok": self.chain_ok,
            "chain_problems": self.chain_problems,
            "sent": self.sent,
            "applied": self.applied,
            "applied_twice": self.applied_twice,
            "rejected": self.rejected,
            "pending": len(self.pending),
            "in_queue": self.in_queue,
            "unaccounted": len(self.unaccounted),
            "lost": self.lost,
            "per_worker": self.per_worker,
        }


def balance(
    job_id: str,
    manifests: list[dict[str, Any]],
    ledger: list[dict[str, Any]],
    sent: dict[str, str] | None,
    in_queue: int | None,
) -> Balance:
    """Pure: reconcile manifests, ledger and the update log (task id -> worker id)."""
    problems = []
    by_version = {m["version"]: m for m in manifests}
    for v in range(max(by_version, default=-1) + 1):
        m = by_version.get(v)
        if m is None:
            problems.append(f"version {v} is missing")
        elif m["parent"] != v - 1:
            problems.append(f"version {v} has parent {m['parent']}, expected {v - 1}")
    problems += partial_problems(manifests)
    in_versions = Counter(tid for m in manifests for tid in m["update_ids"])
    twice = {tid: n for tid, n in in_versions.items() if n > 1}
    rejected_ids: dict[str, str] = {}
    pending_ids: set[str] = set()
    worker_of: dict[str, str] = dict(sent or {})
    for r in ledger:
        if r.get("kind"):  # not an update's record: a DP seed, a root's refused partial
            continue
        tid = r.get("task_id", "")
        if r.get("worker_id"):
            worker_of.setdefault(tid, r["worker_id"])
        if r.get("fate") == Fate.REJECTED:
            rejected_ids.setdefault(tid, r.get("reason", "unknown"))
        elif r.get("fate") == Fate.PENDING:  # folded alone is no fate: a stored version or a stop says where it went
            pending_ids.add(tid)
    # An id applied once elsewhere may also have a "duplicate" rejection: it counts as applied.
    rejections = Counter(reason for tid, reason in rejected_ids.items() if tid and tid not in in_versions)
    rejections.update(
        r.get("reason", "unknown")
        for r in ledger
        if r.get("fate") == Fate.REJECTED and not r.get("task_id") and not r.get("kind")
    )
    pending = sorted(pending_ids - set(in_versions) - set(rejected_ids))
    unaccounted = []
    if sent is not None:
        known = set(in_versions) | set(rejected_ids) | pending_ids
        unaccounted = sorted(tid for tid in sent if tid not in known)
    per_worker: dict[str, dict[str, int]] = defaultdict(lambda: Counter())
    for tid in in_versions:
        per_worker[worker_of.get(tid, "?")]["applied"] += 1
    for tid in rejected_ids:
        if tid and tid not in in_versions:
            per_worker[worker_of.get(tid, "?")]["rejected"] += 1
    for tid in pending:
        per_worker[worker_of.get(tid, "?")]["pending"] += 1
    for tid in unaccounted:
        per_worker[worker_of.get(tid, "?")]["unaccounted"] += 1
    return Balance(
        job_id=job_id,
        versions=len(manifests),
        chain_ok=not problems,
        chain_problems=problems,
        applied=len(in_versions),
        applied_twice=twice,
        rejected=dict(rejections),
        pending=pending,
        unaccounted=unaccounted,
        sent=len(sent) if sent is not None else None,
        in_queue=in_queue,
        per_worker={w: dict(c) for w, c in sorted(per_worker.items())},
    )


def partial_problems(manifests: list[dict[str, Any]]) -> list[str]:
    """Edge aggregation: each version's partials hold exactly the updates it lists, and no partial
    is in two versions (so each update counts once, through one partial)."""
    problems = []
    versions_of: dict[str, list[int]] = defaultdict(list)
    for m in manifests:
        partials = (m.get("policy") or {}).get(PARTIALS)
        if partials is None:
            continue
        held = sum(int(p.get("updates", 0)) for p in partials)
        if held != len(m["update_ids"]):
            problems.append(f"version {m['version']} lists {len(m['update_ids'])} updates, its partials hold {held}")
        for p in partials:
            versions_of[str(p.get("id"))].append(m["version"])
    problems += [f"partial {pid[:12]} is in versions {vs}" for pid, vs in versions_of.items() if len(vs) > 1]
    return problems


STEADY_TRIES = 5


async def queue_depth(transport: Transport, queue: str) -> int:
    """How many messages wait in ``queue`` (a passive look: the queue is not touched)."""
    info = await transport.queue_info(queue)
    if info is None:
        raise BrokerError(f"queue {queue!r} does not exist: is --namespace right?")
    return info.messages


async def updates_waiting(transport: Transport, shards: int = 0) -> int:
    """Updates waiting in the job's updates queue, and in its shards' queues (edge aggregation)."""
    names = transport.names
    return sum([await queue_depth(transport, q) for q in (names.updates_queue, *map(names.shard_queue, range(shards)))])


async def read_update_log(
    transport: Transport, job_id: str, idle: float = 2.0, shards: int = 0
) -> tuple[dict[str, str], int]:
    """Every update of ``job_id`` in the update log stream (task id -> worker id), and the
    number of messages waiting in the updates queue (and the shards' queues). Reads with its own
    consumer, acks only its own stream deliveries, and never touches the live queues' messages."""
    # Updates still arriving (a worker outside the run finishing a leftover task) would land in
    # the log after the depth was read, or in the queue after the log was: read until the
    # queue held still across the read, so that each is counted in both or in neither.
    names = transport.names
    for _ in range(STEADY_TRIES):
        in_queue = await updates_waiting(transport, shards)
        entries = await transport.read_all(names.update_log, idle=idle)
        if await updates_waiting(transport, shards) == in_queue:
            break
    sent: dict[str, str] = {}
    for entry in entries:
        with contextlib.suppress(WireError):  # garbage, or above the cap (too_large: never unpacked)
            envelope = open_envelope(entry.body, transport.max_message_bytes)
            if envelope.kind == "update":
                update = decode_head(envelope)
                if isinstance(update, Update) and update.job_id == job_id:
                    sent[update.task_id] = update.worker_id
    return sent, in_queue


async def audit(settings: Settings, read_log: bool = True) -> Balance:
    store = ModelStore(open_store(settings.store, settings), settings.job)
    manifests = []
    for v in await store.versions():
        m = await store.manifest(v)
        manifests.append(
            {"version": m.version, "parent": m.parent, "update_ids": list(m.update_ids), "policy": m.policy}
        )
    ledger = read_ledgers(settings.out_dir)
    sent: dict[str, str] | None = None
    in_queue: int | None = None
    if read_log:
        async with connected(settings, "fedq-audit") as transport:
            sent, in_queue = await read_update_log(transport, settings.job, shards=settings.shards)
    result = balance(settings.job, manifests, ledger, sent, in_queue)
    state_path = settings.out_dir / "coordinator.json"
    if state_path.exists():
        workers = json.loads(state_path.read_text()).get("workers", {})
        for wid, counts in workers.items():
            result.per_worker.setdefault(wid, {}).update({f"tasks_{k}": v for k, v in counts.items()})
    return result


def settings_for(target: str, base: Settings) -> Settings:
    """A run folder (with config.json) or a job id under the given settings."""
    path = Path(target)
    config = path / "config.json"
    if config.exists():
        saved = json.loads(config.read_text())["settings"]
        keep = {
            k: saved[k]
            for k in (
                "amqp_url",
                "namespace",
                "job",
                "store",
                "out",
                "keys_dir",
                "trusted_keys",
                "app",
                "s3_endpoint",
                "s3_region",
                "shards",
            )
            if k in saved
        }
        keep.setdefault("trusted_keys", str(path / "keys" / "trusted"))
        for k in ("amqp_ca", "amqp_cert", "amqp_key"):  # how the run reached its broker over TLS
            if saved.get(k) and not getattr(base, k):
                keep[k] = saved[k]
        if "amqp_url" in keep and same_broker(keep["amqp_url"], base.amqp_url):
            keep["amqp_url"] = base.amqp_url  # config.json holds no password: the caller's URL has it
        return Settings(**{**base.__dict__, **keep})
    if path.exists():
        raise ConfigError(f"{target} is a folder but not a fedq run folder (no config.json)")
    return Settings(**{**base.__dict__, "job": target})


def render(b: Balance) -> str:
    lines = [
        f"job {b.job_id}: {'BALANCED' if b.ok else 'NOT BALANCED'}",
        f"  versions        {b.versions} ({'chain unbroken' if b.chain_ok else '; '.join(b.chain_problems)})",
        f"  sent (log)      {'-' if b.sent is None else b.sent}",
        f"  applied         {b.applied}",
        f"  applied twice   {len(b.applied_twice)}",
        f"  rejected        {sum(b.rejected.values())} {dict(sorted(b.rejected.items())) or ''}",
        f"  pending at stop {len(b.pending)} (held unacked when the aggregator stopped; back in the queue)",
        f"  in queue        {'-' if b.in_queue is None else b.in_queue}",
        f"  lost            {b.lost}",
    ]
    if b.per_worker:
        lines.append("  per worker:")
        for w, counts in b.per_worker.items():
            lines.append(f"    {w:<16} " + " ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    return "\n".join(lines)
