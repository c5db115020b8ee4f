"""The daily costs roll-up on PostgreSQL: cost reports read the same figures before and after it, today's
usage stays live, a closed day is rolled up once even by two sweeps at once, and the view reads the
roll-up (not every usage row) for the days it holds."""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from sqlalchemy import func, select, text

from domain import costs
from domain.ledger.db import session_scope
from domain.ledger.models import Job, Rollup, UsageCost, UsageDaily
from tests.conftest import add_tenant

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 20, 9, 30, tzinfo=timezone.utc)


def _usage(tenant: str, at: datetime, tokens: int, kind: str = "review", model: str = "m1") -> None:
    job_id = uuid.uuid4().hex
    with session_scope() as s:
        s.add(Job(id=job_id, kind=kind, tenant_id=tenant, status="succeeded"))
        s.flush()
        s.add(UsageCost(job_id=job_id, tenant_id=tenant, kind=kind, model_id=model, prompt_tokens=tokens,
                        completion_tokens=tokens // 2, wall_seconds=1.5, cost=Decimal(tokens) / 1000, created_at=at))


@pytest.fixture
def usage(pg_ledger):
    for t in ("acme", "other"):
        add_tenant(pg_ledger, t)
    for day in range(5, 0, -1):  # five closed days, two tenants, two kinds; one row a second before midnight
        at = NOW.replace(hour=12) - timedelta(days=day)
        _usage("acme", at, 1000 * day)
        _usage("acme", at + timedelta(hours=1), 10, kind="index", model="embedder")
        _usage("other", at, 7)
    _usage("acme", NOW.replace(hour=0, minute=0) - timedelta(seconds=1), 3)  # yesterday, 23:59:59 UTC
    _usage("acme", NOW - timedelta(minutes=5), 500)  # today: stays live
    return pg_ledger


def test_cost_reports_read_the_same_figures_after_the_roll_up(usage):
    since = (NOW - timedelta(days=30)).date()
    before = {by: costs.cost_report(by, tenant="acme", since=since) for by in costs.REPORT_GROUPS}
    all_time = costs.cost_report("tenant")

    done = costs.roll_up_costs(NOW)

    assert done["from"] == str((NOW - timedelta(days=5)).date()) and done["through"] == str((NOW - timedelta(days=1)).date())
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(UsageDaily)) == done["rows"] == 5 * 3
        assert s.get(Rollup, costs.ROLLUP).through == (NOW - timedelta(days=1)).date()
    assert {by: costs.cost_report(by, tenant="acme", since=since) for by in costs.REPORT_GROUPS} == before
    assert costs.cost_report("tenant") == all_time

    _usage("acme", NOW, 40)  # a new row today shows at once
    today = [r for r in costs.cost_report("day", tenant="acme") if r["day"] == str(NOW.date())]
    assert today[0]["prompt_tokens"] == 540 and today[0]["jobs"] == 2


def test_a_day_is_rolled_up_once_and_only_when_closed(usage):
    assert costs.roll_up_costs(NOW.replace(hour=0, minute=30))["through"] == str((NOW - timedelta(days=2)).date())
    # within the grace hour after midnight the day that just ended is not closed yet
    assert costs.roll_up_costs(NOW.replace(hour=0, minute=59))["rows"] == 0
    second = costs.roll_up_costs(NOW)
    assert second["from"] == second["through"] == str((NOW - timedelta(days=1)).date())
    assert costs.roll_up_costs(NOW)["rows"] == 0  # nothing new

    results = []
    later = NOW + timedelta(days=1)
    _usage("acme", NOW - timedelta(minutes=1), 11)
    threads = [threading.Thread(target=lambda: results.append(costs.roll_up_costs(later))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["rows"] for r in results) == [0, 1]  # the second sweep waited on the mark and found it moved
    with session_scope() as s:
        rolled = s.scalar(select(func.sum(UsageDaily.jobs)).where(UsageDaily.tenant_id == "acme"))
        assert rolled == s.scalar(select(func.count()).select_from(UsageCost).where(UsageCost.tenant_id == "acme"))


def test_the_view_reads_the_roll_up_for_the_days_it_holds(usage):
    costs.roll_up_costs(NOW)
    with session_scope() as s:
        s.execute(text("ANALYZE usage_costs"))
        s.execute(text("ANALYZE usage_daily"))
        plan = "\n".join(r[0] for r in s.execute(text(
            "EXPLAIN SELECT day, SUM(cost) FROM v_costs_daily WHERE tenant_id = 'acme' GROUP BY day")))
    assert "usage_daily" in plan
    # the live branch is bounded by the mark: only days after it are read from usage_costs
    assert "rollups" in plan
