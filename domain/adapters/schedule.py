"""Retraining schedules: per tenant and adapter name, a cron expression and a feedback threshold, kept in
the ledger (``retrain_schedules``) so they change without a redeploy (``foundry schedule set ...``).

The beat calls ``tick(now, enqueue, holder)`` every minute. A schedule is **due** when its cron expression
fired after the last fire it handled (``last_run_at``; for a new schedule, the time it was set). A due
schedule enqueues a ``retrain`` only if at least ``min_new_feedback`` usable feedback items arrived since
the adapter's newest version and no retrain it enqueued earlier is still queued or running; either way
that fire is marked handled, and the next one is evaluated at the next cron time.

Never twice, even with two beats (celery #2856):
1. a ledger lease (``leases`` row ``retrain-schedule-tick``): one holder at a time, expiring if it dies;
2. each fire is claimed with a compare-and-set on ``last_run_at`` (only one tick can move it forward);
3. the job's idempotency key is ``schedule:<id>:<fire time>``: a repeated enqueue returns the same job.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from typing import Callable

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError

from domain import checkpoints
from domain.adapters import cron as cronlib
from domain.adapters.data import count_new_feedback
from domain.adapters.store import latest_version
from domain.ledger.db import session_scope
from domain.ledger.models import Job, Lease, RetrainSchedule, Tenant, aware, utcnow

log = logging.getLogger(__name__)

LEASE_NAME = "retrain-schedule-tick"
ACTIVE = ("queued", "running")
# ``updated_at`` says when a person last changed the schedule (a new schedule's first fire comes after it),
# so the beat's own bookkeeping updates keep it as it is (``updated_at=RetrainSchedule.updated_at``).

Enqueue = Callable[[str, dict, "str | None"], str]


# ---- managing schedules ---------------------------------------------------------------------------

def set_schedule(tenant: str, cron: str, *, min_new_feedback: int = 10, adapter_name: str = "reviewer",
                 params: dict | None = None, enabled: bool = True, url: str | None = None) -> dict:
    """Create or change a tenant's schedule. Raises ValueError for a bad cron expression or retrain
    parameters, LookupError for an unknown tenant."""
    from domain.kinds import parse_spec

    cronlib.parse(cron)
    if min_new_feedback < 1:
        raise ValueError("min_new_feedback must be at least 1")
    params = dict(params or {})
    for reserved in ("tenant", "adapter_name", "idempotency_key", "kind"):
        params.pop(reserved, None)
    parse_spec("retrain", {"tenant": tenant, "adapter_name": adapter_name, **params})  # InvalidJob is a ValueError
    with session_scope(url) as s:
        if s.get(Tenant, tenant) is None:
            raise LookupError(f"unknown tenant {tenant!r} (create it with `foundry tenants add {tenant}`)")
        row = s.scalar(select(RetrainSchedule).where(RetrainSchedule.tenant_id == tenant,
                                                     RetrainSchedule.adapter_name == adapter_name))
        if row is None:
            row = RetrainSchedule(tenant_id=tenant, adapter_name=adapter_name, cron=cron)
            s.add(row)
        row.cron, row.min_new_feedback, row.params, row.enabled = cron, min_new_feedback, params, enabled
        row.updated_at = utcnow()
        s.flush()
        return describe(row)


def remove_schedule(tenant: str, adapter_name: str = "reviewer", url: str | None = None) -> bool:
    with session_scope(url) as s:
        row = s.scalar(select(RetrainSchedule).where(RetrainSchedule.tenant_id == tenant,
                                                     RetrainSchedule.adapter_name == adapter_name))
        if row is None:
            return False
        s.delete(row)
        return True


def list_schedules(tenant: str | None = None, url: str | None = None) -> list[dict]:
    with session_scope(url) as s:
        q = select(RetrainSchedule).order_by(RetrainSchedule.tenant_id, RetrainSchedule.adapter_name)
        if tenant:
            q = q.where(RetrainSchedule.tenant_id == tenant)
        return [describe(r) for r in s.scalars(q)]


def describe(row: RetrainSchedule) -> dict:
    c = cronlib.parse(row.cron)
    after = max(aware(row.last_run_at) or aware(row.updated_at) or utcnow(), utcnow())
    upcoming = c.upcoming(after, 3) if row.enabled else []
    return {"id": row.id, "tenant": row.tenant_id, "adapter_name": row.adapter_name, "cron": row.cron,
            "min_new_feedback": row.min_new_feedback, "enabled": row.enabled, "params": row.params,
            "last_run_at": aware(row.last_run_at), "last_job_id": row.last_job_id,
            "next_run_at": upcoming[0] if upcoming else None, "next_runs": upcoming}


# ---- the beat -------------------------------------------------------------------------------------

def acquire_lease(name: str, holder: str, now: datetime, ttl_s: float, url: str | None = None) -> bool:
    """Take or renew the named lease (compare-and-set, atomic on PostgreSQL and SQLite)."""
    expires = now + timedelta(seconds=ttl_s)
    with session_scope(url) as s:
        moved = s.execute(update(Lease).where(Lease.name == name, or_(Lease.holder == holder, Lease.expires_at <= now))
                          .values(holder=holder, expires_at=expires)).rowcount
        if moved:
            return True
    try:
        with session_scope(url) as s:
            s.add(Lease(name=name, holder=holder, expires_at=expires, acquired_at=now))
        return True
    except IntegrityError:
        return False  # someone else holds it


def release_lease(name: str, holder: str, url: str | None = None) -> None:
    with session_scope(url) as s:
        s.execute(update(Lease).where(Lease.name == name, Lease.holder == holder)
                  .values(expires_at=datetime(1970, 1, 1, tzinfo=timezone.utc)))


def due_fire(row: RetrainSchedule, now: datetime) -> datetime | None:
    """The cron time this schedule should act on now, or None if it already handled the latest one."""
    fire = cronlib.parse(row.cron).previous(now)
    handled = aware(row.last_run_at) or aware(row.updated_at)
    if fire is None or (handled is not None and fire <= handled):
        return None
    return fire


def tick(now: datetime, enqueue: Enqueue, holder: str, *, lease_ttl_s: float = 120.0,
         url: str | None = None, report: list | None = None) -> list[str]:
    """Evaluate every enabled schedule once; returns the ids of the retrain jobs enqueued. ``report``
    (optional list) receives one dict per due schedule saying what was done and why."""
    now = aware(now)
    if not acquire_lease(LEASE_NAME, holder, now, lease_ttl_s, url):
        log.info("schedule tick: lease %s held by another beat; skipping", LEASE_NAME)
        return []
    with session_scope(url) as s:
        rows = list(s.scalars(select(RetrainSchedule).where(RetrainSchedule.enabled.is_(True))
                              .order_by(RetrainSchedule.id)))
    enqueued = []
    for row in rows:
        fire = due_fire(row, now)
        if fire is None:
            continue
        outcome = _run_fire(row, fire, enqueue, url)
        if report is not None:
            report.append(outcome)
        if outcome.get("job_id") and outcome["action"] == "enqueued":
            enqueued.append(outcome["job_id"])
    try:  # the same tick (one holder at a time) sweeps checkpoints that finished jobs no longer need
        checkpoints.prune_finished(now, url=url)
    except Exception as exc:  # noqa: BLE001 - housekeeping must not stop the schedules
        log.warning("checkpoint sweep failed: %s", exc)
    return enqueued


def _run_fire(row: RetrainSchedule, fire: datetime, enqueue: Enqueue, url: str | None) -> dict:
    base = {"schedule_id": row.id, "tenant": row.tenant_id, "adapter_name": row.adapter_name, "fire": fire.isoformat()}
    with session_scope(url) as s:
        claimed = s.execute(update(RetrainSchedule)
                            .where(RetrainSchedule.id == row.id,
                                   or_(RetrainSchedule.last_run_at.is_(None), RetrainSchedule.last_run_at < fire))
                            .values(last_run_at=fire, updated_at=RetrainSchedule.updated_at)).rowcount
        if not claimed:
            return {**base, "action": "skipped", "why": "another tick handled this fire"}
        last = latest_version(s, row.tenant_id, row.adapter_name)
        new = count_new_feedback(s, row.tenant_id, aware(last.feedback_until) if last else None)
        previous = s.get(Job, row.last_job_id) if row.last_job_id else None
        busy = previous is not None and previous.status in ACTIVE
    if busy:
        return {**base, "action": "skipped", "why": f"retrain {previous.id} is still {previous.status}", "new_feedback": new}
    if new < row.min_new_feedback:
        return {**base, "action": "skipped", "new_feedback": new,
                "why": f"{new} new feedback item(s), {row.min_new_feedback} needed"}
    body = {**(row.params or {}), "tenant": row.tenant_id, "adapter_name": row.adapter_name,
            "min_feedback": row.min_new_feedback, "idempotency_key": f"schedule:{row.id}:{fire:%Y%m%dT%H%MZ}"}
    try:
        job_id = enqueue("retrain", body, None)
    except Exception:
        with session_scope(url) as s:  # give the fire back so the next tick tries again
            s.execute(update(RetrainSchedule).where(RetrainSchedule.id == row.id, RetrainSchedule.last_run_at == fire)
                      .values(last_run_at=row.last_run_at, updated_at=RetrainSchedule.updated_at))
        raise
    with session_scope(url) as s:
        s.execute(update(RetrainSchedule).where(RetrainSchedule.id == row.id).values(last_job_id=job_id, updated_at=RetrainSchedule.updated_at))
    log.info("schedule %s (%s/%s): enqueued retrain %s for fire %s (%s new feedback)", row.id, row.tenant_id,
             row.adapter_name, job_id, fire, new)
    return {**base, "action": "enqueued", "job_id": job_id, "new_feedback": new}
