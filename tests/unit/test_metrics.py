"""domain.metrics: queue depths (Redis key naming, filesystem broker), ledger-derived metrics counted once,
and the /metrics endpoint behind basic auth."""

from __future__ import annotations

import base64
import threading
import urllib.error
import urllib.request
import uuid

from prometheus_client import generate_latest

from domain import jobs, metrics


class FakeRedis:
    """Keeps lists and hashes like Redis; enough for LLEN/HLEN through a pipeline."""

    def __init__(self, lists: dict, unacked: int = 0):
        self.lists, self.unacked, self.asked = lists, unacked, []

    def pipeline(self):
        return self

    def llen(self, key):
        self.asked.append(key)

    def execute(self):
        out = [self.lists.get(k, 0) for k in self.asked]
        self.asked = []
        return out

    def hlen(self, key):
        return self.unacked if key == "unacked" else 0


def test_redis_depth_counts_priority_sub_queues_with_kombus_naming():
    r = FakeRedis({"review": 2, "review:3": 4, "review:9": 1, "index": 5, "index\x06\x163": 99}, unacked=3)
    depths = metrics.redis_queue_depths("redis://x", ["review", "index", "control"], sep=":", client=r)
    assert depths == {"review": 7, "index": 5, "control": 0, "_unacked": 3}


def test_filesystem_depth_counts_message_files_per_queue(tmp_path):
    for name in ("1_a.review.msg", "2_b.review.msg", "3_c.control.msg", "junk.txt", "4_d.other.msg"):
        (tmp_path / name).write_text("{}")
    assert metrics.filesystem_queue_depths(tmp_path, ["review", "control", "index"]) == {"review": 2, "control": 1,
                                                                                          "index": 0}


def value(m: metrics.LedgerMetrics, name: str, **labels) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_ledger_metrics_accumulate_once_per_finished_job(ledger, tmp_path):
    for body in ({"cost_tokens": 1000}, {"cost_tokens": 10}, {"crash": "raise"}, {"bogus": 1}):
        jobs.execute("noop", uuid.uuid4().hex, {"tenant": "acme", **body}, "w:1")
    m = metrics.LedgerMetrics()
    options = {"data_folder_in": str(tmp_path)}
    m.refresh("filesystem://", options, ["control"], ledger)
    m.refresh("filesystem://", options, ["control"], ledger)  # a second scrape must not count again
    assert value(m, "foundry_job_duration_seconds_count", kind="noop") == 2
    assert value(m, "foundry_job_failures_total", kind="noop", code="error") == 1
    assert value(m, "foundry_job_failures_total", kind="noop", code="invalid") == 1
    assert value(m, "foundry_tokens_total", tenant="acme") == 1010
    assert value(m, "foundry_cost_total", tenant="acme", currency="USD") > 0
    assert value(m, "foundry_jobs_finished_total", kind="noop", status="succeeded") == 2
    assert value(m, "foundry_jobs_finished_total", kind="noop", status="rejected") == 1
    assert value(m, "foundry_job_queue_wait_seconds_count", kind="noop") == 3  # the rejected one never started
    assert value(m, "foundry_ledger_up") == 1 and value(m, "foundry_broker_up") == 1
    assert value(m, "foundry_queue_depth", queue="control") == 0
    jobs.execute("noop", uuid.uuid4().hex, {"tenant": "acme", "cost_tokens": 5}, "w:1")
    m.refresh("filesystem://", options, ["control"], ledger)
    assert value(m, "foundry_job_duration_seconds_count", kind="noop") == 3
    assert value(m, "foundry_tokens_total", tenant="acme") == 1015
    assert value(m, "foundry_job_queue_wait_seconds_count", kind="noop") == 4


def test_open_jobs_wait_stale_and_dead(ledger, tmp_path):
    """Queued and running jobs, a running job's queue wait (observed once, not again when it finishes),
    a stale heartbeat and dead letters."""
    from datetime import datetime, timedelta, timezone

    from domain.ledger.db import session_scope
    from domain.ledger.models import Job

    now = datetime.now(timezone.utc)
    with session_scope() as s:
        s.add(Job(id="q1", kind="review", tenant_id="acme", status="queued", enqueued_at=now - timedelta(seconds=90)))
        s.add(Job(id="r1", kind="review", tenant_id="acme", status="running", enqueued_at=now - timedelta(seconds=50),
                  started_at=now - timedelta(seconds=40), heartbeat_at=now - timedelta(seconds=1)))
        s.add(Job(id="r2", kind="retrain", tenant_id="acme", status="running", enqueued_at=now - timedelta(hours=1),
                  started_at=now - timedelta(minutes=50), heartbeat_at=now - timedelta(minutes=10)))
        s.add(Job(id="d1", kind="retrain", tenant_id="acme", status="dead", enqueued_at=now, finished_at=now))
    m = metrics.LedgerMetrics(stale_after_s=60)
    m.refresh_ledger(ledger)
    assert value(m, "foundry_jobs", kind="review", status="queued") == 1
    assert value(m, "foundry_jobs", kind="review", status="running") == 1
    assert 89 <= value(m, "foundry_oldest_queued_job_seconds", kind="review") < 200
    assert value(m, "foundry_stale_running_jobs", kind="review") == 0
    assert value(m, "foundry_stale_running_jobs", kind="retrain") == 1
    assert value(m, "foundry_dead_jobs") == 1
    assert value(m, "foundry_job_queue_wait_seconds_count", kind="review") == 1
    assert value(m, "foundry_job_queue_wait_seconds_bucket", kind="review", le="10.0") == 1  # waited 10 s
    with session_scope() as s:
        s.get(Job, "r1").status, s.get(Job, "r1").finished_at = "succeeded", datetime.now(timezone.utc)
    m.refresh_ledger(ledger)
    assert value(m, "foundry_job_queue_wait_seconds_count", kind="review") == 1  # not observed twice
    assert value(m, "foundry_job_duration_seconds_count", kind="review") == 1
    assert value(m, "foundry_jobs", kind="review", status="running") is None


def test_usage_ids_count_rows_that_commit_out_of_order():
    ids = metrics.UsageIds(top=10)
    assert ids.counted([12, 13], now=0.0) == [12, 13] and ids.gaps == {11: 0.0}
    assert ids.counted([12, 13], now=1.0) == []  # already counted
    assert ids.counted([11, 15], now=2.0) == [11, 15]  # 11 committed late: counted once
    assert set(ids.gaps) == {14}
    assert ids.counted([], now=2.0 + metrics.GAP_TIMEOUT_S) == [] and ids.gaps == {}  # 14 rolled back
    assert ids.top == 15


def test_unreachable_ledger_and_broker_are_reported_not_raised(tmp_path):
    m = metrics.LedgerMetrics()
    m.refresh("redis://127.0.0.1:1/0", {"sep": ":"}, ["control"], "postgresql+psycopg://u@127.0.0.1:1/x")
    assert value(m, "foundry_broker_up") == 0 and value(m, "foundry_ledger_up") == 0


def test_worker_memory_comes_from_health_events(ledger):
    from domain import health

    health.record("memory", "check", "ok", "fine", source="gpu@node1", detail={"rss_mb": 100, "gpu_free_mb": 2048})
    m = metrics.LedgerMetrics()
    m.refresh_ledger(ledger)
    assert value(m, "foundry_worker_rss_bytes", worker="gpu@node1") == 100 * 2**20
    assert value(m, "foundry_worker_gpu_free_bytes", worker="gpu@node1") == 2048 * 2**20


def _get(url, auth=None):
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def test_metrics_endpoint_requires_basic_auth():
    m = metrics.LedgerMetrics()
    refreshed = []
    server = metrics.serve(0, m.registry, lambda: refreshed.append(1), user="prom", password="pw", host="127.0.0.1")
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        assert _get(url)[0] == 401 and _get(url, "prom:nope")[0] == 401 and not refreshed
        status, body = _get(url, "prom:pw")
        assert status == 200 and "foundry_queue_depth" in body and refreshed == [1]
    finally:
        server.shutdown()
        server.server_close()
    assert generate_latest(m.registry)


def test_a_scrape_reads_only_indexed_recent_rows(ledger):
    """After the first scrape (which sums the usage rows once), no scrape groups or reads a whole table:
    every statement has a WHERE clause and none has GROUP BY."""
    from sqlalchemy import event

    from domain.ledger.db import get_engine

    for _ in range(3):
        jobs.execute("noop", uuid.uuid4().hex, {"tenant": "acme", "cost_tokens": 3}, "w:1")
    m = metrics.LedgerMetrics()
    m.refresh_ledger(ledger)
    statements: list[str] = []
    listener = lambda conn, cursor, sql, *rest: statements.append(" ".join(sql.split()).upper())  # noqa: E731
    event.listen(get_engine(ledger), "before_cursor_execute", listener)
    try:
        m.refresh_ledger(ledger)
    finally:
        event.remove(get_engine(ledger), "before_cursor_execute", listener)
    selects = [q for q in statements if q.startswith("SELECT")]
    assert len(selects) >= 4 and value(m, "foundry_ledger_up") == 1
    assert all(" WHERE " in q and "GROUP BY" not in q for q in selects), selects
