"""Worker lifecycle hooks: health events on start/stop, periodic health checks, soft stop for long jobs,
memory recycling.

The health thread checks, every ``FOUNDRY_HEALTH_INTERVAL_S``: ledger and broker reachability, the
heartbeat of the jobs running here, memory headroom (RSS against ``FOUNDRY_WORKER_MAX_MEMORY_MB`` or the
cgroup limit, system memory available, free GPU memory when CUDA is in use) and an operator drain
(``foundry workers drain NODE|host:HOST|all``, kept in the ledger so every host sees it, see domain/drain.py;
a file ``<data_dir>/drain/<node>`` or ``<data_dir>/drain/all`` still works on its own host). A worker failing any check (other than the
broker, which it cannot consume from anyway) stops consuming its queues (a ``cancel_consumer`` control
command to itself) and resumes (``add_consumer``) when the checks pass again; both moves are health events.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

from celery import signals
from domain import contract, health
from domain.config import HealthSettings, get_settings
from domain.kinds import ML_QUEUES
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


def _cgroup_limit_mb() -> float | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = open(path).read().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < 1 << 60:
            return int(raw) / 2**20
    return None


def _available_mb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def memory_snapshot() -> dict:
    """RSS, its limit, system memory available and (if torch with CUDA is loaded) free GPU memory, in MB."""
    limit = get_settings().worker_max_memory_mb or _cgroup_limit_mb()
    snap = {"rss_mb": round(_rss_mb(), 1), "limit_mb": limit, "available_mb": _available_mb(), "gpu_free_mb": None}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        free, total = torch.cuda.mem_get_info()
        snap["gpu_free_mb"], snap["gpu_total_mb"] = round(free / 2**20, 1), round(total / 2**20, 1)
    return snap


@dataclass
class CheckResult:
    failures: list[str] = field(default_factory=list)
    detail: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures


def evaluate(*, db_ok: bool, db_msg: str, memory: dict, stale_jobs: list[str], heartbeat_alive: bool,
             drained: str | None, settings: HealthSettings) -> CheckResult:
    """Which checks fail (pure: the inputs are measured by ``run_checks``)."""
    r = CheckResult(detail={"memory": memory})
    if not db_ok:
        r.failures.append(f"database: {db_msg}")
    if stale_jobs:
        r.failures.append(f"heartbeat: jobs {', '.join(stale_jobs[:5])} running here have a stale heartbeat")
    if not heartbeat_alive:
        r.failures.append("heartbeat: the heartbeat thread is not running while jobs run")
    headroom = []
    if memory.get("limit_mb"):
        headroom.append(memory["limit_mb"] - memory["rss_mb"])
    if memory.get("available_mb") is not None:
        headroom.append(memory["available_mb"])
    if headroom and min(headroom) < settings.min_free_memory_mb:
        r.failures.append(f"memory: {min(headroom):.0f} MB headroom < {settings.min_free_memory_mb:.0f} MB")
    if memory.get("gpu_free_mb") is not None and memory["gpu_free_mb"] < settings.min_gpu_free_mb:
        r.failures.append(f"gpu: {memory['gpu_free_mb']:.0f} MB free < {settings.min_gpu_free_mb:.0f} MB")
    if drained:
        r.failures.append(f"drained: {drained} (`foundry workers undrain`, or remove the file, to resume)")
    return r


def _drain_file(node: str) -> str | None:
    """A drain recorded in the ledger (``foundry workers drain``, seen by every host), or a host-local file."""
    from domain import drain

    try:
        found = drain.drained(node)
    except Exception:  # noqa: BLE001 - the ledger check reports an unreachable database
        found = None
    if found is not None:
        return f"drain {found.target!r} by {found.by} in the ledger"
    root = get_settings().data_dir / "drain"
    for name in (node, "all"):
        if (root / name).exists():
            return str(root / name)
    return None


def _stale_running_here(stale_after_s: float) -> list[str]:
    from sqlalchemy import select

    from domain.ledger.db import session_scope
    from domain.ledger.models import Job, utcnow

    ids = contract.running_job_ids()
    if not ids:
        return []
    cutoff = utcnow() - timedelta(seconds=stale_after_s)
    with session_scope() as s:
        return list(s.scalars(select(Job.id).where(Job.id.in_(ids), Job.status == "running", Job.heartbeat_at < cutoff)))


def run_checks(settings: HealthSettings) -> tuple[CheckResult, bool, str]:
    db_ok, db_msg, _ = health.check_database()
    stale = []
    if db_ok:
        try:
            stale = _stale_running_here(get_settings().stale_after_s)
        except Exception as exc:  # noqa: BLE001
            db_ok, db_msg = False, f"unreachable: {type(exc).__name__}"
    alive = not contract.running_job_ids() or contract.heartbeat_alive()
    result = evaluate(db_ok=db_ok, db_msg=db_msg, memory=memory_snapshot(), stale_jobs=stale, heartbeat_alive=alive,
                      drained=_drain_file(_state["node"]), settings=settings)
    return result, db_ok, db_msg


class Gate:
    """Stops and resumes this worker's consumption of its queues (control commands to itself)."""

    def __init__(self, app, node: str, queues: list[str]):
        self.app, self.node, self.queues = app, node, queues
        self.consuming = True

    def stop(self, reasons: list[str]) -> None:
        for q in self.queues:
            self.app.control.cancel_consumer(q, destination=[self.node], reply=False)
        self.consuming = False
        log.error("worker %s stops taking jobs: %s", self.node, "; ".join(reasons))
        health.record("worker", "stop_consuming", "fail", f"{self.node} stopped taking jobs: {'; '.join(reasons)}",
                      source=self.node, detail={"queues": self.queues, "reasons": reasons})

    def resume(self) -> None:
        for q in self.queues:
            self.app.control.add_consumer(q, destination=[self.node], reply=False)
        self.consuming = True
        log.warning("worker %s takes jobs again", self.node)
        health.record("worker", "resume_consuming", "ok", f"{self.node} passes its health checks again: taking jobs",
                      source=self.node, detail={"queues": self.queues})


def _periodic_checks(node: str, broker_url: str, options: dict, gate: Gate | None, settings: HealthSettings) -> None:
    """Record reachability when it changes (and hourly), memory figures every few minutes, and gate consumption."""
    last: dict = {}
    last_at = last_memory_at = 0.0
    while True:
        try:
            result, db_ok, db_msg = run_checks(settings)
            br_ok, br_msg, _ = health.check_broker(broker_url, options)
            now = time.monotonic()
            current = {"database": db_ok, "broker": br_ok, "failures": result.failures}
            changed = current != last
            if changed or now - last_at > 3600:
                if db_ok:
                    health.record("database", "check", "ok", db_msg, source=node)
                    health.record("broker", "check", "ok" if br_ok else "fail", br_msg, source=node)
                else:
                    log.error("ledger database unreachable: %s", db_msg)
                last, last_at = current, now
            if db_ok and (changed or now - last_memory_at > settings.memory_event_s):
                mem = result.detail["memory"]
                bad = [f for f in result.failures if f.startswith(("memory", "gpu"))]
                health.record("memory", "check", "degraded" if bad else "ok", "; ".join(bad) or "headroom ok",
                              source=node, detail=mem)
                last_memory_at = now
            if gate is not None:
                if not result.ok and gate.consuming:
                    gate.stop(result.failures)
                elif result.ok and not gate.consuming:
                    gate.resume()
        except Exception as exc:  # noqa: BLE001 - the health thread must survive anything
            log.warning("health check failed: %s", exc)
        time.sleep(settings.interval_s)


def _broker(sender) -> tuple[str, dict]:
    app = getattr(sender, "app", None)
    if app is None:
        from worker.celery_app import app
    return app.conf.broker_url or "", dict(app.conf.broker_transport_options or {})


def _prefetch_loop(interval: float) -> None:
    """Review workers: keep every tenant's champion in this host's cache (domain.adapters.store)."""
    from domain.adapter_lookup import prefetch_champions

    while True:
        try:
            fetched = prefetch_champions()
            if fetched:
                log.info("prefetched champion adapter(s) %s into this host's cache", ", ".join(fetched))
        except Exception as exc:  # noqa: BLE001 - prefetching is an optimisation, never fatal
            log.warning("champion prefetch failed: %s", exc)
        time.sleep(interval)


def _consumed_queues(sender) -> list[str]:
    app = getattr(sender, "app", None)
    try:
        return sorted(app.amqp.queues.consume_from or app.amqp.queues)
    except AttributeError:
        return []


@signals.celeryd_after_setup.connect
def _warm_ledger_driver(sender=None, instance=None, **_):
    """Import the ledger's database driver (psycopg for PostgreSQL) in the main process, before the pool forks:
    otherwise every pool process imports it during its first job (about 0.2 s of CPU each, measured with
    py-spy in bench/queue_overhead.py), again after every recycle."""
    from sqlalchemy.engine import make_url

    try:
        make_url(get_settings().ledger_url).get_dialect().import_dbapi()
    except Exception as exc:  # noqa: BLE001 - the first job reports a broken driver with its own error
        log.warning("ledger driver not preloaded: %s", exc)


@signals.celeryd_after_setup.connect
def _warm_imports(sender=None, instance=None, **_):
    """Import the ML libraries once, on the main thread, before any job runs. transformers resolves its
    classes lazily, and two pool threads doing that first import at the same time can fail with
    ``ImportError: cannot import name 'AutoModelForCausalLM'`` (seen in the fault-injection suite)."""
    app = getattr(instance, "app", None)
    queues = set(_consumed_queues(instance)) if app is not None else set()
    if not queues & ML_QUEUES:
        return
    t0 = time.perf_counter()
    import peft  # noqa: F401
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    for name in ("LlamaForCausalLM", "BitsAndBytesConfig", "PreTrainedTokenizerFast"):
        getattr(transformers, name, None)
    if "index" in queues:
        try:
            import sentence_transformers  # noqa: F401
        except ImportError:
            pass
    log.info("ML libraries imported in %.1f s", time.perf_counter() - t0)


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
        app = getattr(sender, "app", None)
        gate = Gate(app, node, _consumed_queues(sender)) if app is not None else None
        if "review" in _consumed_queues(sender) and get_settings().champion_prefetch_s > 0:
            threading.Thread(target=_prefetch_loop, args=(get_settings().champion_prefetch_s,), daemon=True,
                             name="foundry-prefetch").start()
        if get_settings().train_rank_agent:  # ranks of other hosts' retrain/distill jobs (domain/rank_agent.py)
            from domain import rank_agent

            rank_agent.serve_in_thread()
            log.info("rank agent started on %s", node)
        t = threading.Thread(target=_periodic_checks, args=(node, broker_url, options, gate, get_settings().health),
                             daemon=True, name="foundry-health")
        t.start()
        _state["checker"] = t


@signals.worker_shutting_down.connect
def _shutting_down(sig=None, how=None, **_):
    contract.stop_requested.set()  # long jobs checkpoint and requeue themselves
    log.warning("worker stopping (%s %s): running jobs %s will checkpoint", sig, how, contract.running_job_ids())


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
