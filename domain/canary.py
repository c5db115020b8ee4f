"""Model and adapter load sanity: a short greedy canary generation.

``run_canary`` loads the base model (or takes a loaded one), puts an adapter on top when given (after
checking its files against the ledger's sha256 with ``domain.adapter_lookup.verified_adapter_path``),
generates a few tokens greedily and checks that every step's logits are finite and that something
other than special tokens came out. ``canary_for_tenant`` runs it on a tenant's champion and reports
the outcome to the circuit breaker, which rolls a failing champion back.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

CANARY_PROMPT = "def add(a, b):\n    return a - b\n\n# Review:"


@dataclass
class CanaryResult:
    ok: bool
    model: str
    adapter_version_id: str | None = None
    text: str = ""
    new_tokens: int = 0
    finite: bool = True
    seconds: float = 0.0
    error: str | None = None
    action: str | None = None  # what the circuit breaker did
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def generate_check(model, tokenizer, prompt: str = CANARY_PROMPT, max_new_tokens: int = 8) -> tuple[bool, str, int, bool, str | None]:
    """(ok, text, new tokens, logits finite, error) of one greedy generation."""
    import torch

    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
    new_ids = out.sequences[0, enc["input_ids"].shape[1]:].tolist()
    finite = all(bool(torch.isfinite(s).all()) for s in out.scores)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    content = [t for t in new_ids if t not in special]
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    if not finite:
        return False, text, len(new_ids), False, "non-finite logits (NaN or inf) during generation"
    if not content:
        return False, text, len(new_ids), True, "empty generation (no token other than special tokens)"
    return True, text, len(new_ids), True, None


def run_canary(base_model: str, adapter_version=None, *, loaded=None, device: str = "cpu",
               max_new_tokens: int = 8, prompt: str = CANARY_PROMPT) -> CanaryResult:
    """Load (unless ``loaded`` is given), optionally attach ``adapter_version`` (an AdapterVersion row), generate."""
    t0 = time.perf_counter()
    vid = getattr(adapter_version, "id", None)
    try:
        if loaded is None:
            from domain.models import load_causal_lm

            loaded = load_causal_lm(base_model, device=device)
        model = loaded.model
        if adapter_version is not None:
            from peft import PeftModel

            from domain.adapter_lookup import verified_adapter_path

            folder = verified_adapter_path(adapter_version)
            model = PeftModel.from_pretrained(model, str(folder), adapter_name="canary", is_trainable=False)
            model.eval()
        ok, text, n, finite, error = generate_check(model, loaded.tokenizer, prompt, max_new_tokens)
        if adapter_version is not None:
            model.unload()  # leave the base model as it was (it may be shared)
    except Exception as exc:  # noqa: BLE001 - a canary reports every failure instead of raising
        return CanaryResult(ok=False, model=base_model, adapter_version_id=vid, seconds=time.perf_counter() - t0,
                            error=f"{type(exc).__name__}: {exc}"[:1000], finite=False)
    return CanaryResult(ok=ok, model=base_model, adapter_version_id=vid, text=text, new_tokens=n, finite=finite,
                        seconds=time.perf_counter() - t0, error=error)


def canary_for_tenant(tenant: str, adapter_ref: str | None = None, *, base_model: str | None = None,
                      loaded=None, device: str = "cpu", source: str = "canary") -> CanaryResult:
    """Run the canary on the tenant's champion (or ``adapter_ref``), record a health event, and tell the
    circuit breaker (a failing champion is rolled back)."""
    from domain import circuit, health
    from domain.adapter_lookup import resolve_adapter
    from domain.config import get_settings
    from domain.ledger.db import session_scope

    base_model = base_model or get_settings().base_model_ref()
    with session_scope() as s:
        version = resolve_adapter(s, tenant, adapter_ref)
    result = run_canary(base_model, version, loaded=loaded, device=device)
    label = f"adapter version {version.id}" if version is not None else "the base model"
    health.record("model", "canary", "ok" if result.ok else "fail",
                  f"canary on {label}: " + ("ok" if result.ok else result.error or "failed"), source=source,
                  tenant_id=tenant, detail={k: v for k, v in result.to_dict().items() if k not in ("detail",)})
    if version is not None:
        result.action = circuit.observe_review(tenant, version.id, result.ok, result.error, "canary")
    return result
