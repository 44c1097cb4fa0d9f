"""``fedq broker apply``: the broker's accounts, permissions, policies and topology for one job.

Each role gets its own broker user (``broker_config.permissions``): the coordinator, the aggregator,
an observer for the reading tools, and one user per worker: by default every worker enrolled in
the trust directory (``fedq keys enrol``), so broker accounts follow enrolment. A user's password is
made once, kept in ``<secrets>/<user>.password`` (mode 0600) and handed to that party only; applying
again keeps it. Everything goes to the broker in one definitions document, through the management
API (``POST /api/definitions``, which merges it into what the broker holds), or into a file for a
broker that loads definitions at boot (compose.yaml) or ``rabbitmqctl import_definitions``.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from broker_config.definitions import access, definitions, policies
from broker_config.names import Names
from broker_config.permissions import BrokerRole, BrokerUser, job_users
from broker_config.topology import topology
from shared.amqp_urls import each_url, split_urls
from shared.errors import BrokerError, ConfigError
from shared.files import write_private
from shared.keys import WORKER_ID
from shared.settings import Settings
from shared.transport.connect import broker_password, read_password

PASSWORD_SUFFIX = ".password"


@dataclass(frozen=True)
class Request:
    """One ``fedq broker apply``, as parsed from the command line."""

    # comma-separated worker ids, each optionally with its capabilities (w1:cpu+gpu);
    # "" = every worker enrolled in the trust directory, with all the job's capabilities
    workers: str = ""
    secrets_dir: str = ""  # default <keys-dir>/broker
    definitions_file: str = ""  # write the document here instead of sending it
    as_json: bool = False


@dataclass(frozen=True)
class Account:
    """A broker user and where its password is kept."""

    user: BrokerUser
    password_file: Path

    @property
    def password(self) -> str:
        return self.password_file.read_text().strip()

    def url(self, base_url: str) -> str:
        """``base_url`` (each URL of the list) with this user's name and no password (the password
        travels in its file)."""
        return each_url(base_url, lambda url: _with_login(url, f"{quote(self.user.name, safe='')}@"))

    @staticmethod
    def anonymous_url(base_url: str) -> str:
        """``base_url`` (each URL of the list) with no login at all."""
        return each_url(base_url, lambda url: _with_login(url, ""))


def _with_login(url: str, login: str) -> str:
    """``url`` with ``login`` (``user@`` or nothing) in place of its own."""
    parts = urlsplit(url)
    return parts._replace(netloc=login + parts.netloc.rpartition("@")[2]).geturl()


def enrolled_workers(trusted: Path) -> tuple[str, ...]:
    """The worker ids enrolled in the trust directory (``workers/<id>.pub``)."""
    folder = trusted / "workers"
    ids = sorted(p.stem for p in folder.glob("*.pub")) if folder.is_dir() else []
    return tuple(i for i in ids if WORKER_ID.fullmatch(i))


def password_for(directory: Path, user: str) -> Path:
    """The file holding ``user``'s password, made (random, mode 0600, created exclusively) if absent."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"{user}{PASSWORD_SUFFIX}"
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise ConfigError(f"{path} holds a broker password but others may read it: chmod 600 {path}")
        return path
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # made by another apply meanwhile: use it
        return path
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(24) + "\n")
    return path


def accounts(
    names: Names, capabilities: tuple[str, ...], workers: dict[str, tuple[str, ...]], secrets_dir: Path
) -> list[Account]:
    return [Account(u, password_for(secrets_dir, u.name)) for u in job_users(names, capabilities, workers)]


def parse_workers(text: str, capabilities: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """``w1,w2:gpu+lowmem`` -> {w1: (), w2: (gpu, lowmem)}: each worker id with the capabilities it
    serves (none given: all the job's). A capability the job lacks is a mistake, said at once."""
    workers: dict[str, tuple[str, ...]] = {}
    for item in (w.strip() for w in text.split(",")):
        if not item:
            continue
        wid, _, caps = item.partition(":")
        if not WORKER_ID.fullmatch(wid):
            raise ConfigError(f"invalid worker id {wid!r}: letters, digits, '.', '-' or '_'")
        own = tuple(c for c in caps.split("+") if c)
        if unknown := [c for c in own if c not in capabilities]:
            raise ConfigError(
                f"worker {wid}: capabilities {unknown} are not the job's ({','.join(capabilities)})"
            )
        workers[wid] = own
    return workers


def document(
    names: Names, capabilities: tuple[str, ...], found: list[Account], shards: int = 0
) -> dict[str, Any]:
    """The definitions document: the job's topology (with ``shards``' queues), its accounts and the policies."""
    doc = definitions(topology(names, capabilities, shards=shards))
    doc.update(access([(a.user, a.password) for a in found]))
    doc["policies"] = policies(names)
    del doc["vhosts"]  # the vhost exists (we talk to it); a document may not change it
    return doc


def login(settings: Settings) -> tuple[str, str]:
    """The user and password of ``--amqp-url`` (the password: the URL's, else ``--amqp-password-file``
    or ``FEDQ_AMQP_PASSWORD``, as the transport reads them)."""
    parts = urlsplit(split_urls(settings.amqp_url)[0])
    user = unquote(parts.username or "guest")
    if parts.password is not None:
        return user, unquote(parts.password)
    if broker_password(settings) is not None:
        return user, read_password(settings)
    return user, "" if parts.username else "guest"


class Management:
    """The RabbitMQ management API, as the ``--amqp-url`` user."""

    def __init__(self, url: str, user: str, password: str, timeout: float = 15.0, ca_file: str = "") -> None:
        """``ca_file``: the CA an ``https://`` API's certificate must chain to (default: the system's)."""
        self.url = url.rstrip("/")
        self.user = user
        self._tls = ssl.create_default_context(cafile=ca_file or None)
        self._auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"authorization": self._auth, "content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self._tls) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            if exc.code == 401:
                raise BrokerError(
                    f"the management API at {self.url} refused user {self.user!r} (401): "
                    "wrong password, or the user lacks the administrator tag"
                ) from None
            raise BrokerError(
                f"the management API at {self.url} answered {method} {path} with {exc.code}: {detail}"
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise BrokerError(
                f"cannot reach the RabbitMQ management API at {self.url} ({reason}): is the management "
                "plugin on (rabbitmq-plugins enable rabbitmq_management) and --management-url right?"
            ) from None
        return json.loads(text) if text.strip() else None

    def answers(self) -> bool:
        try:
            self.call("GET", "/api/overview")
        except BrokerError:
            return False
        return True

    def amqp_ports(self) -> set[int]:
        """The AMQP ports (plain and TLS) of the broker behind this API."""
        overview = self.call("GET", "/api/overview") or {}
        return {
            int(x["port"])
            for x in overview.get("listeners", [])
            if str(x.get("protocol", "")).startswith("amqp")
        }

    def apply(self, doc: dict[str, Any]) -> None:
        self.call("POST", "/api/definitions", doc)

    def users(self) -> list[str]:
        return [u["name"] for u in self.call("GET", "/api/users") or []]

    def delete_users(self, names: list[str]) -> None:
        if names:
            self.call("POST", "/api/users/bulk-delete", {"users": names})


def management_for(settings: Settings) -> Management:
    user, password = login(settings)
    return Management(settings.management, user, password, ca_file=settings.amqp_ca)


def plan(settings: Settings, request: Request) -> tuple[list[Account], dict[str, Any]]:
    names = Names(settings.namespace, settings.job)
    caps = settings.capability_list
    if request.workers:
        workers = parse_workers(request.workers, caps)
    else:
        workers = {wid: () for wid in enrolled_workers(settings.trusted_dir)}
    secrets_dir = Path(request.secrets_dir) if request.secrets_dir else Path(settings.keys_dir) / "broker"
    found = accounts(names, caps, workers, secrets_dir)
    return found, document(names, settings.capability_list, found, settings.shards)


def apply(settings: Settings, request: Request) -> dict[str, Any]:
    """Make (or update) the job's broker users, permissions, policies and topology; what was done."""
    found, doc = plan(settings, request)
    if request.definitions_file:
        path = Path(request.definitions_file)
        write_private(path, (json.dumps(doc, indent=2) + "\n").encode())  # it holds password hashes
        where = str(path)
    else:
        management_for(settings).apply(doc)
        where = settings.management
    return {
        "applied_to": where,
        "job": settings.job,
        "namespace": settings.namespace,
        "users": [
            {
                "user": a.user.name,
                "role": str(a.user.role),
                "worker_id": a.user.worker_id or None,
                "password_file": str(a.password_file),
            }
            for a in found
        ],
    }


def render(result: dict[str, Any]) -> str:
    lines = [f"applied job {result['job']} (namespace {result['namespace']}) to {result['applied_to']}"]
    for u in result["users"]:
        lines.append(f"  {u['role']:<11} {u['user']:<40} password in {u['password_file']}")
    lines.append("give each party its user name and password file; nobody else needs them")
    return "\n".join(lines)


def run(settings: Settings, request: Request) -> str | dict[str, Any]:
    result = apply(settings, request)
    return result if request.as_json else render(result)


def run_accounts(settings: Settings, secrets_dir: Path, worker_ids: list[str]) -> list[Account] | None:
    """``fedq run``'s broker users (``--broker-users``): the job's accounts made through the
    management API, or None when the run goes on as the ``--amqp-url`` user (off, or auto and the
    API does not answer: said on stdout)."""
    if settings.broker_users not in ("auto", "on", "off"):
        raise ConfigError(f"--broker-users must be auto, on or off, not {settings.broker_users!r}")
    if settings.broker_users == "off":
        return None
    management = management_for(settings)
    if settings.broker_users == "auto" and not management.answers():
        print(
            f"fedq: the RabbitMQ management API does not answer at {settings.management}: every process "
            "logs in as the --amqp-url user, without a broker user of its role "
            "(rabbitmq-plugins enable rabbitmq_management, or --broker-users off to silence this)",
            flush=True,
        )
        return None
    parts = urlsplit(split_urls(settings.amqp_url)[0])
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    if port not in (ports := management.amqp_ports()):  # another broker's API on the same host
        why = (
            f"the management API at {settings.management} belongs to a broker listening on {sorted(ports)}, "
            f"not on --amqp-url's port {port}"
        )
        if settings.broker_users == "on":
            raise ConfigError(f"{why}: give its own API with --management-url")
        print(
            f"fedq: {why}: every process logs in as the --amqp-url user (--management-url to fix)", flush=True
        )
        return None
    found, doc = plan(settings, Request(workers=",".join(worker_ids), secrets_dir=str(secrets_dir)))
    management.apply(doc)
    return found


def login_flags(account: Account, base_url: str) -> list[str]:
    """The flags that log a process in as ``account`` (its password stays in its file)."""
    flags = ["--amqp-url", account.url(base_url), "--amqp-password-file", str(account.password_file)]
    if account.user.role in (BrokerRole.COORDINATOR, BrokerRole.AGGREGATOR):
        flags += ["--broker-identity", "require"]  # every worker has its own account here
    return flags
