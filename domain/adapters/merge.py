"""Combining and comparing adapter versions.

``merge_versions`` loads two or more versions of one tenant on their (shared) base model and combines them
with PEFT ``add_weighted_adapter``. The default ``cat`` combination is exact: the merged update is
``sum_i w_i * B_i A_i`` (ranks add up); ``linear`` averages A and B separately and needs equal ranks. The
result is a new version (status ``candidate``) whose ``adapter_lineage`` rows point at every parent with
its weight. ``diff_versions`` compares two versions: ledger fields and, per LoRA module, the norms and
cosine similarity of their weight updates.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from sqlalchemy.orm import Session

from domain import adapter_lookup
from domain.adapters import store
from domain.errors import InvalidJob
from domain.ledger.models import AdapterVersion, new_id


def merge_versions(session: Session, tenant: str, refs: list[str], weights: list[float] | None = None, *,
                   name: str | None = None, combination: str = "cat", moved_by: str = "cli",
                   alias: str | None = None, base_model_ref: str | None = None) -> AdapterVersion:
    """Merge the versions ``refs`` (aliases or ids of this tenant) into a new version, saved under the data
    root and registered in ``session``; optionally point ``alias`` at it."""
    from peft import PeftModel

    from domain.adapters.training import base_model
    from domain.config import get_settings

    if len(refs) < 2:
        raise InvalidJob("merge needs at least two adapter versions", field="adapters")
    weights = list(weights) if weights else [1.0 / len(refs)] * len(refs)
    if len(weights) != len(refs):
        raise InvalidJob(f"{len(refs)} adapters but {len(weights)} weights", field="weights")
    versions = []
    for ref in refs:
        v = adapter_lookup.resolve_adapter(session, tenant, ref)
        if v is None:
            raise InvalidJob(f"adapter {ref!r} of tenant {tenant!r} not found", field="adapters")
        versions.append(v)
    if len({v.id for v in versions}) != len(versions):
        raise InvalidJob("the same version is named twice", field="adapters")
    if len({v.base_model_hash for v in versions}) != 1:
        raise InvalidJob("the versions were trained on different base models and cannot be merged", field="adapters")
    base_ref = base_model_ref or versions[0].base_model_id
    for v in versions:
        adapter_lookup.check_base_model(v, base_ref)
    dirs = [adapter_lookup.verified_adapter_path(v) for v in versions]

    loaded = base_model(base_ref, get_settings().device, qlora=False)
    names = [f"m{i}" for i in range(len(versions))]
    model = PeftModel.from_pretrained(loaded.model, str(dirs[0]), adapter_name=names[0])
    try:
        for n, d in zip(names[1:], dirs[1:]):
            model.load_adapter(str(d), adapter_name=n)
        model.add_weighted_adapter(names, weights, adapter_name="merged", combination_type=combination)
        name = name or versions[0].name
        folder = f"merge-{new_id()}"
        files = store.save_adapter_files(model, store.adapter_rel_dir(tenant, name, folder), adapter_name="merged")
    finally:
        model.unload()
    first = versions[0]
    merged = store.register_version(
        session, tenant=tenant, name=name, base_model_id=first.base_model_id, base_model_hash=first.base_model_hash,
        files=files, parent_id=first.id, hyperparams={"merge": {"combination": combination, "weights": weights,
                                                                  "parents": [v.id for v in versions]}},
        metrics={}, status="candidate", extra_parents=[(v.id, "merge", w) for v, w in zip(versions, weights)],
        feedback_until=max((v.feedback_until for v in versions if v.feedback_until), default=None))
    if alias:
        store.move_alias(session, tenant, alias, merged.id, moved_by,
                         f"merge of {', '.join(f'{v.name} v{v.version}' for v in versions)}")
    return merged


def lora_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """module name → the weight update B @ A (scaled by alpha / r) of an adapter folder."""
    import json

    from safetensors.torch import load_file

    config = json.loads((Path(folder) / store.CONFIG_FILE).read_text())
    scale = config.get("lora_alpha", config.get("r", 1)) / max(1, config.get("r", 1))
    weights = load_file(str(Path(folder) / store.WEIGHTS_FILE))
    out = {}
    for key, a in weights.items():
        if "lora_A" not in key:
            continue
        b = weights.get(key.replace("lora_A", "lora_B"))
        if b is not None:
            out[key.replace(".lora_A.weight", "")] = (b.float() @ a.float()) * scale
    return out


def diff_versions(session: Session, tenant: str, ref_a: str, ref_b: str) -> dict:
    """Fields that differ between two versions and, per LoRA module, how their weight updates compare."""
    a, b = adapter_lookup.resolve_adapter(session, tenant, ref_a), adapter_lookup.resolve_adapter(session, tenant, ref_b)
    if a is None or b is None:
        raise InvalidJob("no champion to compare", field="adapter")
    sa, sb = store.version_summary(a), store.version_summary(b)
    fields = {k: {"a": sa[k], "b": sb[k]} for k in sa
              if k not in ("id", "created_at", "metrics", "hyperparams") and sa[k] != sb[k]}
    hyper = {k: {"a": a.hyperparams.get(k), "b": b.hyperparams.get(k)}
             for k in sorted(set(a.hyperparams) | set(b.hyperparams)) if a.hyperparams.get(k) != b.hyperparams.get(k)}
    da, db = lora_deltas(adapter_lookup.verified_adapter_path(a)), lora_deltas(adapter_lookup.verified_adapter_path(b))
    modules = {}
    for key in sorted(set(da) | set(db)):
        x, y = da.get(key), db.get(key)
        if x is None or y is None or x.shape != y.shape:
            modules[key] = {"only_in": "a" if y is None else "b" if x is None else "shape differs"}
            continue
        nx, ny = float(x.norm()), float(y.norm())
        cos = float((x * y).sum() / (nx * ny)) if nx and ny else float("nan")
        modules[key] = {"norm_a": nx, "norm_b": ny, "cosine": cos, "relative_change": float((x - y).norm()) / nx if nx else math.inf}
    cosines = [m["cosine"] for m in modules.values() if "cosine" in m and m["cosine"] == m["cosine"]]
    return {"a": {"id": a.id, "name": a.name, "version": a.version}, "b": {"id": b.id, "name": b.name, "version": b.version},
            "fields": fields, "hyperparams": hyper,
            "metrics": {"a": {k: a.metrics.get(k) for k in ("train_loss_final", "eval")},
                        "b": {k: b.metrics.get(k) for k in ("train_loss_final", "eval")}},
            "modules": modules, "mean_cosine": sum(cosines) / len(cosines) if cosines else None}
