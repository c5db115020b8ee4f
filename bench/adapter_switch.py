"""Adapter switching: the cold first review vs a warm review, and the time to swap a rank-16 adapter.

On the embedded SmolLM2-135M-Instruct, through Foundry's review runtime (domain/review/runtime.py):
- cold: the first review in a fresh process: import the ML stack (a worker imports it on its first
  review job), load the base model, load the tenant's adapter, run one review (prompt + greedy
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def review(rt, code: str, path: str, handle, max_new: int) -> float:
    """One review on the runtime as handle_review runs it: fit the prompt, one batch row, wait."""
    from domain.review.batcher import GenerationRequest

    t0 = time.perf_counter()
    ids, prefix = fitted_prompt(rt, code, path, max_new)
    rt.batcher.submit(GenerationRequest(ids, max_new, handle, prefix)).result()
    return time.perf_counter() - t0


def fitted_prompt(rt, code: str, path: str, max_new: int) -> tuple[list[int], int]:
    """The review prompt's token ids as handle_review fits them, and the length of its shared prefix."""
    from domain.prompting import fit_prompt, shared_prefix_len

    with rt.tokenizer_lock:
        fitted = fit_prompt(rt.tokenizer, code, path, None, False, [], context_window=rt.context_window,
                            max_new_tokens=max_new)
        return fitted.input_ids, shared_prefix_len(rt.tokenizer, fitted.input_ids)


def cold_child(ref: str, adapter: str, device: str, max_new: int, threads: int | None) -> None:
    """The first review in a fresh worker process: the ML stack is imported on the first review job
    (handlers load lazily), then the base model and the adapter are loaded, then the review runs."""
    t0 = time.perf_counter()
    import torch

    if threads:
        torch.set_num_threads(threads)
    from domain.models import load_causal_lm
    from domain.review.batcher import AdapterHandle, Batcher
    from domain.review.runtime import Runtime, model_id_for
    from bench.review_batching import stdlib_functions

    t_import = time.perf_counter() - t0
    loaded = load_causal_lm(ref, device=device)
    t_base = time.perf_counter() - t0 - t_import
    rt = Runtime(loaded, "cold", model_id_for(ref), max_adapters=2)
    rt.batcher = Batcher(rt)
    handle = AdapterHandle("a0", lambda: Path(adapter))
    t1 = time.perf_counter()
    rt.ensure_adapter(handle)
    t_adapter = time.perf_counter() - t1
    path, code = stdlib_functions(1)[0]
    t_review = review(rt, code, path, handle, max_new)
    print(json.dumps({"cold_s": time.perf_counter() - t0, "import_s": t_import, "base_load_s": t_base,
                      "adapter_load_s": t_adapter, "review_s": t_review}))


def profile_review(rt, code: str, path: str, handle, max_new: int) -> dict:
    """One warm review's generation (``Runtime.generate``, the call the batcher makes) under torch.profiler:
    wall time against device busy time and kernel launches tells a launch-bound decode (many small kernels,
    the GPU mostly idle) from a compute-bound one; the top operators by host time say which layer of the stack
    (PEFT, attention, sampling) to work on."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = rt.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    ids, prefix = fitted_prompt(rt, code, path, max_new)
    slot = rt.ensure_adapter(handle)
    before = dict(rt.timings)
    # the batcher thread's call, made here: the profiler records the thread that starts it
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        rt.generate([ids], [slot], [max_new], prefix_lens=[prefix])
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    steps = int(rt.timings["decode_steps"] - before.get("decode_steps", 0)) or max_new
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    device_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events) if cuda else 0
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    out = {"wall_ms": wall * 1000, "decode_steps": steps, "ms_per_step": wall * 1000 / steps,
           "prefill_ms": (rt.timings["prefill_s"] - before.get("prefill_s", 0)) * 1000,
           "decode_ms": (rt.timings["decode_s"] - before.get("decode_s", 0)) * 1000,
           "device_busy_ms": device_us / 1000, "kernel_launches": launches,
           "launches_per_step": launches / steps if launches else None,
           "top_host_ops": [{"op": e.key, "calls": e.count, "self_host_ms": e.self_cpu_time_total / 1000}
                            for e in top]}
    busy = f", device busy {out['device_busy_ms']:.1f} ms ({out['device_busy_ms'] / out['wall_ms']:.0%}), " \
           f"{launches} kernel launches ({out['launches_per_step']:.0f} a step)" if cuda else ""
    print(f"profile: one warm review {out['wall_ms']:.1f} ms, {steps} decode steps, {out['ms_per_step']:.1f} ms a "
          f"step (prefill {out['prefill_ms']:.1f} ms, decode {out['decode_ms']:.1f} ms){busy}", flush=True)
    for row in out["top_host_ops"]:
        print(f"  {row['self_host_ms']:9.2f} ms host  {row['calls']:6d} calls  {row['op']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="base model id/path (default: the embedded SmolLM2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--swaps", type=int, default=20)
    ap.add_argument("--warm-runs", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--cold-child", metavar="ADAPTER_DIR", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="8 new tokens, 8 swaps, 1 warm run")
    ap.add_argument("--profile", action="store_true",
                    help="profile one more warm review (torch.profiler): where a decode step's time goes")
    from bench import _shapes

    _shapes.add_option(ap)
    args = ap.parse_args()
    if args.quick:
        args.max_new_tokens, args.swaps, args.warm_runs = 8, 8, 1

    if args.cold_child:
        cold_child(args.model, args.cold_child, args.device, args.max_new_tokens, args.threads)
        return
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from bench.review_batching import base_ref, stdlib_functions
    from domain.models import load_causal_lm
    from domain.review.batcher import AdapterHandle, Batcher
    from domain.review.runtime import Runtime, model_id_for
    from tests.fixtures.review import make_adapter

    ref, mode = _shapes.model_for(args, lambda: base_ref(args.model))
    print(f"mode: {mode}", flush=True)
    path, code = stdlib_functions(1)[0]
    with tempfile.TemporaryDirectory() as tmp:
        maker = load_causal_lm(ref, device="cpu").model
        n_adapters = 4 + min(args.swaps, 8)
        paths = [make_adapter(ref, Path(tmp) / f"a{i}", seed=i, r=16, target_modules=TARGETS, base_model=maker)
                 for i in range(n_adapters)]
        del maker
        handles = [AdapterHandle(f"a{i}", lambda p=p: p) for i, p in enumerate(paths)]

        # cold: a fresh process, nothing imported or resident
        child = [sys.executable, str(Path(__file__).resolve()), "--cold-child", str(paths[0]), "--model", ref,
                 "--device", args.device, "--max-new-tokens", str(args.max_new_tokens)]
        if args.threads:
            child += ["--threads", str(args.threads)]
        done = subprocess.run(child, capture_output=True, text=True, check=True, cwd=ROOT)
        cold_run = json.loads(done.stdout.strip().splitlines()[-1])
        cold = cold_run["cold_s"]
        print(f"cold first review in a fresh process: {cold:.2f} s (imports {cold_run['import_s']:.2f} s, "
              f"base load {cold_run['base_load_s']:.2f} s, adapter load {cold_run['adapter_load_s']:.3f} s, "
              f"review {cold_run['review_s']:.2f} s)", flush=True)
        t_load = time.perf_counter()
        rt = Runtime(load_causal_lm(ref, device=args.device), "bench", model_id_for(ref), max_adapters=2)
        rt.batcher = Batcher(rt)
        rt.ensure_adapter(handles[0])
        t_first = time.perf_counter()
        review(rt, code, path, handles[0], args.max_new_tokens)  # this process's first review: not timed
        print(f"this process: base + adapter load {t_first - t_load:.2f} s, first review (not timed) "
              f"{time.perf_counter() - t_first:.2f} s", flush=True)

        # warm: same adapter, resident model
        loads_before = rt.stats["adapter_loads"] + rt.stats["hotswaps"]
        warm_runs = [review(rt, code, path, handles[0], args.max_new_tokens) for _ in range(args.warm_runs)]
        warm = statistics.median(warm_runs)
        loads_during_warm = rt.stats["adapter_loads"] + rt.stats["hotswaps"] - loads_before
        print(f"warm review: {warm:.2f} s (median of {len(warm_runs)}; model loads 0, adapter loads {loads_during_warm})",
              flush=True)
        profile = profile_review(rt, code, path, handles[0], args.max_new_tokens) if args.profile else None

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
    result = {"benchmark": "adapter_switch", "mode": mode, "model": model_id_for(ref), "device": args.device, "lora_rank": 16,
              "target_modules": list(TARGETS), "max_new_tokens": args.max_new_tokens,
              "cold_first_review_s": cold, "cold_parts_s": cold_run, "warm_review_s": warm, "warm_runs_s": warm_runs,
              "adapter_loads_during_warm": loads_during_warm, "base_loads_during_warm": 0,
              "hotswap_ms_median": swap_ms, "hotswap_ms": [s * 1000 for s in swaps],
              "set_adapter_ms_median": set_ms, "load_adapter_ms_median": load_ms,
              "hotswap_target_ms": 10, "profile": profile, "ratio": ratio}
    out = ROOT / "bench" / "results" / _shapes.result_name("adapter_switch", args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"hot-swap of a rank-16 adapter: {swap_ms:.1f} ms median ({len(swaps)} swaps; target ≤ 10 ms); "
          f"set_adapter {set_ms:.1f} ms; load_adapter into a new slot {load_ms:.0f} ms")
    print(f"cold first review {cold:.2f} s vs warm review {warm:.2f} s ({mode})")
    print(f"ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
