"""``fedq keys init | create | enrol | revoke | list | rotate``: the operator's keys and the trust directory.

The trust directory (``shared.keys``: ``<trusted>/{coordinator,aggregator,operator}/<fingerprint>.pub``,
``<trusted>/workers/<worker id>.pub`` and ``<trusted>/revoked``) is written here and only read by
the services, which pick up every change within a second (``DirectoryTrust``). Every write is
atomic (a temporary file, then ``os.replace``) and private keys are mode 0600. The functions are a
library (``fedq run`` lays out its run's keys with them); ``run`` is the command body.
"""

from __future__ import annotations

import getpass
import os
import re
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared.errors import ConfigError
from shared.files import private_dir, write_atomic
from shared.keys import (
    REVOKED,
    ROLE_DIRS,
    WORKER_ID,
    DirectoryTrust,
    load_or_create_signer,
    load_public_key,
    public_key_path,
    read_revoked,
    role_dir,
    write_private_key,
    write_public_key,
)
from shared.settings import Settings
from shared.signing import Role, Signer, fingerprint

# The keys ``fedq keys init`` makes, and where each one goes.
INIT_ROLES = (Role.OPERATOR, Role.COORDINATOR, Role.AGGREGATOR)
ROTATABLE = (Role.COORDINATOR, Role.AGGREGATOR)
FINGERPRINT = re.compile(r"[0-9a-f]{16}")


def flat_key_file(keys_dir: Path, process: str) -> Path:
    """``fedq keys init``'s layout: every key of the operator's in one folder (``<keys_dir>/<role>.key``),
    from which the operator hands each to its machine."""
    return keys_dir / f"{process}.key"


def run_key_file(keys_dir: Path, process: str) -> Path:
    """``fedq run``'s layout: each process's private key in a folder of its own, mode 0700, that no
    other process of the run is given: ``coordinator/coordinator.key``, ``aggregator/aggregator.key``,
    ``operator/operator.key`` and ``workers/<id>/worker-<id>.key`` (``process`` ``worker-<id>``)."""
    if process.startswith("worker-"):
        return keys_dir / "workers" / process.removeprefix("worker-") / f"{process}.key"
    return keys_dir / process / f"{process}.key"


@dataclass(frozen=True)
class TrustedKey:
    """One public key file in the trust directory."""

    role: Role
    worker_id: str  # a worker key's id (its file stem); "" for the other roles
    fingerprint: str
    file: str
    revoked: bool = False  # listed in <trusted>/revoked: the services ignore it


@dataclass(frozen=True)
class Request:
    """One ``fedq keys`` action, as parsed from the command line."""

    action: str  # init | create | enrol | revoke | list | rotate
    directory: str = ""  # init: DIR (default: --keys-dir)
    worker_id: str = ""  # create, enrol
    pubkey: str = ""  # enrol: PUBKEY_FILE
    what: str = ""  # revoke: WORKER_ID or FINGERPRINT; rotate: the role
    replace: bool = False  # enrol: a worker id already enrolled gets this key instead
    as_json: bool = False


# -- reading the trust directory --------------------------------------------------------------


def scan(trusted: Path) -> tuple[list[TrustedKey], list[str]]:
    """Every public key file in the role folders (revoked ones marked), and the files that are not keys."""
    revoked = read_revoked(trusted)
    found: list[TrustedKey] = []
    unreadable: list[str] = []
    for role, folder in ROLE_DIRS.items():
        where = trusted / folder
        for pub in sorted(where.glob("*.pub")) if where.is_dir() else []:
            try:
                fp = fingerprint(load_public_key(pub))
            except ConfigError as exc:
                unreadable.append(str(exc))
                continue
            worker_id = pub.stem if role is Role.WORKER else ""
            found.append(TrustedKey(role, worker_id, fp, str(pub), fp in revoked))
    return found, unreadable


def listing(trusted: Path) -> dict[str, Any]:
    """What ``fedq keys list`` shows: the keys, the revoked fingerprints, and what the services would skip."""
    keys, _ = scan(trusted)
    trust = DirectoryTrust(trusted)
    return {
        "trusted_dir": str(trusted),
        "keys": [asdict(k) for k in keys if not k.revoked],
        "revoked": sorted(read_revoked(trusted)),
        "revoked_but_present": [k.file for k in keys if k.revoked],
        "problems": trust.missing(Role.COORDINATOR, Role.AGGREGATOR, Role.WORKER),
    }


def render_listing(found: dict[str, Any]) -> str:
    lines = [f"trust directory {found['trusted_dir']}"]
    lines.append(f"  {'role':<12} {'worker id':<20} {'fingerprint':<16}  file")
    for k in found["keys"]:
        lines.append(f"  {k['role']:<12} {k['worker_id'] or '-':<20} {k['fingerprint']:<16}  {k['file']}")
    if not found["keys"]:
        lines.append("  (no trusted keys)")
    lines.append(f"revoked: {', '.join(found['revoked']) or '-'}")
    for file in found["revoked_but_present"]:
        lines.append(f"  {file} holds a revoked key: ignored; delete it")
    if found["problems"]:
        lines.append("problems:")
        lines += [f"  {p}" for p in found["problems"]]
    return "\n".join(lines)


# -- writing it ----------------------------------------------------------------------------------


def _owner_of(trusted: Path, fp: str) -> list[TrustedKey]:
    return [k for k in scan(trusted)[0] if k.fingerprint == fp]


def _refuse_revoked(trusted: Path, fp: str, what: str) -> None:
    if fp in read_revoked(trusted):
        raise ConfigError(
            f"{what} {fp} is revoked (listed in {trusted / REVOKED}): make a new key; a revoked key is never "
            "trusted again"
        )


def trust_role_key(trusted: Path, role: Role, key: Ed25519PublicKey) -> Path:
    """Put ``key`` in ``role``'s folder as ``<fingerprint>.pub`` (a coordinator, aggregator or operator
    key); refuses a revoked key or one trusted in another role. Idempotent."""
    if role is Role.WORKER:
        raise ConfigError(
            "a worker key is enrolled under its worker id: fedq keys enrol WORKER_ID PUBKEY_FILE"
        )
    fp = fingerprint(key)
    _refuse_revoked(trusted, fp, f"the {role} key")
    for other in _owner_of(trusted, fp):
        if other.role is not role:
            raise ConfigError(
                f"key {fp} is already trusted as {other.role} ({other.file}); one key, one role"
            )
    path = role_dir(trusted, role) / f"{fp}.pub"
    if not path.exists():
        write_public_key(key, path)
    return path


def make_layout(trusted: Path) -> None:
    """The four role folders (the services tell an absent one from an empty one)."""
    for role in ROLE_DIRS:
        role_dir(trusted, role).mkdir(parents=True, exist_ok=True)


def check_worker_id(worker_id: str) -> None:
    if not WORKER_ID.fullmatch(worker_id):
        raise ConfigError(
            f"{worker_id!r} is not a worker id: letters, digits, '.', '_' and '-', starting with a letter "
            "or digit, at most 128 characters"
        )


def enrol(trusted: Path, worker_id: str, key: Ed25519PublicKey, replace: bool = False) -> tuple[Path, str]:
    """Trust ``key`` as worker ``worker_id``'s (``<trusted>/workers/<worker_id>.pub``). Refuses a
    revoked key, a key trusted in another role or for another worker, and an id enrolled with another
    key unless ``replace``. Returns the file and what happened ("enrolled", "already enrolled",
    "replaced <old fingerprint>")."""
    check_worker_id(worker_id)
    fp = fingerprint(key)
    _refuse_revoked(trusted, fp, "key")
    path = role_dir(trusted, Role.WORKER) / f"{worker_id}.pub"
    for other in _owner_of(trusted, fp):
        if other.revoked or Path(other.file) == path:
            continue
        whose = f"worker {other.worker_id}" if other.role is Role.WORKER else f"the {other.role}"
        raise ConfigError(
            f"key {fp} is already trusted for {whose} ({other.file}): a worker needs a key of its own"
        )
    outcome = "enrolled"
    if path.exists():
        try:
            old = fingerprint(load_public_key(path))
        except ConfigError:
            old = "unreadable"
        if old == fp:
            return path, "already enrolled"
        if not replace:
            raise ConfigError(
                f"worker {worker_id} is already enrolled with key {old} ({path}); pass --replace to give it "
                f"key {fp} instead (and fedq keys revoke {old} if the old key may be in the wrong hands)"
            )
        outcome = f"replaced {old}"
    make_layout(trusted)
    write_public_key(key, path)
    return path, outcome


def _append_revoked(trusted: Path, fp: str, note: str) -> None:
    path = trusted / REVOKED
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = "# fingerprints never to trust again (fedq keys revoke), one per line\n"
    if text and not text.endswith("\n"):
        text += "\n"
    text += f"{fp}  # {note}\n"
    write_atomic(path, text.encode())


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    return f"{user}@{socket.gethostname()}"


def revoke(trusted: Path, what: str) -> tuple[str, list[str]]:
    """Never trust a key again: ``what`` is an enrolled worker id or a fingerprint (whose file may be
    gone already). Its fingerprint goes into ``<trusted>/revoked`` first, then every file holding it is
    removed. Returns the fingerprint and the files removed."""
    keys, _ = scan(trusted)
    by_id = [k for k in keys if k.role is Role.WORKER and k.worker_id == what]
    by_fp = [k for k in keys if k.fingerprint == what]
    fps = {k.fingerprint for k in by_id + by_fp}
    if len(fps) > 1:
        raise ConfigError(
            f"{what!r} is both a worker id and another key's fingerprint: revoke by fingerprint"
        )
    if fps:
        fp = fps.pop()
    elif FINGERPRINT.fullmatch(what):
        fp = what  # its file is gone already (or it was never here): revoke it all the same
    else:
        raise ConfigError(
            f"no worker {what!r} is enrolled in {role_dir(trusted, Role.WORKER)} and it is not a fingerprint "
            "(16 hex digits, as fedq keys list shows)"
        )
    holders = [k for k in keys if k.fingerprint == fp]
    if fp not in read_revoked(trusted):
        roles = ", ".join(sorted({k.role + (f" {k.worker_id}" if k.worker_id else "") for k in holders}))
        when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        _append_revoked(trusted, fp, f"{roles or 'key'} revoked by {_who()} at {when}")
    for k in holders:
        Path(k.file).unlink(missing_ok=True)
    return fp, [k.file for k in holders]


def create_key(path: Path) -> tuple[Signer, bool]:
    """The key pair at ``path`` (mode 0600, ``.pub`` beside): made when missing, else kept. Made?"""
    existed = path.exists()
    signer = load_or_create_signer(path)  # an existing file that is not a key: ConfigError
    os.chmod(path, 0o600)
    return signer, not existed


def init(
    keys_dir: Path, trusted: Path, key_file: Callable[[Path, str], Path] = flat_key_file
) -> dict[str, Any]:
    """The operator's, the coordinator's and the aggregator's key pairs in ``keys_dir`` (where
    ``key_file`` says), each public key in its role folder of ``trusted``. Keys already there are
    kept (a re-run changes nothing)."""
    private_dir(keys_dir)  # it holds private keys
    for role in INIT_ROLES:  # check first: nothing is written if a kept key may not be trusted
        path = key_file(keys_dir, role)
        if path.exists():
            signer = load_or_create_signer(path)
            _refuse_revoked(trusted, signer.fingerprint, f"{path} holds a key that")
    make_layout(trusted)
    made: list[dict[str, Any]] = []
    for role in INIT_ROLES:
        path = key_file(keys_dir, role)
        private_dir(path.parent)
        signer, created = create_key(path)
        pub = trust_role_key(trusted, role, signer.public)
        made.append(
            {
                "role": str(role),
                "key": str(path),
                "fingerprint": signer.fingerprint,
                "trusted": str(pub),
                "made": created,
            }
        )
    return {"keys_dir": str(keys_dir), "trusted_dir": str(trusted), "keys": made}


def render_init(done: dict[str, Any]) -> str:
    trusted = done["trusted_dir"]
    lines = [f"keys in {done['keys_dir']} (private, mode 0600), trust directory {trusted}:"]
    for k in done["keys"]:
        state = "made" if k["made"] else "kept"
        lines.append(f"  {k['role']:<12} {k['fingerprint']}  {state} {k['key']}, trusted as {k['trusted']}")
    keys = {k["role"]: k["key"] for k in done["keys"]}
    lines += [
        "hand out:",
        f"  {keys['coordinator']}  -> the coordinator's machine only (its --keys-dir), then delete it here",
        f"  {keys['aggregator']}  -> the aggregator's machine only (its --keys-dir), then delete it here",
        f"  {keys['operator']}  -> stays with you: it signs rollbacks (fedq model rollback)",
        f"  {trusted}/  -> a copy on every machine (--trusted-keys); copy it again after each enrol, revoke "
        "or rotate",
        "workers: each makes its own key (fedq keys create WORKER_ID) and sends you worker-<id>.pub;",
        f"  enrol it with: fedq keys enrol WORKER_ID FILE --trusted-keys {trusted}",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class Rotation:
    role: Role
    key: Path
    old: str  # the old key's fingerprint ("" when there was none)
    new: str
    trusted: Path  # the new public key's file in the role folder
    notes: list[str] = field(default_factory=list)


def rotate(keys_dir: Path, trusted: Path, role: Role) -> Rotation:
    """A new key pair for ``role``: its public key is trusted first, then ``<keys_dir>/<role>.key`` (and
    its .pub) is replaced atomically, so a running service (``key_file_signer``) signs with the new key
    within a second, and everything it signs is already trusted. The old key stays trusted: versions
    and tasks it signed must still verify; revoke it once the job no longer needs them."""
    if role not in ROTATABLE:
        raise ConfigError(f"fedq keys rotate takes {' or '.join(ROTATABLE)}, not {role}")
    path = keys_dir / f"{role}.key"
    if not path.exists():
        raise ConfigError(
            f"there is no {role} key to rotate at {path} (fedq keys init makes one; --keys-dir?)"
        )
    old = load_or_create_signer(path)
    notes = []
    if not any(k.role is role and not k.revoked for k in _owner_of(trusted, old.fingerprint)):
        notes.append(f"the old key {old.fingerprint} was not trusted as the {role} key in {trusted}")
    new = Signer.generate()
    pub = trust_role_key(trusted, role, new.public)  # first: what the new key signs is trusted already
    write_private_key(new, path)  # atomic: a reader sees the old key or the new one, never half of one
    write_public_key(new.public, public_key_path(path))
    return Rotation(role, path, old.fingerprint, new.fingerprint, pub, notes)


def render_rotation(r: Rotation) -> str:
    return "\n".join(
        [
            f"{r.role} key rotated: {r.old} -> {r.new}",
            f"  new private key  {r.key} (a running {r.role} signs with it within a second)",
            f"  new public key   {r.trusted} (trusted before the new key signed anything)",
            *[f"  note: {n}" for n in r.notes],
            f"  the old key {r.old} stays trusted: what it signed (versions, tasks in flight) must still verify.",
            "  Copy the trust directory to the other machines. Once the job no longer needs the old key "
            f"(a new job, or its tasks have expired), revoke it: fedq keys revoke {r.old}",
        ]
    )


# -- the command ---------------------------------------------------------------------------------


def run(settings: Settings, request: Request) -> tuple[int, str | dict[str, Any]]:
    """``fedq keys ACTION``: exit code and what to print."""
    trusted = settings.trusted_dir
    keys_dir = Path(settings.keys_dir)
    if request.action == "init":
        if request.directory:
            keys_dir = Path(request.directory)
            trusted = Path(settings.trusted_keys) if settings.trusted_keys else keys_dir / "trusted"
        done = init(keys_dir, trusted)
        return 0, (done if request.as_json else render_init(done))
    if request.action == "create":
        check_worker_id(request.worker_id)
        path = keys_dir / f"worker-{request.worker_id}.key"
        signer, made = create_key(path)
        pub = public_key_path(path)
        done = {
            "worker_id": request.worker_id,
            "key": str(path),
            "public_key": str(pub),
            "fingerprint": signer.fingerprint,
            "made": made,
        }
        if request.as_json:
            return 0, done
        return 0, (
            f"worker {request.worker_id}: key {signer.fingerprint} {'made' if made else 'kept'} in {path}\n"
            f"  send {pub} to the operator, who runs: fedq keys enrol {request.worker_id} worker-{request.worker_id}.pub"
        )
    if request.action == "enrol":
        key = load_public_key(Path(request.pubkey))
        path, outcome = enrol(trusted, request.worker_id, key, replace=request.replace)
        done = {
            "worker_id": request.worker_id,
            "fingerprint": fingerprint(key),
            "file": str(path),
            "outcome": outcome,
        }
        if request.as_json:
            return 0, done
        return 0, f"worker {request.worker_id}: key {fingerprint(key)} {outcome} ({path})"
    if request.action == "revoke":
        fp, removed = revoke(trusted, request.what)
        done = {"fingerprint": fp, "removed": removed, "revoked_file": str(trusted / REVOKED)}
        if request.as_json:
            return 0, done
        gone = ", ".join(removed) if removed else "no file held it"
        return (
            0,
            f"revoked {fp}: removed {gone}; listed in {trusted / REVOKED} (services drop it within a second)",
        )
    if request.action == "list":
        found = listing(trusted)
        return 0, (found if request.as_json else render_listing(found))
    if request.action == "rotate":
        try:
            role = Role(request.what)
        except ValueError:
            raise ConfigError(
                f"fedq keys rotate takes coordinator or aggregator, not {request.what!r}"
            ) from None
        rotation = rotate(keys_dir, trusted, role)
        if request.as_json:
            return 0, {**asdict(rotation), "key": str(rotation.key), "trusted": str(rotation.trusted)}
        return 0, render_rotation(rotation)
    raise ConfigError(f"unknown keys action {request.action!r}")
