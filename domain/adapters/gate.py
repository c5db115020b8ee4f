"""The eval gate: is the freshly trained candidate better than what is served now?

Both sides are scored on the same held-out feedback (completion tokens only):
- ``loss`` (and perplexity): mean negative log-likelihood of the accepted/corrected reviews;
- ``token_accuracy``: top-1 next-token accuracy on those reviews, a cheap task metric.
The reference is the tenant's champion adapter, or the base model when there is no champion yet.

Rule: promote when ``candidate.loss <= reference.loss * (1 - margin)`` and the candidate's token accuracy is
not lower than the reference's by more than ``ACCURACY_TOLERANCE``. Otherwise the champion stays, and the
reason is recorded in the version's metrics and the job's result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from domain.adapters.training import Batch, evaluate

ACCURACY_TOLERANCE = 0.02  # absolute points of token accuracy the candidate may lose while its loss improves


@dataclass
class GateDecision:
    promote: bool
    reason: str
    reference: str  # "champion:<version id>" | "base"
    candidate: dict
    baseline: dict
    margin: float
    relative_improvement: float

    def as_dict(self) -> dict:
        return asdict(self)


def decide(candidate: dict, baseline: dict, margin: float, reference: str = "base") -> GateDecision:
    """Compare two ``training.evaluate`` results by the rule in this module's docstring."""
    c, b = candidate["loss"], baseline["loss"]
    improvement = (b - c) / b if b and b == b else 0.0
    acc_drop = (baseline.get("token_accuracy") or 0.0) - (candidate.get("token_accuracy") or 0.0)
    if c != c:
        promote, why = False, "candidate eval loss is not a number (no held-out tokens)"
    elif c > b * (1 - margin):
        promote, why = False, (f"kept {reference}: candidate eval loss {c:.4f} is not better than {reference}'s "
                               f"{b:.4f} by the margin {margin:.1%} (improvement {improvement:.2%})")
    elif acc_drop > ACCURACY_TOLERANCE:
        promote, why = False, (f"kept {reference}: eval loss improved {improvement:.2%} but token accuracy dropped "
                               f"{acc_drop:.3f} (> {ACCURACY_TOLERANCE})")
    else:
        promote, why = True, (f"promoted: candidate eval loss {c:.4f} vs {reference} {b:.4f} "
                              f"({improvement:.2%} better, margin {margin:.1%})")
    return GateDecision(promote=promote, reason=why, reference=reference, candidate=candidate, baseline=baseline,
                        margin=margin, relative_improvement=improvement)


def score_reference(peft_model, eval_batches: list[Batch], champion_dir: Path | None) -> dict:
    """Evaluate the champion adapter (loaded beside the candidate, then removed) or, without one, the base
    model (adapters disabled)."""
    if champion_dir is None:
        with peft_model.disable_adapter():
            return evaluate(peft_model, eval_batches)
    peft_model.load_adapter(str(champion_dir), adapter_name="champion")
    try:
        peft_model.set_adapter("champion")
        return evaluate(peft_model, eval_batches)
    finally:
        peft_model.set_adapter("default")
        peft_model.delete_adapter("champion")


def run_gate(peft_model, eval_batches: list[Batch], champion_dir: Path | None, champion_id: str | None,
             margin: float) -> GateDecision:
    candidate = evaluate(peft_model, eval_batches)
    baseline = score_reference(peft_model, eval_batches, champion_dir)
    reference = f"champion:{champion_id}" if champion_id else "base"
    return decide(candidate, baseline, margin, reference)
