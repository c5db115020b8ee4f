"""Stranded jobs: a queued job whose Redis message is gone (a worker killed between kombu's BRPOP and its
unacked record) is found by comparing the ledger with the broker, and sent again under its own id."""

from __future__ import annotations

import json

import redis
from sqlalchemy import func, select

from domain.ledger.db import session_scope
from domain.ledger.models import HealthEvent, Job, UsageCost
from tests.integration.test_faults_kit import wait_final
from tests.integration.workers import running_worker
from worker import maintenance
from worker.client import enqueue


def test_a_lost_message_is_found_and_sent_again_once(env, capsys):
    r = redis.Redis.from_url(env["FOUNDRY_BROKER_URL"])
    lost = enqueue("noop", {"tenant": "acme", "cost_tokens": 3})
    kept = enqueue("noop", {"tenant": "acme"})
    held = enqueue("noop", {"tenant": "acme"})
    assert {lost, kept, held} <= maintenance.broker_task_ids()

    # take two messages off the queue as a worker's BRPOP does; record one of them unacknowledged, as kombu's
    # next step would have, and "crash" before doing so for the other
    messages = {}
    for key in [k for k in r.keys("control*") if r.type(k) == b"list"]:
        for raw in r.lrange(key, 0, -1):
            messages[json.loads(raw)["headers"]["id"]] = (key, raw)
    for job_id in (lost, held):
        key, raw = messages[job_id]
        assert r.lrem(key, 1, raw) == 1
    r.hset("unacked", "tag-held", json.dumps([json.loads(messages[held][1]), "foundry", "control"]))
    assert lost not in maintenance.broker_task_ids() and held in maintenance.broker_task_ids()

    assert maintenance.resend_stranded(older_than_s=3600)["resent"] == []  # too recent to judge
    report = maintenance.resend_stranded(older_than_s=0, recheck_s=0.1, dry_run=True)
    assert report["resent"] == [lost] and lost not in maintenance.broker_task_ids()  # a dry run sends nothing
    assert maintenance.resend_stranded(older_than_s=0, recheck_s=0.1)["resent"] == [lost]
    assert lost in maintenance.broker_task_ids()
    assert maintenance.resend_stranded(older_than_s=0, recheck_s=0.1)["resent"] == []  # it has a message again

    r.hdel("unacked", "tag-held")  # (the unacked copy would be restored after the visibility timeout)
    r.lpush(messages[held][0], messages[held][1])
    with running_worker(env, ["control"]):
        wait_final([lost, kept, held], timeout=60)
    with session_scope() as s:
        assert {s.get(Job, j).status for j in (lost, kept, held)} == {"succeeded"}
        assert s.get(Job, lost).attempts == 1
        assert s.scalar(select(func.count()).select_from(UsageCost).where(UsageCost.job_id == lost)) == 1
        event = s.scalar(select(HealthEvent).where(HealthEvent.event == "stranded_requeued"))
        assert event is not None and event.detail["job_ids"] == [lost]

    from worker.cli import main

    capsys.readouterr()
    assert main(["ledger", "resend-stranded", "--older-than", "0", "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"supported": True, "resent": [], "dry_run": True, "handed_back": []}


def test_a_message_held_too_long_by_a_vanished_worker_counts_as_lost(env):
    """A worker whose broker connection broke could not hand its reserved message back: it sits in kombu's
    unacked hash until the visibility timeout (hours in production). A queued job whose message was
    delivered long ago (no ETA) is sent again; a recent delivery or one with an ETA is left alone."""
    import time

    r = redis.Redis.from_url(env["FOUNDRY_BROKER_URL"])
    orphan, recent, later = (enqueue("noop", {"tenant": "acme"}) for _ in range(3))
    for key in [k for k in r.keys("control*") if r.type(k) == b"list"]:
        for raw in r.lrange(key, 0, -1):
            msg = json.loads(raw)
            job_id = msg["headers"]["id"]
            r.lrem(key, 1, raw)
            if job_id == later:
                msg["headers"]["eta"] = "2099-01-01T00:00:00+00:00"
            r.hset("unacked", f"tag-{job_id}", json.dumps([msg, "foundry", "control"]))
            r.zadd("unacked_index", {f"tag-{job_id}": time.time() - (5 if job_id == recent else 3600)})
    with session_scope() as s:  # the jobs must also look quiet to the ledger: age them
        for j in (orphan, recent, later):
            s.get(Job, j).enqueued_at = s.get(Job, j).enqueued_at.replace(year=2000)
    found = maintenance.resend_stranded(older_than_s=60, recheck_s=0.1, dry_run=True)["resent"]
    assert found == [orphan]
    r.delete("unacked", "unacked_index")


def test_a_second_copy_of_a_message_runs_the_job_once(env):
    """Re-sending is safe even when the original was not lost after all: the ledger's claim runs it once."""
    from worker.client import celery_app

    job_id = enqueue("noop", {"tenant": "acme", "cost_tokens": 2})
    with session_scope() as s:
        job = s.get(Job, job_id)
        payload, queue = dict(job.payload), job.queue
    celery_app().send_task("foundry.noop", args=[payload], task_id=job_id, queue=queue, routing_key=queue)
    with running_worker(env, ["control"]):
        wait_final([job_id], timeout=60)
    with session_scope() as s:
        assert s.get(Job, job_id).attempts == 1
        assert s.scalar(select(func.count()).select_from(UsageCost).where(UsageCost.job_id == job_id)) == 1
