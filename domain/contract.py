"""The job contract: what a handler receives (``JobContext``), returns (``Outcome``) and may raise
(``SoftStop``; the runner raises ``RetryLater``), and the jobs running in this process.

Handlers import from here, never from the runner (``domain.jobs``), which loads them by name from
``domain.kinds``. This module imports no handler and nothing above the ledger.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from sqlalchemy import desc, select
from sqlalchemy.orm import Session

from domain import costs, health, tracing
from domain.config import Settings
from domain.errors import JobTimeout
from domain.ledger import jobstore
from domain.ledger.db import session_scope
from domain.ledger.models import Checkpoint
from domain.specs import JobSpec

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What a handler returns: ``commit(session)`` writes its rows in the transaction that marks the job
    succeeded (and may return a dict merged into the result)."""

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


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values: keys as text, NaN/inf as None, tensors and numpy scalars as numbers."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if hasattr(obj, "item"):
        return jsonable(obj.item())
    return str(obj)


# ---- jobs running in this process, the stop flag and the heartbeat thread ------------------------

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


def start_heartbeat(interval: float) -> None:
    """Start the thread that refreshes the heartbeat of this process's running jobs (once; again if it died)."""
    global _heartbeat_thread
    if _heartbeat_thread is None or not _heartbeat_thread.is_alive():
        _heartbeat_thread = threading.Thread(target=_heartbeat_loop, args=(interval,), daemon=True, name="foundry-heartbeat")
        _heartbeat_thread.start()


def heartbeat_alive() -> bool:
    return _heartbeat_thread is not None and _heartbeat_thread.is_alive()


def register_running(ctx: "JobContext") -> None:
    with _running_lock:
        _running[ctx.job_id] = ctx


def unregister_running(ctx: "JobContext") -> None:
    ctx.settled = True
    with _running_lock:
        _running.pop(ctx.job_id, None)


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

    def _check_deadline(self) -> None:
        if time.monotonic() > self.deadline:
            raise JobTimeout(f"{self.kind} job exceeded its time limit of {self.settings.time_limits.get(self.kind)} s")

    def check(self) -> None:
        """Raise if the job ran out of time or the worker is stopping. Long loops call it often."""
        self._check_deadline()
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
                jobstore.record_progress(self.job_id, fraction, jsonable(self.info))
            except Exception as exc:  # noqa: BLE001 - progress is best effort
                log.warning("job %s: progress not recorded: %s", self.job_id, exc)
        self._check_deadline()

    def record_checkpoint(self, step: int, path: str, sha256: str, *, size_bytes: int | None = None,
                          metrics: dict | None = None, reason: str = "interval") -> None:
        with session_scope() as s:
            s.add(Checkpoint(job_id=self.job_id, kind=self.kind, step=step, path=path, sha256=sha256,
                             size_bytes=size_bytes, metrics=jsonable(metrics or {}), reason=reason))

    def latest_checkpoint(self) -> Checkpoint | None:
        with session_scope() as s:
            return s.scalar(select(Checkpoint).where(Checkpoint.job_id == self.job_id, Checkpoint.pruned_at.is_(None))
                            .order_by(desc(Checkpoint.step), desc(Checkpoint.id)).limit(1))

    def health(self, component: str, event: str, status: str, message: str, **detail: Any) -> None:
        health.record(component, event, status, message, source=self.worker, detail=jsonable(detail),
                      tenant_id=self.tenant, job_id=self.job_id)
