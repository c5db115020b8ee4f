"""Quantize and distill jobs through the real Redis and PostgreSQL with real worker processes."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from domain.ledger.db import session_scope
from domain.ledger.models import Artifact, Checkpoint, Job, JobAttempt, UsageCost
from tests.fixtures.tiny_models import save_tiny_model
from tests.integration.workers import running_worker, start_worker

pytestmark = pytest.mark.integration


def test_quantize_job_through_a_worker_records_a_servable_artifact(env, tiny_model_dir):
    from domain.artifacts import load_serving_model
    from worker.client import enqueue_quantize, wait

    with running_worker(env, queues=["quantize"]):
        job_id = enqueue_quantize(tenant="acme", method="nf4", source_model=str(tiny_model_dir), eval_max_tokens=512)
        status = wait(job_id, timeout=180)
    assert status["status"] == "succeeded", status
    with session_scope() as s:
        art = s.scalar(select(Artifact).where(Artifact.created_by_job_id == job_id))
        usage = s.scalar(select(UsageCost).where(UsageCost.job_id == job_id))
    assert art.id == status["result"]["artifact_id"] and art.kind == "quantized_model"
    assert art.report["compression_ratio"] > 1 and 0 < art.report["top1_agreement"] <= 1
    assert usage.prompt_tokens == 1024 and usage.wall_seconds > 0
    served = load_serving_model(art, device="cpu")
    assert any(type(m).__name__ == "Linear4bit" for m in served.model.modules())


def test_distill_job_survives_its_worker_being_killed(env, tmp_path):
    from worker.client import enqueue_distill, wait

    env = {**env, "OMP_NUM_THREADS": "1"}  # a tiny model trains fastest on one thread, above all on a busy machine
    teacher = save_tiny_model(tmp_path / "teacher", layers=4, hidden=64, seed=3)
    body = {"teacher": str(teacher), "max_steps": 200, "checkpoint_every": 10, "batch_size": 2, "seq_len": 32,
            "eval_max_tokens": 128, "learning_rate": 3e-3}
    first = start_worker(env, queues=["distill"])
    try:
        job_id = enqueue_distill(tenant="acme", **body)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with session_scope() as s:
                if s.scalar(select(Checkpoint.id).where(Checkpoint.job_id == job_id).limit(1)):
                    break
            time.sleep(0.05)
        else:
            raise AssertionError(f"no checkpoint recorded:\n{first.output()[-3000:]}")
        first.kill()  # SIGKILL mid-training: no ack, no cleanup
    finally:
        first.kill()
    with running_worker(env, queues=["distill"]):
        status = wait(job_id, timeout=300)
    assert status["status"] == "succeeded", status
    report = status["result"]["report"]
    assert report["resumed_from_step"] >= 10 and report["steps"] == 200
    assert report["trained_tokens"] == 200 * 2 * 32  # tokens of the lost attempt's checkpointed steps included once
    with session_scope() as s:
        outcomes = [a.outcome for a in s.scalars(select(JobAttempt).where(JobAttempt.job_id == job_id)
                                                 .order_by(JobAttempt.attempt))]
        art = s.scalar(select(Artifact).where(Artifact.created_by_job_id == job_id))
        job = s.get(Job, job_id)
    assert outcomes[0] == "lost" and outcomes[-1] == "succeeded" and job.attempts == len(outcomes)
    assert art.kind == "distilled_model" and art.report["student_layers"] == 2
