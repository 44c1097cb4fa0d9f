"""The learning rules beside FedBuff, in the aggregator's pure core: FedAsync's mixing, FedOpt's
server optimizers and their state, central DP's clip, noise and epsilon. No broker."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aggregator.core import Accepted, AggregatorCore, DpRecord, Rejected
from shared.aggregation import Clip, Policy, Robust
from shared.errors import ConfigError, CorruptVersionError
from shared.messages import Update
from shared.privacy import Dp, compose, epsilon, gaussian, noise_for
from shared.quantize import encode_delta
from shared.reasons import Reason
from shared.server_opt import ServerOpt, ServerState
from shared.staleness import Staleness
from shared.tensors import FlatModel

JOB = "job"
CONSTANT = Staleness("constant")
N = 6


def model(values: list[float] | None = None) -> FlatModel:
    w = torch.tensor(values or [1.0, 2.0, 3.0, 4.0, 0.5, -1.0])
    return FlatModel.from_state_dict({"w": w, "steps": torch.tensor(10, dtype=torch.int64)})


def update(task_id: str, floats: list[float], base: int = 0, worker: str = "w-1", steps: int = 0) -> Update:
    spec = model().spec
    f = torch.tensor(floats, dtype=torch.float32)
    delta = encode_delta(f, torch.tensor([steps]), spec, "none", 256, torch.Generator().manual_seed(0))
    return Update(task_id, JOB, worker, base, 1, "none", 256, {}, 0.0, delta=delta)


def core(policy: Policy, version: int = 0, **kw: object) -> AggregatorCore:
    return AggregatorCore(model(), version, policy, JOB, **kw)  # type: ignore[arg-type]


def fedasync(alpha: float = 0.5, staleness: Staleness = CONSTANT) -> Policy:
    return Policy(mode="fedasync", alpha=alpha, staleness=staleness, clip=Clip("off"))


# ---------------------------------------------------------------- FedAsync


def test_fedasync_mixes_the_workers_model_into_the_current_one() -> None:
    """x <- (1 - a) x + a (x_base + delta): with a stale base this is not x + a delta (buffer 1)."""
    c = core(fedasync(alpha=0.5, staleness=Staleness("polynomial", 1.0)))
    c.bases[0] = (c.model.floats.clone(), c.model.exact.clone())
    base = c.model.floats.clone()
    assert isinstance(c.offer(update("t1", [1.0] * N)), Accepted) and c.ready()
    c.flush()
    x1 = c.model.floats.clone()
    assert torch.equal(x1, base + 0.5 * torch.ones(N))  # tau 0: a = 0.5
    assert isinstance(c.offer(update("t2", [2.0] * N, base=0)), Accepted)  # tau 1: a = 0.5 / 2
    c.flush()
    a = 0.25
    expected = (1 - a) * x1.double() + a * (base.double() + 2.0)
    assert torch.allclose(c.model.floats.double(), expected, atol=1e-6)
    buffer_one = x1.double() + a * 2.0  # FedBuff's rule with k = 1 and eta = alpha
    assert not torch.allclose(c.model.floats.double(), buffer_one, atol=1e-3)
    assert c.version == 2 and c.model.exact.tolist() == [10]


def test_fedasync_makes_a_version_of_every_update_and_keeps_the_bases_staleness_allows() -> None:
    policy = Policy(mode="fedasync", k=10, max_staleness=2, clip=Clip("off"))
    c = core(policy)
    c.bases[0] = (c.model.floats.clone(), c.model.exact.clone())
    for i in range(5):
        assert isinstance(c.offer(update(f"t{i}", [0.1] * N, base=c.version)), Accepted)
        assert c.ready()  # one update is a version, whatever the buffer size says
        c.flush()
    assert sorted(c.bases) == [3, 4, 5]  # versions older than max staleness are forgotten


def test_fedasync_refuses_an_update_whose_base_it_does_not_hold() -> None:
    c = core(fedasync(), version=3)  # resumed without the bases (a store that lost them)
    result = c.offer(update("t1", [0.1] * N, base=2))
    assert isinstance(result, Rejected) and result.reason is Reason.STALE and "not held" in result.detail


def test_fedasync_replay_from_the_same_bases_gives_the_same_bytes() -> None:
    def run() -> bytes:
        c = core(fedasync(alpha=0.6, staleness=Staleness("polynomial", 0.5)))
        c.bases[0] = (c.model.floats.clone(), c.model.exact.clone())
        for i, base in enumerate([0, 0, 1, 1, 3]):
            c.offer(update(f"t{i}", [0.3 * (i + 1)] * N, base=base, steps=2))
            c.flush()
        return c.model.to_bytes()

    assert run() == run()


def test_fedasync_refuses_what_only_a_buffer_can_do() -> None:
    with pytest.raises(ConfigError, match="server-opt"):
        Policy(mode="fedasync", server_opt=ServerOpt("adam"))
    with pytest.raises(ConfigError, match="robust"):
        Policy(mode="fedasync", robust=Robust("median"))
    with pytest.raises(ConfigError, match="alpha"):
        Policy(mode="fedasync", alpha=0.0)


# ---------------------------------------------------------------- FedOpt


def reference(kind: str, x: np.ndarray, grads: list[np.ndarray], lr: float, b1: float, b2: float, tau: float) -> np.ndarray:
    """FedOpt in float64, as Reddi et al. write it (m = 0, v = tau^2 to start, no bias correction)."""
    m, v = np.zeros_like(x), np.full_like(x, tau * tau)
    for d in grads:
        if kind == "avgm":
            m = b1 * m + d
            x = x + lr * m
            continue
        m = b1 * m + (1 - b1) * d
        v = b2 * v + (1 - b2) * d * d if kind == "adam" else v - (1 - b2) * d * d * np.sign(v - d * d)
        x = x + lr * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("kind", ["avgm", "adam", "yogi"])
def test_server_optimizers_follow_the_papers_rule(kind: str) -> None:
    opt = ServerOpt(kind, 0.9, 0.99, 1e-3)
    c = core(Policy(k=2, server_lr=0.1, staleness=CONSTANT, clip=Clip("off"), server_opt=opt))
    x0 = c.model.floats.double().numpy()
    rng = np.random.default_rng(1)
    grads = []
    for v in range(4):
        pair = [rng.normal(size=N).astype(np.float32) for _ in range(2)]
        for i, d in enumerate(pair):
            c.offer(update(f"t{v}.{i}", d.tolist(), base=v))
        c.flush()
        grads.append((pair[0].astype(np.float64) + pair[1]) / 2)
    expected = reference(kind, x0, grads, 0.1, 0.9, 0.99, 1e-3)
    assert np.allclose(c.model.floats.double().numpy(), expected, rtol=1e-4, atol=1e-5)
    assert c.model.exact.tolist() == [10]
    assert c.server_state is not None and c.server_state.size == N


def test_a_core_resumed_from_the_stored_state_continues_bit_for_bit() -> None:
    """What a restart, a standby and replay do: the parent's moments, read back from their bytes."""
    policy = Policy(k=2, server_lr=0.05, staleness=CONSTANT, clip=Clip("off"), server_opt=ServerOpt("adam"))
    batches = [[update(f"t{v}.{i}", [0.1 * (i + 1) * (v + 1)] * N, base=v) for i in range(2)] for v in range(4)]
    straight = core(policy)
    for batch in batches:
        for u in batch:
            straight.offer(u)
        straight.flush()
    first = core(policy)
    for batch in batches[:2]:
        for u in batch:
            first.offer(u)
        new = first.flush()
    assert new.server_state is not None
    state = ServerState.from_bytes(new.server_state.to_bytes())
    resumed = AggregatorCore(new.model, 2, policy, JOB, server_state=state)
    for batch in batches[2:]:
        for u in batch:
            resumed.offer(u)
        resumed.flush()
    assert resumed.model.to_bytes() == straight.model.to_bytes()
    # without the moments (a fresh optimizer) the same updates give another model: the state matters
    forgetful = AggregatorCore(new.model, 2, policy, JOB)
    for batch in batches[2:]:
        for u in batch:
            forgetful.offer(u)
        forgetful.flush()
    assert forgetful.model.to_bytes() != straight.model.to_bytes()


def test_server_state_bytes_are_checked() -> None:
    state = ServerOpt("yogi").start(4)
    assert ServerState.from_bytes(state.to_bytes()).to_bytes() == state.to_bytes()
    for bad in (b"", b"junk", state.to_bytes()[:-1], state.to_bytes() + b"\0"):
        with pytest.raises(CorruptVersionError):
            ServerState.from_bytes(bad)
    assert ServerOpt.parse(ServerOpt("adam", 0.8, 0.95, 0.01).describe()) == ServerOpt("adam", 0.8, 0.95, 0.01)
    with pytest.raises(ConfigError, match="unknown server optimizer"):
        ServerOpt("lamb")


# ---------------------------------------------------------------- central DP


def dp_policy(clip: float = 1.0, noise: float = 1.0, k: int = 2) -> Policy:
    return Policy(
        k=k, staleness=CONSTANT, clip=Clip("fixed", clip), weighting="uniform", dp=Dp(clip, noise, 1e-5)
    )


def test_central_dp_clips_adds_seeded_noise_and_leaves_the_counters() -> None:
    def version(seed: int) -> torch.Tensor:
        c = core(dp_policy(clip=1.0, noise=2.0))
        c.offer(update("t1", [3.0] * N, steps=5, worker="w-1"))  # norm 7.3: clipped to 1
        c.offer(update("t2", [0.0] * N, steps=5, worker="w-2"))
        new = c.flush(seed)
        assert new.model.exact.tolist() == [10]  # batch counters count samples: not under DP
        assert new.dp is not None and new.dp.noise_seed == seed
        return new.model.floats - model().floats

    step = version(7)
    assert torch.equal(step, version(7))  # the seed decides the noise: replay re-derives it
    assert not torch.equal(step, version(8))
    clipped = torch.full((N,), 3.0) / math.sqrt(9.0 * N)  # the first update, clipped to norm 1
    noise = torch.from_numpy(gaussian(7, N)) * 2.0  # std z C on the sum
    assert torch.allclose(step, (clipped + noise) / 2, atol=1e-6)


def test_central_dp_needs_a_seed_and_the_rules_its_noise_is_calibrated_for() -> None:
    c = core(dp_policy())
    c.offer(update("t1", [0.1] * N))
    with pytest.raises(ValueError, match="seed"):
        c.flush()
    dp = Dp(1.0, 1.0)
    with pytest.raises(ConfigError, match="robust"):
        Policy(clip=Clip("fixed", 1.0), weighting="uniform", dp=dp, robust=Robust("cosine"))
    with pytest.raises(ConfigError, match="clip"):
        Policy(clip=Clip("adaptive"), weighting="uniform", dp=dp)
    with pytest.raises(ConfigError, match="uniform"):
        Policy(clip=Clip("fixed", 1.0), dp=dp)
    with pytest.raises(ConfigError, match="dp-noise"):
        Dp(1.0, 0.0)


def test_epsilon_composes_per_version_and_counts_a_worker_with_several_updates() -> None:
    c = core(dp_policy(noise=1.5))
    for v in range(3):
        c.offer(update(f"a{v}", [0.1] * N, base=v, worker="w-1"))
        c.offer(update(f"b{v}", [0.1] * N, base=v, worker="w-2"))
        new = c.flush(v)
    assert new.dp is not None and new.dp.events == ((1.5, 3),)
    assert new.dp.epsilon == epsilon(((1.5, 3),), 1e-5) > 0
    # one worker sent both updates of the next version: its sum moved by two clips
    c.offer(update("c1", [0.1] * N, base=3, worker="w-1"))
    c.offer(update("c2", [0.1] * N, base=3, worker="w-1"))
    after = c.flush(9)
    assert after.dp is not None and after.dp.events == ((1.5, 3), (0.75, 1))
    assert after.dp.epsilon > new.dp.epsilon
    # the accounting survives a restart through the manifest's record
    record = DpRecord.of({"dp_accounting": after.dp.to_dict()})
    assert record is not None and (record.events, record.epsilon) == (after.dp.events, after.dp.epsilon)


def test_local_dp_accounts_for_the_worker_that_sent_the_most() -> None:
    policy = Policy(k=2, staleness=CONSTANT, clip=Clip("off"), dp=Dp(1.0, 1.0, 1e-5, local=True))
    c = core(policy)
    c.offer(update("a", [0.1] * N, worker="w-1", steps=3))
    c.offer(update("b", [0.1] * N, worker="w-1", steps=3))
    new = c.flush()  # no seed: the workers added the noise
    assert new.dp is not None and new.dp.counts == {"w-1": 2} and new.dp.noise_seed is None
    assert new.dp.epsilon == epsilon(((1.0, 2),), 1e-5)
    assert new.model.exact.tolist() == [10]


def test_the_accountant_is_monotone_and_noise_for_inverts_it() -> None:
    assert epsilon((), 1e-5) == 0.0
    assert epsilon(((2.0, 10),), 1e-5) < epsilon(((1.0, 10),), 1e-5) < epsilon(((1.0, 20),), 1e-5)
    assert compose(compose((), 1.0), 1.0) == ((1.0, 2),)
    z = noise_for(4.0, 50, 1e-5)
    assert epsilon(((z, 50),), 1e-5) <= 4.0 < epsilon(((z * 0.99, 50),), 1e-5)
