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
    assert value(m, "foundry_jobs", kind="noop", status="succeeded") == 2
    assert value(m, "foundry_ledger_up") == 1 and value(m, "foundry_broker_up") == 1
    assert value(m, "foundry_queue_depth", queue="control") == 0
    jobs.execute("noop", uuid.uuid4().hex, {"tenant": "acme", "cost_tokens": 5}, "w:1")
    m.refresh("filesystem://", options, ["control"], ledger)
    assert value(m, "foundry_job_duration_seconds_count", kind="noop") == 3
    assert value(m, "foundry_tokens_total", tenant="acme") == 1015


def test_unreachable_ledger_and_broker_are_reported_not_raised(tmp_path):
    m = metrics.LedgerMetrics()
    m.refresh("redis://127.0.0.1:1/0", {"sep": ":"}, ["control"], f"postgresql+psycopg://u@127.0.0.1:1/x")
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
