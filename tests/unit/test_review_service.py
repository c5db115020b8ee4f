"""Review jobs end to end through domain.jobs.execute on a SQLite ledger and a tiny model: the review row,
the usage counted once under redelivery, adapters (champion, requested, unknown), bad input, truncation,
retrieved context, budgets, and concurrent jobs sharing one mixed-adapter batch."""

from __future__ import annotations

import sys
import threading
import types
import uuid
from decimal import Decimal

import pytest
from sqlalchemy import func, select

from domain import jobs
from domain.config import get_settings, reset_settings
from domain.ledger import jobstore
from domain.ledger.db import session_scope
from domain.ledger.models import Job, Review, UsageCost
from domain.review import runtime
from tests.fixtures.review import make_adapter, register_adapter, save_lively_tiny_model
from tests.conftest import add_tenant

CODE = "def add(a, b):\n    return a - b\n\n\ndef div(a, b):\n    return a / b\n"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_lively_tiny_model(tmp_path_factory.mktemp("review-service") / "base")


@pytest.fixture
def ledger(ledger, base_dir, monkeypatch):
    monkeypatch.setenv("FOUNDRY_BASE_MODEL", str(base_dir))
    monkeypatch.setenv("FOUNDRY_DEVICE", "cpu")
    reset_settings()
    yield ledger

def champion(url, data_dir, base_dir, tenant="acme", seed=1, alias="champion", version=1) -> str:
    rel = f"adapters/{tenant}/v{version}-{seed}"
    make_adapter(base_dir, data_dir / rel, seed=seed)
    return register_adapter(tenant, data_dir, rel, str(base_dir), version=version, alias=alias, url=url)


def run(body: dict, job_id: str | None = None) -> dict:
    return jobs.execute("review", job_id or uuid.uuid4().hex, body, "test-worker:1")


def count(model, **where) -> int:
    with session_scope() as s:
        q = select(func.count()).select_from(model)
        for k, v in where.items():
            q = q.where(getattr(model, k) == v)
        return s.scalar(q)


def test_review_uses_the_champion_and_counts_usage_once_under_redelivery(ledger, base_dir, tmp_path):
    add_tenant(ledger, "acme")
    vid = champion(ledger, tmp_path, base_dir)
    job_id = uuid.uuid4().hex
    body = {"tenant": "acme", "code": CODE, "path": "calc.py", "max_new_tokens": 16}

    out = run(body, job_id)
    assert out["status"] == "succeeded", out
    res = out["result"]
    assert res["adapter_version_id"] == vid and res["completion_tokens"] == 16 and res["prompt_tokens"] > 50
    with session_scope() as s:
        review = s.scalar(select(Review).where(Review.job_id == job_id))
        usage = s.scalar(select(UsageCost).where(UsageCost.job_id == job_id))
        assert review.id == res["review_id"] and review.adapter_version_id == vid
        assert review.model_id == str(base_dir) and review.language == "python" and review.code == CODE
        assert review.raw_text == res["raw_text"] and isinstance(review.findings, list)
        assert review.prompt_truncated is False and review.context_chunks == []
        assert (usage.prompt_tokens, usage.completion_tokens) == (res["prompt_tokens"], 16)
        assert usage.adapter_version_id == vid and usage.kind == "review" and usage.wall_seconds > 0
        prices = get_settings().prices()["default"]
        expected = (Decimal(str(prices["prompt_per_1k"])) * usage.prompt_tokens / 1000
                    + Decimal(str(prices["completion_per_1k"])) * 16 / 1000
                    + Decimal(str(prices["cpu_second"])) * Decimal(str(usage.wall_seconds)))
        assert abs(usage.cost - expected) <= Decimal("0.000001")

    again = run(body, job_id)  # the broker redelivers the same message
    assert again["status"] == "succeeded" and again["skipped"] == "already succeeded"
    assert count(UsageCost, job_id=job_id) == 1 and count(Review, job_id=job_id) == 1


def test_attempt_lost_mid_review_is_rerun_and_counted_once(ledger, base_dir, monkeypatch):
    add_tenant(ledger, "acme")
    monkeypatch.setenv("FOUNDRY_STALE_AFTER_S", "0")  # the first attempt's worker is presumed dead at once
    reset_settings()
    job_id = uuid.uuid4().hex
    body = {"tenant": "acme", "code": CODE, "max_new_tokens": 8}
    lost = jobstore.claim(job_id, "review", "acme", body, "dead-worker:7", max_attempts=3, stale_after_s=0)
    assert lost.run and lost.attempt == 1  # ... and that worker died before finishing

    out = run(body, job_id)
    assert out["status"] == "succeeded"
    assert run(body, job_id)["status"] == "succeeded"
    with session_scope() as s:
        assert s.get(Job, job_id).attempts == 2
    assert count(UsageCost, job_id=job_id) == 1 and count(Review, job_id=job_id) == 1


def test_base_model_serves_a_tenant_without_champion_and_adapters_by_ref(ledger, base_dir, tmp_path):
    add_tenant(ledger, "solo")
    out = run({"tenant": "solo", "code": CODE, "max_new_tokens": 6})
    assert out["status"] == "succeeded" and out["result"]["adapter_version_id"] is None

    add_tenant(ledger, "acme")
    v1 = champion(ledger, tmp_path, base_dir, seed=1, version=1)
    v2 = champion(ledger, tmp_path, base_dir, seed=2, version=2, alias="candidate")
    assert run({"tenant": "acme", "code": CODE, "adapter": "candidate", "max_new_tokens": 6})["result"]["adapter_version_id"] == v2
    assert run({"tenant": "acme", "code": CODE, "adapter": v1, "max_new_tokens": 6})["result"]["adapter_version_id"] == v1

    unknown = run({"tenant": "acme", "code": CODE, "adapter": "nope"})
    assert unknown["status"] == "rejected" and unknown["field"] == "adapter"
    other_tenant = run({"tenant": "solo", "code": CODE, "adapter": v1})  # acme's version id, asked by solo
    assert other_tenant["status"] == "rejected" and other_tenant["field"] == "adapter"


def test_corrupt_adapter_or_other_base_model_fails_the_job_clearly(ledger, base_dir, tmp_path):
    from domain.ledger.models import AdapterVersion, HealthEvent

    add_tenant(ledger, "acme")
    vid = champion(ledger, tmp_path, base_dir)
    weights = tmp_path / "adapters/acme/v1-1/adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")
    out = run({"tenant": "acme", "code": CODE, "max_new_tokens": 4})
    assert out["status"] == "failed" and out["code"] == "adapter_hash_mismatch"
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(HealthEvent).where(HealthEvent.component == "adapter")) >= 1
        s.get(AdapterVersion, vid).base_model_hash = "f" * 64  # as if trained on another base model
    out = run({"tenant": "acme", "code": CODE, "max_new_tokens": 4})
    assert out["status"] == "failed" and out["code"] == "base_model_mismatch"


def test_tenant_served_by_a_model_artifact_with_its_adapter_on_top(ledger, base_dir, tmp_path):
    import shutil

    from domain.ledger.models import Artifact, Tenant

    add_tenant(ledger, "acme")
    vid = champion(ledger, tmp_path, base_dir)
    shutil.copytree(base_dir, tmp_path / "artifacts/served")  # stands for a quantized copy of the base model
    with session_scope() as s:
        art = Artifact(kind="quantized_model", tenant_id="acme", name="base-int8", path="artifacts/served",
                       lineage={"source_model": str(base_dir)}, status="ready")
        s.add(art)
        s.flush()
        s.get(Tenant, "acme").serving_artifact_id = art.id
        art_id = art.id
    out = run({"tenant": "acme", "code": CODE, "max_new_tokens": 6})
    assert out["status"] == "succeeded", out
    assert out["result"]["adapter_version_id"] == vid and out["result"]["model_id"] == f"base-int8:{art_id}"
    with session_scope() as s:
        assert s.get(Review, out["result"]["review_id"]).serving_artifact_id == art_id
    assert runtime.BASE_LOADS[f"artifact:{art_id}@cpu"] == 1


@pytest.mark.parametrize("body, field, code", [
    ({"code": "   \n"}, "code", "invalid"),
    ({"code": "abc\x00def"}, "code", "invalid"),
    ({"code": "\x01\x02\x03\x04 binary \x05\x06\x07\x08\x0e\x0f"}, "code", "invalid"),
    ({"code": "x = 1\n" * 40}, "code", "too_large"),  # 240 bytes > FOUNDRY_MAX_REVIEW_BYTES=200
    ({"code": CODE, "tenant": "ghost"}, "tenant", "unknown_tenant"),
    ({"code": CODE, "max_new_tokens": 600}, "max_new_tokens", "invalid"),  # more than the 512-token window
])
def test_bad_input_is_rejected_with_the_field_named(ledger, monkeypatch, body, field, code):
    add_tenant(ledger, "acme")
    monkeypatch.setenv("FOUNDRY_MAX_REVIEW_BYTES", "200")
    reset_settings()
    job_id = uuid.uuid4().hex
    out = run({"tenant": "acme", **body}, job_id)
    assert out["status"] == "rejected" and out["field"] == field, out
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job.status == "rejected" and job.error_code == code and job.error
    assert count(Review, job_id=job_id) == 0 and count(UsageCost, job_id=job_id) == 0


def test_long_code_is_truncated_by_the_stated_rule_and_recorded(ledger):
    add_tenant(ledger, "acme")
    code = "".join(f"value_{i} = compute_{i}(value_{i - 1})\n" for i in range(400))
    out = run({"tenant": "acme", "code": code, "path": "long.py", "max_new_tokens": 32})
    assert out["status"] == "succeeded" and out["result"]["prompt_truncated"] is True
    assert out["result"]["prompt_tokens"] <= 512 - 32
    with session_scope() as s:
        review = s.scalar(select(Review).where(Review.id == out["result"]["review_id"]))
        first, last = review.truncation["omitted_lines"]
        assert 1 < first <= last < 400 and review.prompt_truncated
        assert review.truncation["prompt_tokens_after"] <= review.truncation["budget_tokens"] == 480
        assert review.code == code  # the input is kept whole


def test_retrieved_context_is_used_and_recorded(ledger, monkeypatch):
    add_tenant(ledger, "acme")
    seen = {}

    def retrieve_context(tenant, query, k=4, floor=None):
        seen.update(tenant=tenant, query=query, k=k)
        chunk = types.SimpleNamespace(id="doc-7#0", text="Always check b != 0 before dividing.", score=0.83,
                                      path="docs/style.md", source="doc")
        return types.SimpleNamespace(chunks=[chunk], index_version=5)

    monkeypatch.setitem(sys.modules, "domain.retrieval.service", types.SimpleNamespace(retrieve_context=retrieve_context))
    out = run({"tenant": "acme", "code": CODE, "path": "calc.py", "max_new_tokens": 6})
    assert out["status"] == "succeeded" and out["result"]["context_chunks"] == ["doc-7#0"]
    assert seen["tenant"] == "acme" and "def add" in seen["query"]
    with session_scope() as s:
        review = s.get(Review, out["result"]["review_id"])
        assert review.index_version == 5
        assert review.context_chunks == [{"id": "doc-7#0", "score": 0.83, "path": "docs/style.md", "source": "doc"}]

    def broken(tenant, query, k=4, floor=None):
        raise OSError("snapshot unreadable")

    monkeypatch.setitem(sys.modules, "domain.retrieval.service", types.SimpleNamespace(retrieve_context=broken))
    out = run({"tenant": "acme", "code": CODE, "max_new_tokens": 6})
    assert out["status"] == "succeeded" and "snapshot unreadable" in out["result"]["retrieval_error"]
    skipped = run({"tenant": "acme", "code": CODE, "max_new_tokens": 6, "use_retrieval": False})
    assert "retrieval_error" not in skipped["result"]


def test_over_budget_is_rejected_before_generating(ledger):
    add_tenant(ledger, "thrifty", daily_token_budget=100)
    rt = runtime.get_runtime()
    rows_before = rt.stats["rows"]
    job_id = uuid.uuid4().hex
    out = run({"tenant": "thrifty", "code": CODE, "max_new_tokens": 16}, job_id)  # prompt alone is > 100 tokens
    assert out["status"] == "rejected" and out["field"] == "tenant" and "daily token budget" in out["error"]
    with session_scope() as s:
        assert s.get(Job, job_id).error_code == "over_budget"
    assert rt.stats["rows"] == rows_before, "nothing may be generated for an over-budget tenant"
    assert count(UsageCost, job_id=job_id) == 0 and count(Review, job_id=job_id) == 0

    add_tenant(ledger, "capped", monthly_cost_budget=Decimal("0.01"))
    assert run({"tenant": "capped", "code": CODE, "max_new_tokens": 8})["status"] == "succeeded"
    from domain.budgets import set_budget

    set_budget("capped", monthly_cost=Decimal("0.000001"))  # below what the first review already cost
    over = run({"tenant": "capped", "code": CODE, "max_new_tokens": 8})
    assert over["status"] == "rejected" and "monthly cost budget" in over["error"]


def test_concurrent_jobs_of_different_tenants_share_one_mixed_adapter_batch(ledger, base_dir, tmp_path):
    tenants = ["t1", "t2", "t3", "t4"]
    for i, t in enumerate(tenants, start=1):
        add_tenant(ledger, t)
        if t != "t4":  # t4 has no champion: the base model, in the same batch
            champion(ledger, tmp_path, base_dir, tenant=t, seed=10 + i)
    rt = runtime.get_runtime()
    rt.batcher.wait_s, rt.batcher.max_batch = 1.0, 4
    outs: dict[str, dict] = {}
    gate = threading.Barrier(len(tenants))

    def job(t: str) -> None:
        gate.wait()
        outs[t] = run({"tenant": t, "code": CODE, "max_new_tokens": 12})

    try:
        threads = [threading.Thread(target=job, args=(t,)) for t in tenants]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert {o["result"]["batch_size"] for o in outs.values()} == {4}
        rt.batcher.wait_s = 0.0
        for t in tenants:  # each row equals the same review run alone
            alone = run({"tenant": t, "code": CODE, "max_new_tokens": 12})
            assert alone["result"]["batch_size"] == 1
            assert alone["result"]["raw_text"] == outs[t]["result"]["raw_text"]
        assert len({o["result"]["raw_text"] for o in outs.values()}) == 4
        with session_scope() as s:
            rows = s.scalars(select(UsageCost).where(UsageCost.job_id.in_([o["job_id"] for o in outs.values()]))).all()
        assert len(rows) == 4 and all(r.completion_tokens == 12 for r in rows)
    finally:
        rt.batcher.wait_s, rt.batcher.max_batch = 0.02, get_settings().review_batch_size
