"""domain.consistency: a clean ledger passes; each kind of corruption is reported by its check."""

import uuid
from datetime import timedelta

import pytest
from safetensors.torch import save_file
import torch

from domain import consistency, jobs
from domain.adapters import store
from domain.ledger.db import session_scope
from domain.ledger.models import AdapterAlias, Job, JobAttempt, Review, UsageCost, utcnow
from tests.conftest import add_tenant


@pytest.fixture
def ledger(ledger):
    add_tenant(ledger, "globex")
    return ledger

def run_noop(**body):
    jid = uuid.uuid4().hex
    try:
        jobs.execute("noop", jid, {"tenant": "acme", **body}, "w1:1")
    except jobs.RetryLater:
        pass
    return jid


def checks(report):
    return {i.check for i in report.errors}


def fake_adapter(tenant, name, folder, session, **kw):
    """Adapter files on disk (safetensors + config) registered as a version, as the retrain job does."""
    rel = store.adapter_rel_dir(tenant, name, folder)
    full = store.resolve_in_data_root(rel)
    full.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.ones(4)}, str(full / store.WEIGHTS_FILE))
    (full / store.CONFIG_FILE).write_text('{"r": 4}')
    return store.register_version(session, tenant=tenant, name=name, base_model_id="tiny", base_model_hash="h",
                                  files=store.describe_files(rel), **kw)


def test_clean_ledger_after_mixed_outcomes_is_consistent(ledger):
    run_noop(cost_tokens=10)
    run_noop(crash="raise")
    run_noop(crash="transient", crash_times=1)
    jobs.execute("noop", uuid.uuid4().hex, {"tenant": "acme", "bogus": 1}, "w1:1")  # rejected
    jid = run_noop(cost_tokens=5)
    jobs.execute("noop", jid, {"tenant": "acme", "cost_tokens": 5}, "w1:1")  # redelivered after success
    report = consistency.check(ledger)
    assert report.ok, report.to_dict()
    assert report.counts["jobs"] == 5
    assert report.counts["by_status"] == {"succeeded": 2, "failed": 1, "rejected": 1, "queued": 1}


def test_success_recorded_twice_and_usage_for_failed_job_are_errors(ledger):
    ok = run_noop(cost_tokens=10)
    failed = run_noop(crash="raise")
    with session_scope() as s:
        s.add(JobAttempt(job_id=ok, attempt=2, worker="w2", outcome="succeeded"))
        s.get(Job, ok).attempts = 2
        s.add(UsageCost(job_id=failed, tenant_id="acme", kind="noop", prompt_tokens=1))
    report = consistency.check(ledger)
    assert {"succeeded_once", "usage_for_unsucceeded_job"} <= checks(report)
    assert ok in next(i for i in report.errors if i.check == "succeeded_once").ids
    assert not report.ok


def test_attempt_counter_mismatch_and_open_attempt_on_final_job(ledger):
    jid = run_noop()
    with session_scope() as s:
        s.get(Job, jid).attempts = 3
    other = run_noop()
    with session_scope() as s:
        s.add(JobAttempt(job_id=other, attempt=2, worker="w2", outcome=None))
        s.get(Job, other).attempts = 2
    assert {"attempt_count", "open_attempt_on_final_job"} <= checks(consistency.check(ledger))


def test_stale_running_job_is_a_warning_not_an_error(ledger):
    jid = uuid.uuid4().hex
    from domain.ledger import jobstore

    jobstore.claim(jid, "noop", "acme", {"tenant": "acme"}, "w1:1", max_attempts=3, stale_after_s=60)
    with session_scope() as s:
        s.get(Job, jid).heartbeat_at = utcnow() - timedelta(minutes=10)
    report = consistency.check(ledger, stale_after_s=60)
    assert report.ok
    assert [i.check for i in report.warnings] == ["stale_running"] and report.warnings[0].ids == [jid]


def test_review_of_a_failed_job_is_reported(ledger):
    jid = run_noop(crash="raise")
    with session_scope() as s:
        s.add(Review(job_id=jid, tenant_id="acme", model_id="m", code="x", code_sha256="0", raw_text="r"))
    assert "reviews_from_succeeded_jobs" in checks(consistency.check(ledger))


def test_alias_to_another_tenants_version_and_corrupt_adapter_file(ledger):
    with session_scope() as s:
        v = fake_adapter("globex", "reviewer", "v1", s)
        store.move_alias(s, "globex", "champion", v.id, "test")
        vid, path = v.id, v.artifact_path
    assert consistency.check(ledger).ok
    with session_scope() as s:  # an alias of acme pointing at globex's version (bypassing move_alias's check)
        s.add(AdapterAlias(tenant_id="acme", alias="champion", version_id=vid))
    (store.resolve_in_data_root(path) / store.WEIGHTS_FILE).write_bytes(b"corrupted")
    report = consistency.check(ledger)
    assert {"alias_target", "artifact_files"} <= checks(report)
    assert report.to_dict()["errors"] >= 2
    assert consistency.check(ledger, check_files=False, tenant="globex").ok  # scoped, files skipped


def test_missing_artifact_file_and_unsafe_path(ledger):
    assert consistency.file_matches("adapters/none/here", "0" * 64) == (False, "missing")
    ok, why = consistency.file_matches("../outside", None)
    assert not ok and why.startswith("unsafe path")


def test_soft_stopped_job_redelivered_keeps_the_ledger_consistent(ledger):
    jid = uuid.uuid4().hex
    jobs.stop_requested.set()
    try:
        with pytest.raises(jobs.SoftStop):
            jobs.execute("noop", jid, {"tenant": "acme", "sleep_s": 1}, "w1:1")
    finally:
        jobs.stop_requested.clear()
    out = jobs.execute("noop", jid, {"tenant": "acme"}, "w2:1")
    assert out["status"] == "succeeded"
    assert consistency.check(ledger).ok, consistency.check(ledger).to_dict()
