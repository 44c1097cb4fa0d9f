"""Shared fixtures: the real local RabbitMQ (a missing broker is an error, never a skip), an
in-memory broker, a unique namespace per test with cleanup, and key material.

Every test that reaches the real broker (through the ``amqp_url`` fixture, which ``broker``,
``cleanup`` and every job-running fixture ask for, or a private RabbitMQ node) is marked
``broker``: ``-m "not broker"`` runs the rest, which needs no RabbitMQ at all."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from broker_config.names import Names
from broker_config.topology import topology
from shared.signing import Keyring, Signer
from shared.transport.memory import MemoryBroker, MemoryTransport
from shared.transport.rabbitmq import RabbitMQ

# tests/support holds no test files: rewrite its asserts too, for failure messages as detailed as a test's
pytest.register_assert_rewrite("tests.support")

AMQP_URL = os.environ.get("FEDQ_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
# fixtures that reach a RabbitMQ: a test whose fixture closure holds one of them is marked ``broker``
BROKER_FIXTURES = frozenset({"amqp_url", "make_private_rabbit", "cluster"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if BROKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.broker)


def _broker_answers(host: str = "127.0.0.1", port: int = 5672) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def amqp_url() -> str:
    if not _broker_answers():
        pytest.fail(
            "RabbitMQ does not answer on 127.0.0.1:5672; start it with scripts/ensure-rabbitmq",
            pytrace=False,
        )
    return AMQP_URL


@pytest.fixture
def names(request: pytest.FixtureRequest) -> Names:
    """A namespace of its own for every test, so tests never see each other's messages; its job
    is the test module's ``JOB`` when it has one."""
    return Names(f"t-{uuid.uuid4().hex[:10]}", getattr(request.module, "JOB", "default"))


@pytest.fixture
async def broker(amqp_url: str, names: Names, request: pytest.FixtureRequest) -> AsyncIterator[RabbitMQ]:
    """A connected ``RabbitMQ`` named after the test, with the namespace's topology declared;
    every queue and exchange of the namespace is deleted afterwards."""
    b = await RabbitMQ(amqp_url, names, f"test-{request.node.name}"[:120]).connect()
    await b.declare(topology(names, ("cpu",)))
    yield b
    await b.close()
    from tests.support.broker import delete_namespace  # imported after the assert rewrite is registered

    await delete_namespace(amqp_url, names, ("cpu", "gpu", "lowmem"))


@pytest.fixture
async def mem(names: Names) -> AsyncIterator[MemoryTransport]:
    """The test's connection to an in-memory broker of its own (``mem.broker``), with the
    namespace's topology declared as ``broker`` has it."""
    t = await MemoryTransport(MemoryBroker(), names, f"test-{names.namespace}").connect()
    await t.declare(topology(names, ("cpu",)))
    yield t
    await t.close(grace=0.1)


@pytest.fixture
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, amqp_url: str) -> tuple[Path, Names]:
    """The session's one finished tiny-app ``fedq run`` (tests/support/jobs.py: ``finished_run``):
    its run folder and namespace, read-only (a test that changes a file works on a ``copy_run``)."""
    from tests.support.jobs import finished_run

    return finished_run(request, tmp_path_factory, amqp_url)


@pytest.fixture
def signer() -> Signer:
    return Signer.generate()


@pytest.fixture
def keyring(signer: Signer) -> Keyring:
    ring = Keyring()
    ring.add(signer.public)
    return ring


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
