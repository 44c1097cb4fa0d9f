"""FedAsync, FedOpt with FedProx, central DP and local DP as whole jobs: ``fedq run`` over the real
broker, each in a namespace of its own (the three run at once), then ``fedq replay verify --all``
re-derives every version of each: the mixing with stale bases, the server optimizer's stored
moments, the DP noise from the ledger's seeds, and the epsilon each manifest records."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest

from broker_config.names import Names
from shared.codec import decode_head, open_envelope, read_task_token
from shared.ledger import read_lines
from shared.messages import Update
from shared.transport.rabbitmq import RabbitMQ
from tests.support.broker import delete_namespace
from tests.support.jobs import TINY_APP, cli, finish, json_lines, start_run
from worker.training import COST_METRICS

pytestmark = pytest.mark.slow

JOBS = {
    "fedasync": ("--mode", "fedasync", "--fedasync-alpha", "0.6", "--max-staleness", "4"),
    # FedOpt after central DP's noise (post-processing: epsilon is the same), with FedProx's workers
    "central-dp": (
        *("--dp-clip", "1.0", "--dp-noise", "0.5", "--buffer", "2"),
        *("--server-opt", "adam", "--server-lr", "0.01", "--prox-mu", "0.01"),
    ),
    "local-dp": ("--dp-local", "--dp-clip", "1.0", "--dp-noise", "0.5", "--buffer", "2"),
}


async def logged_updates(amqp_url: str, names: Names) -> list[Update]:
    reader = await RabbitMQ(amqp_url, names, "test-learning-reader").connect()
    try:
        entries = await reader.read_all(names.update_log)
    finally:
        await reader.close()
    updates = [decode_head(open_envelope(e.body)) for e in entries]
    return [u for u in updates if isinstance(u, Update)]


def test_each_rule_runs_as_a_job_and_replays_exactly(tmp_path: Path, amqp_url: str) -> None:
    spaces = {rule: Names(f"t-{uuid.uuid4().hex[:10]}") for rule in JOBS}
    try:
        procs = {
            rule: start_run(
                tmp_path / rule,
                spaces[rule],
                *TINY_APP,
                *args,
                "--workers",
                "2",
                "--target-accuracy",
                "0",
                "--max-versions",
                "4",
                amqp_url=amqp_url,
            )
            for rule, args in JOBS.items()
        }
        for proc in procs.values():
            finish(proc, timeout=150)
        for rule in JOBS:
            out = tmp_path / rule
            summary = json.loads((out / "summary.json").read_text())
            assert summary["versions"] >= 4, (rule, summary)
            verified = cli("replay", "verify", str(out), "--all", "--json")
            assert verified.returncode == 0, (rule, verified.stdout + verified.stderr)
            verdicts = json_lines(verified.stdout)
            assert len(verdicts) >= 5 and all(v["ok"] for v in verdicts), (rule, verdicts)
            manifests = sorted((out / "store").rglob("v*.json"))
            policy = json.loads(manifests[-1].read_text())["policy"]
            metrics = list(read_lines(out / "metrics.jsonl"))
            if rule.endswith("dp"):
                eps = [m["dp_epsilon"] for m in metrics if m["version"] > 0]
                assert eps == sorted(eps) and eps[0] > 0, (rule, eps)  # it only grows
                # summary.json: after the newest version made (some may be made after the last evaluated)
                assert summary["dp_epsilon"] == policy["dp_accounting"]["epsilon"] >= eps[-1]
            else:
                assert summary["dp_epsilon"] is None and not any("dp_epsilon" in m for m in metrics)
        refused = cli("replay", "what-if", str(tmp_path / "central-dp"), "--buffer", "3")
        assert refused.returncode != 0 and "central DP" in refused.stdout + refused.stderr
        mixing = cli("replay", "what-if", str(tmp_path / "fedasync"), "--buffer", "3")
        assert mixing.returncode != 0 and "--mode async" in mixing.stdout + mixing.stderr
        # central DP: a noise seed per version in the ledger, none under local DP (the workers add it)
        seeds = [r for r in read_lines(tmp_path / "central-dp" / "ledger.jsonl") if r.get("kind") == "dp_noise"]
        assert len({r["version"] for r in seeds}) >= 4
        assert not [r for r in read_lines(tmp_path / "local-dp" / "ledger.jsonl") if r.get("kind") == "dp_noise"]
        # FedOpt's moments are stored beside each version; FedProx's mu is in every task
        assert list((tmp_path / "central-dp" / "store").rglob("v000004.state"))
        updates = asyncio.run(logged_updates(amqp_url, spaces["central-dp"]))
        assert updates and {read_task_token(u.task).train.prox_mu for u in updates} == {0.01}
        local = asyncio.run(logged_updates(amqp_url, spaces["local-dp"]))
        assert local and all(set(u.metrics) == COST_METRICS for u in local)
        assert {read_task_token(u.task).dp_noise for u in local} == {0.5}
    finally:
        for rule, names in spaces.items():
            jobs = tuple(
                json.loads(p.read_text())["settings"]["job"] for p in (tmp_path / rule).rglob("config.json")
            )
            asyncio.run(delete_namespace(amqp_url, names, ("cpu",), jobs))
