"""Fault injection: SIGKILL workers mid-job (every job kind), and a flooded queue with worker restarts.

Real Redis + PostgreSQL, real `celery worker` processes; the ML kinds run on a tiny random model saved
to disk (FOUNDRY_BASE_MODEL) and the index on the fast lexical embedder. After each fault: every job
finished exactly once (one succeeded attempt, costs once, one artifact/version/review), none lost,
and the ledger consistency checker finds nothing wrong.

The broker's visibility timeout is the production one (derived from FOUNDRY_LONGEST_JOB_S: hours), not
the 4 s of the other worker tests, which would hand a killed worker's messages back by itself: here the
jobs come back only through beat's sweeps (``lost_sweep``: running jobs with a stale heartbeat handed back,
queued jobs without a live message sent again), run by the test every few seconds with a short
FOUNDRY_STALE_AFTER_S, as beat would with a short FOUNDRY_STRANDED_SWEEP_S.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select, update

from domain import consistency
from domain.ledger.db import session_scope
from domain.ledger.models import AdapterVersion, Artifact, Job, JobAttempt, Review
from tests.conftest import add_tenant
from tests.fixtures.adapters import seed_feedback, stdlib_review_pairs
from tests.fixtures.tiny_models import save_tiny_model
from tests.integration.test_faults_kit import fault_summary, lost_sweep, record, tally, wait_final  # noqa: F401
from tests.integration.workers import apply_env, start_worker, worker_env

pytestmark = pytest.mark.integration

ALL_QUEUES = ["review", "retrain", "quantize", "distill", "index", "control"]
STALE_S, SWEEP_S = 5, 3  # FOUNDRY_STALE_AFTER_S, and how often the test runs beat's sweeps


@pytest.fixture
def env(redis_url, pg_ledger, tmp_path, monkeypatch):
    base = save_tiny_model(tmp_path / "tiny-base", layers=2, hidden=64)
    e = worker_env(redis_url, pg_ledger, tmp_path, FOUNDRY_BASE_MODEL=str(base), FOUNDRY_DEVICE="cpu",
                   FOUNDRY_EMBEDDING_MODEL="hashing:64", OMP_NUM_THREADS="1", FOUNDRY_HEALTH_INTERVAL_S="2",
                   FOUNDRY_VISIBILITY_TIMEOUT_S="0", FOUNDRY_STALE_AFTER_S=str(STALE_S))
    apply_env(monkeypatch, e)
    from domain.config import get_settings

    assert get_settings().visibility_timeout > 6 * 3600  # the production value: no redelivery by kombu

    add_tenant(pg_ledger, "acme")
    return e


def seed_training_feedback(n: int = 8) -> None:
    """Accepted reviews to train on, with the attempt rows a real review job would have left."""
    seed_feedback("acme", stdlib_review_pairs(n, max_code_lines=8))
    with session_scope() as s:
        for jid in s.scalars(select(Job.id).where(Job.created_by == "test")):
            s.add(JobAttempt(job_id=jid, attempt=1, worker="seed", outcome="succeeded"))
        s.execute(update(Job).where(Job.created_by == "test").values(attempts=1))


def bodies(base: str) -> dict[str, dict]:
    """One job per kind, each a few seconds long on this CPU."""
    return {
        "noop": {"tenant": "acme", "sleep_s": 8, "cost_tokens": 7},
        "review": {"tenant": "acme", "code": "def add(a, b):\n    return a - b\n", "max_new_tokens": 8,
                   "use_retrieval": False},
        "index": {"tenant": "acme", "action": "add",
                  "documents": [{"id": f"d{i}", "text": f"def f{i}(x):\n    return x * {i}\n", "language": "python"}
                                for i in range(40)]},
        "retrain": {"tenant": "acme", "max_steps": 40, "batch_size": 2, "max_seq_len": 128, "lora_r": 4,
                    "checkpoint_every": 5, "target_modules": ["q_proj", "v_proj"], "promotion_margin": 0.0},
        "distill": {"tenant": "acme", "teacher": base, "max_steps": 60, "checkpoint_every": 10, "batch_size": 2,
                    "seq_len": 32, "eval_max_tokens": 128},
        "quantize": {"tenant": "acme", "source_model": base, "method": "nf4", "eval_max_tokens": 512},
    }


def statuses(ids: dict[str, str]) -> dict[str, str]:
    with session_scope() as s:
        rows = dict(s.execute(select(Job.id, Job.status).where(Job.id.in_(list(ids.values())))).all())
    return {kind: rows.get(jid) for kind, jid in ids.items()}


def errors(ids: dict[str, str]) -> dict:
    with session_scope() as s:
        return {k: (j.status, j.error_code, (j.error or "")[:300]) for k, jid in ids.items() if (j := s.get(Job, jid))}


def assert_made_once(ids: dict[str, str]) -> None:
    with session_scope() as s:
        for kind, jid in ids.items():
            reviews = s.scalar(select(func.count()).select_from(Review).where(Review.job_id == jid))
            versions = s.scalar(select(func.count()).select_from(AdapterVersion)
                                .where(AdapterVersion.created_by_job_id == jid))
            artifacts = s.scalar(select(func.count()).select_from(Artifact).where(Artifact.created_by_job_id == jid))
            expected = {"review": (1, 0, 0), "retrain": (0, 1, 1), "quantize": (0, 0, 1), "distill": (0, 0, 1),
                        "index": (0, 0, 1), "noop": (0, 0, 0)}[kind]
            assert (reviews, versions, artifacts) == expected, (kind, reviews, versions, artifacts)


def release_stale_restore_mutex(env) -> bool:
    """A worker SIGKILLed while it held kombu's ``unacked_mutex`` (taken every restore interval to move
    unacknowledged messages past the visibility timeout back to their queue) blocks every redelivery
    until the lock expires: ``unacked_mutex_expire`` defaults to 300 s. Production should set it near
    the restore interval (reported); here we drop a lock whose holder is dead, as that setting would."""
    import redis

    r = redis.Redis.from_url(env["FOUNDRY_BROKER_URL"])
    return bool(r.delete("unacked_mutex"))


def start_workers(env, kinds) -> dict:
    """One solo-pool worker per kind (as deployed: a long job owns its process), started in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    queue = {k: ("control" if k == "noop" else k) for k in kinds}
    with ThreadPoolExecutor(len(kinds)) as pool:
        futures = {k: pool.submit(start_worker, env, [queue[k]], "solo", 1, f"{k}-{time.time_ns() % 10**6}@%h")
                   for k in kinds}
        return {k: f.result() for k, f in futures.items()}


def test_sigkill_mid_job_for_every_kind(env):
    """Six workers (one per kind) are SIGKILLed while their jobs run; new workers finish every job once."""
    from worker.client import enqueue

    seed_training_feedback()
    base = env["FOUNDRY_BASE_MODEL"]
    work = bodies(base)
    t0 = time.monotonic()
    workers = start_workers(env, list(work))
    print(f"workers ready in {time.monotonic() - t0:.1f}s")
    try:
        ids = {kind: enqueue(kind, body) for kind, body in work.items()}
        deadline = time.monotonic() + 90
        seen = []
        while time.monotonic() < deadline:  # kill once most kinds are mid-job
            st = statuses(ids)
            seen.append((round(time.monotonic() - deadline + 90, 1), st))
            if sum(v == "running" for v in st.values()) >= 4:
                break
            time.sleep(0.1)
    finally:
        for w in workers.values():
            w.kill()
    # read after the kill: a job that finished in between was not killed mid-job
    running_at_kill = sorted(k for k, v in statuses(ids).items() if v == "running")
    print(f"killed at {time.monotonic() - t0:.1f}s with {running_at_kill} running")
    mutex = release_stale_restore_mutex(env)
    assert len(running_at_kill) >= 3, seen[::10]
    old = workers
    workers = start_workers(env, list(work))
    print(f"new workers ready at {time.monotonic() - t0:.1f}s")
    handed_back: list[str] = []
    try:
        try:
            wait_final(list(ids.values()), timeout=180, sweep=lost_sweep(handed_back, []), sweep_every_s=SWEEP_S)
        except AssertionError:
            for kind, w in {**{f"old-{k}": v for k, v in old.items()}, **workers}.items():
                print(f"==== {kind} worker log\n{w.output()[-2500:]}")
            raise
        print(f"all final at {time.monotonic() - t0:.1f}s")
    finally:
        for w in workers.values():
            w.stop()
    t = tally(list(ids.values()))
    record("SIGKILL worker mid-job, all kinds", t, f"running at kill: {','.join(running_at_kill)}"
           + ("; restore mutex released" if mutex else ""))
    assert statuses(ids) == dict.fromkeys(ids, "succeeded"), errors(ids)
    assert t.finished_once == len(ids) and t.lost == 0 and t.duplicated == 0
    with session_scope() as s:
        for kind in running_at_kill:
            outcomes = [a.outcome for a in s.scalars(select(JobAttempt).where(JobAttempt.job_id == ids[kind])
                                                     .order_by(JobAttempt.attempt))]
            assert outcomes[0] == "lost" and outcomes[-1] == "succeeded", (kind, outcomes)
    assert {ids[k] for k in running_at_kill} <= set(handed_back)  # back through the sweep, not the broker
    assert_made_once(ids)
    report = consistency.check()
    assert report.ok, report.to_dict()


def _flood(env, n: int, workers: int, kills: int, timeout: float) -> None:
    from domain.ledger import jobstore
    from worker.client import celery_app

    # Enqueue like worker.client.enqueue does (ledger row, then message), in bulk.
    app = celery_app()
    ids = []
    t0 = time.monotonic()
    with app.producer_or_acquire() as producer:
        for i in range(n):
            jid = f"flood-{i:05d}-{time.time_ns() % 10**9}"
            jobstore.record_enqueued(jid, "noop", "acme", {"tenant": "acme", "cost_tokens": 1}, idempotency_key=None,
                                     priority=5, queue="control", max_attempts=3, created_by="test")
            app.send_task("foundry.noop", args=[{"tenant": "acme", "cost_tokens": 1}], task_id=jid, queue="control",
                          producer=producer)
            ids.append(jid)
    enqueue_s = time.monotonic() - t0
    procs = [start_worker(env, queues=["control"], pool="threads", concurrency=4) for _ in range(workers)]
    try:
        for k in range(kills):  # let them work, then kill one and start a replacement
            target = n * (k + 1) // (kills + 2)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                with session_scope() as s:
                    done = s.scalar(select(func.count()).select_from(Job).where(Job.id.in_(ids),
                                                                                  Job.status == "succeeded"))
                if done >= target:
                    break
                time.sleep(0.1)
            victim = procs.pop(0)
            (victim.kill if k % 2 == 0 else victim.stop)()  # SIGKILL, then a warm restart
            release_stale_restore_mutex(env)
            procs.append(start_worker(env, queues=["control"], pool="threads", concurrency=4))
        # beat's sweeps: the running jobs of a SIGKILLed worker are handed back; a message it had taken
        # (BRPOP) but not recorded as unacknowledged, or held unstarted, is sent again
        resent: list[str] = []
        handed_back: list[str] = []
        wait_final(ids, timeout=timeout, sweep=lost_sweep(handed_back, resent), sweep_every_s=SWEEP_S)
    finally:
        for p in procs:
            p.stop()
    t = tally(ids)
    record(f"{n} queued noop jobs, {kills} worker restarts", t,
           f"enqueued in {enqueue_s:.1f}s; {len(handed_back)} handed back, {len(resent)} stranded re-sent")
    assert t.finished_once == n and t.lost == 0 and t.duplicated == 0, t
    report = consistency.check(check_files=False)
    assert report.ok, report.to_dict()


def test_flooded_queue_1k_with_worker_restarts(env):
    _flood(env, 1000, workers=2, kills=2, timeout=150)


@pytest.mark.slow
def test_flooded_queue_10k_with_worker_restarts(env):
    _flood(env, 10_000, workers=2, kills=4, timeout=900)
