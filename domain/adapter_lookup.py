"""Finding a tenant's adapter version and its verified files: what serving needs, and nothing that writes.

The review path (domain/review/service.py) and the operator commands read adapters through this module;
domain/adapters/store.py, the training side, writes versions and moves aliases. Both sit above it.

- ``resolve_adapter``: an alias, a version id or None (the champion) → the tenant's version, never another
  tenant's.
- ``verified_adapter_path``: the version's folder after checking its files against the ledger's sha256 —
  under the data root if this host wrote it, otherwise fetched from the artifact store into this host's
  node cache (domain/storage.py).
- ``check_base_model``: refuses to put an adapter on a base model other than the one it was trained on.
- ``prefetch_champions``: review workers warm their cache with every tenant's champion.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from domain import health
from domain.errors import InvalidJob, JobFailed
from domain.ledger.models import AdapterAlias, AdapterVersion
from domain.paths import UnsafePath, resolve_in_data_root, sha256_file, sha256_tree

log = logging.getLogger(__name__)

CHAMPION = "champion"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


def resolve_adapter(session: Session, tenant: str, ref: str | None) -> AdapterVersion | None:
    """The tenant's version for ``ref``: None → its champion (None if it has none: serve the base model);
    an alias name or a version id of this tenant otherwise. Unknown → InvalidJob(field="adapter").
    Never returns another tenant's version."""
    if ref is None:
        alias = session.get(AdapterAlias, (tenant, CHAMPION))
        return session.get(AdapterVersion, alias.version_id) if alias is not None else None
    alias = session.get(AdapterAlias, (tenant, ref))
    version = session.get(AdapterVersion, alias.version_id if alias is not None else ref)
    if version is None or version.tenant_id != tenant:
        raise InvalidJob(f"adapter: unknown adapter {ref!r} for tenant {tenant!r} (give an alias such as "
                         f"'champion' or a version id; see `foundry adapters list --tenant {tenant}`)", field="adapter")
    return version


def aliases_of(session: Session, tenant: str) -> dict[str, str]:
    """alias → version id for one tenant."""
    return {a.alias: a.version_id for a in session.scalars(select(AdapterAlias).where(AdapterAlias.tenant_id == tenant))}


# ---- verified files ------------------------------------------------------------------------------

_verified: dict[tuple, bool] = {}  # (path, size, mtime, expected sha) of files already checked in this process


def verified_adapter_path(version: AdapterVersion) -> Path:
    """The absolute folder of ``version`` after checking its files against the ledger's sha256.
    Missing files → JobFailed(code="adapter_missing"); different bytes → a health event and
    JobFailed(code="adapter_hash_mismatch")."""
    if not version.artifact_path:
        raise JobFailed(f"adapter version {version.id} has no files recorded", code="adapter_missing")
    try:
        folder = resolve_in_data_root(version.artifact_path)
    except UnsafePath as exc:
        raise JobFailed(f"adapter version {version.id}: {exc}", code="adapter_hash_mismatch") from exc
    if not (folder / WEIGHTS_FILE).is_file():  # not written on this host: from the store, via this host's cache
        folder = _fetched(version)
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    missing = [p.name for p in (weights, config) if not p.is_file()]
    if missing:
        raise JobFailed(f"adapter version {version.id}: {', '.join(missing)} missing in {version.artifact_path}",
                        code="adapter_missing")
    problems = []
    if version.artifact_sha256 and not _matches(weights, version.artifact_sha256, folder):
        problems.append(WEIGHTS_FILE)
    config_sha = (version.hyperparams or {}).get("adapter_config_sha256")
    if config_sha and not _matches(config, config_sha):
        problems.append(CONFIG_FILE)
    if problems:
        msg = (f"adapter version {version.id} (tenant {version.tenant_id}, {version.name} v{version.version}): "
               f"{', '.join(problems)} does not match the sha256 recorded in the ledger; refusing to load it")
        health.record("adapter", "hash_mismatch", "fail", msg, tenant_id=version.tenant_id,
                      detail={"version_id": version.id, "path": version.artifact_path, "files": problems})
        raise JobFailed(msg, code="adapter_hash_mismatch")
    return folder


def _fetched(version: AdapterVersion) -> Path:
    """The version's folder in this host's cache, fetched from the artifact store and verified (the key
    must lie under the version's tenant: ``adapters/<tenant>/...``)."""
    from domain import storage

    if not version.artifact_sha256:
        raise JobFailed(f"adapter version {version.id}: no sha256 recorded, cannot fetch it from the store",
                        code="adapter_missing")
    try:
        return storage.fetch_tree(version.artifact_path, version.artifact_sha256, tenant=version.tenant_id)
    except storage.KeyRefused as exc:
        raise JobFailed(f"adapter version {version.id}: {exc}", code="key_refused") from exc


def prefetch_champions() -> list[str]:
    """Fetch into this host's cache every tenant's champion that is neither under the data folder nor
    cached yet. Review workers call it every ``FOUNDRY_CHAMPION_PREFETCH_S`` (worker/signals.py), so a newly
    promoted champion's first review on a host pays no fetch. Returns the version ids fetched."""
    from domain import storage
    from domain.ledger.db import session_scope

    if storage.holds_data_folder():
        return []  # the default store is the data folder: nothing to fetch
    with session_scope() as s:
        versions = list(s.scalars(select(AdapterVersion).join(
            AdapterAlias, AdapterAlias.version_id == AdapterVersion.id).where(AdapterAlias.alias == CHAMPION)))
        s.expunge_all()
    fetched = []
    cache = storage.get_cache()
    for v in versions:
        if not v.artifact_path or not v.artifact_sha256 or cache.entry(v.artifact_sha256).is_dir():
            continue
        try:
            if (resolve_in_data_root(v.artifact_path) / WEIGHTS_FILE).is_file():
                continue
            verified_adapter_path(v)
            fetched.append(v.id)
        except (JobFailed, UnsafePath, RuntimeError) as exc:  # reported by the fetch; the review will say it too
            log.warning("champion %s of %s not prefetched: %s", v.id, v.tenant_id, exc)
    return fetched


def _matches(path: Path, expected: str, folder: Path | None = None) -> bool:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, expected)
    if key in _verified:
        return True
    ok = sha256_file(path) == expected or (folder is not None and sha256_tree(folder) == expected)
    if ok:
        _verified[key] = True
    return ok


def check_base_model(version: AdapterVersion, base_model_ref: str) -> None:
    """Refuse to put ``version`` on a base model other than the one it was trained on."""
    from domain.models import model_fingerprint

    served = model_fingerprint(base_model_ref)
    if version.base_model_hash and served != version.base_model_hash:
        raise JobFailed(
            f"base model mismatch: adapter version {version.id} ({version.name} v{version.version}) was trained on "
            f"{version.base_model_id!r} (hash {version.base_model_hash[:12]}), but the base model here is "
            f"{base_model_ref!r} (hash {served[:12]}); retrain the adapter on this base model or serve the one it was "
            f"trained on", code="base_model_mismatch")
