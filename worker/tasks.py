"""One task per job kind (``domain/kinds.py``), plus beat's two. Each only maps Celery onto domain.jobs.execute.

Message: ``foundry.<kind>`` with the job body (a JSON object, see docs/messages.md) as the single
positional argument (keyword arguments are accepted as the body too). The Celery task id is the job id.
"""

from __future__ import annotations

import logging
import os

from celery import Task
from celery.exceptions import Reject

from domain import jobs, tracing
from domain.kinds import KINDS
from worker import signals  # noqa: F401  (worker lifecycle: health events, soft stop, memory recycling)
from worker.celery_app import app

log = logging.getLogger(__name__)


class FoundryTask(Task):
    acks_late = True
    reject_on_worker_lost = True
    max_retries = None  # bounded by the ledger's attempt counter (FOUNDRY_MAX_ATTEMPTS), not by Celery
    typing = False  # any body shape reaches execute(), which rejects a malformed one with the field named


def worker_id(task: Task) -> str:
    return f"{task.request.hostname or 'worker'}:{os.getpid()}"


def trace_headers(request) -> dict:
    """The producer's trace context: custom headers are top-level request fields (``headers`` under apply)."""
    nested = getattr(request, "headers", None) or {}
    return {k: getattr(request, k, None) or nested.get(k) for k in ("traceparent", "tracestate")}


def run(task: Task, kind: str, body, extra: dict) -> dict:
    if body is None and extra:
        body, extra = extra, {}
    elif extra:
        body = {**body, **extra} if isinstance(body, dict) else body
    try:
        with tracing.continued(trace_headers(task.request)):
            return jobs.execute(kind, task.request.id, body, worker_id(task))
    except jobs.RetryLater as exc:
        raise task.retry(countdown=exc.countdown, max_retries=None, exc=RuntimeError(str(exc)))
    except jobs.SoftStop:
        raise Reject("worker stopping: job requeued from its last checkpoint", requeue=True)


def _job_task(kind: str) -> Task:
    def job(self, body=None, **extra):
        return run(self, kind, body, extra)

    job.__name__ = job.__qualname__ = kind
    return app.task(name=f"foundry.{kind}", base=FoundryTask, bind=True)(job)


JOB_TASKS: dict[str, Task] = {kind: _job_task(kind) for kind in KINDS}  # foundry.review, foundry.retrain, ...


@app.task(name="foundry.schedule_tick", bind=True, acks_late=False, ignore_result=True)
def schedule_tick(self):
    """Beat's one entry: enqueue the retrains whose schedule is due (leader-locked in the ledger)."""
    from domain.adapters import schedule
    from domain.ledger.models import utcnow
    from worker.client import enqueue

    def _enqueue(kind: str, body: dict, parent_job_id: str | None = None) -> str:
        return enqueue(kind, body, parent_job_id=parent_job_id, created_by="beat")

    return schedule.tick(now=utcnow(), enqueue=_enqueue, holder=worker_id(self))


@app.task(name="foundry.roll_up_costs", acks_late=False, ignore_result=True)
def roll_up_costs():
    """Beat's hourly sweep: closed UTC days of usage summed into usage_daily (v_costs_daily reads them)."""
    from domain.costs import roll_up_costs as roll_up

    return roll_up()


@app.task(name="foundry.resend_stranded", bind=True, acks_late=False, ignore_result=True)
def resend_stranded(self):
    """Beat's sweep: queued jobs whose broker message was lost in a worker crash are sent again, and running
    jobs of a vanished worker (stale heartbeat, listed by no live worker) are handed back."""
    from domain.config import get_settings
    from worker import maintenance

    report = maintenance.resend_stranded(older_than_s=get_settings().stranded_after_s, source=worker_id(self))
    return {**report, **maintenance.hand_back_lost_running(source=worker_id(self))}
