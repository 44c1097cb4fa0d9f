"""Edge aggregation through the real RabbitMQ: edges fold a shard's updates into partial
aggregates, a root folds the partials into versions. An edge killed with a partial sent and no
verdict yet, and more updates in its buffer, loses nothing, and nothing counts twice: its standby
gets every unacked update again, the root refuses the partials that repeat applied updates, the
standby folds the rest again, and ``fedq audit`` and ``fedq replay verify`` agree."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aggregator.config import AggregatorConfig
from aggregator.service import Aggregator
from aggregator.tiers import EdgeAggregator, RootAggregator
from broker_config.names import Names
from broker_config.topology import topology
from fedq.audit import balance, read_update_log
from fedq.replay import Job, decode_entries, decode_partials, verify_version
from shared.aggregation import Clip, Policy
from shared.ledger import JsonLines, read_ledgers
from shared.settings import Settings
from shared.signing import Signer
from shared.store import LocalStore, ModelStore
from shared.transport.rabbitmq import RabbitMQ
from tests.support.broker import assert_settled, connect_like
from tests.support.jobs import TINY_APP, assert_balanced, cleanup, cli, finish, json_lines, start_run
from tests.support.messages import OWNER, make_task, make_update, save_v0, tiny_model, token_of, trust
from tests.support.waiting import WAIT, until

JOB = "edgejob"
K = 3
__all__ = ["cleanup"]  # the fixture, for the whole-job test


@dataclass
class Running:
    service: Aggregator
    transport: RabbitMQ
    task: asyncio.Task[None]
    ledger: JsonLines


@dataclass
class Tiers:
    """A job's store, keys and the edge and root aggregators the test starts and kills."""

    client: RabbitMQ
    tmp: Path
    store: ModelStore
    signer: Signer = field(default_factory=Signer.generate)  # the aggregators' key
    worker: Signer = field(default_factory=Signer.generate)
    running: list[Running] = field(default_factory=list)
    incarnation: str = ""

    @property
    def names(self) -> Names:
        return self.client.names

    async def start(self, tier: str, name: str, shard: int = 0, k: int = K) -> Running:
        config = AggregatorConfig(
            Policy(mode="async", k=k, max_staleness=5, clip=Clip("off")), shards=1, tier=tier, shard=shard
        )
        kind = EdgeAggregator if tier == "edge" else RootAggregator
        transport = await connect_like(self.client, f"test-{name}")
        ledger = JsonLines(self.tmp / ("ledger.jsonl" if tier == "root" else f"ledger-edge-{shard}.jsonl"))
        ring = trust(workers={"w1": self.worker}, aggregators=(self.signer,))
        service = kind(config, transport=transport, store=self.store, signer=self.signer, keyring=ring, ledger=ledger)
        await asyncio.wait_for(service.load(wait=5), WAIT)
        self.incarnation = service.incarnation
        running = Running(service, transport, asyncio.create_task(service.run(), name=name), ledger)
        self.running.append(running)
        return running

    async def kill(self, running: Running) -> None:
        """Gone at once: nothing more acked; the broker takes back what it held."""
        running.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(running.task, WAIT)
        await running.transport.close()
        self.running.remove(running)

    def update(self, seed: int, shard: int = 0) -> tuple[str, bytes]:
        tid = uuid.uuid4().hex
        _, task = make_task(OWNER, task_id=tid, job_id=JOB, incarnation=self.incarnation, shard=shard)
        floats = torch.randn(tiny_model().spec.n_float, generator=torch.Generator().manual_seed(seed)) * 0.01
        return make_update(self.worker, tiny_model(), task_id=tid, job_id=JOB, task=token_of(task), floats=floats)

    async def send(self, body: bytes, shard: int = 0) -> None:
        await self.client.publish(self.names.results_exchange, self.names.update_key(shard), body)

    async def versions(self) -> list[int]:
        return await self.store.versions()


@contextlib.asynccontextmanager
async def tiers(broker: RabbitMQ, tmp_path: Path) -> AsyncIterator[Tiers]:
    await broker.declare(topology(broker.names, ("cpu",), shards=1))
    store = ModelStore(LocalStore(tmp_path / "store"), job_id=JOB)
    await save_v0(store, tiny_model())
    t = Tiers(broker, tmp_path, store)
    try:
        yield t
    finally:
        for running in list(t.running):
            await t.kill(running)


async def in_flight(edge: Running, partials: int, buffered: int) -> None:
    service = edge.service
    assert isinstance(service, EdgeAggregator)
    await until(lambda: len(service.sent) == partials and len(service.held) == buffered, "the edge's partials and buffer")


async def test_an_edge_killed_mid_partial_loses_nothing_and_counts_nothing_twice(
    broker: RabbitMQ, names: Names, tmp_path: Path
) -> None:
    async with tiers(broker, tmp_path) as t:
        edge = await t.start("edge", "edge-a")
        sent = [t.update(seed) for seed in range(5)]
        for _, body in sent:
            await t.send(body)
        # the first K in a partial the root has not seen yet (no root runs), two in the buffer
        await in_flight(edge, partials=1, buffered=2)
        await t.kill(edge)
        await t.send(sent[0][1])  # a worker's retried publish of an update the dead edge sent on
        standby = await t.start("edge", "edge-b")
        # the standby folds three of the five again, so at least one of the dead edge's partial
        await in_flight(standby, partials=1, buffered=2)
        root = await t.start("root", "root")
        await until_versions(t, 1)
        more = [t.update(seed) for seed in range(5, 6)]
        await t.send(more[0][1])
        await until_versions(t, 2)
        await until(lambda: not root.service._lock.locked() and not standby.service._lock.locked(), "idle tiers")
        await in_flight(standby, partials=0, buffered=0)

        manifests = [await t.store.manifest(v) for v in await t.versions()]
        applied = Counter(tid for m in manifests for tid in m.update_ids)
        assert applied == Counter({tid: 1 for tid, _ in [*sent, *more]})  # each exactly once
        assert manifests[1].policy["partials"][0]["updates"] == K

        for running in list(t.running):
            await t.kill(running)
        for queue in (names.shard_queue(0), names.partials_queue):
            await assert_settled(broker, queue)  # every update and partial acked or dead-lettered

        log, in_queue = await read_update_log(broker, JOB, idle=0.5, shards=1)
        ledger = read_ledgers(tmp_path)
        records = [{"version": m.version, "parent": m.parent, "update_ids": list(m.update_ids)} for m in manifests]
        audit = balance(JOB, records, ledger, log, in_queue)
        assert audit.ok and audit.lost == 0 and not audit.applied_twice, audit.to_dict()
        assert audit.applied == 6 and audit.sent == 6
        refused = [r for r in ledger if r.get("kind") == "partial"]
        assert refused and all(r["reason"] == "duplicate" for r in refused)  # the standby's repeats

        entries = await broker.read_all(names.update_log, idle=0.5)
        ring = trust(workers={"w1": t.worker}, aggregators=(t.signer,))
        job = Job(
            Settings(job=JOB),
            ModelStore(t.store.objects, JOB, ring),
            {m.version: m for m in manifests},
            decode_entries(entries, JOB, ring),
            [r for r in ledger if "partial" in r],
            partials=decode_partials(entries, JOB, ring),
        )
        for v in (1, 2):
            verdict = await verify_version(job, v)
            assert verdict.ok, verdict.problems
        # a partial whose sums were changed does not re-derive
        first = manifests[1].policy["partials"][0]["id"]
        logged = job.partials[first]
        forged = logged.partial.__class__(**{**vars(logged.partial), "sums": bytes(len(logged.partial.sums))})
        job.partials[first] = logged.__class__(forged, True)
        assert not (await verify_version(job, 1)).ok


async def until_versions(t: Tiers, n: int) -> None:
    async def made() -> bool:
        return len(await t.versions()) > n

    await until(made, f"{n} versions", wait=3 * WAIT)


def test_fedq_run_with_edges_survives_chaos_and_replays(tmp_path: Path, names: Names, cleanup: None) -> None:
    """``fedq run --shards 2 --chaos``: two edges and a root, a worker killed every 1.5 s, each edge
    killed once, then the root: the job ends at its target, the audit balances with every
    update applied once, and ``fedq replay verify --all`` re-derives every version through its partials."""
    out = tmp_path / "run"
    flags = ("--workers", "3", "--shards", "2", "--buffer", "3", "--delay-profile", "0.3*3", "--chaos", "1.5")
    finish(start_run(out, names, *TINY_APP, *flags, "--target-accuracy", "0", "--max-versions", "10"), timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "max_versions", summary
    assert summary["chaos"]["aggregator_killed"] == 1 and summary["chaos"]["edges_killed"] == 2, summary["chaos"]
    assert summary["restarts"]["edge-0"] >= 1 and summary["restarts"]["edge-1"] >= 1
    assert summary["audit"]["ok"] and summary["audit"]["lost"] == 0 and not summary["audit"]["applied_twice"]
    assert_balanced(out)
    manifests = [json.loads(p.read_text()) for p in sorted((out / "store").rglob("v*.json"))]
    assert len(manifests) == 11 and all(m["policy"].get("partials") for m in manifests[1:])
    verify = cli("replay", "verify", out, "--all", "--json")
    verdicts = json_lines(verify.stdout)
    assert verify.returncode == 0 and len(verdicts) == 11 and all(v["ok"] for v in verdicts), verify


async def test_a_partial_repeating_updates_the_root_holds_unstored_waits_for_their_version(
    broker: RabbitMQ, names: Names, tmp_path: Path
) -> None:
    """The root makes a version of two partials (--buffer 6, edges K = 3). A standby folds a dead
    edge's three updates again while the root holds the first partial unstored: the repeat waits,
    unacked, until the version that stores them, and only then is refused naming them, so the edge
    acks nothing a stored version does not hold. An update sent to the wrong shard is rejected."""
    async with tiers(broker, tmp_path) as t:
        edge = await t.start("edge", "edge-a")
        first = [t.update(seed) for seed in range(3)]
        for _, body in first:
            await t.send(body)
        await in_flight(edge, partials=1, buffered=0)
        await t.kill(edge)
        standby = await t.start("edge", "edge-b")
        await in_flight(standby, partials=1, buffered=0)  # the same three, folded again
        root = await t.start("root", "root", k=2 * K)
        service = root.service
        assert isinstance(service, RootAggregator)
        await until(lambda: len(service.partials) == 1 and len(service.deferred) == 1, "one partial held, one deferred")
        assert await t.versions() == [0]
        assert not [r for r in read_ledgers(tmp_path) if r.get("kind") == "partial"]  # nothing refused yet

        elsewhere = t.update(99, shard=1)  # its task names shard 1
        await t.send(elsewhere[1])
        second = [t.update(seed) for seed in range(3, 6)]
        for _, body in second:
            await t.send(body)
        await until_versions(t, 1)
        await until(lambda: not service.deferred and not service._lock.locked(), "the deferred partial refused")
        await in_flight(standby, partials=0, buffered=0)
        manifest = await t.store.manifest(1)
        assert Counter(manifest.update_ids) == Counter(tid for tid, _ in [*first, *second])
        ledger = [r for r in read_ledgers(tmp_path) if r.get("task_id") or r.get("kind")]
        refused = [i for i, r in enumerate(ledger) if r.get("kind") == "partial"]
        applied = [i for i, r in enumerate(ledger) if r.get("fate") == "applied"]
        assert len(refused) == 1 and max(applied) < refused[0]  # refused after the version was stored
        assert sorted(ledger[refused[0]]["duplicates"]) == sorted(tid for tid, _ in first)
        wrong = [r for r in ledger if r.get("task_id") == elsewhere[0]]
        assert [r["reason"] for r in wrong] == ["wrong_shard"]
        for running in list(t.running):
            await t.kill(running)
        for queue in (names.shard_queue(0), names.partials_queue):
            await assert_settled(broker, queue)

