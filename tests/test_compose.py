"""compose.yaml, the Dockerfile and the broker definitions cannot run here (no Docker engine), so
these tests hold them to the code: real fedq commands, settings fedq reads, every package copied
into the image, and a definitions file that is the topology fedq declares."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import tomllib
import uuid
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiormq.exceptions
import pytest
import yaml

from broker_config.definitions import DEMO_PASSWORD, DEMO_USER, default_definitions, definitions, render
from broker_config.names import Names
from broker_config.topology import topology
from fedq.cli import build_parser
from shared.settings import Settings, known_env_names
from tests.support.broker import delete_namespace
from tests.support.jobs import ROOT

FEDQ_COMMANDS = {"coordinator", "aggregator", "worker"}


def compose() -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(doc, dict) and doc.get("services"), "compose.yaml has no services"
    return doc


def fedq_services() -> dict[str, dict[str, Any]]:
    """The services that run the image built from the Dockerfile (whose entry point is fedq)."""
    services = {name: s for name, s in compose()["services"].items() if "build" in s}
    assert set(services) >= {"coordinator", "aggregator", "worker"}, sorted(services)
    return services


def settings_of(service: dict[str, Any]) -> Settings:
    """The settings the service's process builds: its FEDQ_* environment, then its flags."""
    args = build_parser().parse_args(service["command"])
    flags = {k: v for k, v in vars(args).items() if k in Settings.__dataclass_fields__}
    return Settings.from_env({k: str(v) for k, v in service.get("environment", {}).items()}, **flags)


def test_every_fedq_service_runs_a_real_fedq_command() -> None:
    for name, service in fedq_services().items():
        command = service.get("command")
        assert isinstance(command, list) and command, f"{name}: command must be a list of fedq arguments"
        try:
            args = build_parser().parse_args([str(c) for c in command])
        except SystemExit:
            pytest.fail(f"{name}: `fedq {' '.join(map(str, command))}` is refused by fedq's parser")
        assert args.command in FEDQ_COMMANDS, f"{name} runs fedq {args.command}"
        assert service["healthcheck"]["test"][-1] == args.command, f"{name}: health check of another process"


def test_every_fedq_variable_is_a_setting() -> None:
    known = known_env_names()
    for name, service in compose()["services"].items():
        env = service.get("environment") or {}
        assert isinstance(env, dict), f"{name}: write environment as a mapping"
        unknown = sorted(k for k in env if k.startswith("FEDQ_") and k not in known)
        assert not unknown, f"{name} sets {unknown}, which fedq does not read"
    for service in fedq_services().values():
        settings_of(service)  # every value parses (numbers, booleans)


def test_services_agree_with_the_broker_and_the_store() -> None:
    doc = compose()
    declared = json.loads((ROOT / "broker_config" / "definitions.json").read_text())
    queues = {q["name"] for q in declared["queues"]}
    exchanges = {e["name"] for e in declared["exchanges"]}
    rabbitmq, minio = doc["services"]["rabbitmq"], doc["services"]["minio"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in rabbitmq["volumes"] if v.startswith("./")}
    assert (ROOT / mounts["/etc/rabbitmq/definitions.json"]).samefile(
        ROOT / "broker_config" / "definitions.json"
    )
    conf = (ROOT / mounts["/etc/rabbitmq/conf.d/20-fedq.conf"]).read_text()
    assert re.search(r"^load_definitions\s*=\s*/etc/rabbitmq/definitions\.json\s*$", conf, re.M)
    bucket_made = " ".join(doc["services"]["minio-init"]["command"])
    for name, service in fedq_services().items():
        s = settings_of(service)
        topo = topology(Names(s.namespace, s.job), s.capability_list)
        assert {q.name for q in topo.queues} <= queues, f"{name}: namespace or capability not in definitions"
        assert {e.name for e in topo.exchanges} <= exchanges
        amqp = urlsplit(s.amqp_url)
        assert (amqp.hostname, amqp.username, amqp.password) == ("rabbitmq", DEMO_USER, DEMO_PASSWORD), name
        assert s.store.startswith("s3://"), f"{name}: the store is the MinIO bucket"
        assert f"local/{s.store.removeprefix('s3://').split('/')[0]}" in bucket_made, (
            f"{name}: bucket not made"
        )
        assert urlsplit(s.s3_endpoint).hostname == "minio"
        assert (s.s3_access_key, s.s3_secret_key) == (
            minio["environment"]["MINIO_ROOT_USER"],
            minio["environment"]["MINIO_ROOT_PASSWORD"],
        )


def test_dockerfile_copies_every_package() -> None:
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    sources: list[str] = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words and words[0].upper() == "COPY":
            sources += [w.rstrip("/") for w in words[1:-1] if not w.startswith("--")]
    assert "pyproject.toml" in sources or "." in sources
    for package in packages:
        path = package.replace(".", "/")
        assert any(src == "." or path == src or path.startswith(src + "/") for src in sources), (
            f"the Dockerfile copies no {path}/ (package {package})"
        )
        assert (ROOT / path / "__init__.py").exists()


def test_definitions_file_is_what_the_code_generates() -> None:
    committed = (ROOT / "broker_config" / "definitions.json").read_text()
    assert committed == default_definitions(), "regenerate: python -m broker_config.definitions"
    doc = json.loads(committed)
    assert {q["name"] for q in doc["queues"]} >= {"fedq.job.demo.tasks.cpu", "fedq.job.demo.updates", "fedq.updates.log"}


async def _queues_exist(amqp_url: str, names: list[str]) -> bool:
    conn = await aio_pika.connect(amqp_url)
    try:
        for name in names:
            channel = await conn.channel()
            try:
                await channel.declare_queue(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                return False
            finally:
                if not channel.is_closed:
                    await channel.close()
        return True
    finally:
        await conn.close()


async def _declare(amqp_url: str, names: Names) -> None:
    from shared.transport.rabbitmq import RabbitMQ

    broker = await RabbitMQ(amqp_url, names, "test-definitions").connect()
    try:
        await broker.declare(topology(names, ("cpu",)))  # a conflicting argument would raise here
    finally:
        await broker.close()


def test_definitions_load_into_rabbitmq_as_fedq_declares_them(amqp_url: str) -> None:
    """Import the definitions (under a namespace of this test's own, without the user) into the local
    broker, then declare the topology as the services do: the broker must find them equivalent."""
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        pytest.skip("rabbitmqctl is not installed here (the broker runs elsewhere)")
    names = Names(f"t-{uuid.uuid4().hex[:10]}")
    topo = topology(names, ("cpu",))
    doc = definitions(topo)
    for key in ("users", "permissions", "vhosts"):
        del doc[key]
    try:
        done = subprocess.run(  # from stdin: rabbitmqctl may run as another user, who cannot read our files
            [ctl, "import_definitions", "--format", "json"],
            input=render(doc),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0 and "ermission" in done.stderr + done.stdout:
            pytest.skip(f"rabbitmqctl may not talk to the local node: {done.stderr.strip()}")
        assert done.returncode == 0, done.stdout + done.stderr
        deadline = time.monotonic() + 20  # the import runs asynchronously
        while not asyncio.run(_queues_exist(amqp_url, [q.name for q in topo.queues])):
            assert time.monotonic() < deadline, "the imported queues did not appear"
            time.sleep(0.3)
        asyncio.run(_declare(amqp_url, names))
    finally:
        asyncio.run(delete_namespace(amqp_url, names, ("cpu",)))
