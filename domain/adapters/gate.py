"""The eval gate: is the freshly trained candidate better than what is served now?

Both sides are scored on the same held-out feedback:
- ``loss`` (and perplexity): mean negative log-likelihood of the accepted/corrected reviews (completion tokens);
- ``token_accuracy``: top-1 next-token accuracy on those reviews, a cheap task metric;
- ``quality`` (when measured): the review quality itself, precision and recall of located findings (line
  within ±1, ``domain.review.quality``) when each side reviews the held-out feedback's files
  (``domain.adapters.review_eval``: analyzer stage, prompt, greedy decoding, merge, the tenant's suppressions).
The reference is the tenant's champion adapter, or the base model when there is no champion yet.

Rule, in order:
1. a candidate whose eval loss is not a number is kept out;
2. review quality decides when it was measured on at least ``QUALITY_MIN_LABELS`` labelled lines and the two
   precisions differ: a lower precision keeps the reference, however much the loss improved; a higher one
   promotes, unless recall dropped by more than ``RECALL_TOLERANCE`` or the eval loss got worse by more than
   ``LOSS_GUARD`` (relative), which keep the reference;
3. otherwise (no quality measure, too few labels, or equal precision) the loss rule: promote when
   ``candidate.loss <= reference.loss * (1 - margin)`` and token accuracy is not lower than the reference's
   by more than ``ACCURACY_TOLERANCE``.
The decision, its reason and both sides' figures (quality included) go into the version's metrics and the
job's result.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from domain.adapters.training import Batch, evaluate

ACCURACY_TOLERANCE = 0.02  # absolute points of token accuracy the candidate may lose while its loss improves
QUALITY_MIN_LABELS = 2  # labelled lines below which review precision is too noisy to decide
RECALL_TOLERANCE = 0.10  # absolute recall the candidate may lose while its precision improves
LOSS_GUARD = 0.10  # relative eval-loss regression a candidate with better precision may carry


@dataclass
class GateDecision:
    promote: bool
    reason: str
    reference: str  # "champion:<version id>" | "base"
    candidate: dict
    baseline: dict
    margin: float
    relative_improvement: float
    quality: dict | None = None  # {"candidate": quality.score, "reference": quality.score, "decided": bool}

    def as_dict(self) -> dict:
        return asdict(self)


def _quality_verdict(quality: dict | None, c_loss: float, b_loss: float, reference: str) -> tuple[bool, str] | None:
    """Rule 2 of the module docstring; None when quality does not decide."""
    if not quality or quality["reference"]["labels"] < QUALITY_MIN_LABELS:
        return None
    cq, rq = quality["candidate"], quality["reference"]
    pc, pr = cq["precision"], rq["precision"]
    figures = f"review precision {pc:.3f} vs {reference} {pr:.3f} on {rq['labels']} held-out labelled lines"
    if pc < pr:
        return False, f"kept {reference}: {figures} (lower; eval loss {c_loss:.4f} vs {b_loss:.4f})"
    if pc == pr:
        return None
    if rq["recall"] - cq["recall"] > RECALL_TOLERANCE:
        return False, (f"kept {reference}: {figures} but recall fell {rq['recall']:.3f} -> {cq['recall']:.3f} "
                       f"(> {RECALL_TOLERANCE})")
    if c_loss > b_loss * (1 + LOSS_GUARD):
        return False, f"kept {reference}: {figures} but eval loss {c_loss:.4f} is over {LOSS_GUARD:.0%} worse than {b_loss:.4f}"
    return True, f"promoted: {figures} (higher; recall {cq['recall']:.3f} vs {rq['recall']:.3f}, eval loss {c_loss:.4f} vs {b_loss:.4f})"


def decide(candidate: dict, baseline: dict, margin: float, reference: str = "base",
           quality: dict | None = None) -> GateDecision:
    """Compare two ``training.evaluate`` results (and, when given, two ``review_eval`` quality scores) by the
    rule in this module's docstring."""
    c, b = candidate["loss"], baseline["loss"]
    improvement = (b - c) / b if b and b == b else 0.0
    acc_drop = (baseline.get("token_accuracy") or 0.0) - (candidate.get("token_accuracy") or 0.0)
    verdict = None if c != c else _quality_verdict(quality, c, b, reference)
    if c != c:
        promote, why = False, "candidate eval loss is not a number (no held-out tokens)"
    elif verdict is not None:
        promote, why = verdict
    elif c > b * (1 - margin):
        promote, why = False, (f"kept {reference}: candidate eval loss {c:.4f} is not better than {reference}'s "
                               f"{b:.4f} by the margin {margin:.1%} (improvement {improvement:.2%})")
    elif acc_drop > ACCURACY_TOLERANCE:
        promote, why = False, (f"kept {reference}: eval loss improved {improvement:.2%} but token accuracy dropped "
                               f"{acc_drop:.3f} (> {ACCURACY_TOLERANCE})")
    else:
        promote, why = True, (f"promoted: candidate eval loss {c:.4f} vs {reference} {b:.4f} "
                              f"({improvement:.2%} better, margin {margin:.1%})")
    if quality is not None and verdict is None and c == c:
        why += (f"; review precision {quality['candidate']['precision']:.3f} vs {quality['reference']['precision']:.3f}"
                f" on {quality['reference']['labels']} labelled lines did not decide")
    if quality is not None:
        quality = {**quality, "decided": verdict is not None}
    return GateDecision(promote=promote, reason=why, reference=reference, candidate=candidate, baseline=baseline,
                        margin=margin, relative_improvement=improvement, quality=quality)


@contextmanager
def reference_active(peft_model, champion_dir: Path | None):
    """The reference side active for the block: the champion adapter (loaded beside the candidate, then
    removed) or, without one, the base model (adapters disabled)."""
    if champion_dir is None:
        with peft_model.disable_adapter():
            yield
        return
    peft_model.load_adapter(str(champion_dir), adapter_name="champion")
    try:
        peft_model.set_adapter("champion")
        yield
    finally:
        peft_model.set_adapter("default")
        peft_model.delete_adapter("champion")


def run_gate(peft_model, eval_batches: list[Batch], champion_dir: Path | None, champion_id: str | None,
             margin: float, measure_quality: Callable[[object], dict] | None = None) -> GateDecision:
    """Score the candidate, then the reference, on the held-out batches (and with ``measure_quality(model)``,
    e.g. ``review_eval.QualityMeasure.run``, when given), and decide."""
    candidate = evaluate(peft_model, eval_batches)
    cand_q = measure_quality(peft_model) if measure_quality else None
    with reference_active(peft_model, champion_dir):
        baseline = evaluate(peft_model, eval_batches)
        ref_q = measure_quality(peft_model) if measure_quality else None
    reference = f"champion:{champion_id}" if champion_id else "base"
    quality = {"candidate": cand_q, "reference": ref_q} if measure_quality else None
    return decide(candidate, baseline, margin, reference, quality)
