"""TLS to the broker: ``amqps://`` verified against a CA, logins by password file and by client
certificate (EXTERNAL), the refusals that name the flag to fix, ``fedq broker certs``, and a
whole ``fedq run`` job over TLS.

The broker tests share one private RabbitMQ node (tests/support/private_broker.py) with a TLS
listener beside its plain one; its certificates are made here with shared/tls.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from broker_config.names import Names
from broker_config.topology import topology
from fedq.broker import Management
from shared.errors import BrokerError, ConfigError
from shared.settings import Settings
from shared.tls import client_tls, issue_client, issue_server, make_ca, san_names
from shared.transport import Delivery
from shared.transport.connect import broker_url, connected, transport_for
from shared.transport.rabbitmq import RabbitMQ, with_password
from shared.transport.refusals import explain
from tests.support.jobs import TINY_APP, cli, finish, problems_in_logs, start_run
from tests.support.private_broker import (
    EXTERNAL_AUTH_PLUGIN,
    PrivateBrokerError,
    PrivateRabbit,
    free_port,
    private_rabbit_node,
    tls_conf,
)

broker = pytest.mark.broker  # the tests that reach the private node (conftest marks by fixture name only)
CLIENT = "alice"  # a broker user that logs in by certificate
WAIT = 20.0


@dataclass(frozen=True)
class TlsBroker:
    """The private node, its TLS port and the certificate files the tests use."""

    node: PrivateRabbit
    tls_port: int
    certs: Path  # ca.pem, alice.pem/.key (signed by the CA), other-ca.pem, stranger.pem/.key (another CA's)

    def url(self, login: str = "guest:guest@", scheme: str = "amqps", port: int | None = None) -> str:
        return f"{scheme}://{login}127.0.0.1:{port or self.tls_port}/"

    def settings(self, names: Names, **fields: Any) -> Settings:
        base = Settings(
            namespace=names.namespace, job=names.job, amqp_url=self.url(), amqp_ca=str(self.certs / "ca.pem")
        )
        return replace(base, **fields)

    def by_certificate(self, name: str) -> Settings:
        """Settings that log in by the client certificate ``name``.pem (EXTERNAL: no user in the URL)."""
        certs = self.certs
        return self.settings(
            fresh_names(),
            amqp_url=self.url(""),
            amqp_cert=str(certs / f"{name}.pem"),
            amqp_key=str(certs / f"{name}.key"),
        )


def write_pair(folder: Path, name: str, cert: bytes, key: bytes) -> None:
    (folder / f"{name}.pem").write_bytes(cert)
    (folder / f"{name}.key").write_bytes(key)
    (folder / f"{name}.key").chmod(0o600)


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    certs = tmp_path_factory.mktemp("certs")
    ca = make_ca("fedq test CA")
    server = issue_server(ca, ("localhost", "127.0.0.1"))
    (certs / "ca.pem").write_bytes(ca.cert_pem)
    write_pair(certs, "server", server.cert_pem, server.key_pem)
    client = issue_client(ca, CLIENT)
    write_pair(certs, CLIENT, client.cert_pem, client.key_pem)
    nobody = issue_client(ca, "nobody")  # signed by the right CA, but no broker user has its name
    write_pair(certs, "nobody", nobody.cert_pem, nobody.key_pem)
    other = make_ca("another CA")
    (certs / "other-ca.pem").write_bytes(other.cert_pem)
    stranger = issue_client(other, CLIENT)  # the right name, the wrong CA
    write_pair(certs, "stranger", stranger.cert_pem, stranger.key_pem)
    port = free_port()
    conf = tls_conf(port, certs / "ca.pem", certs / "server.pem", certs / "server.key", external=True)
    try:
        with private_rabbit_node(
            tmp_path_factory.mktemp("rabbit"),
            conf=conf,
            plugins=("rabbitmq_management", EXTERNAL_AUTH_PLUGIN),
        ) as node:
            # through the management API: a rabbitmqctl call starts an Erlang VM of its own (seconds)
            api = Management(node.management_url, "guest", "guest")
            api.call("PUT", f"/api/users/{CLIENT}", {"password_hash": "", "tags": ""})  # by certificate only
            api.call("PUT", f"/api/permissions/%2F/{CLIENT}", {"configure": ".*", "write": ".*", "read": ".*"})
            yield TlsBroker(node, port, certs)
    except PrivateBrokerError as exc:
        pytest.fail(f"cannot start a private RabbitMQ node with a TLS listener: {exc}", pytrace=False)


def fresh_names() -> Names:
    return Names(f"t-{uuid.uuid4().hex[:10]}")


async def round_trip(settings: Settings, name: str) -> tuple[bytes, str | None]:
    """Declare the namespace, publish a task and take it back over ``settings``' connection: the
    body that came back and the user the broker stamped it with."""
    async with connected(settings, name) as transport:
        names = transport.names
        await transport.declare(topology(names, ("cpu",)))
        got: asyncio.Queue[Delivery] = asyncio.Queue()

        async def on_task(delivery: Delivery) -> None:
            await got.put(delivery)
            await delivery.ack()

        await transport.consume(names.task_queue("cpu"), on_task, prefetch=1)
        await transport.publish(names.tasks_exchange, names.task_key("cpu"), b"over tls")
        delivery = await asyncio.wait_for(got.get(), WAIT)
        return delivery.body, delivery.user_id


# -- connecting -----------------------------------------------------------------------------------


@broker
async def test_the_right_ca_connects_and_messages_flow(tls_broker: TlsBroker) -> None:
    settings = tls_broker.settings(fresh_names())
    body, user = await round_trip(settings, "test-tls-ca")
    assert body == b"over tls" and user == "guest"


@broker
async def test_a_password_file_keeps_the_password_out_of_the_url(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    secret = tmp_path / "guest.password"
    secret.write_text("guest\n")
    settings = tls_broker.settings(
        fresh_names(), amqp_url=tls_broker.url("guest@"), amqp_password_file=str(secret)
    )
    transport = transport_for(settings, "test-tls-password-file")
    assert isinstance(transport, RabbitMQ) and "guest@" in transport.url and ":guest@" not in transport.url
    body, _ = await round_trip(settings, "test-tls-password-file")
    assert body == b"over tls"

    secret.write_text("not-the-password\n")
    message = await refusal(settings)
    assert "refused user 'guest'" in message and "--amqp-password-file" in message
    assert "not-the-password" not in message


@broker
async def test_a_client_certificate_logs_in_as_its_cn(tls_broker: TlsBroker) -> None:
    """EXTERNAL auth: no user or password in the URL; the broker takes the user from the CN."""
    settings = tls_broker.by_certificate(CLIENT)
    assert "auth=external" in broker_url(settings)
    async with connected(settings, "test-tls-external"):
        users = await asyncio.to_thread(tls_broker.node.connections)
        assert users["test-tls-external"] == (CLIENT, True, tls_broker.tls_port)
    body, user_id = await round_trip(settings, "test-tls-external-flow")
    assert body == b"over tls"
    assert user_id == CLIENT  # stamped as the certificate's CN, which the broker checked


# -- refusals -------------------------------------------------------------------------------------


async def refusal(settings: Settings) -> str:
    with pytest.raises(BrokerError) as refused:
        await asyncio.wait_for(transport_for(settings, "test-tls-refused").connect(), WAIT)
    return str(refused.value)


@broker
async def test_a_wrong_ca_is_refused_naming_amqp_ca(tls_broker: TlsBroker) -> None:
    other = str(tls_broker.certs / "other-ca.pem")
    message = await refusal(tls_broker.settings(fresh_names(), amqp_ca=other))
    assert f"does not chain to --amqp-ca {other}" in message, message
    assert f"127.0.0.1:{tls_broker.tls_port}" in message


@broker
async def test_plain_amqp_to_the_tls_port_is_refused_naming_amqps(tls_broker: TlsBroker) -> None:
    message = await refusal(
        tls_broker.settings(fresh_names(), amqp_url=tls_broker.url(scheme="amqp"), amqp_ca="")
    )
    assert f"127.0.0.1:{tls_broker.tls_port} is a TLS port" in message, message
    assert "use amqps:// in --amqp-url" in message and "--amqp-ca" in message


@broker
async def test_amqps_to_the_plain_port_is_refused_naming_the_tls_port(tls_broker: TlsBroker) -> None:
    plain = tls_broker.node.port
    message = await refusal(tls_broker.settings(fresh_names(), amqp_url=tls_broker.url(port=plain)))
    assert f"127.0.0.1:{plain} speaks plain AMQP, not TLS" in message, message
    assert "TLS port" in message and "--amqp-url" in message


@broker
async def test_a_client_certificate_of_another_ca_is_refused_naming_amqp_cert(tls_broker: TlsBroker) -> None:
    message = await refusal(tls_broker.by_certificate("stranger"))
    assert f"does not accept --amqp-cert {tls_broker.certs / 'stranger.pem'}" in message, message


@broker
async def test_a_certificate_with_no_broker_user_is_refused_saying_so(tls_broker: TlsBroker) -> None:
    message = await refusal(tls_broker.by_certificate("nobody"))
    assert "refused the login by certificate (EXTERNAL" in message, message
    assert "broker user named as the certificate's CN" in message


async def test_a_certificate_for_another_host_is_named_as_such() -> None:
    """The broker's certificate chains but does not name the host dialled: say that, not 'wrong CA'."""
    mismatch = ssl.SSLCertVerificationError(1, "certificate verify failed: IP address mismatch")
    mismatch.verify_code, mismatch.verify_message = (
        64,
        "IP address mismatch, certificate is not valid for '10.1.1.1'",
    )
    wrapped = ConnectionError("handshake")
    wrapped.__cause__ = mismatch
    message = await explain("amqps://u@10.1.1.1:5671/", wrapped, None)
    assert message is not None and "does not name 10.1.1.1" in message and "--host 10.1.1.1" in message


# -- settings, refused before any connection -------------------------------------------------------


def test_tls_flags_with_a_plain_url_are_refused() -> None:
    with pytest.raises(
        ConfigError, match=r"--amqp-ca apply to amqps:// URLs only, but --amqp-url is amqp://"
    ):
        client_tls(Settings(amqp_ca="ca.pem"))
    with pytest.raises(ConfigError, match="--amqp-cert and --amqp-key go together"):
        client_tls(Settings(amqp_url="amqps://h/", amqp_cert="c.pem"))
    with pytest.raises(ConfigError, match=r"cannot read --amqp-ca /nonexistent/ca\.pem"):
        client_tls(Settings(amqp_url="amqps://h/", amqp_ca="/nonexistent/ca.pem"))
    assert client_tls(Settings()) is None
    default = client_tls(Settings(amqp_url="amqps://h/"))  # the system's CAs
    assert default is not None and default.context.verify_mode == ssl.CERT_REQUIRED
    assert default.context.check_hostname


def test_the_password_comes_from_one_place_and_stays_out_of_the_url(tmp_path: Path) -> None:
    secret = tmp_path / "p"
    secret.write_text("s3cr:t/@x\n")
    settings = Settings(amqp_url="amqp://fedq@h:5672/", amqp_password_file=str(secret))
    transport = transport_for(settings, "t")
    assert isinstance(transport, RabbitMQ) and "s3cr" not in transport.url
    assert with_password(transport.url, "s3cr:t/@x").startswith("amqp://fedq:s3cr%3At%2F%40x@h:5672/")
    with pytest.raises(ConfigError, match="not both"):
        transport_for(replace(settings, amqp_password="p"), "t")
    with pytest.raises(ConfigError, match="--amqp-url holds a password"):
        transport_for(replace(settings, amqp_url="amqp://fedq:x@h/"), "t")
    with pytest.raises(ConfigError, match="names no user"):
        transport_for(replace(settings, amqp_url="amqp://h/"), "t")
    assert "Password" not in repr(settings) and "amqp_password=" not in repr(
        replace(settings, amqp_password="p")
    )


async def test_an_empty_password_file_is_refused_at_connect(tmp_path: Path) -> None:
    secret = tmp_path / "p"
    secret.write_text("\n")
    transport = transport_for(Settings(amqp_url="amqp://fedq@h/", amqp_password_file=str(secret)), "t")
    with pytest.raises(ConfigError, match="is empty"):
        await transport.connect()


# -- fedq broker certs ----------------------------------------------------------------------------


def test_broker_certs_makes_a_ca_a_server_and_clients_then_adds_to_them(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    first = cli("broker", "certs", "--out", out, "--host", "broker.example.org", "--client", "w00", "--json")
    assert first.returncode == 0, first.stderr
    made = {f["name"]: f for f in json.loads(first.stdout)["files"]}
    assert {n: f["state"] for n, f in made.items()} == {"ca": "made", "server": "made", "w00": "made"}
    for name in ("ca", "server", "w00"):
        assert stat.S_IMODE((out / f"{name}.key").stat().st_mode) == 0o600, name
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    client = x509.load_pem_x509_certificate((out / "w00.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)
    assert san_names(server) == {"localhost", "127.0.0.1", "broker.example.org"}
    assert client.subject.rfc4514_string() == "CN=w00"

    again = cli("broker", "certs", "--out", out, "--host", "10.0.0.5", "--client", "w00", "--client", "w01")
    assert again.returncode == 0, again.stderr
    assert re.search(r"kept\s+\S*ca\.pem", again.stdout) and re.search(
        r"remade\s+\S*server\.pem", again.stdout
    )
    assert re.search(r"kept\s+\S*w00\.pem", again.stdout) and re.search(r"made\s+\S*w01\.pem", again.stdout)
    assert (out / "w00.pem").read_bytes() == client.public_bytes(Encoding.PEM)
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)  # the same CA signs what is added
    assert san_names(server) == {"localhost", "127.0.0.1", "broker.example.org", "10.0.0.5"}
    x509.load_pem_x509_certificate((out / "w01.pem").read_bytes()).verify_directly_issued_by(ca)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))

    refused = cli("broker", "certs", "--out", out, "--client", "server")
    assert refused.returncode == 2 and "bad client name 'server'" in refused.stderr


# -- a whole job ----------------------------------------------------------------------------------


@broker
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_job_runs_over_tls_with_a_broker_user_per_role_and_its_audit_balances(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    """``fedq run`` hands its processes the TLS settings and each its own broker user (made through
    the node's management API): every connection of the run comes over the TLS port, each
    service's as the user of its role."""
    names = fresh_names()
    out = tmp_path / "run"
    proc = start_run(
        out,
        names,
        *TINY_APP,
        "--workers", "2",
        "--buffer", "3",
        "--target-accuracy", "0.45",
        "--max-seconds", "150",
        "--amqp-ca", str(tls_broker.certs / "ca.pem"),
        "--broker-users", "on",
        "--management-url", tls_broker.node.management_url,
        amqp_url=tls_broker.url(),
    )  # fmt: skip
    output = finish(proc, timeout=240, check=False)
    assert proc.returncode == 0, f"{output[-3000:]}\n{problems_in_logs(out)}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "target_accuracy", summary  # it reached its target
    assert summary["audit"]["ok"] and summary["audit"]["lost"] == 0, summary["audit"]
    logins = connection_logins(tls_broker.node)
    job = json.loads((out / "config.json").read_text())["settings"]["job"]
    tls_port, prefix = tls_broker.tls_port, f"{names.namespace}.{job}"
    assert logins.get("fedq-declare") == {(tls_port, "guest")}, logins  # the operator's own login
    assert logins.get(f"fedq-aggregator-{job}") == {(tls_port, f"{prefix}.aggregator")}, logins
    assert logins.get(f"fedq-coordinator-{job}") == {(tls_port, f"{prefix}.coordinator")}, logins
    for wid in ("w00", "w01"):
        assert logins.get(f"fedq-worker-{wid}") == {(tls_port, f"{prefix}.worker.{wid}")}, logins
    assert {port for port, _ in logins.get("fedq-audit", set())} == {tls_port}, logins


def connection_logins(node: PrivateRabbit) -> dict[str, set[tuple[int, str]]]:
    """Every client-provided connection name in the node's log, with the broker port each such
    connection came to and the user it logged in as."""
    accepted = re.compile(r"connection <([^>]+)> \([\d.:]+ -> [\d.]+:(\d+)\)")
    named = re.compile(r"connection <([^>]+)> \([^)]*\) has a client-provided name: (\S+)")
    granted = re.compile(r"connection <([^>]+)> \([^)]*\): user '([^']+)' authenticated")
    port_of: dict[str, int] = {}
    name_of: dict[str, str] = {}
    found: dict[str, set[tuple[int, str]]] = {}
    for log in node.logs.glob("*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if m := granted.search(line):
                found.setdefault(name_of.get(m[1], "?"), set()).add((port_of.get(m[1], -1), m[2]))
            elif m := named.search(line):
                name_of[m[1]] = m[2]
            elif m := accepted.search(line):
                port_of[m[1]] = int(m[2])
    return found


def test_a_run_folder_keeps_how_its_broker_was_reached_over_tls(tmp_path: Path) -> None:
    """fedq audit, log, replay and model on a run folder reach its broker as the run did: the TLS
    files its config.json names, unless the command names its own."""
    from fedq.audit import settings_for

    saved = {"amqp_url": "amqps://127.0.0.1:5671/", "amqp_ca": "/tls/ca.pem", "amqp_cert": "/tls/me.pem",
             "amqp_key": "/tls/me.key", "job": "j"}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps({"settings": saved}))
    found = settings_for(str(tmp_path), Settings())
    assert (found.amqp_ca, found.amqp_cert, found.amqp_key) == ("/tls/ca.pem", "/tls/me.pem", "/tls/me.key")
    mine = settings_for(str(tmp_path), Settings(amqp_ca="/mine/ca.pem"))
    assert mine.amqp_ca == "/mine/ca.pem"
