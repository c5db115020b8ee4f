"""The review runtime: resident base, adapters in an LRU of PEFT slots (hot-swap / delete), mixed-adapter
batches whose rows equal the same request run alone, and the batcher that forms those batches."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from domain.models import load_causal_lm
from domain.review.batcher import AdapterHandle, Batcher, GenerationRequest
from domain.review.runtime import Runtime
from tests.fixtures.review import make_adapter, save_lively_tiny_model


@pytest.fixture(scope="module")
def lively(tmp_path_factory):
    root = tmp_path_factory.mktemp("review-runtime")
    base = save_lively_tiny_model(root / "base")
    base_model = load_causal_lm(str(base), device="cpu").model
    adapters = {f"v{i}": make_adapter(base, root / f"a{i}", seed=i, base_model=base_model) for i in (1, 2, 3)}
    adapters["wide"] = make_adapter(base, root / "wide", seed=9, r=8, base_model=base_model)  # not hot-swappable
    return base, adapters


def new_runtime(base: Path, batch_size: int = 8, batch_wait_s: float = 0.02, **kw) -> Runtime:
    rt = Runtime(load_causal_lm(str(base), device="cpu"), "test", "tiny", **kw)
    rt.batcher = Batcher(rt, max_batch=batch_size, wait_s=batch_wait_s)
    return rt


def handle(adapters: dict, name: str) -> AdapterHandle:
    return AdapterHandle(name, lambda: adapters[name])


PROMPTS = ["def add(a, b):\n    return a - b\n", "import json\n", "class Parser:\n    def parse(self, text):\n        pass\n",
           "x = [i for i in range(10)]\nprint(x)\n"]


def encode(rt: Runtime, text: str) -> list[int]:
    return rt.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_mixed_adapter_batch_rows_equal_solo_runs(lively):
    base, adapters = lively
    rt = new_runtime(base, max_adapters=4)
    names = ["v1", None, "v3", "v2", "v1", None]
    prompts = [encode(rt, PROMPTS[i % len(PROMPTS)]) for i in range(len(names))]
    slots = [rt.ensure_adapter(handle(adapters, n), set(filter(None, names))) if n else None for n in names]
    limits = [12, 12, 12, 12, 7, 12]  # rows may ask for different lengths

    batched = rt.generate(prompts, slots, limits)
    solo = [rt.generate([p], [s], [m])[0] for p, s, m in zip(prompts, slots, limits)]
    with torch.inference_mode():  # the same request through plain HF generate, alone
        hf_alone = [rt._generate_padded([p], [s], [m])[0] for p, s, m in zip(prompts, slots, limits)]

    assert batched == solo == hf_alone  # hf_alone: PEFT's own adapter_names path, not the fused one
    assert rt.stats["padded_batches"] == 0  # the prefill-then-decode path ran, not the fallback
    assert rt.stats["fused_lora_batches"] >= 1 and rt.stats["peft_lora_batches"] == 0

    # a shared prefix (the system prompt) computed once per adapter and reused gives the same tokens
    prefix = encode(rt, "<|im_start|>system\nYou review code.<|im_end|>\n")
    with_prefix = [prefix + p for p in prompts]
    plain = rt.generate(with_prefix, slots, limits)
    reused = rt.generate(with_prefix, slots, limits, [len(prefix)] * len(prompts))
    assert reused == plain and rt.stats["prefix_hits"] == len(prompts)
    assert len(rt._prefix_cache) == len(set(slots))  # one per adapter (and the base)
    assert all(len(row) == m for row, m in zip(batched, limits))  # the tiny model never emits its end token
    assert len(set(batched[0])) > 3, "the test model must produce varied tokens, or equality proves nothing"
    # the adapters matter: the same prompt gives different outputs per adapter
    same_prompt = encode(rt, PROMPTS[0])
    outs = rt.generate([same_prompt] * 4, [None, *(rt.slots[v] for v in ("v1", "v2", "v3"))], [10] * 4)
    assert len({tuple(o) for o in outs}) == 4


def test_fused_decoding_mixes_ranks_and_falls_back_to_peft_when_unsupported(lively, monkeypatch):
    from domain.review import mixed_lora

    base, adapters = lively
    rt = new_runtime(base, max_adapters=4)
    names = ["wide", "v1", None, "v2"]  # rank 8 beside the others: zero-padded to one stack
    prompts = [encode(rt, PROMPTS[i]) for i in range(len(names))]
    slots = [rt.ensure_adapter(handle(adapters, n), set(filter(None, names))) if n else None for n in names]
    fused = rt.generate(prompts, slots, [10] * 4)
    assert rt.stats["fused_lora_batches"] == 1
    monkeypatch.setattr(mixed_lora.MixedLoRA, "supported", lambda self, names: False)
    peft = rt.generate(prompts, slots, [10] * 4)
    assert rt.stats["peft_lora_batches"] == 1
    assert fused == peft
    layers = mixed_lora.MixedLoRA(rt.model).layers
    assert layers and all("forward" not in vars(layer) for layer in layers)  # patches are removed after a batch


def test_lru_bound_hotswap_and_delete_free_slots(lively):
    base, adapters = lively
    rt = new_runtime(base, max_adapters=2)
    prompt = encode(rt, PROMPTS[2])
    for name in ("v1", "v2"):
        rt.ensure_adapter(handle(adapters, name))
    assert rt.stats["adapter_loads"] == 2

    rt.ensure_adapter(handle(adapters, "v1"))  # touch v1: v2 becomes least recently used
    slot = rt.ensure_adapter(handle(adapters, "v3"))  # same LoRA config as v2: hot-swapped into its slot
    assert list(rt.slots) == ["v1", "v3"]
    assert rt.stats["hotswaps"] == 1 and rt.stats["adapter_loads"] == 2 and rt.stats["evictions"] == 1
    swapped = rt.generate([prompt], [slot], [10])[0]

    fresh = new_runtime(base, max_adapters=2)  # v3 loaded directly: the hot-swapped slot must behave the same
    assert fresh.generate([prompt], [fresh.ensure_adapter(handle(adapters, "v3"))], [10])[0] == swapped

    rt.ensure_adapter(handle(adapters, "wide"))  # rank 8: not hot-swappable, v1's slot is deleted
    assert list(rt.slots) == ["v3", "wide"]
    assert len(rt.model.peft_config) == 2, "evicted adapters must leave the model"
    lora_params = [n for n, _ in rt.model.named_parameters() if "lora_" in n]
    assert lora_params and all(any(s in n for s in rt.slots.values()) for n in lora_params)
    assert rt.stats["evictions"] == 2


def test_only_one_slot_still_switches(lively):
    base, adapters = lively
    rt = new_runtime(base, max_adapters=1)
    prompt = encode(rt, PROMPTS[1])
    expected = {}
    for name in ("v1", "wide", "v2", "v1"):
        slot = rt.ensure_adapter(handle(adapters, name))
        out = rt.generate([prompt], [slot], [8])[0]
        assert expected.setdefault(name, out) == out
        assert list(rt.slots) == [name] and len(rt.model.peft_config) == 1


def test_batcher_forms_one_batch_from_concurrent_threads(lively):
    base, adapters = lively
    rt = new_runtime(base, max_adapters=4, batch_size=4, batch_wait_s=0.5)
    names = ["v1", "v2", None, "v3"]
    prompts = [encode(rt, p) for p in PROMPTS]
    results: dict[int, object] = {}
    start = threading.Barrier(len(names))

    def job(i: int) -> None:
        start.wait()
        req = GenerationRequest(prompts[i], 9, handle(adapters, names[i]) if names[i] else None)
        results[i] = rt.batcher.submit(req).result(timeout=60)

    threads = [threading.Thread(target=job, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rt.batcher.stop()

    assert rt.batcher.batch_sizes == [4]
    for i, name in enumerate(names):
        alone = rt.generate([prompts[i]], [rt.slots[name] if name else None], [9])[0]
        assert results[i].token_ids == alone
        assert results[i].completion_tokens == len(alone) and results[i].prompt_tokens == len(prompts[i])
        assert results[i].batch_size == 4 and results[i].batch_adapters == 4
        assert results[i].gpu_seconds == 0.0  # CPU: no GPU time is charged


def test_other_model_work_runs_on_the_batcher_thread_between_batches(lively):
    base, adapters = lively
    rt = new_runtime(base, max_adapters=2, batch_size=2, batch_wait_s=0.3)
    prompt = encode(rt, PROMPTS[0])
    first = rt.batcher.submit(GenerationRequest(prompt, 5, handle(adapters, "v1")))
    where = rt.batcher.call(lambda: (threading.current_thread().name, len(rt.batcher.batch_sizes)))
    second = rt.batcher.submit(GenerationRequest(prompt, 5, None))

    def boom():
        raise ValueError("bad call")

    failed = rt.batcher.call(boom)
    assert where.result(timeout=60)[0] == "foundry-review-batcher"
    with pytest.raises(ValueError, match="bad call"):
        failed.result(timeout=60)
    assert first.result(timeout=60).completion_tokens == 5 and second.result(timeout=60).completion_tokens == 5
    assert rt.batcher.batch_sizes == [2]  # the call waited for the batch being formed; it did not split it
    assert where.result()[1] == 1
    rt.batcher.stop()


def test_batch_holds_at_most_max_adapters_and_bad_adapter_fails_alone(lively):
    base, adapters = lively
    rt = new_runtime(base, max_adapters=2, batch_size=8, batch_wait_s=0.3)
    prompt = encode(rt, PROMPTS[0])

    def broken():
        raise RuntimeError("adapter file corrupt")

    reqs = [GenerationRequest(prompt, 5, handle(adapters, "v1")),
            GenerationRequest(prompt, 5, AdapterHandle("bad", broken)),
            GenerationRequest(prompt, 5, handle(adapters, "v2")),  # a third adapter: waits for the next batch
            GenerationRequest(prompt, 5, None)]
    futures = [rt.batcher.submit(r) for r in reqs]
    with pytest.raises(RuntimeError, match="corrupt"):
        futures[1].result(timeout=60)
    outs = [futures[i].result(timeout=60) for i in (0, 2, 3)]
    rt.batcher.stop()
    assert all(o.completion_tokens == 5 for o in outs)
    assert sorted(rt.batcher.batch_sizes) == [1, 2]  # {v1, base} after bad failed; then {v2}
    assert len(rt.slots) <= 2


def test_get_runtime_keeps_the_base_model_resident(lively, monkeypatch, tmp_path):
    from domain.config import get_settings, reset_settings
    from domain.review import runtime

    base, _ = lively
    monkeypatch.setenv("FOUNDRY_BASE_MODEL", str(base))
    monkeypatch.setenv("FOUNDRY_DEVICE", "cpu")
    monkeypatch.setenv("FOUNDRY_DATA_DIR", str(tmp_path))
    reset_settings()
    runtime.reset_runtimes()
    try:
        first = runtime.get_runtime()
        second = runtime.get_runtime(get_settings())
        assert first is second
        assert runtime.BASE_LOADS[first.key] == 1
        assert first.context_window == 512 and first.model_id == str(base)
        assert next(first.model.parameters()).dtype == torch.float32
    finally:
        runtime.reset_runtimes()
        reset_settings()


def test_repetition_control_and_stop_rule_keep_batched_rows_equal_to_solo_rows(lively):
    from domain.review.decoding import DecodeControl, banned_tokens

    base, adapters = lively
    rt = new_runtime(base, max_adapters=4)
    names = ["v1", None, "v2", None]
    prompts = [encode(rt, PROMPTS[i % len(PROMPTS)]) for i in range(len(names))]
    slots = [rt.ensure_adapter(handle(adapters, n), set(filter(None, names))) if n else None for n in names]
    limits = [24] * len(names)
    plain = rt.generate(prompts, slots, limits)
    stop_at = plain[2][5]  # row 2 stops at the first time it writes this token
    controls = [DecodeControl(no_repeat_ngram=2), None, DecodeControl(no_repeat_ngram=2, stop=lambda h: h[-1] == stop_at),
                DecodeControl(no_repeat_ngram=3)]

    batched = rt.generate(prompts, slots, limits, controls=controls)
    solo = [rt.generate([p], [s], [m], controls=[c])[0] for p, s, m, c in zip(prompts, slots, limits, controls)]
    assert batched == solo
    assert batched[1] == plain[1]  # a row without a control is plain greedy, whatever its neighbours do
    for row, n in ((batched[0], 2), (batched[3], 3)):
        grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
        assert len(grams) == len(set(grams)), "an n-gram repeated despite the ban"
    assert batched[2][-1] == stop_at and stop_at not in batched[2][:-1] and len(batched[2]) <= 6
    assert any(len(set(tuple(p[i:i + 2]) for i in range(len(p) - 1))) < len(p) - 1 for p in plain), \
        "the uncontrolled model must repeat some bigram, or the ban proves nothing"
    assert banned_tokens([1, 2, 3, 1, 2], 3) == {3} and banned_tokens([1, 2], 3) == set()


def test_evict_drops_an_adapter_and_the_last_one_leaves_the_bare_base(lively):
    """``Runtime.evict``: the slot, its PEFT adapter and its parameters go; evicting the last adapter unwraps the
    model to the base (no LoRA layers left), and the next adapter loads and generates as in a fresh runtime."""
    base, adapters = lively
    rt = new_runtime(base, max_adapters=3)
    prompt = encode(rt, PROMPTS[0])
    bare = rt.generate([prompt], [None], [10])[0]
    slots = {name: rt.ensure_adapter(handle(adapters, name)) for name in ("v1", "v2")}
    assert rt.evict("v1") and not rt.evict("v1") and not rt.evict("never-loaded")
    assert list(rt.slots) == ["v2"] and slots["v1"] not in rt.model.peft_config
    assert not any(slots["v1"] in n for n, _ in rt.model.named_parameters())
    fresh = new_runtime(base)
    v2_alone = fresh.generate([prompt], [fresh.ensure_adapter(handle(adapters, "v2"))], [10])[0]
    assert rt.generate([prompt], [slots["v2"]], [10])[0] == v2_alone != bare  # v2 untouched by v1's eviction
    assert rt.evict("v2") and rt.slots == {} and rt.stats["evictions"] == 2
    assert not any("lora_" in n for n, _ in rt.model.named_parameters()) and rt.model is rt.base
    assert rt.generate([prompt], [None], [10])[0] == bare
    slot = rt.ensure_adapter(handle(adapters, "v3"))
    fresh = new_runtime(base)
    v3_alone = fresh.generate([prompt], [fresh.ensure_adapter(handle(adapters, "v3"))], [10])[0]
    assert rt.generate([prompt], [slot], [10])[0] == v3_alone


def test_a_batch_of_one_adapter_runs_without_a_row_mask_and_equals_peft(lively, monkeypatch):
    """Rows that all use one adapter skip the mask multiply (every column is theirs): same tokens as PEFT."""
    from domain.review import mixed_lora

    base, adapters = lively
    rt = new_runtime(base, max_adapters=2)
    slot = rt.ensure_adapter(handle(adapters, "v2"), {"v2"})
    prompts = [encode(rt, PROMPTS[i]) for i in range(3)]
    masks = []

    class Watched(mixed_lora._Rows):
        def __init__(self, *args):
            super().__init__(*args)
            masks.append(self.mask)

    monkeypatch.setattr(mixed_lora, "_Rows", Watched)
    fused = rt.generate(prompts, [slot] * 3, [10] * 3)
    assert masks and all(m is None for m in masks) and rt.stats["fused_lora_batches"] >= 1
    monkeypatch.setattr(mixed_lora.MixedLoRA, "supported", lambda self, names: False)
    assert rt.generate(prompts, [slot] * 3, [10] * 3) == fused
