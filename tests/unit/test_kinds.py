"""The registry of job kinds (domain/kinds.py): every list about kinds comes from it, each entry resolves,
a review worker never imports training code, and the runner calls a kind's failure hook."""

from __future__ import annotations

import dataclasses
import importlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from domain import jobs, kinds
from domain.config import Settings
from domain.errors import JobFailed
from domain.ledger.db import session_scope
from domain.ledger.models import HealthEvent, Job
from tests.conftest import add_tenant

ROOT = Path(__file__).resolve().parents[2]


def resolve(ref: str):
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("kind", list(kinds.KINDS))
def test_each_entry_names_its_own_spec_and_a_handler_that_exists(kind):
    entry = kinds.KINDS[kind]
    assert entry.spec.model_fields["kind"].default == kind
    assert callable(resolve(entry.handler))
    assert entry.on_failure is None or callable(resolve(entry.on_failure))
    assert entry.rank_entry is None or callable(resolve(entry.rank_entry))
    assert (entry.rank_entry is not None) == ("procs" in entry.spec.model_fields)  # procs > 1 needs helper ranks
    assert entry.queue in kinds.QUEUES and entry.time_limit_s > 0


def test_the_lists_about_kinds_are_derived_from_the_registry():
    assert kinds.QUEUES == ("review", "retrain", "quantize", "distill", "index", "control")
    assert kinds.GPU_QUEUES == ("review", "retrain", "quantize", "distill")  # what docker-compose's gpu worker takes
    assert kinds.CPU_QUEUES == ("index", "control")
    assert kinds.LONG_QUEUES == ("retrain", "quantize", "distill")  # docker-compose's worker-gpu ("long" flavour)
    assert kinds.CHECKPOINTING_KINDS == {"retrain", "distill"}
    assert kinds.ML_QUEUES == {"review", "retrain", "quantize", "distill", "index"}
    assert Settings().time_limits == {k.name: k.time_limit_s for k in kinds.KINDS.values()}
    assert kinds.queue_for("noop") == "control" and kinds.queue_for("schedule_tick") == "control"


def test_every_worker_flavour_takes_the_queues_the_registry_gives_it():
    from worker.cli.service import worker_argv

    def queues(flavour):
        argv = worker_argv(flavour)
        return tuple(argv[argv.index("-Q") + 1].split(","))

    assert queues("gpu") == kinds.GPU_QUEUES and queues("cpu") == kinds.CPU_QUEUES
    assert queues("long") == kinds.LONG_QUEUES and queues("all") == kinds.QUEUES
    assert queues("review") == (kinds.KINDS["review"].queue,)
    # every kind's queue is taken by some flavour that compose runs (review, long, cpu)
    assert set(kinds.QUEUES) <= set(queues("review") + queues("long") + queues("cpu"))


def test_every_kind_has_a_task_routed_to_its_queue():
    from worker import tasks
    from worker.celery_app import make_celery

    routes = make_celery(Settings()).conf.task_routes
    assert set(tasks.JOB_TASKS) == set(kinds.KINDS)
    for kind, entry in kinds.KINDS.items():
        assert tasks.JOB_TASKS[kind].name == f"foundry.{kind}"
        assert routes[f"foundry.{kind}"] == {"queue": entry.queue, "routing_key": entry.queue}


def test_a_review_worker_never_imports_training_code_nor_the_adapter_store():
    code = ("import sys\nimport worker.tasks\nfrom domain import jobs\njobs.load_handler('review')\n"
            "print(' '.join(sorted(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = set(out.stdout.split())
    assert "domain.review.service" in loaded
    assert not loaded & {"domain.adapters.training", "domain.adapters.retrain", "domain.adapters.data",
                         "domain.distillation", "trl"}
    # nor the training side's adapter writer, nor quantization: serving reads adapters through adapter_lookup
    assert not loaded & {"domain.adapters.store", "domain.quantization"}, loaded & {"domain.adapters.store",
                                                                                     "domain.quantization"}


@pytest.fixture
def ledger(sqlite_ledger):
    add_tenant(sqlite_ledger, "acme")
    return sqlite_ledger


def test_a_failed_review_reaches_the_circuit_breaker_through_its_failure_hook(ledger, monkeypatch):
    def failing_review(spec, ctx):
        ctx.info["adapter_version_id"] = "v-champion"
        raise JobFailed("the model produced nothing", code="empty_output")

    monkeypatch.setitem(jobs.HANDLERS, "review", f"{__name__}:_stub")
    monkeypatch.setattr(sys.modules[__name__], "_stub", failing_review, raising=False)
    jid = uuid.uuid4().hex
    out = jobs.execute("review", jid, {"tenant": "acme", "code": "x = 1\n"}, "w:1")
    assert out["status"] == "failed" and out["code"] == "empty_output"
    with session_scope() as s:
        events = list(s.scalars(select(HealthEvent).where(HealthEvent.event == "review_failure")))
        assert [e.detail["version_id"] for e in events] == ["v-champion"] and events[0].source == "w:1"
        assert s.get(Job, jid).status == "failed"


def test_a_failing_hook_leaves_the_failure_recorded(ledger, monkeypatch):
    def failing_noop(spec, ctx):
        raise JobFailed("nope", code="bad")

    def broken_hook(ctx, error):
        raise RuntimeError("hook broke")

    monkeypatch.setitem(kinds.KINDS, "noop", dataclasses.replace(kinds.KINDS["noop"], on_failure=f"{__name__}:_hook"))
    monkeypatch.setattr(sys.modules[__name__], "_hook", broken_hook, raising=False)
    monkeypatch.setattr(jobs, "load_handler", lambda kind: failing_noop)
    jid = uuid.uuid4().hex
    out = jobs.execute("noop", jid, {"tenant": "acme"}, "w:1")
    assert out == {"job_id": jid, "status": "failed", "error": "nope", "code": "bad"}
    with session_scope() as s:
        assert s.get(Job, jid).status == "failed"
