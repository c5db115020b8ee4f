"""Review jobs through the real Redis and PostgreSQL with a real worker (threads pool): reviews from
each tenant's champion adapter batched together, costs counted once even when a message is redelivered,
budgets, feedback, `foundry review FILE` and the audit of one review."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import func, select

from domain.ledger.db import session_scope
from domain.ledger.models import Feedback, Review, UsageCost
from tests.conftest import add_tenant
from tests.fixtures.review import make_adapter, register_adapter, save_lively_tiny_model
from tests.integration.workers import apply_env, running_worker, worker_env

pytestmark = pytest.mark.integration

CODE = "def add(a, b):\n    return a - b\n\n\ndef div(a, b):\n    return a / b\n"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_lively_tiny_model(tmp_path_factory.mktemp("review-int") / "base")


@pytest.fixture
def env(redis_url, pg_ledger, tmp_path, monkeypatch, base_dir):
    e = worker_env(redis_url, pg_ledger, tmp_path, FOUNDRY_BASE_MODEL=str(base_dir), FOUNDRY_DEVICE="cpu",
                   FOUNDRY_REVIEW_BATCH_SIZE="4", FOUNDRY_REVIEW_BATCH_WAIT_MS="300")
    apply_env(monkeypatch, e)

    champions = {}
    for i, tenant in enumerate(("acme", "globex", "initech"), start=1):
        add_tenant(pg_ledger, tenant)
        if tenant != "initech":  # initech has no champion: served by the base model
            rel = f"adapters/{tenant}/reviewer-v1"
            make_adapter(base_dir, tmp_path / rel, seed=i)
            champions[tenant] = register_adapter(tenant, tmp_path, rel, str(base_dir), url=pg_ledger)
    add_tenant(pg_ledger, "thrifty", daily_token_budget=50)
    return e, champions


def usage_rows(job_id: str) -> int:
    with session_scope() as s:
        return s.scalar(select(func.count()).select_from(UsageCost).where(UsageCost.job_id == job_id))


def test_reviews_batched_across_tenants_costs_once_budget_and_feedback(env):
    from worker.client import celery_app, enqueue_review, feedback, wait

    e, champions = env
    with running_worker(e, queues=["review"], pool="threads", concurrency=4) as w:
        tenants = ["acme", "globex", "initech", "acme"]
        ids = [enqueue_review(CODE, tenant=t, path="calc.py", max_new_tokens=12) for t in tenants]
        results = [wait(jid, timeout=60) for jid in ids]
        assert [r["status"] for r in results] == ["succeeded"] * 4, [r["error"] for r in results]
        assert max(r["result"]["batch_size"] for r in results) > 1, "the threads pool must feed one batch"
        assert [r["result"]["adapter_version_id"] for r in results] == [
            champions["acme"], champions["globex"], None, champions["acme"]]
        assert results[0]["result"]["raw_text"] == results[3]["result"]["raw_text"]  # same adapter, same code

        # the broker delivers the first job's message again: skipped, nothing counted twice
        celery_app().send_task("foundry.review", args=[{"tenant": "acme", "code": CODE, "path": "calc.py",
                                                        "max_new_tokens": 12}], task_id=ids[0], queue="review")
        over = enqueue_review(CODE, tenant="thrifty", max_new_tokens=12)
        rejected = wait(over, timeout=60)
        time.sleep(1.0)
        assert w.alive()

    assert rejected["status"] == "rejected" and rejected["error_code"] == "over_budget"
    assert "daily token budget" in rejected["error"] and usage_rows(over) == 0
    for jid, r in zip(ids, results):
        assert usage_rows(jid) == 1
        with session_scope() as s:
            review = s.scalar(select(Review).where(Review.job_id == jid))
            usage = s.scalar(select(UsageCost).where(UsageCost.job_id == jid))
            assert review.id == r["result"]["review_id"] and review.adapter_version_id == usage.adapter_version_id
            assert usage.completion_tokens == 12 and usage.prompt_tokens == r["result"]["prompt_tokens"]

    rid = results[0]["result"]["review_id"]
    feedback(rid, "accept", tenant="acme")
    with pytest.raises(LookupError):
        feedback(rid, "reject", tenant="globex")
    with session_scope() as s:
        fb = s.scalars(select(Feedback)).all()
        assert [(f.review_id, f.tenant_id, f.adapter_version_id) for f in fb] == [(rid, "acme", champions["acme"])]


def test_review_command_and_audit(env, tmp_path, capsys):
    from worker.cli import main

    e, champions = env
    src = tmp_path / "calc.py"
    src.write_text(CODE)
    with running_worker(e, queues=["review"], pool="threads", concurrency=2):
        assert main(["review", str(src), "--tenant", "globex", "--max-new-tokens", "8", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["status"] == "succeeded" and status["result"]["adapter_version_id"] == champions["globex"]
    rid = status["result"]["review_id"]
    assert main(["audit", "review", rid, "--json"]) == 0
    audit = json.loads(capsys.readouterr().out)
    assert audit["audit"]["adapter_version_id"] == champions["globex"] and audit["audit"]["completion_tokens"] == 8
    assert [v["id"] for v in audit["adapter_lineage"]] == [champions["globex"]]
    assert main(["audit", "costs", "--by", "adapter", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["tenant_id"], r["adapter_version_id"], r["jobs"]) for r in rows] == [("globex", champions["globex"], 1)]
