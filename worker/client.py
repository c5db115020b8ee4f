"""The Python producer API. Needs no model code: only the specs, the ledger and a broker connection.

    from worker.client import enqueue_review, wait
    job_id = enqueue_review("def add(a, b):\n    return a - b\n", tenant="acme", path="calc.py")
    print(wait(job_id)["status"])

Each enqueue validates the body (a bad one raises ``InvalidJob`` naming the field and is recorded
``rejected``), writes the ``queued`` ledger row, then sends the message (after the commit). A broker that
cannot be reached raises ``EnqueueError`` and the row is marked failed with the reason, so nothing is lost
silently. The same idempotency key (per tenant and kind) returns the first job instead of a new one.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from domain import tracing
from domain.config import get_settings
from domain.errors import InvalidJob
from domain.ledger import jobstore
from domain.ledger.db import session_scope
from domain.kinds import parse_spec, queue_for
from domain.ledger.models import FINAL_STATUSES, Job
from domain.logs import actor
from domain.specs import JobSpec


MAX_PRIORITY, DEFAULT_PRIORITY = 9, 5


class EnqueueError(RuntimeError):
    """The broker could not take the job (it is recorded failed with this reason)."""


_apps: dict = {}


def celery_app():
    """A Celery app for the current settings (cached; tests and tools may change the environment). An
    embedded broker's folders are made here: its messages are files this producer writes."""
    from worker.celery_app import make_celery, prepare_broker

    settings = get_settings()
    key = (settings.broker_url, settings.result_backend, str(settings.data_dir))
    if key not in _apps:
        prepare_broker(settings)
        _apps[key] = make_celery(settings)
    return _apps[key]


def send_job(app, kind: str, payload: dict, job_id: str, *, queue: str, priority: int | None = None, **options: Any):
    """Send one job's message (its ledger row is already written).

    ``ignore_result``: unless FOUNDRY_CELERY_RESULTS is on, nothing goes to the result backend, so the
    producer does not subscribe to the job's result channel. Celery's ``send_task`` otherwise subscribes
    for every message it sends, and unsubscribes when the AsyncResult is dropped: two Redis commands per
    job for a result that never comes (bench/queue_overhead.py counts them with Redis' commandstats).
    """
    trace = tracing.headers()  # the enqueue span's traceparent, when tracing is on
    if trace:
        options["headers"] = {**options.get("headers", {}), **trace}
    return app.send_task(f"foundry.{kind}", args=[payload], task_id=job_id, queue=queue, routing_key=queue,
                         priority=broker_priority(priority), ignore_result=not get_settings().celery_results,
                         **options)


def broker_priority(priority: int | None) -> int:
    """The message priority for a job priority (0 = lowest ... 9 = highest, as specs and the ledger say).

    kombu's Redis transport keeps one list per priority step and polls them from step 0 up, so a message
    with priority 0 is taken first: it runs the scale backwards. Sending ``9 - priority`` makes a priority 9
    job leave first. The ledger keeps the job's own priority; the stranded-job sweep resends through here.
    The filesystem broker (embedded default) ignores priorities: its messages leave in arrival order.
    """
    return MAX_PRIORITY - (DEFAULT_PRIORITY if priority is None else priority)


def enqueue(kind: str, body: dict | JobSpec, *, job_id: str | None = None, parent_job_id: str | None = None,
            created_by: str | None = None, countdown: float | None = None) -> str:
    """Validate, record and send one job. Returns its job id (the first job's, for a repeated idempotency key)."""
    with tracing.span("foundry.enqueue", kind=kind, parent_job_id=parent_job_id):
        return _enqueue(kind, body, job_id=job_id, parent_job_id=parent_job_id, created_by=created_by,
                        countdown=countdown)


def _enqueue(kind: str, body: dict | JobSpec, *, job_id: str | None, parent_job_id: str | None,
             created_by: str | None, countdown: float | None) -> str:
    settings = get_settings()
    job_id = job_id or uuid.uuid4().hex
    raw = body.model_dump(mode="json") if isinstance(body, JobSpec) else body
    try:
        spec = parse_spec(kind, raw)
    except InvalidJob as exc:
        jobstore.record_rejected(job_id, kind, raw, str(exc), field_name=exc.field, worker=created_by or actor("client"))
        raise
    payload = spec.model_dump(mode="json")
    queue = queue_for(kind)
    job_id, created = jobstore.record_enqueued(
        job_id, kind, spec.tenant, payload, idempotency_key=spec.idempotency_key, priority=spec.priority,
        queue=queue, max_attempts=settings.max_attempts, created_by=created_by or actor("client"),
        parent_job_id=parent_job_id)
    if not created:
        return job_id
    try:
        send_job(celery_app(), kind, payload, job_id, queue=queue, priority=spec.priority, countdown=countdown,
                 retry=True, retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5,
                                           "interval_max": 2.0})
    except Exception as exc:  # noqa: BLE001 - kombu raises many connection error types
        reason = f"broker unreachable: {type(exc).__name__}: {exc}"
        jobstore.mark_enqueue_failed(job_id, reason)
        raise EnqueueError(f"job {job_id} not enqueued ({reason}); it is recorded as failed") from exc
    return job_id


def enqueue_review(code: str, *, tenant: str = "default", **fields: Any) -> str:
    return enqueue("review", {"code": code, "tenant": tenant, **fields})


def enqueue_retrain(*, tenant: str = "default", **fields: Any) -> str:
    return enqueue("retrain", {"tenant": tenant, **fields})


def enqueue_quantize(*, tenant: str = "default", method: str = "nf4", **fields: Any) -> str:
    return enqueue("quantize", {"tenant": tenant, "method": method, **fields})


def enqueue_distill(*, tenant: str = "default", **fields: Any) -> str:
    return enqueue("distill", {"tenant": tenant, **fields})


def enqueue_index(documents: list[dict] | None = None, *, tenant: str = "default", action: str = "add",
                  **fields: Any) -> str:
    return enqueue("index", {"tenant": tenant, "action": action, "documents": documents or [], **fields})


def job_status(job_id: str) -> dict | None:
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None:
            return None
        return {"id": job.id, "kind": job.kind, "tenant": job.tenant_id, "status": job.status,
                "attempts": job.attempts, "progress": job.progress, "progress_info": job.progress_info,
                "result": job.result, "error": job.error, "error_code": job.error_code, "worker": job.worker}


def wait(job_id: str, timeout: float = 600.0, poll: float = 0.2) -> dict:
    """Block until the job reaches a final status (succeeded/failed/rejected/dead); returns job_status()."""
    deadline = time.monotonic() + timeout
    while True:
        status = job_status(job_id)
        if status and status["status"] in FINAL_STATUSES:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status and status['status']} after {timeout} s")
        time.sleep(poll)


def feedback(review_id: str, verdict: str, correction: str | None = None, *, tenant: str | None = None,
             created_by: str | None = None, finding: int | None = None) -> str:
    """Record a user's verdict on a review (accept/reject, optional corrected review), or on its N-th finding
    with ``finding=N`` (1-based). Returns the feedback id."""
    from domain.feedback import feedback as record

    return record(review_id, verdict, correction, tenant=tenant, created_by=created_by or actor("client"),
                  finding=finding)
