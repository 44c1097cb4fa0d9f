"""A private RabbitMQ node for fault tests: a child of the test run that a test may stop and restart.

The machine's shared RabbitMQ (127.0.0.1:5672) is never touched. The private node has its own
node name (``fedq-test-<random>@localhost``), its own free AMQP and distribution ports, its own
Erlang cookie (``$HOME/.erlang.cookie`` under a private ``HOME``) and its own data, log and config
files under a temporary directory. ``restart()`` keeps the data directory, so durable queues and
persistent messages survive, as they do when a production broker restarts.

Debian's ``/usr/sbin/rabbitmq-server`` and ``rabbitmqctl`` are wrappers that switch to the
``rabbitmq`` user (whose ``HOME`` holds the shared node's cookie) or refuse to run; we call the
real scripts in ``/usr/lib/rabbitmq/bin`` instead, with our private ``HOME`` and
``RABBITMQ_CONF_ENV_FILE`` (the package's ``/etc/rabbitmq/rabbitmq-env.conf`` names the shared
node).

RabbitMQ 3.10 checks ``consumer_timeout`` only when a channel "ticks", every
``channel_tick_interval`` ms (60 000 by default): a 5 s timeout fires after about 60 s unless the
tick is made shorter too (``channel_tick_ms``, set through advanced.config).

If a private node cannot be started, ``start()`` raises ``PrivateBrokerError`` with the reason and
the tail of the node's output; the fixtures turn that into a loud test failure, never a skip.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

START_TIMEOUT = 90.0  # a cold start takes ~5 s; leave room for a loaded 2-core machine
STOP_TIMEOUT = 60.0
AMQP_PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"

_live: set[PrivateRabbit] = set()


class PrivateBrokerError(RuntimeError):
    """A private RabbitMQ node could not be started or controlled."""


def free_port() -> int:
    """A loopback TCP port that nothing listens on (bound, then released) for a server to take."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _is_debian_wrapper(path: Path) -> bool:
    try:
        return "su rabbitmq" in path.read_text(errors="replace")
    except OSError:
        return False


def find_rabbitmq_scripts() -> Path:
    """The directory holding the real ``rabbitmq-server`` and ``rabbitmqctl`` scripts."""
    candidates: list[Path] = []
    if os.environ.get("FEDQ_RABBITMQ_SBIN"):
        candidates.append(Path(os.environ["FEDQ_RABBITMQ_SBIN"]))
    candidates.append(Path("/usr/lib/rabbitmq/bin"))  # Debian/Ubuntu package
    on_path = shutil.which("rabbitmq-server")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for d in candidates:
        server, ctl = d / "rabbitmq-server", d / "rabbitmqctl"
        if server.exists() and ctl.exists() and not _is_debian_wrapper(server):
            return d
    raise PrivateBrokerError(
        f"no usable rabbitmq-server/rabbitmqctl scripts in {[str(c) for c in candidates]} "
        "(install the rabbitmq-server package or set FEDQ_RABBITMQ_SBIN)"
    )


try:  # loaded here, not in the forked child (loading a library after fork can deadlock)
    _libc: ctypes.CDLL | None = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:
    _libc = None


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the test process dies (Linux), so no node outlives it."""
    if _libc is not None:
        _libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, not the process: nodes are
# spawned from this one thread, which lives as long as the test process (whichever thread calls
# start(), e.g. asyncio.to_thread in an async test).
_spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="private-rabbit-spawner")


def amqp_answers(host: str, port: int, timeout: float = 2.0) -> bool:
    """True when ``host:port`` speaks AMQP 0-9-1: it answers our protocol header with a method frame."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(AMQP_PROTOCOL_HEADER)
            first = s.recv(1)
            return first == b"\x01"  # frame type 1: connection.start
    except OSError:
        return False


EXTERNAL_AUTH_PLUGIN = "rabbitmq_auth_mechanism_ssl"


def tls_conf(port: int, ca: Path, cert: Path, key: Path, *, external: bool = False) -> tuple[str, ...]:
    """rabbitmq.conf lines (``conf=``) of a TLS listener on 127.0.0.1:``port`` beside the plain one,
    with the broker's certificate and key, trusting client certificates signed by ``ca`` (asked
    for, not required: a client may log in with a password instead). ``external``: clients may
    also log in with EXTERNAL as the user their certificate's CN names (``plugins=`` must hold
    ``EXTERNAL_AUTH_PLUGIN``)."""
    lines = [
        f"listeners.ssl.1 = 127.0.0.1:{port}",
        f"ssl_options.cacertfile = {ca}",
        f"ssl_options.certfile = {cert}",
        f"ssl_options.keyfile = {key}",
        "ssl_options.verify = verify_peer",
        "ssl_options.fail_if_no_peer_cert = false",
    ]
    if external:
        lines += [
            "auth_mechanisms.1 = PLAIN",
            "auth_mechanisms.2 = AMQPLAIN",
            "auth_mechanisms.3 = EXTERNAL",
            "ssl_cert_login_from = common_name",
        ]
    return tuple(lines)


class PrivateRabbit:
    """One private RabbitMQ node, started as a child process of the test run."""

    def __init__(
        self,
        root: Path,
        *,
        consumer_timeout_ms: int | None = None,
        channel_tick_ms: int | None = None,
        start_timeout: float = START_TIMEOUT,
        conf: tuple[str, ...] = (),
        plugins: tuple[str, ...] = (),
        node: str | None = None,
        cookie: str | None = None,
    ) -> None:
        """``conf``: more rabbitmq.conf lines (a TLS listener, ``max_message_size``); ``plugins``:
        plugins to enable, e.g. ``rabbitmq_management`` (its port: ``management_port``, free).
        ``node`` and ``cookie``: the node's name and Erlang cookie (default: made up), which the
        nodes of a cluster choose before they start (tests/support/private_cluster.py)."""
        self.root = root
        self.consumer_timeout_ms = consumer_timeout_ms
        self.channel_tick_ms = channel_tick_ms
        self.extra_conf = conf
        self.plugins = plugins
        self.start_timeout = start_timeout
        self.scripts = find_rabbitmq_scripts()
        self.node = node or f"fedq-test-{secrets.token_hex(4)}@localhost"
        self.cookie = cookie or secrets.token_hex(16).upper()
        self.host = "127.0.0.1"
        self.port = free_port()
        self.dist_port = free_port()
        while self.dist_port == self.port:
            self.dist_port = free_port()
        self.management_port = free_port()
        while self.management_port in (self.port, self.dist_port):
            self.management_port = free_port()
        self.home = root / "home"
        self.mnesia = root / "mnesia"
        self.logs = root / "log"
        self.output = root / "node-output.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._write_files()

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@{self.host}:{self.port}/"

    @property
    def management_url(self) -> str:
        """The management API (when ``plugins`` holds ``rabbitmq_management``); guest may use it
        from loopback."""
        return f"http://{self.host}:{self.management_port}/"

    # -- files ----------------------------------------------------------------
    def _write_files(self) -> None:
        for d in (self.home, self.mnesia, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(self.cookie)
            cookie.chmod(0o400)  # Erlang refuses a cookie others can read
        # Our own env file, so /etc/rabbitmq/rabbitmq-env.conf (the shared node's) is not read.
        (self.root / "rabbitmq-env.conf").write_text(
            'export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"\n'
        )
        conf = [
            f"listeners.tcp.1 = {self.host}:{self.port}",
            "loopback_users.guest = true",
            "log.console = false",  # the log goes to RABBITMQ_LOG_BASE/<node>.log
            "disk_free_limit.absolute = 10MB",
        ]
        if self.consumer_timeout_ms is not None:
            conf.append(f"consumer_timeout = {self.consumer_timeout_ms}")
        if "rabbitmq_management" in self.plugins:
            conf.append(f"management.tcp.ip = {self.host}")
            conf.append(f"management.tcp.port = {self.management_port}")
        conf.extend(self.extra_conf)
        (self.root / "rabbitmq.conf").write_text("\n".join(conf) + "\n")
        rabbit_env = []
        if self.channel_tick_ms is not None:
            rabbit_env.append(f"{{channel_tick_interval, {self.channel_tick_ms}}}")
        (self.root / "advanced.config").write_text(f"[{{rabbit, [{', '.join(rabbit_env)}]}}].\n")
        (self.root / "enabled_plugins").write_text(f"[{','.join(self.plugins)}].\n")

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            {
                "HOME": str(self.home),
                "RABBITMQ_CONF_ENV_FILE": str(self.root / "rabbitmq-env.conf"),
                "RABBITMQ_NODENAME": self.node,
                "RABBITMQ_NODE_IP_ADDRESS": self.host,
                "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_MNESIA_BASE": str(self.mnesia),
                "RABBITMQ_LOG_BASE": str(self.logs),
                "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.root / "advanced.config"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
                "RABBITMQ_PID_FILE": str(self.root / "node.pid"),
                "ERL_EPMD_ADDRESS": "127.0.0.1",
            }
        )
        return env

    # -- control --------------------------------------------------------------
    def ctl(self, *args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n NODE ...`` with the node's cookie."""
        try:
            result = subprocess.run(
                [str(self.scripts / "rabbitmqctl"), "-n", self.node, *args],
                env=self.env(),
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise PrivateBrokerError(f"rabbitmqctl {' '.join(args)} took more than {timeout}s") from exc
        if check and result.returncode != 0:
            raise PrivateBrokerError(
                f"rabbitmqctl -n {self.node} {' '.join(args)} failed ({result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-2000:]}"
            )
        return result

    def connections(self) -> dict[str, tuple[str, bool, int]]:
        """The node's client connections by their client-provided name: (user, over TLS, broker port),
        as the node holds them now (the management API's view lags by its statistics interval)."""
        listing = self.ctl("list_connections", "client_properties", "user", "ssl", "port", "--formatter", "json")
        found = {}
        for c in json.loads(listing.stdout):
            props = c["client_properties"]
            if not isinstance(props, dict):  # [[key, type, value], ...]; a closing connection's may be cut short
                props = {p[0]: p[2] for p in props if isinstance(p, list) and len(p) == 3}
            found[str(props.get("connection_name"))] = (c["user"], bool(c["ssl"]), int(c["port"]))
        return found

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the node and return once it accepts AMQP connections and has finished booting."""
        if self.running:
            return
        if amqp_answers(self.host, self.port, timeout=1.0):
            raise PrivateBrokerError(f"port {self.port} already answers AMQP: it is not ours to use")
        self.starts += 1
        with self.output.open("ab") as out:
            out.write(f"\n===== start #{self.starts} at {time.ctime()} =====\n".encode())
            out.flush()
            self.proc = _spawner.submit(
                subprocess.Popen,
                [str(self.scripts / "rabbitmq-server")],
                env=self.env(),
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() can reach the whole tree
                preexec_fn=_die_with_parent,
            ).result()
        _live.add(self)
        deadline = time.monotonic() + self.start_timeout
        while not amqp_answers(self.host, self.port):
            if self.proc.poll() is not None:
                raise PrivateBrokerError(
                    f"private RabbitMQ node {self.node} exited with code {self.proc.returncode} "
                    f"while starting:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise PrivateBrokerError(
                    f"private RabbitMQ node {self.node} did not accept AMQP on {self.host}:{self.port} "
                    f"within {self.start_timeout:.0f}s:\n{self.tail()}"
                )
            time.sleep(0.1)  # a refused connect costs nothing: look often
        remaining = max(5.0, deadline - time.monotonic())
        self.ctl("await_startup", "--timeout", str(int(remaining)), timeout=remaining + 10)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the node gracefully (``rabbitmqctl stop``), killing it if it does not go in time."""
        if not self.running:
            _live.discard(self)
            return
        assert self.proc is not None
        with contextlib.suppress(PrivateBrokerError):
            self.ctl("stop", timeout=timeout, check=False)
        try:
            self.proc.wait(timeout)  # the script waits for the VM, so this is the whole node
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        _live.discard(self)

    def kill(self) -> None:
        """Hard-kill the node's whole process group (a crash, not a shutdown)."""
        if self.proc is None:
            return
        self._signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(15)
        _live.discard(self)

    def restart(self, down_seconds: float = 2.0) -> None:
        """Stop, stay down ``down_seconds``, start again with the same data directory."""
        self.stop()
        time.sleep(down_seconds)
        self.start()

    def _signal(self, sig: signal.Signals) -> None:
        """Signal the node's process group, only while its leader (our child) is not yet reaped:
        until then the group id cannot belong to anyone else."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)  # our own child's group (start_new_session), by id

    def tail(self, chars: int = 4000) -> str:
        texts = []
        for path in (self.output, *sorted(self.logs.glob("*.log"))):
            if path.exists():
                texts.append(f"--- {path} ---\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(texts) or "(the node wrote no output)"


@atexit.register
def _kill_leftovers() -> None:
    for node in list(_live):
        node.kill()


@contextlib.contextmanager
def private_rabbit_node(
    root: Path | None = None,
    *,
    consumer_timeout_ms: int | None = None,
    channel_tick_ms: int | None = None,
    conf: tuple[str, ...] = (),
    plugins: tuple[str, ...] = (),
) -> Iterator[PrivateRabbit]:
    """A started private node that is always killed at the end, whatever happens in between. Killed,
    not stopped: its data goes with it, and a graceful stop (``rabbitmqctl stop``, then the node's
    shutdown) only costs seconds, several with the management plugin on a loaded machine."""
    with contextlib.ExitStack() as stack:
        if root is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedq-rabbit-")))
        node = PrivateRabbit(
            root, consumer_timeout_ms=consumer_timeout_ms, channel_tick_ms=channel_tick_ms, conf=conf, plugins=plugins
        )
        try:
            node.start()
            yield node
        finally:
            node.kill()


MakeRabbit = Callable[..., PrivateRabbit]


@pytest.fixture(name="make_private_rabbit", scope="module")
def make_private_rabbit_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakeRabbit]:
    """A factory of started private nodes (``make(consumer_timeout_ms=5000, channel_tick_ms=1000)``),
    one node per configuration for the test module: a node takes seconds to start, so the module's
    tests share it (each on a namespace of its own; one may restart it). A node found stopped (a test
    failed while it was down) is started again. Every node it made is killed at the module's end,
    even when a test failed. A node that cannot be started fails the test loudly with the reason."""
    nodes: dict[tuple[object, ...], PrivateRabbit] = {}
    with contextlib.ExitStack() as stack:

        def make(
            consumer_timeout_ms: int | None = None,
            channel_tick_ms: int | None = None,
            conf: tuple[str, ...] = (),
            plugins: tuple[str, ...] = (),
        ) -> PrivateRabbit:
            config = (consumer_timeout_ms, channel_tick_ms, conf, plugins)
            try:
                if config in nodes:
                    nodes[config].start()  # nothing to do if it runs
                else:
                    nodes[config] = stack.enter_context(
                        private_rabbit_node(
                            tmp_path_factory.mktemp("rabbit"),
                            consumer_timeout_ms=consumer_timeout_ms,
                            channel_tick_ms=channel_tick_ms,
                            conf=conf,
                            plugins=plugins,
                        )
                    )
            except PrivateBrokerError as exc:
                pytest.fail(f"cannot start a private RabbitMQ node for this test: {exc}", pytrace=False)
            return nodes[config]

        yield make


@pytest.fixture(name="private_rabbit")
def private_rabbit_fixture(make_private_rabbit: MakeRabbit) -> PrivateRabbit:
    """The module's started private node with the default configuration."""
    return make_private_rabbit()
