"""Feedback on reviews: the user's verdict (accept/reject) and an optional corrected review.

Each row is linked to its review, the adapter version that wrote the review and the tenant: accepted
reviews and corrections are the retraining data set (domain/adapters). A tenant-scoped call (``tenant=``)
only finds that tenant's reviews; another tenant's review id reads as not found.

    from domain.feedback import feedback
    feedback(review_id, "accept")
    feedback(review_id, "reject", correction="Summary: ...\nFindings:\n- [high] line 3: ...", tenant="acme")
    feedback(review_id, "reject", finding=2)   # one finding: counted against its rule

Per finding, each verdict is stored with the finding's number and rule (``model:<category>`` for the model's
own findings). When a tenant's rejections of one rule minus its acceptances reach
``FOUNDRY_SUPPRESS_AFTER_REJECTIONS`` (default 3), the rule is suppressed for that tenant: its findings are
left out of later reviews until ``clear_suppressions`` (``foundry suppressions clear``) lifts it.
"""

from __future__ import annotations

from sqlalchemy import select

from domain.ledger.db import session_scope
from domain.ledger.models import Feedback, Review

VERDICTS = {"accept": "accept", "accepted": "accept", "reject": "reject", "rejected": "reject"}
MAX_CORRECTION_CHARS = 100_000


def rule_key(finding: dict) -> str:
    """What feedback and suppressions count a finding under: its rule id, or ``model:<category>``."""
    return finding.get("rule_id") or f"model:{finding.get('category') or 'bug'}"


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
             created_by: str | None = None, finding: int | None = None) -> str:
    """The Python API: ``feedback(review_id, "accept"|"reject", correction=None, tenant=None, finding=None)``
    → feedback id. ``finding=N`` judges the review's N-th finding (1-based) instead of the whole review."""
    if finding is not None:
        return record_finding_feedback(review_id, finding, verdict, correction, tenant=tenant,
                                       created_by=created_by)["id"]
    return record_feedback(review_id, verdict, correction, tenant=tenant, created_by=created_by)


def feedback_for_review(review_id: str, tenant: str | None = None, url: str | None = None) -> list[dict]:
    with session_scope(url) as s:
        q = select(Feedback).where(Feedback.review_id == review_id)
        if tenant is not None:
            q = q.where(Feedback.tenant_id == tenant)
        return [{"id": f.id, "verdict": f.verdict, "correction": f.correction, "created_by": f.created_by,
                 "created_at": f.created_at, "adapter_version_id": f.adapter_version_id,
                 "finding": f.finding_index, "rule_id": f.rule_id}
                for f in s.scalars(q.order_by(Feedback.created_at))]


# ---- feedback per finding, and the rules a tenant keeps rejecting ----------------------------------

DEFAULT_SUPPRESS_AFTER = 3


def suppress_after() -> int:
    """Net rejections (rejections minus acceptances) of one rule by one tenant that suppress the rule:
    ``FOUNDRY_SUPPRESS_AFTER_REJECTIONS`` (default 3; 0 turns suppression off)."""
    import os

    raw = os.environ.get("FOUNDRY_SUPPRESS_AFTER_REJECTIONS", str(DEFAULT_SUPPRESS_AFTER))
    try:
        return max(0, int(raw))
    except ValueError:
        raise ValueError(f"FOUNDRY_SUPPRESS_AFTER_REJECTIONS must be an integer, not {raw!r}") from None


def _finding_of(review: Review, number: int) -> dict:
    findings = review.findings or []
    if not 1 <= number <= len(findings):
        raise ValueError(f"finding: review {review.id} has {len(findings)} finding(s); --finding must be 1..{len(findings)}"
                         if findings else f"finding: review {review.id} has no findings")
    return findings[number - 1]


def record_finding_feedback(review_id: str, number: int, verdict: str, correction: str | None = None, *,
                            tenant: str | None = None, created_by: str | None = None, url: str | None = None,
                            threshold: int | None = None) -> dict:
    """A verdict on finding ``number`` (1-based, as the review lists them). Returns {id, rule_id, suppressed}:
    ``suppressed`` is True when this rejection made the tenant's net rejections of the rule reach the threshold."""

    with session_scope(url) as s:  # a bad finding number is refused before anything is stored
        review = s.get(Review, review_id)
        if review is not None and (tenant is None or review.tenant_id == tenant):
            rule = rule_key(_finding_of(review, int(number)))
    fid = record_feedback(review_id, verdict, correction, tenant=tenant, created_by=created_by, url=url)
    with session_scope(url) as s:
        row = s.get(Feedback, fid)
        row.finding_index, row.rule_id = int(number), rule
        s.flush()
        suppressed = _maybe_suppress(s, row.tenant_id, row.rule_id, suppress_after() if threshold is None else threshold)
        return {"id": fid, "rule_id": row.rule_id, "suppressed": suppressed}


def _maybe_suppress(s, tenant: str, rule: str, threshold: int) -> bool:
    from sqlalchemy import func

    from domain.ledger.models import RuleSuppression

    if threshold <= 0:
        return False
    existing = s.get(RuleSuppression, (tenant, rule))
    if existing is not None and existing.active:
        return False
    q = select(Feedback.verdict, func.count()).where(Feedback.tenant_id == tenant, Feedback.rule_id == rule)
    if existing is not None and existing.cleared_at is not None:
        q = q.where(Feedback.created_at > existing.cleared_at)
    counts = dict(s.execute(q.group_by(Feedback.verdict)).all())
    net = counts.get("reject", 0) - counts.get("accept", 0)
    if net < threshold:
        return False
    if existing is None:
        s.add(RuleSuppression(tenant_id=tenant, rule_id=rule, rejections=counts.get("reject", 0), active=True))
    else:
        existing.active, existing.rejections = True, counts.get("reject", 0)
    return True


def suppressed_rules(tenant: str, url: str | None = None) -> frozenset[str]:
    from domain.ledger.models import RuleSuppression

    with session_scope(url) as s:
        return frozenset(s.scalars(select(RuleSuppression.rule_id).where(RuleSuppression.tenant_id == tenant,
                                                                         RuleSuppression.active.is_(True))))


def list_suppressions(tenant: str | None = None, url: str | None = None) -> list[dict]:
    from domain.ledger.models import RuleSuppression

    with session_scope(url) as s:
        q = select(RuleSuppression).order_by(RuleSuppression.tenant_id, RuleSuppression.rule_id)
        if tenant is not None:
            q = q.where(RuleSuppression.tenant_id == tenant)
        return [{"tenant": r.tenant_id, "rule_id": r.rule_id, "rejections": r.rejections, "active": r.active,
                 "created_at": r.created_at, "cleared_at": r.cleared_at} for r in s.scalars(q)]


def clear_suppressions(tenant: str, rule: str | None = None, url: str | None = None) -> int:
    """Lift a tenant's suppressions (one rule, or all); earlier rejections stop counting. Returns how many."""
    from domain.ledger.models import RuleSuppression, utcnow

    with session_scope(url) as s:
        q = select(RuleSuppression).where(RuleSuppression.tenant_id == tenant, RuleSuppression.active.is_(True))
        if rule is not None:
            q = q.where(RuleSuppression.rule_id == rule)
        rows = list(s.scalars(q))
        for r in rows:
            r.active, r.cleared_at = False, utcnow()
        return len(rows)
