"""Ed25519 signing and verification over bytes, and who may say what (no files, no network).

Every trusted key has a **role**: the coordinator's, an aggregator's, the operator's, or one
enrolled worker's (a worker key speaks for one worker id). ``Keyring.verify`` answers *who*
signed (a ``Peer``); ``authorize`` answers whether that peer may send that kind of message.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from shared.errors import BadSignatureError, UnknownSignerError, WrongRoleError, WrongWorkerError


class Role(StrEnum):
    COORDINATOR = "coordinator"
    AGGREGATOR = "aggregator"
    OPERATOR = "operator"
    WORKER = "worker"


# Which roles may send each message kind. Versions are special: version 0 and rollbacks are the
# coordinator's or the operator's, every other version an aggregator's (``version_signers``).
SENDERS: Mapping[str, frozenset[Role]] = {
    "task": frozenset({Role.COORDINATOR}),
    "round": frozenset({Role.COORDINATOR}),
    "update": frozenset({Role.WORKER}),
    "hello": frozenset({Role.WORKER}),
    "model": frozenset({Role.AGGREGATOR, Role.COORDINATOR, Role.OPERATOR}),
    "receipt": frozenset({Role.AGGREGATOR}),
    "receipts": frozenset({Role.AGGREGATOR}),
    "partial": frozenset({Role.AGGREGATOR}),  # an edge aggregator's
    "verdict": frozenset({Role.AGGREGATOR}),  # the root's
}


def version_signers(version: int, rollback: bool) -> frozenset[Role]:
    """Who may sign (and announce) ``version``: the job's owner for v0 and rollbacks, else an aggregator."""
    if version == 0 or rollback:
        return frozenset({Role.COORDINATOR, Role.OPERATOR})
    return frozenset({Role.AGGREGATOR})


def public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def fingerprint(key: Ed25519PublicKey) -> str:
    """Short stable id of a public key: first 16 hex digits of sha256(raw key)."""
    return hashlib.sha256(public_bytes(key)).hexdigest()[:16]


@dataclass(frozen=True)
class Signer:
    """A private key with its public fingerprint."""

    private: Ed25519PrivateKey

    @functools.cached_property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    @functools.cached_property
    def fingerprint(self) -> str:  # every message and manifest names it: derived once per key
        return fingerprint(self.public)

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)

    def current(self) -> Signer:
        """The key to sign with now (a key file that was rotated gives its new key)."""
        return self

    @classmethod
    def generate(cls) -> Signer:
        return cls(Ed25519PrivateKey.generate())


@dataclass(frozen=True)
class Peer:
    """Who a trusted key belongs to."""

    fingerprint: str
    roles: frozenset[Role]
    worker_id: str = ""  # the one worker id a worker key speaks for

    def describe(self) -> str:
        who = "/".join(sorted(self.roles))
        return f"{who} {self.worker_id} ({self.fingerprint})" if self.worker_id else f"{who} key {self.fingerprint}"


def authorize(kind: str, message: object, peer: Peer, raw: bytes = b"") -> None:
    """Raise ``WrongRoleError`` or ``WrongWorkerError`` unless ``peer`` may send this message."""
    allowed = SENDERS.get(kind, frozenset())
    if kind == "model":
        version = getattr(message, "version", -1)
        allowed = version_signers(version, getattr(message, "rollback_of", -1) >= 0)
    if not peer.roles & allowed:
        raise WrongRoleError(
            f"a {kind} message must come from {'/'.join(sorted(allowed))}, not {peer.describe()}", raw
        )
    worker_id = getattr(message, "worker_id", None)
    if Role.WORKER in peer.roles and kind in ("update", "hello") and worker_id != peer.worker_id:
        raise WrongWorkerError(
            f"the {kind} speaks for worker {worker_id!r}; its key is enrolled as {peer.worker_id!r}", raw
        )


class Keyring:
    """Trusted public keys by fingerprint, each with the roles it holds."""

    def __init__(self) -> None:
        self._keys: dict[str, tuple[Ed25519PublicKey, Peer]] = {}

    def add(self, key: Ed25519PublicKey, *roles: Role, worker_id: str = "") -> str:
        """Trust ``key`` in ``roles`` (a worker key: for ``worker_id``); returns its fingerprint."""
        if not roles:
            raise ValueError("a trusted key needs a role")
        fp = fingerprint(key)
        old = self._keys.get(fp)
        merged = frozenset(roles) | (old[1].roles if old else frozenset())
        self._keys[fp] = (key, Peer(fp, merged, worker_id or (old[1].worker_id if old else "")))
        return fp

    def replace(self, entries: dict[str, tuple[Ed25519PublicKey, Peer]]) -> None:
        """Swap in a rebuilt trust set (what a directory holds now: removals included)."""
        self._keys = dict(entries)

    def __contains__(self, fp: str) -> bool:
        self.refresh()
        return fp in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def peers(self) -> list[Peer]:
        self.refresh()
        return [peer for _, peer in self._keys.values()]

    def has_role(self, role: Role) -> bool:
        return any(role in peer.roles for peer in self.peers())

    def missing(self, *needed: Role) -> list[str]:
        """What a service needs and this keyring lacks, as sentences an operator can act on."""
        have = {role for peer in self.peers() for role in peer.roles}
        return [f"no {role} key is trusted" for role in needed if role not in have]

    def refresh(self) -> None:
        """Hook for keyrings backed by a directory (at a bounded rate); a plain keyring has nothing to reload."""

    def verify(self, fp: str, signature: bytes, data: bytes, raw: bytes = b"") -> Peer:
        """Check ``signature`` over ``data`` by the key ``fp``; who signed it."""
        self.refresh()
        entry = self._keys.get(fp)
        if entry is None:
            raise UnknownSignerError(f"signer {fp} is not among the trusted keys", raw)
        key, peer = entry
        try:
            key.verify(signature, data)
        except InvalidSignature:
            raise BadSignatureError(f"signature by {fp} does not verify", raw) from None
        return peer


class TrustReminder:
    """Says plainly which keys a service lacks to go on (``Keyring.missing`` of ``needed``), as
    ``trust_incomplete`` warnings, at most once every ``every`` seconds however often it is asked:
    per refused message would flood the log, never would leave the operator guessing."""

    def __init__(self, keyring: Keyring, needed: tuple[Role, ...], log: Any, every: float = 30.0) -> None:
        self.keyring = keyring
        self.needed = needed
        self.log = log
        self.every = every
        self._said = -math.inf

    def say(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._said < self.every:
            return
        self._said = now
        for problem in self.keyring.missing(*self.needed):
            self.log.warning("trust_incomplete", problem=problem)
