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

Running jobs whose worker died (``stale_running`` / ``hand_back``): a worker SIGKILLed mid-job (a host
lost, an OOM kill of the whole container) leaves its job ``running`` and its message in kombu's
unacknowledged hash until the visibility timeout, which is above the longest job (hours). A job is judged
lost when its heartbeat (written every ``FOUNDRY_HEARTBEAT_S`` by a thread of the process running it) is
older than ``FOUNDRY_STALE_AFTER_S`` *and* no worker that answers a Celery ``inspect active`` lists it
(checked on the worker side). ``hand_back`` then closes the open attempt as ``lost`` and puts the job back
to ``queued`` in one conditional update (only if the heartbeat is still stale and the attempt is the one
judged), and the worker side restores its message (or sends it again) under the same job id. The next
claim runs it as a new attempt, which resumes from the job's last checkpoint; a job lost
``max_attempts`` times is dead-lettered by that claim. A live job keeps a fresh heartbeat and is never
taken; if a live worker's heartbeats could not be written for that long (its own ledger connection
broken), its late result is refused by ``finish_success``, which requires the attempt to still own the job.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update

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


# ---- running jobs whose worker is gone -----------------------------------------------------------------

@dataclass(frozen=True)
class LostRunning:
    id: str
    kind: str
    queue: str | None
    payload: dict
    priority: int
    worker: str | None
    attempt: int
    heartbeat_at: datetime | None


def stale_running(stale_after_s: float, *, now: datetime | None = None, limit: int = 1000,
                  url: str | None = None) -> list[LostRunning]:
    """Running jobs whose heartbeat (or start, if none was written) is older than ``stale_after_s``."""
    cutoff = (now or utcnow()) - timedelta(seconds=stale_after_s)
    beat = func.coalesce(Job.heartbeat_at, Job.started_at, Job.enqueued_at)
    with session_scope(url) as s:
        rows = s.execute(
            select(Job.id, Job.kind, Job.queue, Job.payload, Job.priority, Job.worker, Job.attempts, Job.heartbeat_at)
            .where(Job.status == "running", beat < cutoff).order_by(beat).limit(limit)).all()
    return [LostRunning(r.id, r.kind, r.queue, dict(r.payload or {}), int(r.priority or 5), r.worker,
                        int(r.attempts or 0), r.heartbeat_at) for r in rows]


def hand_back(job: LostRunning, stale_after_s: float, *, now: datetime | None = None, url: str | None = None) -> bool:
    """Put a lost running job back to ``queued`` (its open attempt closed as ``lost``). False if it moved on
    meanwhile: a heartbeat arrived, it finished, or another attempt took it."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=stale_after_s)
    beat = func.coalesce(Job.heartbeat_at, Job.started_at, Job.enqueued_at)
    error = f"worker {job.worker} lost (no heartbeat for {stale_after_s:.0f} s); handed back to the queue"
    with session_scope(url) as s:
        moved = s.execute(update(Job).where(Job.id == job.id, Job.status == "running", Job.attempts == job.attempt,
                                            beat < cutoff)
                          .values(status="queued", error=error, error_code="worker_lost")
                          .execution_options(synchronize_session=False)).rowcount
        if not moved:
            return False
        s.execute(update(JobAttempt).where(JobAttempt.job_id == job.id, JobAttempt.outcome.is_(None))
                  .values(outcome="lost", finished_at=now, error=error).execution_options(synchronize_session=False))
    return True


def record_handed_back(jobs: list[LostRunning], how: dict[str, str], source: str, url: str | None = None) -> None:
    """One health event per sweep that handed anything back; ``how`` says restored/re-sent per job."""
    if not jobs:
        return
    ids = [j.id for j in jobs]
    workers = sorted({j.worker or "?" for j in jobs})
    health.record("worker", "lost_job_handed_back", "degraded",
                  f"{len(ids)} running job(s) of vanished worker(s) {', '.join(workers[:5])} handed back to the queue",
                  source=source, detail={"job_ids": ids[:100], "count": len(ids), "workers": workers[:20],
                                         "how": {k: how[k] for k in ids[:100] if k in how}}, url=url)
