"""The model store: versioned models with manifests, on a local directory by default.

Layout under the store root: ``jobs/<job>/models/v000012.bin`` (the model) and
``v000012.json`` (its manifest, written last: a version exists once its
manifest does). Every read checks the sha256.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from shared.errors import CorruptVersionError, StoreError, UnsignedVersionError, WireError
from shared.files import PRIVATE, TEMP_PREFIX, write_atomic
from shared.messages import ModelAnnouncement
from shared.privacy import DP_ACCOUNTING
from shared.signing import Keyring, Peer, Signer, version_signers
from shared.tensors import FlatModel

if TYPE_CHECKING:
    from shared.settings import Settings


class ObjectStore(Protocol):
    async def put(self, key: str, data: bytes) -> None: ...

    async def get(self, key: str) -> bytes: ...

    async def list(self, prefix: str) -> list[str]: ...

    async def exists(self, key: str) -> bool: ...

    async def presign_get(self, key: str, expires_s: int) -> str | None:
        """A URL that lets anyone GET this object until it expires; None if the store cannot presign."""
        ...

    async def presign_put(self, key: str, expires_s: int, size: int | None = None) -> str | None:
        """A URL that lets anyone PUT this object (of exactly ``size`` bytes, when given) until it
        expires; None if the store cannot presign."""
        ...


class LocalStore:
    """Objects as files under ``root``; writes are atomic (a fresh temp file opened O_EXCL, fsync,
    rename: ``shared.files``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise StoreError(f"invalid store key {key!r}")
        return self.root / key

    def _put(self, key: str, data: bytes) -> None:
        write_atomic(self._path(key), data, mode=PRIVATE, fsync=True)

    def _get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise StoreError(f"{key!r} is not in the store at {self.root}") from None

    def _list(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(
            str(p.relative_to(self.root))
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(TEMP_PREFIX)
        )

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._put, key, data)

    async def get(self, key: str) -> bytes:
        return await asyncio.to_thread(self._get, key)

    async def list(self, prefix: str) -> list[str]:
        return await asyncio.to_thread(self._list, prefix)

    async def exists(self, key: str) -> bool:
        return self._path(key).is_file()  # one stat: cheap enough to do on the loop

    async def presign_get(self, key: str, expires_s: int) -> None:
        return None  # a local directory has no URLs to hand out

    async def presign_put(self, key: str, expires_s: int, size: int | None = None) -> None:
        return None


def open_store(spec: str, settings: Settings | None = None) -> ObjectStore:
    """``--store`` value to a store: a local directory path (``file://`` optional) or
    ``s3://bucket/prefix`` (endpoint, region and keys from ``settings``, default: the environment)."""
    if spec.startswith("s3://"):
        from shared.s3 import S3Store  # here, so that a local store never imports aioboto3
        from shared.settings import Settings

        return S3Store.from_settings(spec, settings if settings is not None else Settings.from_env())
    if "://" in spec and not spec.startswith("file://"):
        raise StoreError(f"unsupported store {spec!r}: use a local directory or s3://bucket/prefix")
    return LocalStore(Path(spec.removeprefix("file://")))


@dataclass(frozen=True)
class Manifest:
    job_id: str
    version: int
    parent: int
    sha256: str
    size: int
    key: str
    update_ids: tuple[str, ...]
    created_at: float
    policy: dict[str, Any] = field(default_factory=dict)
    mean_staleness: float = 0.0
    updates_total: int = 0
    update_digests: tuple[str, ...] = ()  # sha256 of each applied update message, in order
    # ``fedq model rollback``: this version re-stores version N's model (no updates, parent = the latest)
    rollback_of: int | None = None
    incarnation: str = ""  # the job's nonce, drawn with version 0 and carried by every version after
    # who made this version, and their Ed25519 signature over ``signed_bytes()`` (hex)
    signer: str = ""
    signature: str = ""

    def signed_bytes(self) -> bytes:
        """What the signature covers: every field but the signature, as canonical JSON."""
        d = json.loads(self.to_json())
        d.pop("signature", None)
        return b"fedq-manifest\n" + json.dumps(d, sort_keys=True, separators=(",", ":")).encode()

    def signed_by(self, signer: Signer) -> Manifest:
        """This manifest, signed by ``signer`` (an aggregator's key; the coordinator's or the
        operator's for version 0 and rollbacks)."""
        signer = signer.current()
        unsigned = dataclasses.replace(self, signer=signer.fingerprint, signature="")
        return dataclasses.replace(unsigned, signature=signer.sign(unsigned.signed_bytes()).hex())

    def verify(self, keyring: Keyring) -> Peer:
        """Who made this version; ``UnsignedVersionError`` unless its signature verifies and is by
        a key whose role may make it (``version_signers``)."""
        where = f"version {self.version} of job {self.job_id}"
        if not self.signer or not self.signature:
            raise UnsignedVersionError(f"{where} is not signed")
        try:
            sig = bytes.fromhex(self.signature)
            peer = keyring.verify(self.signer, sig, self.signed_bytes())
        except ValueError:
            raise UnsignedVersionError(f"{where} has a malformed signature") from None
        except WireError as exc:
            raise UnsignedVersionError(f"{where}: {exc}") from None
        allowed = version_signers(self.version, self.rollback_of is not None)
        if not peer.roles & allowed:
            raise UnsignedVersionError(
                f"{where} is signed by {peer.describe()}; only {'/'.join(sorted(allowed))} keys make it"
            )
        return peer

    @classmethod
    def first(cls, job_id: str, blob: bytes, created_at: float) -> Manifest:
        """The manifest of version 0 of ``job_id``, whose model is ``blob``."""
        return cls(
            job_id=job_id,
            version=0,
            parent=-1,
            sha256=hashlib.sha256(blob).hexdigest(),
            size=len(blob),
            key=model_key(job_id, 0),
            update_ids=(),
            created_at=created_at,
            incarnation=secrets.token_hex(8),
        )

    def announcement(self) -> ModelAnnouncement:
        """The message that tells the fleet this version is stored."""
        return ModelAnnouncement(
            job_id=self.job_id,
            version=self.version,
            parent=self.parent,
            sha256=self.sha256,
            key=self.key,
            update_ids=self.update_ids,
            created_at=self.created_at,
            mean_staleness=self.mean_staleness,
            updates_total=self.updates_total,
            rollback_of=-1 if self.rollback_of is None else self.rollback_of,
            dp_epsilon=self.dp_epsilon,
        )

    @property
    def dp_epsilon(self) -> float | None:
        """Epsilon after this version, from its DP accounting (``None``: made without DP)."""
        accounting = self.policy.get(DP_ACCOUNTING) or {}
        return float(accounting["epsilon"]) if "epsilon" in accounting else None

    def to_json(self) -> str:
        # a shallow dict: json.dumps reads the policy record as it is (asdict would deep-copy it)
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["update_ids"] = list(self.update_ids)
        d["update_digests"] = list(self.update_digests)
        if self.rollback_of is None:
            del d["rollback_of"]  # ordinary versions keep the format older readers know
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            d = json.loads(text)
            d["update_ids"] = tuple(d["update_ids"])
            d["update_digests"] = tuple(d.get("update_digests", ()))
            if d.get("rollback_of") is not None and not isinstance(d["rollback_of"], int):
                raise TypeError(f"rollback_of must be a version number, not {d['rollback_of']!r}")
            return cls(**d)
        except (ValueError, TypeError, KeyError) as exc:
            raise CorruptVersionError(f"corrupt manifest: {exc}") from exc


def model_key(job_id: str, version: int) -> str:
    return f"jobs/{job_id}/models/v{version:06d}.bin"


def manifest_key(job_id: str, version: int) -> str:
    return f"jobs/{job_id}/models/v{version:06d}.json"


def state_key(job_id: str, version: int) -> str:
    """Where a version's server optimizer state (FedOpt's moments) goes, beside its model."""
    return f"jobs/{job_id}/models/v{version:06d}.state"


# The key of a manifest's policy record that names its server optimizer state: {"sha256", "size"}.
SERVER_STATE = "server_state"


def update_key(job_id: str, task_id: str) -> str:
    """Where the claim-checked update of one task goes: the only key its presigned PUT reaches."""
    return f"jobs/{job_id}/updates/{task_id}.bin"


class ModelStore:
    """Versions of one job's global model."""

    def __init__(self, objects: ObjectStore, job_id: str, trust: Keyring | None = None) -> None:
        """``trust``: the keys whose signatures make a version; with it, every manifest read is
        vouched for (``vouch``: signed by a key allowed to make it, for this run of the job;
        ``UnsignedVersionError`` otherwise). Without it (tests, tools
        that only list), manifests are read as they are."""
        self.objects = objects
        self.job_id = job_id
        self.trust = trust
        self._incarnation: str | None = None  # version 0's, pinned at the first read

    async def save(self, manifest: Manifest, blob: bytes, state: bytes | None = None) -> None:
        """Store a version: its model, its server optimizer ``state`` (whose sha256 the manifest's
        policy record carries), then the manifest, which makes it a version."""
        if hashlib.sha256(blob).hexdigest() != manifest.sha256:
            raise StoreError("refusing to store a model whose bytes do not match its sha256")
        if state is not None:
            named = manifest.policy.get(SERVER_STATE) or {}
            if hashlib.sha256(state).hexdigest() != named.get("sha256"):
                raise StoreError("refusing to store a server state whose bytes do not match its sha256")
            await self.objects.put(state_key(self.job_id, manifest.version), state)
        await self.objects.put(manifest.key, blob)
        await self.objects.put(manifest_key(self.job_id, manifest.version), manifest.to_json().encode())

    async def manifest(self, version: int) -> Manifest:
        raw = await self.objects.get(manifest_key(self.job_id, version))
        try:
            manifest = Manifest.from_json(raw.decode())
        except UnicodeDecodeError as exc:
            raise CorruptVersionError(f"corrupt manifest of version {version}: {exc}") from None
        if manifest.version != version or manifest.job_id != self.job_id:
            raise CorruptVersionError(
                f"the manifest stored as version {version} of job {self.job_id} says "
                f"version {manifest.version} of job {manifest.job_id}"
            )
        if self.trust is not None:
            await self.vouch(manifest)
        return manifest

    async def vouch(self, manifest: Manifest) -> Peer:
        """Who made ``manifest``, checked against ``trust``: its signature must verify, by a key
        whose role may make it, and a version after 0 must carry version 0's incarnation (else it
        was signed for an earlier run that used the same job id, and put back by whoever can write
        the store). ``UnsignedVersionError`` otherwise."""
        assert self.trust is not None, "vouching needs a trust set"
        peer = manifest.verify(self.trust)
        if manifest.version == 0 and self._incarnation is None:
            self._incarnation = manifest.incarnation
        if manifest.incarnation != (ours := await self.incarnation()):
            raise UnsignedVersionError(
                f"version {manifest.version} of job {self.job_id} was signed for another run of the "
                f"job (incarnation {manifest.incarnation or 'none'}, this run's is {ours})"
            )
        return peer

    async def incarnation(self) -> str:
        """The job's incarnation: the nonce version 0 was made with. With ``trust`` it is read once
        and then pinned, so a version 0 of another run swapped in later is refused too."""
        if self._incarnation is not None:
            return self._incarnation
        return (await self.manifest(0)).incarnation

    async def latest_signed(self) -> int | None:
        """The newest version whose manifest verifies (with ``trust``): what a service may adopt.
        Newer, unsigned ones are skipped (``UnsignedVersionError`` is the caller's to log)."""
        for version in reversed(await self.versions()):
            try:
                await self.manifest(version)
            except (UnsignedVersionError, CorruptVersionError):
                continue
            return version
        return None

    async def load_bytes(self, version: int) -> tuple[Manifest, bytes]:
        manifest = await self.manifest(version)
        blob = await self.objects.get(manifest.key)
        digest = hashlib.sha256(blob).hexdigest()
        if digest != manifest.sha256:
            raise StoreError(
                f"version {version} of job {self.job_id} is corrupt: sha256 {digest} "
                f"but its manifest says {manifest.sha256}"
            )
        return manifest, blob

    async def load_state(self, manifest: Manifest) -> bytes | None:
        """The server optimizer state stored with ``manifest``'s version (checked against the
        sha256 it signs), or ``None`` when it has none (sgd, version 0, a rollback)."""
        named = manifest.policy.get(SERVER_STATE)
        if not named:
            return None
        blob = await self.objects.get(state_key(self.job_id, manifest.version))
        if hashlib.sha256(blob).hexdigest() != named.get("sha256"):
            raise StoreError(
                f"the server optimizer state of version {manifest.version} of job {self.job_id} is "
                "corrupt: its sha256 differs from the manifest's"
            )
        return blob

    async def load(self, version: int) -> tuple[Manifest, FlatModel]:
        manifest, blob = await self.load_bytes(version)
        return manifest, FlatModel.from_bytes(blob)

    async def versions(self) -> list[int]:
        keys = await self.objects.list(f"jobs/{self.job_id}/models/")
        out = []
        for key in keys:
            name = key.rsplit("/", 1)[-1]
            if name.startswith("v") and name.endswith(".json"):
                try:
                    out.append(int(name[1:-5]))
                except ValueError:
                    continue
        return sorted(out)

    async def exists(self, version: int) -> bool:
        return await self.objects.exists(manifest_key(self.job_id, version))

    async def latest(self) -> int | None:
        versions = await self.versions()
        return versions[-1] if versions else None
