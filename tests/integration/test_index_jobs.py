"""Index jobs through real Redis, PostgreSQL and real worker processes: the client enqueues, a worker builds
snapshots, this process reads them (picking up each new version without restarting); a worker SIGKILLed
mid-build leaves the previous version serving and the redelivered job finishes on a new worker."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from domain.config import reset_settings
from domain.ledger.db import session_scope
from domain.ledger.models import Artifact, Job, JobAttempt
from domain.retrieval import reader
from domain.retrieval.service import retrieve_context
from domain.retrieval.snapshots import read_current
from tests.conftest import add_tenant
from tests.integration.workers import (
    apply_env,
    running_worker,
    start_worker,
    worker_env,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def env(redis_url, pg_ledger, tmp_path, monkeypatch):
    e = worker_env(redis_url, pg_ledger, tmp_path, FOUNDRY_EMBEDDING_MODEL="hashing:256",
                   FOUNDRY_INDEX_LEASE_TTL_S="3", FOUNDRY_EMBEDDING_BATCH_SIZE="100")
    apply_env(monkeypatch, e)
    reset_settings()
    reader.forget()

    add_tenant(pg_ledger, "acme")
    add_tenant(pg_ledger, "globex")
    yield e
    reader.forget()
    reset_settings()


def docs(prefix: str, n: int, size: int = 1) -> list[dict]:
    return [{"id": f"{prefix}{i}", "language": "python", "path": f"{prefix}/{i}.py",
             "text": "".join(f"def {prefix}_step_{i}_{j}(data):\n    return data.get('{prefix}{i}_{j}')\n\n\n"
                             for j in range(size))} for i in range(n)]


def job_row(job_id):
    with session_scope() as s:
        j = s.get(Job, job_id)
        attempts = [a.outcome for a in s.scalars(select(JobAttempt).where(JobAttempt.job_id == job_id).order_by(JobAttempt.attempt))]
        return j, attempts


def test_index_jobs_through_a_real_worker(env):
    from worker.client import enqueue, wait

    with running_worker(env, queues=["index"]):
        first = enqueue("index", {"tenant": "acme", "documents": docs("alpha", 3)})
        other = enqueue("index", {"tenant": "globex", "documents": docs("beta", 2)})
        assert wait(first, timeout=60)["status"] == "succeeded"
        assert wait(other, timeout=60)["status"] == "succeeded"
        ctx = retrieve_context("acme", "alpha_step_1_0", k=2, floor=-1)
        assert ctx.index_version == 1 and ctx.chunks[0].document_id == "alpha1"
        assert all(c.document_id.startswith("alpha") for c in retrieve_context("acme", "beta step", k=5, floor=-1).chunks)

        upd = enqueue("index", {"tenant": "acme", "documents": [{**docs("alpha", 1)[0], "text": "def gamma_ray(): return 7\n"}]})
        assert wait(upd, timeout=60)["status"] == "succeeded"
        ctx = retrieve_context("acme", "gamma_ray", k=1, floor=-1)  # the same reader, no restart: version 2
        assert ctx.index_version == 2 and ctx.chunks[0].document_id == "alpha0" and "gamma_ray" in ctx.chunks[0].text
        rm = enqueue("index", {"tenant": "acme", "action": "remove", "document_ids": ["alpha2"]})
        assert wait(rm, timeout=60)["result"]["documents"] == 2
        bad = enqueue("index", {"tenant": "nobody", "documents": docs("x", 1)})
        assert wait(bad, timeout=60)["status"] == "rejected"
    with session_scope() as s:
        arts = sorted((a.tenant_id, a.version, a.status) for a in s.scalars(select(Artifact).where(Artifact.kind == "index_snapshot")))
    assert arts == [("acme", 1, "superseded"), ("acme", 2, "superseded"), ("acme", 3, "active"), ("globex", 1, "active")]


def test_worker_killed_mid_build_keeps_previous_version_and_job_finishes(env):
    from worker.client import enqueue, wait

    with running_worker(env, queues=["index"]):
        assert wait(enqueue("index", {"tenant": "acme", "documents": docs("old", 5)}), timeout=60)["status"] == "succeeded"
    assert retrieve_context("acme", "old_step_3_0", k=1, floor=-1).index_version == 1

    w = start_worker(env, queues=["index"])
    big = enqueue("index", {"tenant": "acme", "documents": docs("new", 600, size=20)})  # 12000 chunks to embed
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill it while it is embedding (progress is in the ledger)
        j, _ = job_row(big)
        if j.status == "running" and "embed" in str((j.progress_info or {}).get("step", "")):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the index job never reported embedding progress: {job_row(big)}")
    w.kill()
    assert job_row(big)[0].status == "running"
    assert read_current("acme") == 1
    ctx = retrieve_context("acme", "new_step_3_0", k=3, floor=-1)
    assert ctx.index_version == 1 and all(c.document_id.startswith("old") for c in ctx.chunks)

    with running_worker(env, queues=["index"]):  # the message is redelivered; the dead writer's lease expires
        assert wait(big, timeout=240)["status"] == "succeeded"
    j, attempts = job_row(big)
    assert attempts == ["lost", "succeeded"] and j.result["index_version"] == 2
    ctx = retrieve_context("acme", "new_step_3_0", k=1, floor=-1)
    assert ctx.index_version == 2 and ctx.chunks[0].document_id == "new3"
