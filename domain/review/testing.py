"""Helpers for review tests and benchmarks: tiny "lively" models, LoRA adapters made on the spot,
and adapter versions registered in the ledger the way the adapter lifecycle (domain/adapters) does.

A random tiny model repeats one token forever, which would make any equality test trivially true;
``save_lively_tiny_model`` scales its weights so greedy decoding produces varied tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

from domain.ledger.db import session_scope
from domain.ledger.models import AdapterAlias, AdapterVersion, Tenant
from domain.models import model_fingerprint, tiny_model, tiny_tokenizer
from domain.paths import sha256_file


def save_lively_tiny_model(dest: Path, seed: int = 3, scale: float = 8.0) -> Path:
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(scale)
    dest = Path(dest)
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    return dest


def make_adapter(base_ref: str | Path, dest: Path, seed: int, r: int = 4, alpha: int | None = None,
                 target_modules=("q_proj", "v_proj"), base_model=None) -> Path:
    """A random (non-zero) LoRA adapter for this base model, saved as safetensors in ``dest``."""
    from peft import LoraConfig, get_peft_model

    from domain.models import load_causal_lm

    model = base_model if base_model is not None else load_causal_lm(str(base_ref), device="cpu").model
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha or 2 * r, target_modules=list(target_modules), init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # make the adapter matter: B ~ N(0, 0.5)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(dest, safe_serialization=True)
    if base_model is not None:
        peft_model.unload()  # give the caller its base model back without LoRA layers
    return Path(dest)


def register_adapter(tenant: str, data_dir: Path, rel_path: str, base_ref: str, *, name: str = "reviewer",
                     version: int = 1, alias: str | None = "champion", status: str = "promoted",
                     url: str | None = None) -> str:
    """Insert an AdapterVersion for the adapter folder ``data_dir/rel_path`` (and point ``alias`` at it)."""
    folder = Path(data_dir) / rel_path
    with session_scope(url) as s:
        if s.get(Tenant, tenant) is None:
            s.add(Tenant(id=tenant, display_name=tenant))
            s.flush()
        v = AdapterVersion(tenant_id=tenant, name=name, version=version, base_model_id=str(base_ref),
                           base_model_hash=model_fingerprint(str(base_ref)), artifact_path=rel_path,
                           artifact_sha256=sha256_file(folder / "adapter_model.safetensors"), status=status,
                           hyperparams={}, metrics={})
        s.add(v)
        s.flush()
        if alias:
            row = s.get(AdapterAlias, (tenant, alias))
            if row is None:
                s.add(AdapterAlias(tenant_id=tenant, alias=alias, version_id=v.id))
            else:
                row.version_id = v.id
        return v.id
