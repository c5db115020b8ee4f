"""The gate's review-quality measure: items from held-out feedback, reviewed by a real (tiny) model with the
real analyzers, scored by located findings; the tenant's suppressed rules are left out of both sides."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from domain.adapters.data import FeedbackExample
from domain.adapters.review_eval import QualityMeasure, items_from
from domain.models import load_causal_lm
from domain.review.quality import score
from tests.fixtures.review import save_lively_tiny_model

CODE = "def load(data):\n    return eval(data)\n"  # bandit B307 on line 2
CLEAN = "def add(a, b):\n    return a + b\n"
AT = datetime(2026, 12, 1, tzinfo=timezone.utc)


def example(code, completion, source="accepted", path="m.py", is_diff=False):
    return FeedbackExample(code=code, path=path, language="python", is_diff=is_diff, completion=completion,
                           source=source, feedback_at=AT)


def test_items_group_feedback_by_file_and_take_the_lines_it_teaches():
    items = items_from([
        example(CODE, "Summary: eval.\nFindings:\n- [high] line 2: eval of input"),
        example(CODE, "Summary: x.\nFindings:\n- [low] line 1: name", source="correction"),
        example(CLEAN, "Summary: fine.\nFindings: none"),
        example("--- a\n+++ b\n@@ -1 +1 @@\n-x\n+y\n", "Summary: d.\nFindings:\n- [low] line 1: y", is_diff=True),
    ], limit=10)
    assert [(i.code, i.labels) for i in items] == [(CODE, (1, 2)), (CLEAN, ())]
    assert len(items_from([example(CODE, "Summary: a\nFindings: none"), example(CLEAN, "Findings: none")], 1)) == 1


def test_score_counts_each_label_once_and_clean_files_as_false():
    found = [[{"line": 3}, {"line": 3}, {"line": None}], [{"line": 1}]]
    s = score([[2], []], found)
    assert (s["located"], s["findings"], s["labels"]) == (1, 4, 1)
    assert s["precision"] == 0.25 and s["recall"] == 1.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_causal_lm(str(save_lively_tiny_model(tmp_path_factory.mktemp("review-eval") / "m")), device="cpu")


def test_measure_reviews_with_analyzers_and_leaves_suppressed_rules_out(tiny):
    examples = [example(CODE, "Summary: eval.\nFindings:\n- [high] line 2: eval of input"),
                example(CLEAN, "Summary: fine.\nFindings: none")]
    measure = QualityMeasure.prepare(tiny.tokenizer, examples, 512, frozenset(), max_items=8, max_new_tokens=32)
    assert [p.item.labels for p in measure.prepared] == [(2,), ()]
    result = measure.run(tiny.model)
    assert result["labels"] == 1 and result["located"] == 1  # bandit's eval finding sits on the labelled line
    assert result["findings"] >= 1 and result["precision"] == round(1 / result["findings"], 3)
    assert "held-out feedback" in result["measure"]
    assert not tiny.model.training

    rules = lambda m: {f["rule_id"] for r in m.reviews(tiny.model) for f in r}  # noqa: E731
    assert "B307" in rules(measure)
    assert "B307" not in rules(QualityMeasure.prepare(tiny.tokenizer, examples, 512, frozenset({"B307"}), 8, 32))
    assert QualityMeasure.prepare(tiny.tokenizer, examples, 512, frozenset(), max_items=0, max_new_tokens=32) is None
