"""Review quality: Foundry's grounded review vs a model-only review with the same model, one run.

The labelled set is bench/data/review_quality/cases.py (34 files with one known defect each, across the
security categories and common bug patterns, each with a clean twin, and 13 files of a tenant's own code with no
defect that analyzers still flag; half for tuning, half held out; how it was built is in that file). Both reviews use the same model, prompt format, decoding (greedy, with the stop rule
and n-gram ban) and output budget:
- grounded: analyzer stage (ruff, bandit, Foundry's line rules) → findings in the prompt → model → merge;
- model-only: the same prompt without the analyzer block; the model's parsed findings only.
A finding is located when its line is within ±1 of a labelled defect line (each label matched once).
Reported per half: precision, recall and F1 of located findings on defect files, false findings per clean
file (the clean twins and the tenant's files with no defect), and review latency (p50/p95 of reviews run one at a time). Headline on the held-out half:
``ratio=`` grounded F1 ÷ model-only F1 (``inf`` when the model alone locates nothing).

    python bench/review_quality.py [--model PATH] [--max-new-tokens 160] [--batch 8] [--latency-n 6] [--quick]

``--quick``: a tiny random model and 4 cases (under a minute; quality figures from it mean nothing).
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
sys.path.insert(0, str(ROOT / "bench" / "data" / "review_quality"))

from cases import load, load_noise  # noqa: E402

from domain.models import load_causal_lm, prepare_embedded_model  # noqa: E402
from domain.review.analyzers import Analysis  # noqa: E402
from domain.review.decoding import DecodeControl, review_stop  # noqa: E402
from domain.review.findings import from_model, merge  # noqa: E402
from domain.review.grounded import (analysis_note, analysis_stage, merge_review, output_budget,  # noqa: E402
                                    withhold_suppressed)
from domain.review import quality  # noqa: E402
from domain.review.parse import parse_review  # noqa: E402
from domain.prompting import fit_prompt, shared_prefix_len  # noqa: E402
from domain.review.runtime import Runtime, model_id_for  # noqa: E402

PATH = "module.py"


def prepare(rt: Runtime, code: str, grounded: bool, requested: int, suppressed: frozenset[str] = frozenset()):
    """As the review service prepares a review: the analyzer stage, the tenant's suppressed rules withheld
    from the prompt, the prompt fitted; returns (analysis, prompt ids, output budget)."""
    analysis = (withhold_suppressed(analysis_stage(code, PATH, "python", False), suppressed) if grounded
                else Analysis(supported=False))
    fitted = fit_prompt(rt.tokenizer, code, PATH, "python", False, [], context_window=rt.context_window,
                        max_new_tokens=output_budget(code, analysis, requested, rt.context_window),
                        analysis=analysis.findings if grounded else None,
                        analysis_note=analysis_note(analysis, "python") if grounded else None)
    budget = output_budget(code, analysis, requested, rt.context_window)
    return analysis, fitted.input_ids, budget


def finish(rt: Runtime, code: str, analysis: Analysis, tokens: list[int], grounded: bool,
           suppressed: frozenset[str] = frozenset()) -> list[dict]:
    return findings_of(rt.decode(tokens), code, analysis, grounded, suppressed)


def findings_of(text: str, code: str, analysis: Analysis, grounded: bool,
                suppressed: frozenset[str] = frozenset()) -> list[dict]:
    """A review's stored findings from its raw answer (suppressed rules left out)."""
    parsed = parse_review(text, n_lines=len(code.splitlines()))
    if grounded:
        return merge_review(parsed.findings, analysis, code, path=PATH, language="python", is_diff=False, raw_text=text,
                            suppressed=suppressed)
    return merge([], [from_model(f) for f in parsed.findings], suppressed)


def review_batch(rt: Runtime, codes: list[str], grounded: bool, requested: int, batch: int, slot: str | None = None,
                 suppressed: frozenset[str] = frozenset(), texts: list | None = None) -> list[list[dict]]:
    """Reviews of ``codes`` (adapter ``slot`` of ``rt``, or the base), the tenant's ``suppressed`` rules
    withheld from the prompt and left out of the findings, as the service does; (raw answer, analysis) pairs are appended to ``texts`` when given (``findings_of`` re-merges them)."""
    out = []
    for start in range(0, len(codes), batch):
        part = codes[start:start + batch]
        prepared = [prepare(rt, c, grounded, requested, suppressed) for c in part]
        control = DecodeControl(stop=review_stop(rt.decode))
        ids = [p[1] for p in prepared]
        rows = rt.generate(ids, [slot] * len(part), [p[2] for p in prepared],
                           [shared_prefix_len(rt.tokenizer, i) for i in ids], [control] * len(part))
        out.extend(finish(rt, c, p[0], r, grounded, suppressed) for c, p, r in zip(part, prepared, rows))
        if texts is not None:
            texts.extend((rt.decode(r), p[0]) for r, p in zip(rows, prepared))
    return out


def review_solo_seconds(rt: Runtime, code: str, grounded: bool, requested: int) -> float:
    t0 = time.perf_counter()
    review_batch(rt, [code], grounded, requested, 1)
    return time.perf_counter() - t0


def score(cases: list[dict], defect_findings: list[list[dict]], clean_findings: list[list[dict]]) -> dict:
    """domain.review.quality's located-findings score on the defect files, plus false findings per clean file."""
    result = quality.score([c["lines"] for c in cases], defect_findings)
    false_clean = sum(len(f) for f in clean_findings) / max(1, len(clean_findings))
    return {**{k: result[k] for k in ("precision", "recall", "f1", "files")},
            "false_findings_per_clean_file": round(false_clean, 3)}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: the embedded SmolLM2-135M-Instruct, prepared once)")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--latency-n", type=int, default=6, help="reviews per mode timed one at a time")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    if args.quick:
        from tests.fixtures.review import save_lively_tiny_model

        ref = str(save_lively_tiny_model(Path(tmp.name) / "tiny"))
        cases = {s: load(s)[:2] for s in ("tune", "held")}
        noise = {s: load_noise(s)[:1] for s in ("tune", "held")}
        args.max_new_tokens, args.latency_n = min(args.max_new_tokens, 24), 1
    else:
        from domain.config import get_settings

        ref = args.model or get_settings().base_model_ref()
        if not args.model and not (Path(ref) / "model.safetensors").exists():
            prepare_embedded_model(Path(ref))
        cases = {s: load(s) for s in ("tune", "held")}
        noise = {s: load_noise(s) for s in ("tune", "held")}
    rt = Runtime(load_causal_lm(ref, device="cpu"), "bench", model_id_for(ref))
    print(f"model {rt.model_id}; {sum(map(len, cases.values()))} defect files + as many clean twins + "
          f"{sum(map(len, noise.values()))} files with no defect; "
          f"max_new_tokens {args.max_new_tokens}")

    report = {"model": rt.model_id, "max_new_tokens": args.max_new_tokens, "halves": {}}
    for split, chosen in cases.items():
        report["halves"][split] = {}
        for mode, grounded in (("grounded", True), ("model_only", False)):
            t0 = time.perf_counter()
            defect = review_batch(rt, [c["code"] for c in chosen], grounded, args.max_new_tokens, args.batch)
            clean = review_batch(rt, [c["clean"] for c in chosen] + [n["code"] for n in noise[split]], grounded,
                                 args.max_new_tokens, args.batch)
            result = score(chosen, defect, clean)
            result["batched_seconds"] = round(time.perf_counter() - t0, 2)
            report["halves"][split][mode] = result
            print(f"{split:5s} {mode:10s} P={result['precision']:.3f} R={result['recall']:.3f} F1={result['f1']:.3f} "
                  f"false/clean={result['false_findings_per_clean_file']:.2f} ({result['batched_seconds']} s batched)")
    latency = {}
    sample = [c["code"] for c in cases["held"][:args.latency_n]]
    for mode, grounded in (("grounded", True), ("model_only", False)):
        secs = [review_solo_seconds(rt, code, grounded, args.max_new_tokens) for code in sample]
        latency[mode] = {"p50_s": round(statistics.median(secs), 3), "p95_s": round(percentile(secs, 0.95), 3),
                         "n": len(secs)}
        print(f"latency {mode:10s} p50 {latency[mode]['p50_s']:.2f} s  p95 {latency[mode]['p95_s']:.2f} s "
              f"(one review at a time, n={len(secs)})")
    report["latency"] = latency
    held = report["halves"]["held"]
    ratio = held["grounded"]["f1"] / held["model_only"]["f1"] if held["model_only"]["f1"] else float("inf")
    report["ratio"] = ratio
    out = ROOT / "bench" / "results" / ("review_quality_quick.json" if args.quick else "review_quality.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"held-out: grounded F1 {held['grounded']['f1']:.3f} / model-only F1 {held['model_only']['f1']:.3f}")
    print(f"ratio={ratio:.3f}" if ratio != float("inf") else "ratio=inf")


if __name__ == "__main__":
    main()
