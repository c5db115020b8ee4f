"""Prometheus metrics (prometheus_client) read from the broker and the ledger.

Flower has no queue-length metric, so ``foundry metrics serve`` exposes, on its own registry:

- ``foundry_queue_depth{queue}``: messages waiting per queue (Redis: LLEN of the queue and of each of
  its priority sub-queues ``<queue>:<n>`` — kombu names them ``queue + sep + priority`` and Foundry sets
  ``sep=":"``; filesystem broker: message files per queue), and ``foundry_unacked_messages``;
- ``foundry_jobs{kind,status}``: jobs in the ledger by status;
- ``foundry_job_duration_seconds{kind}``: histogram of finished jobs' run time (start to finish);
- ``foundry_job_failures_total{kind,code}``: failed/dead/rejected jobs by error code;
- ``foundry_cost_total{tenant,currency}``, ``foundry_tokens_total{tenant}``: usage written to the ledger;
- ``foundry_worker_rss_bytes{worker}``, ``foundry_worker_gpu_free_bytes{worker}``: from the workers'
  latest health checks, and ``foundry_gpu_memory_bytes{device,type}`` of this process's GPUs (when CUDA).

``LedgerMetrics.refresh()`` reads only what finished since the previous refresh (a high-water mark), so
counters and the histogram accumulate like the workers had observed them.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime, timedelta, timezone

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy import func, select

from domain.ledger.db import session_scope
from domain.ledger.models import HealthEvent, Job, UsageCost, aware

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, float("inf"))
FAILED = ("failed", "dead", "rejected")
OVERLAP = timedelta(seconds=30)  # re-read this much before the mark: commits land out of order


REDIS_UNACKED_KEY = "unacked"  # kombu's Redis transport: delivered, not yet acknowledged (tag -> message)
REDIS_UNACKED_INDEX_KEY = "unacked_index"  # tag -> delivery time


def redis_queue_keys(queue: str, sep: str = ":", priority_steps=range(10)) -> list[str]:
    """The Redis lists kombu keeps for one queue: the queue itself and one per non-zero priority step."""
    return [queue] + [f"{queue}{sep}{p}" for p in priority_steps if p]


def redis_queue_depths(broker_url: str, queues, sep: str = ":", priority_steps=range(10), client=None) -> dict:
    """Waiting messages per queue on a Redis broker, priority sub-queues included."""
    import redis

    r = client or redis.Redis.from_url(broker_url, socket_connect_timeout=3, socket_timeout=5)
    depths = {}
    pipe = r.pipeline()
    names = []
    for q in queues:
        keys = redis_queue_keys(q, sep, priority_steps)
        names.append((q, len(keys)))
        for k in keys:
            pipe.llen(k)
    values = iter(pipe.execute())
    for q, n in names:
        depths[q] = sum(next(values) for _ in range(n))
    depths["_unacked"] = r.hlen(REDIS_UNACKED_KEY)
    return depths


def filesystem_queue_depths(folder: str | os.PathLike, queues) -> dict:
    """Waiting messages per queue on kombu's filesystem broker (files named ``<ts>_<id>.<queue>.msg``)."""
    counts = dict.fromkeys(queues, 0)
    try:
        for name in os.listdir(folder):
            if name.endswith(".msg"):
                q = name[:-4].rsplit(".", 1)[-1]
                if q in counts:
                    counts[q] += 1
    except FileNotFoundError:
        pass
    return counts


class LedgerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("foundry_queue_depth", "Messages waiting in the broker per queue", ["queue"], registry=r)
        self.unacked = Gauge("foundry_unacked_messages", "Messages delivered to workers and not yet acknowledged",
                             registry=r)
        self.broker_up = Gauge("foundry_broker_up", "1 if the broker answered the last refresh", registry=r)
        self.ledger_up = Gauge("foundry_ledger_up", "1 if the ledger answered the last refresh", registry=r)
        self.jobs = Gauge("foundry_jobs", "Jobs in the ledger by kind and status", ["kind", "status"], registry=r)
        self.duration = Histogram("foundry_job_duration_seconds", "Run time of finished jobs (start to finish)",
                                  ["kind"], buckets=DURATION_BUCKETS, registry=r)
        self.failures = Counter("foundry_job_failures", "Jobs that ended failed, dead or rejected", ["kind", "code"],
                                registry=r)
        self.cost = Counter("foundry_cost", "Money spent, from the ledger's usage rows", ["tenant", "currency"],
                            registry=r)
        self.tokens = Counter("foundry_tokens", "Prompt + completion tokens", ["tenant"], registry=r)
        self.rss = Gauge("foundry_worker_rss_bytes", "Worker RSS at its latest health check", ["worker"], registry=r)
        self.gpu_free = Gauge("foundry_worker_gpu_free_bytes", "Worker free GPU memory at its latest health check",
                              ["worker"], registry=r)
        self.gpu = Gauge("foundry_gpu_memory_bytes", "GPU memory of this process's devices", ["device", "type"],
                         registry=r)
        self._mark: datetime | None = None  # finished_at high-water mark
        self._seen: dict[str, datetime] = {}  # job ids observed near the mark
        self._usage_id = 0

    # ---- broker -------------------------------------------------------------------------------
    def refresh_queues(self, broker_url: str, transport_options: dict, queues) -> None:
        try:
            if broker_url.startswith("redis"):
                depths = redis_queue_depths(broker_url, queues, transport_options.get("sep", "\x06\x16"),
                                            transport_options.get("priority_steps", [0, 3, 6, 9]))
                self.unacked.set(depths.pop("_unacked"))
            else:
                depths = filesystem_queue_depths(transport_options.get("data_folder_in", "."), queues)
            for q, n in depths.items():
                self.queue_depth.labels(q).set(n)
            self.broker_up.set(1)
        except Exception:  # noqa: BLE001 - a scrape must still answer while the broker is down
            self.broker_up.set(0)

    # ---- ledger -------------------------------------------------------------------------------
    def refresh_ledger(self, url: str | None = None) -> None:
        try:
            with session_scope(url) as s:
                self._refresh_counts(s)
                self._refresh_finished(s)
                self._refresh_usage(s)
                self._refresh_worker_memory(s)
            self.ledger_up.set(1)
        except Exception:  # noqa: BLE001
            self.ledger_up.set(0)

    def _refresh_counts(self, s) -> None:
        self.jobs.clear()
        for kind, status, n in s.execute(select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)):
            self.jobs.labels(kind, status).set(n)

    def _refresh_finished(self, s) -> None:
        q = select(Job.id, Job.kind, Job.status, Job.error_code, Job.started_at, Job.finished_at).where(
            Job.finished_at.is_not(None), Job.status.in_(("succeeded", *FAILED)))
        if self._mark is not None:
            q = q.where(Job.finished_at >= self._mark - OVERLAP)
        newest = self._mark
        for row in s.execute(q):
            finished = aware(row.finished_at)
            if row.id in self._seen:
                continue
            self._seen[row.id] = finished
            newest = finished if newest is None or finished > newest else newest
            if row.status == "succeeded" and row.started_at is not None:
                self.duration.labels(row.kind).observe(max(0.0, (finished - aware(row.started_at)).total_seconds()))
            elif row.status in FAILED:
                self.failures.labels(row.kind, row.error_code or row.status).inc()
        self._mark = newest
        if newest is not None:  # forget ids that can no longer be re-read
            self._seen = {k: v for k, v in self._seen.items() if v >= newest - 2 * OVERLAP}

    def _refresh_usage(self, s) -> None:
        q = select(UsageCost.id, UsageCost.tenant_id, UsageCost.currency, UsageCost.cost, UsageCost.prompt_tokens,
                   UsageCost.completion_tokens).where(UsageCost.id > self._usage_id).order_by(UsageCost.id)
        for row in s.execute(q):
            self.cost.labels(row.tenant_id, row.currency or "USD").inc(float(row.cost or 0))
            self.tokens.labels(row.tenant_id).inc(int(row.prompt_tokens or 0) + int(row.completion_tokens or 0))
            self._usage_id = row.id

    def _refresh_worker_memory(self, s) -> None:
        since = datetime.now(timezone.utc) - timedelta(minutes=15)
        q = select(HealthEvent.source, HealthEvent.detail).where(
            HealthEvent.component == "memory", HealthEvent.event == "check", HealthEvent.at >= since
        ).order_by(HealthEvent.at)
        self.rss.clear()
        self.gpu_free.clear()
        for source, detail in s.execute(q):  # later rows overwrite earlier ones: the latest per worker wins
            detail = detail or {}
            if detail.get("rss_mb") is not None:
                self.rss.labels(source).set(float(detail["rss_mb"]) * 2**20)
            if detail.get("gpu_free_mb") is not None:
                self.gpu_free.labels(source).set(float(detail["gpu_free_mb"]) * 2**20)

    # ---- this process's GPUs ------------------------------------------------------------------
    def refresh_gpu(self) -> None:
        for device, values in gpu_memory().items():
            for kind, n in values.items():
                self.gpu.labels(device, kind).set(n)

    def refresh(self, broker_url: str, transport_options: dict, queues, url: str | None = None) -> None:
        self.refresh_queues(broker_url, transport_options, queues)
        self.refresh_ledger(url)
        self.refresh_gpu()


def gpu_memory() -> dict:
    """{"cuda:0": {"free", "total", "allocated", "reserved"}} in bytes; empty without CUDA. Only looks
    if torch is already imported (a metrics server should not pay for importing it)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return {}
    out = {}
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        out[f"cuda:{i}"] = {"free": free, "total": total, "allocated": torch.cuda.memory_allocated(i),
                            "reserved": torch.cuda.memory_reserved(i)}
    return out



def serve(port: int, registry: CollectorRegistry, refresh, *, user: str | None, password: str | None,
          host: str = "0.0.0.0"):
    """Serve ``/metrics`` (refreshing before each scrape) behind HTTP basic auth; ``user=None`` serves
    without auth. Returns the started ThreadingHTTPServer (call ``serve_forever`` or shut it down)."""
    import base64
    import hmac
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    expected = ("Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()) if user is not None else None
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if expected is not None and not hmac.compare_digest(self.headers.get("Authorization", ""), expected):
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="foundry metrics"')
                self.end_headers()
                return
            if self.path.split("?")[0] not in ("/metrics", "/"):
                self.send_response(404)
                self.end_headers()
                return
            with lock:
                refresh()
                body = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # quiet: no request lines (and no credentials) in the logs
            pass

    return ThreadingHTTPServer((host, port), Handler)
