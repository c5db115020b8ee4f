"""domain.dlq and the ops CLI: dead jobs listed, retried as new linked jobs (once), dropped; `foundry
ledger check` exit codes."""

from __future__ import annotations

import json
import uuid

import pytest

from domain import dlq, jobs
from domain.config import reset_settings
from domain.ledger.db import session_scope
from domain.ledger.models import Job, JobAttempt


@pytest.fixture
def ledger(ledger, monkeypatch):
    monkeypatch.setenv("FOUNDRY_STALE_AFTER_S", "0")
    reset_settings()
    return ledger

def make_dead(key: str | None = None) -> str:
    """A job whose worker dies on every delivery, delivered until it is dead-lettered."""
    from domain.ledger import jobstore

    jid = uuid.uuid4().hex
    body = {"tenant": "acme", "sleep_s": 0, "idempotency_key": key}
    for n in range(4):
        claim = jobstore.claim(jid, "noop", "acme", body, f"w{n}:1", max_attempts=3, stale_after_s=0,
                               idempotency_key=key)
        if not claim.run:
            break
    with session_scope() as s:
        assert s.get(Job, jid).status == "dead"
    return jid


def fake_enqueue(calls):
    def enqueue(kind, body, *, job_id, parent_job_id, created_by):
        calls.append((kind, body, job_id, parent_job_id, created_by))
        return jobs.execute(kind, job_id, body, "w9:1") and job_id
    return enqueue


def test_retry_makes_one_new_linked_job(ledger):
    dead = make_dead(key="order-1")
    assert [d.id for d in dlq.list_dead()] == [dead]
    calls = []
    new = dlq.retry(dead, fake_enqueue(calls), by="ops")
    kind, body, job_id, parent, by = calls[0]
    assert (kind, job_id, parent, by) == ("noop", new, dead, "dlq:ops")
    assert body["idempotency_key"].startswith("order-1:retry:")
    assert dlq.list_dead() == [] and dlq.list_dead(include_handled=True)[0].handled["retry_job_id"] == new
    with pytest.raises(ValueError, match="already retried"):
        dlq.retry(dead, fake_enqueue(calls), by="ops")
    assert len(calls) == 1
    with session_scope() as s:
        assert s.get(Job, new).status == "succeeded"


def test_failed_enqueue_leaves_the_job_retryable(ledger):
    dead = make_dead()

    def broken(*a, **k):
        raise RuntimeError("broker unreachable")

    with pytest.raises(RuntimeError):
        dlq.retry(dead, broken, by="ops")
    assert [d.id for d in dlq.list_dead()] == [dead]


def test_drop_acknowledges_and_only_dead_jobs_qualify(ledger):
    dead = make_dead()
    dlq.drop(dead, by="ops", reason="bad input upstream")
    assert dlq.list_dead() == []
    with session_scope() as s:
        j = s.get(Job, dead)
        assert j.status == "dead" and j.progress_info["dlq"]["reason"] == "bad input upstream"
    ok = uuid.uuid4().hex
    jobs.execute("noop", ok, {"tenant": "acme"}, "w:1")
    with pytest.raises(ValueError, match="not dead"):
        dlq.drop(ok, by="ops")
    with pytest.raises(LookupError):
        dlq.drop("nope", by="ops")


def test_cli_dlq_and_ledger_check(ledger, capsys):
    from worker.cli import main

    dead = make_dead()
    assert main(["dlq", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["id"] == dead
    assert main(["dlq", "drop", dead]) == 0
    assert main(["dlq", "drop", dead]) == 1  # already dropped
    capsys.readouterr()
    assert main(["ledger", "check", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    with session_scope() as s:
        s.add(JobAttempt(job_id=dead, attempt=9, worker="x", outcome="succeeded"))
    assert main(["ledger", "check"]) == 1
    assert "INCONSISTENT" in capsys.readouterr().out
