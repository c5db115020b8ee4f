"""Facts about a loaded review model that both review engines read (Foundry's runtime and vLLM's)."""

from __future__ import annotations

import json
from pathlib import Path


def model_id_for(ref: str) -> str:
    """A readable model id: the hub id a prepared folder came from, else the reference itself."""
    marker = Path(ref) / "foundry-source.json"
    if marker.exists():
        try:
            return json.loads(marker.read_text()).get("model_id") or ref
        except (OSError, ValueError):
            pass
    return ref


def context_window(model_window: int, tokenizer) -> int:
    """The tokens a prompt and its answer may span: the model's window, or the tokenizer's if smaller."""
    tok_max = getattr(tokenizer, "model_max_length", None) or 0
    return min(model_window, tok_max) if 0 < tok_max < 10**7 else model_window


def end_token_ids(generation_config, tokenizer) -> set[int]:
    """The tokens that end a row: the generation config's end token(s), else the tokenizer's."""
    eos = generation_config.eos_token_id
    eos = eos if isinstance(eos, (list, tuple)) else [eos if eos is not None else tokenizer.eos_token_id]
    return {int(e) for e in eos if e is not None}
