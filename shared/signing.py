"""Ed25519 signing and verification over bytes (no files, no network)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from shared.errors import BadSignatureError, UnknownSignerError


def public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def fingerprint(key: Ed25519PublicKey) -> str:
    """Short stable id of a public key: first 16 hex digits of sha256(raw key)."""
    return hashlib.sha256(public_bytes(key)).hexdigest()[:16]


@dataclass(frozen=True)
class Signer:
    """A private key with its public fingerprint."""

    private: Ed25519PrivateKey

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public)

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)

    @classmethod
    def generate(cls) -> Signer:
        return cls(Ed25519PrivateKey.generate())


class Keyring:
    """Trusted public keys by fingerprint. ``refresh`` is called on an unknown signer."""

    def __init__(self, keys: dict[str, Ed25519PublicKey] | None = None) -> None:
        self._keys: dict[str, Ed25519PublicKey] = dict(keys or {})

    def add(self, key: Ed25519PublicKey) -> str:
        fp = fingerprint(key)
        self._keys[fp] = key
        return fp

    def __contains__(self, fp: str) -> bool:
        return fp in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def refresh(self) -> None:
        """Hook for keyrings backed by a directory; a plain keyring has nothing to reload."""

    def verify(self, fp: str, signature: bytes, data: bytes, raw: bytes = b"") -> None:
        key = self._keys.get(fp)
        if key is None:
            self.refresh()
            key = self._keys.get(fp)
        if key is None:
            raise UnknownSignerError(f"signer {fp} is not among the trusted keys", raw)
        try:
            key.verify(signature, data)
        except InvalidSignature:
            raise BadSignatureError(f"signature by {fp} does not verify", raw) from None
