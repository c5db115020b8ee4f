"""Quantize jobs on a tiny random model: artifacts that load for serving, their reports, merge-then-quantize,
and the bad inputs that must be rejected with a clear reason."""

from __future__ import annotations

import math
import shutil
import uuid
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from domain import artifacts, heldout, jobs, quantization
from domain.ledger.db import session_scope
from domain.ledger.models import AdapterAlias, AdapterVersion, Artifact, Job, UsageCost
from domain.models import ModelLoadError, load_causal_lm, model_fingerprint
from domain.paths import data_root, sha256_file
from tests.conftest import add_tenant

REPORT_FIELDS = {
    "size_before_bytes", "size_after_bytes", "compression_ratio", "memory_footprint_before_bytes",
    "memory_footprint_after_bytes", "perplexity_before", "perplexity_after", "kl_divergence", "top1_agreement",
    "tokens_per_s_before", "tokens_per_s_after", "tokens_per_s_ratio", "eval_tokens",
}


def run(kind: str, body: dict) -> dict:
    return jobs.execute(kind, uuid.uuid4().hex, body, worker="test:1")


def artifact(artifact_id: str) -> Artifact:
    with session_scope() as s:
        return s.get(Artifact, artifact_id)


@pytest.fixture
def tenant(sqlite_ledger):
    return add_tenant(sqlite_ledger, "acme")


@pytest.mark.parametrize("method,linear_cls", [("nf4", "Linear4bit"), ("fp4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_quantize_makes_a_servable_artifact_with_its_report(tenant, tiny_model_dir, method, linear_cls):
    out = run("quantize", {"tenant": tenant, "source_model": str(tiny_model_dir), "method": method, "eval_max_tokens": 512})
    assert out["status"] == "succeeded", out
    art = artifact(out["result"]["artifact_id"])
    assert art.kind == "quantized_model" and art.tenant_id == tenant and art.status == "ready"
    assert REPORT_FIELDS <= set(art.report)
    r = art.report
    assert r["method"] == method and r["eval_tokens"] == 2 * 255
    assert r["size_after_bytes"] < r["size_before_bytes"] and r["compression_ratio"] > 1
    assert r["memory_footprint_after_bytes"] < r["memory_footprint_before_bytes"]
    assert math.isfinite(r["perplexity_before"]) and math.isfinite(r["perplexity_after"])
    assert r["kl_divergence"] >= 0 and 0 < r["top1_agreement"] <= 1 and r["tokens_per_s_after"] > 0
    assert art.lineage["source_model"] == str(tiny_model_dir) and len(art.lineage["source_model_hash"]) == 64
    assert art.lineage["adapter_version_id"] is None

    # the artifact loads for serving, quantized, and scores the same held-out text as the job measured
    served = artifacts.load_serving_model(art, device="cpu")
    assert any(type(m).__name__ == linear_cls for m in served.model.modules())
    tok = load_causal_lm(str(tiny_model_dir), device="cpu").tokenizer
    blocks = heldout.token_blocks(tok, heldout.stdlib_text("heldout", 512 * 8), 256, 512)
    assert heldout.perplexity(served.model, blocks).perplexity == pytest.approx(r["perplexity_after"], rel=1e-4)

    with session_scope() as s:
        usage = s.scalar(select(UsageCost).where(UsageCost.job_id == art.created_by_job_id))
    assert usage.prompt_tokens == 2 * 512 and usage.wall_seconds > 0


def test_adapter_loads_on_top_of_a_quantized_artifact(tenant, tiny_model_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    out = run("quantize", {"tenant": tenant, "source_model": str(tiny_model_dir), "method": "nf4", "eval_max_tokens": 256})
    served = artifacts.load_serving_model(artifact(out["result"]["artifact_id"]), device="cpu")
    lora = get_peft_model(load_causal_lm(str(tiny_model_dir), device="cpu").model,
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    before = served.model(ids).logits
    qlora = PeftModel.from_pretrained(served.model, str(tmp_path / "lora"))
    assert not torch.allclose(qlora(ids).logits, before)  # the adapter is really applied on the 4-bit base


def _save_adapter(tenant: str, base_dir, base_hash: str | None = None) -> tuple[str, torch.nn.Module]:
    """A LoRA adapter with non-zero weights recorded as the tenant's champion; returns (version id, merged float model)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(load_causal_lm(str(base_dir), device="cpu").model,
                           LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    rel = "adapters/acme/reviewer-v1"
    model.save_pretrained(data_root() / rel)
    vid = uuid.uuid4().hex
    with session_scope() as s:  # recorded the way domain.adapters.store records versions
        s.add(AdapterVersion(id=vid, tenant_id=tenant, name="reviewer", version=1, base_model_id=str(base_dir),
                             base_model_hash=base_hash or model_fingerprint(str(base_dir)), artifact_path=rel,
                             artifact_sha256=sha256_file(data_root() / rel / "adapter_model.safetensors")))
        s.flush()
        s.add(AdapterAlias(tenant_id=tenant, alias="champion", version_id=vid))
    return vid, model.merge_and_unload()


def test_merge_then_quantize_quantizes_the_merged_float_model(tenant, tiny_model_dir):
    vid, merged = _save_adapter(tenant, tiny_model_dir)
    out = run("quantize", {"tenant": tenant, "adapter": "champion", "method": "int8", "eval_max_tokens": 256})
    assert out["status"] == "succeeded", out
    art = artifact(out["result"]["artifact_id"])
    assert art.lineage["adapter_version_id"] == vid and art.lineage["merged"] is True
    assert art.lineage["source_model"] == str(tiny_model_dir)  # the adapter's base is the default source
    served = artifacts.load_serving_model(art, device="cpu").model
    base = load_causal_lm(str(tiny_model_dir), device="cpu").model
    tok = load_causal_lm(str(tiny_model_dir), device="cpu").tokenizer
    blocks = heldout.token_blocks(tok, heldout.stdlib_text("heldout", 4000), 128, 256)
    # the report's "before" is the merged float model, and the artifact is close to it, not to the bare base
    assert art.report["perplexity_before"] == pytest.approx(heldout.perplexity(merged, heldout.token_blocks(
        tok, heldout.stdlib_text("heldout", 256 * 8), 256, 256)).perplexity, rel=1e-5)
    assert heldout.compare(merged, served, blocks).kl_divergence < 0.1 * heldout.compare(base, served, blocks).kl_divergence


def test_adapter_trained_on_another_base_or_changed_on_disk_fails(tenant, tiny_model_dir):
    _save_adapter(tenant, tiny_model_dir, base_hash="0" * 64)
    out = run("quantize", {"tenant": tenant, "adapter": "champion", "method": "nf4", "eval_max_tokens": 256})
    assert out["status"] == "failed" and out["code"] == "base_model_mismatch", out
    with session_scope() as s:
        s.get(AdapterVersion, s.get(AdapterAlias, (tenant, "champion")).version_id).base_model_hash = \
            model_fingerprint(str(tiny_model_dir))
    (data_root() / "adapters/acme/reviewer-v1/adapter_model.safetensors").write_bytes(b"tampered")
    out = run("quantize", {"tenant": tenant, "adapter": "champion", "method": "nf4", "eval_max_tokens": 256})
    assert out["status"] == "failed" and out["code"] == "adapter_hash_mismatch", out


def test_merge_refuses_quantized_weights(tiny_model_dir, tmp_path):
    nf4 = load_causal_lm(str(tiny_model_dir), device="cpu", quantization_config=quantization.bnb_config("nf4", True, torch.float32))
    with pytest.raises(ValueError, match="quantized weights"):
        quantization.merge_adapter(nf4.model, tmp_path)


def test_serving_refuses_a_changed_or_wrong_artifact(tenant, tiny_model_dir):
    out = run("quantize", {"tenant": tenant, "source_model": str(tiny_model_dir), "method": "fp4", "eval_max_tokens": 256})
    art = artifact(out["result"]["artifact_id"])
    (data_root() / art.path / "config.json").write_text((data_root() / art.path / "config.json").read_text() + " ")
    with pytest.raises(ModelLoadError, match="sha256 mismatch"):
        artifacts.load_serving_model(art)
    art.kind = "adapter"
    with pytest.raises(ModelLoadError, match="not a servable model"):
        artifacts.load_serving_model(art)
    art.kind, art.path = "quantized_model", "../elsewhere"
    with pytest.raises(ModelLoadError):
        artifacts.load_serving_model(art)


def _job(job_id: str) -> Job:
    with session_scope() as s:
        return s.get(Job, job_id)


@pytest.mark.parametrize("body,field,message", [
    ({"source_model": "/nonexistent/model"}, "source_model", "cannot load"),
    ({"adapter": "no-such-alias"}, "adapter", "unknown adapter"),
    ({"method": "gptq"}, "method", "supported here: nf4, fp4, int8"),
    ({"eval_data_path": "empty.txt"}, "eval_data_path", "is empty"),
    ({"eval_data_path": "../outside.txt"}, "eval_data_path", "'..'"),
])
def test_bad_input_is_rejected_naming_the_field(tenant, tiny_model_dir, body, field, message):
    (data_root() / "empty.txt").write_text("x = 1\n")
    out = run("quantize", {"tenant": tenant, "source_model": str(tiny_model_dir), "eval_max_tokens": 256, **body})
    assert out["status"] == "rejected" and out["field"] == field and message in out["error"], out


def test_method_this_platform_cannot_run_names_what_it_can(tenant, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(quantization, "supported_methods", lambda device_type="cpu": ("int8",))
    job_id = uuid.uuid4().hex
    out = jobs.execute("quantize", job_id, {"tenant": tenant, "source_model": str(tiny_model_dir), "method": "nf4"}, "test:1")
    assert out["status"] == "rejected" and out["field"] == "method"
    assert "supported here: int8" in out["error"] and "cpu" in out["error"]
    assert _job(job_id).status == "rejected"


def test_this_cpu_runs_all_three_methods():
    assert quantization.supported_methods("cpu") == ("nf4", "fp4", "int8")


def test_redelivered_job_replaces_its_own_files(tenant, tiny_model_dir):
    job_id = uuid.uuid4().hex
    stale = data_root() / "artifacts" / "quantized" / job_id
    stale.mkdir(parents=True)
    (stale / "leftover.bin").write_bytes(b"x")
    body = {"tenant": tenant, "source_model": str(tiny_model_dir), "method": "nf4", "eval_max_tokens": 256}
    out = jobs.execute("quantize", job_id, body, "test:1")
    assert out["status"] == "succeeded"
    assert not (stale / "leftover.bin").exists() and (stale / "model.safetensors").exists()
    assert not list((data_root() / "artifacts" / "quantized").glob(".*.tmp"))
    shutil.rmtree(stale)


@pytest.mark.slow
def test_nf4_of_the_embedded_smollm2_is_under_035x_fp32_memory_and_still_generates(tenant):
    from domain.config import Settings

    ref = Settings(data_dir=Path(__file__).resolve().parents[2] / ".foundry").base_model_ref()
    if not Path(ref).exists():
        pytest.skip(f"embedded model not prepared at {ref}")
    out = run("quantize", {"tenant": tenant, "source_model": ref, "method": "nf4", "eval_max_tokens": 256})
    assert out["status"] == "succeeded", out
    r = out["result"]["report"]
    assert r["memory_ratio"] <= 0.35 and r["top1_agreement"] > 0.6 and r["kl_divergence"] < 1.0
    served = artifacts.load_serving_model(artifact(out["result"]["artifact_id"]), device="cpu")
    ids = served.tokenizer("def add(a, b):\n", return_tensors="pt").input_ids
    text = served.tokenizer.decode(served.model.generate(ids, max_new_tokens=8, do_sample=False)[0][ids.shape[1]:])
    assert text.strip()
