"""The review CLI: feedback, budgets, and the audit views of costs and of one review (adapter, cost, lineage)."""

from __future__ import annotations

import json
import uuid
from decimal import Decimal

from domain.ledger.db import session_scope
from domain.ledger.models import AdapterVersion, Feedback, Job, Review, UsageCost
from tests.conftest import add_tenant
from worker.cli import main


def seed_review(tenant="acme") -> tuple[str, str, str]:
    """A review written by adapter v2 (a retrain of v1), with its job and usage."""
    with session_scope() as s:
        v1 = AdapterVersion(tenant_id=tenant, name="reviewer", version=1, base_model_id="tiny", base_model_hash="h",
                            status="archived")
        s.add(v1)
        s.flush()
        v2 = AdapterVersion(tenant_id=tenant, name="reviewer", version=2, parent_id=v1.id, base_model_id="tiny",
                            base_model_hash="h", dataset_hash="d" * 64, dataset_size=12, status="promoted",
                            artifact_sha256="a" * 64)
        s.add(v2)
        job = Job(id=uuid.uuid4().hex, kind="review", tenant_id=tenant, status="succeeded", attempts=1, worker="w:1")
        s.add(job)
        s.flush()
        review = Review(job_id=job.id, tenant_id=tenant, adapter_version_id=v2.id, model_id="tiny", code="x = 1\n",
                        code_sha256="0" * 64, raw_text="Summary: ok", summary="ok",
                        findings=[{"line": 1, "end_line": None, "severity": "low", "message": "unused"}],
                        context_chunks=[{"id": "doc#1", "score": 0.7}], index_version=3)
        s.add(review)
        s.add(UsageCost(job_id=job.id, tenant_id=tenant, kind="review", adapter_version_id=v2.id, model_id="tiny",
                        prompt_tokens=120, completion_tokens=30, wall_seconds=0.5, cost=Decimal("0.000105")))
        s.flush()
        return review.id, v1.id, v2.id


def test_audit_review_shows_adapter_cost_and_lineage(sqlite_ledger, capsys):
    add_tenant(sqlite_ledger, "acme")
    rid, v1, v2 = seed_review()
    assert main(["audit", "review", rid, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["audit"]["adapter_version_id"] == v2 and data["audit"]["prompt_tokens"] == 120
    assert Decimal(str(data["audit"]["cost"])) == Decimal("0.000105")
    assert [v["id"] for v in data["adapter_lineage"]] == [v2, v1]
    assert data["review"]["context_chunks"][0]["id"] == "doc#1"

    assert main(["audit", "review", rid]) == 0
    out = capsys.readouterr().out
    assert "reviewer v2" in out and "adapter lineage" in out and "0.000105" in out
    add_tenant(sqlite_ledger, "rival")
    assert main(["audit", "review", rid, "--tenant", "rival"]) == 1  # not found for another tenant


def test_feedback_command(sqlite_ledger, tmp_path, capsys):
    add_tenant(sqlite_ledger, "acme")
    rid, _, v2 = seed_review()
    correction = tmp_path / "fix.txt"
    correction.write_text("Summary: x is never used.\nFindings:\n- [low] line 1: remove x\n")
    assert main(["feedback", rid, "--accept"]) == 0
    assert main(["feedback", rid, "--reject", "--correction", str(correction), "--tenant", "acme"]) == 0
    assert main(["feedback", rid, "--accept", "--tenant", "rival"]) == 1
    assert main(["feedback", "missing", "--accept"]) == 1
    with session_scope() as s:
        rows = s.query(Feedback).order_by(Feedback.created_at).all()
        assert [(f.verdict, f.adapter_version_id, f.tenant_id) for f in rows] == [("accept", v2, "acme"), ("reject", v2, "acme")]
        assert rows[1].correction.startswith("Summary: x is never used.")
    assert main(["audit", "review", rid]) == 0
    assert "(with correction)" in capsys.readouterr().out


def test_budget_set_show_and_audit_costs(sqlite_ledger, capsys):
    add_tenant(sqlite_ledger, "acme")
    seed_review()
    assert main(["budget", "set", "--tenant", "acme", "--daily-tokens", "1000", "--monthly-cost", "2.5"]) == 0
    assert main(["budget", "show", "--tenant", "acme", "--json"]) == 0
    capsys.readouterr()
    assert main(["budget", "set", "--tenant", "acme", "--daily-tokens", "none"]) == 0
    capsys.readouterr()
    assert main(["budget", "show", "--tenant", "acme", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["daily_token_budget"] is None and Decimal(st["monthly_cost_budget"]) == Decimal("2.5")
    assert st["tokens_today"] == 150
    assert main(["budget", "show", "--tenant", "ghost"]) == 1

    for by in ("tenant", "day", "adapter"):
        assert main(["audit", "costs", "--by", by, "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert len(rows) == 1 and rows[0]["tokens"] == 150 and rows[0]["jobs"] == 1
    assert main(["audit", "costs", "--by", "adapter", "--tenant", "acme", "--since", "1d"]) == 0
    assert "costs by adapter" in capsys.readouterr().out
