"""The eval gate's rule: promote only when the loss improves by the margin and accuracy does not drop."""

from __future__ import annotations

import math

import pytest

from domain.adapters.gate import ACCURACY_TOLERANCE, decide


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
