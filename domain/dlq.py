"""The dead-letter list: jobs that ended ``dead`` (their attempts used up), kept in the ledger.

Redis has no dead-letter exchange, so the ledger is the dead-letter queue. An operator lists them,
retries one (a NEW job with the same body, linked by ``parent_job_id``, sent through the ``enqueue``
callable given, e.g. ``worker.client.enqueue``) or drops it (acknowledged: kept for the audit, no longer
listed). Either is recorded on the dead job in ``progress_info["dlq"]``; a job is retried or dropped once.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Callable

from sqlalchemy import desc, select

from domain.ledger.db import session_scope
from domain.ledger.models import Job, utcnow

Enqueue = Callable[..., str]  # enqueue(kind, body, *, job_id=, parent_job_id=, created_by=) -> job id


@dataclass
class DeadJob:
    id: str
    kind: str
    tenant: str
    attempts: int
    error: str | None
    finished_at: datetime | None
    handled: dict | None  # {"action": "retried"|"dropped", "at", "by", "retry_job_id"?, "reason"?}


def list_dead(tenant: str | None = None, *, include_handled: bool = False, limit: int = 100,
              url: str | None = None) -> list[DeadJob]:
    """Dead jobs, newest first; those already retried or dropped only with ``include_handled``."""
    q = select(Job).where(Job.status == "dead")
    if tenant:
        q = q.where(Job.tenant_id == tenant)
    out = []
    with session_scope(url) as s:
        for job in s.scalars(q.order_by(desc(Job.finished_at), desc(Job.id))):
            handled = (job.progress_info or {}).get("dlq")
            if handled and not include_handled:
                continue
            out.append(DeadJob(job.id, job.kind, job.tenant_id, job.attempts, job.error, job.finished_at, handled))
            if len(out) >= limit:
                break
    return out


def _load_dead(s, job_id: str, tenant: str | None) -> Job:
    job = s.get(Job, job_id, with_for_update=True)
    if job is None or (tenant is not None and job.tenant_id != tenant):
        raise LookupError(f"no job {job_id!r}" + (f" for tenant {tenant!r}" if tenant else ""))
    if job.status != "dead":
        raise ValueError(f"job {job_id} is {job.status}, not dead: only dead-lettered jobs can be retried or dropped")
    handled = (job.progress_info or {}).get("dlq")
    if handled:
        raise ValueError(f"job {job_id} was already {handled['action']} at {handled['at']}"
                         + (f" as job {handled['retry_job_id']}" if handled.get("retry_job_id") else ""))
    return job


def retry(job_id: str, enqueue: Enqueue, *, by: str, tenant: str | None = None, url: str | None = None) -> str:
    """Enqueue a new job with the dead job's body; returns the new job id. The dead job is marked first
    (under a row lock), so two operators retrying at once make one new job; if the enqueue fails the
    mark is taken back and the error re-raised."""
    new_id = uuid.uuid4().hex
    with session_scope(url) as s:
        job = _load_dead(s, job_id, tenant)
        kind, body = job.kind, dict(job.payload or {})
        mark = {"action": "retried", "at": utcnow().isoformat(), "by": by, "retry_job_id": new_id}
        job.progress_info = {**(job.progress_info or {}), "dlq": mark}
    if body.get("idempotency_key"):  # the key belongs to the dead job; the retry is a new job
        body["idempotency_key"] = f"{body['idempotency_key']}:retry:{new_id[:8]}"[:200]
    try:
        made = enqueue(kind, body, job_id=new_id, parent_job_id=job_id, created_by=f"dlq:{by}")
    except Exception:
        with session_scope(url) as s:
            job = s.get(Job, job_id, with_for_update=True)
            info = dict(job.progress_info or {})
            if (info.get("dlq") or {}).get("retry_job_id") == new_id:
                info.pop("dlq")
                job.progress_info = info
        raise
    return made


def drop(job_id: str, *, by: str, reason: str | None = None, tenant: str | None = None, url: str | None = None) -> None:
    """Acknowledge a dead job: it stays in the ledger (status ``dead``) but leaves the dead-letter list."""
    with session_scope(url) as s:
        job = _load_dead(s, job_id, tenant)
        job.progress_info = {**(job.progress_info or {}),
                             "dlq": {"action": "dropped", "at": utcnow().isoformat(), "by": by, "reason": reason}}
