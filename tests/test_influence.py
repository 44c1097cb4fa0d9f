"""Bounded influence in the aggregator: norm clipping (fixed and adaptive), coordinate-wise robust
aggregation, screening of integer tensors, and replay re-deriving clipped versions bit for bit.
Pure core and a local store; no broker."""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from aggregator.config import AggregatorConfig
from aggregator.core import Accepted, AggregatorCore, NewVersion, Rejected
from broker_config.names import Names
from fedq.replay import Job, LoggedUpdate, policy_of, verify_version, what_if
from shared.aggregation import CLIP_WINDOW, Clip, CosineBuffer, Policy, Robust, clip_window_of, cosine, screen
from shared.errors import ConfigError, ScreeningError
from shared.messages import Round, Update
from shared.quantize import DEFAULT_BLOCK, block_layout, decode_delta_wire, encode_delta, to_flat, to_wire
from shared.reasons import Reason
from shared.settings import Settings, flags
from shared.staleness import Staleness
from shared.store import LocalStore, Manifest, ModelStore, model_key
from shared.tensors import FlatModel
from shared.transport import StreamEntry
from shared.transport.memory import MemoryTransport
from tests.support.rigs import aggregator_rig

JOB = "job"
CONSTANT = Staleness("constant")
N = 8  # floats of the test model


def model() -> FlatModel:
    """8 floats and one int64 counter (BatchNorm's num_batches_tracked, say)."""
    return FlatModel.from_state_dict(
        {"w": torch.arange(N, dtype=torch.float32) / 4, "steps": torch.tensor(10, dtype=torch.int64)}
    )


def update(
    task_id: str,
    floats: torch.Tensor | list[float],
    exact: int = 0,
    *,
    base: int = 0,
    samples: int = 1,
    quant: str = "none",
) -> Update:
    spec = model().spec
    f = torch.as_tensor(floats, dtype=torch.float32)
    delta = encode_delta(f, torch.tensor([exact]), spec, quant, 4, torch.Generator().manual_seed(7))
    return Update(task_id, JOB, "w-1", base, samples, quant, 4, {}, 0.0, delta=delta)


def honest(i: int) -> torch.Tensor:
    """Honest deltas: one shared direction plus noise, norms between about 1 and 2."""
    g = torch.Generator().manual_seed(100 + i)
    return torch.ones(N) * 0.4 + torch.randn(N, generator=g) * 0.2


def core(policy: Policy, version: int = 0, window: tuple[float, ...] = ()) -> AggregatorCore:
    return AggregatorCore(model(), version, policy, JOB, clip_window=window)


def offer_all(c: AggregatorCore, updates: list[Update]) -> list[Accepted]:
    out = []
    for u in updates:
        result = c.offer(u)
        assert isinstance(result, Accepted), result
        out.append(result)
    return out


def norm(v: torch.Tensor) -> float:
    """The norm the clip uses (``screen``'s, summed in a fixed order)."""
    return screen(v, torch.zeros(0, dtype=torch.int64), None)


# ---------------------------------------------------------------- clipping


def test_a_boosted_sign_flipped_delta_is_clipped_to_the_adaptive_bound() -> None:
    deltas = [honest(i) for i in range(9)]
    attack = -20 * torch.stack(deltas).mean(0)
    updates = [update(f"h{i}", d) for i, d in enumerate(deltas)] + [update("evil", attack)]
    policy = Policy(k=10, staleness=CONSTANT)  # clip: adaptive, the default
    assert policy.clip == Clip("adaptive", factor=3.0, window=50, warmup=5)
    c = core(policy)
    accepted = offer_all(c, updates)
    assert [a.clip for a in accepted[:9]] == [1.0] * 9  # honest updates stay as they are
    norms = sorted(norm(d) for d in deltas)
    bound = 3 * norms[4]  # C x the median of the 9 norms recorded before the attacker
    evil = accepted[-1]
    assert evil.norm == pytest.approx(norm(attack)) and evil.norm > 5 * bound
    assert evil.clip == bound / evil.norm
    new = c.flush()
    # The clipped attacker is recorded at the bound, not at its own norm.
    assert new.clip_window[-1] == bound and max(new.clip_window) == bound
    # The step is the mean of the honest deltas and the attacker scaled down to the bound.
    expected = (sum(deltas, torch.zeros(N)) + attack * evil.clip) / 10
    step = new.model.floats - model().floats
    assert torch.allclose(step, expected, atol=1e-6)
    assert norm(attack * evil.clip) == pytest.approx(bound, rel=1e-6)
    # Unclipped, the attacker turns the step against the honest direction; clipped, it does not.
    off = core(Policy(k=10, staleness=CONSTANT, clip=Clip("off")))
    offer_all(off, updates)
    honest_mean = torch.stack(deltas).mean(0)
    assert float((off.flush().model.floats - model().floats) @ honest_mean) < 0
    assert float(step @ honest_mean) > 0


def test_adaptive_clip_waits_for_warm_up_and_a_fixed_bound_does_not() -> None:
    big = torch.ones(N) * 10  # norm 28.28
    assert Clip().limit([1.0] * 4) is None  # fewer than 5 norms known: no clip yet
    assert Clip().limit([1.0] * 5) == 3.0
    assert Clip().limit([0.0] * 9) is None  # a zero median would clip everything to nothing
    assert Clip("adaptive", window=3, warmup=2).limit([100.0, 1.0, 2.0, 4.0]) == 6.0  # the last 3 only
    first = core(Policy(k=2, staleness=CONSTANT)).offer(update("a", big))
    assert isinstance(first, Accepted) and first.clip == 1.0
    fixed = core(Policy(k=2, staleness=CONSTANT, clip=Clip.parse("2.5"))).offer(update("a", big))
    assert isinstance(fixed, Accepted) and fixed.clip == 2.5 / fixed.norm


def test_attackers_cannot_drag_the_median_up() -> None:
    """A minority of boosted updates, version after version: each is recorded at the bound, so
    the bound stays a few times the honest norms instead of following the attackers."""
    policy = Policy(k=10, staleness=CONSTANT)
    c = core(policy)
    for v in range(6):
        updates = [update(f"h{v}.{i}", honest(10 * v + i)) for i in range(7)]
        updates += [update(f"e{v}.{i}", honest(i) * -100) for i in range(3)]
        offer_all(c, updates)
        c.flush()
    honest_max = max(norm(honest(i)) for i in range(60))
    bound = policy.clip.limit(c.clip_window)
    assert bound is not None and bound <= 3 * honest_max


def test_clip_not_biting_is_bit_identical_to_no_clip() -> None:
    updates = [update(f"h{i}", honest(i), exact=i % 3, samples=1 + i) for i in range(9)]
    made = {}
    for clip in (Clip("off"), Clip(), Clip("fixed", 1e30)):
        c = core(Policy(k=9, staleness=CONSTANT, clip=clip))
        assert all(a.clip == 1.0 for a in offer_all(c, updates))
        made[clip.kind] = c.flush().model.to_bytes()
    assert made["off"] == made["adaptive"] == made["fixed"]


# ---------------------------------------------------------------- the warm-up


def noise(i: int = 0) -> torch.Tensor:
    """Gaussian noise at 100 times an honest delta's norm (benchmarks/poisoning.py's attacker)."""
    g = torch.Generator().manual_seed(900 + i)
    v = torch.randn(N, generator=g)
    return v / norm(v) * 100 * norm(honest(0))


def first_five() -> list[Update]:
    """The first five updates of a fresh job, the noise attacker third among them."""
    return [
        update("h0", honest(0)),
        update("h1", honest(1)),
        update("evil", noise()),
        update("h2", honest(2)),
        update("h3", honest(3)),
    ]


def warm_bound(norms: list[float]) -> float:
    """3 x the median of the norms (the adaptive clip's default, once warm)."""
    s = sorted(norms)
    mid = len(s) // 2
    return 3 * (s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2)


def test_a_noise_attacker_among_the_first_five_updates_is_clipped() -> None:
    """The warm-up hole: the first ``warmup`` norms of a job used to be folded unclipped. They are
    held until ``warmup`` are known, then clipped against the median of all of them."""
    updates = first_five()
    deltas = [honest(0), honest(1), noise(), honest(2), honest(3)]
    c = core(Policy(k=5, staleness=CONSTANT))
    offer_all(c, updates)
    bound = warm_bound([norm(d) for d in deltas])
    final = {a.task_id: a for a in c.pending}
    evil = final["evil"]
    assert evil.norm > 20 * bound and evil.clip == bound / evil.norm
    assert all(final[t].clip == 1.0 for t in ("h0", "h1", "h2", "h3"))
    new = c.flush()
    assert new.clips == {a.task_id: a.clip for a in new.accepted} and new.clips["evil"] == evil.clip
    assert new.update_ids == ("h0", "h1", "evil", "h2", "h3")
    assert max(new.clip_window) == bound and len(new.clip_window) == 5  # recorded at the bound
    step = new.model.floats - model().floats
    expected = (sum(deltas[:2] + deltas[3:], torch.zeros(N)) + deltas[2] * evil.clip) / 5
    assert torch.allclose(step, expected, atol=1e-6)
    assert norm(step) < 2 * max(norm(d) for d in deltas if d is not deltas[2])


def test_held_updates_are_folded_as_the_warm_clip_would_fold_them() -> None:
    """Once resolved, held updates go into the buffer as the ordinary path adds them: with a
    clip that does not bite, the bytes are those of the unclipped fold."""
    updates = [update(f"h{i}", honest(i), exact=i % 3, samples=1 + i) for i in range(7)]
    made = {}
    for clip in (Clip("off"), Clip()):
        c = core(Policy(k=7, staleness=CONSTANT, clip=clip))
        offer_all(c, updates)
        made[clip.kind] = c.flush().model.to_bytes()
    assert made["off"] == made["adaptive"]


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_the_first_version_with_a_warm_up_is_re_derived_by_a_fresh_core(quant: str) -> None:
    updates = [
        update(u.task_id, t, quant=quant)
        for u, t in zip(first_five(), [honest(0), honest(1), noise(), honest(2), honest(3)], strict=True)
    ]
    updates += [update("h4", honest(4), quant=quant)]
    for robust in (Robust(), Robust("trimmed-mean", 0.2)):
        policy = Policy(k=6, staleness=CONSTANT, robust=robust)
        a, b = core(policy), core(policy)
        offer_all(a, updates)
        offer_all(b, updates)
        first, again = a.flush(), b.flush()
        assert first.model.to_bytes() == again.model.to_bytes() and first.clip_window == again.clip_window
        assert first.clips["evil"] < 0.05


async def test_replay_verifies_a_first_version_made_during_the_warm_up(tmp_path: Path) -> None:
    policy = Policy(k=5, staleness=CONSTANT)
    batches = [first_five(), [update(f"h1.{i}", honest(10 + i), base=1) for i in range(5)]]
    job = await a_run(tmp_path, policy, batches)
    for v in (1, 2):
        verdict = await verify_version(job, v)
        assert verdict.ok, verdict.problems
    curve = await what_if(job, policy_of(job.manifests[2]), None, "same")
    assert curve.shas == [job.manifests[v].sha256 for v in range(3)]
    # and the attacker was clipped in version 1 (an unclipped fold makes other bytes)
    off = core(Policy(k=5, staleness=CONSTANT, clip=Clip("off")))
    offer_all(off, first_five())
    assert off.flush().model.sha256() != (await job.store.load(1))[1].sha256()


def test_k1_async_waits_for_the_warm_up_then_folds_one_by_one() -> None:
    c = core(Policy(k=1, server_lr=0.5, staleness=CONSTANT))
    accepted = []
    for i, u in enumerate(first_five()):
        accepted.append(c.offer(u))
        assert c.ready() == (i == 4)  # undecided: no version before the bound is known
    assert accepted[2].clip == 1.0  # returned before the bound was known...
    assert c.pending[2].clip < 0.05  # ...and replaced by the final verdict once it was
    assert accepted[4] == c.pending[4] and accepted[4].clip == 1.0  # the fifth resolved them all
    new = c.flush()
    assert new.version == 1 and len(new.update_ids) == 5 and new.clips["evil"] == new.accepted[2].clip < 0.05
    for i in range(3):
        result = c.offer(update(f"later{i}", honest(20 + i), base=c.version))
        assert isinstance(result, Accepted) and c.ready()
        assert c.flush().update_ids == (f"later{i}",)


def test_sync_mode_folds_the_round_and_resolves_the_warm_up_at_flush() -> None:
    c = core(Policy(mode="sync", staleness=CONSTANT))
    c.open_round(Round(JOB, 0, 0, 3, 0.0))
    deltas = [honest(0), noise(), honest(1)]
    offer_all(c, [update("h0", deltas[0]), update("evil", deltas[1]), update("h1", deltas[2])])
    assert c.ready()  # the round is complete: it folds with three norms known
    new = c.flush()
    bound = warm_bound([norm(d) for d in deltas])
    assert new.clips["evil"] == bound / norm(deltas[1]) and new.clips["h0"] == new.clips["h1"] == 1.0
    assert len(new.clip_window) == 3 and max(new.clip_window) == bound
    # Round 2: the window holds 3 norms, so the second update completes the warm-up.
    c.open_round(Round(JOB, 1, 1, 3, 0.0))
    first = c.offer(update("r2.0", noise(1), base=1))
    assert isinstance(first, Accepted) and not c.ready()
    second = c.offer(update("r2.1", honest(4), base=1))
    assert isinstance(second, Accepted)
    resolved = c.pending[0]
    assert resolved.clip < 0.05 and c.pending[1] == second
    third = c.offer(update("r2.2", honest(5), base=1))
    assert isinstance(third, Accepted) and c.ready()
    assert c.flush().clips["r2.0"] == resolved.clip


def test_a_close_round_with_one_update_still_folds_it() -> None:
    c = core(Policy(mode="sync", staleness=CONSTANT))
    c.open_round(Round(JOB, 0, 0, 5, 0.0))
    offer_all(c, [update("only", honest(0))])
    assert not c.ready() and c.close_round(Round(JOB, 0, 0, 5, 0.0, close=True))
    new = c.flush()
    assert new.update_ids == ("only",) and new.clips == {"only": 1.0}  # 3 x its own norm: no clip
    assert new.clip_window == (norm(honest(0)),)


async def test_the_ledger_records_the_clip_a_held_update_was_folded_with(
    mem: MemoryTransport, names: Names, tmp_path: Path
) -> None:
    """The service (in-memory broker): the clip of an update held in the warm-up is known only
    when its version is made; the ledger records that one, not the one ``offer`` returned."""
    async with aggregator_rig(mem, names, tmp_path, k=5) as rig:
        policy = Policy(k=5)  # the default adaptive clip, whatever the rig's is
        assert rig.aggregator.core is not None
        rig.aggregator.policy = rig.aggregator.core.policy = policy
        n = rig.model.spec.n_float
        g = torch.Generator().manual_seed(5)
        rows = [torch.full((n,), 0.01) + torch.randn(n, generator=g) * 0.002 for _ in range(4)]
        rows.insert(1, torch.randn(n, generator=g) * 100 * 0.01)
        ids = []
        for row in rows:
            tid, body = rig.update(floats=row, quant="none")
            ids.append(tid)
            await rig.send(body)
        await rig.wait_version(1)
        clips = [(await rig.ledger_entry(tid, "applied"))["clip"] for tid in ids]
        bound = warm_bound([norm(r) for r in rows])
        assert clips[1] == pytest.approx(bound / norm(rows[1]), rel=1e-6) and clips[1] < 0.1
        assert clips[:1] + clips[2:] == [1.0] * 4
        await rig.stop_and_assert_all_acked()


# ---------------------------------------------------------------- robust aggregation


def old_fold(parent: FlatModel, updates: list[Update], policy: Policy) -> FlatModel:
    """The fold as it was before clipping and robust aggregation (aggregator/core.py at 2e769c9),
    with each multiply and add rounded on its own, as on any CPU now (no fused multiply-add)."""
    acc = torch.zeros(parent.spec.n_float)
    exact_acc = torch.zeros(parent.spec.n_exact, dtype=torch.float64)
    total, layout = 0.0, None
    for u in updates:
        floats, exact, lay = decode_delta_wire(u.delta, parent.spec, u.quant, u.block)
        if layout is None:
            layout = lay or block_layout(parent.spec.float_sizes, DEFAULT_BLOCK)
        if lay is not layout:
            floats = to_wire(floats if lay is None else to_flat(floats, lay), layout)
        w = policy.weight(u.num_samples, 0)
        acc.add_(floats * w)
        exact_acc.add_(exact.to(torch.float64) * w)
        total += policy.norm_weight(u.num_samples, 0)
    assert layout is not None
    scale = policy.server_lr / total
    floats = parent.floats + to_flat(acc, layout) * scale
    return parent.with_vectors(floats, parent.exact + torch.round(exact_acc * scale).to(torch.int64))


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_robust_none_is_the_old_fold_bit_for_bit(quant: str) -> None:
    updates = [update(f"h{i}", honest(i), exact=i, samples=3 + i, quant=quant) for i in range(7)]
    policy = Policy(k=7, server_lr=0.7, staleness=CONSTANT)
    c = core(policy)
    offer_all(c, updates)
    assert c.flush().model.to_bytes() == old_fold(model(), updates, policy).to_bytes()


ROWS = [  # 5 deltas, hand-made: coordinate 0 has one outlier, coordinate 1 two
    [1.0, -50.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [3.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [10.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [100.0, 70.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
]


@pytest.mark.parametrize(
    ("robust", "first", "second", "steps"),
    [
        ("median", 3.0, 2.0, 2),  # the middle of [1, 2, 3, 10, 100] and of [-50, 1, 2, 3, 70]; counters 0..4
        ("trimmed-mean:0.2", 5.0, 2.0, 2),  # mean of [2, 3, 10] and of [1, 2, 3]; of [1, 2, 3]
        ("trimmed-mean:0", 23.2, 5.2, 2),  # the plain (unweighted) mean
    ],
)
def test_robust_statistics_on_hand_made_deltas(robust: str, first: float, second: float, steps: int) -> None:
    policy = Policy(k=5, staleness=CONSTANT, clip=Clip("off"), robust=Robust.parse(robust))
    c = core(policy)
    # sample counts do not weigh in a robust statistic
    offer_all(c, [update(f"u{i}", row, exact=i, samples=1 + 10 * i) for i, row in enumerate(ROWS)])
    new = c.flush()
    step = (new.model.floats - model().floats).tolist()
    assert step[0] == pytest.approx(first) and step[1] == pytest.approx(second)
    assert step[2:] == [0.0] * (N - 2)
    assert new.model.exact.tolist() == [10 + steps]


def test_median_of_an_even_buffer_and_the_staleness_factor() -> None:
    rows = [torch.tensor([v]) for v in (1.0, 2.0, 4.0, 100.0)]
    assert Robust("median").combine(rows).tolist() == [3.0]
    assert Robust("trimmed-mean", 0.25).combine(rows).tolist() == [3.0]
    assert Robust("trimmed-mean", 0.1).combine(rows).tolist() == [26.75]  # 0.1 x 4 trims nothing
    p = Policy(staleness=Staleness("polynomial", 0.5))
    assert p.robust_factor(3) == 0.5  # normalize=samples: a stale delta takes a smaller step
    assert Policy(staleness=Staleness("polynomial", 0.5), normalize="weights").robust_factor(3) == 1.0
    assert Policy(mode="sync").robust_factor(0) == 1.0
    # Through the core: four stale deltas (tau = 3) of 2.0 move the coordinate by 2 x 0.5
    c = AggregatorCore(
        model(), 3, Policy(k=4, staleness=Staleness("polynomial", 0.5), robust=Robust("median")), JOB
    )
    offer_all(c, [update(f"s{i}", [2.0] * N, base=0) for i in range(4)])
    assert (c.flush().model.floats - model().floats).tolist() == [1.0] * N


def test_robust_aggregation_bounds_a_boosted_minority() -> None:
    deltas = [honest(i) for i in range(9)]
    attack = -20 * torch.stack(deltas).mean(0)
    updates = [update("evil", attack)] + [update(f"h{i}", d) for i, d in enumerate(deltas)]
    c = core(Policy(k=10, staleness=CONSTANT, robust=Robust("trimmed-mean", 0.1)))
    offer_all(c, updates)
    step = c.flush().model.floats - model().floats
    stacked = torch.stack(deltas)
    assert bool((step >= stacked.min(0).values - 1e-6).all() and (step <= stacked.max(0).values + 1e-6).all())


# ---------------------------------------------------------------- integer tensors


def test_integer_deltas_out_of_range_are_rejected() -> None:
    floats = torch.ones(3)
    assert screen(floats, torch.tensor([2**31, -(2**31), 0]), None) > 0  # the edge is allowed
    for bad in (2**31 + 1, -(2**31) - 1, -(2**63), 2**63 - 1):
        with pytest.raises(ScreeningError) as err:
            screen(floats, torch.tensor([0, bad]), None)
        assert err.value.reason is Reason.INT_OUT_OF_RANGE
    result = core(Policy()).offer(update("t", honest(0), exact=2**40))
    assert isinstance(result, Rejected) and result.reason is Reason.INT_OUT_OF_RANGE
    assert Reason.INT_OUT_OF_RANGE == "int_out_of_range"


# ---------------------------------------------------------------- settings and the policy record


def test_clip_and_robust_parse_describe_and_round_trip() -> None:
    for text, clip in [
        ("adaptive", Clip()),
        ("adaptive:2", Clip(factor=2.0)),
        ("adaptive:2.5,20,3", Clip(factor=2.5, window=20, warmup=3)),
        ("7.5", Clip("fixed", 7.5)),
        ("off", Clip("off")),
    ]:
        assert Clip.parse(text) == clip and Clip.parse(clip.describe()) == clip
    for text, robust in [
        ("none", Robust()),
        ("median", Robust("median")),
        ("trimmed-mean:0.1", Robust("trimmed-mean", 0.1)),
        ("cosine", Robust("cosine")),
    ]:
        assert Robust.parse(text) == robust and Robust.parse(robust.describe()) == robust
    p = Policy(clip=Clip("fixed", 0.1), robust=Robust("trimmed-mean", 0.3))
    record = {**p.to_dict(), "created_at": 1.0}
    manifest = Manifest(JOB, 1, 0, "", 0, "", (), 0.0, policy=record)
    assert policy_of(manifest) == p
    cos = replace(p, robust=Robust("cosine"))
    assert cos.to_dict()["robust"] == "cosine"
    assert policy_of(Manifest(JOB, 1, 0, "", 0, "", (), 0.0, policy=cos.to_dict())) == cos
    # A manifest from before clipping: its versions were made without either.
    old = {k: v for k, v in p.to_dict().items() if k not in ("clip", "robust")}
    assert policy_of(Manifest(JOB, 1, 0, "", 0, "", (), 0.0, policy=old)) == Policy(
        staleness=p.staleness, clip=Clip("off")
    )


@pytest.mark.parametrize(
    ("clip", "robust", "message"),
    [
        ("adaptive", "trimmed-mean:0.7", "F must be in [0, 0.5)"),
        ("adaptive", "trimmed-mean", "use none, trimmed-mean:F"),
        ("adaptive", "mean", "use none, trimmed-mean:F"),
        ("-3", "none", "positive"),
        ("nan", "none", "positive"),
        ("sometimes", "none", "use adaptive, a positive number"),
        ("adaptive:3,5,9", "none", "warm-up <= window"),
        ("adaptive:x", "none", "adaptive[:C[,window[,warmup]]]"),
    ],
)
def test_bad_clip_or_robust_is_a_config_error(clip: str, robust: str, message: str) -> None:
    settings = Settings.from_env({}, clip=clip, robust=robust)
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        AggregatorConfig.from_settings(settings)
    assert "--clip / FEDQ_CLIP" in str(err.value) or "--robust / FEDQ_ROBUST" in str(err.value)


def test_settings_default_and_environment() -> None:
    policy = AggregatorConfig.from_settings(Settings.from_env({})).policy
    assert policy.clip == Clip() and policy.robust == Robust()
    env = {"FEDQ_CLIP": "off", "FEDQ_ROBUST": "median"}
    policy = AggregatorConfig.from_settings(Settings.from_env(env)).policy
    assert policy.clip == Clip("off") and policy.robust == Robust("median")
    for command in ("aggregator", "run"):
        names = {f.name: f for f in flags(command)}
        assert "adaptive" in names["--clip"].help and "trimmed-mean:F" in names["--robust"].help


# ---------------------------------------------------------------- replay


async def a_run(tmp_path: Path, policy: Policy, batches: list[list[Update]]) -> Job:
    """Versions made by one core as the aggregator service makes them: each manifest's policy
    record carries the clip window after that version (``CLIP_WINDOW``)."""
    store = ModelStore(LocalStore(tmp_path / "store"), JOB)
    v0 = model()
    manifests = {0: Manifest.first(JOB, v0.to_bytes(), 0.0)}
    await store.save(manifests[0], v0.to_bytes())
    c = core(policy)
    logged = []
    for batch in batches:
        offer_all(c, batch)
        assert c.ready()  # the service makes a version only when the core says it is due
        new: NewVersion = c.flush()
        blob = new.model.to_bytes()
        digests = tuple(hashlib.sha256(u.delta).hexdigest() for u in batch)
        m = Manifest(
            JOB,
            new.version,
            new.parent,
            hashlib.sha256(blob).hexdigest(),
            len(blob),
            model_key(JOB, new.version),
            new.update_ids,
            0.0,
            policy={**policy.to_dict(), CLIP_WINDOW: list(new.clip_window)},
            updates_total=c.updates_total,
            update_digests=digests,
        )
        await store.save(m, blob)
        manifests[new.version] = m
        logged += [
            LoggedUpdate(StreamEntry(len(logged), None, u.delta), u, d, True)
            for u, d in zip(batch, digests, strict=True)
        ]
    return Job(Settings.from_env({}, job=JOB, out=str(tmp_path)), store, manifests, logged, [])


def clipped_run_batches() -> list[list[Update]]:
    """Three versions of 4 (5 in the first: the warm-up holds it until 5 norms are known):
    honest ones warm the clip up, version 3 holds a clipped attacker."""
    batches = [[update(f"h{v}.{i}", honest(4 * v + i), base=v) for i in range(4)] for v in range(2)]
    batches[0].append(update("h0.4", honest(12)))
    batches.append(
        [
            update("h2.0", honest(8), base=2),
            update("evil", honest(9) * -50, base=2),
            update("h2.1", honest(10), base=2),
            update("h2.2", honest(11), base=2),
        ]
    )
    return batches


async def test_replay_re_derives_a_clipped_version_bit_for_bit(tmp_path: Path) -> None:
    policy = Policy(k=4, staleness=CONSTANT)
    job = await a_run(tmp_path, policy, clipped_run_batches())
    assert len(clip_window_of(job.manifests[2].policy)) == 9  # the window version 3 started from
    replay = core(policy_of(job.manifests[3]), 2, clip_window_of(job.manifests[2].policy))
    replay.model = (await job.store.load(2))[1]
    evil = next(a for a in offer_all(replay, clipped_run_batches()[2]) if a.task_id == "evil")
    assert evil.clip < 0.1  # the attacker is clipped: this version depends on the window
    for v in (1, 2, 3):
        verdict = await verify_version(job, v)
        assert verdict.ok, verdict.problems
    # what-if with the recorded policy replays the whole run from v0 and reproduces every version
    curve = await what_if(job, policy_of(job.manifests[3]), None, "same")
    assert curve.shas == [job.manifests[v].sha256 for v in range(4)]


async def test_replay_fails_when_the_clip_is_not_replayed(tmp_path: Path) -> None:
    """The same run, but version 3's parent forgets its window (or the manifest its clip):
    version 3 no longer re-derives, so the check above is not vacuous."""
    policy = Policy(k=4, staleness=CONSTANT)
    job = await a_run(tmp_path, policy, clipped_run_batches())
    without_window = {k: v for k, v in job.manifests[2].policy.items() if k != CLIP_WINDOW}
    job.manifests[2] = Manifest(**{**job.manifests[2].__dict__, "policy": without_window})
    assert not (await verify_version(job, 3)).ok
    job = await a_run(tmp_path / "again", policy, clipped_run_batches())
    no_clip = {**job.manifests[3].policy, "clip": "off"}
    job.manifests[3] = Manifest(**{**job.manifests[3].__dict__, "policy": no_clip})
    verdict = await verify_version(job, 3)
    assert not verdict.ok and "differs" in verdict.problems[0]


def test_the_norm_the_clip_depends_on_is_the_same_on_any_thread_count() -> None:
    """The clip scale and the window come from ``screen``'s norm, a reduction: replay on another
    machine re-derives the same bytes only if its bits do not depend on the thread count."""
    x = torch.randn(1_000_003, generator=torch.Generator().manual_seed(3)) * 7
    before = torch.get_num_threads()
    try:
        bits = set()
        for threads in (1, 2, 3, 8):
            torch.set_num_threads(threads)
            bits.add(screen(x, torch.zeros(0, dtype=torch.int64), None).hex())
    finally:
        torch.set_num_threads(before)
    assert len(bits) == 1


def test_fedq_run_refuses_a_bad_policy_flag_before_it_starts_anything(tmp_path: Path) -> None:
    from fedq.run import run_job

    out = tmp_path / "run"
    settings = Settings.from_env({}, robust="trimmed-mean:0.7", out=str(out))
    with pytest.raises(ConfigError, match=re.escape("F must be in [0, 0.5)")):
        run_job(settings, workers=2, delay_profile="", progress=False)
    assert not out.exists()  # no run folder, no key, no process


# ---------------------------------------------------------------- --robust cosine


COSINE = Policy(k=9, staleness=CONSTANT, robust=Robust("cosine"))


def cosine_batch(attack: torch.Tensor) -> tuple[list[Update], list[Update]]:
    """8 honest updates (different sample counts and integer deltas) and one attacker, 4th."""
    good = [update(f"h{i}", honest(i), exact=i, samples=2 + i) for i in range(8)]
    return good, [*good[:3], update("evil", attack, exact=5, samples=4), *good[3:]]


def test_cosine_leaves_out_a_clipped_sign_flip_and_folds_the_honest_ones_exactly() -> None:
    good, updates = cosine_batch(-20 * torch.stack([honest(i) for i in range(8)]).mean(0))
    c = core(COSINE)
    offer_all(c, updates)
    new = c.flush()
    assert new.clips["evil"] < 0.2 and set(new.clips.values()) - {new.clips["evil"]} == {1.0}  # clipped first
    assert new.left_out == frozenset({"evil"}) and new.cosines["evil"] < 0
    assert all(new.cosines[u.task_id] > 0.5 for u in good)
    assert new.update_ids == tuple(u.task_id for u in updates)  # counted, though left out
    plain = core(Policy(k=8, staleness=CONSTANT))  # the weighted fold of the honest ones
    offer_all(plain, good)
    assert new.model.to_bytes() == plain.flush().model.to_bytes()


def test_cosine_leaves_out_noise_pointing_away_and_an_all_disagreeing_buffer_still_folds() -> None:
    direction = torch.stack([honest(i) for i in range(8)]).mean(0)
    g = torch.Generator().manual_seed(9)
    noise = torch.randn(N, generator=g)
    # mostly orthogonal to the honest direction, a little against it
    noise -= (noise @ direction) / (direction @ direction) * direction + 0.3 * direction
    c = core(COSINE)
    offer_all(c, cosine_batch(noise)[1])
    new = c.flush()
    assert new.cosines["evil"] <= 0 and new.left_out == frozenset({"evil"})
    # Two opposite pairs: each row's others have the opposite median, every cosine is -1, and
    # all are kept (the ``none`` fold): a version is never empty.
    rows = [torch.tensor([1.0, 2, 0, 0, 0, 0, 0, 0]), torch.tensor([-1.0, -2, 0, 0, 0, 0, 0, 0])] * 2
    updates = [update(f"u{i}", r, samples=1 + i) for i, r in enumerate(rows)]
    policy = Policy(k=4, staleness=CONSTANT, clip=Clip("off"))
    c = core(replace(policy, robust=Robust("cosine")))
    offer_all(c, updates)
    new = c.flush()
    assert all(v <= 0.0 for v in new.cosines.values()) and new.left_out == frozenset()
    plain = core(policy)
    offer_all(plain, updates)
    assert new.model.to_bytes() == plain.flush().model.to_bytes()


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_cosine_with_no_attacker_is_none_bit_for_bit(quant: str) -> None:
    updates = [update(f"h{i}", honest(i), exact=i, samples=3 + i, quant=quant) for i in range(9)]
    for policy in (COSINE, replace(COSINE, k=4, staleness=Staleness("polynomial", 0.5))):
        c, plain = core(policy, 2), core(replace(policy, robust=Robust()), 2)
        batch = [replace(u, base_version=i % 3) for i, u in enumerate(updates[: policy.k])]
        offer_all(c, batch)
        offer_all(plain, batch)
        new = c.flush()
        assert new.left_out == frozenset() and min(new.cosines.values()) > 0
        assert new.model.to_bytes() == plain.flush().model.to_bytes()


def test_a_fresh_core_re_derives_a_cosine_version_and_the_cosine_ignores_thread_count() -> None:
    _, updates = cosine_batch(honest(20) * -30)
    made = [core(COSINE), core(COSINE)]
    for c in made:
        offer_all(c, updates)
    first, second = (c.flush() for c in made)
    assert "evil" in first.left_out and first.left_out == second.left_out
    assert first.model.to_bytes() == second.model.to_bytes() and first.cosines == second.cosines
    a = torch.randn(1_000_003, generator=torch.Generator().manual_seed(3)) * 7
    b = a * 0.01 + torch.randn(1_000_003, generator=torch.Generator().manual_seed(4))
    before = torch.get_num_threads()
    try:
        bits = set()
        for threads in (1, 2, 3, 8):
            torch.set_num_threads(threads)
            bits.add(cosine(a, b).hex())
    finally:
        torch.set_num_threads(before)
    assert len(bits) == 1
    reference = float(torch.nn.functional.cosine_similarity(a.double(), b.double(), 0))
    assert cosine(a, b) == pytest.approx(reference, rel=1e-9)


async def test_replay_verifies_a_cosine_version(tmp_path: Path) -> None:
    policy = replace(COSINE, k=4)
    batches = clipped_run_batches()
    job = await a_run(tmp_path, policy, batches)
    assert policy_of(job.manifests[3]) == policy and job.manifests[3].policy["robust"] == "cosine"
    for v in (1, 2, 3):
        verdict = await verify_version(job, v)
        assert verdict.ok, verdict.problems


async def test_the_ledger_records_an_update_left_out(
    mem: MemoryTransport, names: Names, tmp_path: Path
) -> None:
    """A left-out update is applied in the ledger's sense (counted, acked), flagged ``left_out``."""
    async with aggregator_rig(mem, names, tmp_path, k=5) as rig:
        policy = Policy(k=5, clip=Clip("off"), robust=Robust("cosine"))
        assert rig.aggregator.core is not None
        rig.aggregator.policy = rig.aggregator.core.policy = policy
        rig.aggregator.core._reset_buffer()
        n = rig.model.spec.n_float
        g = torch.Generator().manual_seed(5)
        rows = [torch.full((n,), 0.01) + torch.randn(n, generator=g) * 0.002 for _ in range(4)]
        rows.insert(2, rows[0] * -20)
        ids = []
        for row in rows:
            tid, body = rig.update(floats=row, quant="none")
            ids.append(tid)
            await rig.send(body)
        await rig.wait_version(1)
        entries = [await rig.ledger_entry(tid, "applied") for tid in ids]
        assert [e["left_out"] for e in entries] == [False, False, True, False, False]
        assert entries[2]["cosine"] < 0 < min(e["cosine"] for e in entries if not e["left_out"])
        await rig.stop_and_assert_all_acked()


def test_a_row_is_not_its_own_witness() -> None:
    """Each delta is compared with the median of the others: in many dimensions a row's own values
    pull the median of ten towards it, enough to make noise look agreeable (in the poisoning
    benchmark, 0 of 40 noise updates were left out when each row counted in its own median)."""
    d = 4000
    g = torch.Generator().manual_seed(3)
    common = torch.randn(d, generator=g)
    rows = [0.3 * common + torch.randn(d, generator=g) for _ in range(8)]  # non-IID: mostly their own
    others = Robust("median").combine(rows)
    noise = torch.randn(d, generator=g)
    noise -= (noise @ others) / (others @ others) * others  # orthogonal to what the others agree on
    noise -= 0.01 * float(noise.norm()) * others / float(others.norm())  # and a little against it
    noise *= float(rows[0].norm() / noise.norm())
    assert cosine(noise, Robust("median").combine([*rows, noise])) > 0  # its own witness: it passes
    buffer = CosineBuffer(d, 0)
    for i, row in enumerate([*rows, noise]):
        buffer.add(f"t{i}", row, torch.zeros(0, dtype=torch.int64), 1.0, 1.0, 1.0)
    buffer.apply(torch.zeros(d), torch.zeros(0, dtype=torch.int64), 1.0)
    assert buffer.left_out == frozenset({"t8"})
