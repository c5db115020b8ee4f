"""Model artifacts in the ledger and under the data root: hashing a folder, publishing it, recording it, and
loading a servable one back.

- ``tree_digest(folder)``: the sha256 recorded for a folder (names and contents of its files, dot-files skipped).
- ``publish_dir(staging, dest)``: move a finished folder into place.
- ``data_file(rel, field)``: a data file a job names, under the data root.
- ``add_artifact(session, ...)``: the ``artifacts`` row of a ready model (inside the job's commit).
- ``load_serving_model(artifact)``: a ``quantized_model`` or ``distilled_model`` artifact loaded for serving:
  ``servable_folder`` (kind, status, path and sha256 checked) then ``load_model_folder``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from sqlalchemy import func, select

from domain.errors import InvalidJob
from domain.jobs import _jsonable  # becomes domain.contract.jsonable
from domain.ledger.models import Artifact
from domain.models import LoadedModel, ModelLoadError, load_causal_lm, load_tokenizer, resolve_device
from domain.paths import UnsafePath, resolve_in_data_root, sha256_file

SERVABLE_KINDS = ("quantized_model", "distilled_model")
REPORT_FILE = "foundry-artifact.json"


# ---- files ----------------------------------------------------------------------------------

def tree_digest(path: str | os.PathLike) -> str:
    """The sha256 recorded for a folder: names and contents of its regular files in sorted order, skipping
    dot-files (caches a library writes next to weights after the fact must not change the digest)."""
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(str(f.relative_to(root)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def tree_size(path: str | os.PathLike, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in Path(path).rglob(pattern) if p.is_file())


def publish_dir(staging: Path, dest: Path) -> None:
    """Move a finished folder into place (a redelivered job replaces its own earlier copy)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, dest)


def data_file(rel: str, field: str) -> Path:
    try:
        path = resolve_in_data_root(rel)
    except UnsafePath as exc:
        raise InvalidJob(f"{field}: {exc}", field=field) from exc
    if not path.exists():
        raise InvalidJob(f"{field}: {rel!r} does not exist under the data root", field=field)
    return path


# ---- the ledger -----------------------------------------------------------------------------

def add_artifact(session, artifact_id: str, *, kind: str, tenant: str, name: str, path: str, sha256: str,
                 size_bytes: int, lineage: dict, report: dict, job_id: str) -> None:
    """Insert a ready model artifact, the next version of ``name`` for this tenant (inside the job's commit)."""
    latest = session.scalar(select(func.max(Artifact.version)).where(
        Artifact.kind == kind, Artifact.tenant_id == tenant, Artifact.name == name))
    art = Artifact(id=artifact_id, kind=kind, tenant_id=tenant, name=name, version=(latest or 0) + 1, path=path, sha256=sha256,
                   size_bytes=size_bytes, status="ready", lineage=_jsonable(lineage), report=_jsonable(report),
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
    if not (path / "config.json").exists():
        raise ModelLoadError(f"artifact {artifact.id}: no model at {artifact.path} under the data root")
    if artifact.sha256 and tree_digest(path) != artifact.sha256:
        raise ModelLoadError(f"artifact {artifact.id}: sha256 mismatch, the files at {artifact.path} changed since it was recorded")
    return path


def load_model_folder(path: Path, device: str = "auto", *, label: str = "model") -> LoadedModel:
    """A float or bitsandbytes-quantized model folder loaded on ``device`` (``label`` names it in errors)."""
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    config = json.loads((path / "config.json").read_text())
    if "quantization_config" not in config:
        return load_causal_lm(str(path), device=str(dev))
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
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
