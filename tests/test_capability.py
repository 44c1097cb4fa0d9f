"""Replay is exact on any CPU: folding the same updates gives the same bytes whichever kernels
torch dispatches to (``ATEN_CPU_CAPABILITY``: default, avx2, avx512)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.capability_fold import write_run

ROOT = Path(__file__).resolve().parent.parent
X86 = ("default", "avx2", "avx512")


def capabilities() -> list[str]:
    """This CPU's capability and every one below it that torch can be told to use."""
    native = torch.backends.cpu.get_cpu_capability().lower()
    if native in X86:
        return list(X86[: X86.index(native) + 1])
    return ["default", native]


def test_a_fold_gives_the_same_bytes_under_every_cpu_capability(tmp_path: Path) -> None:
    caps = capabilities()
    if len(caps) < 2:
        pytest.skip(f"torch runs only its {caps[0]} kernels on this CPU: nothing to compare")
    run = tmp_path / "run.pickle"
    write_run(run)
    children = {
        cap: subprocess.Popen(
            [sys.executable, "-m", "tests.support.capability_fold", str(run)],
            cwd=ROOT,
            env={**os.environ, "ATEN_CPU_CAPABILITY": cap},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cap in caps
    }
    results: dict[str, Any] = {}
    for cap, child in children.items():
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        results[cap] = json.loads(out)
        assert results[cap]["capability"].lower() == cap  # torch did use the kernels asked for
    native = results[caps[-1]]["shas"]
    # four robust rules, each with an adaptive and a fixed clip; three server optimizers, central DP, FedAsync
    assert len(native) == 13
    for cap in caps[:-1]:
        differ = [rule for rule, shas in results[cap]["shas"].items() if shas != native[rule]]
        assert not differ, f"{cap} and {caps[-1]} fold to other bytes under {differ}"
