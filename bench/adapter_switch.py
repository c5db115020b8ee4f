"""Adapter switching: the cold first review vs a warm review, and the time to swap a rank-16 adapter.

On the embedded SmolLM2-135M-Instruct, through Foundry's review runtime (domain/review/runtime.py):
- cold: a fresh runtime: load the base model, load the tenant's adapter, run one review (prompt + greedy
  generation of ``max_new_tokens``);
- warm: the same review again on the resident runtime (no model or adapter load: checked);
- hot-swap: with every adapter slot full, a new rank-16 adapter (q/k/v/o) of the same LoRA config is
  swapped into the least recently used slot from its safetensors file (weights copied in place);
  also reported: ``set_adapter`` between resident adapters (what the naive path does per request) and
  ``load_adapter`` into a new slot (what a swap costs without hot-swapping).
Targets: the warm review loads nothing; hot-swap ≤ 10 ms on CPU.
Headline: ratio = cold first-review time ÷ warm review time.

    python bench/adapter_switch.py [--max-new-tokens 32] [--swaps 20] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.review_batching import base_ref, stdlib_functions  # noqa: E402
from domain.models import load_causal_lm  # noqa: E402
from domain.review.batcher import GenerationRequest  # noqa: E402
from domain.review.prompt import fit_prompt  # noqa: E402
from domain.review.runtime import AdapterHandle, Runtime, model_id_for  # noqa: E402
from domain.review.testing import make_adapter  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def review(rt: Runtime, code: str, path: str, handle: AdapterHandle, max_new: int) -> float:
    t0 = time.perf_counter()
    with rt.tokenizer_lock:
        fitted = fit_prompt(rt.tokenizer, code, path, None, False, [], context_window=rt.context_window,
                            max_new_tokens=max_new)
    rt.batcher.submit(GenerationRequest(fitted.input_ids, max_new, handle)).result()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="base model id/path (default: the embedded SmolLM2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--swaps", type=int, default=20)
    ap.add_argument("--warm-runs", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--quick", action="store_true", help="8 new tokens, 8 swaps, 1 warm run")
    args = ap.parse_args()
    if args.quick:
        args.max_new_tokens, args.swaps, args.warm_runs = 8, 8, 1
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    ref = base_ref(args.model)
    path, code = stdlib_functions(1)[0]
    with tempfile.TemporaryDirectory() as tmp:
        maker = load_causal_lm(ref, device="cpu").model
        n_adapters = 4 + min(args.swaps, 8)
        paths = [make_adapter(ref, Path(tmp) / f"a{i}", seed=i, r=16, target_modules=TARGETS, base_model=maker)
                 for i in range(n_adapters)]
        del maker
        handles = [AdapterHandle(f"a{i}", lambda p=p: p) for i, p in enumerate(paths)]

        # cold: nothing resident
        t0 = time.perf_counter()
        loaded = load_causal_lm(ref, device=args.device)
        t_base = time.perf_counter() - t0
        rt = Runtime(loaded, "bench", model_id_for(ref), max_adapters=2, batch_size=8, batch_wait_s=0.02)
        t1 = time.perf_counter()
        rt.ensure_adapter(handles[0])
        t_adapter = time.perf_counter() - t1
        t_first_gen = review(rt, code, path, handles[0], args.max_new_tokens)
        cold = time.perf_counter() - t0
        print(f"cold first review: {cold:.2f} s (base load {t_base:.2f} s, adapter load {t_adapter:.3f} s, "
              f"review {t_first_gen:.2f} s)", flush=True)

        # warm: same adapter, resident model
        loads_before = rt.stats["adapter_loads"] + rt.stats["hotswaps"]
        warm_runs = [review(rt, code, path, handles[0], args.max_new_tokens) for _ in range(args.warm_runs)]
        warm = statistics.median(warm_runs)
        loads_during_warm = rt.stats["adapter_loads"] + rt.stats["hotswaps"] - loads_before
        print(f"warm review: {warm:.2f} s (median of {len(warm_runs)}; model loads 0, adapter loads {loads_during_warm})",
              flush=True)

        # hot-swap: both slots full, each new adapter replaces the least recently used one in place
        rt.ensure_adapter(handles[1])
        swaps = []
        for i in range(args.swaps):
            h = handles[2 + i % (n_adapters - 2)]
            if rt.resident(h.version_id):
                continue
            hs = rt.stats["hotswaps"]
            t = time.perf_counter()
            rt.ensure_adapter(h)
            swaps.append(time.perf_counter() - t)
            assert rt.stats["hotswaps"] == hs + 1, "expected an in-place hot-swap"
        slots = list(rt.slots.values())
        set_times = []
        for i in range(max(args.swaps, 10)):
            t = time.perf_counter()
            rt.model.set_adapter(slots[i % len(slots)])
            set_times.append(time.perf_counter() - t)
        load_times = []
        for i, h in enumerate(handles[:4]):  # a new slot the slow way: new LoRA modules + weights
            t = time.perf_counter()
            rt.model.load_adapter(str(h.locate()), adapter_name=f"extra{i}", is_trainable=False)
            load_times.append(time.perf_counter() - t)
            rt.model.delete_adapter(f"extra{i}")
        rt.batcher.stop()

    swap_ms = statistics.median(swaps) * 1000
    set_ms = statistics.median(set_times) * 1000
    load_ms = statistics.median(load_times) * 1000
    ratio = cold / warm
    result = {"benchmark": "adapter_switch", "model": model_id_for(ref), "device": args.device, "lora_rank": 16,
              "target_modules": list(TARGETS), "max_new_tokens": args.max_new_tokens,
              "cold_first_review_s": cold, "cold_base_load_s": t_base, "cold_adapter_load_s": t_adapter,
              "cold_review_s": t_first_gen, "warm_review_s": warm, "warm_runs_s": warm_runs,
              "adapter_loads_during_warm": loads_during_warm, "base_loads_during_warm": 0,
              "hotswap_ms_median": swap_ms, "hotswap_ms": [s * 1000 for s in swaps],
              "set_adapter_ms_median": set_ms, "load_adapter_ms_median": load_ms,
              "hotswap_target_ms": 10, "ratio": ratio}
    out = ROOT / "bench" / "results" / "adapter_switch.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"hot-swap of a rank-16 adapter: {swap_ms:.1f} ms median ({len(swaps)} swaps; target ≤ 10 ms); "
          f"set_adapter {set_ms:.1f} ms; load_adapter into a new slot {load_ms:.0f} ms")
    print(f"cold first review {cold:.2f} s vs warm review {warm:.2f} s")
    print(f"ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
