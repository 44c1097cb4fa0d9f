"""Key files: a private key per process, created on first start, and the trust directory (keys by role)."""

from __future__ import annotations

import math
import re
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from shared.errors import ConfigError
from shared.files import write_atomic, write_private
from shared.signing import Keyring, Peer, Role, Signer, fingerprint


def load_or_create_signer(path: Path) -> Signer:
    """Load the private key at ``path`` or create it (mode 0600) with ``<path>.pub`` beside it."""
    if path.exists():
        signer = Signer(_read_private(path))
    else:
        signer = Signer.generate()
        write_private_key(signer, path)
    pub = public_key_path(path)
    if not pub.exists():
        write_public_key(signer.public, pub)
    return signer


@dataclass(frozen=True)
class KeyFileSigner(Signer):
    """The private key in ``path``, re-read when the file is replaced (``fedq keys rotate``): a
    running service signs with the new key within ``RELOAD_SECONDS``, with no restart."""

    path: Path = Path()
    _box: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def current(self) -> Signer:
        box = self._box
        now = time.monotonic()
        if now - box.get("checked", -math.inf) < RELOAD_SECONDS:
            return typing.cast(Signer, box.get("signer", self))
        box["checked"] = now
        try:
            stamp = self.path.stat().st_mtime_ns, self.path.stat().st_ino
        except OSError:
            return typing.cast(Signer, box.get("signer", self))  # gone for a moment: keep the last key
        if box.get("stamp") != stamp:
            try:
                box["signer"] = Signer(_read_private(self.path))
                box["stamp"] = stamp
            except ConfigError:
                return typing.cast(Signer, box.get("signer", self))  # half-written: look again later
        return typing.cast(Signer, box.get("signer", self))


def key_file_signer(path: Path) -> KeyFileSigner:
    """The key at ``path`` (created if missing), followed across rotations."""
    signer = load_or_create_signer(path)
    return KeyFileSigner(signer.private, path)


def _read_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:  # TypeError: encrypted
        raise ConfigError(f"{path} is not a usable PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 private key")
    return key


def write_private_key(signer: Signer, path: Path) -> None:
    """Write ``signer``'s private key to ``path`` (mode 0600), atomically, through a fresh temp file
    (``shared.files``: never one planted beside it)."""
    write_private(path, signer.private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))


def public_key_path(private_path: Path) -> Path:
    return private_path.with_suffix(".pub")


def write_public_key(key: Ed25519PublicKey, path: Path) -> None:
    write_atomic(path, key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"cannot read public key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} is not an Ed25519 public key")
    return key


# -- the trust directory ----------------------------------------------------------------------
#
#     <trusted>/coordinator/*.pub   the coordinator's key (two while a rotation settles)
#     <trusted>/aggregator/*.pub    the aggregators' keys
#     <trusted>/operator/*.pub      the operator's key (rollbacks, version 0 by hand)
#     <trusted>/workers/<id>.pub    one enrolled worker's key: it speaks for worker <id> only
#     <trusted>/revoked             fingerprints never to trust again, one per line
#
# ``fedq keys`` writes it; the services only read it.

ROLE_DIRS: dict[Role, str] = {
    Role.COORDINATOR: "coordinator",
    Role.AGGREGATOR: "aggregator",
    Role.OPERATOR: "operator",
    Role.WORKER: "workers",
}
REVOKED = "revoked"
RELOAD_SECONDS = 1.0  # the trust set is looked at no more often than this
WORKER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def role_dir(trusted: Path, role: Role) -> Path:
    return trusted / ROLE_DIRS[role]


def read_revoked(trusted: Path) -> set[str]:
    try:
        text = (trusted / REVOKED).read_text()
    except OSError:
        return set()
    return {line.split("#", 1)[0].strip() for line in text.splitlines()} - {""}


def read_trust(trusted: Path) -> tuple[dict[str, tuple[Ed25519PublicKey, Peer]], list[str]]:
    """Every trusted key in ``trusted`` with its role, and what was skipped (as sentences)."""
    revoked = read_revoked(trusted)
    entries: dict[str, tuple[Ed25519PublicKey, Peer]] = {}
    skipped: list[str] = []
    for role, folder in ROLE_DIRS.items():
        for pub in sorted((trusted / folder).glob("*.pub")) if (trusted / folder).is_dir() else []:
            try:
                key = load_public_key(pub)
            except ConfigError as exc:
                skipped.append(str(exc))  # a half-written or foreign file must not stop the service
                continue
            fp = fingerprint(key)
            if fp in revoked:
                continue
            worker_id = pub.stem if role is Role.WORKER else ""
            if role is Role.WORKER and not WORKER_ID.fullmatch(worker_id):
                skipped.append(f"{pub}: {worker_id!r} is not a worker id")
                continue
            old = entries.get(fp)
            if old is not None:
                skipped.append(f"{pub}: key {fp} is already trusted as {old[1].describe()}; one key, one role")
                continue
            entries[fp] = (key, Peer(fp, frozenset({role}), worker_id))
    loose = sorted(p.name for p in trusted.glob("*.pub")) if trusted.is_dir() else []
    if loose:
        skipped.append(
            f"{trusted} holds keys outside a role folder ({', '.join(loose)}): they are not trusted; "
            "put each in coordinator/, aggregator/, operator/ or workers/<id>.pub (fedq keys enrol)"
        )
    return entries, skipped


class DirectoryTrust(Keyring):
    """The trust set a directory lays out (see above), rebuilt when the directory changes: a key
    removed or revoked stops being trusted within ``RELOAD_SECONDS``, with no restart. The
    directory is looked at no more often than that, however many unknown signers knock."""

    def __init__(self, directory: Path, *, reload_seconds: float = RELOAD_SECONDS) -> None:
        super().__init__()
        self.directory = directory
        self.reload_seconds = reload_seconds
        self.skipped: list[str] = []
        self._stamp: tuple[Any, ...] | None = None
        self._checked = -math.inf
        self.reload()

    def _fingerprint_of_tree(self) -> tuple[Any, ...]:
        stamp: list[Any] = []
        for path in [self.directory / f for f in ROLE_DIRS.values()] + [self.directory / REVOKED, self.directory]:
            try:
                st = path.stat()
                stamp.append((path.name, st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                stamp.append((path.name, None))
        return tuple(stamp)

    def reload(self) -> None:
        """Rebuild the trust set from the directory now."""
        self._checked = time.monotonic()
        self._stamp = self._fingerprint_of_tree()
        entries, self.skipped = read_trust(self.directory)
        self.replace(entries)

    def refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.reload_seconds:
            return
        self._checked = now
        if self._fingerprint_of_tree() != self._stamp:
            self.reload()

    def missing(self, *needed: Role) -> list[str]:
        """What this service needs and the directory lacks, as sentences an operator can act on."""
        self.refresh()
        have = {role for peer in self.peers() for role in peer.roles}
        out = [
            f"no {role} key is trusted: its .pub belongs in {role_dir(self.directory, role)}/"
            + (" (fedq keys enrol WORKER_ID PUBKEY_FILE)" if role is Role.WORKER else "")
            for role in needed
            if role not in have
        ]
        return out + self.skipped
