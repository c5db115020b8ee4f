"""domain.checkpoints' one format: what retrain and distill write is read back by the same reader; a folder is
written whole or not at all; tied weights, optimizer, scheduler and RNG states come back; a changed folder is
refused with a health event."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import torch
from sqlalchemy import select

from domain import checkpoints, jobs
from domain.config import get_settings, reset_settings
from domain.contract import JobContext
from domain.distillation import reduce_layers
from domain.kinds import parse_spec
from domain.ledger.db import session_scope
from domain.ledger.models import Checkpoint, HealthEvent
from domain.models import load_causal_lm
from domain.paths import resolve_in_data_root, sha256_tree
from tests.conftest import add_tenant
from tests.fixtures.adapters import seed_feedback, stdlib_review_pairs
from tests.fixtures.tiny_models import save_tiny_model

RETRAIN = {"tenant": "acme", "max_steps": 12, "learning_rate": 5e-3, "max_seq_len": 384, "batch_size": 2, "lora_r": 4,
           "target_modules": ["q_proj", "v_proj"], "checkpoint_every": 5, "promotion_margin": 0.0}
DISTILL = {"tenant": "acme", "max_steps": 10, "checkpoint_every": 3, "batch_size": 2, "seq_len": 32,
           "eval_max_tokens": 128, "learning_rate": 3e-3, "layer_selection": "even"}


class Killed(BaseException):
    """Escapes execute() like a SIGKILL: the job stays 'running' with its checkpoints on disk."""


def _killed(monkeypatch, kind: str, body: dict, at_step: int) -> str:
    """Run one job until its progress reports ``at_step``, then kill it; returns the job id."""
    real = jobs.JobContext.progress

    def progress(self, fraction=None, force=False, **info):
        if info.get("step") == at_step:
            raise Killed()
        return real(self, fraction, force, **info)

    monkeypatch.setattr(jobs.JobContext, "progress", progress)
    job_id = uuid.uuid4().hex
    with pytest.raises(Killed):
        jobs.execute(kind, job_id, body, worker="test:1")
    monkeypatch.setattr(jobs.JobContext, "progress", real)
    return job_id


def _latest_row(job_id: str) -> Checkpoint:
    with session_scope() as s:
        return s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.pruned_at.is_(None))
                         .order_by(Checkpoint.step.desc())).first()


@pytest.fixture
def killed_jobs(sqlite_ledger, tiny_model_dir, tmp_path, monkeypatch) -> dict:
    """A retrain job killed after its step-5 checkpoint and a distill job killed after its step-3 one."""
    monkeypatch.setenv("FOUNDRY_BASE_MODEL", str(tiny_model_dir))
    reset_settings()
    add_tenant(sqlite_ledger, "acme")
    seed_feedback("acme", stdlib_review_pairs(8, max_code_lines=8))
    teacher = save_tiny_model(tmp_path / "teacher", layers=4, hidden=64, seed=3)
    return {"retrain": _killed(monkeypatch, "retrain", RETRAIN, 7),
            "distill": _killed(monkeypatch, "distill", {**DISTILL, "teacher": str(teacher)}, 4),
            "teacher": teacher}


def test_the_same_reader_reads_a_retrain_and_a_distill_checkpoint(killed_jobs):
    read = {}
    for kind, step in (("retrain", 5), ("distill", 3)):
        job_id = killed_jobs[kind]
        row = _latest_row(job_id)
        assert (row.kind, row.step, row.path) == (kind, step, checkpoints.folder_for(kind, job_id, step))
        folder = resolve_in_data_root(row.path)
        assert sha256_tree(folder) == row.sha256 and row.size_bytes > 0
        assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no temp folder left behind
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            [checkpoints.MANIFEST, checkpoints.WEIGHTS, checkpoints.STATE])
        state = torch.load(folder / checkpoints.STATE, weights_only=True)
        assert set(state) == {"optimizer", "scheduler", "rng"}
        read[kind] = checkpoints.read(folder)
        assert read[kind].step == step and read[kind].state["scheduler"]["last_epoch"] == step

    lora = read["retrain"]
    assert lora.weights and all("lora_" in name for name in lora.weights)
    assert lora.config["lora_r"] == 4 and len(lora.extra["losses"]) == 5
    assert set(lora.extra) == {"parent_id", "since", "until", "dataset_hash", "losses"}

    student = read["distill"]
    assert student.config["checkpoint_every"] == 3 and student.extra["trained_tokens"] == 3 * 2 * 32
    assert set(student.extra) == {"first_loss", "trained_tokens", "loss", "kl", "ce", "student"}
    made = student.extra["student"]
    assert made["layer_selection"] == "even" and len(made["kept_layers"]) == 2
    # the weights are the whole student, tied head included: a student rebuilt the same way takes them strictly
    teacher = load_causal_lm(str(killed_jobs["teacher"]), device="cpu").model
    rebuilt, _ = reduce_layers(teacher, 2, made["kept_layers"])
    assert rebuilt.load_state_dict(student.weights).missing_keys == []
    manifest = json.loads((student.folder / checkpoints.MANIFEST).read_text())
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}


def test_a_changed_checkpoint_is_refused_with_a_health_event(killed_jobs):
    job_id = killed_jobs["retrain"]
    spec = parse_spec("retrain", RETRAIN)
    ctx = JobContext(job_id=job_id, kind="retrain", spec=spec, attempt=2, worker="test:2", settings=get_settings(),
                     deadline=time.monotonic() + 600)
    assert checkpoints.latest(ctx).step == 5
    weights = resolve_in_data_root(_latest_row(job_id).path) / checkpoints.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    assert checkpoints.latest(ctx) is None
    with session_scope() as s:
        [event] = s.scalars(select(HealthEvent).where(HealthEvent.job_id == job_id)).all()
    assert (event.component, event.event, event.status, event.detail["step"]) == ("checkpoint", "corrupt", "degraded", 5)


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(5, 3)
        self.head = torch.nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight


def _trained_tied():
    torch.manual_seed(0)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    model.head(model.embed(torch.tensor([1, 2]))).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def test_write_then_read_round_trips_weights_states_and_rng(tmp_path):
    model, opt, sched = _trained_tied()
    folder = tmp_path / "job" / "step-00000001"
    written = checkpoints.write(folder, model.state_dict(), step=1, optimizer=opt, scheduler=sched,
                                config={"lr": 0.1}, extra={"note": "first"})
    assert written.folder == folder and written.sha256 == sha256_tree(folder)
    after_save = torch.rand(3)  # what the RNG draws next, right after the checkpoint

    ckpt = checkpoints.read(folder)
    assert (ckpt.step, ckpt.config, ckpt.extra) == (1, {"lr": 0.1}, {"note": "first"})
    fresh = Tied()
    fresh.load_state_dict(ckpt.weights)
    assert torch.equal(fresh.head.weight, model.head.weight) and fresh.head.weight is fresh.embed.weight
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda step: 1.0 / (step + 1))
    torch.manual_seed(12345)
    checkpoints.restore(ckpt, opt2, sched2)
    assert torch.equal(torch.rand(3), after_save)
    assert sched2.last_epoch == 1 and opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]

    # a second write of the same step (a redelivered job) replaces the folder whole
    checkpoints.write(folder, model.state_dict(), step=1, optimizer=opt, scheduler=sched, config={}, extra={"note": "again"})
    assert checkpoints.read(folder).extra == {"note": "again"}
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]


def test_read_refuses_what_is_not_this_format(tmp_path):
    with pytest.raises(OSError):
        checkpoints.read(tmp_path)  # no manifest: e.g. a folder of the layouts before this format
    (tmp_path / checkpoints.MANIFEST).write_text(json.dumps({"format": 99, "step": 1}))
    with pytest.raises(ValueError, match="format"):
        checkpoints.read(tmp_path)
