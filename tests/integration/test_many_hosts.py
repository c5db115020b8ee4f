"""Workers on several hosts: two workers as two hosts (own data folder, own node name) that share only
Redis and PostgreSQL (and, further down, the artifact store).

The broker's visibility timeout is the production one here (derived from FOUNDRY_LONGEST_JOB_S: about
7.5 hours), not the 4 s of the other worker tests: a 4 s timeout would hand a dead worker's message back by
itself and hide whether Foundry does. Heartbeat, stale-after and sweep periods are short but real: the
claim under test is "a dead worker's job runs again within FOUNDRY_STALE_AFTER_S + one sweep".
"""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
import redis
from sqlalchemy import func, select, update

from domain.ledger.db import session_scope
from domain.ledger.models import HealthEvent, Job, JobAttempt, UsageCost, utcnow
from tests.conftest import add_tenant
from tests.integration.test_faults_kit import wait_final
from tests.integration.workers import (
    apply_env,
    running_beat,
    running_worker,
    start_worker,
    worker_env,
)
from worker import maintenance
from worker.client import enqueue

pytestmark = pytest.mark.integration

STALE_S, SWEEP_S = 6, 3


PRODUCTION_TIMING = {"heartbeat": 10, "stale": 60, "sweep": 60}  # domain/config.py defaults


def host_env(redis_url: str, pg_url: str, root, host: str, *, heartbeat=1, stale=STALE_S, sweep=SWEEP_S,
             **extra) -> dict:
    """One host's worker environment: its own data folder, the shared Redis and PostgreSQL, the production
    visibility timeout and kombu's own restore interval."""
    return worker_env(redis_url, pg_url, root / host, FOUNDRY_VISIBILITY_TIMEOUT_S="0", FOUNDRY_RESTORE_INTERVAL_S="10",
                      FOUNDRY_HEARTBEAT_S=str(heartbeat), FOUNDRY_STALE_AFTER_S=str(stale),
                      FOUNDRY_STRANDED_SWEEP_S=str(sweep), FOUNDRY_BEAT_TICK_S="3600", **extra)


def two_hosts(redis_url, pg_url, tmp_path, monkeypatch, **timing) -> tuple[dict, dict]:
    a, b = (host_env(redis_url, pg_url, tmp_path, h, **timing) for h in ("host-a", "host-b"))
    apply_env(monkeypatch, a)
    from domain.config import get_settings

    assert get_settings().visibility_timeout > 6 * 3600  # the production value, not a test's 4 s
    add_tenant(pg_url, "acme")
    return a, b


@pytest.fixture
def hosts(redis_url, pg_ledger, tmp_path, monkeypatch):
    return two_hosts(redis_url, pg_ledger, tmp_path, monkeypatch)


def wait_for(what: str, check, timeout: float, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def job_row(job_id: str) -> Job:
    with session_scope() as s:
        return s.get(Job, job_id)


def unacked_message(r: redis.Redis, job_id: str) -> tuple[bytes, list] | None:
    for tag, raw in r.hgetall("unacked").items():
        entry = json.loads(raw)
        if entry[0]["headers"]["id"] == job_id:
            return tag, entry
    return None


def broker_holds(r: redis.Redis, job_id: str) -> bool:
    lists = [k for k in r.keys("control*") if r.type(k) == b"list"]
    queued = any(json.loads(m)["headers"]["id"] == job_id for k in lists for m in r.lrange(k, 0, -1))
    return queued or unacked_message(r, job_id) is not None


def test_a_dead_hosts_job_runs_again_on_another_host_within_stale_after_plus_one_sweep(hosts, tmp_path):
    dead_host_job_comes_back(*hosts, tmp_path, stale=STALE_S, sweep=SWEEP_S)


@pytest.mark.slow
def test_with_every_production_default_a_dead_hosts_job_runs_again_within_3_minutes(redis_url, pg_ledger, tmp_path,
                                                                                     monkeypatch):
    a_env, b_env = two_hosts(redis_url, pg_ledger, tmp_path, monkeypatch, **PRODUCTION_TIMING)
    back_after = dead_host_job_comes_back(a_env, b_env, tmp_path, stale=60, sweep=60, sleep_s=30)
    assert back_after < 180


def dead_host_job_comes_back(a_env: dict, b_env: dict, tmp_path, *, stale: float, sweep: float,
                             sleep_s: float = 12) -> float:
    """SIGKILL host A mid-job, start host B (and beat): the job runs again on B, finishes once, and the
    original message, pushed back late, is skipped. Returns the seconds from the kill to B's attempt."""
    r = redis.Redis.from_url(a_env["FOUNDRY_BROKER_URL"])
    job_id = enqueue("noop", {"tenant": "acme", "sleep_s": sleep_s, "cost_tokens": 5})
    a = start_worker(a_env, queues=["control"], name="a@host-a")
    try:
        wait_for("the job runs on host A", lambda: (job_row(job_id).worker or "").startswith("a@host-a"), 60)
        original = unacked_message(r, job_id)
        assert original is not None  # held by A, unacknowledged, as kombu does for acks_late
    finally:
        a.kill()  # SIGKILL of the whole worker: no ack, no reject, the message stays in the unacked hash
    killed = time.monotonic()

    with running_worker(b_env, queues=["control"], name="b@host-b"), running_beat(b_env, tmp_path / "host-b"):
        b_ready = time.monotonic() - killed
        wait_for("the job runs again on host B", lambda: (job_row(job_id).worker or "").startswith("b@host-b"),
                 stale + 2 * sweep + b_ready + 30)
        back_after = time.monotonic() - killed
        wait_final([job_id], timeout=sleep_s + 60)

        # the original message, had it stayed in the unacked hash, would come back after the visibility
        # timeout: push it back as kombu's restore would, and the claim skips the finished job
        assert unacked_message(r, job_id) is None  # restored by the sweep: it will not come back by itself
        r.rpush("control", json.dumps(original[1][0]))
        wait_for("the late copy is consumed", lambda: not broker_holds(r, job_id), 30)

    print(f"job running again {back_after:.1f} s after the SIGKILL (stale after {stale} s, sweep {sweep} s, "
          f"host B ready after {b_ready:.1f} s)")
    job = job_row(job_id)
    assert (job.status, job.attempts) == ("succeeded", 2) and job.worker.startswith("b@host-b")
    with session_scope() as s:
        trail = s.execute(select(JobAttempt.attempt, JobAttempt.outcome, JobAttempt.worker)
                          .where(JobAttempt.job_id == job_id).order_by(JobAttempt.attempt)).all()
        assert [(n, o) for n, o, _ in trail] == [(1, "lost"), (2, "succeeded")]
        assert trail[0].worker.startswith("a@host-a") and trail[1].worker.startswith("b@host-b")
        assert s.scalar(select(func.count()).select_from(UsageCost).where(UsageCost.job_id == job_id)) == 1
        event = s.scalars(select(HealthEvent).where(HealthEvent.event == "lost_job_handed_back")).one()
        assert event.detail["job_ids"] == [job_id] and event.detail["how"] == {job_id: "restored"}
    return back_after


def test_a_live_slow_job_is_never_taken_from_its_worker(hosts, tmp_path):
    """A job running for several stale-after periods keeps its heartbeat fresh and stays with its worker; a
    job whose heartbeat is stale but which a live worker lists as active is not taken either."""
    a_env, b_env = hosts
    slow = enqueue("noop", {"tenant": "acme", "sleep_s": 4 * STALE_S, "cost_tokens": 1})
    with running_worker(a_env, queues=["control"], name="a@host-a"):
        wait_for("the slow job runs on A", lambda: job_row(slow).status == "running", 60)
        with running_worker(b_env, queues=["control"], pool="threads", concurrency=2, name="b@host-b"), \
                running_beat(b_env, tmp_path / "host-b"):
            listed = enqueue("noop", {"tenant": "acme", "sleep_s": 20})  # runs on B (A is busy), which answers inspect
            wait_for("the second job runs on B", lambda: (job_row(listed).worker or "").startswith("b@host-b"), 60)
            with session_scope() as s:  # as if B's heartbeats had not been written for minutes
                s.execute(update(Job).where(Job.id == listed).values(heartbeat_at=utcnow() - timedelta(minutes=5)))
                s.add(Job(id="ghost", kind="noop", tenant_id="acme", payload={"tenant": "acme"}, status="running",
                          queue="control", attempts=1, worker="gone@host-z:1",
                          heartbeat_at=utcnow() - timedelta(minutes=5)))
            judged = maintenance.hand_back_lost_running(stale_after_s=60, dry_run=True)["handed_back"]
            assert judged == ["ghost"]  # stale too, but listed by B as active: not B's job
            wait_final([slow, listed], timeout=90)
    with session_scope() as s:
        for jid in (slow, listed):
            assert (s.get(Job, jid).status, s.get(Job, jid).attempts) == ("succeeded", 1)
        assert s.scalar(select(func.count()).select_from(JobAttempt)
                        .where(JobAttempt.job_id.in_([slow, listed]), JobAttempt.outcome == "lost")) == 0
    assert job_row(slow).worker.startswith("a@host-a")


# ---- hosts sharing the artifact store -----------------------------------------------------------------

TRAIN = {"max_seq_len": 256, "batch_size": 2, "lora_r": 4, "target_modules": ["q_proj", "v_proj"],
         "learning_rate": 5e-3, "promotion_margin": 0.0, "max_steps": 8}


@pytest.fixture
def store_hosts(redis_url, pg_ledger, tmp_path, monkeypatch, s3_store):
    """Hosts A and B with their own data and cache folders, sharing Redis, PostgreSQL and an S3 store;
    the tiny base model lies on each host (the base is part of a host's image, not of the store)."""
    from tests.fixtures.adapters import seed_feedback, stdlib_review_pairs
    from tests.fixtures.tiny_models import save_tiny_model

    store = {k: v for k, v in s3_store.items() if k.startswith(("FOUNDRY_", "AWS_"))}
    envs = []
    for host in ("host-a", "host-b"):
        base = save_tiny_model(tmp_path / host / "models" / "tiny-base")
        envs.append(host_env(redis_url, pg_ledger, tmp_path, host, FOUNDRY_BASE_MODEL=base, FOUNDRY_DEVICE="cpu",
                             OMP_NUM_THREADS="1", FOUNDRY_CACHE_DIR=str(tmp_path / host / "cache"), **store))
    apply_env(monkeypatch, envs[0])
    add_tenant(pg_ledger, "acme")
    seed_feedback("acme", stdlib_review_pairs(8, max_code_lines=8))
    return envs


@pytest.mark.slow  # a real retrain and a review in worker processes: about 2.5 minutes on 2 busy cores
def test_a_retrain_on_host_a_serves_reviews_on_host_b(store_hosts, tmp_path):
    from domain.adapters import store as adapter_store
    from domain.ledger.models import AdapterAlias, AdapterVersion
    from worker.client import wait

    a_env, b_env = store_hosts
    with running_worker(a_env, queues=["retrain"], name="a@host-a"):
        trained = wait(enqueue("retrain", {"tenant": "acme", **TRAIN}), timeout=300)
    assert trained["status"] == "succeeded", trained
    version_id = trained["result"]["version_id"]
    with session_scope() as s:
        if not trained["result"]["promoted"]:  # the gate's verdict does not matter here: promote it by hand
            adapter_store.move_alias(s, "acme", "champion", version_id, "test", "serve it on host B")
        version = s.get(AdapterVersion, version_id)
        assert s.get(AdapterAlias, ("acme", "champion")).version_id == version_id
        key, sha = version.artifact_path, version.artifact_sha256
    assert (tmp_path / "host-a" / key).is_dir() and not (tmp_path / "host-b" / key).exists()

    with running_worker(b_env, queues=["review"], pool="threads", concurrency=2, name="b@host-b"):
        review_id = enqueue("review", {"tenant": "acme", "code": "def add(a, b):\n    return a - b\n",
                                       "max_new_tokens": 8, "use_retrieval": False})
        reviewed = wait(review_id, timeout=180)
    assert reviewed["status"] == "succeeded", reviewed
    assert reviewed["result"]["adapter_version_id"] == version_id
    cached = tmp_path / "host-b" / "cache" / "objects" / sha
    assert (cached / adapter_store.WEIGHTS_FILE).is_file()  # fetched into B's cache, verified by the ledger's sha
    assert not (tmp_path / "host-b" / key).exists()  # B never wrote it under its data folder
    with session_scope() as s:
        assert s.get(Job, review_id).worker.startswith("b@host-b")


def _docs(prefix: str, n: int) -> list[dict]:
    return [{"id": f"{prefix}{i}", "text": f"def {prefix}_handler_{i}(event):\n    return event['{prefix}{i}']\n",
             "language": "python"} for i in range(n)]


@pytest.fixture
def index_hosts(redis_url, pg_ledger, tmp_path, monkeypatch, s3_store):
    """Host A runs an index worker; this test process is host B (its own data and cache folders)."""
    store = {k: v for k, v in s3_store.items() if k.startswith(("FOUNDRY_", "AWS_"))}
    common = dict(FOUNDRY_EMBEDDING_MODEL="hashing:64", OMP_NUM_THREADS="1", **store)
    a = host_env(redis_url, pg_ledger, tmp_path, "host-a", FOUNDRY_CACHE_DIR=str(tmp_path / "host-a" / "cache"), **common)
    b = host_env(redis_url, pg_ledger, tmp_path, "host-b", FOUNDRY_CACHE_DIR=str(tmp_path / "host-b" / "cache"), **common)
    apply_env(monkeypatch, b)
    from domain import storage
    from domain.config import reset_settings
    from domain.retrieval import reader

    reset_settings()
    storage._stores.clear()
    storage._caches.clear()
    reader.forget()
    add_tenant(pg_ledger, "acme")
    yield a, b
    reader.forget()


def test_an_index_built_on_host_a_is_searched_on_host_b_and_new_versions_reach_it(index_hosts, tmp_path):
    from domain import storage
    from domain.retrieval import reader, snapshots
    from worker.client import wait

    a_env, _ = index_hosts
    with running_worker(a_env, queues=["index"], name="a@host-a"):
        first = wait(enqueue("index", {"tenant": "acme", "action": "add", "documents": _docs("alpha", 12)}), timeout=120)
        assert first["status"] == "succeeded", first
        v1 = reader.current_snapshot("acme")  # host B: fetched from the store into its cache
        assert v1 is not None and v1.version == 1 and (tmp_path / "host-b" / "cache") in v1.folder.parents
        assert not (tmp_path / "host-b" / "index").exists()
        assert reader.search(v1, "alpha_handler_3 event", k=1)[0].chunk["document_id"] == "alpha3"

        second = wait(enqueue("index", {"tenant": "acme", "action": "add", "documents": _docs("beta", 5)}), timeout=120)
        assert second["status"] == "succeeded", second
        time.sleep(snapshots.POINTER_POLL_S + 0.1)
        v2 = reader.current_snapshot("acme")  # the same reader, no restart: the new version
        assert v2.version == 2 and reader.search(v2, "beta_handler_4 event", k=1)[0].chunk["document_id"] == "beta4"

        # a corrupt object in the store: host B keeps serving v2, with a health event naming the version
        store = storage.get_store()
        third = wait(enqueue("index", {"tenant": "acme", "action": "add", "documents": _docs("gamma", 3)}), timeout=120)
        assert third["status"] == "succeeded", third
        store.fs.pipe_file(store.path("index/acme/v3/chunks.jsonl"), b'{"tampered": true}\n')
        time.sleep(snapshots.POINTER_POLL_S + 0.1)
        assert reader.current_snapshot("acme").version == 2
    with session_scope() as s:
        events = s.scalars(select(HealthEvent).where(HealthEvent.component.in_(["index", "store"]))).all()
        assert {"corrupt", "object_corrupt"} <= {e.event for e in events}
        assert any(e.detail.get("version") == 3 and e.detail.get("serving_version") == 2 for e in events)


@pytest.mark.slow  # about 100 s: each attempt waits out the store's retries
def test_a_job_whose_store_stops_is_retried_and_succeeds_only_with_its_object(index_hosts, s3_store):
    """The store goes away while host A builds an index: the upload is retried with backoff, the attempt ends
    as a transient failure (health event), nothing is recorded as succeeded; the store comes back and the
    next attempt succeeds with its object stored and verified."""
    from domain import storage
    from domain.ledger.models import Artifact
    from worker.client import wait

    server = s3_store["server"]
    if server.external:
        pytest.skip("a real S3 endpoint (FOUNDRY_TEST_S3_URL) cannot be stopped by the test")
    a_env, _ = index_hosts
    with running_worker(a_env, queues=["index"], name="a@host-a"):
        server.stop()
        try:
            job_id = enqueue("index", {"tenant": "acme", "action": "add", "documents": _docs("delta", 6)})
            wait_for("an attempt fails on the unreachable store", lambda: _attempt_outcomes(job_id), 120, every=0.5)
            with session_scope() as s:
                job = s.get(Job, job_id)
                assert job.status in ("queued", "running") and job.error_code == "store_unavailable", job.error
                assert s.scalar(select(func.count()).select_from(Artifact)
                                .where(Artifact.created_by_job_id == job_id)) == 0
        finally:
            server.start()
        done = wait(job_id, timeout=180)
    assert done["status"] == "succeeded", done
    with session_scope() as s:
        artifact = s.scalars(select(Artifact).where(Artifact.created_by_job_id == job_id)).one()
        unreachable = s.scalars(select(HealthEvent).where(HealthEvent.component == "store",
                                                          HealthEvent.event == "unreachable")).all()
    assert unreachable and s3_store["AWS_SECRET_ACCESS_KEY"] not in str([e.message for e in unreachable])
    manifest = storage.get_store().manifest(artifact.path)
    assert manifest.accepts(artifact.sha256)  # the ledger's sha256 names the stored object


def _attempt_outcomes(job_id: str) -> list:
    with session_scope() as s:
        return s.scalars(select(JobAttempt.outcome).where(JobAttempt.job_id == job_id,
                                                          JobAttempt.outcome.is_not(None))).all()


def _adapter_weights(version_id: str) -> dict:
    """A version's adapter weights as the store holds them (fetched into this process's cache, verified)."""
    from safetensors.torch import load_file

    from domain import storage
    from domain.adapters import store as adapter_store
    from domain.ledger.models import AdapterVersion

    with session_scope() as s:
        v = s.get(AdapterVersion, version_id)
        key, sha, tenant = v.artifact_path, v.artifact_sha256, v.tenant_id
    return load_file(str(storage.fetch_tree(key, sha, tenant=tenant) / adapter_store.WEIGHTS_FILE))


def _recorded_checkpoints(job_id: str) -> list:
    from domain.ledger.models import Checkpoint

    with session_scope() as s:
        return s.execute(select(Checkpoint.step, Checkpoint.path, Checkpoint.sha256)
                         .where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)).all()


@pytest.mark.slow  # two worker starts, a beat and two retrains in worker processes: about 85 s on 2 busy cores
def test_a_retrain_killed_on_host_a_resumes_on_host_b_from_the_checkpoint_a_stored(store_hosts, tmp_path, pg_ledger):
    """Host A is SIGKILLed mid-retrain (production visibility timeout: kombu would hold its message for hours);
    beat's stale-running sweep hands the job back, host B fetches A's last stored checkpoint from the store,
    resumes from it and ends with the weights of an uninterrupted run of the same spec, with one usage row."""
    import torch

    from domain.config import get_settings
    from tests.fixtures.adapters import seed_feedback, stdlib_review_pairs
    from worker.client import wait

    assert get_settings().visibility_timeout > 6 * 3600
    a_env, b_env = store_hosts
    add_tenant(pg_ledger, "twin")  # the same feedback: the uninterrupted reference run
    seed_feedback("twin", stdlib_review_pairs(8, max_code_lines=8))
    body = {**TRAIN, "max_steps": 40, "checkpoint_every": 5}
    job_id = enqueue("retrain", {"tenant": "acme", **body})
    a = start_worker(a_env, queues=["retrain"], name="a@host-a")
    try:
        wait_for("host A records a stored checkpoint", lambda: _recorded_checkpoints(job_id), 120, every=0.1)
    finally:
        a.kill()
    killed = time.monotonic()
    assert job_row(job_id).status == "running", a.output()[-3000:]
    stored_by_a = _recorded_checkpoints(job_id)[-1]
    assert not (tmp_path / "host-b" / stored_by_a.path).exists()
    twin_id = enqueue("retrain", {"tenant": "twin", **body})  # B runs it while A's job waits to be judged lost

    # beat sends its sweep to the control queue: host B consumes it too, as a deployment has some worker do
    with running_worker(b_env, queues=["retrain", "control"], name="b@host-b") as b, running_beat(b_env, tmp_path / "host-b"):
        try:
            done = wait(job_id, timeout=180)
        except TimeoutError:
            row = job_row(job_id)
            beat_log = (tmp_path / "host-b" / "beat.log").read_text(errors="replace")
            raise AssertionError(f"{row.status} {row.worker} {row.progress_info} {row.error}\n{b.output()[-4000:]}"
                                 f"\n---- beat\n{beat_log[-3000:]}") from None
        recovered_s = time.monotonic() - killed
        reference = wait(twin_id, timeout=60)
    assert done["status"] == "succeeded" and reference["status"] == "succeeded", (done, reference)
    assert recovered_s < 180
    result = done["result"]
    assert result["steps"] == 40 and result["resumed_from_step"] >= stored_by_a.step > 0
    resumed_from = next(c for c in _recorded_checkpoints(job_id) if c.step == result["resumed_from_step"])
    assert (tmp_path / "host-b" / "cache" / "objects" / resumed_from.sha256).is_dir()  # fetched by B, verified
    with session_scope() as s:
        trail = s.execute(select(JobAttempt.outcome, JobAttempt.worker).where(JobAttempt.job_id == job_id)
                          .order_by(JobAttempt.attempt)).all()
        assert [o for o, _ in trail] == ["lost", "succeeded"] and trail[1].worker.startswith("b@host-b")
        assert s.scalar(select(func.count()).select_from(UsageCost).where(UsageCost.job_id == job_id)) == 1
    assert result["train_loss_final"] == pytest.approx(reference["result"]["train_loss_final"], rel=1e-5)
    resumed, whole = _adapter_weights(result["version_id"]), _adapter_weights(reference["result"]["version_id"])
    assert resumed.keys() == whole.keys() and resumed
    for name, tensor in whole.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6)
    print(f"resumed on host B from step {result['resumed_from_step']}, succeeded {recovered_s:.1f} s after the SIGKILL")
