"""Benchmark: a distill job on two processes with student and teacher sharded (strategy fsdp) against replicated (ddp).

The same job twice through real ``distill`` jobs (domain.jobs.execute on a throwaway SQLite ledger, gloo on
the CPU, nccl where FOUNDRY_DEVICE is CUDA and two GPUs are there), ``procs: 2``, same teacher, student,
batches and schedule; only ``strategy`` differs. Measured: rank 0's training state after its first step
(parameters, gradients, AdamW states: the report's ``train_state_bytes_per_rank``), the teacher's weights on
rank 0 (``teacher_bytes_per_rank``: whole under ddp, its shards under fsdp), training steps/s, and the
final loss of each (they must agree: the same updates).

Headline: ``ratio=`` ddp training state per rank / fsdp training state per rank (larger is better; 2 ranks
at most 2, less the padding of shards). Printed beside it: the same ratio for all rank 0 holds (training
state plus teacher), and steps/s of both: fsdp all-gathers every layer of both models in forward (and the
student's in backward), which costs time on the CPU.

    .venv/bin/python bench/distill_sharding.py                  # the embedded SmolLM2-135M, 6 of 30 layers
    .venv/bin/python bench/distill_sharding.py --random-weights # its shapes, random weights (bench/_shapes.py)
    .venv/bin/python bench/distill_sharding.py --quick          # 4 layers of the random-weights shapes, 4 steps
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


def run_job(teacher: str, strategy: str, a: argparse.Namespace) -> dict:
    from domain import jobs
    from domain.ledger.db import session_scope
    from domain.ledger.models import Job

    body = {"tenant": "bench", "teacher": teacher, "student_layers": a.student_layers, "layer_selection": "even",
            "max_steps": a.steps, "batch_size": a.batch_size, "seq_len": a.seq_len, "learning_rate": 5e-4,
            "eval_max_tokens": 64, "checkpoint_every": 1_000_000, "seed": 0, "procs": 2, "strategy": strategy}
    t0 = time.perf_counter()
    out = jobs.execute("distill", uuid.uuid4().hex, body, worker="bench:1")
    if out["status"] != "succeeded":
        raise SystemExit(f"strategy {strategy}: job {out['status']}: {out.get('error')}")
    with session_scope() as s:
        tps = float(s.get(Job, out["job_id"]).progress_info.get("tokens_per_s") or 0.0)
    r = out["result"]["report"]
    return {"strategy": r["strategy"], "train_state_bytes_per_rank": r["train_state_bytes_per_rank"],
            "teacher_bytes_per_rank": r["teacher_bytes_per_rank"], "teacher_params": r["teacher_params"],
            "student_params": r["student_params"], "final_loss": r["final_loss"], "tokens_per_s": tps,
            "steps_per_s": tps / (a.batch_size * a.seq_len), "job_seconds": time.perf_counter() - t0}


def main() -> None:
    from bench import _shapes

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="teacher id/path (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--steps", type=int, help="training steps (default 8; quick 4)")
    ap.add_argument("--batch-size", type=int, default=2, help="rows a step (at least 2: one a rank)")
    ap.add_argument("--seq-len", type=int, help="default 64; quick 32")
    ap.add_argument("--student-layers", type=int, help="default 6; quick 2")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", help="result JSON (default bench/results/distill_sharding.json, or -random.json)")
    _shapes.add_option(ap)
    a = ap.parse_args()
    q = a.quick
    a.steps = a.steps or (4 if q else 8)
    a.seq_len = a.seq_len or (32 if q else 64)
    a.student_layers = a.student_layers or (2 if q else 6)
    throwaway_ledger()
    if q and not a.model:  # a 4-layer teacher of SmolLM2-135M's shapes: the quick run's job is to run
        from domain.config import get_settings

        teacher, mode = str(_shapes.random_smollm2(get_settings().models_dir / "smollm2-4l-random", layers=4)), \
            _shapes.MODE_RANDOM + ", 4 layers"
    else:
        teacher, mode = _shapes.model_for(a, lambda: a.model or default_model())
    out = a.out or str(ROOT / "bench" / "results" / _shapes.result_name("distill_sharding", a))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))  # two ranks share the cores
    print(f"mode: {mode}; 2 processes, {a.steps} steps of {a.batch_size} x {a.seq_len} tokens, "
          f"{a.student_layers} student layers", flush=True)
    ddp = run_job(teacher, "ddp", a)
    fsdp = run_job(teacher, "fsdp", a)
    for r in (ddp, fsdp):
        print(f"{r['strategy']}: rank 0 training state {r['train_state_bytes_per_rank'] / 2**20:.1f} MiB "
              f"({r['student_params'] / 1e6:.1f} M student parameters), teacher "
              f"{r['teacher_bytes_per_rank'] / 2**20:.1f} MiB ({r['teacher_params'] / 1e6:.1f} M) | "
              f"{r['steps_per_s']:.3f} steps/s | "
              f"final loss {r['final_loss']:.5f} | {r['job_seconds']:.0f} s", flush=True)
    same = abs(ddp["final_loss"] - fsdp["final_loss"]) <= 1e-3 * abs(ddp["final_loss"])
    print(f"same final loss (rel 1e-3): {same}; fsdp steps/s / ddp steps/s: "
          f"{fsdp['steps_per_s'] / max(ddp['steps_per_s'], 1e-12):.3f}")
    ratio = ddp["train_state_bytes_per_rank"] / fsdp["train_state_bytes_per_rank"]
    held = {k: r["train_state_bytes_per_rank"] + r["teacher_bytes_per_rank"] for k, r in (("ddp", ddp), ("fsdp", fsdp))}
    print(f"rank 0 in all (training state + teacher): ddp {held['ddp'] / 2**20:.1f} MiB, fsdp "
          f"{held['fsdp'] / 2**20:.1f} MiB: {held['ddp'] / held['fsdp']:.4f}x")
    result = {"benchmark": "distill_sharding", "mode": mode, "device": os.environ.get("FOUNDRY_DEVICE", "cpu"),
              "teacher": teacher, "quick": q, "machine": platform.platform(), "cpu_count": os.cpu_count(),
              "settings": {k: v for k, v in vars(a).items() if k not in ("out", "model")}, "ddp": ddp, "fsdp": fsdp,
              "same_final_loss": same, "rank0_bytes_ratio": held["ddp"] / held["fsdp"], "ratio": ratio,
              "ratio_definition": "rank 0 training state bytes, ddp / fsdp (2 processes)"}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    if not same:
        raise SystemExit("fsdp and ddp ended at different losses")
    print(f"ratio={ratio:.4f}")


if __name__ == "__main__":
    main()
