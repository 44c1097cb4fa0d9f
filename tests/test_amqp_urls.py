"""``--amqp-url`` as a list of a cluster's nodes: parsing, rotation, and every URL of the list
getting what one URL gets (heartbeat, password, certificate login, a broker user's name, redaction).
No broker: the transport's failover against a real one is in tests/test_failover.py."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from broker_config.names import Names
from fedq.broker import Account
from fedq.cli import _settings, build_parser
from shared.amqp_urls import each_url, join_urls, rotated, split_urls
from shared.errors import BrokerError, ConfigError
from shared.redact import public, redact, same_broker, without_password
from shared.settings import Settings
from shared.tls import client_tls
from shared.transport.connect import broker_password, broker_url, transport_for
from shared.transport.rabbitmq import FailoverConnection, RabbitMQ, with_heartbeat, with_password

A, B, C = (f"amqp://u@node{i}:5672/" for i in range(3))


def test_a_list_splits_at_commas_before_a_url_only() -> None:
    assert split_urls(A) == [A]
    assert split_urls(f"{A},{B} , {C}") == [A, B, C]
    # a comma inside a password (or a query) is not a separator: no URL starts after it
    assert split_urls("amqp://u:p,w@h1/,amqps://u:x@h2:5671/?a=1,2") == ["amqp://u:p,w@h1/", "amqps://u:x@h2:5671/?a=1,2"]
    assert join_urls(split_urls(f"{A},{B}")) == f"{A},{B}"
    for empty in ("", " , ", ","):
        with pytest.raises(ConfigError):
            split_urls(empty)


def test_rotated_starts_at_the_ith_url_modulo_the_length() -> None:
    urls = join_urls([A, B, C])
    assert rotated(urls, 0) == urls
    assert rotated(urls, 1) == join_urls([B, C, A])
    assert rotated(urls, 5) == join_urls([C, A, B])
    assert rotated(A, 7) == A
    # fedq run's workers 0..5 over three nodes: each node first for two of them
    firsts = [split_urls(rotated(urls, i))[0] for i in range(6)]
    assert firsts == [A, B, C, A, B, C]
    assert each_url(urls, str.upper) == join_urls([A.upper(), B.upper(), C.upper()])


def test_the_flag_repeats_and_the_list_reaches_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDQ_AMQP_URL", raising=False)
    monkeypatch.delenv("FEDQ_AMQP_FIRST", raising=False)
    parser = build_parser()
    repeated = _settings(parser.parse_args(["worker", "--amqp-url", A, "--amqp-url", f"{B},{C}", "--amqp-first", "2"]))
    assert split_urls(repeated.amqp_url) == [A, B, C]
    assert repeated.amqp_first == 2
    monkeypatch.setenv("FEDQ_AMQP_URL", f"{A},{B}")
    assert split_urls(_settings(parser.parse_args(["audit", "run"])).amqp_url) == [A, B]
    assert Settings(amqp_url=f"amqp://g@10.0.0.7:5672/,{B}").management == "http://10.0.0.7:15672/"


def test_a_service_dials_its_amqp_first_url_first() -> None:
    for first, expected in ((0, [A, B, C]), (1, [B, C, A]), (5, [C, A, B])):
        transport = transport_for(Settings(amqp_url=join_urls([A, B, C]), amqp_first=first), "test-first")
        assert isinstance(transport, RabbitMQ)
        assert [u.partition("?")[0] for u in split_urls(transport.url)] == expected


def test_every_url_gets_heartbeat_password_login_and_redaction() -> None:
    urls = join_urls([A, "amqps://h2:5671/", B])
    assert split_urls(with_heartbeat(urls, 4)) == [f"{A}?heartbeat=4", "amqps://h2:5671/?heartbeat=4", f"{B}?heartbeat=4"]
    assert split_urls(with_password(join_urls([A, B]), "s,e/cret")) == [
        "amqp://u:s%2Ce%2Fcret@node0:5672/",
        "amqp://u:s%2Ce%2Fcret@node1:5672/",
    ]
    tls = Settings(amqp_url="amqps://h1:5671/,amqps://h2:5671/", amqp_cert="c.pem", amqp_key="k.pem")
    assert split_urls(broker_url(tls)) == ["amqps://h1:5671/?auth=external", "amqps://h2:5671/?auth=external"]
    # a password from a file applies to every node: none may hold one of its own, each names the user
    for listed in (f"{A},amqp://u:pw@node1/", f"{A},amqp://node1/"):
        with pytest.raises(ConfigError):
            broker_password(Settings(amqp_url=listed, amqp_password="pw"))
    assert broker_password(Settings(amqp_url=f"{A},{B}", amqp_password="pw")) == "FEDQ_AMQP_PASSWORD"
    with pytest.raises(ConfigError, match="mixes"):
        client_tls(Settings(amqp_url=f"{A},amqps://h2:5671/"))
    admin = "amqp://admin:pw@node0:5672/,amqp://admin:pw@node1:5672/"
    assert Account.anonymous_url(admin) == "amqp://node0:5672/,amqp://node1:5672/"


def test_every_url_of_a_list_loses_its_password() -> None:
    listed = "amqp://u:pw1@h1/,amqp://u:pw2@h2:5673/?heartbeat=4"
    assert redact(listed) == "amqp://u:***@h1/,amqp://u:***@h2:5673/"
    assert without_password(listed) == "amqp://u@h1/,amqp://u@h2:5673/?heartbeat=4"
    assert public({"amqp_url": listed}) == {"amqp_url": without_password(listed)}
    # a tool given the run's list (or one node of it) uses its own login there
    assert same_broker(without_password(listed), "amqp://auditor:x@h2:5673/")
    assert not same_broker(without_password(listed), "amqp://auditor:x@h3/")


def test_the_failover_connection_dials_its_urls_in_turn() -> None:
    """The seam in aio-pika that FailoverConnection overrides exists (a renamed private method would
    leave every reconnect on the first URL), and each attempt takes the next URL, round robin."""
    from aio_pika import RobustConnection

    assert callable(getattr(RobustConnection, "_RobustConnection__connect_transport", None))
    dialled: list[str] = []

    async def attempts() -> None:
        connection = FailoverConnection([A, B, C])

        async def fake(self: FailoverConnection) -> None:
            dialled.append(str(self.url))

        original = RobustConnection._RobustConnection__connect_transport  # type: ignore[attr-defined]
        RobustConnection._RobustConnection__connect_transport = fake  # type: ignore[attr-defined]
        try:
            for _ in range(4):
                await connection._RobustConnection__connect_transport()  # type: ignore[attr-defined]
        finally:
            RobustConnection._RobustConnection__connect_transport = original  # type: ignore[attr-defined]

    asyncio.run(attempts())
    assert dialled == [A, B, C, A]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_no_node_answering_names_each_url_without_its_password() -> None:
    urls = join_urls(f"amqp://guest:hunter2@127.0.0.1:{_closed_port()}/" for _ in range(2))
    transport = RabbitMQ(urls, Names("t-none"), "test-no-node", connect_timeout=2)
    with pytest.raises(BrokerError) as caught:
        asyncio.run(transport.connect())
    text = str(caught.value)
    assert "hunter2" not in text and "no RabbitMQ node answers" in text
    for url in split_urls(urls):
        assert url.replace("hunter2", "***") in text


def test_each_replica_starts_at_the_next_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``fedq worker --replicas 3 --amqp-first 1`` over three nodes: replicas dial nodes 1, 2 and 0 first."""
    import worker.service as service

    firsts: list[int] = []

    async def serve_one(settings: Settings, *args: object) -> None:
        firsts.append(settings.amqp_first)

    monkeypatch.setattr(service, "_serve_one", serve_one)
    key = tmp_path / "coordinator.pub"
    key.write_text("a key")
    urls = "amqp://a:5672/,amqp://b:5672/,amqp://c:5672/"
    settings = Settings(
        amqp_url=urls, amqp_first=1, replicas=3, partition="0/3", coordinator_key=str(key), keys_dir=str(tmp_path)
    )
    asyncio.run(service.serve(settings, app=None))  # type: ignore[arg-type]
    assert [split_urls(rotated(urls, f))[0] for f in firsts] == ["amqp://b:5672/", "amqp://c:5672/", "amqp://a:5672/"]
