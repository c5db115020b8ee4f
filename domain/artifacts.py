"""Model artifacts in the ledger and under the data root: hashing a folder, publishing it, recording it, and
loading a servable one back.

- ``sha256_tree(folder)``: the sha256 recorded for a folder (names and contents of its files, dot-files skipped).
- ``publish_model(folder, dest, kind, report, lineage)``: write the report file, move the finished folder into
  place (``paths.publish_dir``), put it in the artifact store (verified; no copy when the store is the data
  folder) and return what the ledger records of it (``Published``: path = store key, sha256, size).
- ``data_file(rel, field)``: a data file a job names, under the data root or, on a host that does not hold
  it, in the artifact store under the same key (``storage.fetch_file``, kept in the node cache).
- ``add_artifact(session, ...)``: the ``artifacts`` row of a ready model (inside the job's commit).
- ``load_serving_model(artifact)``: a ``quantized_model`` or ``distilled_model`` artifact loaded for serving:
  ``servable_folder`` (kind, status, path and sha256 checked; on a host that did not make it, fetched from the
  store into this host's node cache, verified against the manifest and the recorded sha256) then
  ``load_model_folder``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select

from domain import storage
from domain.config import get_settings
from domain.contract import jsonable
from domain.device import compute_dtype
from domain.errors import InvalidJob
from domain.ledger.models import Artifact
from domain.models import (
    LoadedModel,
    ModelLoadError,
    load_causal_lm,
    load_tokenizer,
    resolve_device,
)
from domain.paths import (
    UnsafePath,
    data_root,
    publish_dir,
    resolve_in_data_root,
    sha256_tree,
)

SERVABLE_KINDS = ("quantized_model", "distilled_model")
REPORT_FILE = "foundry-artifact.json"


# ---- files ----------------------------------------------------------------------------------

def tree_size(path: str | os.PathLike, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in Path(path).rglob(pattern) if p.is_file())


@dataclass(frozen=True)
class Published:
    """A model folder in place under the data root, as the ledger records it."""

    path: str  # relative to the data root
    sha256: str  # paths.sha256_tree of the folder
    size_bytes: int


def publish_model(folder: Path, dest: Path, kind: str, report: dict, lineage: dict) -> Published:
    """Write the report file into a finished model folder, move the folder to ``dest`` and describe it."""
    (folder / REPORT_FILE).write_text(json.dumps({"kind": kind, "report": report, "lineage": lineage}, indent=2))
    publish_dir(folder, dest)
    key = dest.relative_to(data_root()).as_posix()
    manifest = storage.publish_tree(dest, key)  # StoreUnavailable (transient) before anything is recorded
    return Published(path=key, sha256=manifest.sha256, size_bytes=manifest.size_bytes)


def data_file(rel: str, field: str) -> Path:
    try:
        path = resolve_in_data_root(rel)
    except UnsafePath as exc:
        raise InvalidJob(f"{field}: {exc}", field=field) from exc
    if path.exists():
        return path
    if not storage.holds_data_folder():  # another host's data set: from the artifact store, by the same key
        try:
            return storage.fetch_file(rel)
        except storage.ObjectMissing:
            pass
        except storage.KeyRefused as exc:
            raise InvalidJob(f"{field}: {exc}", field=field) from exc
    raise InvalidJob(f"{field}: {rel!r} does not exist under the data root or in the artifact store", field=field)


# ---- the ledger -----------------------------------------------------------------------------

def add_artifact(session, artifact_id: str, *, kind: str, tenant: str, name: str, path: str, sha256: str,
                 size_bytes: int, lineage: dict, report: dict, job_id: str) -> None:
    """Insert a ready model artifact, the next version of ``name`` for this tenant (inside the job's commit)."""
    latest = session.scalar(select(func.max(Artifact.version)).where(
        Artifact.kind == kind, Artifact.tenant_id == tenant, Artifact.name == name))
    art = Artifact(id=artifact_id, kind=kind, tenant_id=tenant, name=name, version=(latest or 0) + 1, path=path, sha256=sha256,
                   size_bytes=size_bytes, status="ready", lineage=jsonable(lineage), report=jsonable(report),
                   created_by_job_id=job_id)
    session.add(art)


# ---- serving ----------------------------------------------------------------------------------

def load_serving_model(artifact: Artifact, device: str = "auto") -> LoadedModel:
    """Load a quantized or distilled artifact recorded in the ledger, after checking its sha256.

    Raises ``ModelLoadError`` when the artifact is not a servable model, is missing, or changed on disk.
    PEFT adapters load on top of the returned model (``PeftModel.from_pretrained(loaded.model, dir)``).
    """
    return load_model_folder(servable_folder(artifact), device, label=f"artifact {artifact.id}")


def servable_folder(artifact: Artifact) -> Path:
    """The folder of a servable artifact under the data root, once its kind, status and sha256 are checked."""
    if artifact.kind not in SERVABLE_KINDS:
        raise ModelLoadError(f"artifact {artifact.id} is a {artifact.kind}, not a servable model ({', '.join(SERVABLE_KINDS)})")
    if artifact.status in ("building", "corrupt"):
        raise ModelLoadError(f"artifact {artifact.id} is {artifact.status}")
    try:
        path = resolve_in_data_root(artifact.path)
    except UnsafePath as exc:
        raise ModelLoadError(f"artifact {artifact.id}: {exc}") from exc
    if not (path / "config.json").exists():  # made on another host: from the store, through this host's cache
        return _fetched(artifact)
    if artifact.sha256 and sha256_tree(path) != artifact.sha256:
        raise ModelLoadError(f"artifact {artifact.id}: sha256 mismatch, the files at {artifact.path} changed since it was recorded")
    return path


def _fetched(artifact: Artifact) -> Path:
    if not artifact.sha256:
        raise ModelLoadError(f"artifact {artifact.id}: no model at {artifact.path} here and no sha256 recorded "
                             f"to fetch it from the store")
    try:
        path = storage.fetch_tree(artifact.path, artifact.sha256)
    except (storage.StoreUnavailable, storage.ObjectMissing, storage.ObjectCorrupt, storage.KeyRefused) as exc:
        raise ModelLoadError(f"artifact {artifact.id}: {exc}") from exc
    if not (path / "config.json").exists():
        raise ModelLoadError(f"artifact {artifact.id}: no model at {artifact.path} under the data root or in the store")
    return path


def load_model_folder(path: Path, device: str = "auto", *, label: str = "model") -> LoadedModel:
    """A float or bitsandbytes-quantized model folder loaded on ``device`` (``label`` names it in errors)."""
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    config = json.loads((path / "config.json").read_text())
    if "quantization_config" not in config:
        return load_causal_lm(str(path), device=str(dev))
    dtype = compute_dtype(dev, get_settings().compute_dtype)
    device_map = "cpu" if dev.type == "cpu" else {"": dev.index or 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map=device_map)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{label}: cannot load {path}: {exc}") from exc
    model.eval()
    tok = load_tokenizer(str(path))
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return LoadedModel(model=model, tokenizer=tok, ref=str(path), device=dev)
