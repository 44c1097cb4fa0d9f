"""TLS to the broker: the client's ``ssl.SSLContext`` from settings, and certificates for tests
and small deployments (``fedq broker certs``).

Pure functions: no event loop, no broker client. ``client_tls`` is what the transport connects
with; the ``make_*``/``issue_*`` functions build a private CA, a broker (server)
certificate naming the hosts clients dial, and client certificates whose subject CN is the
broker user they log in as (EXTERNAL auth, ``rabbitmq_auth_mechanism_ssl``).
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.amqp_urls import split_urls
from shared.errors import ConfigError
from shared.settings import Settings

TLS_SCHEME = "amqps"
# What a client certificate's CN may be: it names a broker user and the files that hold it.
COMMON_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
RESERVED_NAMES = frozenset({"ca", "server"})  # the CA's and the broker's own files
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
CA_DAYS = 3650
LEAF_DAYS = 825


# -- the client's side ---------------------------------------------------------------------------


def uses_tls(url: str) -> bool:
    return urlsplit(url).scheme == TLS_SCHEME


@dataclass(frozen=True)
class ClientTls:
    """How an ``amqps://`` connection checks the broker and shows itself: the context, and the
    files it came from (for messages that name them)."""

    context: ssl.SSLContext
    ca: str = ""  # "" = the system's CAs
    cert: str = ""  # "" = no client certificate
    cert_login: str = ""  # the certificate's CN: the broker user it logs in as by EXTERNAL


def client_tls(settings: Settings) -> ClientTls | None:
    """The TLS an ``amqps://`` connection uses: the broker verified against ``--amqp-ca`` (else
    the system's CAs), its host name checked, ``--amqp-cert`` shown when given; ``None`` for
    ``amqp://``.

    TLS flags with a plain URL are refused rather than ignored: the user asked for a verified
    broker and would get an unencrypted link."""
    if bool(settings.amqp_cert) != bool(settings.amqp_key):
        raise ConfigError("--amqp-cert and --amqp-key go together: give both or neither")
    if len({uses_tls(url) for url in split_urls(settings.amqp_url)}) > 1:
        raise ConfigError("--amqp-url mixes amqp:// and amqps:// URLs: give every node of the list one scheme")
    if not uses_tls(settings.amqp_url):
        given = [flag for flag, value in _tls_flags(settings) if value]
        if given:
            raise ConfigError(
                f"{' and '.join(given)} apply to amqps:// URLs only, but --amqp-url is "
                f"{urlsplit(settings.amqp_url).scheme}://: use amqps:// and the broker's TLS port"
            )
        return None
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.amqp_ca or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot read --amqp-ca {settings.amqp_ca}: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.amqp_cert:
        try:
            context.load_cert_chain(settings.amqp_cert, settings.amqp_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load --amqp-cert {settings.amqp_cert} with --amqp-key {settings.amqp_key}: {exc}"
            ) from exc
        cert = x509.load_pem_x509_certificate(Path(settings.amqp_cert).read_bytes())
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return ClientTls(context, settings.amqp_ca, settings.amqp_cert, str(names[0].value) if names else "")
    return ClientTls(context, settings.amqp_ca, settings.amqp_cert)


def _tls_flags(settings: Settings) -> tuple[tuple[str, str], ...]:
    return (
        ("--amqp-ca", settings.amqp_ca),
        ("--amqp-cert", settings.amqp_cert),
        ("--amqp-key", settings.amqp_key),
    )


# -- certificates --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    """A certificate with its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())

    @property
    def common_name(self) -> str:
        return str(self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def load_issued(cert_pem: bytes, key_pem: bytes) -> Issued:
    """A certificate and its key read back from PEM (the CA of an earlier ``fedq broker certs``)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = load_pem_private_key(key_pem, password=None)
    except ValueError as exc:
        raise ConfigError(f"not a PEM certificate and key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise ConfigError("the key is not the certificate's (an EC key made by fedq broker certs)")
    return Issued(cert, key)


def make_ca(name: str = "fedq broker CA", days: int = CA_DAYS) -> Issued:
    """A self-signed CA that signs only leaf certificates (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        _builder(subject, subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    )
    return Issued(builder.sign(key, hashes.SHA256()), key)


def issue_server(ca: Issued, hosts: Iterable[str] = DEFAULT_HOSTS, days: int = LEAF_DAYS) -> Issued:
    """The broker's certificate: every name or IP address in ``hosts`` as a subject alternative
    name (clients check the host they dial against these)."""
    names = list(dict.fromkeys(hosts))
    if not names:
        raise ConfigError("a server certificate needs at least one host name or address")
    sans = [_san(h) for h in names]
    return _issue(ca, names[0], days, ExtendedKeyUsageOID.SERVER_AUTH, x509.SubjectAlternativeName(sans))


def issue_client(ca: Issued, common_name: str, days: int = LEAF_DAYS) -> Issued:
    """A client certificate whose subject CN is ``common_name``: the broker user it logs in as
    with EXTERNAL auth (``ssl_cert_login_from = common_name``)."""
    check_common_name(common_name)
    return _issue(ca, common_name, days, ExtendedKeyUsageOID.CLIENT_AUTH, None)


def check_common_name(name: str) -> str:
    if not COMMON_NAME.fullmatch(name) or name in RESERVED_NAMES:
        raise ConfigError(
            f"bad client name {name!r}: letters, digits, '.', '-' and '_' (at most 64, not starting with "
            f"'.', '-' or '_'), and not {' or '.join(sorted(RESERVED_NAMES))}"
        )
    return name


def san_names(cert: x509.Certificate) -> set[str]:
    """The DNS names and IP addresses a certificate holds, as text."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(n.value) for n in sans if isinstance(n, x509.DNSName | x509.IPAddress)}


def _issue(
    ca: Issued,
    common_name: str,
    days: int,
    usage: x509.ObjectIdentifier,
    sans: x509.SubjectAlternativeName | None,
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        _builder(subject, ca.cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    if sans is not None:
        builder = builder.add_extension(sans, critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # a little slack for clock skew
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?", host):
        raise ConfigError(f"bad host {host!r}: a DNS name or an IP address")
    return x509.DNSName(host.lower())
