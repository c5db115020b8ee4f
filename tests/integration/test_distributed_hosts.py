"""Data-parallel training across hosts: rank 0 in this process ("host A": its own data folder,
``FOUNDRY_TRAIN_LOCAL_PROCS=1``), rank 1 started by a rank agent (``foundry rank-agent``) running as its own
process for "host B" (its own data folder and cache); both share only Redis (the broker) and the S3 store
(moto's server). gloo on the CPU, one thread per rank.

- A retrain on the two hosts follows the one-process run (the same loss at every step, the same adapter),
  also when it resumes from a one-process checkpoint (fetched on host B from the store).
- A distill job on the two hosts likewise.
- Two real workers as two hosts (host B's with FOUNDRY_TRAIN_RANK_AGENT=1): SIGKILL of the rank host B runs
  fails the attempt as ``rank_lost`` (retried) and the retry, again on both hosts, resumes from the checkpoint
  and succeeds.
- Remote ranks needed and no agent running: the attempt ends within FOUNDRY_TRAIN_RENDEZVOUS_S as a retry
  (``no_rank_agent``), its requests withdrawn and its launch objects removed; remote ranks with a broker that is
  not Redis are refused as an invalid job (rejected, ``field: procs``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from domain import jobs, rank_agent, storage
from domain.config import reset_settings
from domain.errors import TransientError
from domain.ledger.db import session_scope
from domain.ledger.models import AdapterVersion, Checkpoint, JobAttempt
from tests.conftest import add_tenant
from tests.fixtures.adapters import seed_feedback, stdlib_review_pairs
from tests.integration.test_distributed import (  # noqa: F401 - fixtures
    CFG,
    DISTILL,
    _distill,
    _same_weights,
    _student_gap,
    _train,
    base_dir,
    losses,
    one_thread,
    teacher_dir,
)
from tests.integration.workers import apply_env, running_worker, wait_for_value, worker_env

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _store_env(s3_store: dict) -> dict:
    return {k: v for k, v in s3_store.items() if k.startswith(("FOUNDRY_", "AWS_"))}


@pytest.fixture
def host_a(redis_url, s3_store, tmp_path, monkeypatch) -> dict:
    """This process as host A: the shared Redis and store, its own data folder, one local rank."""
    env = {"FOUNDRY_BROKER_URL": redis_url, "FOUNDRY_DATA_DIR": str(tmp_path / "host-a"), "FOUNDRY_DEVICE": "cpu",
           "FOUNDRY_TRAIN_LOCAL_PROCS": "1", **_store_env(s3_store)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    reset_settings()
    storage._stores.clear()
    storage._caches.clear()
    yield env
    reset_settings()


@pytest.fixture
def agent(host_a, tmp_path, s3_store):
    """``foundry rank-agent`` as host B: its own data folder and cache, the same Redis and store."""
    b = tmp_path / "host-b"
    env = {**os.environ, **host_a, "FOUNDRY_DATA_DIR": str(b), "FOUNDRY_CACHE_DIR": str(b / "cache"),
           "FOUNDRY_TRAIN_LOCAL_PROCS": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p)}
    b.mkdir(parents=True)
    log = b / "agent.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "rank-agent"], env=env, cwd=str(ROOT),
                                stdout=out, stderr=subprocess.STDOUT)
    proc.log = log
    yield proc
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _launch_objects_left(s3_store: dict) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_store["server"].endpoint, region_name="us-east-1")
    got = s3.list_objects_v2(Bucket=s3_store["bucket"], Prefix="store/dist/")
    return [o["Key"] for o in got.get("Contents", [])]


def _requests_left(redis_url: str) -> int:
    return redis.Redis.from_url(redis_url).llen(rank_agent.QUEUE)


def test_a_retrain_on_two_hosts_equals_one_process(base_dir, tmp_path, agent, redis_url, s3_store):  # noqa: F811
    one, w_one = _train(base_dir, 1, tmp_path / "w1", save_at=tmp_path / "step-6")
    two, w_two = _train(base_dir, 2, tmp_path / "host-a" / "dist" / "job-two")
    assert len(one.losses) == len(two.losses) == CFG["max_steps"] and one.losses[-1] < one.losses[0]
    assert two.losses == pytest.approx(one.losses, rel=1e-5, abs=1e-6)
    assert _same_weights(w_one, w_two) < 1e-5
    assert "started rank 1 of retrain job job-two" in agent.log.read_text()  # rank 1 ran on host B

    # the one-process checkpoint at step 6 continued on the two hosts: host B fetches it from the store
    resumed, w_resumed = _train(base_dir, 2, tmp_path / "host-a" / "dist" / "job-resumed", resume=tmp_path / "step-6")
    assert resumed.losses == pytest.approx(one.losses, rel=1e-5, abs=1e-6)
    assert _same_weights(w_one, w_resumed) < 1e-5
    assert "started rank 1 of retrain job job-resumed" in agent.log.read_text()

    assert _launch_objects_left(s3_store) == [] and _requests_left(redis_url) == 0
    deadline = time.monotonic() + 10  # the agent removes its rank's folder once the helper has exited
    while any((tmp_path / "host-b" / "dist").glob("*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any((tmp_path / "host-b" / "dist").glob("*"))


def test_a_distill_on_two_hosts_equals_one_process(pg_ledger, teacher_dir, losses, host_a, agent):  # noqa: F811
    body = {"tenant": add_tenant(pg_ledger, "acme"), "teacher": str(teacher_dir), **DISTILL}
    one = _distill({**body, "procs": 1})
    one_losses = list(losses)
    del losses[:]
    job_id = uuid.uuid4().hex
    two = _distill({**body, "procs": 2}, job_id)
    assert losses == pytest.approx(one_losses, rel=1e-5, abs=1e-6)
    assert _student_gap(one, two) < 0.03
    assert two["report"]["procs"] == 2
    assert f"started rank 1 of distill job {job_id}" in agent.log.read_text()


def test_remote_ranks_without_an_agent_fail_the_attempt_as_a_retry(pg_ledger, teacher_dir, host_a, monkeypatch,  # noqa: F811
                                                                   redis_url, s3_store, base_dir, tmp_path):  # noqa: F811
    monkeypatch.setenv("FOUNDRY_TRAIN_RENDEZVOUS_S", "3")
    reset_settings()
    t0 = time.monotonic()
    with pytest.raises(TransientError) as caught:
        _train(base_dir, 2, tmp_path / "host-a" / "dist" / "job-alone")
    assert caught.value.code == "no_rank_agent" and time.monotonic() - t0 < 30
    assert "no rank agent took rank(s) 1" in str(caught.value) and "FOUNDRY_TRAIN_RANK_AGENT" in str(caught.value)

    body = {"tenant": add_tenant(pg_ledger, "acme"), "teacher": str(teacher_dir), **DISTILL, "procs": 2}
    job_id = uuid.uuid4().hex
    with pytest.raises(jobs.RetryLater):
        jobs.execute("distill", job_id, body, worker="host-a:1")
    with session_scope() as s:
        [attempt] = s.scalars(select(JobAttempt).where(JobAttempt.job_id == job_id))
    assert attempt.outcome == "retry" and "no rank agent took" in attempt.error
    assert _launch_objects_left(s3_store) == [] and _requests_left(redis_url) == 0  # withdrawn, removed
    assert not any((tmp_path / "host-a" / "dist").glob("*"))


def test_remote_ranks_need_a_redis_broker(pg_ledger, teacher_dir, host_a, monkeypatch):  # noqa: F811
    monkeypatch.setenv("FOUNDRY_BROKER_URL", "filesystem://")
    reset_settings()
    body = {"tenant": add_tenant(pg_ledger, "acme"), "teacher": str(teacher_dir), **DISTILL, "procs": 2}
    out = jobs.execute("distill", uuid.uuid4().hex, body, worker="host-a:1")
    assert out["status"] == "rejected" and out["field"] == "procs", out  # an invalid job: not retried
    assert "not Redis" in out["error"]


@pytest.fixture
def worker_hosts(redis_url, pg_ledger, tmp_path, monkeypatch, base_dir, s3_store):  # noqa: F811
    """Host A's worker takes retrain jobs and starts one rank itself; host B's runs a rank agent."""
    common = dict(FOUNDRY_BASE_MODEL=base_dir, FOUNDRY_DEVICE="cpu", OMP_NUM_THREADS=1, FOUNDRY_VISIBILITY_TIMEOUT_S=0,
                  FOUNDRY_RESTORE_INTERVAL_S=10, **_store_env(s3_store))
    a = worker_env(redis_url, pg_ledger, tmp_path / "host-a", FOUNDRY_TRAIN_LOCAL_PROCS=1, **common)
    b = worker_env(redis_url, pg_ledger, tmp_path / "host-b", FOUNDRY_TRAIN_RANK_AGENT=1, FOUNDRY_TRAIN_LOCAL_PROCS=0,
                   **common)
    apply_env(monkeypatch, a)
    add_tenant(pg_ledger, "acme")
    seed_feedback("acme", stdlib_review_pairs(10, max_code_lines=8))
    return a, b


def test_a_remote_rank_out_of_memory_fails_the_job_as_out_of_memory_not_rank_lost(base_dir, agent, tmp_path):  # noqa: F811
    """Rank 1 runs on host B (started by its rank agent) and asks for LoRA matrices no host has memory for: it
    says so in rank 0's rendezvous store before it exits, so rank 0 fails the job as out of memory, naming the
    rank, instead of retrying a rank it believes lost."""
    from dataclasses import asdict

    import torch.distributed as dist

    from domain import data_parallel
    from domain.adapters import distributed
    from domain.adapters import training as T
    from domain.errors import JobFailed

    cfg = T.TrainConfig(**{**CFG, "lora_r": 2**36})
    workdir = tmp_path / "host-a" / "dist" / "job-oom"
    launch = distributed.Launch(base_ref=str(base_dir), device="cpu", qlora=False, workdir=str(workdir))
    with pytest.raises(JobFailed) as err:
        with data_parallel.process_group("retrain", 2, workdir, device="cpu",
                                         args={"launch": asdict(launch), "cfg": asdict(cfg)}, data={"batches": []}):
            dist.barrier()
    assert err.value.code == "out_of_memory", err.value
    assert "out of memory in rank 1 of retrain" in str(err.value) and "can't allocate memory" in str(err.value)
    assert "started rank 1 of retrain job job-oom" in agent.log.read_text()  # it ran on host B
    assert not dist.is_initialized() and not workdir.exists()


def test_sigkill_of_the_remote_rank_fails_the_attempt_and_the_retry_resumes(worker_hosts, tmp_path):
    from worker.client import enqueue, wait

    a, b = worker_hosts
    body = {"tenant": "acme", **CFG, "max_steps": 200, "checkpoint_every": 10, "promotion_margin": 0.0, "procs": 2}
    job_id = enqueue("retrain", body)
    pid_file = tmp_path / "host-b" / "dist" / f"{job_id}-rank1" / "rank-1.pid"
    with running_worker(b, queues=["control"], name="b@host-b") as wb, \
            running_worker(a, queues=["retrain"], name="a@host-a") as wa:
        def checkpointed():
            with session_scope() as s:
                return s.scalar(select(func.max(Checkpoint.step)).where(Checkpoint.job_id == job_id))

        wait_for_value("rank-1 process on host B", pid_file.exists, 300, wa, wb)
        step = wait_for_value("checkpoint", checkpointed, 300, wa, wb)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        try:
            done = wait(job_id, timeout=600)
        except TimeoutError:
            raise AssertionError(f"{wa.output()[-4000:]}\n----\n{wb.output()[-4000:]}") from None
    assert done["status"] == "succeeded", done
    with session_scope() as s:
        attempts = list(s.scalars(select(JobAttempt).where(JobAttempt.job_id == job_id).order_by(JobAttempt.attempt)))
        [version] = s.scalars(select(AdapterVersion).where(AdapterVersion.tenant_id == "acme"))
        assert version.hyperparams["procs"] == 2
    assert [x.outcome for x in attempts] == ["retry", "succeeded"]
    assert "rank 1 on another host" in attempts[0].error and "last checkpoint" in attempts[0].error
    assert done["result"]["steps"] == 200 and done["result"]["resumed_from_step"] >= step > 0


def test_an_agent_without_a_free_gpu_puts_an_nccl_rank_back_and_rank_0_sees_no_agent(host_a, tmp_path):
    """An nccl rank needs a GPU of its own (one rank per GPU): an agent on a host with none free leaves the
    request in the list and starts nothing, so rank 0 never sees it taken and ends the attempt as
    ``no_rank_agent`` (retried) instead of waiting for a rank that cannot run."""
    import threading

    from domain.config import get_settings
    from domain.paths import data_root

    settings = get_settings()
    request = {"launch": "dist/x/y", "job_id": "j", "kind": "retrain", "rank": 1, "backend": "nccl",
               "expires": time.time() + 60}
    with pytest.raises(rank_agent.NoFreeGpu, match="needs a GPU"):  # every GPU this host could have is in use
        rank_agent.start(request, settings, set(range(64)))
    if rank_agent.free_gpu(set()) is not None:
        pytest.skip("this host has a free GPU: the agent would take the rank")
    stop = threading.Event()
    agent = threading.Thread(target=rank_agent.serve, args=(settings, stop, 0.2), daemon=True)
    agent.start()
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "data.pt").write_bytes(b"")
    try:
        t0 = time.monotonic()
        requests = rank_agent.Requests.send(settings, "job-nccl", {"kind": "retrain", "backend": "nccl", "args": {}},
                                            tmp_path / "w", {}, range(1, 2))
        with pytest.raises(TransientError) as err:
            requests.wait_taken(deadline=time.monotonic() + 3)
        requests.close()
        assert err.value.code == "no_rank_agent" and time.monotonic() - t0 < 10
    finally:
        stop.set()
        agent.join(timeout=10)
    assert not agent.is_alive() and not (data_root() / "dist").exists()


def test_an_agent_claims_only_what_it_can_run_and_drops_expired_requests(redis_url):
    """``claim`` against the real Redis: the expired request is dropped, the nccl one (no GPU free here)
    stays for another agent, the first runnable one is taken, and of two agents claiming it one gets it."""
    import json

    r = redis.Redis.from_url(redis_url)
    now = time.time()
    expired = json.dumps({"launch": "dist/a/1", "job_id": "a", "rank": 1, "backend": "gloo", "expires": now - 1})
    nccl = json.dumps({"launch": "dist/b/1", "job_id": "b", "rank": 1, "backend": "nccl", "expires": now + 60})
    gloo = json.dumps({"launch": "dist/c/1", "job_id": "c", "rank": 1, "backend": "gloo", "expires": now + 60})
    r.rpush(rank_agent.QUEUE, expired, nccl, gloo)
    every_gpu_busy = set(range(64))
    assert rank_agent.claim(r, every_gpu_busy) == gloo.encode()
    assert rank_agent.claim(redis.Redis.from_url(redis_url), every_gpu_busy) is None  # the second agent: nothing
    assert r.lrange(rank_agent.QUEUE, 0, -1) == [nccl.encode()]
