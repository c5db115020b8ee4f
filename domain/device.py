"""Device choices in one place: compute dtype, attention kernel, autocast, out-of-memory, GPU memory.

- ``compute_dtype(device, pref)``: ``FOUNDRY_COMPUTE_DTYPE`` (``auto|bf16|fp16|fp32``). ``auto`` is fp32 on
  the CPU (unchanged) and, on CUDA, bf16 where the card supports it, else fp16.
- ``attn_implementation(pref)``: ``FOUNDRY_ATTN_IMPLEMENTATION`` (``sdpa`` default, ``eager``,
  ``flash_attention_2`` only when the ``flash_attn`` package is installed, refused with a clear error otherwise).
- ``autocast(device, dtype)``: the context the training and distillation loops run their forwards in; mixed
  precision on CUDA, nothing on the CPU.
- ``errors.is_out_of_memory(exc)`` / ``oom_failure(exc, what)`` / ``oom_as_failure(what)``: an out-of-memory error becomes a
  ``JobFailed`` with code ``cuda_oom`` (``out_of_memory`` on the CPU) and a hint, never a crash or a retry loop.
- ``memory(device)`` / ``release(device)``: GPU memory figures (MB) for health events and metrics, and the
  cached blocks handed back after an adapter is evicted or a batch ran out of memory.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager, nullcontext

import torch

from domain.errors import JobFailed, is_out_of_memory

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_CHOICES = ("auto", *DTYPES)
ATTN_CHOICES = ("sdpa", "eager", "flash_attention_2")


class DeviceError(JobFailed):
    """The worker's device settings cannot run here (recorded ``failed`` with its code, never retried)."""


def _device(device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def compute_dtype(device, pref: str = "auto") -> torch.dtype:
    """The dtype models are loaded and computed in on ``device``."""
    dev = _device(device)
    pref = (pref or "auto").lower()
    if pref not in DTYPE_CHOICES:
        raise DeviceError(f"FOUNDRY_COMPUTE_DTYPE: {pref!r} is not one of {', '.join(DTYPE_CHOICES)}",
                          code="dtype_unsupported")
    if pref == "auto":
        if dev.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if pref == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"FOUNDRY_COMPUTE_DTYPE: bf16 is not supported by {torch.cuda.get_device_name(dev)}; "
                          "use fp16 or auto", code="dtype_unsupported")
    return DTYPES[pref]


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def attn_implementation(pref: str = "sdpa", device=None) -> str:
    """The ``attn_implementation`` given to ``from_pretrained``; flash_attention_2 needs flash-attn and CUDA."""
    pref = (pref or "sdpa").lower()
    if pref not in ATTN_CHOICES:
        raise DeviceError(f"FOUNDRY_ATTN_IMPLEMENTATION: {pref!r} is not one of {', '.join(ATTN_CHOICES)}",
                          code="attn_unavailable")
    if pref == "flash_attention_2":
        if not flash_attn_available():
            raise DeviceError("FOUNDRY_ATTN_IMPLEMENTATION: flash_attention_2 needs the flash-attn package "
                              "(pip install flash-attn on a CUDA machine); use sdpa", code="attn_unavailable")
        if device is not None and _device(device).type != "cuda":
            raise DeviceError("FOUNDRY_ATTN_IMPLEMENTATION: flash_attention_2 runs on CUDA only; this worker's "
                              f"device is {_device(device)}", code="attn_unavailable")
    return pref


def autocast(device, dtype: torch.dtype | None = None):
    """Mixed precision for forwards on CUDA (bf16/fp16); a no-op context on the CPU or for fp32."""
    dev = _device(device)
    if dev.type != "cuda" or dtype in (None, torch.float32):
        return nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """Host → device copy that overlaps with compute on CUDA (pinned source, non-blocking)."""
    dev = _device(device)
    if dev.type != "cuda" or t.device.type == "cuda":
        return t.to(dev)
    return t.pin_memory().to(dev, non_blocking=True)


# ---- out of memory ------------------------------------------------------------------------------

def oom_code(exc: BaseException) -> str:
    return "cuda_oom" if isinstance(exc, torch.OutOfMemoryError) or "cuda out of memory" in str(exc).lower() \
        else "out_of_memory"


def oom_failure(exc: BaseException, what: str, hint: str = "") -> JobFailed:
    """The permanent failure an out-of-memory error becomes (after the cache is handed back)."""
    release()
    return out_of_memory_failure(what, str(exc), oom_code(exc), memory(), hint)


def out_of_memory_failure(what: str, error: str, code: str, free: dict, hint: str = "") -> JobFailed:
    """``JobFailed`` for an out-of-memory error in ``what`` (``error``: its text, ``free``: ``memory()`` of the
    device it ran on, {} on the CPU): also for a helper rank's, reported from its own process."""
    where = f"; GPU free {free['free_mb']:.0f} of {free['total_mb']:.0f} MB" if free else ""
    return JobFailed(f"out of memory in {what}{where}: {hint or 'lower the batch size or sequence length'} "
                     f"({(error.splitlines() or [''])[0][:300]})", code=code)


@contextmanager
def oom_as_failure(what: str, hint: str = ""):
    """Turn an out-of-memory error raised inside the block into ``oom_failure``."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise oom_failure(exc, what, hint) from exc


# ---- memory figures -----------------------------------------------------------------------------

def memory(device=None) -> dict:
    """{"free_mb", "total_mb", "allocated_mb", "reserved_mb", "peak_mb"} of a CUDA device; {} without CUDA
    (or before CUDA was initialised, so a health check never starts a CUDA context)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    dev = _device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    if dev.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(dev)
    mb = lambda n: round(n / 2**20, 1)  # noqa: E731
    return {"free_mb": mb(free), "total_mb": mb(total), "allocated_mb": mb(torch.cuda.memory_allocated(dev)),
            "reserved_mb": mb(torch.cuda.memory_reserved(dev)), "peak_mb": mb(torch.cuda.max_memory_allocated(dev))}


def release(device=None) -> None:
    """Hand cached CUDA blocks back to the driver (after an eviction or an out-of-memory error)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def describe(device) -> dict:
    """What a worker reports about its device in health events."""
    dev = _device(device)
    info = {"device": str(dev), "torch": torch.__version__}
    if dev.type == "cuda" and torch.cuda.is_available():
        info.update(name=torch.cuda.get_device_name(dev), capability=".".join(map(str, torch.cuda.get_device_capability(dev))),
                    bf16=torch.cuda.is_bf16_supported(), cuda=torch.version.cuda, **memory(dev))
    return info


def adamw(params, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """torch's AdamW for the trainable ``params``. On CUDA its fused kernel (every parameter's update in a few
    launches instead of a few per tensor: LoRA on 30 layers has hundreds of small tensors), which is also what
    the HF Trainer uses by default (``adamw_torch_fused``); its state dict is the same, so checkpoints resume
    with either. Elsewhere torch's default implementation, so CPU results and figures do not change."""
    params = list(params)
    fused = bool(params) and all(p.device.type == "cuda" and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))


def train_autocast(model: torch.nn.Module):
    """The autocast a training/distillation loop wraps its forwards in: the worker's compute dtype on CUDA."""
    dev = model_device(model)
    if dev.type != "cuda":
        return nullcontext()
    from domain.config import get_settings

    return autocast(dev, compute_dtype(dev, get_settings().compute_dtype))
