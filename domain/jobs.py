"""The runner: one delivery of a job, validate → claim an attempt → call the kind's handler → record the outcome.

The kinds, their specs and handlers are in ``domain/kinds.py``; what a handler receives and returns is in
``domain/contract.py``. A handler reports progress through ``ctx``, raises ``InvalidJob`` (rejected),
``JobFailed`` (failed), ``TransientError`` (retried with backoff) and returns an ``Outcome`` whose
``commit`` callback writes its ledger rows in the same transaction as the job's success, so a
redelivered message can never write them twice.

Nothing here imports Celery: ``worker/tasks.py`` maps ``RetryLater`` and ``SoftStop`` onto it.
"""

from __future__ import annotations

import importlib
import logging
import random
import signal
import threading
import time
from typing import Any, Callable

from domain import checkpoints, costs, logs, tracing
from domain.config import Settings, get_settings
from domain.contract import (JobContext, Outcome, RetryLater, SoftStop, jsonable, register_running, start_heartbeat,
                             unregister_running)
from domain.contract import running_job_ids, stop_requested  # noqa: F401 - the runner's callers find them here too
from domain.errors import InvalidJob, JobFailed, JobTimeout, TransientError
from domain.kinds import HANDLERS, KINDS, parse_spec
from domain.ledger import jobstore
from domain.ledger.jobstore import Claim
from domain.specs import JobSpec

log = logging.getLogger(__name__)


def _load(ref: str) -> Callable:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def load_handler(kind: str) -> Callable[[JobSpec, JobContext], Outcome]:
    return _load(HANDLERS[kind])


_known_tenants: dict[tuple[str, str], float] = {}  # (ledger url, tenant) -> when it was last seen


def _tenant_known(tenant: str, ledger_url: str) -> bool:
    key = (ledger_url, tenant)
    seen = _known_tenants.get(key)
    if seen and time.monotonic() - seen < 30:
        return True
    if jobstore.tenant_exists(tenant):
        _known_tenants[key] = time.monotonic()
        return True
    return False


def backoff(attempt: int, settings: Settings) -> float:
    """Exponential backoff with full jitter."""
    cap = min(settings.retry_backoff_max_s, settings.retry_backoff_s * (2 ** max(0, attempt - 1)))
    return random.uniform(cap / 2, cap)


class _HardLimit:
    """SIGALRM-based hard time limit when running on the main thread (solo pool); the cooperative
    ``ctx.check()`` deadline covers threads."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.armed = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGALRM") and self.seconds > 0:
            def _fire(signum, frame):
                raise JobTimeout(f"hard time limit of {self.seconds:.0f} s reached")
            self._old = signal.signal(signal.SIGALRM, _fire)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
            self.armed = True
        return self

    def __exit__(self, *exc):
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._old)
        return False


def _ledger_down(exc: BaseException) -> bool:
    from sqlalchemy.exc import InterfaceError, OperationalError

    return isinstance(exc, (OperationalError, InterfaceError))


def with_ledger(fn: Callable[[], Any], what: str, settings: Settings, budget_s: float | None = None) -> Any:
    """Run a ledger write, retrying with backoff while the database is unreachable. The job's broker
    message stays unacknowledged meanwhile, so nothing is lost; past the budget the job is handed back
    to the broker (RetryLater) with nothing recorded, and runs again later."""
    budget = settings.ledger_outage_max_s if budget_s is None else budget_s
    start, attempt = time.monotonic(), 0
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            if not _ledger_down(exc):
                raise
            attempt += 1
            waited = time.monotonic() - start
            if waited >= budget:
                raise RetryLater(f"ledger unreachable for {waited:.0f} s during {what}: {type(exc).__name__}",
                                 countdown=backoff(attempt, settings)) from exc
            delay = min(backoff(attempt, settings), max(0.1, budget - waited))
            log.warning("ledger unreachable during %s (%s); retrying in %.1f s", what, type(exc).__name__, delay)
            time.sleep(delay)


def execute(kind: str, job_id: str, payload: Any, worker: str, settings: Settings | None = None) -> dict:
    """Run one delivery of a job. Returns a summary dict; raises RetryLater or SoftStop for the caller to map."""
    settings = settings or get_settings()
    tenant = payload.get("tenant") if isinstance(payload, dict) and isinstance(payload.get("tenant"), str) else None
    try:
        with logs.job_context(job_id=job_id, kind=kind, tenant=tenant), \
                tracing.span("foundry.job", kind=kind, job_id=job_id, tenant=tenant, worker=worker):
            return _execute(kind, job_id, payload, worker, settings)
    except RetryLater as exc:
        exc.countdown = _within_visibility(exc.countdown, settings)
        raise
    except Exception as exc:
        if _ledger_down(exc):  # the claim or a failure record could not be written: nothing ran or nothing is lost
            raise RetryLater(f"ledger unreachable: {type(exc).__name__}",
                             countdown=_within_visibility(backoff(1, settings), settings)) from exc
        raise


def _within_visibility(countdown: float, settings: Settings) -> float:
    """Every retry comes back within the broker's visibility timeout: a Redis message held (as a countdown)
    past it is handed back and delivered a second time."""
    return min(countdown, max(1.0, settings.visibility_timeout / 2))


class _Settled(Exception):
    """A stage ended this delivery early (rejected, skipped, failed): ``summary`` is what execute returns."""

    def __init__(self, summary: dict):
        super().__init__(summary.get("status"))
        self.summary = summary


def _execute(kind: str, job_id: str, payload: Any, worker: str, settings: Settings) -> dict:
    try:
        spec = _admit(kind, job_id, payload, worker, settings)
        claim = _claim(kind, job_id, spec, worker, settings)
        ctx = JobContext(job_id=job_id, kind=kind, spec=spec, attempt=claim.attempt, worker=worker, settings=settings,
                         deadline=time.monotonic() + _time_limit(kind, settings))
        outcome, seconds = _run_handler(ctx, settings)
        return _record_success(ctx, outcome, seconds, settings)
    except _Settled as done:
        return done.summary


def _admit(kind: str, job_id: str, payload: Any, worker: str, settings: Settings) -> JobSpec:
    """The validated spec of a known tenant; else the job is recorded rejected."""
    try:
        spec = parse_spec(kind, payload)
    except InvalidJob as exc:
        log.warning("job %s rejected: %s", job_id, exc)
        jobstore.record_rejected(job_id, kind, payload, str(exc), field_name=exc.field, worker=worker)
        raise _Settled({"job_id": job_id, "status": "rejected", "error": str(exc), "field": exc.field}) from None
    logs.bind(tenant=spec.tenant)
    if not _tenant_known(spec.tenant, settings.ledger_url):
        msg = f"tenant: unknown tenant {spec.tenant!r} (create it with `foundry tenants add {spec.tenant}`)"
        jobstore.record_rejected(job_id, kind, spec.model_dump(mode="json"), msg, field_name="tenant",
                                 code="unknown_tenant", worker=worker)
        raise _Settled({"job_id": job_id, "status": "rejected", "error": msg, "field": "tenant"})
    return spec


def _claim(kind: str, job_id: str, spec: JobSpec, worker: str, settings: Settings) -> Claim:
    """This delivery's attempt; a job finished, dead or owned by a live worker is skipped or handed back."""
    with tracing.span("foundry.claim"):
        claim = jobstore.claim(job_id, kind, spec.tenant, spec.model_dump(mode="json"), worker,
                               max_attempts=settings.max_attempts, stale_after_s=settings.stale_after_s,
                               priority=spec.priority, idempotency_key=spec.idempotency_key)
    if claim.busy:
        raise RetryLater(claim.reason, countdown=settings.stale_after_s)
    if not claim.run:
        raise _Settled({"job_id": job_id, "status": claim.status, "skipped": claim.reason, "result": claim.result,
                        **claim.extra})
    return claim


def _time_limit(kind: str, settings: Settings) -> float:
    return float(settings.time_limits.get(kind, settings.longest_job_s))


def _run_handler(ctx: JobContext, settings: Settings) -> tuple[Outcome, float]:
    """Call the kind's handler under its time limit; a failure is recorded here and settles the delivery."""
    job_id, attempt = ctx.job_id, ctx.attempt
    start_heartbeat(settings.heartbeat_s)
    register_running(ctx)
    t0 = time.perf_counter()
    try:
        with _HardLimit(_time_limit(ctx.kind, settings) + 30), tracing.span("foundry.handler", attempt=ctx.attempt):
            try:
                outcome = load_handler(ctx.kind)(ctx.spec, ctx)
            finally:  # a checkpoint still uploading is stored and recorded (or not) before the job settles
                checkpoints.wait_for_upload(job_id)
    except InvalidJob as exc:
        jobstore.finish_failure(job_id, attempt, str(exc), exc.code, final_status="rejected")
        raise _Settled({"job_id": job_id, "status": "rejected", "error": str(exc), "field": exc.field}) from None
    except TransientError as exc:
        jobstore.finish_failure(job_id, attempt, str(exc), exc.code, final_status="retry")
        raise RetryLater(str(exc), countdown=backoff(attempt, settings)) from exc
    except SoftStop:
        jobstore.finish_failure(job_id, attempt, "worker stopped; requeued from its last checkpoint",
                                "soft_stop", final_status="interrupted")
        raise
    except JobFailed as exc:
        log.error("job %s failed: %s", job_id, exc)
        _failed(ctx, str(exc), exc.code)
    except Exception as exc:  # noqa: BLE001 - an unexpected error is a permanent failure of this job
        log.exception("job %s crashed", job_id)
        _failed(ctx, f"{type(exc).__name__}: {exc}", "error")
    finally:
        unregister_running(ctx)
    return outcome, time.perf_counter() - t0


def _failed(ctx: JobContext, error: str, code: str) -> None:
    """Record a permanent failure, run the kind's failure hook (e.g. the review circuit breaker), settle."""
    jobstore.finish_failure(ctx.job_id, ctx.attempt, error, code)
    hook = KINDS[ctx.kind].on_failure
    if hook is not None:
        try:
            _load(hook)(ctx, error)
        except Exception as exc:  # noqa: BLE001 - a hook must never turn a failure into a crash
            log.warning("failure hook %s not run for job %s: %s", hook, ctx.job_id, exc)
    raise _Settled({"job_id": ctx.job_id, "status": "failed", "error": error, "code": code})


def _record_success(ctx: JobContext, outcome: Outcome, seconds: float, settings: Settings) -> dict:
    """Price the usage and commit result, usage and the handler's rows in one transaction."""
    usage = None
    if outcome.usage is not None:
        if not outcome.usage.wall_seconds:
            outcome.usage.wall_seconds = seconds
        usage = costs.usage_row(outcome.usage, settings.prices())
    result = jsonable(outcome.result)
    with tracing.span("foundry.finish"):
        stored = with_ledger(lambda: jobstore.finish_success(ctx.job_id, ctx.attempt, ctx.worker, result, usage=usage,
                                                             commit=outcome.commit), "finish", settings)
    if stored is None:
        return {"job_id": ctx.job_id, "status": "superseded", "skipped": "another attempt owns this job"}
    checkpoints.after_success(ctx.kind, ctx.job_id)
    return {"job_id": ctx.job_id, "status": "succeeded", "result": stored}
