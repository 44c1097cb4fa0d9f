"""``--weighting samples|uniform``: what an update weighs before staleness scaling, its record in
the manifest's policy, and replay re-deriving a uniform version bit for bit. Pure core and a
local store; no broker."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aggregator.config import AggregatorConfig
from fedq.replay import policy_of, verify_version, what_if
from shared.aggregation import Clip, Policy
from shared.errors import ConfigError
from shared.settings import Settings
from shared.staleness import Staleness
from shared.store import Manifest
from tests.test_influence import JOB, N, a_run, core, model, offer_all, update

POLY = Staleness("polynomial", 0.5)
# Base version and sample count of each update, offered to a core at version 3: taus 0, 1, 3, 2.
BUFFER = [(3, 1), (2, 1000), (0, 7), (1, 50)]


def deltas() -> list[torch.Tensor]:
    return [torch.full((N,), float(i + 1)) * (1 if i % 2 else -1) for i in range(len(BUFFER))]


def fold(weighting: str) -> torch.Tensor:
    c = core(Policy(k=len(BUFFER), staleness=POLY, clip=Clip("off"), weighting=weighting), version=3)
    ups = [
        update(f"t{i}", d, base=b, samples=n)
        for i, (d, (b, n)) in enumerate(zip(deltas(), BUFFER, strict=True))
    ]
    offer_all(c, ups)
    return c.flush().model.floats.to(torch.float64)


@pytest.mark.parametrize("weighting", ["samples", "uniform"])
def test_the_buffer_folds_to_the_mean_its_weighting_names(weighting: str) -> None:
    """x + sum(n_i (1+tau_i)^-0.5 d_i) / sum(n_i); n_i = 1 for uniform, the sample count else."""
    base = model().floats.to(torch.float64)
    counts = [float(n) if weighting == "samples" else 1.0 for _, n in BUFFER]
    scaled = [c * (1 + 3 - b) ** -0.5 for c, (b, _) in zip(counts, BUFFER, strict=True)]
    expected = base + sum(w * d.to(torch.float64) for w, d in zip(scaled, deltas(), strict=True)) / sum(
        counts
    )
    got = fold(weighting)
    assert torch.allclose(got, expected, rtol=0, atol=1e-5), (got, expected)
    other = fold("uniform" if weighting == "samples" else "samples")
    assert not torch.allclose(other, expected, rtol=0, atol=1e-2)  # the two rules differ here


def test_the_default_is_samples_and_the_setting_reaches_the_policy() -> None:
    assert AggregatorConfig.from_settings(Settings.from_env({})).policy.weighting == "samples"
    env = {"FEDQ_WEIGHTING": "uniform"}
    assert AggregatorConfig.from_settings(Settings.from_env(env)).policy.weighting == "uniform"
    with pytest.raises(ConfigError, match="--weighting / FEDQ_WEIGHTING"):
        AggregatorConfig.from_settings(Settings.from_env({}, weighting="equal"))


def test_the_manifest_policy_round_trips_the_weighting() -> None:
    for weighting in ("samples", "uniform"):
        p = Policy(staleness=POLY, weighting=weighting)
        assert p.to_dict()["weighting"] == weighting
        assert policy_of(Manifest(JOB, 1, 0, "", 0, "", (), 0.0, policy=p.to_dict())) == p
    # A manifest from before the setting: its versions were sample-weighted.
    old = {k: v for k, v in Policy(weighting="uniform").to_dict().items() if k != "weighting"}
    assert policy_of(Manifest(JOB, 1, 0, "", 0, "", (), 0.0, policy=old)).weighting == "samples"


async def test_replay_re_derives_a_uniform_version_bit_for_bit(tmp_path: Path) -> None:
    policy = Policy(k=5, staleness=POLY, clip=Clip("off"), weighting="uniform")
    samples = (1, 900, 30, 4, 250)
    batches = [
        [
            update(
                f"v{v}.{i}", torch.randn(N, generator=torch.Generator().manual_seed(10 * v + i)), samples=n
            )
            for i, n in enumerate(samples)
        ]
        for v in range(2)
    ]
    job = await a_run(tmp_path, policy, batches)
    for v in (1, 2):
        verdict = await verify_version(job, v)
        assert verdict.ok, verdict.problems
    curve = await what_if(job, policy_of(job.manifests[2]), None, "same")
    assert curve.shas == [job.manifests[v].sha256 for v in range(3)]
    # Replayed as sample-weighted (what the manifest said before the setting), it does not re-derive.
    sampled = {**job.manifests[2].policy, "weighting": "samples"}
    job.manifests[2] = Manifest(**{**job.manifests[2].__dict__, "policy": sampled})
    assert not (await verify_version(job, 2)).ok
