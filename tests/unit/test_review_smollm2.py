"""The embedded SmolLM2-135M-Instruct serving reviews (slow: a real model on the CPU)."""

from __future__ import annotations

import uuid

import pytest

from domain import jobs
from domain.config import get_settings, reset_settings
from domain.models import load_causal_lm
from domain.review import runtime
from domain.prompting import fit_prompt, shared_prefix_len
from domain.review.batcher import AdapterHandle
from domain.review.runtime import Runtime
from tests.fixtures.review import make_adapter
from tests.conftest import add_tenant

pytestmark = pytest.mark.slow

CODE = ("def average(values):\n    total = 0\n    for v in values:\n        total += v\n"
        "    return total / len(values)\n")


@pytest.fixture(scope="module")
def smollm2():
    ref = get_settings().base_model_ref()
    if not (get_settings().models_dir / "smollm2-135m-instruct" / "model.safetensors").exists():
        pytest.skip("embedded model not prepared: run `foundry prepare-model`")
    return ref


def test_real_review_job(sqlite_ledger, smollm2, monkeypatch):
    monkeypatch.setenv("FOUNDRY_BASE_MODEL", smollm2)
    monkeypatch.setenv("FOUNDRY_DEVICE", "cpu")
    reset_settings()
    add_tenant(sqlite_ledger, "acme")
    out = jobs.execute("review", uuid.uuid4().hex, {"tenant": "acme", "code": CODE, "path": "stats.py",
                                                     "max_new_tokens": 48}, "test:1")
    assert out["status"] == "succeeded", out
    res = out["result"]
    assert res["model_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert 0 < res["completion_tokens"] <= 48 and res["raw_text"].strip() and res["summary"]
    runtime.reset_runtimes()


def test_real_model_mixed_adapter_batch_equals_solo(smollm2, tmp_path):
    loaded = load_causal_lm(smollm2, device="cpu")
    paths = [make_adapter(smollm2, tmp_path / f"a{i}", seed=i, r=16, base_model=loaded.model) for i in range(2)]
    rt = Runtime(loaded, "slow", "smollm2", max_adapters=2)
    slots = [rt.ensure_adapter(AdapterHandle(f"a{i}", lambda p=p: p), {"a0", "a1"}) for i, p in enumerate(paths)]
    codes = [CODE, "import os\nprint(os.listdir('.'))\n", "x = [1, 2, 3]\nprint(x[3])\n"]
    prompts = [fit_prompt(rt.tokenizer, c, None, "python", False, [], context_window=rt.context_window,
                          max_new_tokens=24).input_ids for c in codes]
    prefixes = [shared_prefix_len(rt.tokenizer, p) for p in prompts]
    row_slots = [slots[0], None, slots[1]]
    batched = rt.generate(prompts, row_slots, [24] * 3, prefixes)
    import torch

    with torch.inference_mode():
        alone = [rt._generate_padded([p], [s], [24])[0] for p, s in zip(prompts, row_slots)]
    assert batched == alone
