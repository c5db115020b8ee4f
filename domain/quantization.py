"""The ``quantize`` job.

A quantize job takes a float source model (a base model, or a base with one of the tenant's adapters merged
into it), quantizes it with bitsandbytes (NF4 with optional double quantization, FP4, or INT8), measures
what that cost on held-out text, and records the result as an ``Artifact(kind="quantized_model")``.

Merging is done the right way: the base is loaded in float, the adapter merged (``merge_and_unload``) in
float, the merged weights saved, and only then quantized. Nothing is ever merged into 4-bit weights.

The artifact is loaded for serving by ``domain.artifacts.load_serving_model``; PEFT adapters load on top of it
(QLoRA-style serving). A tenant chooses its artifact with ``foundry serve set --tenant TENANT ARTIFACT_ID``.
"""

from __future__ import annotations

import functools
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from domain import costs, heldout
from domain.artifacts import Published, add_artifact, publish_model, tree_size
from domain.errors import InvalidJob, JobFailed
from domain.contract import JobContext, Outcome
from domain.ledger.models import AdapterVersion, new_id
from domain.ledger.db import session_scope
from domain.models import LoadedModel, ModelLoadError, load_causal_lm, model_fingerprint, resolve_device
from domain.paths import fresh_dir
from domain.specs import QUANT_METHODS, QuantizeSpec

log = logging.getLogger(__name__)


class _DropCastNotice(logging.Filter):
    """bitsandbytes logs 'MatMul8bitLt: inputs will be cast ... to float16' on every INT8 matmul of a float32 input."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


logging.getLogger("bitsandbytes.autograd._functions").addFilter(_DropCastNotice())

EVAL_SEQ_LEN = 256
EVAL_BATCH = 4


# ---- what this platform can run --------------------------------------------------------------

@functools.cache
def supported_methods(device_type: str = "cpu") -> tuple[str, ...]:
    """The quantization methods bitsandbytes can run on this device type, found by trying each once
    on a small matrix (bitsandbytes >= 0.46 runs all three on CPU and CUDA)."""
    try:
        import bitsandbytes.functional as bnbf
    except Exception as exc:  # noqa: BLE001 - an unusable install supports nothing
        log.warning("bitsandbytes unusable here: %s", exc)
        return ()
    w = torch.randn(64, 64, device=device_type)
    found = []
    for method in ("nf4", "fp4"):
        try:
            bnbf.quantize_4bit(w, quant_type=method)
            found.append(method)
        except Exception:  # noqa: BLE001
            pass
    try:
        bnbf.int8_vectorwise_quant(w.half())
        found.append("int8")
    except Exception:  # noqa: BLE001
        pass
    return tuple(m for m in QUANT_METHODS if m in found)


def check_method(method: str, device: torch.device) -> None:
    supported = supported_methods(device.type)
    if method not in supported:
        try:
            import bitsandbytes
            version = bitsandbytes.__version__
        except Exception:  # noqa: BLE001
            version = "not installed"
        raise InvalidJob(
            f"method: {method} quantization cannot run on this platform ({device.type}, bitsandbytes {version}); "
            f"supported here: {', '.join(supported) or 'none (install bitsandbytes >= 0.46)'}",
            field="method", code="unsupported_method")


def bnb_config(method: str, double_quant: bool, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method,
                              bnb_4bit_use_double_quant=double_quant and method == "nf4",
                              bnb_4bit_compute_dtype=compute_dtype)


# ---- files ----------------------------------------------------------------------------------

def weights_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's distinct tensors (tied weights counted once): its size as safetensors."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


# ---- adapters --------------------------------------------------------------------------------

def find_adapter(tenant: str, ref: str) -> AdapterVersion:
    """The tenant's adapter version for an alias or version id (InvalidJob(field="adapter") if unknown)."""
    from domain.adapter_lookup import resolve_adapter

    with session_scope() as s:
        version = resolve_adapter(s, tenant, ref)
        s.expunge(version)
    return version


def adapter_folder(version: AdapterVersion, source_ref: str) -> Path:
    """The adapter's folder after checking its files' sha256 and that it was trained on ``source_ref``."""
    from domain.adapter_lookup import check_base_model, verified_adapter_path

    check_base_model(version, source_ref)
    return verified_adapter_path(version)


def merge_adapter(model: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """Merge a PEFT adapter into a float model (never into quantized weights)."""
    from peft import PeftModel

    if getattr(model, "is_quantized", False) or getattr(model, "quantization_method", None):
        raise ValueError("refusing to merge an adapter into quantized weights: load the base in float first")
    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()


# ---- the job ----------------------------------------------------------------------------------

@dataclass
class _Source:
    ref: str  # the float model quantized (after merging ``adapter`` into it, if any)
    loaded: LoadedModel
    adapter: AdapterVersion | None
    adapter_dir: Path | None


def handle_quantize(spec: QuantizeSpec, ctx: JobContext) -> Outcome:
    t0 = time.perf_counter()
    device = resolve_device(ctx.settings.device)
    check_method(spec.method, device)
    ctx.progress(0.0, stage="load")
    source = _load_source(spec, ctx.settings, device)
    seq_len = min(EVAL_SEQ_LEN, source.loaded.context_window)
    blocks, eval_source = heldout.eval_blocks(source.loaded.tokenizer, spec.eval_data_path, spec.eval_max_tokens, seq_len)
    staging = fresh_dir(ctx.settings.artifacts_dir.resolve() / "quantized" / f".{ctx.job_id}.tmp")
    reference, quantize_from = _float_reference(source, staging, ctx)

    ctx.progress(0.2, stage="quantize")
    compute_dtype = next(source.loaded.model.parameters()).dtype
    quant = _quantize(spec, quantize_from, device, compute_dtype)
    cmp = heldout.compare(reference, quant.model, blocks, batch_size=EVAL_BATCH, on_batch=_evaluate_progress(ctx))

    ctx.progress(0.9, stage="save")
    out = staging / "model"
    quant.model.save_pretrained(out, safe_serialization=True)
    source.loaded.tokenizer.save_pretrained(out)
    report = {"method": spec.method, "double_quant": spec.double_quant and spec.method == "nf4", "device": device.type,
              "source_dtype": str(compute_dtype).removeprefix("torch."), "bitsandbytes_version": _bnb_version(),
              **_sizes(reference, quant.model, out), **_quality(cmp),
              "eval_source": eval_source, "eval_tokens": cmp.tokens, "eval_seq_len": seq_len}
    lineage = _lineage(spec, source)
    published = publish_model(out, staging.parent / ctx.job_id, "quantized_model", report, lineage)
    shutil.rmtree(staging, ignore_errors=True)
    return _outcome(spec, ctx, source, published, report, lineage,
                    usage=costs.Usage(prompt_tokens=2 * int(blocks.numel()), wall_seconds=time.perf_counter() - t0,
                                      gpu_seconds=(time.perf_counter() - t0) if device.type == "cuda" else 0.0,
                                      model_id=source.ref, adapter_version_id=source.adapter.id if source.adapter else None))


def _load_source(spec: QuantizeSpec, settings, device: torch.device) -> _Source:
    """The float source model, and the tenant's adapter (checked against it) when the job names one."""
    adapter = find_adapter(spec.tenant, spec.adapter) if spec.adapter else None
    ref = spec.source_model or (adapter.base_model_id if adapter else None) or settings.base_model_ref()
    try:
        loaded = load_causal_lm(ref, device=str(device))
    except ModelLoadError as exc:
        raise InvalidJob(f"source_model: {exc}", field="source_model") from exc
    return _Source(ref, loaded, adapter, adapter_folder(adapter, ref) if adapter is not None else None)


def _float_reference(source: _Source, staging: Path, ctx: JobContext) -> tuple[torch.nn.Module, str]:
    """The float model the quantized one is compared with, and where to quantize from: the source itself,
    or the source with the adapter merged in float (saved under ``staging``)."""
    if source.adapter_dir is None:
        return source.loaded.model, source.ref
    ctx.progress(0.1, stage="merge")
    merged = merge_adapter(source.loaded.model, source.adapter_dir)
    folder = str(staging / "merged-float")
    merged.save_pretrained(folder, safe_serialization=True)
    source.loaded.tokenizer.save_pretrained(folder)
    return merged, folder


def _quantize(spec: QuantizeSpec, ref: str, device: torch.device, compute_dtype: torch.dtype) -> LoadedModel:
    try:
        return load_causal_lm(ref, device=str(device), dtype=compute_dtype,
                              quantization_config=bnb_config(spec.method, spec.double_quant, compute_dtype))
    except ModelLoadError as exc:
        raise JobFailed(f"quantization failed: {exc}", code="quantization_failed") from exc


def _evaluate_progress(ctx: JobContext):
    def on_batch(done: float) -> None:
        ctx.progress(0.3 + 0.6 * done, stage="evaluate")
        ctx.check()

    return on_batch


def _sizes(reference: torch.nn.Module, quantized: torch.nn.Module, out: Path) -> dict:
    size_before, size_after = weights_bytes(reference), tree_size(out, "*.safetensors")
    mem_before, mem_after = reference.get_memory_footprint(), quantized.get_memory_footprint()
    return {"size_before_bytes": size_before, "size_after_bytes": size_after, "compression_ratio": size_before / size_after,
            "memory_footprint_before_bytes": mem_before, "memory_footprint_after_bytes": mem_after,
            "memory_ratio": mem_after / mem_before}


def _quality(cmp: heldout.Comparison) -> dict:
    return {"perplexity_before": cmp.perplexity_reference, "perplexity_after": cmp.perplexity_candidate,
            "perplexity_delta_pct": 100 * (cmp.perplexity_candidate / cmp.perplexity_reference - 1),
            "kl_divergence": cmp.kl_divergence, "top1_agreement": cmp.top1_agreement,
            "tokens_per_s_before": cmp.tokens_per_s_reference, "tokens_per_s_after": cmp.tokens_per_s_candidate,
            "tokens_per_s_ratio": cmp.tokens_per_s_candidate / cmp.tokens_per_s_reference}


def _lineage(spec: QuantizeSpec, source: _Source) -> dict:
    adapter = source.adapter
    return {"source_model": source.ref, "source_model_hash": model_fingerprint(source.ref),
            "adapter_version_id": adapter.id if adapter else None,
            "adapter_sha256": adapter.artifact_sha256 if adapter else None,
            "adapter_base_model_hash": adapter.base_model_hash if adapter else None,
            "merged": adapter is not None, "method": spec.method}


def _outcome(spec: QuantizeSpec, ctx: JobContext, source: _Source, published: Published, report: dict, lineage: dict,
             usage: costs.Usage) -> Outcome:
    adapter = source.adapter
    name = f"{Path(source.ref).name}-{spec.method}" + (f"+{adapter.name}-v{adapter.version}" if adapter else "")
    artifact_id = new_id()

    def commit(session) -> None:
        add_artifact(session, artifact_id, kind="quantized_model", tenant=spec.tenant, name=name, path=published.path,
                     sha256=published.sha256, size_bytes=published.size_bytes, lineage=lineage, report=report,
                     job_id=ctx.job_id)

    result = {"artifact_id": artifact_id, "path": published.path, "sha256": published.sha256,
              "size_bytes": published.size_bytes, "report": report, "lineage": lineage}
    return Outcome(result=result, usage=usage, commit=commit)


def _bnb_version() -> str:
    import bitsandbytes

    return bitsandbytes.__version__
