"""Retrain throughput: Foundry's LoRA loop vs a plain transformers ``Trainer`` + PEFT, same data, model and
hyperparameters, measured side by side in one run.

Data: feedback-like samples made from real code nobody here wrote: standard-library functions (docstring
removed) as the reviewed code and a review written from their docstring as the completion
(``tests.fixtures.adapters.stdlib_review_pairs``), rendered with the review prompt and the model's chat
template, completion-only labels. Lengths vary like real feedback.

Runs (same LoRA config r/alpha/dropout/targets, AdamW, learning rate, batch size, max_seq_len, seed):
1. baseline: ``transformers.Trainer`` + ``DataCollatorForSeq2Seq`` (pad to the longest in the batch);
2. Foundry unpacked: ``domain.adapters.training`` with ``packing=False`` (``batch_size`` samples per step);
3. Foundry packed: ``packing=True`` (``batch_size`` rows of up to ``max_seq_len`` tokens, block-diagonal mask).
On ``sdpa`` models both Foundry runs skip padding in the forward (one row of real tokens, attention per sample).
Throughput counts real (non-padding) tokens for all three, steady state (the first step is excluded), as
tokens of the batches consumed divided by the wall time of those steps.

Headline: ``ratio`` = packed Foundry tokens/s / baseline tokens/s. ``--repeats N`` repeats the three runs
and reports medians. On CPU the runs use ``--threads`` (default 1: on a shared 2-core machine, more
OpenMP threads than free cores makes timings meaningless); absolute figures only count on a GPU.

    .venv/bin/python bench/retrain_throughput.py            # SmolLM2-135M-Instruct (embedded), 512 tokens
    .venv/bin/python bench/retrain_throughput.py --quick    # tiny random Llama model, < 1 minute
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from domain.adapters import training as T  # noqa: E402
from domain.adapters.data import IGNORE, FeedbackExample, tokenize  # noqa: E402
from bench import _shapes  # noqa: E402
from tests.fixtures.adapters import stdlib_review_pairs  # noqa: E402


def load_model(args):
    from domain.models import load_causal_lm
    from tests.fixtures.tiny_models import save_tiny_model

    embedded = ROOT / ".foundry" / "models" / "smollm2-135m-instruct"
    if args.random_weights:  # SmolLM2-135M's shapes, random weights, GPT-2's BPE (bench/_shapes.py)
        ref, mode = _shapes.model_for(args, None)
        return load_causal_lm(ref, device=args.device), mode
    if args.quick:  # a tiny random Llama; with SmolLM2's tokenizer when it is prepared (realistic lengths)
        dest = Path(tempfile.mkdtemp(prefix="foundry-bench-tiny-")) / "tiny"
        if (embedded / "tokenizer.json").exists():
            from domain.models import load_tokenizer
            from tests.fixtures.tiny_models import tiny_model

            tok = load_tokenizer(str(embedded))
            tiny_model(tok, layers=4, hidden=128, max_positions=2048).save_pretrained(dest, safe_serialization=True)
            tok.save_pretrained(dest)
            ref, name = dest, "tiny-llama(4x128, SmolLM2 tokenizer)"
        else:
            ref, name = save_tiny_model(dest, layers=4, hidden=128), "tiny-llama(4x128)"
        return load_causal_lm(str(ref), device=args.device), name
    ref = args.model or str(embedded)
    if not args.model and not Path(ref).exists():
        from domain.models import prepare_embedded_model

        prepare_embedded_model(Path(ref))
    return load_causal_lm(ref, device=args.device), ref


def make_examples(tokenizer, n: int, max_seq_len: int):
    pairs = stdlib_review_pairs(n, max_code_lines=40)
    return [tokenize(tokenizer, FeedbackExample(code, path, None, False, review, "accepted", None), max_seq_len)
            for path, code, review in pairs]


def run_foundry(base, examples, cfg: T.TrainConfig, pad_id: int) -> dict:
    batches = T.make_batches(examples, cfg.batch_size, cfg.max_seq_len, cfg.packing, pad_id)
    model = T.setup_model(base, cfg)
    optimizer, scheduler = T.make_optimizer(model, cfg)
    marks: list[tuple[float, int]] = []
    seen = {"tokens": 0}

    def progress(step, loss, tps):
        seen["tokens"] = result_tokens(step)
        marks.append((time.perf_counter(), seen["tokens"]))

    def result_tokens(step):  # tokens of steps 1..step (the loop's own count is also returned)
        return sum(T.batch_for_step(batches, s, cfg.seed).tokens for s in range(step))

    _sync()
    unpadded = T.varlen.supported(T._decoder_and_head(model)[0])  # padding skipped in the forward (sdpa models)
    result = T.train(model, batches, cfg, optimizer, scheduler, hooks=T.Hooks(progress=lambda s, l, t: (_sync(), progress(s, l, t))))
    T.cleanup(model)
    assert marks[-1][1] == result.tokens
    (t1, k1), (tn, kn) = marks[0], marks[-1]
    return {"tokens_per_s": (kn - k1) / (tn - t1), "tokens": kn - k1, "seconds": tn - t1, "steps": result.steps,
            "final_loss": result.final_loss, "batches": len(batches), "unpadded_forward": unpadded,
            "attention_kernels": result.attention_kernels,
            "padding_fraction": 1 - sum(b.tokens for b in batches) / sum(b.input_ids.numel() for b in batches)}


def run_trainer(base, tokenizer, examples, cfg: T.TrainConfig, device: str) -> dict:
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    model = get_peft_model(base, T.lora_config(cfg))
    data = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    pad = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE)
    counts: list[int] = []
    shapes: list[int] = []

    def collate(features):
        batch = pad(features)
        counts.append(int(batch["attention_mask"].sum()))  # real tokens, counted like Foundry's
        shapes.append(int(batch["input_ids"].numel()))
        return batch

    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            _sync()
            marks.append(time.perf_counter())

    out = tempfile.mkdtemp(prefix="foundry-bench-trainer-")
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=cfg.batch_size, max_steps=cfg.max_steps,
                             learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup,
                             lr_scheduler_type="cosine", max_grad_norm=cfg.grad_clip, logging_strategy="no",
                             save_strategy="no", report_to=[], dataloader_num_workers=0, seed=cfg.seed,
                             remove_unused_columns=False, use_cpu=device == "cpu", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[Clock()])
    trainer.train()
    model.unload()
    steps = len(marks)
    tokens = sum(counts[1:steps])  # batches of steps 2..n (the collator may run one batch ahead)
    return {"tokens_per_s": tokens / (marks[-1] - marks[0]), "tokens": tokens, "seconds": marks[-1] - marks[0],
            "steps": steps, "padding_fraction": 1 - sum(counts[:steps]) / sum(shapes[:steps])}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model, fewer samples and steps (< 1 minute)")
    ap.add_argument("--model", help="base model id/path (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--samples", type=int, help="feedback-like samples (default 64, quick 24)")
    ap.add_argument("--steps", type=int, help="optimizer steps per run (default 8, quick 5)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=1, help="repeat the three runs; medians are reported")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU only)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compare-loop", action="store_true",
                    help="a fourth run: packed with the per-sample sdpa loop forced (what the varlen kernel saves)")
    _shapes.add_option(ap)
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    samples = args.samples or (24 if args.quick else 64)
    steps = args.steps or (5 if args.quick else 8)

    loaded, model_name = load_model(args)
    tok = loaded.tokenizer
    examples = make_examples(tok, samples, args.max_seq_len)
    lengths = [len(e.input_ids) for e in examples]
    print(f"model {model_name} on {args.device}; {len(examples)} samples, tokens min/median/max "
          f"{min(lengths)}/{int(statistics.median(lengths))}/{max(lengths)}; {steps} steps, batch {args.batch_size}, "
          f"max_seq_len {args.max_seq_len}")
    common = dict(lora_r=16, lora_alpha=32, lora_dropout=0.05, learning_rate=2e-4, max_steps=steps,
                  batch_size=args.batch_size, max_seq_len=args.max_seq_len, checkpoint_every=10**9, seed=0)
    runs: dict[str, list[dict]] = {"baseline_trainer": [], "foundry_unpacked": [], "foundry_packed": []}
    measure = {
        "baseline_trainer": lambda: run_trainer(loaded.model, tok, examples, T.TrainConfig(**common, packing=False),
                                                args.device),
        "foundry_unpacked": lambda: run_foundry(loaded.model, examples, T.TrainConfig(**common, packing=False),
                                                tok.pad_token_id),
        "foundry_packed": lambda: run_foundry(loaded.model, examples, T.TrainConfig(**common, packing=True),
                                              tok.pad_token_id),
    }
    if args.compare_loop:
        runs["foundry_packed_loop"] = []

        def packed_loop(packed=measure["foundry_packed"]):
            with T.varlen.loop_only():
                return packed()

        measure["foundry_packed_loop"] = packed_loop
    for r in range(args.repeats):
        n = len(measure)
        order = list(measure)[r % n:] + list(measure)[:r % n]  # rotate the order: drift on a shared machine evens out
        for name in order:
            runs[name].append(measure[name]())
        b, u, p = (runs[k][-1]["tokens_per_s"] for k in ("baseline_trainer", "foundry_unpacked", "foundry_packed"))
        loop = (f" | packed, loop forced {runs['foundry_packed_loop'][-1]['tokens_per_s']:,.0f} tok/s"
                if args.compare_loop else "")
        print(f"repeat {r + 1}: baseline {b:,.0f} tok/s | foundry unpacked {u:,.0f} tok/s ({u / b:.2f}x) | "
              f"foundry packed {p:,.0f} tok/s ({p / b:.2f}x){loop}")
    med = {k: statistics.median(x["tokens_per_s"] for x in v) for k, v in runs.items()}
    ratio_unpacked = statistics.median(u["tokens_per_s"] / b["tokens_per_s"]
                                       for b, u in zip(runs["baseline_trainer"], runs["foundry_unpacked"]))
    ratio = statistics.median(p["tokens_per_s"] / b["tokens_per_s"]
                              for b, p in zip(runs["baseline_trainer"], runs["foundry_packed"]))
    print(f"baseline (Trainer+PEFT, padded): {med['baseline_trainer']:,.0f} tokens/s, padding "
          f"{runs['baseline_trainer'][0]['padding_fraction']:.0%}")
    for key, label, r in (("foundry_unpacked", "foundry unpacked: ", f"ratio_unpacked={ratio_unpacked:.3f}"),
                          ("foundry_packed", "foundry packed:   ", f"ratio_packed={ratio:.3f}")):
        run = runs[key][0]
        skipped = " (run unpadded: not computed)" if run["unpadded_forward"] else ""
        skipped += f" [attention: {', '.join(run['attention_kernels']) or 'masked sdpa'}]"
        print(f"{label}               {med[key]:,.0f} tokens/s, padding {run['padding_fraction']:.0%}{skipped}  {r}")
    ratio_kernel = None
    if args.compare_loop:
        ratio_kernel = statistics.median(p["tokens_per_s"] / lp["tokens_per_s"]
                                         for p, lp in zip(runs["foundry_packed"], runs["foundry_packed_loop"]))
        print(f"foundry packed, loop forced:     {med['foundry_packed_loop']:,.0f} tokens/s  "
              f"packed/loop={ratio_kernel:.3f} (the varlen kernel's gain; 1.0 where the loop is the kernel)")
    out = {"model": model_name, "mode": _shapes.MODE_RANDOM if args.random_weights else _shapes.MODE_REAL,
           "device": args.device, "threads": torch.get_num_threads(), "samples": len(examples),
           "lengths": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)},
           "steps": steps, "batch_size": args.batch_size, "max_seq_len": args.max_seq_len, "repeats": args.repeats,
           "median_tokens_per_s": med, "ratio_unpacked": ratio_unpacked, "ratio": ratio,
           "ratio_packed_over_loop": ratio_kernel, "runs": runs,
           "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    name = _shapes.result_name("retrain_throughput-quick" if args.quick else "retrain_throughput", args)
    (results / name).write_text(json.dumps(out, indent=1, default=str))
    print(f"ratio={ratio:.4f}")


if __name__ == "__main__":
    main()
