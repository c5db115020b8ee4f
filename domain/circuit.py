"""Circuit breaker per adapter version: a newly promoted champion that keeps failing is rolled back.

``observe_review`` is called after every review job (and by the canary). A failure on a version is
written as a health event (component ``adapter``, event ``review_failure``), so every worker sees the
same count. When the tenant's current champion was promoted less than ``FOUNDRY_CIRCUIT_RECENT_S``
ago and has failed ``FOUNDRY_CIRCUIT_FAILURES`` times within ``FOUNDRY_CIRCUIT_WINDOW_S`` (counted
from its promotion at the earliest), or a canary on the champion fails, the champion alias is moved
back to the previous version with ``domain.adapters.store.rollback`` (recorded in ``alias_history``
with ``moved_by="circuit-breaker"`` and the reason) and a ``rollback`` health event is written.

Only failures of the model/adapter should be reported (``ok=False``): bad input (a rejected job) says
nothing about the adapter.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

from sqlalchemy import desc, select

from domain import adapter_lookup, health
from domain.adapters import store
from domain.config import CircuitSettings, get_settings
from domain.contract import JobContext
from domain.ledger.db import session_scope
from domain.ledger.models import AdapterAlias, AliasHistory, HealthEvent, aware

log = logging.getLogger(__name__)

MOVED_BY = "circuit-breaker"




def _promoted_at(session, tenant: str, version_id: str) -> datetime | None:
    """When the champion alias last moved onto ``version_id``."""
    entry = session.scalar(select(AliasHistory).where(AliasHistory.tenant_id == tenant,
                                                      AliasHistory.alias == store.CHAMPION,
                                                      AliasHistory.to_version_id == version_id)
                           .order_by(desc(AliasHistory.moved_at), desc(AliasHistory.id)).limit(1))
    return aware(entry.moved_at) if entry is not None else None


def _failures_since(session, tenant: str, version_id: str, since: datetime) -> int:
    rows = session.scalars(select(HealthEvent.detail).where(
        HealthEvent.component == "adapter", HealthEvent.event == "review_failure", HealthEvent.tenant_id == tenant,
        HealthEvent.at >= since))
    return sum(1 for d in rows if (d or {}).get("version_id") == version_id)


def observe_review(tenant: str, adapter_version_id: str | None, ok: bool, error: str | None = None,
                   source: str = "review", *, settings: CircuitSettings | None = None,
                   now: datetime | None = None) -> str | None:
    """Record one review (or canary) outcome on an adapter version; roll the champion back when the
    breaker trips. Returns the action taken: None (nothing), "recorded" (a failure counted) or
    "rolled_back" (the champion moved to the previous version)."""
    settings = settings or get_settings().circuit
    if ok or adapter_version_id is None:
        return None
    now = now or datetime.now(timezone.utc)
    is_canary = source == "canary"
    health.record("adapter", "review_failure", "fail", f"{source} failed on adapter version {adapter_version_id}: "
                  f"{(error or '')[:300]}", source=source, tenant_id=tenant,
                  detail={"version_id": adapter_version_id, "error": (error or "")[:1000], "canary": is_canary})
    if not settings.enabled:
        return "recorded"
    try:
        with session_scope() as s:
            alias = s.get(AdapterAlias, (tenant, store.CHAMPION), with_for_update=True)
            if alias is None or alias.version_id != adapter_version_id:
                return "recorded"  # not the champion (or already rolled back by another worker)
            promoted = _promoted_at(s, tenant, adapter_version_id)
            if is_canary:
                reason = f"canary failed on champion {adapter_version_id}: {(error or '')[:300]}"
            else:
                if promoted is None or now - promoted > timedelta(seconds=settings.recent_s):
                    return "recorded"
                since = max(promoted, now - timedelta(seconds=settings.window_s))
                failures = _failures_since(s, tenant, adapter_version_id, since)
                if failures < settings.failures:
                    return "recorded"
                reason = (f"{failures} review failures in {settings.window_s:.0f} s on champion {adapter_version_id} "
                          f"promoted {int((now - promoted).total_seconds())} s ago; last error: {(error or '')[:300]}")
            entry = store.rollback(s, tenant, MOVED_BY, reason)
            target = entry.to_version_id
    except LookupError as exc:
        log.warning("circuit breaker for %s could not roll back: %s", tenant, exc)
        health.record("adapter", "rollback_impossible", "fail", str(exc), source=MOVED_BY, tenant_id=tenant,
                      detail={"version_id": adapter_version_id})
        return "recorded"
    log.error("circuit breaker: tenant %s champion %s rolled back to %s (%s)", tenant, adapter_version_id, target, reason)
    health.record("adapter", "rollback", "degraded", f"champion of {tenant} rolled back from {adapter_version_id} to "
                  f"{target or 'the base model'}: {reason}", source=MOVED_BY, tenant_id=tenant,
                  detail={"from_version_id": adapter_version_id, "to_version_id": target, "reason": reason,
                          "trigger": source})
    return "rolled_back"


def on_review_failure(ctx: JobContext, error: str) -> None:
    """The review kind's failure hook (``domain/kinds.py``): count the failure on the adapter version the job
    used (or would have used), which may roll a freshly promoted champion back."""
    version_id = ctx.info.get("adapter_version_id")
    if version_id is None:
        with session_scope() as s:
            version = adapter_lookup.resolve_adapter(s, ctx.tenant, getattr(ctx.spec, "adapter", None))
            version_id = version.id if version is not None else None
    observe_review(ctx.tenant, version_id, ok=False, error=error, source=ctx.worker)
