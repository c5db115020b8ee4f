"""Jobs the ledger says are queued whose broker message is gone: found and sent again.

kombu's Redis transport hands a message to a worker in two steps: ``BRPOP`` takes it off the queue's list,
then a second command records it as unacknowledged (the hash that redelivers it after the visibility
timeout). A worker SIGKILLed between the two loses the message: it is on no list and in no hash (seen in
the 10k-job flood test: one job in 10,000 stayed ``queued`` for ever). The ledger still holds the job,
``queued``, with its whole validated payload, so the message can be rebuilt.

``find(present_ids, ...)`` returns the queued jobs, quiet for ``older_than_s``, whose id is not among the
task ids the broker holds (its lists and its unacknowledged hash, read by the worker side, which knows
the transport). The caller reads the broker twice a moment apart and passes the ids seen in either
read, so a message in the middle of its two-step hand-over is not taken for lost. Sending a job twice is
harmless anyway: the ledger's claim runs it once (a second delivery of a running or finished job is
skipped), which is what makes this sweep safe.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select

from domain import health
from domain.ledger.db import session_scope
from domain.ledger.models import Job, JobAttempt, utcnow


@dataclass(frozen=True)
class StrandedJob:
    id: str
    kind: str
    queue: str | None
    payload: dict
    priority: int


def candidates(older_than_s: float, *, now: datetime | None = None, limit: int = 1000,
               url: str | None = None) -> list[StrandedJob]:
    """Queued jobs with no activity (enqueue, or an attempt's end) for ``older_than_s`` seconds."""
    cutoff = (now or utcnow()) - timedelta(seconds=older_than_s)
    last_attempt = (select(JobAttempt.job_id, func.max(func.coalesce(JobAttempt.finished_at, JobAttempt.started_at))
                           .label("at")).group_by(JobAttempt.job_id).subquery())
    with session_scope(url) as s:
        rows = s.execute(
            select(Job.id, Job.kind, Job.queue, Job.payload, Job.priority)
            .outerjoin(last_attempt, last_attempt.c.job_id == Job.id)
            .where(Job.status == "queued", Job.enqueued_at < cutoff,
                   (last_attempt.c.at.is_(None)) | (last_attempt.c.at < cutoff))
            .order_by(Job.enqueued_at).limit(limit)).all()
    return [StrandedJob(r.id, r.kind, r.queue, dict(r.payload or {}), int(r.priority or 5)) for r in rows]


def find(present_ids: set[str], older_than_s: float, *, now: datetime | None = None, limit: int = 1000,
         url: str | None = None) -> list[StrandedJob]:
    return [c for c in candidates(older_than_s, now=now, limit=limit, url=url) if c.id not in present_ids]


def still_queued(job_ids: list[str], url: str | None = None) -> set[str]:
    if not job_ids:
        return set()
    with session_scope(url) as s:
        return set(s.scalars(select(Job.id).where(Job.id.in_(job_ids), Job.status == "queued")))


def record_resent(jobs: list[StrandedJob], source: str, url: str | None = None) -> None:
    """One health event per sweep that re-sent anything, naming the jobs."""
    if not jobs:
        return
    ids = [j.id for j in jobs]
    health.record("broker", "stranded_requeued", "degraded",
                  f"{len(ids)} queued job(s) had no broker message (lost in a worker crash); sent again",
                  source=source, detail={"job_ids": ids[:100], "count": len(ids)}, url=url)
