"""Running one job: validate → claim an attempt → call the kind's handler → record the outcome.

A handler is a plain function ``handle(spec, ctx) -> Outcome``. It reports progress through ``ctx``,
raises ``InvalidJob`` (rejected), ``JobFailed`` (failed), ``TransientError`` (retried with backoff) and
returns an ``Outcome`` whose ``commit`` callback writes its ledger rows in the same transaction as the
job's success, so a redelivered message can never write them twice.

Nothing here imports Celery: ``worker/tasks.py`` maps ``RetryLater`` and ``SoftStop`` onto it.
"""

from __future__ import annotations

import importlib
import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from sqlalchemy import desc, select
from sqlalchemy.orm import Session

from domain import checkpoints, costs, health, logs, tracing
from domain.config import Settings, get_settings
from domain.errors import InvalidJob, JobFailed, JobTimeout, TransientError
from domain.ledger import jobstore
from domain.ledger.db import session_scope
from domain.ledger.models import Checkpoint
from domain.specs import JobSpec, NoopSpec, parse_spec

log = logging.getLogger(__name__)

# kind -> "module:function"; imported on first use so a review worker never imports training code.
HANDLERS: dict[str, str] = {
    "review": "domain.review.service:handle_review",
    "retrain": "domain.adapters.retrain:handle_retrain",
    "quantize": "domain.quantization:handle_quantize",
    "distill": "domain.distillation:handle_distill",
    "index": "domain.retrieval.service:handle_index",
    "noop": "domain.jobs:handle_noop",
}


@dataclass
class Outcome:
    result: dict
    usage: costs.Usage | None = None
    commit: Callable[[Session], dict | None] | None = None


class RetryLater(Exception):
    """Transient failure: the caller should redeliver the job after ``countdown`` seconds."""

    def __init__(self, message: str, countdown: float):
        super().__init__(message)
        self.countdown = countdown


class SoftStop(Exception):
    """The worker is shutting down: the job checkpointed and must be requeued, not failed."""


# ---- process-wide state: jobs running in this process, stop flag, heartbeats ------------------

_running: dict[str, "JobContext"] = {}
_running_lock = threading.Lock()
stop_requested = threading.Event()  # set on warm shutdown; long jobs checkpoint and raise SoftStop
_heartbeat_thread: threading.Thread | None = None


def _heartbeat_loop(interval: float) -> None:
    while True:
        time.sleep(interval)
        with _running_lock:
            ids = [jid for jid, ctx in _running.items() if not ctx.settled]
        try:
            jobstore.heartbeat(ids)
        except Exception as exc:  # noqa: BLE001 - a missed heartbeat is not fatal
            log.warning("heartbeat failed: %s", exc)


def _ensure_heartbeat(interval: float) -> None:
    global _heartbeat_thread
    if _heartbeat_thread is None or not _heartbeat_thread.is_alive():
        _heartbeat_thread = threading.Thread(target=_heartbeat_loop, args=(interval,), daemon=True, name="foundry-heartbeat")
        _heartbeat_thread.start()


def running_job_ids() -> list[str]:
    with _running_lock:
        return list(_running)


@dataclass
class JobContext:
    job_id: str
    kind: str
    spec: JobSpec
    attempt: int
    worker: str
    settings: Settings
    deadline: float  # time.monotonic() value
    settled: bool = False
    _last_progress: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def tenant(self) -> str:
        return self.spec.tenant

    def check(self) -> None:
        """Raise if the job ran out of time or the worker is stopping. Long loops call it often."""
        if time.monotonic() > self.deadline:
            raise JobTimeout(f"{self.kind} job exceeded its time limit of {self.settings.time_limits.get(self.kind)} s")
        if stop_requested.is_set():
            raise SoftStop("worker stopping")

    @property
    def stopping(self) -> bool:
        return stop_requested.is_set()

    def progress(self, fraction: float | None = None, force: bool = False, **info: Any) -> None:
        """Record progress (throttled to one write a second) and check the deadline."""
        self.info.update(info)
        now = time.monotonic()
        if force or now - self._last_progress >= 1.0:
            self._last_progress = now
            tracing.event("progress", fraction=fraction, **info)  # the handler's stages, when tracing is on
            try:
                jobstore.record_progress(self.job_id, fraction, _jsonable(self.info))
            except Exception as exc:  # noqa: BLE001 - progress is best effort
                log.warning("job %s: progress not recorded: %s", self.job_id, exc)
        if time.monotonic() > self.deadline:
            raise JobTimeout(f"{self.kind} job exceeded its time limit of {self.settings.time_limits.get(self.kind)} s")

    def record_checkpoint(self, step: int, path: str, sha256: str, *, size_bytes: int | None = None,
                          metrics: dict | None = None, reason: str = "interval") -> None:
        with session_scope() as s:
            s.add(Checkpoint(job_id=self.job_id, kind=self.kind, step=step, path=path, sha256=sha256,
                             size_bytes=size_bytes, metrics=_jsonable(metrics or {}), reason=reason))

    def latest_checkpoint(self) -> Checkpoint | None:
        with session_scope() as s:
            return s.scalar(select(Checkpoint).where(Checkpoint.job_id == self.job_id, Checkpoint.pruned_at.is_(None))
                            .order_by(desc(Checkpoint.step), desc(Checkpoint.id)).limit(1))

    def health(self, component: str, event: str, status: str, message: str, **detail: Any) -> None:
        health.record(component, event, status, message, source=self.worker, detail=_jsonable(detail),
                      tenant_id=self.tenant, job_id=self.job_id)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if hasattr(obj, "item"):
        return _jsonable(obj.item())
    return str(obj)


def load_handler(kind: str) -> Callable[[JobSpec, JobContext], Outcome]:
    module, _, name = HANDLERS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


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


def _execute(kind: str, job_id: str, payload: Any, worker: str, settings: Settings) -> dict:
    try:
        spec = parse_spec(kind, payload)
    except InvalidJob as exc:
        log.warning("job %s rejected: %s", job_id, exc)
        jobstore.record_rejected(job_id, kind, payload, str(exc), field_name=exc.field, worker=worker)
        return {"job_id": job_id, "status": "rejected", "error": str(exc), "field": exc.field}
    body = spec.model_dump(mode="json")
    logs.bind(tenant=spec.tenant)
    if not _tenant_known(spec.tenant, settings.ledger_url):
        msg = f"tenant: unknown tenant {spec.tenant!r} (create it with `foundry tenants add {spec.tenant}`)"
        jobstore.record_rejected(job_id, kind, body, msg, field_name="tenant", code="unknown_tenant", worker=worker)
        return {"job_id": job_id, "status": "rejected", "error": msg, "field": "tenant"}

    with tracing.span("foundry.claim"):
        claim = jobstore.claim(job_id, kind, spec.tenant, body, worker, max_attempts=settings.max_attempts,
                               stale_after_s=settings.stale_after_s, priority=spec.priority,
                               idempotency_key=spec.idempotency_key)
    if claim.busy:
        raise RetryLater(claim.reason, countdown=settings.stale_after_s)
    if not claim.run:
        return {"job_id": job_id, "status": claim.status, "skipped": claim.reason, "result": claim.result, **claim.extra}

    limit = float(settings.time_limits.get(kind, settings.longest_job_s))
    ctx = JobContext(job_id=job_id, kind=kind, spec=spec, attempt=claim.attempt, worker=worker, settings=settings,
                     deadline=time.monotonic() + limit)
    _ensure_heartbeat(settings.heartbeat_s)
    with _running_lock:
        _running[job_id] = ctx
    t0 = time.perf_counter()
    try:
        with _HardLimit(limit + 30), tracing.span("foundry.handler", attempt=claim.attempt):
            outcome = load_handler(kind)(spec, ctx)
    except InvalidJob as exc:
        jobstore.finish_failure(job_id, claim.attempt, str(exc), exc.code, final_status="rejected")
        return {"job_id": job_id, "status": "rejected", "error": str(exc), "field": exc.field}
    except TransientError as exc:
        jobstore.finish_failure(job_id, claim.attempt, str(exc), exc.code, final_status="retry")
        raise RetryLater(str(exc), countdown=backoff(claim.attempt, settings)) from exc
    except SoftStop as exc:
        jobstore.finish_failure(job_id, claim.attempt, "worker stopped; requeued from its last checkpoint",
                                "soft_stop", final_status="interrupted")
        raise exc
    except JobFailed as exc:
        log.error("job %s failed: %s", job_id, exc)
        jobstore.finish_failure(job_id, claim.attempt, str(exc), exc.code)
        _observe_failure(ctx, str(exc))
        return {"job_id": job_id, "status": "failed", "error": str(exc), "code": exc.code}
    except Exception as exc:  # noqa: BLE001 - an unexpected error is a permanent failure of this job
        log.exception("job %s crashed", job_id)
        msg = f"{type(exc).__name__}: {exc}"
        jobstore.finish_failure(job_id, claim.attempt, msg, "error")
        _observe_failure(ctx, msg)
        return {"job_id": job_id, "status": "failed", "error": msg, "code": "error"}
    finally:
        ctx.settled = True
        with _running_lock:
            _running.pop(job_id, None)

    usage = None
    if outcome.usage is not None:
        if not outcome.usage.wall_seconds:
            outcome.usage.wall_seconds = time.perf_counter() - t0
        usage = costs.usage_row(outcome.usage, settings.prices())
    result = _jsonable(outcome.result)
    with tracing.span("foundry.finish"):
        stored = with_ledger(lambda: jobstore.finish_success(job_id, claim.attempt, worker, result, usage=usage,
                                                             commit=outcome.commit), "finish", settings)
    if stored is None:
        return {"job_id": job_id, "status": "superseded", "skipped": "another attempt owns this job"}
    checkpoints.after_success(kind, job_id)
    return {"job_id": job_id, "status": "succeeded", "result": stored}


def _observe_failure(ctx: JobContext, error: str) -> None:
    """Feed a failed review to the adapter circuit breaker (domain/circuit.py), which rolls a freshly
    promoted champion back after repeated failures."""
    if ctx.kind != "review":
        return
    try:
        from domain import circuit
        from domain.adapters.store import resolve_adapter

        version_id = ctx.info.get("adapter_version_id")
        if version_id is None:
            with session_scope() as s:
                version = resolve_adapter(s, ctx.tenant, getattr(ctx.spec, "adapter", None))
                version_id = version.id if version is not None else None
        circuit.observe_review(ctx.tenant, version_id, ok=False, error=error, source=ctx.worker)
    except Exception as exc:  # noqa: BLE001 - the breaker must never turn a failure into a crash
        log.warning("circuit breaker not updated for job %s: %s", ctx.job_id, exc)


# ---- the noop kind: benchmarks, smoke tests, fault injection ------------------------------------

def handle_noop(spec: NoopSpec, ctx: JobContext) -> Outcome:
    if spec.crash and ctx.attempt <= spec.crash_times:
        if not ctx.settings.allow_fault_injection:
            raise InvalidJob("crash: fault injection is disabled (FOUNDRY_ALLOW_FAULT_INJECTION)", field="crash")
        if spec.crash == "exit":
            os._exit(137)  # the worker dies mid-job, like an OOM kill
        if spec.crash == "transient":
            raise TransientError("injected transient fault")
        raise RuntimeError("injected fault")
    end = time.monotonic() + spec.sleep_s
    while time.monotonic() < end:
        time.sleep(min(0.05, max(0.0, end - time.monotonic())))
        ctx.check()
        ctx.progress(1 - (end - time.monotonic()) / spec.sleep_s if spec.sleep_s else 1.0)
    usage = costs.Usage(prompt_tokens=spec.cost_tokens, model_id="noop") if spec.cost_tokens else None
    return Outcome(result={"slept": spec.sleep_s}, usage=usage)
