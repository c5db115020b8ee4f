"""The job pipeline through the real Redis and PostgreSQL with real worker processes."""

from __future__ import annotations

import base64
import json
import time
import uuid

import pytest
import redis as redis_lib
from sqlalchemy import func, select

from domain.ledger.db import session_scope
from domain.ledger.models import HealthEvent, Job, JobAttempt, UsageCost
from tests.integration.workers import running_worker, start_worker

pytestmark = pytest.mark.integration


def row(job_id):
    with session_scope() as s:
        j = s.get(Job, job_id)
        attempts = [a.outcome for a in s.scalars(select(JobAttempt).where(JobAttempt.job_id == job_id).order_by(JobAttempt.attempt))]
        costs = s.scalar(select(func.count()).select_from(UsageCost).where(UsageCost.job_id == job_id))
        return j, attempts, costs


def wait_status(job_id, statuses, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        j = row(job_id)[0]
        if j is not None and j.status in statuses:
            return j
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not in {statuses} after {timeout}s: {j and j.status}")


def test_jobs_flow_from_client_to_ledger(env):
    from worker.client import enqueue, wait

    with running_worker(env, queues=["control"]) as w:
        ids = [enqueue("noop", {"tenant": "acme", "cost_tokens": 10}) for _ in range(10)]
        for jid in ids:
            assert wait(jid, timeout=30)["status"] == "succeeded"
    for jid in ids:
        j, attempts, costs = row(jid)
        assert j.worker.startswith(w.name.split("@")[0]) and attempts == ["succeeded"] and costs == 1
        assert j.created_by.startswith("client") and j.queue == "control"
    with session_scope() as s:
        events = {e.event for e in s.scalars(select(HealthEvent))}
    assert {"worker_start", "worker_stop"} <= events


def test_malformed_message_from_a_foreign_producer_is_rejected_once(env):
    """Celery's own client skips our validation: the worker must still reject, record and not retry."""
    from worker.client import celery_app

    jid = uuid.uuid4().hex
    with running_worker(env, queues=["review"]):
        celery_app().send_task("foundry.review", args=[{"tenant": "acme", "code": "", "bogus": 1}], task_id=jid,
                               queue="review")
        j = wait_status(jid, {"rejected"})
        time.sleep(1.5)  # anything retried would show up as a second attempt by now
    j, attempts, costs = row(jid)
    assert j.status == "rejected" and "code" in j.error and "bogus" in j.error
    assert attempts == ["rejected"] and costs == 0 and j.created_by == "foreign"


def test_raw_protocol2_json_message_from_another_language(env, redis_url):
    """What a Go/Node/Ruby producer does: LPUSH a Celery protocol-2 JSON envelope (docs/messages.md)."""
    jid = uuid.uuid4().hex
    body = json.dumps([[{"tenant": "acme", "sleep_s": 0}], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    message = {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "js", "task": "foundry.noop", "id": jid, "root_id": jid, "parent_id": None, "group": None,
                    "retries": 0, "eta": None, "expires": None, "argsrepr": None, "kwargsrepr": None, "origin": "node@test"},
        "properties": {"correlation_id": jid, "reply_to": "", "delivery_mode": 2, "priority": 5,
                       "delivery_tag": str(uuid.uuid4()), "body_encoding": "base64",
                       "delivery_info": {"exchange": "foundry", "routing_key": "control"}},
    }
    with running_worker(env, queues=["control"]):
        redis_lib.Redis.from_url(redis_url).lpush("control", json.dumps(message))
        j = wait_status(jid, {"succeeded", "failed", "rejected"})
    assert j.status == "succeeded" and j.created_by == "foreign" and j.kind == "noop"


def test_sigkill_mid_job_is_redelivered_and_finished_once(env):
    from worker.client import enqueue, wait

    w = start_worker(env, queues=["control"])
    jid = enqueue("noop", {"tenant": "acme", "sleep_s": 3, "cost_tokens": 100})
    wait_status(jid, {"running"})
    time.sleep(0.5)
    w.kill()
    assert row(jid)[0].status == "running"
    with running_worker(env, queues=["control"]):
        assert wait(jid, timeout=60)["status"] == "succeeded"
    j, attempts, costs = row(jid)
    assert j.attempts == 2 and attempts == ["lost", "succeeded"] and costs == 1


def test_poison_message_that_kills_its_worker_ends_dead(env):
    from worker.client import enqueue

    jid = enqueue("noop", {"tenant": "acme", "crash": "exit"})
    deadline = time.monotonic() + 300
    while row(jid)[0].status != "dead" and time.monotonic() < deadline:
        w = start_worker(env, queues=["control"])
        t_end = time.monotonic() + 30
        while w.alive() and row(jid)[0].status != "dead" and time.monotonic() < t_end:
            time.sleep(0.2)
        w.stop()
    j, attempts, _ = row(jid)
    assert j.status == "dead" and j.attempts == 3, (j.status, attempts)
    assert attempts == ["lost", "lost", "lost", "dead"]
    # a dead job is acknowledged: nothing is left in the queue to loop on
    with running_worker(env, queues=["control"]):
        time.sleep(2)
    assert row(jid)[1] == ["lost", "lost", "lost", "dead"]


def test_transient_error_is_retried_with_backoff(env):
    from worker.client import enqueue, wait

    with running_worker(env, queues=["control"]):
        jid = enqueue("noop", {"tenant": "acme", "crash": "transient", "crash_times": 2})
        assert wait(jid, timeout=60)["status"] == "succeeded"
    assert row(jid)[1] == ["retry", "retry", "succeeded"]


def test_enqueue_with_broker_down_raises_and_records(env, monkeypatch):
    from worker.client import EnqueueError, enqueue

    monkeypatch.setenv("FOUNDRY_BROKER_URL", "redis://127.0.0.1:1/0")
    from domain.config import reset_settings

    reset_settings()
    with pytest.raises(EnqueueError, match="broker unreachable"):
        enqueue("noop", {"tenant": "acme"}, job_id="down-1")
    j = row("down-1")[0]
    assert j.status == "failed" and j.error_code == "broker_unreachable"


def test_idempotent_enqueue_and_duplicate_message(env):
    from worker.client import celery_app, enqueue, wait

    with running_worker(env, queues=["control"]):
        a = enqueue("noop", {"tenant": "acme", "idempotency_key": "order-7", "cost_tokens": 5})
        b = enqueue("noop", {"tenant": "acme", "idempotency_key": "order-7", "cost_tokens": 5})
        assert a == b
        wait(a, timeout=30)
        # the broker delivering the same message again (at-least-once) must not run or cost twice
        celery_app().send_task("foundry.noop", args=[{"tenant": "acme", "cost_tokens": 5}], task_id=a, queue="control")
        time.sleep(2)
    j, attempts, costs = row(a)
    assert j.status == "succeeded" and attempts == ["succeeded"] and costs == 1


def test_results_live_in_the_ledger_unless_celery_results_is_on(env, monkeypatch):
    """By default no copy of a job's outcome goes to Celery's result backend (the ledger holds it); with
    FOUNDRY_CELERY_RESULTS=1 a producer can also wait on AsyncResult."""
    import redis
    from celery.result import AsyncResult

    from tests.integration.workers import apply_env
    from worker.client import celery_app, enqueue, wait

    server = redis.Redis.from_url(env["FOUNDRY_BROKER_URL"])

    def subscribes() -> int:
        return server.info("commandstats").get("cmdstat_subscribe", {}).get("calls", 0)

    with running_worker(env, queues=["control"]):
        before = subscribes()
        jid = enqueue("noop", {"tenant": "acme"})
        # nor does the producer subscribe to a result channel that will never carry anything
        assert subscribes() == before
        assert wait(jid, timeout=30)["status"] == "succeeded"
        assert AsyncResult(jid, app=celery_app()).state == "PENDING"  # nothing stored in Redis
    on = {**env, "FOUNDRY_CELERY_RESULTS": "1"}
    apply_env(monkeypatch, on)
    with running_worker(on, queues=["control"]):
        before = subscribes()
        jid = enqueue("noop", {"tenant": "acme", "cost_tokens": 3})
        assert subscribes() > before
        summary = AsyncResult(jid, app=celery_app()).get(timeout=30)
    assert summary["job_id"] == jid and summary["status"] == "succeeded"
    assert wait(jid, timeout=5)["result"] == summary["result"]
