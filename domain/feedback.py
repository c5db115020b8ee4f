"""Feedback on reviews: the user's verdict (accept/reject) and an optional corrected review.

Each row is linked to its review, the adapter version that wrote the review and the tenant: accepted
reviews and corrections are the retraining data set (domain/adapters). A tenant-scoped call (``tenant=``)
only finds that tenant's reviews; another tenant's review id reads as not found.

    from domain.feedback import feedback
    feedback(review_id, "accept")
    feedback(review_id, "reject", correction="Summary: ...\nFindings:\n- [high] line 3: ...", tenant="acme")
"""

from __future__ import annotations

from sqlalchemy import select

from domain.ledger.db import session_scope
from domain.ledger.models import Feedback, Review

VERDICTS = {"accept": "accept", "accepted": "accept", "reject": "reject", "rejected": "reject"}
MAX_CORRECTION_CHARS = 100_000


def record_feedback(review_id: str, verdict: str, correction: str | None = None, *, tenant: str | None = None,
                    created_by: str | None = None, url: str | None = None) -> str:
    """Store one verdict on a review; returns the feedback id.

    Raises ValueError for a verdict other than accept/reject or an oversized/binary correction, and
    LookupError when the review does not exist (or belongs to another tenant than ``tenant``)."""
    normalized = VERDICTS.get(str(verdict).strip().lower())
    if normalized is None:
        raise ValueError(f"verdict must be 'accept' or 'reject', not {verdict!r}")
    if correction is not None:
        if "\x00" in correction:
            raise ValueError("correction contains NUL bytes: binary content is not a review")
        if len(correction) > MAX_CORRECTION_CHARS:
            raise ValueError(f"correction is longer than {MAX_CORRECTION_CHARS} characters")
        correction = correction if correction.strip() else None
    with session_scope(url) as s:
        q = select(Review).where(Review.id == review_id)
        if tenant is not None:
            q = q.where(Review.tenant_id == tenant)
        review = s.scalar(q)
        if review is None:
            scope = f" for tenant {tenant!r}" if tenant is not None else ""
            raise LookupError(f"review {review_id!r} not found{scope}")
        row = Feedback(review_id=review.id, tenant_id=review.tenant_id, adapter_version_id=review.adapter_version_id,
                       verdict=normalized, correction=correction, created_by=created_by)
        s.add(row)
        s.flush()
        return row.id


def feedback(review_id: str, verdict: str, correction: str | None = None, *, tenant: str | None = None,
             created_by: str | None = None) -> str:
    """The Python API: ``feedback(review_id, "accept"|"reject", correction=None, tenant=None)`` → feedback id."""
    return record_feedback(review_id, verdict, correction, tenant=tenant, created_by=created_by)


def feedback_for_review(review_id: str, tenant: str | None = None, url: str | None = None) -> list[dict]:
    with session_scope(url) as s:
        q = select(Feedback).where(Feedback.review_id == review_id)
        if tenant is not None:
            q = q.where(Feedback.tenant_id == tenant)
        return [{"id": f.id, "verdict": f.verdict, "correction": f.correction, "created_by": f.created_by,
                 "created_at": f.created_at, "adapter_version_id": f.adapter_version_id}
                for f in s.scalars(q.order_by(Feedback.created_at))]
