"""Moving an existing deployment's artifacts into a new artifact store.

The ledger records artifact paths relative to the data folder; those paths are the store's keys, so the
ledger needs no rewrite when ``FOUNDRY_ARTIFACT_URL`` changes. What a new store lacks is the bytes:
``push_existing`` puts every adapter version, index snapshot and quantized or distilled model the ledger knows, from this host's data
folder, into the configured store (verified, as every put is), skipping those already there and those
whose files are not on this host. ``foundry artifacts push`` runs it; run it on the host that made them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from domain import storage
from domain.ledger.db import session_scope
from domain.ledger.models import AdapterVersion, Artifact
from domain.paths import UnsafePath, resolve_in_data_root


@dataclass
class BackfillReport:
    pushed: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    not_here: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def push_existing(*, dry_run: bool = False) -> BackfillReport:
    """Put every adapter folder, index snapshot and served model of this data folder into the store."""
    from domain.adapter_lookup import WEIGHTS_FILE
    from domain.artifacts import SERVABLE_KINDS
    from domain.retrieval.snapshots import MANIFEST as INDEX_MANIFEST

    with session_scope() as s:
        rows = [(v.artifact_path, v.tenant_id, WEIGHTS_FILE) for v in s.scalars(select(AdapterVersion))
                if v.artifact_path]
        rows += [(a.path, a.tenant_id, INDEX_MANIFEST) for a in s.scalars(
            select(Artifact).where(Artifact.kind == "index_snapshot")) if a.path]
        rows += [(a.path, None, None) for a in s.scalars(  # quantized/distilled models: keys artifacts/<kind>/<job>
            select(Artifact).where(Artifact.kind.in_(SERVABLE_KINDS))) if a.path]
    report, store = BackfillReport(), storage.get_store()
    for key, tenant, primary in dict.fromkeys(rows):
        try:
            storage.check_key(key, tenant)
            folder = resolve_in_data_root(key)
        except UnsafePath:
            report.refused.append(key)
            continue
        if not Path(folder).is_dir():
            report.not_here.append(key)
        elif store.exists(f"{key}/{storage.MANIFEST}") or (store.local_path(key) == folder):
            report.present.append(key)
        else:
            if not dry_run:
                store.put_tree(folder, key, primary=primary)
            report.pushed.append(key)
    return report
