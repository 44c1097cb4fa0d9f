"""Key files: a private key per process, created on first start, and trusted-key directories."""

from __future__ import annotations

import os
from pathlib import Path

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
from shared.signing import Keyring, Signer


def load_or_create_signer(path: Path) -> Signer:
    """Load the private key at ``path`` or create it (mode 0600) with ``<path>.pub`` beside it."""
    if path.exists():
        try:
            key = load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:  # TypeError: encrypted
            raise ConfigError(f"{path} is not a usable PEM private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path} is not an Ed25519 private key")
        signer = Signer(key)
    else:
        signer = Signer.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = signer.private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        os.replace(tmp, path)
    pub = public_key_path(path)
    if not pub.exists():
        write_public_key(signer.public, pub)
    return signer


def public_key_path(private_path: Path) -> Path:
    return private_path.with_suffix(".pub")


def write_public_key(key: Ed25519PublicKey, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    os.replace(tmp, path)


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"cannot read public key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} is not an Ed25519 public key")
    return key


class DirectoryKeyring(Keyring):
    """Trusts every ``*.pub`` file in a directory; re-reads it when an unknown signer shows up."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory = directory
        self.refresh()

    def refresh(self) -> None:
        if not self.directory.is_dir():
            return
        for pub in sorted(self.directory.glob("*.pub")):
            try:
                self.add(load_public_key(pub))
            except ConfigError:
                continue  # a half-written or foreign file must not stop the service
