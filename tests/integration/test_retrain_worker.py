"""Retraining through the real Redis and PostgreSQL with real worker processes: a scheduled retrain makes a
version, a worker killed mid-training is replaced and the job resumes from its checkpoint, two beats
ticking at once enqueue one job."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from domain.adapters import schedule
from domain.ledger.db import session_scope
from domain.ledger.models import (
    AdapterAlias,
    AdapterVersion,
    Checkpoint,
    Job,
    JobAttempt,
    RetrainSchedule,
    UsageCost,
    utcnow,
)
from tests.conftest import add_tenant
from tests.fixtures.adapters import seed_feedback, stdlib_review_pairs
from tests.fixtures.tiny_models import save_tiny_model
from tests.integration.test_faults_kit import lost_sweep, wait_final
from tests.integration.workers import (
    ROOT,
    apply_env,
    running_worker,
    start_worker,
    worker_env,
)

pytestmark = pytest.mark.integration

TRAIN = {"max_seq_len": 384, "batch_size": 2, "lora_r": 4, "target_modules": ["q_proj", "v_proj"],
         "learning_rate": 5e-3, "promotion_margin": 0.0}


@pytest.fixture
def env(redis_url, pg_ledger, tmp_path, monkeypatch):
    base = save_tiny_model(tmp_path / "tiny-base")
    # the production visibility timeout: a killed worker's job comes back through beat's hand-back sweep
    e = worker_env(redis_url, pg_ledger, tmp_path, FOUNDRY_BASE_MODEL=base, FOUNDRY_DEVICE="cpu", OMP_NUM_THREADS=1,
                   FOUNDRY_VISIBILITY_TIMEOUT_S="0")
    apply_env(monkeypatch, e)

    add_tenant(pg_ledger, "acme")
    seed_feedback("acme", stdlib_review_pairs(10, max_code_lines=8))
    return e


def _tick(holder: str) -> list[str]:
    from worker.client import enqueue

    return schedule.tick(utcnow(), lambda kind, body, parent=None: enqueue(kind, body, parent_job_id=parent,
                                                                           created_by="beat"), holder)


def test_scheduled_retrain_runs_on_a_worker_and_promotes(env):
    from worker.client import wait

    schedule.set_schedule("acme", "* * * * *", min_new_feedback=5, params={**TRAIN, "max_steps": 15})
    _set_two_minutes_ago()
    [job_id] = _tick("beat-test")
    with running_worker(env, queues=["retrain"]):
        done = wait(job_id, timeout=240)
    assert done["status"] == "succeeded", done
    result = done["result"]
    with session_scope() as s:
        v = s.get(AdapterVersion, result["version_id"])
        assert v.created_by_job_id == job_id and v.dataset_size == 10 and v.version == 1
        assert s.get(Job, job_id).created_by == "beat"
        champion = s.get(AdapterAlias, ("acme", "champion"))
        assert (champion is not None and champion.version_id == v.id) == result["promoted"]
        assert s.scalar(select(func.count()).select_from(UsageCost).where(UsageCost.job_id == job_id)) == 1
    assert _tick("beat-test") == []  # nothing new: no second retrain


def test_killed_worker_job_resumes_from_checkpoint_on_another(env):
    from worker.client import enqueue, wait

    job_id = enqueue("retrain", {"tenant": "acme", **TRAIN, "max_steps": 150, "checkpoint_every": 10})
    first = start_worker(env, queues=["retrain"], name="first@%h")
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            with session_scope() as s:
                if s.scalar(select(func.count()).select_from(Checkpoint).where(Checkpoint.job_id == job_id)):
                    break
            time.sleep(0.2)
        else:
            raise AssertionError(f"no checkpoint recorded:\n{first.output()[-3000:]}")
    finally:
        first.kill()  # SIGKILL mid-training: no ack, no ledger update
    with session_scope() as s:
        assert s.get(Job, job_id).status == "running"
        last_step = s.scalar(select(func.max(Checkpoint.step)).where(Checkpoint.job_id == job_id))
    handed_back: list[str] = []
    with running_worker(env, queues=["retrain"], name="second@%h") as second:
        try:
            wait_final([job_id], timeout=240, sweep=lost_sweep(handed_back, []), sweep_every_s=3)
            done = wait(job_id, timeout=5)
        except AssertionError:
            with session_scope() as s:
                j = s.get(Job, job_id)
                raise AssertionError(f"{j.status} {j.progress_info} {j.error}\n{second.output()[-4000:]}") from None
    assert done["status"] == "succeeded", done
    r = done["result"]
    assert r["steps"] == 150 and r["resumed_from_step"] >= last_step > 0
    assert handed_back == [job_id]  # back through the sweep: kombu would hold the message for hours
    with session_scope() as s:
        attempts = [a.outcome for a in s.scalars(select(JobAttempt).where(JobAttempt.job_id == job_id)
                                                 .order_by(JobAttempt.attempt))]
        assert attempts == ["lost", "succeeded"]
        assert s.scalar(select(func.count()).select_from(AdapterVersion).where(AdapterVersion.tenant_id == "acme")) == 1


def test_two_beat_processes_enqueue_one_retrain(env, pg_ledger):
    """Two separate processes tick the same due schedule at the same moment against PostgreSQL."""
    schedule.set_schedule("acme", "* * * * *", min_new_feedback=1, params={**TRAIN, "max_steps": 2})
    _set_two_minutes_ago()
    code = ("import sys, time; from tests.integration.test_retrain_worker import _tick; "
            "time.sleep(max(0, float(sys.argv[1]) - time.time())); print(len(_tick(sys.argv[2])))")
    start = time.time() + 4
    procs = [subprocess.Popen([sys.executable, "-c", code, str(start), f"beat-{i}"], cwd=ROOT, env={**os.environ, **env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    counts = [int(o[0].strip().splitlines()[-1]) for o in outs]
    assert sorted(counts) == [0, 1], outs
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Job).where(Job.kind == "retrain")) == 1


def _set_two_minutes_ago() -> None:
    """Make the schedule look set two minutes ago, so this minute's fire of "* * * * *" is due."""
    with session_scope() as s:
        s.execute(update(RetrainSchedule).values(updated_at=utcnow() - timedelta(minutes=2)))
