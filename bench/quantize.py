"""Benchmark: NF4 / FP4 / INT8 quantize jobs on SmolLM2-135M against the fp32 model, side by side.

For each method one real ``quantize`` job runs (domain.jobs.execute on a throwaway SQLite ledger) and its
recorded report gives, against the fp32 source on the same held-out standard-library tokens: the memory
ratio to fp32 (``get_memory_footprint``), the perplexity delta, the mean per-token KL divergence, the top-1
agreement and the forward-pass tokens/s ratio.

Targets (issue 6): NF4 memory <= 0.35x fp32; INT8 perplexity within 3 % of fp32.
Headline: ``ratio=`` fp32 memory / NF4 memory (larger is better).

    .venv/bin/python bench/quantize.py            # 2048 held-out tokens per method
    .venv/bin/python bench/quantize.py --quick    # 256 tokens, NF4 only (the headline)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def default_model() -> str:
    from domain.config import Settings
    from domain.models import prepare_embedded_model

    ref = Settings().base_model_ref()
    return str(prepare_embedded_model(Path(ref))) if not Path(ref).exists() else ref


def throwaway_ledger() -> str:
    """Point Foundry at a temporary data folder and SQLite ledger with one tenant."""
    from domain.config import reset_settings
    from domain.ledger.db import dispose_all, session_scope
    from domain.ledger.migrate import upgrade
    from domain.ledger.models import Tenant

    data = tempfile.mkdtemp(prefix="foundry-bench-")
    os.environ["FOUNDRY_DATA_DIR"] = data
    os.environ["FOUNDRY_DATABASE_URL"] = f"sqlite:///{data}/ledger.db"
    os.environ.setdefault("FOUNDRY_DEVICE", "cpu")
    reset_settings()
    dispose_all()
    upgrade(os.environ["FOUNDRY_DATABASE_URL"])
    with session_scope() as s:
        s.add(Tenant(id="bench", display_name="bench"))
    return data


def run_job(model: str, method: str, eval_tokens: int) -> dict:
    from domain import jobs

    t0 = time.perf_counter()
    out = jobs.execute("quantize", uuid.uuid4().hex, {"tenant": "bench", "source_model": model, "method": method,
                                                      "eval_max_tokens": eval_tokens}, worker="bench:1")
    if out["status"] != "succeeded":
        raise SystemExit(f"{method} job {out['status']}: {out.get('error')}")
    r = out["result"]["report"]
    return {
        "method": method, "job_seconds": time.perf_counter() - t0,
        "memory_fp32_bytes": r["memory_footprint_before_bytes"], "memory_bytes": r["memory_footprint_after_bytes"],
        "memory_ratio_to_fp32": r["memory_ratio"], "size_on_disk_ratio": 1 / r["compression_ratio"],
        "perplexity_fp32": r["perplexity_before"], "perplexity": r["perplexity_after"],
        "perplexity_delta_pct": r["perplexity_delta_pct"], "kl_divergence": r["kl_divergence"],
        "top1_agreement": r["top1_agreement"], "tokens_per_s_fp32": r["tokens_per_s_before"],
        "tokens_per_s": r["tokens_per_s_after"], "tokens_per_s_ratio": r["tokens_per_s_ratio"],
        "eval_tokens": r["eval_tokens"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model id/path (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--methods", default=None, help="comma-separated, default nf4,fp4,int8 (quick: nf4)")
    ap.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens (default 2048; quick 256)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per method; medians are reported")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", help="result JSON (default bench/results/quantize.json, or quantize-random.json)")
    from bench import _shapes

    _shapes.add_option(ap)
    args = ap.parse_args()
    args.out = args.out or str(ROOT / "bench" / "results" / _shapes.result_name("quantize", args))
    model, mode = _shapes.model_for(args, lambda: args.model or default_model())
    print(f"mode: {mode}" + (" (memory figures only: perplexity, KL and top-1 of random weights mean nothing)"
                             if args.random_weights else ""), flush=True)
    methods = (args.methods or ("nf4" if args.quick else "nf4,fp4,int8")).split(",")
    eval_tokens = args.eval_tokens or (256 if args.quick else 2048)
    throwaway_ledger()

    rows = {}
    for method in methods:
        runs = [run_job(model, method, eval_tokens) for _ in range(args.repeats)]
        rows[method] = {k: (statistics.median(r[k] for r in runs) if isinstance(runs[0][k], float) else runs[0][k])
                        for k in runs[0]}
        r = rows[method]
        print(f"{method:5s} fp32 memory {r['memory_fp32_bytes'] / 1e6:7.1f} MB | {method} memory {r['memory_bytes'] / 1e6:7.1f} MB "
              f"(x{r['memory_ratio_to_fp32']:.3f}) | ppl fp32 {r['perplexity_fp32']:.3f} vs {r['perplexity']:.3f} "
              f"({r['perplexity_delta_pct']:+.2f}%) | KL {r['kl_divergence']:.4f} | top-1 {r['top1_agreement']:.3f} | "
              f"tok/s fp32 {r['tokens_per_s_fp32']:.0f} vs {r['tokens_per_s']:.0f} (x{r['tokens_per_s_ratio']:.2f})", flush=True)

    targets = {}
    if "nf4" in rows:
        targets["nf4_memory_le_0.35x"] = rows["nf4"]["memory_ratio_to_fp32"] <= 0.35
    if "int8" in rows:
        targets["int8_perplexity_within_3pct"] = abs(rows["int8"]["perplexity_delta_pct"]) <= 3.0
    print("targets:", ", ".join(f"{k}={'met' if v else 'MISSED'}" for k, v in targets.items()))
    ratio = 1 / rows["nf4"]["memory_ratio_to_fp32"] if "nf4" in rows else float("nan")
    result = {"benchmark": "quantize", "mode": mode, "device": os.environ.get("FOUNDRY_DEVICE", "cpu"), "model": model, "eval_tokens": eval_tokens, "repeats": args.repeats,
              "quick": args.quick, "machine": platform.platform(), "cpu_count": os.cpu_count(),
              "methods": rows, "targets": targets, "ratio": ratio,
              "ratio_definition": "fp32 memory footprint / NF4 memory footprint"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    print(f"ratio={ratio:.4f}")


if __name__ == "__main__":
    main()
