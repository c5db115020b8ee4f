"""Priority on the Redis broker: with jobs waiting, a worker takes priority 9 before 5 before 0.

Jobs are enqueued while no worker consumes, so they all wait in the broker; one worker with concurrency 1
then takes them one at a time, and the ledger's start times show the order it chose.
"""

from __future__ import annotations

from sqlalchemy import select

from domain.ledger.db import session_scope
from domain.ledger.models import Job
from tests.integration.test_faults_kit import wait_final
from tests.integration.workers import running_worker
from worker.client import enqueue


def _start_order(job_ids: list[str]) -> list[str]:
    with session_scope() as s:
        rows = s.execute(select(Job.id, Job.started_at).where(Job.id.in_(job_ids))).all()
    assert all(started is not None for _, started in rows)
    return [job_id for job_id, _ in sorted(rows, key=lambda r: r.started_at)]


def test_higher_priority_jobs_start_first(env):
    low = [enqueue("noop", {"tenant": "acme", "priority": 0}) for _ in range(3)]
    mid = [enqueue("noop", {"tenant": "acme"}) for _ in range(2)]  # the default priority, 5
    high = [enqueue("noop", {"tenant": "acme", "priority": 9}) for _ in range(3)]
    with running_worker(env, ["control"], concurrency=1):
        wait_final(low + mid + high, timeout=90)
    order = _start_order(low + mid + high)
    assert set(order[:3]) == set(high)
    assert set(order[3:5]) == set(mid)
    assert set(order[5:]) == set(low)
    assert order[:3] == high and order[5:] == low  # equal priorities keep their arrival order

