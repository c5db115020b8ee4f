"""Feedback on reviews: linked to the review, its adapter version and tenant; tenant isolation."""

from __future__ import annotations

import uuid

import pytest

from domain.feedback import feedback, feedback_for_review, record_feedback
from domain.ledger.db import session_scope
from domain.ledger.models import AdapterVersion, Feedback, Job, Review
from tests.conftest import add_tenant


def make_review(tenant: str, adapter_version_id: str | None = None) -> str:
    with session_scope() as s:
        job = Job(id=uuid.uuid4().hex, kind="review", tenant_id=tenant, status="succeeded")
        s.add(job)
        s.flush()
        review = Review(job_id=job.id, tenant_id=tenant, adapter_version_id=adapter_version_id, model_id="tiny",
                        code="x = 1\n", code_sha256="0" * 64, raw_text="Summary: fine.", summary="fine.")
        s.add(review)
        s.flush()
        return review.id


def test_accept_reject_and_correction_are_linked_to_review_adapter_and_tenant(sqlite_ledger):
    add_tenant(sqlite_ledger, "acme")
    with session_scope() as s:
        v = AdapterVersion(tenant_id="acme", name="reviewer", version=1, base_model_id="tiny", base_model_hash="h")
        s.add(v)
        s.flush()
        vid = v.id
    rid = make_review("acme", vid)
    f1 = feedback(rid, "accept")
    f2 = record_feedback(rid, "Rejected", correction="Summary: x is unused.\nFindings:\n- [low] line 1: remove x",
                         tenant="acme", created_by="cli:dev")
    with session_scope() as s:
        a, b = s.get(Feedback, f1), s.get(Feedback, f2)
        assert (a.verdict, a.tenant_id, a.adapter_version_id, a.review_id, a.correction) == ("accept", "acme", vid, rid, None)
        assert (b.verdict, b.created_by) == ("reject", "cli:dev") and b.correction.startswith("Summary: x is unused.")
    assert [f["verdict"] for f in feedback_for_review(rid)] == ["accept", "reject"]


def test_a_tenant_cannot_give_feedback_on_another_tenants_review(sqlite_ledger):
    add_tenant(sqlite_ledger, "acme")
    add_tenant(sqlite_ledger, "rival")
    rid = make_review("acme")
    with pytest.raises(LookupError, match="not found for tenant 'rival'"):
        feedback(rid, "reject", tenant="rival")
    assert feedback_for_review(rid, tenant="rival") == []
    with session_scope() as s:
        assert s.query(Feedback).count() == 0


@pytest.mark.parametrize("verdict, correction, error", [
    ("maybe", None, ValueError),
    ("accept", "bad\x00bytes", ValueError),
    ("accept", "x" * 100_001, ValueError),
])
def test_bad_feedback_is_refused(sqlite_ledger, verdict, correction, error):
    add_tenant(sqlite_ledger, "acme")
    rid = make_review("acme")
    with pytest.raises(error):
        feedback(rid, verdict, correction)


def test_unknown_review(sqlite_ledger):
    with pytest.raises(LookupError, match="review 'nope' not found"):
        feedback("nope", "accept")
    add_tenant(sqlite_ledger, "acme")
    rid = make_review("acme")
    assert feedback(rid, "accept", correction="   ") and feedback_for_review(rid)[0]["correction"] is None
