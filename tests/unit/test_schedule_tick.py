"""The beat's tick: schedules in the ledger, cron due times, the feedback threshold, one enqueue per fire
even with two beats ticking at once."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select, update

from domain.adapters import schedule
from tests.fixtures.adapters import seed_feedback, stdlib_review_pairs
from domain.errors import InvalidJob
from domain.ledger import jobstore
from domain.ledger.db import session_scope
from domain.ledger.models import AdapterVersion, Job, Lease, RetrainSchedule, new_id, utcnow

SET_AT = datetime(2026, 1, 1, 10, 0, tzinfo=timezone.utc)


class Recorder:
    """An enqueue like worker.client's: records the job in the ledger (idempotency key honoured)."""

    def __init__(self, delay: float = 0.0):
        self.calls: list[tuple[str, dict, str | None]] = []
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, kind: str, body: dict, parent_job_id: str | None = None) -> str:
        time.sleep(self.delay)
        with self.lock:
            self.calls.append((kind, body, parent_job_id))
        job_id, _ = jobstore.record_enqueued(new_id(), kind, body["tenant"], body, idempotency_key=body.get("idempotency_key"),
                                             priority=5, queue=kind, max_attempts=3, created_by="beat",
                                             parent_job_id=parent_job_id)
        return job_id


def _set(cron="@daily", min_feedback=5, **params):
    row = schedule.set_schedule("acme", cron, min_new_feedback=min_feedback, params=params)
    with session_scope() as s:
        s.execute(update(RetrainSchedule).where(RetrainSchedule.id == row["id"]).values(updated_at=SET_AT))
    return row


def test_set_schedule_validates_and_changes_without_redeploy(ledger):
    with pytest.raises(ValueError, match="cron"):
        schedule.set_schedule("acme", "every day")
    with pytest.raises(InvalidJob, match="max_steps"):
        schedule.set_schedule("acme", "@daily", params={"max_steps": 0})
    with pytest.raises(LookupError):
        schedule.set_schedule("nobody", "@daily")
    first = schedule.set_schedule("acme", "@daily", min_new_feedback=10, params={"max_steps": 50})
    second = schedule.set_schedule("acme", "@weekly", min_new_feedback=3)
    assert first["id"] == second["id"]  # one schedule per tenant and adapter name, changed in place
    [row] = schedule.list_schedules("acme")
    assert (row["cron"], row["min_new_feedback"], row["params"]) == ("@weekly", 3, {})
    assert row["next_run_at"].weekday() == 6 and row["next_run_at"].hour == 0  # next Sunday 00:00
    assert schedule.remove_schedule("acme") and schedule.list_schedules() == []


def test_due_threshold_and_one_enqueue_per_fire(ledger):
    _set("@daily", min_feedback=5, max_steps=20)
    enqueue = Recorder()
    day = lambda d, h=0, m=0: datetime(2026, 1, d, h, m, 30, tzinfo=timezone.utc)  # noqa: E731

    assert schedule.tick(day(1, 12), enqueue, "beat-a") == []  # 00:00 fired before the schedule was set
    seed_feedback("acme", stdlib_review_pairs(3))
    report: list = []
    assert schedule.tick(day(2), enqueue, "beat-a", report=report) == []  # due, but 3 < 5 new feedback
    assert report[0]["action"] == "skipped" and "3 new feedback" in report[0]["why"]
    assert schedule.tick(day(2, 0, 5), enqueue, "beat-a") == []  # that fire is handled
    seed_feedback("acme", stdlib_review_pairs(6)[3:])
    assert schedule.tick(day(2, 12), enqueue, "beat-a") == []  # enough feedback, but no new fire yet
    [job_id] = schedule.tick(day(3), enqueue, "beat-a")
    kind, body, parent = enqueue.calls[0]
    assert kind == "retrain" and parent is None
    assert body["tenant"] == "acme" and body["adapter_name"] == "reviewer" and body["max_steps"] == 20
    assert body["min_feedback"] == 5 and body["idempotency_key"] == "schedule:1:20260103T0000Z"
    with session_scope() as s:
        row = s.scalars(select(RetrainSchedule)).one()
        assert row.last_job_id == job_id and row.last_run_at.replace(tzinfo=timezone.utc) == day(3).replace(second=0)

    report = []
    assert schedule.tick(day(4), enqueue, "beat-a", report=report) == []  # the first retrain is still queued
    assert "still queued" in report[0]["why"]
    with session_scope() as s:
        s.get(Job, job_id).status = "succeeded"
        s.add(AdapterVersion(tenant_id="acme", name="reviewer", version=1, base_model_id="b", base_model_hash="h",
                             feedback_until=utcnow(), created_by_job_id=job_id))
    report = []
    assert schedule.tick(day(5), enqueue, "beat-a", report=report) == []  # everything is in version 1 now
    assert report[0]["new_feedback"] == 0
    seed_feedback("acme", stdlib_review_pairs(12)[6:])
    assert len(schedule.tick(day(6), enqueue, "beat-a")) == 1
    assert len(enqueue.calls) == 2


def test_disabled_schedules_are_not_evaluated(ledger):
    schedule.set_schedule("acme", "@hourly", min_new_feedback=1, enabled=False)
    seed_feedback("acme", stdlib_review_pairs(2))
    assert schedule.tick(utcnow() + timedelta(hours=2), Recorder(), "beat-a") == []


def test_two_beats_ticking_at_once_enqueue_once(ledger):
    _set("@hourly", min_feedback=1)
    seed_feedback("acme", stdlib_review_pairs(2))
    enqueue = Recorder(delay=0.05)
    now = datetime(2026, 1, 1, 11, 0, 10, tzinfo=timezone.utc)
    barrier = threading.Barrier(4)
    results: dict[str, list] = {}

    def beat(name):
        barrier.wait()
        results[name] = schedule.tick(now, enqueue, name)

    threads = [threading.Thread(target=beat, args=(f"beat-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(len(v) for v in results.values()) == 1 and len(enqueue.calls) == 1
    with session_scope() as s:
        assert len(s.scalars(select(Job).where(Job.kind == "retrain")).all()) == 1


def test_fire_is_claimed_once_even_without_the_lease(ledger):
    """Compare-and-set on last_run_at: a second evaluator of the same fire (an expired lease, a clock
    skew) finds it handled; the idempotency key would fold a repeated enqueue into the same job."""
    _set("@hourly", min_feedback=1)
    seed_feedback("acme", stdlib_review_pairs(2))
    now = datetime(2026, 1, 1, 11, 0, 10, tzinfo=timezone.utc)
    enqueue = Recorder()
    with session_scope() as s:
        row = s.scalars(select(RetrainSchedule)).one()
    fire = schedule.due_fire(row, now)
    first = schedule._run_fire(row, fire, enqueue, None)
    second = schedule._run_fire(row, fire, enqueue, None)  # a stale copy of the row
    assert first["action"] == "enqueued" and second["action"] == "skipped"
    assert "another tick" in second["why"] and len(enqueue.calls) == 1


def test_lease_is_exclusive_until_it_expires(ledger):
    t0 = datetime(2026, 1, 1, 0, 0, tzinfo=timezone.utc)
    assert schedule.acquire_lease("x", "beat-a", t0, 60)
    assert not schedule.acquire_lease("x", "beat-b", t0 + timedelta(seconds=30), 60)
    assert schedule.acquire_lease("x", "beat-a", t0 + timedelta(seconds=30), 60)  # renewal
    assert not schedule.acquire_lease("x", "beat-b", t0 + timedelta(seconds=80), 60)
    assert schedule.acquire_lease("x", "beat-b", t0 + timedelta(seconds=91), 60)  # beat-a died
    with session_scope() as s:
        assert s.get(Lease, "x").holder == "beat-b"
    schedule.release_lease("x", "beat-b")
    assert schedule.acquire_lease("x", "beat-a", t0 + timedelta(seconds=92), 60)


def test_failed_enqueue_gives_the_fire_back(ledger):
    _set("@hourly", min_feedback=1)
    seed_feedback("acme", stdlib_review_pairs(2))
    now = datetime(2026, 1, 1, 11, 0, 10, tzinfo=timezone.utc)

    def broken(kind, body, parent=None):
        raise ConnectionError("broker down")

    with pytest.raises(ConnectionError):
        schedule.tick(now, broken, "beat-a")
    assert len(schedule.tick(now, Recorder(), "beat-a")) == 1  # the next tick retries the same fire
