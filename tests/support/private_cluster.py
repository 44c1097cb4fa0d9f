"""A private 3-node RabbitMQ cluster for fault tests: nodes a test may SIGKILL and start again.

Each node is a ``PrivateRabbit`` (tests/support/private_broker.py): its own node name, AMQP and
distribution ports, data directory and ``HOME``, but one Erlang cookie for all. The nodes find each
other by classic_config peer discovery (every node's rabbitmq.conf lists all three): the first
node boots alone, then the others start together and join it (a blank node joins the first listed
peer that answers; two blank nodes started at once with no peer up could each form a cluster of
their own, so the first boots before them). A node started again after a kill keeps its name and
data directory: it rejoins the cluster from its own data and its quorum and stream members catch up.

The machine's shared RabbitMQ (127.0.0.1:5672) is never touched: every node is a child of the test
run, killed at the fixture's end.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from shared.amqp_urls import join_urls
from tests.support.private_broker import PrivateBrokerError, PrivateRabbit

SIZE = 3
JOIN_TIMEOUT = 90.0


def peer_discovery(nodes: list[str]) -> tuple[str, ...]:
    """rabbitmq.conf lines that make a blank node join the cluster of ``nodes``."""
    return (
        "cluster_formation.peer_discovery_backend = classic_config",
        *(f"cluster_formation.classic_config.nodes.{i} = {n}" for i, n in enumerate(nodes, 1)),
    )


class PrivateCluster:
    """``size`` private nodes joined in one cluster; ``nodes[i]`` is the i-th, ``amqp_url`` lists them all."""

    def __init__(self, root: Path, size: int = SIZE, *, conf: tuple[str, ...] = ()) -> None:
        tag = secrets.token_hex(3)
        names = [f"fedq-c{tag}-{i}@localhost" for i in range(size)]
        cookie = secrets.token_hex(16).upper()
        self.nodes = [
            PrivateRabbit(root / f"node{i}", node=name, cookie=cookie, conf=(*peer_discovery(names), *conf))
            for i, name in enumerate(names)
        ]

    @property
    def amqp_urls(self) -> list[str]:
        return [node.amqp_url for node in self.nodes]

    @property
    def amqp_url(self) -> str:
        """Every node's URL, as ``--amqp-url`` takes a list: the first that answers is used."""
        return join_urls(self.amqp_urls)

    def start(self) -> None:
        """Start every node that is down (the first alone when none runs, then the rest together) and
        return once all run as one cluster."""
        down = [n for n in self.nodes if not n.running]
        if len(down) == len(self.nodes):
            down[0].start()
            down = down[1:]
        with ThreadPoolExecutor(max_workers=max(1, len(down))) as pool:
            for future in [pool.submit(n.start) for n in down]:
                future.result()
        self.wait_joined()

    def kill(self, i: int) -> None:
        """SIGKILL node ``i`` (its whole process group): a crash, not a shutdown."""
        self.nodes[i].kill()

    def restart(self, i: int) -> None:
        """Start node ``i`` again (same name, same data) and wait until the cluster counts it running."""
        self.nodes[i].start()
        self.wait_joined()

    def any_running(self) -> PrivateRabbit:
        for node in self.nodes:
            if node.running:
                return node
        raise PrivateBrokerError("no node of the cluster runs")

    def running_nodes(self) -> set[str]:
        """The nodes the cluster counts as running, as a running node sees it."""
        status = self.any_running().ctl("cluster_status", "--formatter", "json", timeout=30)
        return set(json.loads(status.stdout)["running_nodes"])

    def wait_joined(self, timeout: float = JOIN_TIMEOUT) -> None:
        """Until every node that runs here is in the cluster's running nodes."""
        want = {n.node for n in self.nodes if n.running}
        deadline = time.monotonic() + timeout
        seen: set[str] = set()
        while time.monotonic() < deadline:
            with contextlib.suppress(PrivateBrokerError, ValueError, KeyError):
                seen = self.running_nodes()
                if want <= seen:
                    return
            time.sleep(0.3)
        raise PrivateBrokerError(f"the cluster counts {sorted(seen)} running, not all of {sorted(want)}")

    def members(self) -> dict[str, tuple[str, set[str], set[str]]]:
        """Every quorum queue and stream by name: its type, its members and those of them online."""
        listing = self.any_running().ctl(
            "list_queues", "name", "type", "members", "online", "--formatter", "json", timeout=30
        )
        return {
            q["name"]: (str(q["type"]), set(q["members"] or ()), set(q["online"] or ()))
            for q in json.loads(listing.stdout)
            if q["type"] in ("quorum", "stream")
        }

    def wait_members(self, queues: list[str], timeout: float = JOIN_TIMEOUT) -> None:
        """Until each of ``queues`` has a member online on every node."""
        want = {n.node for n in self.nodes}
        deadline = time.monotonic() + timeout
        found: dict[str, tuple[str, set[str], set[str]]] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(PrivateBrokerError, ValueError, KeyError):
                found = self.members()
                if all(q in found and found[q][2] >= want for q in queues):
                    return
            time.sleep(0.5)
        raise PrivateBrokerError(
            f"members online after {timeout:.0f}s: { {q: sorted(found.get(q, ('', set(), set()))[2]) for q in queues} }"
        )

    def kill_all(self) -> None:
        for node in self.nodes:
            node.kill()


@contextlib.contextmanager
def private_cluster(root: Path | None = None, size: int = SIZE) -> Iterator[PrivateCluster]:
    """A started cluster, every node killed at the end whatever happens in between."""
    with contextlib.ExitStack() as stack:
        if root is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedq-cluster-")))
        cluster = PrivateCluster(root, size)
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.kill_all()


@pytest.fixture(name="cluster", scope="module")
def cluster_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateCluster]:
    """The module's 3-node cluster; a test that killed a node leaves it to the next to start again
    (``cluster.start()`` starts whatever is down). A cluster that cannot start fails the test loudly."""
    try:
        with private_cluster(tmp_path_factory.mktemp("cluster")) as cluster:
            yield cluster
    except PrivateBrokerError as exc:
        pytest.fail(f"cannot start a private RabbitMQ cluster: {exc}", pytrace=False)
