"""Fold one fixed run of updates under each robust rule and print the versions' sha256 as JSON.

``write_run`` pickles the model and the updates (made once, in the test's process: torch's own
random draws differ between CPU capabilities); ``python -m tests.support.capability_fold RUN`` folds
them in a process whose ``ATEN_CPU_CAPABILITY`` was set before torch was imported.
``tests/test_capability.py`` compares the output across the CPU capabilities torch can dispatch
to (default, avx2, avx512), which must not change a bit.

The updates go through ``AggregatorCore.offer`` and ``flush`` as the aggregator and replay put
them: int8 (two block sizes, so one is reordered into the buffer's) and fp32 deltas, staleness
0-3 under a polynomial weight, uneven sample counts, three boosted deltas that the clip scales
down, an integer counter, and three versions in a row, so each one's clip window starts the next.
The same updates go through FedOpt's optimizers (their moments carried from version to version),
central DP's noise and FedAsync's mixing (a version per update).
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import torch

from aggregator.core import Accepted, AggregatorCore
from shared.aggregation import Clip, Policy, Robust
from shared.messages import Update
from shared.privacy import Dp
from shared.quantize import encode_delta
from shared.server_opt import ServerOpt
from shared.staleness import Staleness
from shared.tensors import FlatModel

JOB = "capability"
RULES = ("none", "trimmed-mean:0.2", "median", "cosine")
CLIPS = ("adaptive:1.5,20,4", "0.9")
VERSIONS = 3
K = 6


def model() -> FlatModel:
    """Tensors of awkward sizes (none a multiple of a block; a tail before full blocks)."""
    g = torch.Generator().manual_seed(11)
    return FlatModel.from_state_dict(
        {
            "a": torch.randn(37, 29, generator=g),
            "b": torch.randn(3001, generator=g),
            "c": torch.randn(5, 777, generator=g) * 1e-3,
            "steps": torch.tensor(10, dtype=torch.int64),
        }
    )


def updates(base: FlatModel, version: int) -> list[Update]:
    """The K updates folded into ``version + 1``, some of them boosted well past the others."""
    spec, out = base.spec, []
    for i in range(K):
        g = torch.Generator().manual_seed(1000 * version + i)
        delta = torch.randn(spec.n_float, generator=g) * (0.01 + 0.003 * i)
        if i in (2, 5) or (version, i) == (1, 0):
            delta = delta * -40
        quant, block = ("none", 256) if i % 3 == 0 else ("int8", 256 if i % 3 == 1 else 64)
        payload = encode_delta(
            delta, torch.tensor([3 + i]), spec, quant, block, torch.Generator().manual_seed(i)
        )
        base_version = version - min(i % 4, version)
        out.append(
            Update(
                f"t-{version}-{i}",
                JOB,
                f"w-{i}",
                base_version,
                7 + 13 * i,
                quant,
                block,
                {},
                0.0,
                delta=payload,
            )
        )
    return out


def write_run(path: Path) -> None:
    """The model and each version's updates, as the children read them."""
    base = model()
    batches = [updates(base, version) for version in range(VERSIONS)]
    path.write_bytes(pickle.dumps((base.to_bytes(), batches)))


def run(parent: FlatModel, batches: list[list[Update]], policy: Policy) -> list[str]:
    """The sha256 of each version the run makes (under central DP, version v's noise is seeded v)."""
    core = AggregatorCore(parent, 0, policy, JOB)
    if policy.mode == "fedasync":  # a version of each update, mixed with the version it is based on
        core.bases[0] = (parent.floats, parent.exact)
        batches = [[u] for batch in batches for u in batch]
    shas = []
    for batch in batches:
        for u in batch:
            verdict = core.offer(u)
            if not isinstance(verdict, Accepted):
                raise SystemExit(f"update rejected: {verdict}")
        new = core.flush(core.version if policy.central_dp else None)
        if policy.mode != "fedasync" and not any(a.clip < 1.0 for a in new.accepted):
            raise SystemExit(f"nothing was clipped in v{new.version}: the probe would not test the clip")
        shas.append(new.model.sha256())
    return shas


def learning_rules() -> dict[str, Policy]:
    """FedOpt's optimizers, central DP's noise and FedAsync's mixing, over the same updates."""
    fixed = Clip.parse("0.9")
    common = {"k": K, "server_lr": 0.7, "staleness": Staleness("polynomial", 0.5), "clip": fixed}
    rules = {f"server-opt {kind}": Policy(**common, server_opt=ServerOpt(kind)) for kind in ("avgm", "adam", "yogi")}  # type: ignore[arg-type]
    rules["central dp"] = Policy(**common, weighting="uniform", dp=Dp(0.9, 1.0), server_opt=ServerOpt("adam"))  # type: ignore[arg-type]
    rules["fedasync"] = Policy(mode="fedasync", alpha=0.6, staleness=Staleness("polynomial", 0.5), clip=fixed)
    return rules


def main() -> None:
    torch.set_num_threads(1)
    raw, batches = pickle.loads(Path(sys.argv[1]).read_bytes())
    shas = {
        f"{rule} clip={clip}": run(
            FlatModel.from_bytes(raw),
            batches,
            Policy(
                k=K,
                server_lr=0.7,
                staleness=Staleness("polynomial", 0.5),
                clip=Clip.parse(clip),
                robust=Robust.parse(rule),
            ),
        )
        for rule in RULES
        for clip in CLIPS
    }
    for label, policy in learning_rules().items():
        shas[label] = run(FlatModel.from_bytes(raw), batches, policy)
    print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "shas": shas}))


if __name__ == "__main__":
    main()
