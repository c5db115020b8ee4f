"""The retraining data set from feedback: what becomes an example, dedup, hash, windows, split, prompts."""

from __future__ import annotations

from datetime import timedelta

from domain.adapters import data
from domain.ledger.db import session_scope
from domain.ledger.models import utcnow
from domain.review.findings import headline
from tests.conftest import add_tenant
from tests.fixtures.adapters import seed_feedback, stdlib_review_pairs


def test_accepts_and_corrections_become_examples(sqlite_ledger):
    add_tenant(sqlite_ledger, "acme")
    pairs = stdlib_review_pairs(4)
    seed_feedback("acme", pairs, verdicts=["accept", "correct", "reject", "accept"])
    with session_scope() as s:
        ds = data.collect(s, "acme")
        assert data.count_new_feedback(s, "acme", None) == 3
    assert ds.feedback_rows == 4 and len(ds.examples) == 3
    assert ds.skipped["rejected_without_correction"] == 1
    by_code = {e.code: e for e in ds.examples}
    assert by_code[pairs[0][1]].completion == pairs[0][2] and by_code[pairs[0][1]].source == "accepted"
    assert by_code[pairs[1][1]].completion == pairs[1][2] and by_code[pairs[1][1]].source == "correction"
    assert pairs[2][1] not in by_code


def test_duplicates_collapse_and_hash_is_stable(sqlite_ledger):
    add_tenant(sqlite_ledger, "acme")
    pairs = stdlib_review_pairs(3)
    seed_feedback("acme", pairs + pairs[:2])  # the same review accepted twice
    with session_scope() as s:
        ds1 = data.collect(s, "acme")
        ds2 = data.collect(s, "acme")
    assert len(ds1.examples) == 3 and ds1.skipped["duplicates"] == 2
    assert ds1.dataset_hash == ds2.dataset_hash and len(ds1.dataset_hash) == 64
    assert [e.sha256 for e in ds1.examples] == sorted(e.sha256 for e in ds1.examples)


def test_window_and_tenant_isolation(sqlite_ledger):
    add_tenant(sqlite_ledger, "acme")
    pairs = stdlib_review_pairs(6)
    t0 = utcnow() - timedelta(hours=1)
    seed_feedback("acme", pairs[:3], start=t0)
    seed_feedback("acme", pairs[3:5], start=t0 + timedelta(minutes=30))
    seed_feedback("other", pairs[5:], start=t0)
    with session_scope() as s:
        everything = data.collect(s, "acme")
        newer = data.collect(s, "acme", since=t0 + timedelta(seconds=2))  # after the first three
        window = data.collect(s, "acme", since=t0 + timedelta(seconds=2), until=t0 + timedelta(minutes=30))
        assert data.count_new_feedback(s, "acme", t0 + timedelta(seconds=2)) == 2
    assert len(everything.examples) == 5 and everything.feedback_until == t0 + timedelta(minutes=30, milliseconds=1)
    assert {e.code for e in newer.examples} == {p[1] for p in pairs[3:5]}
    assert len(window.examples) == 1
    assert pairs[5][1] not in {e.code for e in everything.examples}


def test_split_is_by_hash_and_never_empty(sqlite_ledger):
    add_tenant(sqlite_ledger, "acme")
    seed_feedback("acme", stdlib_review_pairs(40))
    with session_scope() as s:
        ds = data.collect(s, "acme")
    train, held = ds.split(0.25)
    assert len(train) + len(held) == 40 and set(map(id, train)).isdisjoint(map(id, held))
    assert 4 <= len(held) <= 18
    smaller = data.Dataset(ds.examples[:20], "h", 20, None)
    # an example's side does not change when the data set changes
    assert {e.sha256 for e in smaller.split(0.25)[1]} <= {e.sha256 for e in held} | {smaller.examples[-1].sha256}
    one = data.Dataset(ds.examples[:1], "h", 1, None)
    assert one.split(0.2) == (ds.examples[:1], ds.examples[:1])
    two = data.Dataset(ds.examples[:2], "h", 2, None)
    t2, h2 = two.split(0.9)
    assert len(t2) == 1 and len(h2) == 1


def test_tokenize_uses_the_review_prompt_and_fits_the_window(tiny_tokenizer):
    from domain.prompting import SYSTEM_PROMPT

    path, code, review = stdlib_review_pairs(1)[0]
    ex = data.FeedbackExample(code, path, None, False, review, "accepted", None)
    tok = data.tokenize(tiny_tokenizer, ex, 4096)
    text = tiny_tokenizer.decode(tok.input_ids)
    assert SYSTEM_PROMPT[:40] in text and review in text and not tok.prompt_truncated
    short = data.tokenize(tiny_tokenizer, ex, 200)
    assert len(short.input_ids) <= 200 and short.prompt_truncated and short.completion_tokens > 0
    assert len(short.input_ids) == len(short.labels)


def test_diff_detection():
    assert data.looks_like_diff("diff --git a/x b/x\n", None)
    assert data.looks_like_diff("--- a/x\n+++ b/x\n", "python")
    assert not data.looks_like_diff("def f():\n    pass\n", "python")


def test_a_grounded_reviews_training_prompt_carries_its_analyzer_findings(sqlite_ledger, tiny_tokenizer):
    """Train on the prompt that is served: the analyzer block of a grounded review (its non-model findings)."""
    from domain.ledger.models import Review

    add_tenant(sqlite_ledger, "acme")
    code = "def load(data):\n    return eval(data)\n"
    seed_feedback("acme", [("m.py", code, "Summary: eval.\nFindings:\n- [high] line 2: eval of input"),
                           ("n.py", "def f():\n    return 1\n", "Summary: fine.\nFindings: none")])
    bandit = {"rule_id": "B307", "line": 2, "severity": "medium", "category": "code_injection",
              "message": "Use of possibly insecure function - consider using safer ast.literal_eval.", "source": "bandit",
              "confidence": 0.9, "end_line": None}
    model = {"rule_id": None, "line": 1, "severity": "low", "category": "bug", "message": "name", "source": "model"}
    with session_scope() as s:
        grounded = s.query(Review).filter_by(path="m.py").one()
        grounded.findings, grounded.analysis = [bandit, model], {"supported": True, "skipped": None, "stages": []}
    with session_scope() as s:
        by_path = {e.path: e for e in data.collect(s, "acme").examples}
    assert by_path["m.py"].analysis == ({k: bandit[k] for k in ("rule_id", "line", "severity", "category", "message")},)
    assert by_path["n.py"].analysis is None  # no analyzer stage recorded: the prompt has no analyzer block
    prompt = lambda e: tiny_tokenizer.decode(data.tokenize(tiny_tokenizer, e, 2048).input_ids)
    assert "line 2: code_injection: Use of possibly insecure function" in prompt(by_path["m.py"]) and "(B307)" in prompt(by_path["m.py"])
    assert "Static analyzers" not in prompt(by_path["n.py"])

    from domain.ledger.models import RuleSuppression  # suppressed since: the served prompt no longer lists it

    with session_scope() as s:
        s.add(RuleSuppression(tenant_id="acme", rule_id="B307", rejections=3, active=True))
    with session_scope() as s:
        by_path = {e.path: e for e in data.collect(s, "acme").examples}
    assert by_path["m.py"].analysis == ()
    assert "(B307)" not in prompt(by_path["m.py"]) and "Static analyzers found nothing" in prompt(by_path["m.py"])


def _judged(s, tenant: str, path: str, code: str, findings: list[dict], verdicts: list[tuple[int, str]], start):
    """A stored review with ``findings`` and one finding-level feedback row per (index, verdict), oldest first."""
    import hashlib

    from domain.ledger.models import Feedback, Job, Review, new_id

    job = Job(id=new_id(), kind="review", tenant_id=tenant, payload={"code": code}, status="succeeded",
              created_by="test")
    s.add(job)
    s.flush()
    rv = Review(id=new_id(), job_id=job.id, tenant_id=tenant, model_id="test", path=path, code=code,
                code_sha256=hashlib.sha256(code.encode()).hexdigest(), raw_text="(model text)",
                summary=headline(findings) + " eval of untrusted input", findings=findings)
    s.add(rv)
    s.flush()
    for i, (n, verdict) in enumerate(verdicts):
        s.add(Feedback(review_id=rv.id, tenant_id=tenant, verdict=verdict, finding_index=n,
                       rule_id=findings[n - 1].get("rule_id"), created_by="test",
                       created_at=start + timedelta(milliseconds=i)))
    s.flush()


def test_a_judged_review_teaches_its_kept_findings_and_a_clean_one_teaches_none(sqlite_ledger):
    """Rejections are learnt: the target is the review without its rejected findings, 'no findings' when none is
    left (a clean file whose every finding the tenant rejected), the newest verdict on a finding counting."""
    from domain.review.parse import parse_review

    add_tenant(sqlite_ledger, "acme")
    real = {"rule_id": "B307", "line": 2, "severity": "high", "category": "code_injection", "message": "eval of input",
            "source": "bandit"}
    noise = {"rule_id": None, "line": 1, "severity": "low", "category": "style", "message": "name it better",
             "source": "model"}
    t0 = utcnow() - timedelta(seconds=5)
    with session_scope() as s:
        _judged(s, "acme", "bad.py", "def f(d):\n    return eval(d)\n", [noise, real], [(1, "reject"), (2, "accept")], t0)
        _judged(s, "acme", "clean.py", "def f(d):\n    return int(d)\n", [noise, {**real, "line": 2}],
                [(1, "reject"), (2, "accept"), (2, "reject")], t0 + timedelta(seconds=1))  # changed its mind
    with session_scope() as s:
        ds = data.collect(s, "acme")
        assert data.count_new_feedback(s, "acme", None) == 5  # rejections of findings count: they teach
    by_path = {e.path: e for e in ds.examples}
    assert set(by_path) == {"bad.py", "clean.py"} and {e.source for e in ds.examples} == {"judged"}
    bad = parse_review(by_path["bad.py"].completion, n_lines=2)
    assert [(f["line"], f["severity"]) for f in bad.findings] == [(2, "high")]
    assert "eval of input" in by_path["bad.py"].completion and "name it better" not in by_path["bad.py"].completion
    assert by_path["clean.py"].completion == data.NO_FINDINGS
    assert bad.summary == "eval of untrusted input"  # the model's own words, never the service's headline
    assert parse_review(data.NO_FINDINGS, n_lines=2).findings == []


def test_a_judged_reviews_target_keeps_the_models_summary_less_sentences_echoing_the_code_gutter():
    """The prompt shows code as "12| text"; a summary sentence quoting that gutter is the model copying the
    prompt's layout (an adapter trained on it enumerates line numbers), so the target leaves it out, and falls
    back to the headline of the kept findings when nothing else is left."""
    from domain.ledger.models import Review
    from domain.review.findings import headline

    kept = {"rule_id": "E722", "line": 7, "severity": "medium", "category": "bare_except", "source": "ruff",
            "message": "Do not use bare `except`"}
    noisy = Review(summary="This Python code has a bare except. The line `1| import json` is a syntax error. "
                           "The `2| 1| 1` is a syntax error. Catch the exception you expect.", findings=[kept])
    assert data.model_summary(noisy) == "This Python code has a bare except. Catch the exception you expect."
    assert data.kept_review(noisy, {1: "accept"}) == ("Summary: This Python code has a bare except. Catch the "
                                                      "exception you expect.\nFindings:\n- [medium] line 7: "
                                                      "Do not use bare `except`")
    only_echo = Review(summary=headline([kept]) + " The `3| 2| 2` is a syntax error.", findings=[kept])
    assert data.model_summary(only_echo) == ""
    assert data.kept_review(only_echo, {}).startswith(f"Summary: {headline([kept])}\nFindings:\n- [medium] line 7")
    assert data.model_summary(Review(summary="Use a | b for the union; x = 3|4 is fine.", findings=[])) == (
        "Use a | b for the union; x = 3|4 is fine.")
