"""Fault injection: hostile input. Hypothesis-generated malformed bodies against every job schema (through
domain.jobs.execute on a SQLite ledger: fast), a handful of poison messages and a pickle message through a
real worker, and adapter files corrupted on disk. Each ends with a clear error, once, and a consistent ledger.
"""

from __future__ import annotations

import pickle
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from domain import consistency, jobs
from domain.config import reset_settings
from domain.kinds import SPECS
from domain.ledger.db import session_scope
from domain.ledger.models import HealthEvent, Job, JobAttempt, Review, UsageCost
from tests.conftest import add_tenant
from tests.integration.test_faults_kit import fault_summary, record, tally, wait_final  # noqa: F401
from tests.integration.workers import running_worker

KINDS = sorted(SPECS)
VALID = {
    "review": {"code": "x = 1\n"},
    "retrain": {},
    "quantize": {"method": "nf4"},
    "distill": {},
    "index": {"action": "add", "documents": [{"id": "a", "text": "hello"}]},
    "noop": {},
}

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=False),
                      st.text(max_size=30))
json_value = st.recursive(json_leaf, lambda c: st.one_of(st.lists(c, max_size=4),
                                                         st.dictionaries(st.text(max_size=10), c, max_size=4)),
                          max_leaves=12)


@st.composite
def malformed(draw, kind: str):
    """(how, body): a non-object or an unknown field (must be refused), or a known field given a value of
    another shape (refused unless that value happens to be valid for it)."""
    fields = list(SPECS[kind].model_fields)
    how = draw(st.sampled_from(["not_object", "unknown_field", "bad_value"]))
    body = {"tenant": "acme", **VALID[kind]}
    if how == "not_object":
        return how, draw(st.one_of(json_leaf, st.lists(json_value, max_size=3)))
    if how == "unknown_field":
        name = draw(st.text(min_size=1, max_size=12).filter(lambda n: n not in fields))
        body[name] = draw(json_value)
        return how, body
    name = draw(st.sampled_from([f for f in fields if f != "kind"]))
    body[name] = draw(st.one_of(st.lists(json_value, min_size=1, max_size=2),
                                st.dictionaries(st.text(min_size=1, max_size=5), json_value, min_size=1, max_size=2),
                                st.just(-10**12), st.just("\x00")))
    return how, body


def _stub_handler(spec, ctx):
    """Stands in for the real handler: a generated body that is valid after all must not start training."""
    return jobs.Outcome(result={"stub": True})


@pytest.mark.parametrize("kind", KINDS)
def test_hypothesis_malformed_bodies_are_rejected_once_naming_the_field(kind, ledger, monkeypatch):
    monkeypatch.setitem(jobs.HANDLERS, kind, f"{__name__}:_stub_handler")
    seen: list[str] = []
    valid: list[str] = []

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=malformed(kind))
    def check(case):
        how, body = case
        jid = uuid.uuid4().hex
        out = jobs.execute(kind, jid, body, "fuzz:1")
        if out["status"] == "succeeded":  # a replaced value that happens to be valid (e.g. seed=-10**12)
            assert how == "bad_value", (body, out)
            valid.append(jid)
            return
        assert out["status"] == "rejected", (body, out)
        assert out["field"] and out["error"], out
        assert out["field"].split(".")[0] in out["error"] or out["field"] == "(message)", out
        again = jobs.execute(kind, jid, body, "fuzz:2")  # a redelivery is not retried
        assert again["status"] == "rejected"
        seen.append(jid)

    check()
    t = tally(seen, want="rejected")
    record(f"malformed {kind} bodies (hypothesis)", t, f"+{len(valid)} valid after all, run once")
    assert tally(valid).finished_once == len(valid)
    assert t.finished_once == len(seen) and t.lost == 0 and t.duplicated == 0
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(UsageCost)) == 0
    report = consistency.check(check_files=False)
    assert report.ok, report.to_dict()


# ---- through a real worker ---------------------------------------------------------------------------

class _Touch:
    """Unpickling this creates a file: the proof that a worker deserialized pickle."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.integration
def test_poison_and_pickle_messages_through_a_real_worker(env, tmp_path):
    from kombu import Exchange, Producer

    from worker.client import celery_app, enqueue

    poison = {
        "review": {"tenant": "acme", "code": ""},
        "retrain": {"tenant": "acme", "max_steps": "many"},
        "quantize": {"tenant": "acme", "method": "gptq-9bit"},
        "distill": {"tenant": "acme", "alpha": 7},
        "index": {"tenant": "acme", "action": "remove"},
        "noop": {"tenant": "Not A Tenant!"},
    }
    marker = tmp_path / "pickle-was-loaded"
    ids = []
    with running_worker(env, queues=["review", "retrain", "quantize", "distill", "index", "control"]) as w:
        for kind, body in poison.items():
            jid = uuid.uuid4().hex
            queue = "control" if kind == "noop" else kind
            celery_app().send_task(f"foundry.{kind}", args=[body], task_id=jid, queue=queue)
            ids.append(jid)
        crash = enqueue("noop", {"tenant": "acme", "crash": "raise", "cost_tokens": 3})  # a permanent failure
        pickled_id = uuid.uuid4().hex
        with celery_app().connection_for_write() as conn:
            Producer(conn).publish(
                pickle.dumps(((_Touch(str(marker)),), {}, {})), serializer=None,
                content_type="application/x-python-serialize", content_encoding="binary",
                exchange=Exchange("foundry", type="direct"), routing_key="control",
                headers={"task": "foundry.noop", "id": pickled_id, "lang": "py", "retries": 0, "root_id": pickled_id})
        wait_final(ids + [crash], timeout=60)
        time.sleep(2)  # a retried or redelivered message would show up as a second attempt by now
        log = w.output()
    t = tally(ids, want="rejected")
    record("poison messages, every kind (worker)", t)
    assert t.finished_once == len(ids) and t.lost == 0 and t.duplicated == 0, t
    with session_scope() as s:
        for jid in ids:
            j = s.get(Job, jid)
            assert j.status == "rejected" and j.error and j.progress_info.get("rejected_field"), (j.kind, j.error)
        c = s.get(Job, crash)
        assert c.status == "failed" and "injected fault" in c.error and c.attempts == 1
        assert s.scalar(select(func.count()).select_from(UsageCost).where(UsageCost.job_id == crash)) == 0
        assert s.get(Job, pickled_id) is None  # never reached Foundry
    record("pickle message (worker)", tally([crash], want="failed"), "pickle refused, crash failed once")
    assert not marker.exists(), "the worker unpickled a message"
    assert "ContentDisallowed" in log or "disallowed" in log.lower() or "refusing" in log.lower(), log[-3000:]
    report = consistency.check(check_files=False)
    assert report.ok, report.to_dict()


@pytest.mark.integration
def test_corrupted_adapter_files_are_refused_and_detected(pg_ledger, tmp_path, monkeypatch, tiny_model_dir):
    """The champion's weights are overwritten on disk: reviews fail with a clear code (no review, no
    cost), a health event names the version, and the consistency checker reports the file."""
    from domain.adapters.store import WEIGHTS_FILE
    from domain.ledger.models import AdapterVersion
    from domain.paths import resolve_in_data_root
    from tests.fixtures.adapters import make_version

    monkeypatch.setenv("FOUNDRY_BASE_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("FOUNDRY_DEVICE", "cpu")
    reset_settings()
    add_tenant(pg_ledger, "acme")
    vid = make_version("acme", tiny_model_dir, alias="champion")
    with session_scope() as s:
        path = s.get(AdapterVersion, vid).artifact_path
    weights = resolve_in_data_root(path) / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-64] + b"\x00" * 64)  # same size, different bytes

    ids = [uuid.uuid4().hex for _ in range(2)]
    outs = [jobs.execute("review", jid, {"tenant": "acme", "code": "def f():\n    return 1\n", "max_new_tokens": 4,
                                         "use_retrieval": False}, "w:1") for jid in ids]
    assert [o["status"] for o in outs] == ["failed", "failed"], outs
    assert all(o["code"] in ("adapter_hash_mismatch", "corrupt_adapter") for o in outs), outs
    assert vid in outs[0]["error"] and "sha256" in outs[0]["error"]
    t = tally(ids, want="failed")
    record("adapter weights corrupted on disk", t, "reviews failed: adapter_hash_mismatch")
    assert t.finished_once == 2 and t.lost == 0 and t.duplicated == 0
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Review)) == 0
        assert s.scalar(select(func.count()).select_from(UsageCost)) == 0
        events = list(s.scalars(select(HealthEvent).where(HealthEvent.component == "adapter")))
        assert any(e.event in ("hash_mismatch", "load_failed") and vid in (e.message or "") for e in events)
        attempts = list(s.scalars(select(JobAttempt.outcome).where(JobAttempt.job_id.in_(ids))))
        assert attempts == ["failed", "failed"]
    report = consistency.check()
    assert [i.check for i in report.errors] == ["artifact_files"] and vid in " ".join(report.errors[0].ids)
