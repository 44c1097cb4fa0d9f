"""Least privilege on a private RabbitMQ node (with its management plugin): ``fedq broker apply``
makes a user per role, and each role tries what it must do (it works) and what it must not
(ACCESS_REFUSED, or the broker's user_id check). One node for the module: it takes seconds to start."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aio_pika
import aiormq.exceptions
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from broker_config.names import Names
from broker_config.permissions import BrokerRole, user_name
from broker_config.topology import topology
from fedq.broker import Management, Request, apply, plan, run_accounts
from fedq.run import run_pids
from shared.errors import BrokerError, ConfigError
from shared.settings import Settings
from shared.transport.rabbitmq import RabbitMQ
from tests.support.broker import SHARED_MANAGEMENT
from tests.support.jobs import FINISHED_RUN, TINY_APP, fedq, service_env, start_run
from tests.support.private_broker import MakeRabbit, PrivateRabbit
from tests.support.private_broker import make_private_rabbit_fixture as make_private_rabbit  # noqa: F401

NS = "pm"
JOB = "j1"
NAMES = Names(NS, JOB)
OTHER = Names(NS, "j2")  # another job in the same namespace
CAPS = "cpu,gpu"

Op = Callable[[AbstractChannel], Awaitable[object]]


@pytest.fixture(name="node")
def node_fixture(make_private_rabbit: MakeRabbit) -> PrivateRabbit:  # noqa: F811
    return make_private_rabbit(plugins=("rabbitmq_management",))


def settings_for(node: PrivateRabbit, tmp: Path, job: str = JOB) -> Settings:
    return Settings(
        amqp_url=node.amqp_url,
        management_url=node.management_url,
        namespace=NS,
        job=job,
        capabilities=CAPS,
        keys_dir=str(tmp / "keys"),
    )


@pytest.fixture(name="applied")
def applied_fixture(node: PrivateRabbit, tmp_path: Path) -> dict[str, str]:
    """Both jobs applied (w1 serves cpu only, w2 every capability); user -> password."""
    secrets = tmp_path / "secrets"
    passwords: dict[str, str] = {}
    for job in (JOB, OTHER.job):
        found, _ = plan(
            settings_for(node, tmp_path, job), Request(workers="w1:cpu,w2", secrets_dir=str(secrets))
        )
        apply(settings_for(node, tmp_path, job), Request(workers="w1:cpu,w2", secrets_dir=str(secrets)))
        passwords.update({a.user.name: a.password for a in found})
    return passwords


async def login(node: PrivateRabbit, user: str, password: str) -> AbstractRobustConnection:
    from urllib.parse import quote

    return await aio_pika.connect_robust(
        f"amqp://{quote(user, safe='')}:{quote(password, safe='')}@{node.host}:{node.port}/"
    )


async def attempt(conn: AbstractRobustConnection, op: Op) -> str:
    """'ok', 'refused' (ACCESS_REFUSED) or 'user_id' (the broker's user_id check), each on a channel of its own."""
    channel = await conn.channel(publisher_confirms=True)
    try:
        await op(channel)
        await asyncio.sleep(0.05)
        if channel.is_closed:
            return "closed"
        return "ok"
    except aiormq.exceptions.ChannelAccessRefused:
        return "refused"
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        return "user_id" if "user_id" in str(exc) else f"precondition: {exc}"
    finally:
        if not channel.is_closed:
            await channel.close()


def publish(exchange: str, key: str, user_id: str | None = None) -> Op:
    async def op(channel: AbstractChannel) -> None:
        ex = await channel.get_exchange(exchange, ensure=False)
        await ex.publish(aio_pika.Message(b"x", user_id=user_id), key, timeout=10, mandatory=False)

    return op


def get(queue: str) -> Op:
    async def op(channel: AbstractChannel) -> None:
        q = await channel.declare_queue(queue, passive=True)
        message = await q.get(fail=False, timeout=10)
        if message is not None:
            await message.nack(requeue=True)

    return op


def consume(queue: str, **arguments: object) -> Op:
    """basic.consume, then cancel (the updates queue has a single active consumer: no basic.get)."""

    async def op(channel: AbstractChannel) -> None:
        async def leave(message: AbstractIncomingMessage) -> None:
            if "x-stream-offset" in arguments:
                await message.ack()  # a stream keeps it anyway, and refuses nacks
            else:
                await message.nack(requeue=True)

        await channel.set_qos(prefetch_count=10)
        q = await channel.declare_queue(queue, passive=True)
        tag = await q.consume(leave, arguments=arguments)  # type: ignore[arg-type]
        await q.cancel(tag)

    return op


def read_stream(stream: str) -> Op:
    return consume(stream, **{"x-stream-offset": "first"})


def purge(queue: str) -> Op:
    async def op(channel: AbstractChannel) -> None:
        await (await channel.get_queue(queue, ensure=False)).purge()

    return op


def delete(queue: str) -> Op:
    async def op(channel: AbstractChannel) -> None:
        await channel.queue_delete(queue)

    return op


def declare(queue: str, arguments: dict[str, object] | None = None) -> Op:
    async def op(channel: AbstractChannel) -> None:
        await channel.declare_queue(queue, durable=True, arguments=arguments)  # type: ignore[arg-type]

    return op


def depth(queue: str) -> Op:
    async def op(channel: AbstractChannel) -> None:
        await channel.declare_queue(queue, passive=True)

    return op


@pytest.fixture(name="as_user")
async def as_user_fixture(
    node: PrivateRabbit, applied: dict[str, str]
) -> AsyncIterator[Callable[..., Awaitable[AbstractRobustConnection]]]:
    opened: list[AbstractRobustConnection] = []

    async def connect(
        role: BrokerRole, worker_id: str = "", names: Names = NAMES
    ) -> AbstractRobustConnection:
        user = user_name(names, role, worker_id)
        conn = await login(node, user, applied[user])
        opened.append(conn)
        return conn

    yield connect
    for conn in opened:
        await conn.close()


async def check(conn: AbstractRobustConnection, expected: dict[str, tuple[Op, str]]) -> None:
    seen = {what: await attempt(conn, op) for what, (op, _) in expected.items()}
    assert seen == {what: outcome for what, (_, outcome) in expected.items()}


async def test_a_worker_may_only_take_its_tasks_and_send_results_and_hellos(
    as_user: Callable[..., Awaitable[AbstractRobustConnection]],
) -> None:
    n, w1 = NAMES, user_name(NAMES, BrokerRole.WORKER, "w1")
    conn = await as_user(BrokerRole.WORKER, "w1")
    await check(
        conn,
        {
            "take a cpu task": (get(n.task_queue("cpu")), "ok"),
            "publish an update": (publish(n.results_exchange, n.results_key, w1), "ok"),
            "publish a hello": (publish(n.workers_exchange, n.hello_key, w1), "ok"),
            "dead-letter a task": (publish(n.dead_exchange, "", w1), "ok"),
            "see a queue's depth": (depth(n.updates_queue), "ok"),
            "publish a task": (publish(n.tasks_exchange, n.task_key("cpu"), w1), "refused"),
            "publish a model": (publish(n.models_exchange, Names.model_key(JOB), w1), "refused"),
            "publish a receipt": (publish(n.models_exchange, Names.receipt_key(JOB), w1), "refused"),
            "publish to another job": (publish(n.results_exchange, OTHER.results_key, w1), "refused"),
            "hello to another job": (publish(n.workers_exchange, OTHER.hello_key, w1), "refused"),
            "publish as another worker": (
                publish(n.results_exchange, n.results_key, "pm.j1.worker.w2"),
                "user_id",
            ),
            "take a gpu task": (get(n.task_queue("gpu")), "refused"),
            "take another job's task": (get(OTHER.task_queue("cpu")), "refused"),
            "consume updates": (consume(n.updates_queue), "refused"),
            "read the update log": (read_stream(n.update_log), "refused"),
            "read the model log": (read_stream(n.model_log), "refused"),
            "read the dead letters": (get(n.dead_queue), "refused"),
            "purge the updates": (purge(n.updates_queue), "refused"),
            "purge the gpu tasks": (purge(n.task_queue("gpu")), "refused"),
            "purge the dead letters": (purge(n.dead_queue), "refused"),
            "delete its task queue": (delete(n.task_queue("cpu")), "refused"),
            "delete the updates": (delete(n.updates_queue), "refused"),
            "declare a queue": (declare("pm.mine"), "refused"),
            "redeclare its task queue": (
                declare(n.task_queue("cpu"), dict(topology(n, ("cpu",)).queues[0].arguments)),
                "refused",
            ),
        },
    )


async def test_the_aggregator_reads_updates_and_writes_versions_receipts_and_dead_letters(
    as_user: Callable[..., Awaitable[AbstractRobustConnection]],
) -> None:
    n, me = NAMES, user_name(NAMES, BrokerRole.AGGREGATOR)
    conn = await as_user(BrokerRole.AGGREGATOR)
    await check(
        conn,
        {
            "consume updates": (consume(n.updates_queue), "ok"),
            "announce a version": (publish(n.models_exchange, Names.model_key(JOB), me), "ok"),
            "send receipts": (publish(n.models_exchange, Names.receipt_key(JOB), me), "ok"),
            "dead-letter": (publish(n.dead_exchange, "", me), "ok"),
            "announce another job's version": (
                publish(n.models_exchange, Names.model_key(OTHER.job), me),
                "refused",
            ),
            "publish a task": (publish(n.tasks_exchange, n.task_key("cpu"), me), "refused"),
            "publish an update": (publish(n.results_exchange, n.results_key, me), "refused"),
            "take a task": (get(n.task_queue("cpu")), "refused"),
            "consume another job's updates": (consume(OTHER.updates_queue), "refused"),
            "read the update log": (read_stream(n.update_log), "refused"),
            "purge the updates": (purge(OTHER.updates_queue), "refused"),
            "declare a queue": (declare("pm.mine"), "refused"),
            "delete the updates": (delete(n.updates_queue), "refused"),
        },
    )


async def test_the_coordinator_publishes_tasks_and_rounds_and_owns_only_its_inbox(
    as_user: Callable[..., Awaitable[AbstractRobustConnection]],
) -> None:
    n, me = NAMES, user_name(NAMES, BrokerRole.COORDINATOR)
    conn = await as_user(BrokerRole.COORDINATOR)

    async def inbox(channel: AbstractChannel) -> None:
        q = await channel.declare_queue(
            n.coordinator_queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await q.bind(n.models_exchange, Names.model_key(JOB))
        await q.bind(n.workers_exchange, n.hello_key)
        await get(n.coordinator_queue)(channel)

    async def hello_queue(channel: AbstractChannel) -> None:
        q = await channel.declare_queue(f"{n.listener_prefix}x1", exclusive=True, auto_delete=True)
        await q.bind(n.workers_exchange, n.hello_key)

    await check(
        conn,
        {
            "publish a task": (publish(n.tasks_exchange, n.task_key("gpu"), me), "ok"),
            "open a round": (publish(n.results_exchange, n.results_key, me), "ok"),
            "its inbox": (inbox, "ok"),
            "its hello queue": (hello_queue, "ok"),
            "dead-letter": (publish(n.dead_exchange, "", me), "ok"),
            "announce a version": (publish(n.models_exchange, Names.model_key(JOB), me), "refused"),
            "a round of another job": (publish(n.results_exchange, OTHER.results_key, me), "refused"),
            "another job's inbox": (declare(OTHER.coordinator_queue, {"x-queue-type": "quorum"}), "refused"),
            "consume updates": (consume(n.updates_queue), "refused"),
            "take a task": (get(n.task_queue("cpu")), "refused"),
            "purge the updates": (purge(n.updates_queue), "refused"),
            "delete a task queue": (delete(n.task_queue("cpu")), "refused"),
        },
    )


async def test_the_observer_reads_the_logs_and_publishes_nothing(
    as_user: Callable[..., Awaitable[AbstractRobustConnection]],
) -> None:
    n, me = NAMES, user_name(NAMES, BrokerRole.OBSERVER)
    conn = await as_user(BrokerRole.OBSERVER)
    refused_publishes = {
        f"publish to {ex}": (publish(ex, key, me), "refused")
        for ex, key in (
            (n.tasks_exchange, n.task_key("cpu")),
            (n.results_exchange, n.results_key),
            (n.models_exchange, Names.model_key(JOB)),
            (n.workers_exchange, n.hello_key),
            (n.dead_exchange, ""),
            ("", n.updates_queue),  # the default exchange, straight to a queue
        )
    }
    await check(
        conn,
        {
            "read the update log": (read_stream(n.update_log), "ok"),
            "read the model log": (read_stream(n.model_log), "ok"),
            "see a queue's depth": (depth(n.task_queue("cpu")), "ok"),
            **refused_publishes,
            "consume updates": (consume(n.updates_queue), "refused"),
            "take a task": (get(n.task_queue("cpu")), "refused"),
            "purge a task queue": (purge(n.task_queue("cpu")), "refused"),
            "declare a queue": (declare("pm.mine"), "refused"),
        },
    )


async def test_a_service_that_may_not_declare_checks_the_operator_did(
    node: PrivateRabbit, applied: dict[str, str]
) -> None:
    """The worker's transport declares its topology as every service does: refused, it checks the
    queues exist (they do: applied); for a capability nobody applied it says who must declare it."""
    user = user_name(NAMES, BrokerRole.WORKER, "w2")
    url = node.amqp_url.replace("guest:guest", f"{user}:{applied[user]}")
    transport = await RabbitMQ(url, NAMES, "test-worker").connect()
    try:
        await transport.declare(topology(NAMES, ("cpu", "gpu")))
        with pytest.raises(
            BrokerError, match=r"does not exist, and broker user 'pm.j1.worker.w2' may not declare it"
        ):
            await transport.declare(topology(NAMES, ("tpu",)))
        await transport.publish(
            NAMES.results_exchange, NAMES.results_key, b"an update"
        )  # user_id set: the broker checks it
    finally:
        await transport.close()


def test_apply_keeps_passwords_and_says_why_it_cannot(node: PrivateRabbit, tmp_path: Path) -> None:
    settings = settings_for(node, tmp_path)
    request = Request(workers="w1", secrets_dir=str(tmp_path / "s"))
    first = apply(settings, request)
    files = [Path(u["password_file"]) for u in first["users"]]
    assert {u["user"] for u in first["users"]} == {
        "pm.j1.coordinator", "pm.j1.aggregator", "pm.observer", "pm.j1.worker.w1"
    }  # fmt: skip
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    before = [f.read_text() for f in files]
    apply(settings, request)
    assert [f.read_text() for f in files] == before  # a re-run keeps every password
    with pytest.raises(ConfigError, match="not the job's"):
        apply(settings, Request(workers="w1:tpu", secrets_dir=str(tmp_path / "s")))
    wrong = Settings(
        **{**settings.__dict__, "amqp_url": settings.amqp_url.replace("guest:guest", "guest:nope")}
    )
    with pytest.raises(BrokerError, match="refused user 'guest' \\(401\\)"):
        apply(wrong, request)
    closed = Settings(**{**settings.__dict__, "management_url": "http://127.0.0.1:9/"})
    with pytest.raises(BrokerError, match="cannot reach the RabbitMQ management API"):
        apply(closed, request)
    # the command: exit code and message; the definitions file holds no password, only hashes (0600)
    out = tmp_path / "defs.json"
    cmd = [sys.executable, "-m", "fedq.cli", "broker", "apply", "--amqp-url", wrong.amqp_url, "--management-url",
           settings.management_url, "--namespace", NS, "--job", JOB, "--workers", "w1", "--secrets", str(tmp_path / "s")]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "refused user 'guest'" in result.stderr and "nope" not in result.stderr
    result = subprocess.run(
        [*cmd, "--definitions-file", str(out), "--json"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(out.read_text())
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert {u["name"] for u in doc["users"]} >= {"pm.j1.worker.w1", "pm.observer"}
    assert not any(p in out.read_text() for p in before)


LOGIN = re.compile(r" - ([^)]+)\): user '([^']+)' authenticated and granted access")


def logged_logins(marks: dict[Path, int]) -> dict[str, str]:
    """The logins a node's log files hold past ``marks`` (their sizes before): connection name -> user."""
    found = {}
    for log, start in marks.items():
        with log.open("rb") as fh:
            fh.seek(start)
            for line in fh.read().decode(errors="replace").splitlines():
                if match := LOGIN.search(line):
                    found[match.group(1)] = match.group(2)
    return found


def test_fedq_run_gives_each_process_its_own_broker_user(node: PrivateRabbit, tmp_path: Path) -> None:
    """A whole ``fedq run`` on the private node with --broker-users on, started by an operator whose
    password is in --amqp-url: while it runs, every process's connection logs in as its role's user (no
    process holds the operator's login, not even in its environment), the job reaches its end with its
    audit balanced, no file of the run folder holds the operator's password, the run's users go with
    it, and an auditor with the observer's account alone balances it again."""
    names = Names(NS, "runjob")
    out = tmp_path / "run"
    management = Management(node.management_url, "guest", "guest")
    password = f"pw-{uuid.uuid4().hex}"  # the operator's: it must end up in no file and no process
    # through the management API: a rabbitmqctl call starts an Erlang VM of its own (seconds)
    management.call("PUT", "/api/users/operator", {"password": password, "tags": "administrator"})
    management.call("PUT", "/api/permissions/%2F/operator", {"configure": ".*", "write": ".*", "read": ".*"})
    admin_url = node.amqp_url.replace("guest:guest", f"operator:{password}")
    marks = {log: log.stat().st_size for log in node.logs.glob("*.log")}  # this test's logins only
    proc = start_run(
        out, names, *FINISHED_RUN, "--job", names.job, "--management-url", node.management_url,
        "--broker-users", "on", "--delay-profile", "0.5*2", amqp_url=admin_url,
    )  # fmt: skip
    try:
        # Every login as the node logs it: the tiny job's coordinator can connect, finish and leave
        # between two connection listings on a loaded machine (a rabbitmqctl call takes seconds there).
        # The workers' half second of delay per task keeps the processes alive for the checks below.
        deadline = time.monotonic() + 120
        logins: dict[str, str] = {}
        while time.monotonic() < deadline and proc.poll() is None and len(logins) < 4:
            for name, user in logged_logins(marks).items():
                if name.startswith("fedq-") and name.endswith(("runjob", "w00", "w01")):
                    logins[name] = user
            time.sleep(0.1)
        assert logins == {
            "fedq-coordinator-runjob": "pm.runjob.coordinator",
            "fedq-aggregator-runjob": "pm.runjob.aggregator",
            "fedq-worker-w00": "pm.runjob.worker.w00",
            "fedq-worker-w01": "pm.runjob.worker.w01",
        }
        pids = run_pids(out)
        for name in ("coordinator", "aggregator", "w00"):
            environ = Path(f"/proc/{pids[name]}/environ").read_bytes().decode(errors="replace")
            assert "operator" not in environ and password not in environ, (
                name
            )  # nor the administrator's login
            cmdline = Path(f"/proc/{pids[name]}/cmdline").read_bytes().decode(errors="replace")
            assert "--amqp-password-file" in cmdline
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    assert password not in output
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"config.json", "summary.json", "coordinator.log", "aggregator.log", "w00.log"} <= {
        p.name for p in files
    }
    holding = [str(p.relative_to(out)) for p in files if password.encode() in p.read_bytes()]
    assert holding == [], f"files holding the operator's broker password: {holding}"
    assert json.loads((out / "config.json").read_text())["settings"]["amqp_url"] == admin_url.replace(
        f":{password}", ""
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["audit"]["ok"] and summary["audit"]["lost"] == 0 and summary["versions"] >= 6
    users = set(management.users())
    assert not any(u.startswith("pm.runjob.") for u in users)  # the run's accounts ended with it
    for f in (out / "keys" / "broker").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    # an auditor reads the run with the namespace's observer account alone: the logs and queue depths
    observer = user_name(names, BrokerRole.OBSERVER)
    audited = subprocess.run(
        fedq("audit", str(out), "--json", "--amqp-url", node.amqp_url.replace("guest:guest", observer),
             "--amqp-password-file", str(out / "keys" / "broker" / f"{observer}.password")),
        capture_output=True, text=True, timeout=120, env=service_env(),
    )  # fmt: skip
    assert audited.returncode == 0, audited.stderr
    balance = json.loads(audited.stdout)
    assert balance["ok"] and (balance["sent"], balance["in_queue"]) == (
        summary["audit"]["sent"],
        summary["audit"]["in_queue"],
    )


def test_worker_replicas_each_log_in_as_their_own_broker_user(node: PrivateRabbit, tmp_path: Path) -> None:
    """``fedq worker --replicas 2`` with {worker} in its URL and password file: each replica's
    connection logs in as its own worker's user."""
    keys = tmp_path / "keys"
    subprocess.run([*fedq("keys", "init", str(keys))], check=True, capture_output=True, timeout=60)
    secrets = tmp_path / "replicas"
    secrets.mkdir()
    for replica in ("w-r0", "w-r1"):
        user = user_name(NAMES, BrokerRole.WORKER, replica)
        apply(settings_for(node, tmp_path), Request(workers=replica, secrets_dir=str(tmp_path / "made")))
        (secrets / f"{replica}.password").write_text((tmp_path / "made" / f"{user}.password").read_text())
    url = node.amqp_url.replace("guest:guest", f"{NS}.{JOB}.worker.{{worker}}")
    worker = subprocess.Popen(
        fedq("worker", "--amqp-url", url, "--amqp-password-file", str(secrets / "{worker}.password"),
             "--namespace", NS, "--job", JOB, "--keys-dir", str(keys), "--worker-id", "w", "--replicas", "2",
             "--partition", "0/2", *TINY_APP),
        env=service_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        logins: dict[str, str] = {}
        while time.monotonic() < deadline and worker.poll() is None and len(logins) < 2:
            logins = {
                name: user
                for name, (user, _, _) in node.connections().items()
                if name.startswith("fedq-worker-w-r")
            }
            time.sleep(0.3)
        assert worker.poll() is None, worker.communicate()[0]
        assert logins == {"fedq-worker-w-r0": "pm.j1.worker.w-r0", "fedq-worker-w-r1": "pm.j1.worker.w-r1"}
    finally:
        worker.terminate()
        worker.wait(30)


def test_run_accounts_are_made_only_on_the_job_s_own_broker(
    node: PrivateRabbit, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A management API on the same host that belongs to another broker (the shared one, whose AMQP
    port is not --amqp-url's) is not used: auto goes on as the --amqp-url user and says so; on refuses."""
    other = Settings(amqp_url=node.amqp_url, management_url=SHARED_MANAGEMENT, namespace=NS, job="elsewhere")
    if not Management(SHARED_MANAGEMENT, "guest", "guest").answers():
        other = Settings(
            **{
                **other.__dict__,
                "management_url": node.management_url,
                "amqp_url": "amqp://guest:guest@127.0.0.1:1/",
            }
        )
    assert run_accounts(dataclasses.replace(other, broker_users="auto"), tmp_path / "s", ["w1"]) is None
    assert "belongs to a broker listening on" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="give its own API with --management-url"):
        run_accounts(dataclasses.replace(other, broker_users="on"), tmp_path / "s", ["w1"])
    assert not (tmp_path / "s").exists()  # nothing made
    mine = dataclasses.replace(
        other, amqp_url=node.amqp_url, management_url=node.management_url, broker_users="on"
    )
    found = run_accounts(mine, tmp_path / "s", ["w1"])
    assert found is not None and {a.user.name for a in found} >= {"pm.elsewhere.worker.w1"}
