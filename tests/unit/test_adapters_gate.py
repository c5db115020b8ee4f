"""The eval gate's rule: promote only when the loss improves by the margin and accuracy does not drop."""

from __future__ import annotations

import math

import pytest

from domain.adapters.gate import ACCURACY_TOLERANCE, LOSS_GUARD, QUALITY_MIN_LABELS, decide


def ev(loss, acc=0.5):
    return {"loss": loss, "perplexity": math.exp(loss), "token_accuracy": acc, "tokens": 100}


@pytest.mark.parametrize("cand, ref, margin, promote, why", [
    (ev(1.80), ev(2.00), 0.05, True, "promoted"),           # 10 % better, margin 5 %
    (ev(1.97), ev(2.00), 0.05, False, "margin"),            # 1.5 % better: not enough
    (ev(2.10), ev(2.00), 0.00, False, "margin"),            # worse
    (ev(2.00), ev(2.00), 0.00, True, "promoted"),           # equal with a zero margin counts as not worse
    (ev(1.50, 0.40), ev(2.00, 0.50), 0.05, False, "token accuracy"),   # loss better, task metric regressed
    (ev(1.50, 0.50 - ACCURACY_TOLERANCE / 2), ev(2.00, 0.50), 0.05, True, "promoted"),
    (ev(float("nan")), ev(2.00), 0.0, False, "not a number"),
])
def test_decide(cand, ref, margin, promote, why):
    d = decide(cand, ref, margin, reference="champion:v1")
    assert d.promote is promote
    assert why in d.reason
    assert d.reference == "champion:v1" and d.margin == margin
    assert d.as_dict()["candidate"] == cand


def test_relative_improvement_is_recorded():
    d = decide(ev(1.5), ev(2.0), 0.1)
    assert d.relative_improvement == pytest.approx(0.25) and "25.00% better" in d.reason


# ---- review quality decides when it was measured ------------------------------------------------------

def q(precision, recall=0.8, labels=10):
    return {"precision": precision, "recall": recall, "f1": 0.0, "located": 0, "findings": 0, "labels": labels,
            "files": 5}


@pytest.mark.parametrize("cand, ref, quality, promote, why", [
    # better loss and accuracy, worse review precision: kept
    (ev(1.50, 0.60), ev(2.00, 0.50), (q(0.40), q(0.60)), False, "review precision 0.400 vs champion:v1 0.600"),
    # slightly worse loss (within the guard), better precision, recall kept: promoted
    (ev(2.05), ev(2.00), (q(0.70), q(0.50)), True, "promoted: review precision 0.700"),
    # better precision bought with recall: kept
    (ev(1.80), ev(2.00), (q(0.90, recall=0.5), q(0.50, recall=0.8)), False, "recall fell"),
    # better precision but the loss collapsed past the guard: kept
    (ev(2.00 * (1 + LOSS_GUARD) + 0.1), ev(2.00), (q(0.70), q(0.50)), False, "worse than"),
    # equal precision: the loss rule decides, and the reason says quality did not
    (ev(1.80), ev(2.00), (q(0.50), q(0.50)), True, "did not decide"),
    (ev(2.10), ev(2.00), (q(0.50), q(0.50)), False, "margin"),
    # too few labelled lines to trust the precision: the loss rule decides
    (ev(1.80), ev(2.00), (q(0.0, labels=1), q(1.0, labels=1)), True, "did not decide"),
    # a candidate without held-out tokens is never promoted, whatever its precision
    (ev(float("nan")), ev(2.00), (q(0.9), q(0.1)), False, "not a number"),
])
def test_quality_decides(cand, ref, quality, promote, why):
    measured = {"candidate": quality[0], "reference": quality[1]}
    d = decide(cand, ref, 0.05, reference="champion:v1", quality=measured)
    assert d.promote is promote
    assert why in d.reason
    recorded = d.as_dict()["quality"]
    assert recorded["candidate"] == quality[0] and recorded["reference"] == quality[1]
    assert recorded["decided"] is (QUALITY_MIN_LABELS <= quality[1]["labels"] and quality[0]["precision"]
                                   != quality[1]["precision"] and cand["loss"] == cand["loss"])


def test_without_quality_the_loss_rule_stands_and_nothing_is_recorded():
    d = decide(ev(1.8), ev(2.0), 0.05)
    assert d.promote and d.quality is None and "review precision" not in d.reason
