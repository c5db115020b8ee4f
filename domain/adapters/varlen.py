"""Variable-length ("unpadded") attention for packed training batches.

A packed batch is flattened to one row of real tokens (no tail padding) and attention runs once per sample.
On CUDA in fp16/bf16 that is one varlen kernel call over the samples' cumulative lengths: flash-attn's
``flash_attn_varlen_func`` when flash-attn is installed, else torch's own ``torch.nn.attention.varlen.varlen_attn``
(the flash-attention kernels built into CUDA builds of torch ≥ 2.10, so no extra wheel has to travel to a GPU
host). Elsewhere (CPU, fp32, dropout in training) a loop of ``scaled_dot_product_attention`` with
``is_causal=True`` on each sample's slice: the same computation. ``kernels_used()`` says which ran.
Compared with a block-diagonal mask over padded rows this does no work on padding, builds no ``rows × L × L``
mask, and computes only the diagonal blocks of attention.

It plugs into transformers as an attention implementation (``foundry_varlen``), switched on for the packed
forward only (``packed(model, lengths)``); it behaves exactly like ``sdpa`` outside ``segments(...)``, so a
review thread sharing the model meanwhile is unaffected.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F

NAME = "foundry_varlen"
_SDPA_GQA = torch.__version__ >= "2.5"  # scaled_dot_product_attention(enable_gqa=...)
_state = threading.local()
log = logging.getLogger(__name__)
KERNEL_FLASH_ATTN = "flash_attn_varlen"
KERNEL_TORCH = "torch_varlen"
KERNEL_LOOP = "sdpa_loop"


@dataclasses.dataclass
class _TorchVarlenState:
    """What this process has learnt of torch's varlen kernel (one per process: the GPU does not change)."""

    failed: str | None = None  # the reason, once the kernel refused its first call: the loop from then on
    ran: bool = False  # it has run once: a later error is a real error, not "unsupported here"


_torch_varlen_state = _TorchVarlenState()


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


def kernels_used() -> set[str]:
    """The kernels packed forwards of this thread ran since the last ``reset_kernels()``."""
    return set(getattr(_state, "kernels", ()))


def reset_kernels() -> None:
    _state.kernels = set()


def _used(name: str) -> None:
    if not hasattr(_state, "kernels"):
        _state.kernels = set()
    _state.kernels.add(name)


@contextmanager
def loop_only():
    """Packed forwards in this block use the per-sample loop whatever the device (benchmarks compare kernels)."""
    previous = getattr(_state, "loop_only", False)
    _state.loop_only = True
    try:
        yield
    finally:
        _state.loop_only = previous


def flash_varlen():
    """flash-attn's ``flash_attn_varlen_func`` if flash-attn is installed, else None."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _cu_seqlens(lengths: list[int], device) -> tuple[torch.Tensor, int]:
    """The varlen kernels' int32 cumulative sample lengths (0 first) and the longest sample."""
    cu = torch.tensor([0, *lengths], device=device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return cu, max(lengths)


@functools.lru_cache(maxsize=1)
def _torch_varlen_spec():
    """(varlen_attn, how it is told "causal", whether it takes scale, whether it takes enable_gqa), or None.
    Its keywords changed between torch releases (``is_causal=True`` in the first, ``window_size=(-1, 0)``
    later), so they are read off its signature."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    return varlen_attn, causal, "scale" in params, "enable_gqa" in params


def torch_varlen_available() -> bool:
    return _torch_varlen_spec() is not None and _torch_varlen_state.failed is None


def _torch_varlen(query, key, value, lengths: list[int], scaling: float | None):
    """torch's varlen kernel: (1, heads, T, d) in, (1, T, heads, d) out; None when it cannot run this call."""
    spec = _torch_varlen_spec()
    if spec is None or _torch_varlen_state.failed is not None:
        return None
    fn, causal, takes_scale, takes_gqa = spec
    kw = dict(causal)
    if scaling is not None:
        if takes_scale:
            kw["scale"] = scaling
        elif abs(scaling - query.shape[-1] ** -0.5) > 1e-9:
            return None  # a scale this torch's kernel cannot be given
    if key.shape[1] != query.shape[1]:
        if takes_gqa:
            kw["enable_gqa"] = True
        else:
            groups = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    cu, longest = _cu_seqlens(lengths, query.device)
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # (T, heads, d)
    first = not _torch_varlen_state.ran
    try:
        out = fn(q, k, v, cu, cu, longest, longest, **kw)
    except torch.cuda.OutOfMemoryError:
        raise
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
        if not first:
            raise
        # e.g. a GPU older than the kernel supports: say so once and use the loop from now on
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        _torch_varlen_state.failed = reason
        log.warning("torch varlen_attn cannot run here (%s); packed batches use the per-sample loop", reason)
        return None
    _torch_varlen_state.ran = True
    return out.unsqueeze(0)


def _flash(fn, query, key, value, lengths: list[int], dropout: float, scaling: float | None):
    """One varlen kernel call: (1, heads, T, d) in, (1, T, heads, d) out; grouped key/value heads as they are."""
    cu, longest = _cu_seqlens(lengths, query.device)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, d)
    out = fn(q, k, v, cu, cu, longest, longest, dropout_p=dropout, softmax_scale=scaling, causal=True)
    return out.unsqueeze(0), None


def _half_dtype(query) -> torch.dtype | None:
    """fp16/bf16 the varlen kernels can run this CUDA query in (its own, or autocast's); None elsewhere."""
    if not query.is_cuda:
        return None
    if query.dtype in (torch.float16, torch.bfloat16):
        return query.dtype
    if query.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        return dtype if dtype in (torch.float16, torch.bfloat16) else None
    return None


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
               **kwargs):
    lengths = _lengths()
    if lengths is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1 or sum(lengths) != query.shape[2]:
        raise ValueError(f"varlen attention: segments {sum(lengths)} tokens, input {tuple(query.shape)}")
    half = _half_dtype(query)
    kernel_ok = half is not None and not getattr(_state, "loop_only", False)
    if kernel_ok and query.dtype != half:  # fp32 activations under autocast: the kernels take the autocast dtype
        query, key, value = query.to(half), key.to(half), value.to(half)
    fn = flash_varlen() if kernel_ok else None
    if fn is not None:
        _used(KERNEL_FLASH_ATTN)
        return _flash(fn, query, key, value, lengths, dropout if module.training else 0.0, scaling)
    if kernel_ok and not (module.training and dropout > 0):  # torch's kernel has no dropout
        out = _torch_varlen(query, key, value, lengths, scaling)
        if out is not None:
            _used(KERNEL_TORCH)
            return out, None
    _used(KERNEL_LOOP)
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
