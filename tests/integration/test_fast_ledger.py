"""The hot-path statement runner (domain/ledger/db.py FastLedger) against the real PostgreSQL."""

from __future__ import annotations

import os
import uuid
from datetime import datetime, timezone

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import select

from domain.ledger import db, jobstore

pytestmark = pytest.mark.integration


def _enqueue(job_id: str, url: str) -> None:
    jobstore.record_enqueued(job_id, "noop", "acme", {"tenant": "acme"}, idempotency_key=None, priority=5,
                             queue="control", max_attempts=3, created_by="test", url=url)


def test_statements_errors_and_connection_reuse(pg_ledger):
    fast = db.fast_ledger(pg_ledger, durable=False)
    assert fast is not None and db.fast_ledger("sqlite:///x.db") is None
    job_id = uuid.uuid4().hex
    _enqueue(job_id, pg_ledger)
    assert fast.one("SELECT status, attempts FROM jobs WHERE id = %(id)s", {"id": job_id}) == ("queued", 0)
    assert fast.one("SELECT 1 WHERE false", {}) is None
    # a constraint violation is SQLAlchemy's IntegrityError, and the connection stays usable and pooled
    with pytest.raises(sa_exc.IntegrityError):
        fast.one(jobstore.ENQUEUE.postgresql, {"id": job_id, "kind": "noop", "tenant_id": "acme", "payload": "{}",
                                        "idempotency_key": None, "priority": 5, "queue": "control",
                                        "max_attempts": 3, "created_by": "t", "parent_job_id": None,
                                        "enqueued_at": datetime.now(timezone.utc)})
    assert len(fast._idle) == 1
    # a connection the server dropped: one OperationalError (what callers retry on), then fresh connections
    pid = fast.one("SELECT pg_backend_pid()", {})[0]
    db.fast_ledger(pg_ledger, durable=True).one("SELECT pg_terminate_backend(%(pid)s)", {"pid": pid})
    with pytest.raises(sa_exc.OperationalError):
        fast.one("SELECT 1", {})
    assert fast.one("SELECT 1", {}) == (1,)
    assert fast.one("SELECT pg_backend_pid()", {})[0] != pid
    # durability per runner: the claim/enqueue runner does not wait for the WAL flush, the finish runner does
    assert fast.one("SHOW synchronous_commit", {}) == ("off",)
    assert db.fast_ledger(pg_ledger, durable=True).one("SHOW synchronous_commit", {}) == ("on",)


def test_parameters_types_and_prepared_statements(pg_ledger):
    """The runner binds ``%(name)s`` parameters itself (a name used twice is one parameter), with psycopg's
    adapters both ways, and prepares each statement once per connection and parameter types."""
    fast = db.fast_ledger(pg_ledger, durable=False)
    fast.close()
    at = datetime(2026, 11, 30, 5, 6, 7, 891011, tzinfo=timezone.utc)
    row = fast.one("SELECT %(n)s::int + %(n)s::int, %(s)s::text, %(t)s::timestamptz, %(b)s::boolean, %(none)s::text, "
                   "CAST(%(j)s AS JSON), 100 %% 7", {"n": 21, "s": "é'x", "t": at, "b": True, "none": None, "j": '{"a": [1]}'})
    assert row == (42, "é'x", at, True, None, {"a": [1]}, 2)
    sql = "SELECT CAST(%(v)s AS BIGINT) IS NULL"
    for _ in range(3):
        assert fast.one(sql, {"v": None}) == (True,)
        assert fast.one(sql, {"v": 7}) == (False,)
    names = fast.one("SELECT array_agg(name::text ORDER BY name) FROM pg_prepared_statements", {})[0]
    assert len(fast._idle) == 1 and names == ["foundry_0", "foundry_1", "foundry_2", "foundry_3"]
    # an error in the statement itself reaches the caller as psycopg's; the runner goes on with new connections
    with pytest.raises(Exception, match="division by zero"):
        fast.one("SELECT 1 / %(z)s::int", {"z": 0})
    assert fast.one("SELECT %(x)s::int", {"x": 5}) == (5,)


def test_a_forked_child_leaves_the_parents_connections_alone(pg_ledger):
    """A prefork child calls dispose_all() (worker_process_init); that must not end the parent's sessions."""
    fast = db.fast_ledger(pg_ledger, durable=False)
    pid = fast.one("SELECT pg_backend_pid()", {})[0]
    # the child's gc.collect() must find only what dispose_all() left: garbage from earlier tests in this
    # process (a gloo ProcessGroup of an in-process distributed test) would run its destructor in the child,
    # which joins gloo threads the child does not have and hangs
    import gc

    gc.collect()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            db.dispose_all()
            import gc

            gc.collect()
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    assert fast.one("SELECT pg_backend_pid()", {})[0] == pid  # same session, still alive


def test_hot_path_reads_rows_by_key_on_a_ledger_without_statistics():
    """On a freshly migrated ledger (no statistics yet, as right after a deploy or in bench/queue_overhead.py)
    the prepared claim and finish statements must find their rows through the keys. The finish once updated
    the attempt row with ``job_id IN (SELECT id FROM j)``: planned on near-empty tables, that became a
    sequential scan of ``job_attempts`` on every finish, so each job cost more than the one before."""
    import time

    from sqlalchemy import create_engine, text

    from domain.ledger.migrate import upgrade
    from tests.conftest import add_tenant, throwaway_pg_database

    with throwaway_pg_database("foundry_fresh") as url:
        upgrade(url)
        add_tenant(url, "acme")
        n = 300
        for _ in range(n):
            job_id = uuid.uuid4().hex
            _enqueue(job_id, url)
            claim = jobstore.claim(job_id, "noop", "acme", {"tenant": "acme"}, "w:1", max_attempts=3,
                                   stale_after_s=60, url=url)
            assert claim.run
            assert jobstore.finish_success(job_id, claim.attempt, "w:1", {"ok": True}, url=url) == {"ok": True}
        db.dispose_all()  # the sessions end and flush their table statistics
        eng = create_engine(url)
        try:
            deadline = time.monotonic() + 10
            while True:
                with eng.connect() as conn:
                    rows = {r.relname: r for r in conn.execute(text(
                        "SELECT relname, seq_tup_read, idx_scan FROM pg_stat_user_tables "
                        "WHERE relname IN ('jobs', 'job_attempts')"))}
                if rows["job_attempts"].idx_scan >= n or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        finally:
            eng.dispose()
    assert rows["job_attempts"].idx_scan >= n  # each finish found its attempt row through the key
    # a scan per job would read about n²/2 rows (45,000 here); lookups by key read none
    assert rows["job_attempts"].seq_tup_read < n, rows
    assert rows["jobs"].seq_tup_read < n, rows


@pytest.fixture(params=["sqlite", "postgresql"])
def either_ledger(request):
    return request.getfixturevalue("sqlite_ledger" if request.param == "sqlite" else "pg_ledger")


def test_the_hot_path_statements_write_the_same_rows_on_both_dialects(either_ledger):
    """enqueue, claim and finish are one text each (jobstore.ENQUEUE/CLAIM/FINISH): one prepared round trip
    on PostgreSQL, their parts in one transaction on SQLite. Both must leave the same rows the ORM reads."""
    from decimal import Decimal

    from domain.ledger.db import session_scope
    from domain.ledger.models import Job, JobAttempt, Tenant, UsageCost
    from tests.conftest import add_tenant

    url = either_ledger
    add_tenant(url, "acme")
    job_id, other = uuid.uuid4().hex, uuid.uuid4().hex
    _enqueue(job_id, url)
    _enqueue(other, url)
    claim = jobstore.claim(job_id, "noop", "acme", {}, "w:1", max_attempts=3, stale_after_s=60, url=url)
    assert (claim.run, claim.attempt) == (True, 1)
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "wall_seconds": 0.5, "gpu_seconds": 0.0, "model_id": "m",
             "adapter_version_id": None, "cost": Decimal("0.000125"), "currency": "USD", "price_version": "p1"}
    assert jobstore.finish_success(job_id, 2, "w:1", {"x": 1}, usage=usage, url=url) is None  # not this attempt
    assert jobstore.finish_success(job_id, 1, "w:1", {"x": [1, "é"]}, usage=usage, url=url) == {"x": [1, "é"]}
    again = jobstore.claim(job_id, "noop", "acme", {}, "w:2", max_attempts=3, stale_after_s=60, url=url)
    assert (again.run, again.status, again.result) == (False, "succeeded", {"x": [1, "é"]})

    second = jobstore.claim(other, "noop", "acme", {}, "w:1", max_attempts=3, stale_after_s=60, url=url)

    def commit(s):
        s.add(Tenant(id="beta", display_name="made by the job"))  # the handler's own rows, same transaction
        return {"tenant": "beta"}

    assert jobstore.finish_success(other, second.attempt, "w:1", {"y": 2}, commit=commit, url=url) == \
        {"y": 2, "tenant": "beta"}
    with session_scope(url) as s:
        job = s.get(Job, job_id)
        assert (job.status, job.attempts, job.progress, job.result, job.progress_info) == ("succeeded", 1, 1.0, {"x": [1, "é"]}, {})
        assert job.payload == {"tenant": "acme"} and job.started_at is not None and job.finished_at >= job.started_at
        att = s.scalars(select(JobAttempt).where(JobAttempt.job_id == job_id)).one()
        assert (att.attempt, att.worker, att.outcome) == (1, "w:1", "succeeded") and att.finished_at is not None
        cost = s.scalars(select(UsageCost).where(UsageCost.job_id == job_id)).one()
        assert (cost.tenant_id, cost.kind, cost.prompt_tokens, cost.cost, cost.price_version) == \
            ("acme", "noop", 7, Decimal("0.000125"), "p1")
        assert s.get(Job, other).result == {"y": 2, "tenant": "beta"}
        assert s.get(Tenant, "beta").display_name == "made by the job"
        assert s.scalars(select(UsageCost).where(UsageCost.job_id == other)).first() is None
