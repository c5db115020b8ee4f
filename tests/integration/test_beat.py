"""Two real `celery beat` processes and two workers: a due retrain schedule is enqueued exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from domain.ledger.db import session_scope
from domain.ledger.models import Feedback, Job, RetrainSchedule, Review, utcnow
from tests.conftest import add_tenant
from tests.integration.workers import ROOT, apply_env, running_worker, worker_env

pytestmark = pytest.mark.integration


def _feedback(tenant: str, n: int) -> None:
    with session_scope() as s:
        for i in range(n):
            jid = f"rev-{tenant}-{i}"
            s.add(Job(id=jid, kind="review", tenant_id=tenant, status="succeeded", payload={}))
            s.flush()
            s.add(Review(id=f"r{i}", job_id=jid, tenant_id=tenant, model_id="m", code=f"def f{i}():\n    return {i}\n",
                         code_sha256=str(i), raw_text=f"f{i} returns the constant {i}; name it better."))
            s.flush()
            s.add(Feedback(review_id=f"r{i}", tenant_id=tenant, verdict="accept"))


def _beat(env: dict, tmp, name: str) -> subprocess.Popen:
    log = open(tmp / f"{name}.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker.celery_app", "beat", "-l", "INFO",
                             "-s", str(tmp / f"{name}-schedule")], cwd=ROOT, env={**os.environ, **env},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def test_two_beats_enqueue_a_due_retrain_once(redis_url, pg_ledger, tmp_path, monkeypatch):
    from domain.adapters.schedule import set_schedule

    env = worker_env(redis_url, pg_ledger, tmp_path, FOUNDRY_BEAT_TICK_S="1")
    apply_env(monkeypatch, env)
    add_tenant(pg_ledger, "acme")
    add_tenant(pg_ledger, "quiet")
    _feedback("acme", 3)
    set_schedule("acme", "@hourly", min_new_feedback=2)
    set_schedule("quiet", "@hourly", min_new_feedback=2)  # no feedback: must not enqueue
    with session_scope() as s:  # make both schedules due now (their last fire an hour and a half ago)
        s.execute(update(RetrainSchedule).values(last_run_at=utcnow() - timedelta(minutes=90)))
    beats = [_beat(env, tmp_path, "beat-a"), _beat(env, tmp_path, "beat-b")]
    try:
        with running_worker(env, queues=["control"], name="ctl-a@%h"), \
                running_worker(env, queues=["control"], name="ctl-b@%h"):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with session_scope() as s:
                    done = s.scalars(select(RetrainSchedule).where(RetrainSchedule.tenant_id == "acme")).one().last_job_id
                if done:
                    break
                time.sleep(0.5)
            time.sleep(4)  # several more ticks from both beats
    finally:
        for b in beats:
            b.terminate()
            b.wait(timeout=20)
    with session_scope() as s:
        retrains = list(s.scalars(select(Job).where(Job.kind == "retrain")))
    assert [j.tenant_id for j in retrains] == ["acme"], [(j.tenant_id, j.idempotency_key) for j in retrains]
    assert retrains[0].created_by == "beat"
