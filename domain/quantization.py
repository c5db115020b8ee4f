"""The ``quantize`` job, and loading a quantized or distilled artifact for serving.

A quantize job takes a float source model (a base model, or a base with one of the tenant's adapters merged
into it), quantizes it with bitsandbytes (NF4 with optional double quantization, FP4, or INT8), measures
what that cost on held-out text, and records the result as an ``Artifact(kind="quantized_model")``.

Merging is done the right way: the base is loaded in float, the adapter merged (``merge_and_unload``) in
float, the merged weights saved, and only then quantized. Nothing is ever merged into 4-bit weights.

``load_serving_model(artifact)`` loads a ``quantized_model`` or ``distilled_model`` artifact recorded in the
ledger (after checking its sha256) so a review worker can serve it; PEFT adapters load on top of it
(QLoRA-style serving). A tenant chooses its artifact with ``foundry serve set TENANT ARTIFACT_ID``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from sqlalchemy import func, select

from domain import costs, heldout
from domain.config import get_settings
from domain.device import compute_dtype
from domain.errors import InvalidJob, JobFailed
from domain.jobs import JobContext, Outcome, _jsonable
from domain.ledger.models import AdapterVersion, Artifact, new_id
from domain.ledger.db import session_scope
from domain.models import LoadedModel, ModelLoadError, load_causal_lm, load_tokenizer, model_fingerprint, resolve_device
from domain.paths import UnsafePath, data_root, resolve_in_data_root
from domain.specs import QUANT_METHODS, QuantizeSpec

log = logging.getLogger(__name__)


class _DropCastNotice(logging.Filter):
    """bitsandbytes logs 'MatMul8bitLt: inputs will be cast ... to float16' on every INT8 matmul of a float32 input."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


logging.getLogger("bitsandbytes.autograd._functions").addFilter(_DropCastNotice())

SERVABLE_KINDS = ("quantized_model", "distilled_model")
EVAL_SEQ_LEN = 256
EVAL_BATCH = 4
REPORT_FILE = "foundry-artifact.json"


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

def tree_digest(path: str | os.PathLike) -> str:
    """sha256 over a folder's regular files (names and contents, sorted), skipping dot-files such as
    caches written next to weights after the fact."""
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(str(f.relative_to(root)).encode())
        with open(f, "rb") as fh:
            fd = hashlib.sha256()
            for block in iter(lambda: fh.read(1 << 20), b""):
                fd.update(block)
        h.update(fd.hexdigest().encode())
    return h.hexdigest()


def tree_size(path: str | os.PathLike, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in Path(path).rglob(pattern) if p.is_file())


def weights_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's distinct tensors (tied weights counted once): its size as safetensors."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


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


def eval_blocks(tokenizer, eval_data_path: str | None, max_tokens: int, seq_len: int) -> tuple[torch.Tensor, str]:
    """Held-out token blocks for a report: the user's text, or the standard library's held-out split."""
    if eval_data_path:
        text, source = heldout.text_from_path(data_file(eval_data_path, "eval_data_path"), max_tokens * 8), eval_data_path
    else:
        text, source = heldout.stdlib_text("heldout", max_tokens * 8), "stdlib:heldout"
    blocks = heldout.token_blocks(tokenizer, text, seq_len, max_tokens)
    if blocks.shape[0] == 0:
        raise InvalidJob(f"eval_data_path: the held-out set {source!r} is empty (no complete block of {seq_len} tokens)",
                         field="eval_data_path", code="empty_dataset")
    return blocks, source


# ---- adapters --------------------------------------------------------------------------------

def find_adapter(tenant: str, ref: str) -> AdapterVersion:
    """The tenant's adapter version for an alias or version id (InvalidJob(field="adapter") if unknown)."""
    from domain.adapters.store import resolve_adapter

    with session_scope() as s:
        version = resolve_adapter(s, tenant, ref)
        s.expunge(version)
    return version


def adapter_folder(version: AdapterVersion, source_ref: str) -> Path:
    """The adapter's folder after checking its files' sha256 and that it was trained on ``source_ref``."""
    from domain.adapters.store import check_base_model, verified_adapter_path

    check_base_model(version, source_ref)
    return verified_adapter_path(version)


def merge_adapter(model: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """Merge a PEFT adapter into a float model (never into quantized weights)."""
    from peft import PeftModel

    if getattr(model, "is_quantized", False) or getattr(model, "quantization_method", None):
        raise ValueError("refusing to merge an adapter into quantized weights: load the base in float first")
    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()


# ---- the job ----------------------------------------------------------------------------------

def handle_quantize(spec: QuantizeSpec, ctx: JobContext) -> Outcome:
    t0 = time.perf_counter()
    settings = ctx.settings
    device = resolve_device(settings.device)
    check_method(spec.method, device)
    ctx.progress(0.0, stage="load")

    adapter = adapter_dir = None
    if spec.adapter:
        adapter = find_adapter(spec.tenant, spec.adapter)
    source_ref = spec.source_model or (adapter.base_model_id if adapter else None) or settings.base_model_ref()
    try:
        source = load_causal_lm(source_ref, device=str(device))
    except ModelLoadError as exc:
        raise InvalidJob(f"source_model: {exc}", field="source_model") from exc
    if adapter is not None:
        adapter_dir = adapter_folder(adapter, source_ref)
    compute_dtype = next(source.model.parameters()).dtype

    seq_len = min(EVAL_SEQ_LEN, source.context_window)
    blocks, eval_source = eval_blocks(source.tokenizer, spec.eval_data_path, spec.eval_max_tokens, seq_len)

    staging = settings.artifacts_dir.resolve() / "quantized" / f".{ctx.job_id}.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    quantize_from = source_ref
    reference = source.model
    if adapter_dir is not None:
        ctx.progress(0.1, stage="merge")
        reference = merge_adapter(source.model, adapter_dir)
        quantize_from = str(staging / "merged-float")
        reference.save_pretrained(quantize_from, safe_serialization=True)
        source.tokenizer.save_pretrained(quantize_from)

    ctx.progress(0.2, stage="quantize")
    try:
        quant = load_causal_lm(quantize_from, device=str(device), dtype=compute_dtype,
                               quantization_config=bnb_config(spec.method, spec.double_quant, compute_dtype))
    except ModelLoadError as exc:
        raise JobFailed(f"quantization failed: {exc}", code="quantization_failed") from exc

    def on_batch(done: float) -> None:
        ctx.progress(0.3 + 0.6 * done, stage="evaluate")
        ctx.check()

    cmp = heldout.compare(reference, quant.model, blocks, batch_size=EVAL_BATCH, on_batch=on_batch)

    ctx.progress(0.9, stage="save")
    out = staging / "model"
    quant.model.save_pretrained(out, safe_serialization=True)
    source.tokenizer.save_pretrained(out)
    size_before = weights_bytes(reference)
    size_after = tree_size(out, "*.safetensors")
    mem_before, mem_after = reference.get_memory_footprint(), quant.model.get_memory_footprint()
    report = {
        "method": spec.method, "double_quant": spec.double_quant and spec.method == "nf4", "device": device.type,
        "source_dtype": str(compute_dtype).removeprefix("torch."), "bitsandbytes_version": _bnb_version(),
        "size_before_bytes": size_before, "size_after_bytes": size_after,
        "compression_ratio": size_before / size_after,
        "memory_footprint_before_bytes": mem_before, "memory_footprint_after_bytes": mem_after,
        "memory_ratio": mem_after / mem_before,
        "perplexity_before": cmp.perplexity_reference, "perplexity_after": cmp.perplexity_candidate,
        "perplexity_delta_pct": 100 * (cmp.perplexity_candidate / cmp.perplexity_reference - 1),
        "kl_divergence": cmp.kl_divergence, "top1_agreement": cmp.top1_agreement,
        "tokens_per_s_before": cmp.tokens_per_s_reference, "tokens_per_s_after": cmp.tokens_per_s_candidate,
        "tokens_per_s_ratio": cmp.tokens_per_s_candidate / cmp.tokens_per_s_reference,
        "eval_source": eval_source, "eval_tokens": cmp.tokens, "eval_seq_len": seq_len,
    }
    lineage = {
        "source_model": source_ref, "source_model_hash": model_fingerprint(source_ref),
        "adapter_version_id": adapter.id if adapter else None,
        "adapter_sha256": adapter.artifact_sha256 if adapter else None,
        "adapter_base_model_hash": adapter.base_model_hash if adapter else None,
        "merged": adapter is not None, "method": spec.method,
    }
    (out / REPORT_FILE).write_text(json.dumps({"kind": "quantized_model", "report": report, "lineage": lineage}, indent=2))
    dest = staging.parent / ctx.job_id
    publish_dir(out, dest)
    shutil.rmtree(staging, ignore_errors=True)
    rel = str(dest.relative_to(data_root()))
    digest, size = tree_digest(dest), tree_size(dest)
    name = f"{Path(source_ref).name}-{spec.method}" + (f"+{adapter.name}-v{adapter.version}" if adapter else "")

    artifact_id = new_id()

    def commit(session) -> None:
        add_artifact(session, artifact_id, kind="quantized_model", tenant=spec.tenant, name=name, path=rel,
                     sha256=digest, size_bytes=size, lineage=lineage, report=report, job_id=ctx.job_id)

    usage = costs.Usage(prompt_tokens=2 * int(blocks.numel()), wall_seconds=time.perf_counter() - t0,
                        gpu_seconds=(time.perf_counter() - t0) if device.type == "cuda" else 0.0,
                        model_id=source_ref, adapter_version_id=adapter.id if adapter else None)
    result = {"artifact_id": artifact_id, "path": rel, "sha256": digest, "size_bytes": size, "report": report, "lineage": lineage}
    return Outcome(result=result, usage=usage, commit=commit)


def _bnb_version() -> str:
    import bitsandbytes

    return bitsandbytes.__version__


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
    from transformers import AutoModelForCausalLM

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
    dev = resolve_device(device)
    config = json.loads((path / "config.json").read_text())
    if "quantization_config" not in config:
        return load_causal_lm(str(path), device=str(dev))
    dtype = compute_dtype(dev, get_settings().compute_dtype)
    device_map = "cpu" if dev.type == "cpu" else {"": dev.index or 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map=device_map)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"artifact {artifact.id}: cannot load {artifact.path}: {exc}") from exc
    model.eval()
    tok = load_tokenizer(str(path))
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return LoadedModel(model=model, tokenizer=tok, ref=str(path), device=dev)
