"""Writing adapter versions: their files, their ledger rows, and alias moves (the training side).

Reading them (resolving an alias, verified files, the base-model check) is domain/adapter_lookup.py,
below this module, so the review path never imports the training side.

- A version is one trained (or merged) LoRA adapter: ``adapters/<tenant>/<name>/<folder>/`` holding
  ``adapter_config.json`` + ``adapter_model.safetensors``. The ledger records the sha256 of the weights
  file (``artifact_sha256``) and of the config (``hyperparams["adapter_config_sha256"]``).
- Files go to the artifact store (domain/storage.py) as they are saved; a host that does not have a
  version's folder under its data root fetches it from the store into its node-local cache, verified
  (``adapter_lookup.verified_adapter_path``). The default store is the data folder itself: nothing is copied.
- An alias (``champion``, ``candidate`` or any custom name) points at one version of the tenant; every
  move is written to ``alias_history`` (who, when, why). ``champion`` is what reviews are served with.
- ``rollback`` moves an alias back to the version it pointed at before the current one (rollbacks
  themselves are skipped when walking back, so two rollbacks go back two versions).

All functions taking a ``session`` only add rows to it: the caller owns the transaction (for a job, the
``Outcome.commit`` transaction, so a redelivered job cannot create two versions).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import desc, func, select
from sqlalchemy.orm import Session

from domain.adapter_lookup import CHAMPION, CONFIG_FILE, WEIGHTS_FILE
from domain.errors import InvalidJob, JobFailed
from domain.ledger.models import (
    AdapterAlias,
    AdapterLineage,
    AdapterVersion,
    AliasHistory,
    Artifact,
    Tenant,
    utcnow,
)
from domain.paths import fresh_dir, publish_dir, resolve_in_data_root, sha256_file

CANDIDATE = "candidate"
ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
ROLLBACK_PREFIX = "rollback"  # AliasHistory.reason of a rollback starts with it


# ---- finding versions -------------------------------------------------------------------------

def latest_version(session: Session, tenant: str, name: str) -> AdapterVersion | None:
    return session.scalar(select(AdapterVersion).where(AdapterVersion.tenant_id == tenant, AdapterVersion.name == name)
                          .order_by(desc(AdapterVersion.version)).limit(1))


def next_version_number(session: Session, tenant: str, name: str) -> int:
    top = session.scalar(select(func.max(AdapterVersion.version))
                         .where(AdapterVersion.tenant_id == tenant, AdapterVersion.name == name))
    return int(top or 0) + 1


# ---- files ------------------------------------------------------------------------------------

def adapter_rel_dir(tenant: str, name: str, folder: str) -> str:
    """Where a version's files live, relative to the data root. ``folder`` is job-derived, so a
    redelivered job rewrites the same place instead of leaving a second copy."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", folder)[:80]
    return f"adapters/{tenant}/{name}/{safe}"


@dataclass
class SavedAdapter:
    rel_path: str  # relative to the data root
    sha256: str  # of adapter_model.safetensors
    config_sha256: str
    size_bytes: int


def save_adapter_files(peft_model, rel_dir: str, adapter_name: str = "default") -> SavedAdapter:
    """Save one adapter of a PEFT model as safetensors under ``rel_dir`` (write to a temp folder, then
    rename: the folder is either absent or complete)."""
    dest = resolve_in_data_root(rel_dir)
    tmp = fresh_dir(dest.with_name(dest.name + ".tmp"))
    peft_model.save_pretrained(str(tmp), safe_serialization=True, selected_adapters=[adapter_name])
    if adapter_name != "default":  # PEFT nests non-default adapters in a subfolder
        nested = tmp / adapter_name
        if nested.is_dir():
            for f in nested.iterdir():
                os.replace(f, tmp / f.name)
            nested.rmdir()
    for stray in tmp.iterdir():
        if stray.name not in (WEIGHTS_FILE, CONFIG_FILE):
            shutil.rmtree(stray) if stray.is_dir() else stray.unlink()  # safetensors only, no model card
    if not (tmp / WEIGHTS_FILE).exists():
        raise JobFailed(f"adapter save produced no {WEIGHTS_FILE} in {tmp}", code="adapter_save_failed")
    publish_dir(tmp, dest)
    publish_adapter(rel_dir)
    return describe_files(rel_dir)


def publish_adapter(rel_dir: str) -> None:
    """Put a saved adapter folder in the artifact store (verified; a no-op for the default store, which is
    the data folder). Raises StoreUnavailable (transient: the job is retried) before anything is recorded."""
    from domain import storage

    parts = Path(rel_dir).parts
    storage.publish_tree(resolve_in_data_root(rel_dir), rel_dir, primary=WEIGHTS_FILE,
                         tenant=parts[1] if len(parts) > 2 and parts[0] == "adapters" else None)


def describe_files(rel_dir: str) -> SavedAdapter:
    folder = resolve_in_data_root(rel_dir)
    weights = folder / WEIGHTS_FILE
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return SavedAdapter(rel_path=str(Path(rel_dir)), sha256=sha256_file(weights),
                        config_sha256=sha256_file(folder / CONFIG_FILE), size_bytes=size)


# ---- registering versions -----------------------------------------------------------------------

def register_version(session: Session, *, tenant: str, name: str, base_model_id: str, base_model_hash: str,
                     files: SavedAdapter, parent_id: str | None = None, dataset_hash: str | None = None,
                     dataset_size: int | None = None, feedback_until: datetime | None = None,
                     hyperparams: dict | None = None, metrics: dict | None = None, status: str = "candidate",
                     created_by_job_id: str | None = None, extra_parents: list[tuple[str, str, float | None]] = (),
                     version_id: str | None = None) -> AdapterVersion:
    """Add an AdapterVersion (next version number for tenant/name), its Artifact row and lineage rows.
    ``extra_parents``: (parent version id, relation "retrain"|"merge", weight)."""
    session.get(Tenant, tenant, with_for_update=True)  # serializes version numbers of one tenant (PostgreSQL)
    number = next_version_number(session, tenant, name)
    hp = {**(hyperparams or {}), "adapter_config_sha256": files.config_sha256}
    lineage = {"parent_id": parent_id, "base_model_id": base_model_id, "base_model_hash": base_model_hash,
               "parents": [{"id": p, "relation": r, "weight": w} for p, r, w in extra_parents]}
    artifact = Artifact(kind="adapter", tenant_id=tenant, name=name, version=number, path=files.rel_path,
                        sha256=files.sha256, size_bytes=files.size_bytes, status="ready", lineage=lineage,
                        report=dict(metrics or {}), created_by_job_id=created_by_job_id)
    session.add(artifact)
    session.flush()
    kwargs = {"id": version_id} if version_id else {}
    version = AdapterVersion(tenant_id=tenant, name=name, version=number, parent_id=parent_id,
                             base_model_id=base_model_id, base_model_hash=base_model_hash, dataset_hash=dataset_hash,
                             dataset_size=dataset_size, feedback_until=feedback_until, hyperparams=hp,
                             metrics=dict(metrics or {}), artifact_id=artifact.id, artifact_path=files.rel_path,
                             artifact_sha256=files.sha256, status=status, created_by_job_id=created_by_job_id,
                             **kwargs)
    session.add(version)
    session.flush()
    for pid, relation, weight in extra_parents:
        session.add(AdapterLineage(child_id=version.id, parent_id=pid, relation=relation, weight=weight))
    session.flush()
    return version


# ---- aliases ------------------------------------------------------------------------------------

def move_alias(session: Session, tenant: str, alias: str, version_id: str | None, moved_by: str,
               reason: str | None = None) -> AliasHistory:
    """Point ``alias`` at ``version_id`` (None removes the alias: for champion, serve the base model) and
    record the move. The version must belong to the tenant."""
    if not ALIAS_RE.match(alias or ""):
        raise InvalidJob(f"alias: {alias!r} is not a valid alias name (letters, digits, _ . -)", field="alias")
    if version_id is not None:
        version = session.get(AdapterVersion, version_id)
        if version is None or version.tenant_id != tenant:
            raise InvalidJob(f"adapter: no version {version_id!r} for tenant {tenant!r}", field="adapter")
        if alias == CHAMPION:
            version.status = "promoted"
    row = session.get(AdapterAlias, (tenant, alias))
    previous = row.version_id if row is not None else None
    if version_id is None:
        if row is not None:
            session.delete(row)
    elif row is None:
        session.add(AdapterAlias(tenant_id=tenant, alias=alias, version_id=version_id))
    else:
        row.version_id = version_id
        row.updated_at = utcnow()
    entry = AliasHistory(tenant_id=tenant, alias=alias, from_version_id=previous, to_version_id=version_id,
                         moved_by=moved_by, reason=reason, moved_at=utcnow())
    session.add(entry)
    session.flush()
    return entry


def alias_history(session: Session, tenant: str, alias: str | None = None, limit: int = 50) -> list[AliasHistory]:
    q = select(AliasHistory).where(AliasHistory.tenant_id == tenant)
    if alias:
        q = q.where(AliasHistory.alias == alias)
    return list(session.scalars(q.order_by(desc(AliasHistory.moved_at), desc(AliasHistory.id)).limit(limit)))


def previous_version_id(session: Session, tenant: str, alias: str = CHAMPION) -> tuple[bool, str | None]:
    """(found, version id) the alias pointed at before its current version: the ``from`` of the latest
    non-rollback move onto the current version. (False, None) if the alias has no such move."""
    row = session.get(AdapterAlias, (tenant, alias))
    current = row.version_id if row is not None else None
    for entry in alias_history(session, tenant, alias, limit=10_000):
        if (entry.reason or "").startswith(ROLLBACK_PREFIX):
            continue
        if entry.to_version_id == current:
            return True, entry.from_version_id
    return False, None


def rollback(session: Session, tenant: str, moved_by: str, reason: str | None = None,
             alias: str = CHAMPION) -> AliasHistory:
    """Move ``alias`` back to the version before the current one (none before it: remove the alias, so
    the base model is served). The version rolled away from is marked ``rejected``. Raises LookupError
    when the alias has no history to go back to."""
    row = session.get(AdapterAlias, (tenant, alias))
    if row is None:
        raise LookupError(f"tenant {tenant!r} has no {alias!r} alias to roll back")
    found, target = previous_version_id(session, tenant, alias)
    if not found:
        raise LookupError(f"alias {alias!r} of tenant {tenant!r} has no earlier version in its history")
    leaving = session.get(AdapterVersion, row.version_id)
    if leaving is not None and alias == CHAMPION:
        leaving.status = "rejected"
    text = f"{ROLLBACK_PREFIX}: {reason}" if reason else ROLLBACK_PREFIX
    return move_alias(session, tenant, alias, target, moved_by, text)


def version_summary(v: AdapterVersion) -> dict:
    """A JSON-friendly view of one version (CLI, results)."""
    return {"id": v.id, "tenant": v.tenant_id, "name": v.name, "version": v.version, "status": v.status,
            "parent_id": v.parent_id, "base_model_id": v.base_model_id, "base_model_hash": v.base_model_hash,
            "dataset_hash": v.dataset_hash, "dataset_size": v.dataset_size,
            "feedback_until": v.feedback_until.isoformat() if v.feedback_until else None,
            "hyperparams": v.hyperparams, "metrics": v.metrics, "artifact_path": v.artifact_path,
            "artifact_sha256": v.artifact_sha256, "created_by_job_id": v.created_by_job_id,
            "created_at": v.created_at.isoformat() if v.created_at else None}

