"""The retrain job end to end through domain.jobs.execute on a SQLite ledger and a tiny base model."""

from __future__ import annotations

import pytest
import torch
from sqlalchemy import select

from domain import jobs
from domain import adapter_lookup
from domain.adapters import store, training
from tests.fixtures.adapters import make_version, seed_feedback, stdlib_review_pairs
from domain.config import reset_settings
from domain.ledger.db import session_scope
from domain.ledger.models import (
    AdapterLineage, AdapterVersion, AliasHistory, Checkpoint, HealthEvent, Job, UsageCost, new_id,
)
from domain.paths import data_root
from tests.conftest import add_tenant

BODY = {"max_steps": 12, "learning_rate": 5e-3, "max_seq_len": 384, "batch_size": 2, "lora_r": 4,
        "target_modules": ["q_proj", "v_proj"], "checkpoint_every": 5, "promotion_margin": 0.0}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def ledger(ledger, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("FOUNDRY_BASE_MODEL", str(tiny_model_dir))
    reset_settings()
    return ledger

def run(body: dict, job_id: str | None = None, tenant: str = "acme") -> dict:
    return jobs.execute("retrain", job_id or new_id(), {"tenant": tenant, **BODY, **body}, "test-worker")


def versions(tenant="acme"):
    with session_scope() as s:
        return list(s.scalars(select(AdapterVersion).where(AdapterVersion.tenant_id == tenant)
                              .order_by(AdapterVersion.version)))


def test_no_new_feedback_succeeds_with_nothing_to_train(ledger):
    out = run({})
    assert out["status"] == "succeeded" and out["result"]["status"] == "nothing to train"
    seed_feedback("acme", stdlib_review_pairs(2), verdicts=["reject", "reject"])  # no corrections: no data
    out = run({"min_feedback": 1})
    assert out["result"]["status"] == "nothing to train" and out["result"]["new_feedback"] == 0
    seed_feedback("acme", stdlib_review_pairs(4)[2:])
    assert run({"min_feedback": 3})["result"]["status"] == "nothing to train"  # 2 < 3
    assert versions() == []


def test_first_retrain_makes_a_version_judged_against_the_base(ledger):
    seed_feedback("acme", stdlib_review_pairs(10, max_code_lines=8))
    out = run({"promotion_margin": 0.0})
    assert out["status"] == "succeeded", out
    r = out["result"]
    [v] = versions()
    assert r["version_id"] == v.id and v.version == 1 and r["reference"] == "base"
    with session_scope() as s:
        assert s.get(Job, out["job_id"]).result["version"] == 1  # added by the commit
    assert v.dataset_size == 10 and v.dataset_hash == r["dataset_hash"] and v.feedback_until is not None
    assert v.base_model_hash and v.hyperparams["lora_r"] == 4 and v.created_by_job_id == out["job_id"]
    assert v.metrics["train_loss_final"] < v.metrics["train_loss_first"]
    assert v.metrics["gate"]["reason"] == r["reason"]
    quality = v.metrics["gate"]["quality"]  # the review-quality measure both sides were scored with
    assert quality["candidate"]["files"] >= 1 and quality["candidate"]["labels"] == quality["reference"]["labels"]
    assert r["review_precision"] == {"candidate": quality["candidate"]["precision"],
                                     "reference": quality["reference"]["precision"]}
    adapter_lookup.verified_adapter_path(v)  # files match the recorded sha256
    with session_scope() as s:
        aliases = adapter_lookup.aliases_of(s, "acme")
        assert aliases["candidate"] == v.id
        if r["promoted"]:
            assert aliases["champion"] == v.id and v.status == "promoted"
        else:
            assert "champion" not in aliases and v.status == "rejected"
        moves = list(s.scalars(select(AliasHistory).where(AliasHistory.tenant_id == "acme")))
        assert all(m.moved_by == f"job:{out['job_id']}" for m in moves)
        ckpts = list(s.scalars(select(Checkpoint).where(Checkpoint.job_id == out["job_id"]).order_by(Checkpoint.step)))
        assert [c.step for c in ckpts] == [5, 10] and all(len(c.sha256) == 64 for c in ckpts)
        usage = s.scalars(select(UsageCost).where(UsageCost.job_id == out["job_id"])).one()
        assert usage.prompt_tokens == r["tokens_trained"] > 0 and usage.adapter_version_id == v.id
        job = s.get(Job, out["job_id"])
        assert job.progress == 1.0 and "loss" in job.progress_info and "tokens_per_s" in job.progress_info
    # the same job delivered again is skipped: no second version
    again = jobs.execute("retrain", out["job_id"], {"tenant": "acme", **BODY}, "test-worker")
    assert again["status"] == "succeeded" and len(versions()) == 1


def test_gate_keeps_champion_and_next_retrain_continues_from_it(ledger):
    seed_feedback("acme", stdlib_review_pairs(8, max_code_lines=8))
    first = run({"promotion_margin": 0.0, "max_steps": 15, "learning_rate": 1e-2})
    assert first["result"]["promoted"], first["result"]["reason"]
    v1 = first["result"]["version_id"]
    assert run({})["result"]["status"] == "nothing to train"  # nothing new since v1

    seed_feedback("acme", stdlib_review_pairs(14, max_code_lines=8)[8:])
    kept = run({"promotion_margin": 0.9})  # demands a 90 % lower loss: cannot pass
    r = kept["result"]
    assert kept["status"] == "succeeded" and r["promoted"] is False and r["status"] == "kept champion"
    assert r["reference"] == f"champion:{v1}" and "margin" in r["reason"] and r["parent_id"] == v1
    v2 = r["version_id"]
    with session_scope() as s:
        assert adapter_lookup.aliases_of(s, "acme") == {"champion": v1, "candidate": v2}
        row = s.get(AdapterVersion, v2)
        assert row.status == "rejected" and row.parent_id == v1 and row.version == 2
        assert row.metrics["gate"]["promote"] is False and row.metrics["reference_eval"]["loss"] > 0
        lineage = s.scalars(select(AdapterLineage).where(AdapterLineage.child_id == v2)).one()
        assert (lineage.parent_id, lineage.relation) == (v1, "retrain")
    # feedback since the champion is still there for the next try, but it is not "new" for the threshold
    assert run({"min_feedback": 1})["result"]["status"] == "nothing to train"


def test_corrupt_champion_is_refused(ledger, tiny_model_dir):
    vid = make_version("acme", str(tiny_model_dir), seed=1, alias="champion")
    with session_scope() as s:
        folder = adapter_lookup.verified_adapter_path(s.get(AdapterVersion, vid))
    (folder / store.WEIGHTS_FILE).write_bytes(b"not the trained weights")
    seed_feedback("acme", stdlib_review_pairs(3))
    out = run({})
    assert out["status"] == "failed" and out["code"] == "adapter_hash_mismatch"
    with session_scope() as s:
        assert s.scalars(select(HealthEvent).where(HealthEvent.event == "hash_mismatch")).first() is not None
    assert len(versions()) == 1


def test_base_model_mismatch_is_refused(ledger, tiny_model_dir, tmp_path):
    from tests.fixtures.tiny_models import save_tiny_model

    make_version("acme", str(tiny_model_dir), seed=1, alias="champion")
    other = save_tiny_model(tmp_path / "another-base", seed=9)
    seed_feedback("acme", stdlib_review_pairs(3))
    out = run({"base_model": str(other)})
    assert out["status"] == "failed" and out["code"] == "base_model_mismatch"
    assert "trained on" in out["error"] and str(other) in out["error"]


class WorkerKilled(BaseException):
    """Escapes execute() like a SIGKILL/OOM: nothing is written, the job stays 'running'."""


def test_killed_worker_then_redelivery_resumes_to_the_same_adapter(ledger, monkeypatch):
    """The worker dies after the step-5 checkpoint; the redelivered job (same id, restarted worker) resumes
    from it and ends exactly where an uninterrupted job on the same data ends (torchtune-style)."""
    pairs = stdlib_review_pairs(8, max_code_lines=8)
    add_tenant(ledger, "twin")
    seed_feedback("acme", pairs)
    seed_feedback("twin", pairs)
    body = {"max_steps": 12, "checkpoint_every": 5, "lora_dropout": 0.1}
    whole = run(body, tenant="twin")["result"]

    real_progress = jobs.JobContext.progress

    def die_at_step_8(self, fraction=None, force=False, **info):
        if info.get("step") == 8:
            raise WorkerKilled()
        return real_progress(self, fraction, force, **info)

    monkeypatch.setattr(jobs.JobContext, "progress", die_at_step_8)
    job_id = new_id()
    with pytest.raises(WorkerKilled):
        run(body, job_id)
    monkeypatch.setattr(jobs.JobContext, "progress", real_progress)
    with session_scope() as s:
        assert s.get(Job, job_id).status == "running"  # nobody recorded anything: the worker is gone

    # the restarted worker on the same node takes the job over at once (same node, new process name)
    resumed = jobs.execute("retrain", job_id, {"tenant": "acme", **BODY, **body}, "test-worker:restarted")
    assert resumed["status"] == "succeeded", resumed
    r = resumed["result"]
    assert r["resumed_from_step"] == 5 and r["steps"] == 12
    assert r["dataset_hash"] == whole["dataset_hash"]
    assert r["train_loss_final"] == pytest.approx(whole["train_loss_final"], rel=1e-6)
    assert r["eval_loss"] == pytest.approx(whole["eval_loss"], rel=1e-6)
    assert r["artifact_sha256"] == whole["artifact_sha256"]  # bit-identical adapter weights
    assert len(versions("acme")) == 1
    # the adapter version supersedes the checkpoints: files gone, ledger rows kept and marked
    with session_scope() as s:
        ckpts = list(s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)))
    assert {c.step for c in ckpts} >= {5, 10} and all(c.pruned_at is not None for c in ckpts)
    assert not (data_root() / "checkpoints" / "retrain" / job_id).exists()


def test_soft_stop_then_redelivery_resumes_to_the_same_adapter(ledger, monkeypatch):
    """A worker shutting down mid-training checkpoints; the redelivered job (same id) resumes and ends
    exactly where an uninterrupted job on the same data ends."""
    pairs = stdlib_review_pairs(8, max_code_lines=8)
    add_tenant(ledger, "twin")
    seed_feedback("acme", pairs)
    seed_feedback("twin", pairs)
    body = {"max_steps": 12, "checkpoint_every": 100, "lora_dropout": 0.1}

    whole = run(body, tenant="twin")["result"]

    real_progress = jobs.JobContext.progress

    def stop_at_step_7(self, fraction=None, force=False, **info):
        if info.get("step") == 7:
            jobs.stop_requested.set()
        return real_progress(self, fraction, force, **info)

    monkeypatch.setattr(jobs.JobContext, "progress", stop_at_step_7)
    job_id = new_id()
    try:
        with pytest.raises(jobs.SoftStop):
            run(body, job_id)
    finally:
        jobs.stop_requested.clear()
    monkeypatch.setattr(jobs.JobContext, "progress", real_progress)
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job.status == "queued" and job.error_code == "soft_stop"
        [ck] = s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)).all()
        assert (ck.step, ck.reason) == (7, "soft_stop")

    resumed = run(body, job_id)
    assert resumed["status"] == "succeeded", resumed
    r = resumed["result"]
    assert r["resumed_from_step"] == 7 and r["steps"] == 12
    assert r["dataset_hash"] == whole["dataset_hash"]
    assert r["train_loss_final"] == pytest.approx(whole["train_loss_final"], rel=1e-6)
    assert r["eval_loss"] == pytest.approx(whole["eval_loss"], rel=1e-6)
    assert r["artifact_sha256"] == whole["artifact_sha256"]  # bit-identical adapter weights
    with session_scope() as s:
        health = s.scalars(select(HealthEvent).where(HealthEvent.job_id == job_id, HealthEvent.event == "resume")).one()
        assert health.detail["step"] == 7


def test_qlora_trains_on_a_4bit_base(ledger):
    seed_feedback("acme", stdlib_review_pairs(6, max_code_lines=8))
    out = run({"qlora": True, "max_steps": 4})
    assert out["status"] == "succeeded", out
    [loaded] = training._base.values()
    kinds = {type(m).__name__ for m in loaded.model.modules()}
    assert "Linear4bit" in kinds  # NF4 weights through bitsandbytes
    assert not any("lora" in n for n, _ in loaded.model.named_parameters())  # unloaded after the job
    [v] = versions()
    assert v.hyperparams["qlora"] is True
    adapter_lookup.verified_adapter_path(v)


def test_champion_moved_during_training_is_not_overwritten(ledger, tiny_model_dir, monkeypatch):
    """The gate compared against the champion of the job's start; if someone promoted another version
    meanwhile, the new version is not promoted over it."""
    seed_feedback("acme", stdlib_review_pairs(8, max_code_lines=8))
    other = make_version("acme", str(tiny_model_dir), seed=5)
    real_progress = jobs.JobContext.progress

    def promote_other_at_step_3(self, fraction=None, force=False, **info):
        if info.get("step") == 3:
            with session_scope() as s:
                store.move_alias(s, "acme", "champion", other, "cli:someone", "manual promotion")
        return real_progress(self, fraction, force, **info)

    monkeypatch.setattr(jobs.JobContext, "progress", promote_other_at_step_3)
    out = run({"promotion_margin": 0.0, "max_steps": 6})
    assert out["status"] == "succeeded" and out["result"]["reference"] == "base"
    with session_scope() as s:
        job = s.get(Job, out["job_id"])
        assert job.result["promoted"] is False and "champion changed" in job.result["reason"]
        assert adapter_lookup.resolve_adapter(s, "acme", None).id == other
        assert s.get(AdapterVersion, out["result"]["version_id"]).status == "rejected"


def test_two_retrains_in_one_process_take_turns_on_the_resident_base(ledger):
    """A threads-pool worker consuming the retrain queue runs two jobs at once: they share the process's
    resident base model, which LoRA wraps in place, so they take turns and both succeed."""
    import threading

    pairs = stdlib_review_pairs(8, max_code_lines=8)
    add_tenant(ledger, "twin")
    seed_feedback("acme", pairs)
    seed_feedback("twin", pairs)
    results: dict = {}
    start = threading.Barrier(2)

    def job(tenant: str) -> None:
        start.wait()
        results[tenant] = run({"max_steps": 6}, tenant=tenant)

    threads = [threading.Thread(target=job, args=(t,)) for t in ("acme", "twin")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert {t: r["status"] for t, r in results.items()} == {"acme": "succeeded", "twin": "succeeded"}, results
    assert results["acme"]["result"]["dataset_hash"] == results["twin"]["result"]["dataset_hash"]
    assert results["acme"]["result"]["train_loss_final"] == pytest.approx(results["twin"]["result"]["train_loss_final"])
