"""Worker lifecycle hooks: health events on start/stop, soft stop for long jobs, memory recycling."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

from celery import signals

from domain import health, jobs
from domain.config import get_settings
from domain.ledger import db

log = logging.getLogger(__name__)
_state = {"node": socket.gethostname(), "checker": None}


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _broker(sender) -> tuple[str, dict]:
    app = getattr(sender, "app", None)
    if app is None:
        from worker.celery_app import app
    return app.conf.broker_url or "", dict(app.conf.broker_transport_options or {})


def _periodic_checks(node: str, broker_url: str, options: dict, interval: float) -> None:
    """Record broker/database reachability when it changes (and once an hour while it stays the same)."""
    last: dict = {}
    last_at = 0.0
    while True:
        db_ok, db_msg, _ = health.check_database()
        br_ok, br_msg, _ = health.check_broker(broker_url, options)
        now = time.monotonic()
        current = {"database": db_ok, "broker": br_ok}
        if current != last or now - last_at > 3600:
            if db_ok:
                health.record("database", "check", "ok", db_msg, source=node)
                health.record("broker", "check", "ok" if br_ok else "fail", br_msg, source=node)
            else:
                log.error("ledger database unreachable: %s", db_msg)
            last, last_at = current, now
        time.sleep(interval)


@signals.worker_process_init.connect
def _after_fork(**_):
    db.dispose_all()  # never share database connections across a fork


@signals.worker_ready.connect
def _ready(sender=None, **_):
    node = getattr(sender, "hostname", None) or socket.gethostname()
    _state["node"] = node
    broker_url, options = _broker(sender)
    consumer = getattr(sender, "controller", None)
    pool = type(getattr(consumer, "pool", None)).__name__ if consumer else None
    health.record("worker", "worker_start", "ok", f"worker {node} ready", source=node,
                  detail={"pid": os.getpid(), "pool": pool, "rss_mb": round(_rss_mb(), 1)})
    health.check_and_record(broker_url, options, source=node)
    if _state["checker"] is None:
        t = threading.Thread(target=_periodic_checks, args=(node, broker_url, options, 60.0), daemon=True,
                             name="foundry-health")
        t.start()
        _state["checker"] = t


@signals.worker_shutting_down.connect
def _shutting_down(sig=None, how=None, **_):
    jobs.stop_requested.set()  # long jobs checkpoint and requeue themselves
    log.warning("worker stopping (%s %s): running jobs %s will checkpoint", sig, how, jobs.running_job_ids())


@signals.worker_shutdown.connect
def _shutdown(sender=None, **_):
    health.record("worker", "worker_stop", "ok", f"worker {_state['node']} stopped", source=_state["node"],
                  detail={"pid": os.getpid()})


@signals.task_postrun.connect
def _recycle(**_):
    limit = get_settings().worker_max_memory_mb
    if limit and _rss_mb() > limit:
        rss = round(_rss_mb(), 1)
        health.record("memory", "recycle", "degraded", f"RSS {rss} MB above {limit} MB: warm restart",
                      source=_state["node"], detail={"rss_mb": rss, "limit_mb": limit})
        os.kill(os.getpid(), signal.SIGTERM)  # warm shutdown; the supervisor (compose restart policy) restarts it
