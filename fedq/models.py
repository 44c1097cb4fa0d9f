"""``fedq model list | show | export | verify | rollback``: a job's stored versions, checked and put back.

A rollback never rewrites history. It writes a new version L+1 (L = the latest) whose model
bytes are version N's, with parent L, no updates and ``rollback_of = N``; appends a record to
the aggregator's ledger; and announces the version on the models exchange, signed with the
operator key. A running coordinator adopts it like any new version and hands out tasks on
it; a running aggregator finds it in the store before it takes its next update
(``Aggregator._catch_up``) and folds on from there. Versions stay monotonic, the chain stays
unbroken, and ``fedq replay verify`` checks a rollback version against version N.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from broker_config.names import Names
from fedq.keys import run_key_file, trust_role_key
from shared.codec import encode
from shared.errors import BrokerError, ConfigError, FedqError, StoreError, UnsignedVersionError
from shared.keys import DirectoryTrust, load_or_create_signer, role_dir
from shared.ledger import JsonLines, read_lines
from shared.reasons import Fate, Reason
from shared.settings import Settings
from shared.signing import Role, Signer
from shared.store import SERVER_STATE, Manifest, ModelStore, manifest_key, model_key, open_store
from shared.transport.connect import connected

OPERATOR_KEY = "operator.key"
SETTLE_SECONDS = 2.0  # how long a freshly written rollback must stay unchallenged before it is announced


@dataclass(frozen=True)
class Request:
    """One ``fedq model`` action, as parsed from the command line."""

    action: str  # list | show | export | verify | rollback
    target: str  # RUN_OR_JOB, as given
    version: int | None = None
    path: str = ""  # export: the file to write
    as_json: bool = False
    announce: bool = True  # rollback: publish the announcement on the models exchange


def open_models(settings: Settings) -> ModelStore:
    """The job's versions, every manifest read checked against the trust directory (``unsigned_version``)."""
    return ModelStore(open_store(settings.store, settings), settings.job, DirectoryTrust(settings.trusted_dir))


def as_stored(store: ModelStore) -> ModelStore:
    """The same versions read as they are stored, signed or not: for showing them, not for using them."""
    return ModelStore(store.objects, store.job_id)


async def signature_of(store: ModelStore, manifest: Manifest) -> dict[str, Any]:
    """Who signed ``manifest`` (fingerprint, role), or why it does not count as signed for this
    run of the job (``ModelStore.vouch``)."""
    signed: dict[str, Any] = {"signed": False, "signer": manifest.signer or None, "signer_role": None}
    if store.trust is None:
        return {**signed, "signature_problem": "no trust directory to check it against"}
    try:
        peer = await store.vouch(manifest)
    except UnsignedVersionError as exc:
        return {**signed, "signature_problem": f"{Reason.UNSIGNED_VERSION}: {exc}"}
    return {**signed, "signed": True, "signer_role": "/".join(sorted(peer.roles)), "signature_problem": None}


def read_metrics(out_dir: Path) -> dict[int, dict[str, Any]]:
    """The coordinator's evaluation of each version (the last one when a version was evaluated twice)."""
    out: dict[int, dict[str, Any]] = {}
    for record in read_lines(out_dir / "metrics.jsonl"):
        if isinstance(record.get("version"), int):
            out[record["version"]] = record
    return out


def version_row(
    manifest: Manifest, metrics: dict[str, Any] | None, signature: dict[str, Any] | None = None
) -> dict[str, Any]:
    accuracy = (metrics or {}).get("accuracy")
    return {
        "version": manifest.version,
        "parent": manifest.parent,
        "created_at": manifest.created_at,
        "updates": len(manifest.update_ids),
        "updates_total": manifest.updates_total,
        "mean_staleness": manifest.mean_staleness,
        "sha256": manifest.sha256,
        "size": manifest.size,
        "accuracy": float(accuracy) if accuracy is not None else None,
        "rollback_of": manifest.rollback_of,
        **(signature or {}),
    }


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


def render_rows(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'version':>7} {'parent':>6}  {'created (UTC)':<19} {'updates':>7} {'staleness':>9}  "
        f"{'sha256':<12} {'bytes':>9} {'accuracy':>8}  note"
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"{r['version']:>7} {'-':>6}  {'-':<19} {'-':>7} {'-':>9}  {'-':<12} {'-':>9} {'-':>8}  "
                f"UNREADABLE: {r['error']}"
            )
            continue
        accuracy = f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "-"
        notes = [f"rollback of v{r['rollback_of']}"] if r["rollback_of"] is not None else []
        if r.get("signed"):
            notes.append(f"signed by {r['signer_role']} {r['signer']}")
        elif "signed" in r:
            notes.append(f"UNSIGNED ({r['signature_problem']})")
        note = "; ".join(notes)
        lines.append(
            f"{r['version']:>7} {r['parent']:>6}  {_when(r['created_at']):<19} {r['updates']:>7} "
            f"{r['mean_staleness']:>9.2f}  {r['sha256'][:12]:<12} {r['size']:>9} {accuracy:>8}  {note}".rstrip()
        )
    return "\n".join(lines)


async def list_versions(settings: Settings, as_json: bool) -> int:
    store = open_models(settings)
    stored = as_stored(store)  # an unsigned version is listed, and marked
    versions = await store.versions()
    if not versions:
        raise ConfigError(f"job {settings.job} has no versions in the store at {settings.store}")
    metrics = read_metrics(settings.out_dir)
    rows: list[dict[str, Any]] = []
    for v in versions:
        try:
            manifest = await stored.manifest(v)
            rows.append(version_row(manifest, metrics.get(v), await signature_of(store, manifest)))
        except StoreError as exc:
            rows.append({"version": v, "error": str(exc)})
    if as_json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(render_rows(rows))
        print(f"{len(rows)} versions of job {settings.job}")
    return 0


async def show_version(settings: Settings, version: int, as_json: bool) -> int:
    store = open_models(settings)
    if not await store.exists(version):
        raise ConfigError(f"job {settings.job} has no version {version}")
    manifest = await as_stored(store).manifest(version)  # shown even unsigned, and marked
    signature = await signature_of(store, manifest)
    metrics = read_metrics(settings.out_dir).get(version)
    if as_json:
        print(json.dumps({"manifest": json.loads(manifest.to_json()), "metrics": metrics, "signature": signature}))
        return 0
    m = manifest
    lines = [
        f"version {m.version} of job {m.job_id}",
        f"  parent          {m.parent}",
        f"  created         {_when(m.created_at)} UTC ({m.created_at})",
        f"  sha256          {m.sha256}",
        f"  size            {m.size} bytes",
        f"  key             {m.key}",
        "  signed by       "
        + (
            f"{signature['signer_role']} key {m.signer}"
            if signature["signed"]
            else f"NOBODY TRUSTED: {signature['signature_problem']}"
        ),
    ]
    if m.rollback_of is not None:
        lines.append(f"  rollback of     v{m.rollback_of} (same model bytes, no updates)")
    lines += [
        f"  updates         {len(m.update_ids)} in this version, {m.updates_total} in all",
        f"  mean staleness  {m.mean_staleness:.3f}",
        f"  policy          {json.dumps(m.policy, sort_keys=True) if m.policy else '-'}",
    ]
    if metrics:
        shown = {k: v for k, v in metrics.items() if k not in ("version", "parent")}
        lines.append(f"  metrics         {json.dumps(shown, sort_keys=True)}")
    else:
        lines.append(f"  metrics         - (not in {settings.out_dir / 'metrics.jsonl'})")
    if m.update_ids:
        lines.append("  updates applied, in order (task id, sha256 of the message):")
        for i, tid in enumerate(m.update_ids):
            digest = m.update_digests[i] if i < len(m.update_digests) else "-"
            lines.append(f"    {tid}  {digest[:16]}")
    print("\n".join(lines))
    return 0


async def export_version(settings: Settings, version: int, path: Path) -> int:
    """Write version ``version`` as a PyTorch state dict (``torch.load`` + ``load_state_dict``)."""
    store = open_models(settings)
    if not await store.exists(version):
        raise ConfigError(f"job {settings.job} has no version {version}")
    manifest, model = await store.load(version)  # checks the sha256 against the manifest
    state = model.to_state_dict()
    try:
        await asyncio.to_thread(torch.save, state, path)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc}") from exc
    print(f"v{version} (sha256 {manifest.sha256[:16]}, {len(state)} tensors) -> {path}")
    return 0


async def check_version(store: ModelStore, version: int) -> list[str]:
    """Problems of one stored version: unreadable manifest, a manifest not signed by a key allowed
    to make it (``unsigned_version``, when ``store`` has a trust set), missing or altered model
    bytes, a rollback that does not re-store its version's bytes."""
    stored = as_stored(store)  # the signature is one problem among others, reported below
    try:
        manifest, blob = await stored.load_bytes(version)
    except StoreError as exc:
        return [str(exc)]
    problems = []
    if store.trust is not None:
        signature = await signature_of(store, manifest)
        if not signature["signed"]:
            problems.append(signature["signature_problem"])
    if len(blob) != manifest.size:
        problems.append(f"model is {len(blob)} bytes, its manifest says {manifest.size}")
    if manifest.rollback_of is not None:
        try:
            target = await stored.manifest(manifest.rollback_of)
        except StoreError as exc:
            problems.append(f"rollback of v{manifest.rollback_of}, which cannot be read: {exc}")
        else:
            if target.sha256 != manifest.sha256:
                problems.append(
                    f"rollback of v{manifest.rollback_of} but sha256 {manifest.sha256[:16]} "
                    f"differs from v{manifest.rollback_of}'s {target.sha256[:16]}"
                )
        if manifest.update_ids:
            problems.append("a rollback version applies no updates, this one lists some")
    return problems


async def verify_versions(settings: Settings, as_json: bool) -> int:
    store = open_models(settings)
    versions = await store.versions()
    if not versions:
        raise ConfigError(f"job {settings.job} has no versions in the store at {settings.store}")
    failing = []
    for v in versions:
        problems = await check_version(store, v)
        if problems:
            failing.append(v)
        if as_json:
            print(json.dumps({"version": v, "ok": not problems, "problems": problems}))
        else:
            verdict = "ok" if not problems else "CORRUPT"
            if problems and all(p.startswith(Reason.UNSIGNED_VERSION) for p in problems):
                verdict = "UNSIGNED"
            print(f"v{v:<6} {verdict}" + "".join(f"\n    {p}" for p in problems))
    if not as_json:
        print(
            f"{len(versions) - len(failing)}/{len(versions)} versions match their signed manifests"
            + (f"; failing: {', '.join(f'v{v}' for v in failing)}" if failing else "")
        )
    return 1 if failing else 0


# -- rollback ---------------------------------------------------------------------------------------


def rollback_key(job_id: str, version: int) -> str:
    """Where a rollback version's model is stored: never at ``model_key``, which only an aggregator
    writes, so that a rollback racing an aggregator's own version can be told apart from it."""
    return f"jobs/{job_id}/models/v{version:06d}.rollback.bin"


async def _taken(store: ModelStore, version: int) -> bool:
    """Has someone begun to store ``version`` (an aggregator writes the model first, then the manifest)?"""
    return await store.exists(version) or await store.objects.exists(model_key(store.job_id, version))


async def write_rollback(
    store: ModelStore, to: int, signer: Signer, settle: float = SETTLE_SECONDS, attempts: int = 5
) -> Manifest:
    """Store version L+1 with version ``to``'s model bytes, parent L and ``rollback_of = to``, its
    manifest signed by ``signer`` (the operator's key). With a trust set, version ``to`` must be
    signed: a rollback never restores a version nobody trusted made.

    A running aggregator may store its own L+1 at the same moment. The store has no
    create-if-absent, so: the model goes to a key of its own, the number is checked just before
    the manifest is written, and the manifest must still be ours ``settle`` seconds later; if
    an aggregator's version took the number, the rollback goes on top of it.
    """
    for _ in range(attempts):
        latest = await store.latest()
        if latest is None:
            raise ConfigError(f"job {store.job_id} has no versions in the store")
        if not 0 <= to <= latest or not await store.exists(to):
            raise ConfigError(f"job {store.job_id} has no version {to} (the latest is {latest})")
        if to == latest:
            raise ConfigError(f"version {to} is already the latest: there is nothing to roll back")
        target, blob = await store.load_bytes(to)  # never roll back to a corrupt (or unsigned) version
        head = await as_stored(store).manifest(latest)  # the latest may be the unsigned one to undo
        version = latest + 1
        manifest = Manifest(
            job_id=store.job_id,
            version=version,
            parent=latest,
            sha256=hashlib.sha256(blob).hexdigest(),
            size=len(blob),
            key=rollback_key(store.job_id, version),
            update_ids=(),
            created_at=time.time(),
            # The policy in force goes on (replay what-if reads the latest's), DP's accounting with it
            # (epsilon never goes back); no optimizer moments: FedOpt starts afresh from this model.
            policy={k: v for k, v in head.policy.items() if k != SERVER_STATE},
            mean_staleness=0.0,
            updates_total=head.updates_total,
            rollback_of=to,
            incarnation=target.incarnation,  # this run's: a trusted target carries version 0's
        ).signed_by(signer)
        assert manifest.sha256 == target.sha256
        await store.objects.put(manifest.key, blob)
        if await _taken(store, version):
            await asyncio.sleep(0.2)
            continue
        await store.objects.put(manifest_key(store.job_id, version), manifest.to_json().encode())
        await asyncio.sleep(settle)
        if await store.manifest(version) != manifest:
            continue  # an aggregator stored its own version right after ours: go on top of it
        if await store.objects.exists(model_key(store.job_id, version)):
            raise FedqError(
                f"version {version}: an aggregator stored its own version {version} at the same moment and "
                "this rollback replaced its manifest, so the updates it applied are no longer in any "
                "version; run fedq audit, and roll back again"
            )
        return manifest
    raise FedqError(f"job {store.job_id}: new versions kept taking the rollback's number; try again")


def operator_signer(settings: Settings, run_folder: bool) -> Signer:
    """The operator's key, ``<keys_dir>/operator.key`` (``fedq keys init`` makes it; created here on
    first use otherwise), or in a run folder ``keys/operator/operator.key`` (``fedq run`` made it; a
    run folder of an older fedq keeps it in ``keys/``). In a run folder its public key is also put
    in the run's operator role folder, so the run's services accept what it signs; a deployment
    trusts it with ``fedq keys init`` (its ``trusted/operator/``), and the trust directory must say
    so before anything is written."""
    path = Path(settings.keys_dir) / OPERATOR_KEY
    if run_folder and not path.exists():
        path = run_key_file(Path(settings.keys_dir), Role.OPERATOR)
    signer = load_or_create_signer(path)
    if run_folder:
        trust_role_key(settings.trusted_dir, Role.OPERATOR, signer.public)
    peers = [p for p in DirectoryTrust(settings.trusted_dir).peers() if p.fingerprint == signer.fingerprint]
    if not any(Role.OPERATOR in p.roles for p in peers):
        raise ConfigError(
            f"the operator key {signer.fingerprint} ({path}) is not trusted in "
            f"{role_dir(settings.trusted_dir, Role.OPERATOR)}/: the services would refuse its rollback as "
            f"{Reason.UNSIGNED_VERSION}. Put {path.with_suffix('.pub').name} there as {signer.fingerprint}.pub on "
            "every machine (fedq keys init does it), or give the --keys-dir that holds the trusted operator key"
        )
    return signer


async def announce(settings: Settings, manifest: Manifest, signer: Signer) -> None:
    """Publish the version on the models exchange, as the aggregator does for the versions it makes."""
    async with connected(settings, f"fedq-model-rollback-{settings.job}", publish_retry_seconds=15.0) as transport:
        models = transport.names.models_exchange
        if not await transport.exchange_exists(models):
            raise BrokerError(f"the broker has no exchange {models!r}: is --namespace right?")
        await transport.publish(models, Names.model_key(manifest.job_id), encode(manifest.announcement(), signer))


async def rollback(settings: Settings, to: int, run_folder: bool, do_announce: bool, as_json: bool) -> int:
    signer = operator_signer(settings, run_folder)  # first: a key problem must stop us before we write
    store = open_models(settings)
    manifest = await write_rollback(store, to, signer)
    ledger_path = settings.out_dir / "ledger.jsonl"
    ledger: str | None = None
    if settings.out_dir.is_dir():  # the aggregator's job folder: record the rollback among its decisions
        records = JsonLines(ledger_path)
        records.write(
            {
                "t": time.time(),
                "fate": Fate.ROLLBACK,
                "version": manifest.version,
                "rollback_of": to,
                "parent": manifest.parent,
                "sha256": manifest.sha256,
                "signer": signer.fingerprint,
            }
        )
        records.close()
        ledger = str(ledger_path)
    error = ""
    if do_announce:
        try:
            await announce(settings, manifest, signer)
        except BrokerError as exc:
            error = str(exc)
    result = {
        "version": manifest.version,
        "parent": manifest.parent,
        "rollback_of": to,
        "sha256": manifest.sha256,
        "ledger": ledger,
        "announced": do_announce and not error,
        "error": error or None,
        "signer": signer.fingerprint,
    }
    if as_json:
        print(json.dumps(result))
    else:
        print(
            f"v{manifest.version}: rollback to v{to} (sha256 {manifest.sha256[:16]}), parent v{manifest.parent}"
        )
        print(f"  ledger     {ledger or f'- (no job folder at {settings.out_dir}: pass --out)'}")
        if not do_announce:
            print("  announced  no (--no-announce): a coordinator adopts it when it next starts")
        elif error:
            print(f"  announced  NO: {error}\n  a coordinator adopts it when it next starts")
        else:
            print(
                f"  announced  on {Names(settings.namespace, settings.job).models_exchange} as {Names.model_key(settings.job)}, "
                f"signed by operator key {signer.fingerprint}"
            )
    return 1 if error else 0


async def run(settings: Settings, request: Request) -> int:
    if request.action == "list":
        return await list_versions(settings, request.as_json)
    if request.action == "verify":
        return await verify_versions(settings, request.as_json)
    assert request.version is not None
    if request.action == "show":
        return await show_version(settings, request.version, request.as_json)
    if request.action == "export":
        return await export_version(settings, request.version, Path(request.path))
    if request.action == "rollback":
        run_folder = (Path(request.target) / "config.json").exists()
        return await rollback(settings, request.version, run_folder, request.announce, request.as_json)
    raise ConfigError(f"unknown model action {request.action!r}")
