"""Why a connection to the broker failed, in words that name the flag to fix.

aiormq reports a failed certificate check, a reset by a TLS listener and a port that speaks
plain AMQP alike as ``AMQPConnectionError``. The cause it keeps (an ``ssl`` error) and a look at
what the port speaks (one greeting, no login) tell them apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import aiormq.exceptions

from shared.tls import ClientTls, uses_tls

AMQP_PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
AMQP_METHOD_FRAME = 0x01  # a broker answers our header with connection.start
AMQP_HEADER_START = ord("A")  # ... or with its own header, when it wants another version
TLS_RECORDS = (0x15, 0x16)  # a TLS server answers a ClientHello with a handshake or an alert record
# OpenSSL's verify codes for a certificate that chains but names another host
HOST_MISMATCH = frozenset({62, 64})  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
PROBE_SECONDS = 3.0
# the alerts a broker sends about the client's certificate
CLIENT_CERT_ALERTS = (
    "ALERT_UNKNOWN_CA",
    "ALERT_BAD_CERTIFICATE",
    "ALERT_CERTIFICATE_UNKNOWN",
    "ALERT_CERTIFICATE_EXPIRED",
    "ALERT_CERTIFICATE_REVOKED",
    "ALERT_UNSUPPORTED_CERTIFICATE",
)


async def explain(url: str, exc: BaseException, tls: ClientTls | None) -> str | None:
    """What went wrong connecting to ``url`` (passwordless), if it is one of the refusals a user
    can fix by a flag; ``None`` for anything else (the broker is down, a timeout)."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = parts.port or (5671 if uses_tls(url) else 5672)
    where = f"{host}:{port}"
    causes = list(_causes(exc))
    if any(isinstance(c, aiormq.exceptions.AuthenticationError) for c in causes):
        return _no_mechanism(url, where)
    if any(isinstance(c, aiormq.exceptions.ProbableAuthenticationError) for c in causes):
        return _login_refused(url, where, tls)
    if any(isinstance(c, ConnectionRefusedError) for c in causes):
        return None
    verify = next((c for c in causes if isinstance(c, ssl.SSLCertVerificationError)), None)
    if verify is not None:
        return _not_verified(host, where, verify, tls)
    if uses_tls(url):
        if await _speaks(host, port, AMQP_PROTOCOL_HEADER, (AMQP_METHOD_FRAME, AMQP_HEADER_START)):
            return (
                f"{where} speaks plain AMQP, not TLS: --amqp-url is amqps:// but this is the broker's "
                "plain port; use the broker's TLS port (usually 5671) in --amqp-url, or amqp:// without "
                "TLS"
            )
        # aiormq keeps the TLS alert as an ssl error or only in its own message's text
        text = " ".join(repr(c) for c in causes)
        if "CERTIFICATE_REQUIRED" in text:
            return (
                f"the broker at {where} asks for a client certificate: give --amqp-cert and --amqp-key "
                "(fedq broker certs --client NAME makes one)"
            )
        # TLS 1.3: a refused client certificate is an alert after the handshake, or only a reset
        if (
            tls is not None
            and tls.cert
            and ("ALERT" not in text or any(a in text for a in CLIENT_CERT_ALERTS))
        ):
            return (
                f"the broker at {where} refused the TLS connection: it does not accept --amqp-cert "
                f"{tls.cert} (is it signed by a CA the broker trusts, its ssl_options.cacertfile?)"
            )
        return None
    if await _speaks(host, port, _client_hello(host), TLS_RECORDS):
        return (
            f"{where} is a TLS port: --amqp-url is amqp:// (plain) but the broker wants TLS here; use "
            "amqps:// in --amqp-url, with --amqp-ca naming the CA of the broker's certificate"
        )
    return None


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what caused it, each once (aiormq's chains can loop)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]


def _not_verified(host: str, where: str, error: ssl.SSLCertVerificationError, tls: ClientTls | None) -> str:
    detail = error.verify_message or str(error)
    if error.verify_code in HOST_MISMATCH:
        return (
            f"the broker's TLS certificate at {where} does not name {host} ({detail}): dial a name it "
            f"holds in --amqp-url, or give the broker a certificate for it (fedq broker certs --host {host})"
        )
    trusted = f"--amqp-ca {tls.ca}" if tls is not None and tls.ca else "the system's CAs (no --amqp-ca given)"
    return (
        f"the broker's TLS certificate at {where} does not chain to {trusted} ({detail}): give --amqp-ca "
        "the CA certificate that signed the broker's certificate"
    )


def _login_refused(url: str, where: str, tls: ClientTls | None) -> str:
    if _mechanism(url) == "EXTERNAL":
        cert = f"--amqp-cert {tls.cert}" if tls is not None and tls.cert else "no --amqp-cert given"
        return (
            f"the broker at {where} refused the login by certificate (EXTERNAL, {cert}): it needs a "
            "broker user named as the certificate's CN, with permissions on the vhost"
        )
    user = urlsplit(url).username or "guest"
    return (
        f"the broker at {where} refused user {user!r}: check the user in --amqp-url and its password "
        "(in --amqp-url, --amqp-password-file or FEDQ_AMQP_PASSWORD) and the user's vhost permissions"
    )


def _no_mechanism(url: str, where: str) -> str:
    mechanism = _mechanism(url)
    if mechanism == "EXTERNAL":
        return (
            f"the broker at {where} does not offer login by certificate (EXTERNAL): enable its "
            "rabbitmq_auth_mechanism_ssl plugin and auth_mechanisms, or name a user with a password in "
            "--amqp-url"
        )
    return f"the broker at {where} does not offer the {mechanism} login mechanism that --amqp-url asks for"


def _mechanism(url: str) -> str:
    return parse_qs(urlsplit(url).query).get("auth", ["plain"])[-1].upper()


def _client_hello(host: str) -> bytes:
    """The first bytes a TLS client sends (a ClientHello), made without a socket."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # nothing is trusted or sent: only the server's first byte is read
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    session = context.wrap_bio(incoming, outgoing, server_hostname=host)
    with contextlib.suppress(ssl.SSLWantReadError):
        session.do_handshake()
    return outgoing.read()


async def _speaks(host: str, port: int, greeting: bytes, first_bytes: tuple[int, ...]) -> bool:
    """Whether ``host:port`` answers ``greeting`` with a byte from ``first_bytes``."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), PROBE_SECONDS)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(greeting)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(1), PROBE_SECONDS)
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), PROBE_SECONDS)
    return len(answer) == 1 and answer[0] in first_bytes
