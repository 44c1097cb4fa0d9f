"""The pure core must not drag in the event loop, the broker client or the logging stack.

Checked in a fresh interpreter (this test process has already imported aio_pika via conftest).
When a forbidden module does get loaded, the failure names the import chain that loaded it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.jobs import ROOT

FORBIDDEN = ("asyncio", "aio_pika", "aiormq", "aioboto3", "structlog")
PURE = (
    "shared.codec",
    "shared.messages",
    "shared.signing",
    "shared.quantize",
    "shared.tensors",
    "shared.staleness",
    "shared.aggregation",
    "shared.partition",
    "shared.settings",
    "shared.reasons",
    "broker_config.names",
    "broker_config.topology",
    "shared.transport",
    "aggregator.core",
    "aggregator.config",
    "coordinator.registry",
    "coordinator.config",
    "coordinator.state",
    "coordinator.scheduler",
    "worker.decision",
    "worker.config",
)
TORCH_FREE = tuple(
    m for m in PURE if m not in {"shared.quantize", "shared.tensors", "shared.aggregation", "aggregator.core", "aggregator.config"}
)

# Runs in the child: a meta-path finder that never finds anything itself, but records the
# import stack the first time each forbidden top-level module is looked up.
PROBE = """
import json, sys, traceback
FORBIDDEN = set(sys.argv[1].split(","))
chains = {}

class Spy:
    @staticmethod
    def find_spec(name, path=None, target=None):
        top = name.partition(".")[0]
        if top in FORBIDDEN and top not in chains:
            frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.startswith("<")]
            chains[top] = [f"{f.filename}:{f.lineno}: {f.line}" for f in frames]
        return None

sys.meta_path.insert(0, Spy)
for module in sys.argv[2].split(","):
    __import__(module)
loaded = sorted(m for m in FORBIDDEN if m in sys.modules)
print(json.dumps({"loaded": loaded, "chains": {m: chains.get(m, []) for m in loaded}}))
"""


def probe(modules: tuple[str, ...]) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, ",".join(FORBIDDEN), ",".join(modules)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def pure_imports() -> dict[str, object]:
    return probe(PURE)


@pytest.mark.parametrize("forbidden", FORBIDDEN)
def test_pure_core_does_not_import(pure_imports: dict[str, object], forbidden: str) -> None:
    loaded, chains = pure_imports["loaded"], pure_imports["chains"]
    assert isinstance(loaded, list) and isinstance(chains, dict)
    chain = "\n  ".join(chains.get(forbidden, []))
    if forbidden == "asyncio" and forbidden in loaded:
        # torch itself loads asyncio (torch/_guards.py imports unittest.mock); that is torch's
        # doing, not the core's: the first frame outside the core that imports it is in torch.
        outside = [line for line in chains[forbidden] if str(ROOT) not in line or "/.venv/" in line]
        assert outside and "/torch/" in outside[0], f"asyncio is imported by the core itself, via:\n  {chain}"
        return
    assert forbidden not in loaded, f"{forbidden} is imported, via:\n  {chain}"


def test_torch_free_part_of_the_core_imports_nothing_forbidden() -> None:
    result = probe(TORCH_FREE)
    assert result["loaded"] == [], result["chains"]


def test_the_probe_sees_a_forbidden_import() -> None:
    """The spy works: importing the broker adapter is reported with its chain."""
    result = probe(("shared.transport.rabbitmq",))
    loaded = result["loaded"]
    assert isinstance(loaded, list) and "aio_pika" in loaded and "asyncio" in loaded
    chains = result["chains"]
    assert isinstance(chains, dict)
    assert any("shared/transport/rabbitmq.py" in line for line in chains["aio_pika"])
