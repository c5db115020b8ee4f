"""The vLLM review engine on the CPU (vllm-cpu): one batch of two LoRA adapters and the bare base gives the rows
Foundry's own engine gives greedily for the same requests (fp32 on both), and a review job on it writes the same
review, usage and ledger rows. Not in the default suite: it needs vLLM in a venv of its own (docs/engines.md)
and starts one vLLM engine (about 45 s on 2 cores).

    LD_PRELOAD=/work/vllm-venv/lib/libiomp5.so VLLM_CPU_KVCACHE_SPACE=1 \\
        /work/vllm-venv/bin/python -m pytest -q -m vllm tests/vllm
"""

from __future__ import annotations

import uuid

import pytest

pytest.importorskip("vllm")

from sqlalchemy import select  # noqa: E402

from domain import jobs  # noqa: E402
from domain.config import reset_settings  # noqa: E402
from domain.ledger.db import session_scope  # noqa: E402
from domain.ledger.models import Review, UsageCost  # noqa: E402
from domain.models import load_causal_lm  # noqa: E402
from domain.prompting import fit_prompt, shared_prefix_len  # noqa: E402
from domain.review import runtime  # noqa: E402
from domain.review.batcher import AdapterHandle, Batcher, GenerationRequest  # noqa: E402
from domain.review.decoding import DecodeControl  # noqa: E402
from tests.conftest import add_tenant  # noqa: E402
from tests.fixtures.review import make_adapter, register_adapter, save_lively_tiny_model  # noqa: E402

pytestmark = pytest.mark.vllm

CODES = [("calc.py", "def add(a, b):\n    return a - b\n\n\ndef div(a, b):\n    return a / b\n"),
         ("io.py", "import json\n\n\ndef load(path):\n    return json.load(open(path))\n")]
ENV = {"FOUNDRY_DEVICE": "cpu", "FOUNDRY_REVIEW_ENGINE": "vllm", "FOUNDRY_VLLM_ENFORCE_EAGER": "1",
       "FOUNDRY_REVIEW_BATCH_WAIT_MS": "300"}


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """(base folder, adapters, the vLLM runtime from get_runtime, Foundry's runtime on the same model)."""
    root = tmp_path_factory.mktemp("vllm-engine")
    base = save_lively_tiny_model(root / "base", hidden=128)  # heads of 32: vLLM's CPU attention needs >= 32
    base_model = load_causal_lm(str(base), device="cpu").model
    adapters = {f"v{i}": make_adapter(base, root / f"a{i}", seed=i, base_model=base_model) for i in (1, 2)}
    adapters["wide"] = make_adapter(base, root / "wide", seed=5, r=32, base_model=base_model)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**ENV, "FOUNDRY_BASE_MODEL": str(base)}.items():
            mp.setenv(k, v)
        reset_settings()
        vrt = runtime.get_runtime()
        own = runtime.Runtime(load_causal_lm(str(base), device="cpu"), "foundry", "tiny")
        own.batcher = Batcher(own, max_batch=8, wait_s=0.3)
        yield base, adapters, vrt, own
        own.batcher.stop()
        runtime.reset_runtimes()
        vrt.close()  # if the last test replaced it, the dead one is no longer in the registry
    reset_settings()


def _requests(rt, adapters, names, max_new=24):
    out = []
    for i, name in enumerate(names):
        path, code = CODES[i % len(CODES)]
        with rt.tokenizer_lock:
            fitted = fit_prompt(rt.tokenizer, code, path, None, False, [], context_window=rt.context_window,
                                max_new_tokens=max_new)
            prefix = shared_prefix_len(rt.tokenizer, fitted.input_ids)
        control = DecodeControl(no_repeat_ngram=3) if i % 2 else None
        h = AdapterHandle(name, lambda n=name: adapters[n]) if name else None
        out.append(GenerationRequest(fitted.input_ids, max_new, h, prefix, control=control))
    return out


def _run_one_batch(rt, reqs):
    before = len(rt.batcher.batch_sizes)
    futures = [rt.batcher.submit(r) for r in reqs]
    gens = [f.result(timeout=300) for f in futures]
    assert rt.batcher.batch_sizes[before:] == [len(reqs)], "the requests must run as one generate call"
    return gens


def test_one_mixed_batch_equals_foundrys_own_rows(engines):
    _, adapters, vrt, own = engines
    assert type(vrt).__name__ == "VllmRuntime" and vrt.device.type == "cpu"
    names = ["v1", None, "v2", "v2", "v1", None]  # both codes under each adapter and the base
    ours = _run_one_batch(own, _requests(own, adapters, names))
    plain = [g.token_ids for g in ours]
    stop_at = plain[2][6]  # a stop rule on row 2: it ends the first time it writes this token
    reqs = {}
    for key, rt in (("own", own), ("vllm", vrt)):
        reqs[key] = _requests(rt, adapters, names)
        reqs[key][2].control = DecodeControl(stop=lambda h: h[-1] == stop_at)
    assert [r.input_ids for r in reqs["own"]] == [r.input_ids for r in reqs["vllm"]]  # same tokenizer, same prompts
    ours = _run_one_batch(own, reqs["own"])
    theirs = _run_one_batch(vrt, reqs["vllm"])

    assert [g.token_ids for g in theirs] == [g.token_ids for g in ours]
    assert [g.text for g in theirs] == [g.text for g in ours]
    assert [(g.prompt_tokens, g.completion_tokens, g.batch_size, g.batch_adapters) for g in theirs] == \
        [(g.prompt_tokens, g.completion_tokens, g.batch_size, g.batch_adapters) for g in ours]
    rows = [g.token_ids for g in theirs]
    assert rows[2][-1] == stop_at and stop_at not in rows[2][:-1]  # the stop rule, applied after generation
    assert len(rows[0]) == 24 and len(set(rows[0])) > 5, "the model must produce varied tokens, or equality proves nothing"
    assert len({tuple(rows[i]) for i in (0, 2, 1)}) == 3, "the same prompt gives other tokens per adapter"
    for row in (rows[1], rows[3], rows[5]):  # the n-gram ban ran inside vLLM's sampler
        grams = [tuple(row[i:i + 3]) for i in range(len(row) - 2)]
        assert len(grams) == len(set(grams))
    assert vrt.stats["rows"] >= len(names)


def test_adapters_keep_their_int_id_a_too_wide_one_fails_alone_and_evicted_ones_come_back(engines, monkeypatch):
    _, adapters, vrt, own = engines
    names = ["v1", "wide", None]
    gens = [f.exception(timeout=300) or f.result() for f in map(vrt.batcher.submit, _requests(vrt, adapters, names, 8))]
    assert isinstance(gens[1], ValueError) and "FOUNDRY_VLLM_MAX_LORA_RANK=16" in str(gens[1])
    assert [len(gens[0].token_ids), len(gens[2].token_ids)] == [8, 8]

    ids, evictions = dict(vrt._lora_ids), vrt.stats["evictions"]
    assert set(ids) == {"v1", "v2"} and len(set(ids.values())) == 2  # the too-wide adapter got no id
    monkeypatch.setattr(vrt, "capacity", 1)  # one adapter at a time in vLLM
    vrt.batcher.call(lambda: vrt._make_room(set())).result()  # removes both from vLLM (on the model thread)
    assert not vrt._loras
    for name in ("v2", "v1"):  # v1 evicts v2, then comes back from its folder under its old id
        [gen] = _run_one_batch(vrt, _requests(vrt, adapters, [name], 8))
        [ref] = _run_one_batch(own, _requests(own, adapters, [name], 8))
        assert gen.token_ids == ref.token_ids
    assert vrt.stats["evictions"] == evictions + 3 and vrt._lora_ids == ids and set(vrt._loras) == {"v1"}


def test_a_review_job_on_vllm_writes_the_rows_foundrys_engine_writes(engines, ledger, tmp_path, monkeypatch):
    base, _, vrt, _ = engines
    add_tenant(ledger, "acme")
    rel = "adapters/acme/v1"
    make_adapter(base, tmp_path / rel, seed=1)
    vid = register_adapter("acme", tmp_path, rel, str(base), url=ledger)
    body = {"tenant": "acme", "code": CODES[0][1], "path": CODES[0][0], "max_new_tokens": 16}

    results, rows_before = {}, vrt.stats["rows"]
    for engine in ("vllm", "foundry"):
        monkeypatch.setenv("FOUNDRY_REVIEW_ENGINE", engine)
        reset_settings()
        job_id = uuid.uuid4().hex
        out = jobs.execute("review", job_id, body, "test-worker:1")
        assert out["status"] == "succeeded", out
        with session_scope() as s:
            review = s.scalar(select(Review).where(Review.job_id == job_id))
            usage = s.scalar(select(UsageCost).where(UsageCost.job_id == job_id))
            results[engine] = (out["result"], review.raw_text, review.findings, review.adapter_version_id,
                               (usage.prompt_tokens, usage.completion_tokens, usage.adapter_version_id, usage.kind))
    assert vrt.stats["rows"] == rows_before + 1  # the vLLM job's row ran on the vLLM engine, the other one did not
    (v_res, *v_rows), (f_res, *f_rows) = results["vllm"], results["foundry"]
    assert v_rows == f_rows
    keep = ("raw_text", "summary", "findings", "prompt_tokens", "completion_tokens", "adapter_version_id", "model_id")
    assert {k: v_res[k] for k in keep} == {k: f_res[k] for k in keep}
    assert v_res["adapter_version_id"] == vid and v_res["completion_tokens"] > 0


def test_a_dead_engine_fails_as_transient_and_the_next_review_starts_a_new_one(engines):
    import os
    import signal

    from domain.errors import TransientError

    _, adapters, vrt, own = engines
    reset_settings()  # the module's environment: FOUNDRY_REVIEW_ENGINE=vllm
    assert runtime.get_runtime() is vrt
    engine_process = vrt.llm.llm_engine.engine_core.resources.engine_manager.processes[0]
    os.kill(engine_process.pid, signal.SIGKILL)  # the engine process this module started
    engine_process.join(30)
    failed = vrt.batcher.submit(_requests(vrt, adapters, ["v1"], 4)[0]).exception(timeout=120)
    assert isinstance(failed, TransientError) and failed.code == "engine_dead"

    fresh = runtime.get_runtime()  # a new engine (another start of ~45 s)
    assert fresh is not vrt
    [gen] = _run_one_batch(fresh, _requests(fresh, adapters, ["v2"], 8))
    [ref] = _run_one_batch(own, _requests(own, adapters, ["v2"], 8))
    assert gen.token_ids == ref.token_ids
