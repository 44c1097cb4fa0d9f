"""``fedq broker certs``: a private CA and the certificates of a TLS broker and its clients.

One folder holds them: ``ca.pem`` and ``ca.key`` (the CA), ``server.pem``/``server.key`` (the
broker's, naming localhost, 127.0.0.1 and every ``--host``) and ``<CN>.pem``/``<CN>.key`` per
client (its subject CN is the broker user it logs in as by certificate). A re-run keeps what is
there and adds what is asked: a new client, or a server certificate remade to name a new host.
A certificate that the folder's CA did not sign is remade. Keys are mode 0600; every file is
written to a temporary name opened with O_EXCL, then renamed into place.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature

from shared.errors import ConfigError
from shared.files import write_atomic, write_private
from shared.tls import (
    DEFAULT_HOSTS,
    Issued,
    check_common_name,
    issue_client,
    issue_server,
    load_issued,
    make_ca,
    san_names,
)

CA = "ca"
SERVER = "server"


@dataclass(frozen=True)
class Request:
    """One ``fedq broker certs``, as parsed from the command line."""

    out: str
    hosts: tuple[str, ...] = ()
    clients: tuple[str, ...] = ()
    as_json: bool = False


def make_certs(out: Path, hosts: Iterable[str] = (), clients: Iterable[str] = ()) -> dict[str, Any]:
    """The CA, the broker's certificate for localhost, 127.0.0.1 and ``hosts``, and one certificate
    per client CN, in ``out``: each made, remade or kept (see the module docstring)."""
    names = [check_common_name(c) for c in dict.fromkeys(clients)]
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)  # it holds private keys
    ca, ca_state = _ca(out)
    files: list[dict[str, Any]] = [_entry(out, CA, CA, ca_state)]
    wanted = list(dict.fromkeys([*DEFAULT_HOSTS, *hosts]))
    server = _kept(out, SERVER, ca)
    if server is not None and set(wanted) <= san_names(server.cert):
        server_state = "kept"
    else:
        if server is not None:  # name the hosts it named too: clients dial them already
            wanted += sorted(san_names(server.cert) - set(wanted))
        server_state = "made" if server is None and not _exists(out, SERVER) else "remade"
        server = issue_server(ca, wanted)
        _write(out, SERVER, server)
    files.append({**_entry(out, SERVER, SERVER, server_state), "hosts": sorted(san_names(server.cert))})
    for name in names:
        client = _kept(out, name, ca)
        state = "kept"
        if client is None:
            state = "remade" if _exists(out, name) else "made"
            _write(out, name, issue_client(ca, name))
        files.append(_entry(out, name, "client", state))
    return {"out": str(out), "files": files}


def render(done: dict[str, Any]) -> str:
    out = Path(done["out"])
    where = out.resolve()  # rabbitmq.conf wants absolute paths (where they are on the broker)
    lines = [f"certificates in {out} (keys mode 0600):"]
    for f in done["files"]:
        hosts = f"  names {', '.join(f['hosts'])}" if "hosts" in f else ""
        lines.append(f"  {f['state']:<6} {f['cert']}  {f['key']}{hosts}")
    lines += [
        "hand out:",
        f"  {out / 'ca.pem'}  -> everyone: clients verify the broker with it (--amqp-ca); the broker checks "
        "client certificates against it",
        f"  {out / 'ca.key'}  -> stays with you: it signs new certificates (fedq broker certs --out {out} "
        "--client NAME)",
        f"  {out / 'server.pem'}, {out / 'server.key'}  -> the broker only",
    ]
    clients = [f["name"] for f in done["files"] if f["role"] == "client"]
    for name in clients:
        lines.append(
            f"  {out / (name + '.pem')}, {out / (name + '.key')}  -> whoever logs in as broker user {name!r} "
            "(--amqp-cert, --amqp-key)"
        )
    lines += [
        "the broker's rabbitmq.conf:",
        "  listeners.ssl.default = 5671",
        f"  ssl_options.cacertfile = {where / 'ca.pem'}",
        f"  ssl_options.certfile = {where / 'server.pem'}",
        f"  ssl_options.keyfile = {where / 'server.key'}",
        "  ssl_options.verify = verify_peer",
        "  ssl_options.fail_if_no_peer_cert = false",
        "then: fedq ... --amqp-url amqps://USER@HOST:5671/ --amqp-ca ca.pem (--amqp-password-file FILE, or "
        "--amqp-cert NAME.pem --amqp-key NAME.key for a login by certificate: see README, TLS)",
    ]
    return "\n".join(lines)


def run(request: Request) -> tuple[int, str | dict[str, Any]]:
    """``fedq broker certs``: exit code and what to print."""
    if not request.out:
        raise ConfigError("fedq broker certs needs --out DIR: where to write the certificates")
    done = make_certs(Path(request.out), request.hosts, request.clients)
    return 0, (done if request.as_json else render(done))


def _ca(out: Path) -> tuple[Issued, str]:
    cert, key = out / f"{CA}.pem", out / f"{CA}.key"
    if cert.exists() and key.exists():
        return _read(out, CA), "kept"
    if cert.exists() or key.exists():
        raise ConfigError(
            f"{out} holds only one of ca.pem and ca.key: put the other back, or remove both (and every "
            "certificate it signed) to start a new CA"
        )
    ca = make_ca()
    _write(out, CA, ca)
    return ca, "made"


def _kept(out: Path, name: str, ca: Issued) -> Issued | None:
    """``name``'s certificate and key if both are there and ``ca`` signed it; else ``None``."""
    if not _exists(out, name):
        return None
    issued = _read(out, name)
    try:
        issued.cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):
        return None
    return issued


def _exists(out: Path, name: str) -> bool:
    return (out / f"{name}.pem").exists() and (out / f"{name}.key").exists()


def _read(out: Path, name: str) -> Issued:
    cert, key = out / f"{name}.pem", out / f"{name}.key"
    try:
        return load_issued(cert.read_bytes(), key.read_bytes())
    except (OSError, ConfigError) as exc:
        raise ConfigError(f"cannot read {cert} and {key}: {exc}") from exc


def _entry(out: Path, name: str, role: str, state: str) -> dict[str, Any]:
    return {
        "name": name,
        "role": role,
        "state": state,
        "cert": str(out / f"{name}.pem"),
        "key": str(out / f"{name}.key"),
    }


def _write(out: Path, name: str, issued: Issued) -> None:
    write_private(out / f"{name}.key", issued.key_pem)
    write_atomic(out / f"{name}.pem", issued.cert_pem)
