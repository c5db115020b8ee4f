"""Review quality: precision and recall of *located* findings against labelled lines.

One rule for every place that measures a review (bench/review_quality.py, bench/feedback_loop.py and the
eval gate in domain/adapters/gate.py): a finding is located when it has a line within ``TOLERANCE`` (±1) of a
labelled line of its file; each label is matched at most once; a finding without a line, or one matching
no free label, is a false finding. A file with no labels (a clean twin) turns all its findings false.

    precision = located findings / all findings     recall = matched labels / all labels
"""

from __future__ import annotations

from collections.abc import Sequence

TOLERANCE = 1


def matching_label(finding: dict, labels: Sequence[int]) -> int | None:
    """The first of ``labels`` the finding's line is within ±TOLERANCE of (None without a line or a match)."""
    line = finding.get("line")
    return None if line is None else next((lab for lab in labels if abs(line - lab) <= TOLERANCE), None)


def located_hits(findings: Sequence[dict], labels: Sequence[int]) -> int:
    """How many of ``findings`` match a distinct label line (±TOLERANCE)."""
    free = list(labels)
    hits = 0
    for f in findings:
        hit = matching_label(f, free)
        if hit is not None:
            free.remove(hit)
            hits += 1
    return hits


def score(labels: Sequence[Sequence[int]], findings: Sequence[Sequence[dict]]) -> dict:
    """Precision, recall and F1 of located findings over files (``labels[i]`` are file i's defect lines,
    ``findings[i]`` the review's findings for it), with the counts they come from."""
    if len(labels) != len(findings):
        raise ValueError(f"{len(labels)} labelled files but {len(findings)} reviews")
    tp = sum(located_hits(f, lab) for f, lab in zip(findings, labels))
    predicted = sum(len(f) for f in findings)
    n_labels = sum(len(lab) for lab in labels)
    precision = tp / predicted if predicted else 0.0
    recall = tp / n_labels if n_labels else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 3), "recall": round(recall, 3), "f1": round(f1, 3), "located": tp,
            "findings": predicted, "labels": n_labels, "files": len(labels)}
