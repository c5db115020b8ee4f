"""Data-parallel retraining and distillation on torch.distributed with the gloo backend and 2 processes on the CPU.

- Two processes follow the one-process run with the same global batch: the same loss at every step and the
  same final adapter weights (float tolerance), also when they resume from a one-process checkpoint.
- A distill job on two processes likewise: the same loss at every step and the same final student, also when
  a one-process job's checkpoint is resumed on two (the redelivery lands on a worker with
  ``FOUNDRY_TRAIN_PROCS=2``).
- A retrain job and a distill job with ``procs: 2`` on a real worker: SIGKILL of its rank-1 process fails
  the attempt cleanly (``rank_lost``, retried) and the redelivery resumes from the checkpoint and succeeds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import func, select

from domain import checkpoints, distillation, jobs, rank_agent
from domain.adapters import distributed
from domain.adapters import training as T
from domain.adapters.data import FeedbackExample, tokenize
from domain.config import reset_settings
from domain.ledger.db import session_scope
from domain.ledger.models import AdapterVersion, Artifact, Checkpoint, Job, JobAttempt
from domain.models import load_causal_lm
from domain.paths import data_root
from tests.conftest import add_tenant
from tests.fixtures.adapters import seed_feedback, stdlib_review_pairs
from tests.fixtures.tiny_models import save_tiny_model
from tests.integration.workers import apply_env, running_worker, wait_for_value, worker_env

pytestmark = pytest.mark.integration

CFG = dict(max_steps=12, batch_size=2, max_seq_len=384, lora_r=4, lora_dropout=0.0, learning_rate=5e-3,
           target_modules=["q_proj", "v_proj"], checkpoint_every=6)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the helper ranks too
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("dist-base") / "tiny")


def _train(base_dir: Path, procs: int, workdir: Path, resume: Path | None = None, save_at: Path | None = None):
    from peft import get_peft_model_state_dict

    loaded = load_causal_lm(str(base_dir), device="cpu")
    tok = loaded.tokenizer
    exs = [tokenize(tok, FeedbackExample(code, path, None, False, review, "accepted", None), CFG["max_seq_len"])
           for path, code, review in stdlib_review_pairs(10, max_code_lines=8)]
    cfg = T.TrainConfig(**CFG)
    batches = T.make_batches(exs, cfg.batch_size, cfg.max_seq_len, cfg.packing, tok.pad_token_id)
    assert all(b.input_ids.shape[0] == 2 for b in batches)  # every global batch splits over both ranks
    model = T.setup_model(loaded.model, cfg)
    optimizer, scheduler = T.make_optimizer(model, cfg)
    start, losses = 0, []
    if resume is not None:
        start, losses = T.resume(checkpoints.read(resume), model, optimizer, scheduler)
    hooks = T.Hooks()
    if save_at is not None:
        seen: list[float] = list(losses)
        hooks = T.Hooks(progress=lambda step, loss, tps: seen.append(loss),
                        checkpoint=lambda step, reason: checkpoints.write(
                            save_at, T.adapter_weights(model), step=step, optimizer=optimizer, scheduler=scheduler,
                            config=cfg.hyperparams(), extra={"losses": list(seen)}))
    launch = distributed.Launch(base_ref=str(base_dir), device="cpu", qlora=False, workdir=str(workdir),
                                resume_dir=str(resume) if resume else None)
    result = distributed.run(model, batches, cfg, optimizer, scheduler, procs=procs, launch=launch, start_step=start,
                             losses=losses, hooks=hooks)
    weights = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    T.cleanup(model)
    return result, weights


def _same_weights(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_gloo_processes_equal_one_process(base_dir, tmp_path):
    one, w_one = _train(base_dir, 1, tmp_path / "w1", save_at=tmp_path / "step-6")
    two, w_two = _train(base_dir, 2, tmp_path / "w2")
    assert len(one.losses) == len(two.losses) == CFG["max_steps"]
    assert one.losses[-1] < one.losses[0]  # it trains
    assert two.losses == pytest.approx(one.losses, rel=1e-5, abs=1e-6)
    assert _same_weights(w_one, w_two) < 1e-5
    assert not (tmp_path / "w2").exists()  # the launch folder is removed after the job

    # resume with another number of processes: the one-process checkpoint at step 6, continued on two
    resumed, w_resumed = _train(base_dir, 2, tmp_path / "w3", resume=tmp_path / "step-6")
    assert resumed.steps == CFG["max_steps"] and len(resumed.losses) == CFG["max_steps"]
    assert resumed.losses == pytest.approx(one.losses, rel=1e-5, abs=1e-6)
    assert _same_weights(w_one, w_resumed) < 1e-5


@pytest.fixture
def env(redis_url, pg_ledger, tmp_path, monkeypatch, base_dir):
    # production broker timing: the redelivery below is the job's own retry, not a visibility-timeout restore
    e = worker_env(redis_url, pg_ledger, tmp_path, FOUNDRY_BASE_MODEL=base_dir, FOUNDRY_DEVICE="cpu",
                   OMP_NUM_THREADS=1, FOUNDRY_VISIBILITY_TIMEOUT_S=0, FOUNDRY_RESTORE_INTERVAL_S=10)
    apply_env(monkeypatch, e)
    add_tenant(pg_ledger, "acme")
    seed_feedback("acme", stdlib_review_pairs(10, max_code_lines=8))
    return e


def _sigkill_rank_1_after_a_checkpoint(env: dict, tmp_path: Path, kind: str, body: dict) -> tuple[dict, int]:
    """Run a ``procs: 2`` job on a real worker, SIGKILL its rank 1 once it has a checkpoint; the job's final
    status and that checkpoint's step. The lost attempt must end as a retry naming the lost rank."""
    from worker.client import enqueue, wait

    job_id = enqueue(kind, body)
    pid_file = tmp_path / "dist" / job_id / "rank-1.pid"
    with running_worker(env, queues=[kind]) as worker:
        def checkpointed():
            with session_scope() as s:
                return s.scalar(select(func.max(Checkpoint.step)).where(Checkpoint.job_id == job_id))

        wait_for_value("rank-1 process", pid_file.exists, 300, worker)
        step = wait_for_value("checkpoint", checkpointed, 300, worker)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        try:
            done = wait(job_id, timeout=600)
        except TimeoutError:
            with session_scope() as s:
                j = s.get(Job, job_id)
                raise AssertionError(f"{j.status} {j.progress_info} {j.error}\n{worker.output()[-4000:]}") from None
    assert done["status"] == "succeeded", done
    with session_scope() as s:
        attempts = list(s.scalars(select(JobAttempt).where(JobAttempt.job_id == job_id).order_by(JobAttempt.attempt)))
    assert [a.outcome for a in attempts] == ["retry", "succeeded"]
    assert "rank 1 exited with -9" in attempts[0].error and "last checkpoint" in attempts[0].error
    return done, step


def test_sigkill_of_one_rank_fails_the_attempt_and_the_retry_resumes(env, tmp_path):
    body = {"tenant": "acme", **{k: v for k, v in CFG.items()}, "max_steps": 400, "checkpoint_every": 10,
            "promotion_margin": 0.0, "procs": 2}
    done, step = _sigkill_rank_1_after_a_checkpoint(env, tmp_path, "retrain", body)
    r = done["result"]
    assert r["steps"] == 400 and r["resumed_from_step"] >= step > 0
    with session_scope() as s:
        [version] = s.scalars(select(AdapterVersion).where(AdapterVersion.tenant_id == "acme"))
        assert version.hyperparams["procs"] == 2 and version.created_by_job_id == done["id"]


# ---- distill: the whole student on every rank ----------------------------------------------------

DISTILL = {"max_steps": 8, "checkpoint_every": 4, "batch_size": 2, "seq_len": 32, "eval_max_tokens": 128,
           "learning_rate": 3e-3}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """The 4-layer tiny teacher of the unit distill tests."""
    return save_tiny_model(tmp_path_factory.mktemp("dist-teacher") / "teacher", layers=4, hidden=64, seed=3)


@pytest.fixture
def losses(monkeypatch) -> list[float]:
    """The loss of every step this process (rank 0) takes, on one process or on several."""
    seen: list[float] = []
    for name in ("train_step", "sharded_step"):
        monkeypatch.setattr(distillation, name, _recording(getattr(distillation, name), seen))
    return seen


def _recording(step, seen: list[float]):
    def recorded(*args, **kwargs):
        out = step(*args, **kwargs)
        seen.append(out.loss.item())
        return out
    return recorded


def _distill(body: dict, job_id: str | None = None, worker: str = "host:1") -> dict:
    out = jobs.execute("distill", job_id or uuid.uuid4().hex, body, worker=worker)
    assert out["status"] == "succeeded", out
    return out["result"]


def _student_gap(a: dict, b: dict) -> float:
    """The largest difference between two distill jobs' students, in AdamW steps at the learning rate: float
    summation order changes tiny gradients a little, and Adam's normalised update turns that into up to ~1 %
    of a step on a few weights (a wrong gradient moves weights by whole steps)."""
    wa, wb = (load_file(str(data_root() / r["path"] / "model.safetensors")) for r in (a, b))
    return _same_weights(wa, wb) / DISTILL["learning_rate"]


def test_distill_on_two_gloo_processes_equals_one_process(pg_ledger, teacher_dir, losses):
    body = {"tenant": add_tenant(pg_ledger, "acme"), "teacher": str(teacher_dir), **DISTILL}
    one = _distill({**body, "procs": 1})
    one_losses = list(losses)
    del losses[:]
    two = _distill({**body, "procs": 2})
    assert len(one_losses) == len(losses) == DISTILL["max_steps"] and one_losses[-1] < one_losses[0]  # it trains
    assert losses == pytest.approx(one_losses, rel=1e-5, abs=1e-6)
    assert _student_gap(one, two) < 0.03
    assert (one["report"]["procs"], two["report"]["procs"]) == (1, 2)
    assert two["lineage"]["kept_layers"] == one["lineage"]["kept_layers"]
    assert two["report"]["final_kl"] == pytest.approx(one["report"]["final_kl"], rel=1e-5)
    assert two["report"]["trained_tokens"] == one["report"]["trained_tokens"] == 8 * 2 * 32
    assert not any((data_root() / "dist").glob("*"))  # the launch folder is removed after the job


def test_a_one_process_distill_checkpoint_resumes_on_two_processes(pg_ledger, teacher_dir, losses, monkeypatch):
    body = {"tenant": add_tenant(pg_ledger, "acme"), "teacher": str(teacher_dir), **DISTILL}  # no procs: the setting
    straight = _distill(body)
    straight_losses = list(losses)
    recording = distillation.train_step

    def dying(*args, **kwargs):
        out = recording(*args, **kwargs)
        if len(losses) == len(straight_losses) + 6:
            raise SystemExit("worker killed")  # two steps after the step-4 checkpoint, like a SIGKILL mid-step
        return out

    monkeypatch.setattr(distillation, "train_step", dying)
    job_id = uuid.uuid4().hex
    with pytest.raises(SystemExit):
        jobs.execute("distill", job_id, body, worker="host:1")
    with session_scope() as s:
        assert s.scalar(select(func.max(Checkpoint.step)).where(Checkpoint.job_id == job_id)) == 4

    monkeypatch.setenv("FOUNDRY_TRAIN_PROCS", "2")  # the host's restarted worker trains on two processes
    reset_settings()
    del losses[:]
    resumed = _distill(body, job_id, worker="host:2")  # the broker redelivers to it
    r = resumed["report"]
    assert r["resumed_from_step"] == 4 and r["procs"] == 2 and r["steps"] == DISTILL["max_steps"]
    assert losses == pytest.approx(straight_losses[4:], rel=1e-5, abs=1e-6)
    assert r["trained_tokens"] == straight["report"]["trained_tokens"]
    assert _student_gap(straight, resumed) < 0.03


# ---- distill with strategy fsdp: student and teacher sharded over the ranks -------------------------

def test_fsdp_distill_on_two_gloo_processes_equals_one_process(pg_ledger, teacher_dir, losses):
    """FSDP2 shards the student's weights, gradients and AdamW states, and the frozen teacher's weights, over
    the two ranks; the loss curve, the final student and the closing evaluation (the sharded teacher's
    forwards run on both ranks) are still the one-process ones."""
    body = {"tenant": add_tenant(pg_ledger, "acme"), "teacher": str(teacher_dir), **DISTILL}
    one = _distill({**body, "procs": 1})
    one_losses = list(losses)
    del losses[:]
    two = _distill({**body, "procs": 2, "strategy": "fsdp"})
    assert len(losses) == DISTILL["max_steps"] and losses[-1] < losses[0]
    assert losses == pytest.approx(one_losses, rel=1e-5, abs=1e-6)
    assert _student_gap(one, two) < 0.03
    assert (one["report"]["strategy"], two["report"]["strategy"]) == ("single", "fsdp")
    assert two["report"]["final_kl"] == pytest.approx(one["report"]["final_kl"], rel=1e-5)
    assert two["report"]["perplexity_student"] == pytest.approx(one["report"]["perplexity_student"], rel=1e-4)
    assert two["report"]["perplexity_teacher"] == pytest.approx(one["report"]["perplexity_teacher"], rel=1e-5)
    assert two["report"]["kl_divergence"] == pytest.approx(one["report"]["kl_divergence"], rel=1e-3, abs=1e-6)
    assert two["report"]["teacher_params"] == one["report"]["teacher_params"]
    whole, half = one["report"]["teacher_bytes_per_rank"], two["report"]["teacher_bytes_per_rank"]
    assert whole == 4 * one["report"]["teacher_params"]  # fp32 on the CPU
    assert whole / 2 <= half < whole / 2 * 1.05, (whole, half)  # rank 0's shards: half, plus shard padding
    assert not any((data_root() / "dist").glob("*"))


def test_an_fsdp_checkpoint_resumes_on_one_process_and_a_one_process_one_on_fsdp(pg_ledger, teacher_dir, losses,
                                                                                 monkeypatch):
    """Checkpoints are one format whatever wrote them: rank 0 gathers the sharded weights and optimizer state
    into the one-process form (parameters by index), and an fsdp run shards a one-process checkpoint."""
    body = {"tenant": add_tenant(pg_ledger, "acme"), "teacher": str(teacher_dir), **DISTILL}
    straight = _distill(body)
    straight_losses = list(losses)

    kill = {"at": None}  # the step count (losses seen) after which this worker is killed
    for name in ("train_step", "sharded_step"):
        def dying(*args, _step=getattr(distillation, name), **kwargs):
            out = _step(*args, **kwargs)
            if len(losses) == kill["at"]:
                kill["at"] = None
                raise SystemExit("worker killed")  # two steps after the step-4 checkpoint, like a SIGKILL mid-step
            return out
        monkeypatch.setattr(distillation, name, dying)

    written = {}  # procs → the step-4 checkpoint that run wrote
    for first, then in (({"procs": 2, "strategy": "fsdp"}, {"procs": 1}),
                        ({"procs": 1}, {"procs": 2, "strategy": "fsdp"})):
        del losses[:]
        kill["at"] = 6
        job_id = uuid.uuid4().hex
        with pytest.raises(SystemExit):
            jobs.execute("distill", job_id, {**body, **first}, worker="host:1")
        with session_scope() as s:
            [ckpt] = s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step == 4))
            written[first["procs"]] = checkpoints.read(data_root() / ckpt.path)
        del losses[:]
        resumed = _distill({**body, **then}, job_id, worker="host:2")  # the broker redelivers to it
        r = resumed["report"]
        assert r["resumed_from_step"] == 4 and r["procs"] == then["procs"], (first, then)
        assert losses == pytest.approx(straight_losses[4:], rel=1e-5, abs=1e-6), (first, then)
        assert r["trained_tokens"] == straight["report"]["trained_tokens"]
        assert _student_gap(straight, resumed) < 0.03, (first, then)

    # the gathered optimizer state is the one-process one, parameter by parameter: Adam's moments are the
    # gradients' running mean and mean square, so a gradient averaged over ranks instead of summed shows here
    fsdp, one = written[2].state["optimizer"], written[1].state["optimizer"]
    assert fsdp["param_groups"] == one["param_groups"] and fsdp["state"].keys() == one["state"].keys()
    for i, moments in one["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(fsdp["state"][i][name], moments[name], rtol=1e-3, atol=1e-7), (i, name)
    assert written[2].weights.keys() == written[1].weights.keys()


def test_a_soft_stop_of_an_fsdp_distill_checkpoints_on_every_rank_then_it_resumes(pg_ledger, teacher_dir, losses,
                                                                                   monkeypatch):
    """Only rank 0's worker is asked to stop; rank 0 broadcasts that, every rank takes part in gathering the
    soft-stop checkpoint, the helper leaves its loop cleanly, and the redelivery resumes from that step."""
    from domain.contract import SoftStop

    body = {"tenant": add_tenant(pg_ledger, "acme"), "teacher": str(teacher_dir), **DISTILL, "procs": 2,
            "strategy": "fsdp"}
    straight = _distill(body)
    straight_losses = list(losses)
    del losses[:]
    recording = distillation.sharded_step

    def stopping(*args, **kwargs):
        out = recording(*args, **kwargs)
        if len(losses) == 5:
            jobs.stop_requested.set()  # the worker is asked to shut down after step 5
        return out

    monkeypatch.setattr(distillation, "sharded_step", stopping)
    exits = []
    real_group = distillation.data_parallel.process_group

    @contextlib.contextmanager
    def watched(*args, **kwargs):
        with real_group(*args, **kwargs) as group:
            try:
                yield group
            finally:
                for k, p in enumerate(group.helpers, start=1):
                    exits.append(p.wait(timeout=30))  # the helper ends by itself, told to stop
                    logs.append(rank_agent.log_tail(group.workdir / f"rank-{k}.log", 3000))
    logs = []
    monkeypatch.setattr(distillation.data_parallel, "process_group", watched)
    job_id = uuid.uuid4().hex
    try:
        with pytest.raises(SoftStop):
            jobs.execute("distill", job_id, body, worker="host:1")
    finally:
        jobs.stop_requested.clear()
    assert exits == [0], logs
    with session_scope() as s:
        got = [(c.step, c.reason) for c in s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)
                                                     .order_by(Checkpoint.step))]
    assert got == [(4, "interval"), (5, "soft_stop")]
    monkeypatch.setattr(distillation, "sharded_step", recording)
    del losses[:]
    resumed = _distill(body, job_id, worker="host:2")
    assert resumed["report"]["resumed_from_step"] == 5
    assert losses == pytest.approx(straight_losses[5:], rel=1e-5, abs=1e-6)
    assert _student_gap(straight, resumed) < 0.03


def test_fsdp_with_fewer_rows_than_processes_is_refused_naming_batch_size(pg_ledger, teacher_dir):
    body = {"tenant": add_tenant(pg_ledger, "acme"), "teacher": str(teacher_dir), **DISTILL, "batch_size": 1,
            "procs": 2, "strategy": "fsdp"}
    out = jobs.execute("distill", uuid.uuid4().hex, body, worker="host:1")
    assert out["status"] == "rejected" and out["field"] == "batch_size", out  # an invalid job: not retried
    assert "strategy fsdp" in out["error"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_sigkill_of_one_distill_rank_fails_the_attempt_and_the_retry_resumes(env, tmp_path, teacher_dir, strategy):
    steps = 300
    body = {"tenant": "acme", "teacher": str(teacher_dir), **DISTILL, "max_steps": steps, "checkpoint_every": 10,
            "procs": 2, "strategy": strategy}
    done, step = _sigkill_rank_1_after_a_checkpoint(env, tmp_path, "distill", body)
    r = done["result"]["report"]
    assert r["steps"] == steps and r["resumed_from_step"] >= step > 0 and r["procs"] == 2
    assert r["trained_tokens"] == steps * 2 * 32  # the lost attempt's steps after its checkpoint counted once
    with session_scope() as s:
        [art] = s.scalars(select(Artifact).where(Artifact.created_by_job_id == done["id"]))
        assert art.kind == "distilled_model" and art.report["procs"] == 2 and art.report["strategy"] == strategy


def test_a_helper_rank_out_of_memory_fails_the_job_as_out_of_memory_not_rank_lost(base_dir, tmp_path):
    """A rank that runs out of memory is not a lost rank: a retry would fail the same way. Rank 1 (a real helper
    process) asks for LoRA matrices no host has memory for; rank 0's next collective breaks, and the group turns
    that into the out-of-memory failure, naming the rank."""
    import torch.distributed as dist
    from dataclasses import asdict

    from domain import data_parallel
    from domain.errors import JobFailed

    cfg = T.TrainConfig(**{**CFG, "lora_r": 2**36})  # ~2**36 x hidden floats per matrix: no allocator gives that
    launch = distributed.Launch(base_ref=str(base_dir), device="cpu", qlora=False, workdir=str(tmp_path / "w"))
    with pytest.raises(JobFailed) as err:
        with data_parallel.process_group("retrain", 2, launch.workdir, device="cpu",
                                         args={"launch": asdict(launch), "cfg": asdict(cfg)}, data={"batches": []}):
            dist.barrier()
    assert err.value.code == "out_of_memory", err.value
    assert "out of memory in rank 1 of retrain" in str(err.value) and "can't allocate memory" in str(err.value)
    assert not dist.is_initialized() and not (tmp_path / "w").exists()
