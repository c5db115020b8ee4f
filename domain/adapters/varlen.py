"""Variable-length ("unpadded") attention for packed training batches.

A packed batch is flattened to one row of real tokens (no tail padding) and attention runs once per sample.
On CUDA with flash-attn installed, in fp16/bf16, that is one call of flash-attn's varlen kernel
(``flash_attn_varlen_func`` over the samples' cumulative lengths); elsewhere a loop of
``scaled_dot_product_attention`` with ``is_causal=True`` on each sample's slice, the same computation. Compared with a block-diagonal mask over padded rows this does no work on
padding, builds no ``rows × L × L`` mask, and computes only the diagonal blocks of attention.

It plugs into transformers as an attention implementation (``foundry_varlen``), switched on for the packed
forward only (``packed(model, lengths)``); it behaves exactly like ``sdpa`` outside ``segments(...)``, so a
review thread sharing the model meanwhile is unaffected.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F

NAME = "foundry_varlen"
_SDPA_GQA = torch.__version__ >= "2.5"  # scaled_dot_product_attention(enable_gqa=...)
_state = threading.local()


def _lengths() -> list[int] | None:
    return getattr(_state, "lengths", None)


@contextmanager
def segments(lengths: list[int] | None):
    """Forwards inside this block treat their single input row as consecutive samples of these lengths."""
    previous = _lengths()
    _state.lengths = None if lengths is None else list(lengths)
    try:
        yield
    finally:
        _state.lengths = previous


def flash_varlen():
    """flash-attn's ``flash_attn_varlen_func`` if flash-attn is installed, else None."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _flash(fn, query, key, value, lengths: list[int], dropout: float, scaling: float | None):
    """One varlen kernel call: (1, heads, T, d) in, (1, T, heads, d) out; grouped key/value heads as they are."""
    cu = torch.tensor([0, *lengths], device=query.device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    longest = max(lengths)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, d)
    out = fn(q, k, v, cu, cu, longest, longest, dropout_p=dropout, softmax_scale=scaling, causal=True)
    return out.unsqueeze(0), None


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
               **kwargs):
    lengths = _lengths()
    if lengths is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1 or sum(lengths) != query.shape[2]:
        raise ValueError(f"varlen attention: segments {sum(lengths)} tokens, input {tuple(query.shape)}")
    fn = flash_varlen() if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) else None
    if fn is not None:
        return _flash(fn, query, key, value, lengths, dropout if module.training else 0.0, scaling)
    groups = getattr(module, "num_key_value_groups", 1)
    gqa = {}
    if groups > 1:
        if _SDPA_GQA:  # grouped heads read in place (no repeated key/value copies, no gradient to sum back)
            gqa = {"enable_gqa": True}
        else:
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
    p = dropout if module.training else 0.0
    # split, not one slice per sample: a slice's backward writes its gradient into a zero tensor of the whole
    # row (one per sample, then summed); split's backward is a single concatenation
    outs = [F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=scaling, **gqa)
            for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2))]
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.transpose(1, 2).contiguous(), None


def _mask(*args, **kwargs):
    if _lengths() is not None:
        return None  # the attention above needs none
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


_registered = False


def _configs(model) -> list:
    config = getattr(model, "config", None)
    if config is None:
        return []
    sub = [getattr(config, "text_config")] if getattr(config, "text_config", None) is not None else []
    return list({id(c): c for c in [config, *sub]}.values())


def supported(model) -> bool:
    """Packed batches can run unpadded on models that use ``sdpa`` attention (transformers ≥ 5)."""
    configs = _configs(model)
    return bool(configs) and getattr(configs[0], "_attn_implementation", None) in ("sdpa", NAME)


@contextmanager
def packed(model, lengths: list[int]):
    """Run the forwards in this block on one row made of samples of these lengths, with attention per sample.
    The model's attention implementation is switched for the block only (outside ``segments`` it is sdpa)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        AttentionInterface.register(NAME, _attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, _mask)
        _registered = True
    configs = _configs(model)
    before = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = NAME
    try:
        with segments(lengths):
            yield
    finally:
        for c, impl in zip(configs, before):
            c._attn_implementation = impl
