"""Ledger writes for a job's life: enqueue, claim an attempt, progress, finish, reject, dead-letter.

Exactly-once bookkeeping rests on three rules:
1. ``claim`` runs in one transaction holding the job row lock; it refuses to run a job that already
   reached a final status, and dead-letters one that was delivered ``max_attempts`` times already.
2. ``finish_success`` writes the result, the usage cost (unique per job) and the handler's own rows in
   one transaction, and only if this attempt still owns the job.
3. The broker message is acknowledged after that commit (Celery ``acks_late``): a crash before it
   redelivers the message, and the redelivery finds the job either final (skipped) or unfinished (run).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from domain.ledger.db import HotStatement, run_hot, run_hot_in, session_scope
from domain.ledger.models import FINAL_STATUSES, Job, JobAttempt, Tenant, aware, utcnow

log = logging.getLogger(__name__)


# The hot path's three statements, one text each for PostgreSQL and SQLite (db.HotStatement: one prepared round
# trip on PostgreSQL, the same parts in one short transaction on SQLite).
ENQUEUE = HotStatement("""
    INSERT INTO jobs (id, kind, tenant_id, payload, idempotency_key, priority, queue, max_attempts, created_by,
                      parent_job_id, enqueued_at, status, attempts, progress, progress_info)
    VALUES (%(id)s, %(kind)s, %(tenant_id)s, %(payload)s, %(idempotency_key)s, %(priority)s, %(queue)s, %(max_attempts)s,
            %(created_by)s, %(parent_job_id)s, %(enqueued_at)s, 'queued', 0, 0.0, '{}')
    RETURNING id""", ("id",))

CLAIM = HotStatement("""
    UPDATE jobs SET attempts = attempts + 1, status = 'running', worker = %(worker)s, heartbeat_at = %(now)s,
                    started_at = COALESCE(started_at, %(now)s)
    WHERE id = %(id)s AND status = 'queued' AND attempts < max_attempts
    RETURNING id, attempts""", ("id", "attempts"), then=("""
    INSERT INTO job_attempts (job_id, attempt, worker, started_at)
    SELECT id, attempts, %(worker)s, %(now)s FROM j""",))

_USAGE_COLS = ("prompt_tokens", "completion_tokens", "wall_seconds", "gpu_seconds", "model_id", "adapter_version_id",
               "cost", "currency", "price_version")
FINISH = HotStatement("""
    UPDATE jobs SET status = 'succeeded', result = %(result)s, finished_at = %(now)s, progress = 1.0,
                    error = NULL, error_code = NULL
    WHERE id = %(id)s AND status = 'running' AND attempts = %(attempt)s
    RETURNING id, tenant_id, kind""", ("id", "tenant_id", "kind"), then=("""
    UPDATE job_attempts SET outcome = 'succeeded', finished_at = %(now)s, error = NULL
    WHERE job_id = %(id)s AND attempt = %(attempt)s AND EXISTS (SELECT 1 FROM j)""", """
    INSERT INTO usage_costs (job_id, tenant_id, kind, prompt_tokens, completion_tokens, wall_seconds, gpu_seconds,
                             model_id, adapter_version_id, cost, currency, price_version, created_at)
    SELECT id, tenant_id, kind, %(prompt_tokens)s, %(completion_tokens)s, %(wall_seconds)s, %(gpu_seconds)s, %(model_id)s,
           %(adapter_version_id)s, %(cost)s, %(currency)s, %(price_version)s, %(now)s FROM j WHERE %(has_usage)s"""))



@dataclass
class Claim:
    run: bool
    attempt: int = 0
    status: str = ""
    reason: str = ""
    result: dict | None = None
    busy: bool = False  # another live worker is running it: come back later
    extra: dict = field(default_factory=dict)


def record_enqueued(job_id: str, kind: str, tenant: str, payload: dict, *, idempotency_key: str | None,
                    priority: int, queue: str, max_attempts: int, created_by: str,
                    parent_job_id: str | None = None, url: str | None = None) -> tuple[str, bool]:
    """Insert the queued row before the message is sent. Returns (job_id, created); an existing job
    with the same idempotency key is returned instead of a new one."""
    if idempotency_key:
        with session_scope(url) as s:
            existing = s.scalar(select(Job.id).where(Job.tenant_id == tenant, Job.kind == kind,
                                                     Job.idempotency_key == idempotency_key))
            if existing:
                return existing, False
    values = dict(id=job_id, kind=kind, tenant_id=tenant, payload=payload, idempotency_key=idempotency_key,
                  priority=priority, queue=queue, max_attempts=max_attempts, created_by=created_by,
                  parent_job_id=parent_job_id, enqueued_at=utcnow())
    try:  # not durable: a lost queued row is re-created by the worker's claim
        run_hot(ENQUEUE, {**values, "payload": json.dumps(payload)}, url, durable=False)
    except IntegrityError:
        with session_scope(url) as s:
            existing = s.scalar(select(Job.id).where(Job.tenant_id == tenant, Job.kind == kind,
                                                     Job.idempotency_key == idempotency_key))
        if existing:
            return existing, False
        raise
    return job_id, True


def mark_enqueue_failed(job_id: str, error: str, url: str | None = None) -> None:
    with session_scope(url) as s:
        s.execute(update(Job).where(Job.id == job_id, Job.status == "queued")
                  .values(status="failed", error=error, error_code="broker_unreachable", finished_at=utcnow()))


def record_rejected(job_id: str, kind: str, payload: Any, error: str, *, field_name: str | None, code: str = "invalid",
                    worker: str | None = None, url: str | None = None) -> None:
    """A malformed or refused job: recorded ``rejected`` with the reason; never retried."""
    body = payload if isinstance(payload, dict) else {"raw": repr(payload)[:10_000]}
    tenant = body.get("tenant") if isinstance(body.get("tenant"), str) else "default"
    now = utcnow()
    with session_scope(url) as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None:
            job = Job(id=job_id, kind=kind, tenant_id=str(tenant)[:64], payload=body, status="queued",
                      created_by="foreign", idempotency_key=None)
            s.add(job)
            s.flush()
        if job.status in FINAL_STATUSES:
            return
        job.status, job.error, job.error_code = "rejected", error, code
        job.finished_at = now
        job.worker = worker
        job.progress_info = {**(job.progress_info or {}), "rejected_field": field_name}
        job.attempts += 1
        s.add(JobAttempt(job_id=job_id, attempt=job.attempts, worker=worker, started_at=now, finished_at=now,
                         outcome="rejected", error=error))


def tenant_exists(tenant: str, url: str | None = None) -> bool:
    with session_scope(url) as s:
        return s.get(Tenant, tenant) is not None


def claim(job_id: str, kind: str, tenant: str, payload: dict, worker: str, *, max_attempts: int,
          stale_after_s: float, priority: int = 5, idempotency_key: str | None = None,
          url: str | None = None) -> Claim:
    """Start an attempt of a job, or say why not (already final, dead-lettered, busy elsewhere)."""
    now = utcnow()
    # Fast path: a queued job with attempts left. Not durable: losing it in a database crash only
    # forgets that this delivery started (the job is still unfinished and will run again).
    row = run_hot(CLAIM, {"id": job_id, "worker": worker, "now": now}, url, durable=False)
    if row is not None:
        return Claim(run=True, attempt=row[1], status="running")
    # Slow path: unknown job (foreign producer), a redelivery of a running/final job, or attempts used up.
    with session_scope(url) as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None:  # sent by a producer that does not write the ledger (another language)
            dup = _find_idempotent(s, tenant, kind, idempotency_key)
            if dup is not None:
                return Claim(run=False, status=dup.status, reason=f"duplicate of job {dup.id} (idempotency key)",
                             result=dup.result, extra={"duplicate_of": dup.id})
            job = _adopt_foreign(s, Job(id=job_id, kind=kind, tenant_id=tenant, payload=payload, status="queued",
                                        priority=priority, idempotency_key=idempotency_key,
                                        max_attempts=max_attempts, created_by="foreign"))
            if job is None:  # another delivery inserted it first: start over against its row
                return claim(job_id, kind, tenant, payload, worker, max_attempts=max_attempts,
                             stale_after_s=stale_after_s, priority=priority, idempotency_key=idempotency_key, url=url)
        if job.status in FINAL_STATUSES:
            return Claim(run=False, status=job.status, reason=f"already {job.status}", result=job.result)
        if job.status == "running":
            busy = _still_running_elsewhere(job, worker, now, stale_after_s)
            if busy is not None:
                return busy
            _mark_attempt_lost(s, job, now)
        if job.attempts >= (job.max_attempts or max_attempts):
            return _dead_letter(s, job, worker, now)
        return _start_attempt(s, job, worker, now)


def _adopt_foreign(s: Session, job: Job) -> Job | None:
    """Insert the row of a job a foreign producer sent; None if a concurrent delivery inserted it first."""
    s.add(job)
    try:
        s.flush()
    except IntegrityError:
        s.rollback()
        return None
    return job


def _still_running_elsewhere(job: Job, worker: str, now: datetime, stale_after_s: float) -> Claim | None:
    """A busy claim if another live worker holds the job (fresh heartbeat, not this node's restarted worker)."""
    beat = aware(job.heartbeat_at)
    fresh = beat is not None and (now - beat).total_seconds() < stale_after_s
    same_node_restarted = job.worker and job.worker.split(":")[0] == worker.split(":")[0] and job.worker != worker
    if fresh and not same_node_restarted:
        return Claim(run=False, status="running", busy=True,
                     reason=f"running on {job.worker} (heartbeat {int((now - beat).total_seconds())}s ago)")
    return None


def _mark_attempt_lost(s: Session, job: Job, now: datetime) -> None:
    """The previous attempt is lost: its worker died without a word."""
    s.execute(update(JobAttempt).where(JobAttempt.job_id == job.id, JobAttempt.outcome.is_(None))
              .values(outcome="lost", finished_at=now, error=f"worker {job.worker} lost"))


def _dead_letter(s: Session, job: Job, worker: str, now: datetime) -> Claim:
    last = job.error or "worker lost during the job"
    job.status, job.error_code, job.finished_at = "dead", "max_attempts", now
    job.error = f"dead-lettered after {job.attempts} attempts; last error: {last}"
    s.add(JobAttempt(job_id=job.id, attempt=job.attempts + 1, worker=worker, started_at=now, finished_at=now,
                     outcome="dead", error=job.error))
    return Claim(run=False, status="dead", reason=job.error)


def _start_attempt(s: Session, job: Job, worker: str, now: datetime) -> Claim:
    job.attempts += 1
    job.status, job.worker, job.heartbeat_at = "running", worker, now
    job.started_at = job.started_at or now
    s.add(JobAttempt(job_id=job.id, attempt=job.attempts, worker=worker, started_at=now))
    return Claim(run=True, attempt=job.attempts, status="running")


def _find_idempotent(s: Session, tenant: str, kind: str, key: str | None) -> Job | None:
    if not key:
        return None
    return s.scalar(select(Job).where(Job.tenant_id == tenant, Job.kind == kind, Job.idempotency_key == key))


def heartbeat(job_ids: list[str], url: str | None = None) -> None:
    if not job_ids:
        return
    with session_scope(url) as s:
        s.execute(update(Job).where(Job.id.in_(job_ids), Job.status == "running").values(heartbeat_at=utcnow()))


def record_progress(job_id: str, fraction: float | None, info: dict, url: str | None = None) -> None:
    values: dict = {"heartbeat_at": utcnow(), "progress_info": info}
    if fraction is not None:
        values["progress"] = max(0.0, min(1.0, float(fraction)))
    with session_scope(url) as s:
        s.execute(update(Job).where(Job.id == job_id, Job.status == "running").values(**values))


def finish_success(job_id: str, attempt: int, worker: str, result: dict, *, usage: dict | None = None,
                   commit: Callable[[Session], dict | None] | None = None, url: str | None = None) -> dict | None:
    """Record success, usage cost and the handler's rows atomically; returns the result as stored (with what
    ``commit`` added). None if this attempt no longer owns the job (another delivery took it over): then
    nothing is written."""
    now = utcnow()
    if commit is None:  # nothing but the job's own rows: one durable statement
        return _finish(None, job_id, attempt, now, result, usage, url)
    with session_scope(url) as s:  # durable: the broker message is acknowledged right after this commit
        owned = s.execute(select(Job.id).where(Job.id == job_id, Job.status == "running", Job.attempts == attempt)
                          .with_for_update()).first()
        if owned is None:
            log.warning("job %s: attempt %s lost ownership; result dropped", job_id, attempt)
            return None
        extra = commit(s)
        if extra:
            result = {**result, **extra}
        return _finish(s, job_id, attempt, now, result, usage, url)


def _finish(s: Session | None, job_id: str, attempt: int, now: datetime, result: dict, usage: dict | None,
            url: str | None) -> dict | None:
    params = {"id": job_id, "attempt": attempt, "now": now, "result": json.dumps(result), "has_usage": usage is not None,
              **{k: (usage or {}).get(k) for k in _USAGE_COLS}}
    row = run_hot(FINISH, params, url) if s is None else run_hot_in(s, FINISH, params)
    if row is None:
        log.warning("job %s: attempt %s lost ownership; result dropped", job_id, attempt)
        return None
    return result


def finish_failure(job_id: str, attempt: int, error: str, code: str, *, final_status: str = "failed",
                   url: str | None = None) -> None:
    """``failed``/``rejected`` end the job; ``retry``/``interrupted`` put it back to ``queued`` for the next delivery."""
    now = utcnow()
    with session_scope(url) as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None or job.status != "running" or job.attempts != attempt:
            return
        job.error, job.error_code = error, code
        if final_status in ("retry", "interrupted"):
            job.status = "queued"
            if final_status == "interrupted":  # a soft stop is not the job's fault: it does not use up an attempt
                job.max_attempts = (job.max_attempts or job.attempts) + 1
        else:
            job.status, job.finished_at = final_status, now
        _close_attempt(s, job_id, attempt, final_status, error, now)


def _close_attempt(s: Session, job_id: str, attempt: int, outcome: str, error: str | None, now: datetime) -> None:
    s.execute(update(JobAttempt).where(JobAttempt.job_id == job_id, JobAttempt.attempt == attempt)
              .values(outcome=outcome, error=error, finished_at=now))

