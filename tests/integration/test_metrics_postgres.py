"""The cost counter on PostgreSQL with concurrent writers: usage rows that commit out of id order (a
transaction holding id 10 commits after the one holding id 11) are still counted, each exactly once."""

from __future__ import annotations

import random
import threading
import time
import uuid
from decimal import Decimal

from sqlalchemy import func, select

from domain import metrics
from domain.ledger.db import session_scope
from domain.ledger.models import Job, UsageCost
from tests.conftest import add_tenant


def _jobs(n: int) -> list[str]:
    ids = [uuid.uuid4().hex for _ in range(n)]
    with session_scope() as s:
        s.add_all(Job(id=i, kind="noop", tenant_id="acme", status="succeeded") for i in ids)
    return ids


def _usage(job_id: str, tokens: int) -> UsageCost:
    return UsageCost(job_id=job_id, tenant_id="acme", kind="noop", prompt_tokens=tokens, completion_tokens=0,
                     cost=Decimal(tokens) / 1000)


def tokens(m: metrics.LedgerMetrics) -> float:
    return m.registry.get_sample_value("foundry_tokens_total", {"tenant": "acme"}) or 0


def test_a_row_committed_after_a_higher_id_is_counted(pg_ledger):
    add_tenant(pg_ledger, "acme")
    first, second = _jobs(2)
    m = metrics.LedgerMetrics()
    m.refresh_ledger(pg_ledger)
    with session_scope() as early:
        early.add(_usage(first, 7))
        early.flush()  # takes the lower id, commits last
        with session_scope() as late:
            late.add(_usage(second, 5))
        m.refresh_ledger(pg_ledger)
        assert tokens(m) == 5
    m.refresh_ledger(pg_ledger)
    assert tokens(m) == 12
    m.refresh_ledger(pg_ledger)
    assert tokens(m) == 12  # once
    assert m.registry.get_sample_value("foundry_cost_total", {"tenant": "acme", "currency": "USD"}) == 0.012


def test_concurrent_writers_and_scrapes_count_every_row_once(pg_ledger):
    add_tenant(pg_ledger, "acme")
    writers, per_writer = 6, 20
    job_ids = _jobs(writers * per_writer)
    m = metrics.LedgerMetrics()
    done = threading.Event()

    def write(mine: list[str], seed: int) -> None:
        rnd = random.Random(seed)
        for job_id in mine:
            with session_scope() as s:
                s.add(_usage(job_id, rnd.randint(1, 100)))
                s.flush()  # the id is taken now ...
                time.sleep(rnd.random() * 0.02)  # ... and the commit lands later, after others' higher ids

    threads = [threading.Thread(target=write, args=(job_ids[i::writers], i)) for i in range(writers)]
    for t in threads:
        t.start()

    def scrape() -> None:
        while not done.is_set():
            m.refresh_ledger(pg_ledger)
            time.sleep(0.005)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    for t in threads:
        t.join()
    done.set()
    scraper.join()
    m.refresh_ledger(pg_ledger)
    with session_scope() as s:
        expected = s.scalar(select(func.sum(UsageCost.prompt_tokens)))
        rows = s.scalar(select(func.count()).select_from(UsageCost))
    assert rows == writers * per_writer
    assert tokens(m) == expected
