"""compose.yaml, the Dockerfile and the broker definitions cannot run here (no Docker engine), so
these tests hold them to the code: real fedq commands, settings fedq reads, every package copied
into the image, and a definitions file that is the topology fedq declares."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
import subprocess
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiormq.exceptions
import pytest
import yaml

from broker_config.definitions import DEMO_PASSWORD, DEMO_USER, default_definitions, definitions, render
from broker_config.names import Names
from broker_config.permissions import BrokerRole, user_name
from broker_config.topology import topology
from fedq.cli import build_parser
from shared.amqp_urls import split_urls
from shared.keys import ROLE_DIRS
from shared.settings import Settings, known_env_names
from tests.support.broker import delete_namespace
from tests.support.jobs import ROOT
from worker.service import own_login

FEDQ_COMMANDS = {"coordinator", "aggregator", "worker"}


def compose() -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(doc, dict) and doc.get("services"), "compose.yaml has no services"
    return doc


BROKER_NODES = ("rabbitmq", "rabbitmq-2", "rabbitmq-3")  # the broker, and the cluster profile's nodes
KEYS_SERVICE = "keys"  # the one-shot operator: lays out the trust volume and hands out the keys
CERTS_SERVICE = "certs"  # the one-shot that makes the CA and the broker's TLS certificate
ONE_SHOTS = {KEYS_SERVICE, CERTS_SERVICE}


def fedq_services() -> dict[str, dict[str, Any]]:
    """The long-running services that run the image built from the Dockerfile (whose entry point is fedq)."""
    services = {
        name: s for name, s in compose()["services"].items() if "build" in s and name not in ONE_SHOTS
    }
    assert set(services) >= {"coordinator", "aggregator", "worker"}, sorted(services)
    return services


def keys_service() -> dict[str, Any]:
    service = compose()["services"].get(KEYS_SERVICE)
    assert service is not None and "build" in service, "compose.yaml needs the one-shot keys service"
    return dict(service)


def settings_of(service: dict[str, Any], command: list[str] | None = None) -> Settings:
    """The settings the service's process builds: its FEDQ_* environment, then its flags."""
    args = build_parser().parse_args(command if command is not None else service["command"])
    flags = {k: v for k, v in vars(args).items() if k in Settings.__dataclass_fields__}
    return Settings.from_env({k: str(v) for k, v in service.get("environment", {}).items()}, **flags)


def unescape(text: str) -> str:
    """A value as the container sees it: compose turns $$ into $."""
    return text.replace("$$", "$")


def keys_commands() -> list[list[str]]:
    """The fedq commands the keys service's script runs (each ``fedq ...`` line), as argument lists,
    with the worker ids of ENROL in place of the loop variable."""
    env = keys_service()["environment"]
    ids = env["ENROL"].split()
    out: list[list[str]] = []
    for line in unescape(env["LAY_OUT"]).splitlines():
        words = shlex.split(line.strip())
        if words[:1] != ["fedq"]:
            continue
        if any("$id" in w for w in words):
            out += [[w.replace("$id", wid) for w in words[1:]] for wid in ids]
        else:
            out.append(words[1:])
    return out


def volume_mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(named volume, path in the container, read-only) of every named volume the service mounts."""
    out = []
    for v in service.get("volumes", []):
        parts = v.split(":")
        if not parts[0].startswith((".", "/")):
            out.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return out


def volume_at(service: dict[str, Any], path: str) -> tuple[str, bool]:
    """The named volume (and read-only?) that holds ``path`` in the service's container."""
    found = [
        (len(target), volume, ro)
        for volume, target, ro in volume_mounts(service)
        if (path + "/").startswith(target.rstrip("/") + "/")
    ]
    assert found, f"nothing is mounted at {path}: it would not outlive the container"
    _, volume, ro = max(found)
    return volume, ro


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
    commands = keys_commands()
    assert commands, "the keys service runs no fedq command"
    for command in commands:
        try:
            args = build_parser().parse_args(command)
        except SystemExit:
            pytest.fail(f"keys service: `fedq {' '.join(command)}` is refused by fedq's parser")
        assert args.command in ("keys", "broker"), command
    entry = keys_service()["entrypoint"]
    assert "exec fedq keys" in unescape(" ".join(entry)), (
        "docker compose run keys ACTION should run fedq keys ACTION"
    )


def test_every_fedq_variable_is_a_setting() -> None:
    known = known_env_names()
    for name, service in compose()["services"].items():
        env = service.get("environment") or {}
        assert isinstance(env, dict), f"{name}: write environment as a mapping"
        unknown = sorted(k for k in env if k.startswith("FEDQ_") and k not in known)
        assert not unknown, f"{name} sets {unknown}, which fedq does not read"
    for service in fedq_services().values():
        settings_of(service)  # every value parses (numbers, booleans)
    for command in keys_commands():
        settings_of(keys_service(), command)


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
        assert (amqp.scheme, amqp.hostname, amqp.port) == ("amqps", "rabbitmq", 5671), name
        assert amqp.password is None and s.amqp_password == "", f"{name}: a password in its settings"
        if name == "worker":
            assert (s.store, s.s3_access_key, s.s3_secret_key) == ("none", "", ""), "workers hold no store"
            continue
        assert s.store.startswith("s3://"), f"{name}: the store is the MinIO bucket"
        assert f"local/{s.store.removeprefix('s3://').split('/')[0]}" in bucket_made, (
            f"{name}: bucket not made"
        )
        assert urlsplit(s.s3_endpoint).hostname == "minio"
        assert (s.s3_access_key, s.s3_secret_key) == (
            minio["environment"]["MINIO_ROOT_USER"],
            minio["environment"]["MINIO_ROOT_PASSWORD"],
        )
    # the operator (the keys service) logs in as the administrator the definitions make
    keys = settings_of(keys_service(), ["broker", "apply"])
    assert (urlsplit(keys.amqp_url).username, keys.amqp_password) == (DEMO_USER, DEMO_PASSWORD)
    assert urlsplit(keys.management).hostname == "rabbitmq"


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
    assert {q["name"] for q in doc["queues"]} >= {
        "fedq.job.demo.tasks.cpu",
        "fedq.job.demo.updates",
        "fedq.updates.log",
    }


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


# -- keys: each private key on a volume of its own service, the trust directory read-only --------


def test_each_private_key_is_mounted_by_its_own_service_only() -> None:
    """No service but the coordinator mounts the coordinator's private key, and so on: each service
    keeps its keys on a volume no other long-running service mounts; the keys service (the operator)
    hands them out and keeps only the operator's key."""
    services = fedq_services()
    keys = keys_service()
    owners: dict[str, str] = {}
    for name, service in services.items():
        s = settings_of(service)
        volume, ro = volume_at(service, s.keys_dir)
        assert not ro, f"{name}: its keys volume must be writable (first start, the worker's outbox)"
        assert volume not in owners, f"{name} and {owners.get(volume)} share the keys volume {volume}"
        owners[volume] = name
    for name, service in services.items():
        for volume, _, _ in volume_mounts(service):
            assert owners.get(volume, name) == name, (
                f"{name} mounts {volume}, {owners.get(volume)}'s private keys"
            )
    by_role = {services[n]["command"][0]: v for v, n in owners.items()}
    assert set(by_role) == {"coordinator", "aggregator", "worker"}
    # the operator's own key stays on a volume no long-running service mounts
    operator_volume, _ = volume_at(keys, settings_of(keys, ["keys", "list"]).keys_dir)
    assert operator_volume not in owners and all(
        operator_volume not in {v for v, _, _ in volume_mounts(s)} for s in services.values()
    ), f"a long-running service mounts {operator_volume}, the operator's key"
    # the keys service moves the coordinator's and aggregator's keys onto their volumes, and makes the
    # workers' keys on the worker's volume, where their services look for them
    script = unescape(keys["environment"]["LAY_OUT"])
    mounts = {target: volume for volume, target, _ in volume_mounts(keys)}
    for role in ("coordinator", "aggregator"):
        moved = re.search(rf"^\s*mv (\S+)/{role}\.key \S+ (\S+?)/?$", script, re.M)
        assert moved, f"the keys service does not hand out {role}.key"
        assert mounts.get(moved[2]) == by_role[role], (
            f"{role}.key goes to {moved[2]}, not to the {role}'s volume"
        )
        assert settings_of(services[role]).key_path(role).parent == Path(settings_of(services[role]).keys_dir)
    worker = services["worker"]
    ws = settings_of(worker)
    ids = keys["environment"]["ENROL"].split()
    expected = [f"{ws.worker_id}-r{j}" for j in range(ws.replicas)] if ws.replicas > 1 else [ws.worker_id]
    assert ids == expected, f"the keys service enrols {ids}, the worker service runs {expected}"
    created = [c for c in keys_commands() if c[:2] == ["keys", "create"]]
    for command in created:
        where = settings_of(keys, command).keys_dir
        volume, _ = volume_at(keys, where)
        assert volume == by_role["worker"], f"worker keys made in {where}, off the worker's volume"
        inside = where.removeprefix(next(t for v, t, _ in volume_mounts(keys) if v == volume))
        assert ws.keys_dir.endswith(inside), (
            f"the worker looks for its keys in {ws.keys_dir}, they are made in {where}"
        )
    assert sorted(c[2] for c in created) == sorted(ids)
    enrolled = [c[2] for c in keys_commands() if c[:2] == ["keys", "enrol"]]
    assert sorted(enrolled) == sorted(ids), "every compose worker is enrolled by the keys service"
    assert "worker" not in {
        n for n, s in compose()["services"].items() if s.get("deploy", {}).get("replicas")
    }


def test_the_trust_directory_is_read_only_but_for_the_keys_service() -> None:
    services = fedq_services()
    keys = keys_service()
    trust_volume, ro = volume_at(keys, settings_of(keys, ["keys", "list"]).trusted_dir.as_posix())
    assert not ro, "the keys service writes the trust directory"
    for name, service in services.items():
        s = settings_of(service)
        volume, ro = volume_at(service, s.trusted_dir.as_posix())
        assert volume == trust_volume, f"{name} reads its trusted keys from {volume}, not the keys service's"
        assert ro, f"{name} may write the trust directory: a service must never enrol anything"
        assert volume_at(service, s.keys_dir)[0] != trust_volume, (
            f"{name} keeps its keys in the trust directory"
        )
        for volume, _, ro in volume_mounts(service):
            assert volume != trust_volume or ro, f"{name} mounts the trust volume writable"
    assert set(ROLE_DIRS.values()) == {
        "coordinator",
        "aggregator",
        "operator",
        "workers",
    }  # what init lays out
    assert any(c[:2] == ["keys", "init"] for c in keys_commands())


# -- least privilege: broker users, passwords, TLS, published ports ---------------------------------


def copies(script: str, ids: list[str]) -> dict[str, str]:
    """Every ``cp SOURCE TARGET`` of a script, with each id of ``ids`` in place of ``$id``: source -> target."""
    out: dict[str, str] = {}
    for line in script.splitlines():
        words = shlex.split(line.strip())
        if words[:1] == ["cp"] and len(words) == 3:
            for wid in ids if "$id" in line else [""]:
                out[words[1].replace("$id", wid)] = words[2].replace("$id", wid)
    return out


def test_each_service_logs_in_as_its_role_with_a_password_on_its_own_volume() -> None:
    """The coordinator and aggregator as their role's broker user, each worker replica as its own; each
    password file is where fedq broker apply put it, copied by the keys service onto the service's
    own keys volume (no other long-running service mounts it)."""
    keys = keys_service()
    ids = keys["environment"]["ENROL"].split()
    handed = copies(unescape(keys["environment"]["LAY_OUT"]), ids)
    applied = [c for c in keys_commands() if c[:2] == ["broker", "apply"]]
    assert len(applied) == 1, "the keys service makes the broker users once per run of its script"
    secrets = build_parser().parse_args(applied[0]).secrets
    for name, service in fedq_services().items():
        s = settings_of(service)
        role = BrokerRole(service["command"][0])
        for worker_id in ids if role is BrokerRole.WORKER else [""]:
            mine = own_login(s, worker_id)
            user = user_name(Names(s.namespace, s.job), role, worker_id)
            assert urlsplit(mine.amqp_url).username == user, (name, worker_id)
            target = handed.get(f"{secrets}/{user}.password")
            assert target, f"{name}: {user}'s password is not handed out"
            volume, _ = volume_at(service, mine.amqp_password_file)
            assert volume_at(keys, target)[0] == volume, f"{name}: its password goes to another volume"
            inside = mine.amqp_password_file.removeprefix(
                next(t for v, t, _ in volume_mounts(service) if v == volume).rstrip("/")
            )
            assert target.endswith(inside), (
                f"{name} reads {mine.amqp_password_file}; it is copied to {target}"
            )
        assert s.user_id_required, f"{name}: every worker has its own user, so a message must name one"


def test_the_broker_speaks_tls_only_and_the_services_verify_it() -> None:
    doc = compose()
    rabbitmq, certs = doc["services"]["rabbitmq"], doc["services"][CERTS_SERVICE]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in rabbitmq["volumes"] if v.startswith("./")}
    tls = (ROOT / mounts["/etc/rabbitmq/conf.d/30-tls.conf"]).read_text()
    assert re.search(r"^listeners\.tcp\s*=\s*none\s*$", tls, re.M), "a plain AMQP listener is open"
    assert re.search(r"^listeners\.ssl\.default\s*=\s*5671\s*$", tls, re.M)
    served = dict(re.findall(r"^ssl_options\.(\w+)\s*=\s*(\S+)\s*$", tls, re.M))
    tls_volume, ro = volume_at(rabbitmq, served["certfile"])
    assert ro and volume_at(rabbitmq, served["keyfile"])[0] == tls_volume
    script = " ".join(certs["command"])
    made = re.search(r"fedq broker certs --out (\S+) --host rabbitmq", script)
    assert made, "the certs service does not make a certificate naming the broker's host"
    ca_volume = volume_at(certs, made[1])[0]
    for name, service in doc["services"].items():
        for volume, _, _ in volume_mounts(service):
            assert volume != tls_volume or name in (CERTS_SERVICE, *BROKER_NODES), (
                f"{name} mounts the broker's key"
            )
            assert volume != ca_volume or name == CERTS_SERVICE, f"{name} mounts the CA's key"
    copied_ca = re.search(r"cp \S*/ca\.pem (\S+)/ca\.pem", script)
    assert copied_ca, "the CA certificate is not handed out"
    ca_cert_volume = volume_at(certs, copied_ca[1])[0]
    for name, service in {**fedq_services(), KEYS_SERVICE: keys_service()}.items():
        s = settings_of(service, ["keys", "list"] if name == KEYS_SERVICE else None)
        assert s.amqp_ca, f"{name} does not verify the broker's certificate"
        volume, ro = volume_at(service, s.amqp_ca)
        assert (volume, ro) == (ca_cert_volume, True), f"{name} reads its CA from {volume}"
    # the broker's definitions and conf: message size cap
    conf = (ROOT / mounts["/etc/rabbitmq/conf.d/20-fedq.conf"]).read_text()
    cap = re.search(r"^max_message_size\s*=\s*(\d+)\s*$", conf, re.M)
    assert cap and all(settings_of(sv).max_message_bytes <= int(cap[1]) for sv in fedq_services().values())


def test_published_ports_listen_on_loopback_unless_a_variable_says_otherwise() -> None:
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("${FEDQ_BIND:-127.0.0.1}:"), (
                f"{name} publishes {port} to every interface"
            )


def test_the_cluster_profile_joins_three_nodes_and_the_services_list_them_all() -> None:
    """``docker compose --profile cluster up``: two more nodes, configured as rabbitmq is, with one
    Erlang cookie, join it by classic_config peer discovery; a one-shot then grows the namespace's
    queues and streams onto them. Every fedq service lists the three nodes (its own user on each)."""
    services = compose()["services"]
    nodes = {name: services[name] for name in BROKER_NODES}
    assert services["rabbitmq"].get("profiles") is None, "the first node serves without the profile"
    for name in (*BROKER_NODES[1:], "cluster-members"):
        assert services[name].get("profiles") == ["cluster"], name
    cookies = {name: dict(node["environment"]) for name, node in nodes.items()}
    first = cookies["rabbitmq"]
    assert "-setcookie" in first["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"]
    assert first["RABBITMQ_CTL_ERL_ARGS"] == first["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"], "the CLI's cookie"
    assert all(c == first for c in cookies.values()), "one Erlang cookie for every node"
    assert services["cluster-members"]["environment"] == first
    hostnames = {name: node["hostname"] for name, node in nodes.items()}
    assert hostnames == {name: name for name in BROKER_NODES}, "each node's name is rabbit@<its service>"
    # the same configuration as rabbitmq, its own data volume, and the peer discovery file
    files = {name: {t: src for src, t, *_ in (v.split(":") for v in n["volumes"]) if src.startswith("./")} for name, n in nodes.items()}
    data = {volume_at(n, "/var/lib/rabbitmq")[0] for n in nodes.values()}
    assert len(data) == len(nodes), "the nodes share a data volume"
    peers = files["rabbitmq-2"].pop("/etc/rabbitmq/conf.d/40-cluster.conf")
    assert files["rabbitmq-3"].pop("/etc/rabbitmq/conf.d/40-cluster.conf") == peers
    assert files["rabbitmq-2"] == files["rabbitmq-3"] == files["rabbitmq"]
    conf = (ROOT / peers).read_text()
    assert re.search(r"^cluster_formation\.peer_discovery_backend\s*=\s*classic_config\s*$", conf, re.M)
    listed = re.findall(r"^cluster_formation\.classic_config\.nodes\.\d+\s*=\s*(\S+)\s*$", conf, re.M)
    assert listed == [f"rabbit@{h}" for h in BROKER_NODES]
    for name in BROKER_NODES[1:]:
        assert nodes[name]["depends_on"]["rabbitmq"]["condition"] == "service_healthy", name
        assert volume_at(nodes[name], "/etc/rabbitmq/tls")[0] == volume_at(nodes["rabbitmq"], "/etc/rabbitmq/tls")[0]
    grow = " ".join(services["cluster-members"]["command"])
    for name in BROKER_NODES[1:]:
        assert f"rabbit@{name}" in grow
    assert "rabbitmq-queues -n rabbit@rabbitmq grow" in grow and "rabbitmq-streams -n rabbit@rabbitmq add_replica" in grow
    # the broker's certificate names every node: a service verifies whichever it reaches
    made = " ".join(services[CERTS_SERVICE]["command"])
    for name in BROKER_NODES:
        assert f"--host {name}" in made, f"the broker's certificate does not name {name}"
    for name, service in fedq_services().items():
        s = settings_of(service)
        urls = [urlsplit(u) for u in split_urls(s.amqp_url)]
        assert [(u.scheme, u.hostname, u.port) for u in urls] == [("amqps", h, 5671) for h in BROKER_NODES], name
        assert len({u.username for u in urls}) == 1 and all(u.password is None for u in urls), name
