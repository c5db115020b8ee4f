"""domain.jobs.execute against a real (SQLite) ledger, no broker: the exactly-once bookkeeping rules."""

import uuid

import pytest
from sqlalchemy import func, select

from domain import jobs
from domain.config import get_settings, reset_settings
from domain.ledger import jobstore
from domain.ledger.db import session_scope
from domain.ledger.models import Job, JobAttempt, UsageCost


def job(job_id):
    with session_scope() as s:
        j = s.get(Job, job_id)
        attempts = list(s.scalars(select(JobAttempt).where(JobAttempt.job_id == job_id).order_by(JobAttempt.attempt)))
        costs = s.scalar(select(func.count()).select_from(UsageCost).where(UsageCost.job_id == job_id))
        return j, attempts, costs


def test_success_records_result_usage_and_attempt(ledger):
    jid = uuid.uuid4().hex
    out = jobs.execute("noop", jid, {"tenant": "acme", "cost_tokens": 1000}, "w1:1")
    assert out["status"] == "succeeded"
    j, attempts, costs = job(jid)
    assert (j.status, j.attempts, j.progress, j.created_by) == ("succeeded", 1, 1.0, "foreign")
    assert [a.outcome for a in attempts] == ["succeeded"]
    assert costs == 1
    with session_scope() as s:
        cost = s.scalar(select(UsageCost).where(UsageCost.job_id == jid))
    assert cost.prompt_tokens == 1000 and cost.cost > 0 and cost.price_version


def test_redelivery_of_a_succeeded_job_does_not_run_or_cost_twice(ledger):
    jid = uuid.uuid4().hex
    body = {"tenant": "acme", "cost_tokens": 500}
    jobs.execute("noop", jid, body, "w1:1")
    again = jobs.execute("noop", jid, body, "w2:2")
    assert again["status"] == "succeeded" and "already" in again["skipped"]
    j, attempts, costs = job(jid)
    assert j.attempts == 1 and len(attempts) == 1 and costs == 1


def test_malformed_message_is_rejected_once_with_the_field_and_never_retried(ledger):
    jid = uuid.uuid4().hex
    out = jobs.execute("review", jid, {"tenant": "acme", "code": "x", "max_new_tokens": "lots"}, "w1:1")
    assert out["status"] == "rejected" and out["field"] == "max_new_tokens"
    again = jobs.execute("review", jid, {"tenant": "acme", "code": "x", "max_new_tokens": "lots"}, "w1:1")
    assert again["status"] == "rejected"
    j, attempts, _ = job(jid)
    assert j.status == "rejected" and "max_new_tokens" in j.error and j.attempts == 1
    assert [a.outcome for a in attempts] == ["rejected"]


def test_body_that_is_not_an_object_is_rejected_and_kept(ledger):
    jid = uuid.uuid4().hex
    out = jobs.execute("index", jid, ["not", "an", "object"], "w1:1")
    assert out["status"] == "rejected"
    j, _, _ = job(jid)
    assert j.payload == {"raw": "['not', 'an', 'object']"}


def test_unknown_tenant_is_rejected(ledger):
    jid = uuid.uuid4().hex
    out = jobs.execute("noop", jid, {"tenant": "nobody"}, "w1:1")
    assert out["status"] == "rejected" and out["field"] == "tenant"
    assert job(jid)[0].error_code == "unknown_tenant"


def test_job_is_dead_lettered_after_max_attempts(ledger, monkeypatch):
    """Each claim without a finish is a delivery whose worker died (the poison-message case)."""
    monkeypatch.setenv("FOUNDRY_STALE_AFTER_S", "0")
    reset_settings()
    jid = uuid.uuid4().hex
    s = get_settings()
    for attempt in range(1, s.max_attempts + 1):
        c = jobstore.claim(jid, "noop", "acme", {}, f"w{attempt}:1", max_attempts=s.max_attempts, stale_after_s=0)
        assert c.run and c.attempt == attempt
    out = jobs.execute("noop", jid, {"tenant": "acme"}, "w9:1")
    assert out["status"] == "dead"
    j, attempts, _ = job(jid)
    assert j.status == "dead" and j.error_code == "max_attempts" and "after 3 attempts" in j.error
    assert [a.outcome for a in attempts] == ["lost", "lost", "lost", "dead"]


def test_live_job_redelivered_elsewhere_is_deferred_not_run_twice(ledger):
    jid = uuid.uuid4().hex
    c = jobstore.claim(jid, "noop", "acme", {}, "gpu-a@h1:10", max_attempts=3, stale_after_s=60)
    assert c.run
    with pytest.raises(jobs.RetryLater):
        jobs.execute("noop", jid, {"tenant": "acme"}, "gpu-b@h2:20")
    # the same node restarted (new pid): the old attempt is lost, run it now
    out = jobs.execute("noop", jid, {"tenant": "acme"}, "gpu-a@h1:11")
    assert out["status"] == "succeeded"
    assert [a.outcome for a in job(jid)[1]] == ["lost", "succeeded"]


def test_transient_error_asks_for_retry_then_succeeds(ledger):
    jid = uuid.uuid4().hex
    body = {"tenant": "acme", "crash": "transient", "crash_times": 1}
    with pytest.raises(jobs.RetryLater) as r:
        jobs.execute("noop", jid, body, "w1:1")
    assert r.value.countdown > 0
    assert job(jid)[0].status == "queued"
    assert jobs.execute("noop", jid, body, "w1:1")["status"] == "succeeded"
    assert [a.outcome for a in job(jid)[1]] == ["retry", "succeeded"]


def test_unexpected_exception_fails_permanently(ledger):
    jid = uuid.uuid4().hex
    out = jobs.execute("noop", jid, {"tenant": "acme", "crash": "raise"}, "w1:1")
    assert out["status"] == "failed" and "injected fault" in out["error"]
    assert job(jid)[0].status == "failed"


def test_fault_injection_is_refused_unless_enabled(ledger, monkeypatch):
    monkeypatch.setenv("FOUNDRY_ALLOW_FAULT_INJECTION", "0")
    reset_settings()
    out = jobs.execute("noop", uuid.uuid4().hex, {"tenant": "acme", "crash": "exit"}, "w1:1")
    assert out["status"] == "rejected" and out["field"] == "crash"


def test_time_limit_fails_the_job(ledger, monkeypatch):
    monkeypatch.setenv("FOUNDRY_TIME_LIMITS", '{"noop": 0.3}')
    reset_settings()
    out = jobs.execute("noop", uuid.uuid4().hex, {"tenant": "acme", "sleep_s": 5}, "w1:1")
    assert out["status"] == "failed" and out["code"] == "timeout"


def test_soft_stop_requeues_without_using_an_attempt(ledger):
    jid = uuid.uuid4().hex
    jobs.stop_requested.set()
    try:
        with pytest.raises(jobs.SoftStop):
            jobs.execute("noop", jid, {"tenant": "acme", "sleep_s": 2}, "w1:1")
    finally:
        jobs.stop_requested.clear()
    j, attempts, _ = job(jid)
    assert j.status == "queued" and j.attempts == 1 and j.max_attempts == 4 and attempts[0].outcome == "interrupted"
    # the redelivery runs as attempt 2 (its own attempt row) and the soft stop did not use up the budget
    assert jobs.execute("noop", jid, {"tenant": "acme"}, "w1:1")["status"] == "succeeded"
    assert [a.outcome for a in job(jid)[1]] == ["interrupted", "succeeded"]


def test_idempotency_key_returns_the_first_job(ledger):
    first, created = jobstore.record_enqueued("j1", "noop", "acme", {}, idempotency_key="k", priority=5,
                                              queue="control", max_attempts=3, created_by="t")
    second, created2 = jobstore.record_enqueued("j2", "noop", "acme", {}, idempotency_key="k", priority=5,
                                                queue="control", max_attempts=3, created_by="t")
    assert (first, created, second, created2) == ("j1", True, "j1", False)
    # a foreign producer re-sending the same key under a new task id is a duplicate, not a second job
    jobs.execute("noop", "j1", {"tenant": "acme", "idempotency_key": "k"}, "w:1")
    dup = jobs.execute("noop", "j3", {"tenant": "acme", "idempotency_key": "k"}, "w:1")
    assert dup["duplicate_of"] == "j1"


def _op_error():
    from sqlalchemy.exc import OperationalError

    return OperationalError("INSERT ...", {}, Exception("connection refused"))


def test_ledger_outage_is_retried_until_the_write_lands(ledger, monkeypatch):
    monkeypatch.setenv("FOUNDRY_RETRY_BACKOFF_S", "0.01")
    reset_settings()
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise _op_error()
        return "written"

    assert jobs.with_ledger(flaky, "finish", get_settings()) == "written" and len(calls) == 3


def test_ledger_outage_past_the_budget_hands_the_job_back(ledger, monkeypatch):
    monkeypatch.setenv("FOUNDRY_RETRY_BACKOFF_S", "0.01")
    reset_settings()

    def down():
        raise _op_error()

    with pytest.raises(jobs.RetryLater, match="ledger unreachable"):
        jobs.with_ledger(down, "finish", get_settings(), budget_s=0.05)


def test_finish_during_outage_records_nothing_until_the_ledger_returns(ledger, monkeypatch):
    """A result is never acknowledged without its ledger row: the job stays unfinished, then finishes once."""
    monkeypatch.setenv("FOUNDRY_LEDGER_OUTAGE_MAX_S", "0.05")
    monkeypatch.setenv("FOUNDRY_RETRY_BACKOFF_S", "0.01")
    reset_settings()
    real = jobstore.finish_success
    monkeypatch.setattr(jobstore, "finish_success", lambda *a, **k: (_ for _ in ()).throw(_op_error()))
    jid = uuid.uuid4().hex
    with pytest.raises(jobs.RetryLater):
        jobs.execute("noop", jid, {"tenant": "acme", "cost_tokens": 7}, "w1:1")
    j, attempts, costs = job(jid)
    assert j.status == "running" and costs == 0
    monkeypatch.setattr(jobstore, "finish_success", real)
    monkeypatch.setenv("FOUNDRY_STALE_AFTER_S", "0")
    reset_settings()
    assert jobs.execute("noop", jid, {"tenant": "acme", "cost_tokens": 7}, "w2:2")["status"] == "succeeded"
    j, attempts, costs = job(jid)
    assert j.status == "succeeded" and costs == 1 and [a.outcome for a in attempts] == ["lost", "succeeded"]


def test_execute_returns_what_commit_added(ledger, monkeypatch):
    from domain.ledger.models import HealthEvent

    def handler(spec, ctx):
        def commit(session):
            session.add(HealthEvent(source="t", component="worker", event="made", status="ok"))
            return {"made_id": "x1"}
        return jobs.Outcome(result={"a": 1}, commit=commit)

    monkeypatch.setattr(jobs, "load_handler", lambda kind: handler)
    jid = uuid.uuid4().hex
    out = jobs.execute("noop", jid, {"tenant": "acme"}, "w:1")
    assert out["result"] == {"a": 1, "made_id": "x1"} and job(jid)[0].result == {"a": 1, "made_id": "x1"}
