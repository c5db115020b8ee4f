"""Benchmark: a distilled half-depth student against the same student trained with plain cross-entropy.

Teacher: SmolLM2-135M-Instruct (30 layers). Student: the teacher with 15 of its layers kept, by the job's
default ``layer_selection="greedy"`` (remove one layer at a time, the one whose removal raises the loss on the
first training blocks least; embeddings, norm and head copied), chosen once by the first job and given to the
second as ``kept_layers``. Both students start from the same weights and train on exactly the same
batches (same seed, same token budget, same optimizer and schedule) through real ``distill`` jobs
(domain.jobs.execute on a throwaway SQLite ledger); only the loss differs:
- Foundry: alpha=0.5, T=2 (the job's defaults): 0.5*T^2*KL(teacher || student) + 0.5*CE
- baseline: alpha=0 (plain CE on the same tokens)
Held-out perplexity is measured on the standard library's held-out split (domain.heldout).

Targets (issue 6): distilled perplexity < CE-only perplexity, and <= 1.5x the teacher's.
Headline: ``ratio=`` CE-only student perplexity / distilled student perplexity (larger is better).

    .venv/bin/python bench/distill.py           # 2700 steps x 1 x 128 = 345,600 tokens per student (~80 min
                                                # on 2 CPU cores, minutes on a GPU)
    .venv/bin/python bench/distill.py --steps 96  # 12,288 tokens: the CPU-sized run (~8 min)
    .venv/bin/python bench/distill.py --quick   # 6 steps x 2 x 64 tokens, 4 student layers of 30 (evenly
                                                # spaced: greedy selection alone takes minutes at that depth)
    .venv/bin/python bench/distill.py --kept-layers 0,1,2,8,9,10,11,20,21,22,23,24,27,28,29
                                                # the same, on the layers greedy chose, without the selection
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quantize import default_model, throwaway_ledger  # noqa: E402


def run_job(teacher: str, alpha: float, a: argparse.Namespace, kept_layers: list[int] | None = None) -> dict:
    from domain import jobs
    from domain.ledger.db import session_scope
    from domain.ledger.models import Artifact, Job

    body = {"tenant": "bench", "teacher": teacher, "student_layers": a.student_layers, "alpha": alpha,
            "temperature": a.temperature, "token_budget": a.steps * a.batch_size * a.seq_len, "batch_size": a.batch_size,
            "seq_len": a.seq_len, "learning_rate": a.learning_rate, "eval_max_tokens": a.eval_tokens,
            "checkpoint_every": 1_000_000, "seed": 0, "layer_selection": a.layer_selection}
    if kept_layers is not None:  # the second student starts from exactly the first one's layers
        body["kept_layers"] = kept_layers
    t0 = time.perf_counter()
    out = jobs.execute("distill", uuid.uuid4().hex, body, worker="bench:1")
    if out["status"] != "succeeded":
        raise SystemExit(f"alpha={alpha} job {out['status']}: {out.get('error')}")
    with session_scope() as s:
        lineage = s.get(Artifact, out["result"]["artifact_id"]).lineage
        train_tps = float(s.get(Job, out["job_id"]).progress_info.get("tokens_per_s") or 0.0)
    return {**out["result"]["report"], "job_seconds": time.perf_counter() - t0,
            "kept_layers": lineage["kept_layers"], "layer_selection": lineage["layer_selection"],
            "train_tokens_per_s": train_tps, "steps_per_s": train_tps / (a.batch_size * a.seq_len)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="teacher id/path (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--steps", type=int, help="training steps (default 2700; quick 6)")
    ap.add_argument("--batch-size", type=int, help="default 1 (more optimizer steps for the same tokens: ppl 52 vs 58 with 4); quick 2")
    ap.add_argument("--seq-len", type=int, help="default 128; quick 64")
    ap.add_argument("--student-layers", type=int, help="default: half the teacher's; quick 4")
    ap.add_argument("--learning-rate", type=float, default=5e-4)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--alpha", type=float, default=0.5, help="the distilled run's alpha (the baseline uses 0)")
    ap.add_argument("--eval-tokens", type=int, help="held-out tokens (default 2048; quick 128)")
    ap.add_argument("--layer-selection", choices=["greedy", "block", "even"],
                    help="how the student's layers are chosen (once, for both students); default greedy (the job's "
                         "default), even with --quick or --random-weights (greedy costs ~(30-keep) x 30 forward passes)")
    ap.add_argument("--kept-layers", help="comma-separated teacher layers for both students (skips the selection), "
                                          "e.g. the ones a shorter run chose, to compare budgets on one student")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", help="result JSON (default bench/results/distill.json, or distill-random.json)")
    ap.set_defaults(out=None)
    from bench import _shapes

    _shapes.add_option(ap)
    a = ap.parse_args()
    a.out = a.out or str(ROOT / "bench" / "results" / _shapes.result_name("distill", a))
    q = a.quick
    a.steps = a.steps or (6 if q else 200 if a.random_weights else 2700)  # random weights: speed only, short
    a.batch_size = a.batch_size or (2 if q else 1)
    a.seq_len = a.seq_len or (64 if q else 128)
    a.eval_tokens = a.eval_tokens or (128 if q else 2048)
    teacher, mode = _shapes.model_for(a, lambda: a.model or default_model())
    if a.layer_selection is None:  # selection is about quality; evenly spaced layers cost no selection time
        # (--quick's 4 of 30 layers by greedy is 455 forward passes: 529 s on 2 CPU cores, not a quick run)
        a.layer_selection = "even" if (q or a.random_weights) else "greedy"
    print(f"mode: {mode}", flush=True)
    if a.student_layers is None:
        from transformers import AutoConfig

        a.student_layers = 4 if q else AutoConfig.from_pretrained(teacher).num_hidden_layers // 2
    throwaway_ledger()

    given = [int(x) for x in a.kept_layers.split(",")] if a.kept_layers else None
    ce = run_job(teacher, 0.0, a, kept_layers=given)
    print(f"baseline (CE only, alpha=0): student ppl {ce['perplexity_student']:.3f} | teacher ppl "
          f"{ce['perplexity_teacher']:.3f} | {ce['trained_tokens']} tokens in {ce['job_seconds']:.0f} s "
          f"(incl. {ce['layer_selection']} layer selection: kept {ce['kept_layers']})", flush=True)
    kd = run_job(teacher, a.alpha, a, kept_layers=ce["kept_layers"])
    print(f"Foundry (distilled, alpha={a.alpha}, T={a.temperature}): student ppl {kd['perplexity_student']:.3f} | "
          f"retention {kd['retention']:.3f} | {kd['parameter_compression_ratio']:.2f}x fewer params | "
          f"{kd['speedup']:.2f}x tokens/s | KL {kd['kl_divergence']:.3f} | top-1 {kd['top1_agreement']:.3f} | "
          f"{kd['job_seconds']:.0f} s", flush=True)

    print(f"training steps/s: CE only {ce['steps_per_s']:.2f}, distilled (teacher forward too) {kd['steps_per_s']:.2f} "
          f"({a.batch_size} x {a.seq_len} tokens a step); student {kd['speedup']:.2f}x the teacher's tokens/s", flush=True)
    ratio = ce["perplexity_student"] / kd["perplexity_student"]
    definition = "CE-only student held-out perplexity / distilled student held-out perplexity"
    if a.random_weights:  # perplexities of random weights mean nothing: the headline is the student's speed-up
        ratio, definition = kd["speedup"], "distilled student tokens/s / teacher tokens/s (random weights: speed only)"
    targets = {"distilled_below_ce_only": kd["perplexity_student"] < ce["perplexity_student"],
               "distilled_within_1.5x_teacher": kd["perplexity_student"] <= 1.5 * kd["perplexity_teacher"]}
    if not a.random_weights:  # quality targets: real weights only
        print("targets:", ", ".join(f"{k}={'met' if v else 'MISSED'}" for k, v in targets.items()))
    result = {"benchmark": "distill", "mode": mode, "device": os.environ.get("FOUNDRY_DEVICE", "cpu"),
              "teacher": teacher, "quick": q, "machine": platform.platform(),
              "cpu_count": os.cpu_count(), "settings": {k: v for k, v in vars(a).items() if k not in ("out", "model")},
              "tokens_per_student": a.steps * a.batch_size * a.seq_len, "baseline_ce_only": ce, "distilled": kd,
              "targets": targets if not a.random_weights else {}, "ratio": ratio, "ratio_definition": definition}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out}")
    print(f"ratio={ratio:.4f}")


if __name__ == "__main__":
    main()
