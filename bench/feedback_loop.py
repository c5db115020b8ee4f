"""Feedback loop: simulated tenant feedback on the tuning half → retrain + suppression → held-out precision.

The labelled set is bench/review_quality.py's (bench/data/review_quality/cases.py): files with known defect
lines, their clean twins, and files of the tenant's own code with no defect that analyzers still flag (services
binding every interface, ``random`` for jitter and sampling, worker loops that log a failure and go on), split
into a tuning and a held-out half.

1. **Champion**: what the tenant is served before any feedback — the base model's grounded review (analyzers,
   findings in the prompt, model, merge), no adapter, no suppressions.
2. **Tenant** (consistent preferences: "report the real defect, nothing else"): reviews every tuning-half file
   (defect files, clean twins and its own files) with the champion, stored as review rows in a ledger, then judges each finding
   through ``domain.feedback.record_finding_feedback``: *accept* a finding located on the file's defect line
   (±1), *reject* every other one (its rule then counts towards suppression, ``--suppress-after`` net
   rejections); a defect file whose review located nothing gets a *correction* (``record_feedback``): the review
   the tenant wanted, the defect's line and category.
3. **Retrain**: the worker's retrain job (``domain.jobs.execute("retrain")``): data set from that feedback, LoRA
   training, the eval gate (loss, token accuracy and review precision on the tenant's held-out feedback,
   domain/adapters/gate.py), a version in the ledger with the gate's decision.
4. **Candidate**: the new adapter version with the tenant's suppressions now active.

Measured on the held-out half, which neither the tenant nor the retrain saw: precision and recall of located
findings (``domain.review.quality``) over all files of the half together (a finding on a clean twin or on a
file with no defect is false), for the champion, the candidate, each part alone (suppressions only, adapter only), and what the tenant
is served after the loop (``served``: the candidate when the gate promoted it, else the champion with the
suppressions). Headline: ``ratio=`` candidate precision ÷ champion precision (target > 1.0).

    python bench/feedback_loop.py [--model PATH] [--steps 16] [--max-new-tokens 160] [--quick]

``--quick``: the tiny random test model, 4 tuning and 4 held-out files, 6 training steps (under a minute); the
adapter part means nothing there, the suppression part is real (real analyzers).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench" / "data" / "review_quality"))

from cases import load, load_noise  # noqa: E402

from bench.review_quality import PATH, findings_of, review_batch  # noqa: E402
from domain.review import quality  # noqa: E402

TENANT = "bench"


def ledger(tmp: Path, base_ref: str, suppress_after: int) -> str:
    """A migrated SQLite ledger and data folder for this run, the base model set as the deployment's."""
    from domain.config import reset_settings
    from domain.ledger.migrate import upgrade

    url = f"sqlite:///{tmp / 'ledger.db'}"
    os.environ.update(FOUNDRY_DATABASE_URL=url, FOUNDRY_DATA_DIR=str(tmp / "data"), FOUNDRY_BASE_MODEL=base_ref,
                      FOUNDRY_DEVICE="cpu", FOUNDRY_SUPPRESS_AFTER_REJECTIONS=str(suppress_after))
    reset_settings()
    upgrade(url)
    return url


def store_review(code: str, findings: list[dict], text: str, model_id: str, analysis) -> str:
    """One succeeded review job and its review row, as the review service stores them; returns the review id."""
    from domain.ledger.db import session_scope
    from domain.ledger.models import Job, Review, Tenant

    with session_scope() as s:
        if s.get(Tenant, TENANT) is None:
            s.add(Tenant(id=TENANT, display_name=TENANT))
            s.flush()
        job_id = uuid.uuid4().hex
        s.add(Job(id=job_id, kind="review", tenant_id=TENANT, payload={"code": code}, status="succeeded",
                  created_by="bench"))
        s.flush()
        summary = text.split("\n", 1)[0].removeprefix("Summary:").strip() or None
        row = Review(job_id=job_id, tenant_id=TENANT, model_id=model_id, path=PATH, language="python", code=code,
                     code_sha256=hashlib.sha256(code.encode()).hexdigest(), summary=summary, findings=findings,
                     raw_text=text, analysis=analysis.record())
        s.add(row)
        s.flush()
        return row.id


def correction(case: dict) -> str:
    what = case["category"].replace("_", " ")
    return "Summary: the code has a " + what + " defect.\nFindings:\n" + "".join(
        f"- [high] line {line}: {what}: fix this line\n" for line in case["lines"])


def tenant_feedback(files: list[tuple], model_id: str) -> dict:
    """Step 2 of the module docstring. ``files``: (case or None for a clean twin, code, findings, raw text,
    analysis)."""
    from domain.feedback import record_feedback, record_finding_feedback

    counts = {"accepted": 0, "rejected": 0, "corrections": 0, "suppressed_now": []}
    for case, code, findings, text, analysis in files:
        review_id = store_review(code, findings, text, model_id, analysis)
        free = list(case["lines"]) if case else []
        for n, f in enumerate(findings, start=1):
            hit = quality.matching_label(f, free)
            if hit is not None:
                free.remove(hit)
            out = record_finding_feedback(review_id, n, "accept" if hit is not None else "reject", tenant=TENANT,
                                          created_by="bench-tenant")
            counts["accepted" if hit is not None else "rejected"] += 1
            if out["suppressed"]:
                counts["suppressed_now"].append(out["rule_id"])
        if case and len(free) == len(case["lines"]):
            record_feedback(review_id, "reject", correction(case), tenant=TENANT, created_by="bench-tenant")
            counts["corrections"] += 1
    return counts


def files_of(cases: list[dict], noise: list[dict]) -> list[dict]:
    """A half's files in review order: each defect file (``case`` set), each clean twin, the tenant's own files
    with no defect; with their ``id``, ``code`` and defect ``lines``."""
    return ([{"id": c["id"], "code": c["code"], "lines": c["lines"], "case": c} for c in cases]
            + [{"id": c["id"] + ":clean", "code": c["clean"], "lines": [], "case": None} for c in cases]
            + [{"id": n["id"], "code": n["code"], "lines": [], "case": None} for n in noise])


def generate(rt, files: list[dict], args, slot=None, suppressed=frozenset()) -> list[tuple[str, object]]:
    """(raw answer, analysis) of the grounded review of each of ``files``, the ``suppressed`` rules withheld
    from the prompt as the service withholds them."""
    texts: list = []
    t0 = time.perf_counter()
    review_batch(rt, [f["code"] for f in files], True, args.max_new_tokens, args.batch, slot=slot,
                 suppressed=suppressed, texts=texts)
    what = ("adapter" if slot else "base") + (", suppressions" if suppressed else "")
    print(f"  reviewed {len(texts)} files ({what}) in {time.perf_counter() - t0:.0f} s", flush=True)
    return texts


def measure(files: list[dict], texts: list[tuple[str, object]], suppressed=frozenset()) -> dict:
    """Located-findings score over ``files``, their reviews merged from the raw answers with ``suppressed`` rules
    left out (``texts`` generated with the same ``suppressed`` withheld from the prompt)."""
    found = [findings_of(text, f["code"], analysis, True, suppressed) for f, (text, analysis) in zip(files, texts)]
    result = quality.score([f["lines"] for f in files], found)
    clean = [fs for f, fs in zip(files, found) if not f["lines"]]
    result["false_findings_per_clean_file"] = round(sum(map(len, clean)) / max(1, len(clean)), 3)
    return {**result, "_found": found}


def retrain(args) -> dict:
    from domain import jobs

    body = {"tenant": TENANT, "max_steps": args.steps, "learning_rate": args.lr, "batch_size": 2, "lora_r": 8,
            "lora_alpha": 16, "max_seq_len": args.max_seq_len, "checkpoint_every": max(1, args.steps),
            "promotion_margin": 0.0, "eval_fraction": 0.25, "quality_max_new_tokens": args.max_new_tokens}
    if args.quick:
        body["target_modules"] = ["q_proj", "v_proj"]
    out = jobs.execute("retrain", uuid.uuid4().hex, body, "bench:feedback_loop")
    if out["status"] != "succeeded" or "version_id" not in out.get("result", {}):
        raise SystemExit(f"retrain did not make a version: {out}")
    return out["result"]


def adapter_slot(rt, version_id: str) -> str:
    from domain.adapter_lookup import verified_adapter_path
    from domain.ledger.db import session_scope
    from domain.ledger.models import AdapterVersion
    from domain.review.batcher import AdapterHandle

    with session_scope() as s:
        path = verified_adapter_path(s.get(AdapterVersion, version_id))
    return rt.ensure_adapter(AdapterHandle(version_id, lambda: path))


def line(name: str, r: dict) -> str:
    return (f"{name:22s} P={r['precision']:.3f} R={r['recall']:.3f} F1={r['f1']:.3f} "
            f"({r['located']}/{r['findings']} findings located, false/clean={r['false_findings_per_clean_file']:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: the embedded SmolLM2-135M-Instruct, prepared once)")
    ap.add_argument("--steps", type=int, default=16, help="retrain steps")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-seq-len", type=int, default=768)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--suppress-after", type=int, default=3, help="net rejections that suppress a rule")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="foundry-feedback-loop-"))
    from domain.models import load_causal_lm, prepare_embedded_model
    from domain.review.runtime import Runtime, model_id_for

    if args.quick:
        from tests.fixtures.review import save_lively_tiny_model

        ref = str(save_lively_tiny_model(tmp / "tiny"))
        halves = {s: files_of(load(s)[:4], load_noise(s)[:2]) for s in ("tune", "held")}
        args.steps, args.max_new_tokens, args.max_seq_len = 6, min(args.max_new_tokens, 24), 512
    else:
        from domain.config import get_settings

        ref = args.model or get_settings().base_model_ref()
        if not args.model and not (Path(ref) / "model.safetensors").exists():
            prepare_embedded_model(Path(ref))
        halves = {s: files_of(load(s), load_noise(s)) for s in ("tune", "held")}
    ledger(tmp, ref, args.suppress_after)
    rt = Runtime(load_causal_lm(ref, device="cpu"), "bench", model_id_for(ref))
    counts = {s: (sum(1 for f in h if f["lines"]), sum(1 for f in h if not f["lines"])) for s, h in halves.items()}
    print(f"model {rt.model_id}; tuning {counts['tune'][0]} defect + {counts['tune'][1]} clean files, held-out "
          f"{counts['held'][0]} + {counts['held'][1]}; {args.steps} retrain steps", flush=True)

    tune_texts = generate(rt, halves["tune"], args)
    tune = measure(halves["tune"], tune_texts)
    files = [(f["case"], f["code"], found, text, analysis)
             for f, found, (text, analysis) in zip(halves["tune"], tune["_found"], tune_texts)]
    feedback = tenant_feedback(files, rt.model_id)
    from domain.feedback import suppressed_rules

    suppressed = suppressed_rules(TENANT)
    print(f"tenant feedback on the tuning half: {feedback['accepted']} accepted, {feedback['rejected']} rejected, "
          f"{feedback['corrections']} corrections; suppressed rules: {sorted(suppressed) or 'none'}", flush=True)
    result = retrain(args)
    print(f"retrain: {result['status']} ({result['reason']}); review precision on the tenant's held-out feedback "
          f"{result.get('review_precision')}", flush=True)
    slot = adapter_slot(rt, result["version_id"])

    held = halves["held"]
    texts = {"champion": generate(rt, held, args), "suppressions_only": generate(rt, held, args, suppressed=suppressed),
             "adapter_only": generate(rt, held, args, slot=slot),
             "candidate": generate(rt, held, args, slot=slot, suppressed=suppressed)}
    runs = {name: measure(held, texts[name], suppressed if name in ("suppressions_only", "candidate") else frozenset())
            for name in texts}
    promoted = bool(result.get("promoted"))
    runs["served"] = runs["candidate"] if promoted else runs["suppressions_only"]  # what the gate lets the tenant get
    print(line("tuning champion", tune))
    gate = "  (the candidate: the gate promoted)" if promoted else "  (the champion: the gate kept the champion)"
    for name, r in runs.items():
        print(line(f"held-out {name}", r) + (gate if name == "served" else ""))
    champion, candidate = runs["champion"]["precision"], runs["candidate"]["precision"]
    ratio = candidate / champion if champion else float("inf")
    report = {"model": rt.model_id, "quick": args.quick, "steps": args.steps, "feedback": feedback,
              "suppressed": sorted(suppressed), "retrain": result, "tuning_champion": _public(tune),
              "held_out": {k: _public(v) for k, v in runs.items()}, "ratio": ratio,
              "held_out_findings": {k: _findings(held, runs[k]["_found"]) for k in ("champion", "candidate")},
              "held_out_raw_answers": {k: [t for t, _ in v] for k, v in texts.items() if k in ("champion", "candidate")},
              "seconds": round(time.perf_counter() - t0, 1)}
    out = ROOT / "bench" / "results" / ("feedback_loop_quick.json" if args.quick else "feedback_loop.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"held-out precision: candidate {candidate:.3f} / champion {champion:.3f} ({report['seconds']} s)")
    print(f"ratio={ratio:.3f}" if ratio != float("inf") else "ratio=inf")


def _findings(files: list[dict], found: list[list[dict]]) -> list[dict]:
    """Per held-out file: its labels and its findings' line, rule, category and source (for reading the run)."""
    return [{"file": f["id"], "labels": f["lines"], "findings": [{k: x.get(k) for k in ("line", "rule_id", "category",
                                                                                          "source")} for x in fs]}
            for f, fs in zip(files, found)]


def _public(r: dict) -> dict:
    return {k: v for k, v in r.items() if not k.startswith("_")}


if __name__ == "__main__":
    main()
