"""Feedback per finding through the ``foundry`` CLI on SQLite and PostgreSQL: stored with the review, the
finding, its rule, the adapter version and the tenant; a rule rejected often enough is suppressed for that
tenant only (visible in ``foundry suppressions list``, lifted by ``clear``); retraining data takes the
accepted findings and corrections as targets."""

from __future__ import annotations

import json
import uuid

import pytest
from sqlalchemy import select

from domain.adapters.data import collect
from domain.feedback import suppressed_rules
from domain.ledger.db import session_scope
from domain.ledger.models import AdapterVersion, Feedback, Job, Review
from domain.review.findings import make_finding
from tests.conftest import add_tenant
from worker.cli import main

CODE = 'password = "hunter2-secret"\nvalue = eval(input())\n'
FINDINGS = [make_finding(rule_id="B307", line=2, message="eval", source="bandit", category="code_injection",
                         severity="medium", confidence=0.9),
            make_finding(rule_id="B105", line=1, message="hardcoded password", source="bandit",
                         category="hardcoded_secret", severity="low", confidence=0.7)]


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request):
    return request.getfixturevalue("sqlite_ledger" if request.param == "sqlite" else "pg_ledger")


def seed(tenant: str) -> tuple[str, str]:
    with session_scope() as s:
        v = AdapterVersion(tenant_id=tenant, name="reviewer", version=len(list(s.scalars(select(AdapterVersion)))) + 1,
                           base_model_id="tiny", base_model_hash="h")
        job = Job(id=uuid.uuid4().hex, kind="review", tenant_id=tenant, status="succeeded")
        s.add_all([v, job])
        s.flush()
        r = Review(job_id=job.id, tenant_id=tenant, adapter_version_id=v.id, model_id="tiny", code=CODE,
                   code_sha256="0" * 64, raw_text="Summary: x", summary="x", findings=FINDINGS)
        s.add(r)
        s.flush()
        return r.id, v.id


def test_finding_feedback_suppression_and_training_data(ledger, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FOUNDRY_SUPPRESS_AFTER_REJECTIONS", "2")
    add_tenant(ledger, "acme")
    add_tenant(ledger, "other")
    rid, vid = seed("acme")
    correction = tmp_path / "fix.txt"
    correction.write_text("Summary: eval of user input.\nFindings:\n- [high] line 2: use ast.literal_eval\n")

    assert main(["feedback", rid, "--finding", "1", "--accept", "--correction", str(correction)]) == 0
    assert main(["feedback", rid, "--finding", "2", "--reject", "--tenant", "acme"]) == 0
    assert suppressed_rules("acme") == frozenset()  # one rejection: below the threshold of 2
    rid2, _ = seed("acme")
    assert main(["feedback", rid2, "--finding", "2", "--reject"]) == 0
    assert "now suppressed" in capsys.readouterr().out
    assert suppressed_rules("acme") == {"B105"} and suppressed_rules("other") == frozenset()

    with session_scope() as s:
        rows = list(s.scalars(select(Feedback).where(Feedback.review_id == rid).order_by(Feedback.created_at)))
        assert [(f.finding_index, f.rule_id, f.verdict, f.tenant_id, f.adapter_version_id) for f in rows] == [
            (1, "B307", "accept", "acme", vid), (2, "B105", "reject", "acme", vid)]

    # bad input names the field; another tenant's review reads as not found
    capsys.readouterr()
    assert main(["feedback", rid, "--finding", "9", "--accept"]) == 2
    assert "finding: review" in capsys.readouterr().err
    assert main(["feedback", rid, "--finding", "1", "--accept", "--tenant", "other"]) == 1  # a runtime error
    assert "not found" in capsys.readouterr().err
    with session_scope() as s:
        assert len(list(s.scalars(select(Feedback)))) == 3  # the refused ones left nothing behind

    assert main(["suppressions", "list", "--tenant", "acme", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["rule_id"], r["active"], r["rejections"]) for r in listed] == [("B105", True, 2)]
    assert main(["suppressions", "clear", "--tenant", "acme", "--rule", "B105"]) == 0
    assert suppressed_rules("acme") == frozenset()
    rid3, _ = seed("acme")
    assert main(["feedback", rid3, "--finding", "2", "--reject"]) == 0
    assert suppressed_rules("acme") == frozenset()  # rejections before the clear no longer count

    with session_scope() as s:
        data = collect(s, "acme")
    targets = [e.completion for e in data.examples]
    assert any("ast.literal_eval" in t for t in targets)  # the correction is a target
    assert not any("hardcoded password" in t for t in targets)  # a rejected finding is not
