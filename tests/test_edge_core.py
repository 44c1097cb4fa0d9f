"""Edge aggregation's pure parts: partial aggregates folded by edges and a root give the version
one aggregator makes of the same updates; the root refuses a partial that repeats an update,
comes from another job, version or model, or claims more than its updates could move the model;
the settings and the topology that go with it."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from aggregator.config import AggregatorConfig
from aggregator.core import Accepted, AggregatorCore, edge_problem
from broker_config.names import Names
from broker_config.permissions import BrokerRole, permission
from broker_config.topology import topology
from fedq.audit import balance
from shared.aggregation import Clip, Policy, Robust
from shared.errors import ConfigError
from shared.ledger import one_per_message
from shared.messages import Partial, Update
from shared.privacy import Dp
from shared.reasons import Reason
from shared.settings import Settings
from tests.support.messages import an_update, tiny_model

JOB = "job"


def updates(n: int, base: int = 0, seed: int = 0, scale: float = 0.05) -> list[Update]:
    spec = tiny_model().spec
    g = torch.Generator().manual_seed(seed)
    return [
        an_update(job_id=JOB, base_version=base, floats=torch.randn(spec.n_float, generator=g) * scale, num_samples=5 + i)
        for i in range(n)
    ]


def core(policy: Policy, version: int = 0) -> AggregatorCore:
    return AggregatorCore(tiny_model(), version, policy, JOB)


def partial_of(policy: Policy, batch: list[Update], version: int = 0, shard: int = 0) -> Partial:
    edge = core(policy, version)
    for u in batch:
        assert isinstance(edge.offer(u), Accepted)
    fold = edge.take_partial()
    assert edge.version == version and not edge.pending  # the edge stays at its version, buffer empty
    return fold.message(JOB, f"p{shard}-{batch[0].task_id[:6]}", shard, [("d" * 64, u.worker_id, u.num_samples) for u in batch])


@pytest.mark.parametrize("clip", [Clip("off"), Clip("fixed", 0.2)])
def test_two_edges_and_a_root_make_the_version_one_aggregator_makes(clip: Clip) -> None:
    policy = Policy(mode="async", k=6, max_staleness=4, clip=clip)
    batch = updates(6, seed=1)
    single = core(policy, version=1)
    for u in batch:
        single.offer(u)
    expected = single.flush()

    root = core(policy, version=1)
    for i, half in enumerate((batch[:3], batch[3:])):
        assert isinstance(root.offer_partial(partial_of(policy, half, version=1, shard=i)), list)
    assert root.ready()
    made = root.flush()
    assert made.update_ids == expected.update_ids
    assert torch.allclose(made.model.floats, expected.model.floats, atol=1e-7)
    assert made.mean_staleness == expected.mean_staleness == 1.0  # versions behind the root
    assert made.clip_window == expected.clip_window
    if clip.kind == "fixed":
        assert any(a.clip < 1 for a in made.accepted)  # some were clipped, alike in both


def test_staleness_counts_versions_behind_the_root_when_the_partial_arrives() -> None:
    policy = Policy(mode="async", k=3, max_staleness=4, clip=Clip("off"))
    p = partial_of(policy, updates(3, base=0), version=1)  # folded one version behind... at v1
    root = core(policy, version=3)
    result = root.offer_partial(p)
    assert isinstance(result, list) and [a.staleness for a in result] == [3, 3, 3]
    too_late = core(policy, version=5)
    refused = too_late.offer_partial(p)
    assert not isinstance(refused, list) and refused.reason is Reason.STALE


def test_a_partials_overlap_with_stored_versions_and_the_buffer_is_told_apart() -> None:
    policy = Policy(mode="async", k=10, max_staleness=4, clip=Clip("off"))
    batch = updates(4)
    root = core(policy)
    first = partial_of(policy, batch[:2])
    assert isinstance(root.offer_partial(first), list)
    again = partial_of(policy, batch[1:4])
    assert root.partial_overlap(again) == ([], [batch[1].task_id], [])  # in the buffer, not stored
    root.flush()
    assert root.partial_overlap(again) == ([batch[1].task_id], [], [])  # in a stored version now
    twice = dataclasses.replace(first, update_ids=(batch[3].task_id, batch[3].task_id))
    assert root.partial_overlap(twice) == ([], [], [batch[3].task_id])


def refusal(partial: Partial, policy: Policy | None = None, version: int = 0) -> Reason:
    result = core(policy or Policy(mode="async", k=10, max_staleness=4, clip=Clip("off")), version).offer_partial(partial)
    assert not isinstance(result, list), "the partial was taken"
    return result.reason


def test_the_root_refuses_malformed_and_overreaching_partials() -> None:
    policy = Policy(mode="async", k=10, max_staleness=4, clip=Clip("fixed", 0.2))
    good = partial_of(policy, updates(3, scale=0.5))
    assert isinstance(core(policy).offer_partial(good), list)
    floats = torch.frombuffer(bytearray(good.sums[: 4 * good.n_float]), dtype=torch.float32)
    longer = (floats * 3).numpy().astype("<f4").tobytes()
    nan = torch.full_like(floats, math.nan).numpy().astype("<f4").tobytes()
    cases = {
        Reason.WRONG_JOB: dataclasses.replace(good, job_id="other"),
        Reason.FUTURE_VERSION: dataclasses.replace(good, version=1),
        Reason.BAD_PAYLOAD: dataclasses.replace(good, weights=good.weights[:2]),
        Reason.BAD_SHAPE: dataclasses.replace(good, n_float=good.n_float + 1),
        Reason.NON_FINITE: dataclasses.replace(good, sums=nan),
    }
    for reason, partial in cases.items():
        assert refusal(partial, policy) is reason, reason
    overreach = {
        "a sum longer than its clipped norms allow": dataclasses.replace(good, sums=longer),
        "a clipped norm above the fixed clip": dataclasses.replace(good, recorded=(0.5, 0.5, 0.5), norms=(0.6, 0.6, 0.6)),
        "a weight the policy does not give": dataclasses.replace(good, weights=tuple(w * 10 for w in good.weights)),
        "a norm weight the policy does not give": dataclasses.replace(good, norm_total=good.norm_total / 10),
    }
    for what, partial in overreach.items():
        assert refusal(partial, policy) is Reason.NORM_TOO_LARGE, what
    assert refusal(good, Policy(mode="sync", k=10, clip=Clip("off"))) is Reason.BAD_PAYLOAD  # no edges in sync


def test_only_the_weighted_mean_of_async_fedbuff_folds_at_edges() -> None:
    assert edge_problem(Policy(mode="async", k=10)) == ""
    assert edge_problem(Policy(mode="async", k=10, dp=Dp(1.0, 1.0, 1e-5, local=True), clip=Clip("off"))) == ""
    assert "sync" in edge_problem(Policy(mode="sync", k=10))
    assert "fedasync" in edge_problem(Policy(mode="fedasync", k=10))
    assert "robust" in edge_problem(Policy(mode="async", k=10, robust=Robust.parse("median")))
    assert "central DP" in edge_problem(Policy(mode="async", k=10, dp=Dp(1.0, 1.0, 1e-5), clip=Clip("fixed", 1.0), weighting="uniform"))
    with pytest.raises(ConfigError, match="--tier edge: --mode sync"):
        AggregatorConfig.from_settings(Settings(tier="edge", shards=2, mode="sync"))
    with pytest.raises(ConfigError, match="at most 128, not 300"):  # a partial's head lists every update
        AggregatorConfig.from_settings(Settings(tier="edge", shards=2, buffer=300))
    with pytest.raises(ConfigError, match="at most 128, not 500"):  # the clip's warm-up is one partial
        AggregatorConfig.from_settings(Settings(tier="edge", shards=2, clip="adaptive:3,600,500"))
    assert AggregatorConfig.from_settings(Settings(tier="root", shards=2, buffer=300)).policy.k == 300


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tier": "edge"}, "needs --shards"),
        ({"tier": "root"}, "needs --shards"),
        ({"tier": "edge", "shards": 2, "shard": 2}, "between 0 and 1"),
        ({"tier": "middle", "shards": 2}, "single, edge or root"),
        ({"shards": -1}, "between 0 and 1024"),
    ],
)
def test_tier_settings_are_checked(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _ = Settings(**fields).aggregator_tier  # type: ignore[arg-type]


def test_shards_have_queues_bindings_and_permissions() -> None:
    names = Names("ns", "j")
    topo = topology(names, ("cpu",), shards=2)
    queues = {q.name: q for q in topo.queues}
    for i in range(2):
        assert queues[names.shard_queue(i)].arguments["x-single-active-consumer"] is True
        assert names.edge_inbox(i) in queues
    assert queues[names.partials_queue].arguments["x-dead-letter-exchange"] == names.dead_exchange
    bound = {(b.queue, b.exchange, b.routing_key) for b in topo.bindings}
    assert (names.shard_queue(1), names.results_exchange, "j.shard.1") in bound
    assert (names.partials_queue, names.results_exchange, "j.partials") in bound
    assert (names.edge_inbox(0), names.models_exchange, Names.verdict_key("j", 0)) in bound
    assert names.updates_queue in queues  # a single aggregator's queue stays: tasks of no shard
    assert not any("shard" in q.name for q in topology(names, ("cpu",)).queues)
    read = re.compile(permission(names, BrokerRole.AGGREGATOR).read)
    for q in (names.shard_queue(7), names.partials_queue, names.edge_inbox(3), names.updates_queue):
        assert read.fullmatch(q), q
    assert not read.fullmatch(names.task_queue("cpu"))
    worker_read = re.compile(permission(names, BrokerRole.WORKER).read)
    assert not worker_read.fullmatch(names.partials_queue)


def test_the_roots_applied_record_takes_the_edges_size_and_claims() -> None:
    folded = {"task_id": "t", "fate": "folded", "digest": "d", "bytes": 900, "org": "acme", "cpu_seconds": 2.0}
    applied = {"task_id": "t", "fate": "applied", "digest": "d", "version": 3, "partial": "p"}
    refused = {"kind": "partial", "fate": "rejected", "reason": "duplicate", "partial": "q"}
    for ledger in ([applied, folded, refused], [folded, applied]):
        (one,) = one_per_message(ledger)
        assert one["fate"] == "applied" and one["version"] == 3
        assert (one["bytes"], one["org"], one["cpu_seconds"]) == (900, "acme", 2.0)


def test_the_audit_counts_each_update_once_through_its_partial() -> None:
    def version(v: int, ids: list[str], partials: list[tuple[str, int]]) -> dict[str, object]:
        record = [{"id": pid, "updates": n} for pid, n in partials]
        return {"version": v, "parent": v - 1, "update_ids": ids, "policy": {"partials": record}}

    v0 = {"version": 0, "parent": -1, "update_ids": [], "policy": {}}
    good = [v0, version(1, ["a", "b"], [("p", 2)]), version(2, ["c", "d"], [("q", 1), ("r", 1)])]
    sent = {t: "w" for t in "abcd"}
    assert balance("j", good, [], sent, 0).ok
    short = [v0, version(1, ["a", "b"], [("p", 1)])]
    assert "its partials hold 1" in " ".join(balance("j", short, [], {"a": "w", "b": "w"}, 0).chain_problems)
    twice = [v0, version(1, ["a"], [("p", 1)]), version(2, ["b"], [("p", 1)])]
    result = balance("j", twice, [], {"a": "w", "b": "w"}, 0)
    assert not result.ok and "is in versions [1, 2]" in " ".join(result.chain_problems)
