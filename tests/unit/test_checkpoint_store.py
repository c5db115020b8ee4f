"""Checkpoints through an S3 artifact store (moto on loopback): stored (verified) before they are recorded,
read back on another host through its node cache, pruned from the store too; an upload that fails is not
recorded, a corrupt stored object is refused."""

from __future__ import annotations

import time
import uuid

import pytest
import torch
from sqlalchemy import select

from domain import checkpoints, storage
from domain.config import get_settings, reset_settings
from domain.contract import JobContext
from domain.kinds import parse_spec
from domain.ledger.db import session_scope
from domain.ledger.models import Checkpoint, HealthEvent, Job


@pytest.fixture
def job(ledger, s3_store) -> JobContext:
    job_id = uuid.uuid4().hex
    with session_scope() as s:
        s.add(Job(id=job_id, kind="retrain", tenant_id="acme", payload={}, status="running"))
    return JobContext(job_id=job_id, kind="retrain", spec=parse_spec("retrain", {"tenant": "acme"}), attempt=1,
                      worker="a@host-a:1", settings=get_settings(), deadline=time.monotonic() + 600)


def _trained(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def _save(ctx, step: int, model, opt, sched) -> checkpoints.Written:
    return checkpoints.save(ctx, step, model.state_dict(), optimizer=opt, scheduler=sched, config={"lr": 0.1},
                            extra={"note": "test"}, metrics={"loss": 1.0 / step}, reason="interval")


def _rows(job_id: str) -> list[tuple[int, bool]]:
    with session_scope() as s:
        return [(c.step, c.pruned_at is not None) for c in s.scalars(
            select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step))]


def _become_host_b(tmp_path, monkeypatch) -> None:
    """This process now plays another host: its own (empty) data and cache folders, the same ledger and store."""
    monkeypatch.setenv("FOUNDRY_DATA_DIR", str(tmp_path / "host-b"))
    monkeypatch.setenv("FOUNDRY_CACHE_DIR", str(tmp_path / "host-b" / "cache"))
    reset_settings()
    storage._caches.clear()


def test_stored_before_recorded_then_read_on_another_host_and_pruned_from_the_store(job, tmp_path, monkeypatch):
    model, opt, sched = _trained()
    for step in (1, 2, 3):
        written = _save(job, step, model, opt, sched)
        assert written.folder.is_dir()  # the training thread's local copy, written before the upload starts
    checkpoints.wait_for_upload(job.job_id)
    assert _rows(job.job_id) == [(1, True), (2, False), (3, False)]  # checkpoint_keep = 2
    store = storage.get_store()
    assert not store.exists(checkpoints.folder_for("retrain", job.job_id, 1))  # pruned from the store too
    key = checkpoints.folder_for("retrain", job.job_id, 3)
    assert store.manifest(key).accepts(written.sha256)

    _become_host_b(tmp_path, monkeypatch)
    loaded = checkpoints.latest(job)
    assert loaded is not None and loaded.step == 3 and loaded.extra == {"note": "test"}
    assert (tmp_path / "host-b" / "cache") in loaded.folder.parents  # fetched into host B's node cache
    assert not (tmp_path / "host-b" / key).exists()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.weights[name], tensor)
    _, opt_b, sched_b = _trained(seed=1)
    checkpoints.restore(loaded, opt_b, sched_b)
    assert sched_b.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"]

    checkpoints.prune_job(job.job_id, keep=0)
    assert not store.exists(key) and all(pruned for _, pruned in _rows(job.job_id))


def test_an_upload_that_fails_is_not_recorded_and_training_goes_on(job, s3_store, monkeypatch):
    monkeypatch.setenv("FOUNDRY_ARTIFACT_URL", f"s3://{s3_store['bucket']}-missing/store")  # no such bucket
    reset_settings()
    model, opt, sched = _trained()
    written = _save(job, 1, model, opt, sched)
    checkpoints.wait_for_upload(job.job_id)
    assert _rows(job.job_id) == [] and not written.folder.exists()  # nothing recorded, no orphan folder
    with session_scope() as s:
        [event] = s.scalars(select(HealthEvent).where(HealthEvent.job_id == job.job_id)).all()
    assert (event.component, event.event, event.detail["step"]) == ("checkpoint", "upload_failed", 1)
    assert checkpoints.latest(job) is None  # a job that dies now starts over


def test_a_corrupt_stored_checkpoint_is_refused_on_another_host(job, tmp_path, monkeypatch):
    model, opt, sched = _trained()
    _save(job, 5, model, opt, sched)
    checkpoints.wait_for_upload(job.job_id)
    store = storage.get_store()
    weights = f"{checkpoints.folder_for('retrain', job.job_id, 5)}/{checkpoints.WEIGHTS}"
    store.fs.pipe_file(store.path(weights), store.get_bytes(weights)[:-1] + b"\0")

    _become_host_b(tmp_path, monkeypatch)
    assert checkpoints.latest(job) is None
    with session_scope() as s:
        events = {(e.component, e.event) for e in s.scalars(select(HealthEvent))}
    assert {("store", "object_corrupt"), ("checkpoint", "corrupt")} <= events
