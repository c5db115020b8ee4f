"""Tenant budgets: daily/monthly limits in tokens and money, checked against the ledger's usage."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from domain.budgets import budget_status, check_budget, period_starts, set_budget
from domain.config import DEFAULT_PRICES
from domain.costs import Usage
from domain.errors import InvalidJob
from domain.ledger.db import session_scope
from domain.ledger.models import Job, UsageCost
from tests.conftest import add_tenant

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)


def spend(tenant: str, tokens: int, cost: str, at: datetime) -> None:
    with session_scope() as s:
        job = Job(id=uuid.uuid4().hex, kind="review", tenant_id=tenant, status="succeeded")
        s.add(job)
        s.flush()
        s.add(UsageCost(job_id=job.id, tenant_id=tenant, kind="review", prompt_tokens=tokens // 2,
                        completion_tokens=tokens - tokens // 2, cost=Decimal(cost), created_at=at))


def test_periods_are_utc_day_and_month():
    day, month = period_starts(NOW)
    assert day == datetime(2026, 11, 23, tzinfo=timezone.utc) and month == datetime(2026, 11, 1, tzinfo=timezone.utc)


def test_unlimited_and_unknown_tenants_pass(sqlite_ledger):
    add_tenant(sqlite_ledger, "free")
    spend("free", 10**9, "1000", NOW)
    check_budget("free", Usage(prompt_tokens=10**6), DEFAULT_PRICES, now=NOW)
    check_budget("nobody", Usage(prompt_tokens=10**6), DEFAULT_PRICES, now=NOW)


def test_daily_token_budget_counts_today_only_and_the_jobs_worst_case(sqlite_ledger):
    add_tenant(sqlite_ledger, "acme", daily_token_budget=1000)
    spend("acme", 900, "0.01", NOW - timedelta(hours=2))
    spend("acme", 5000, "0.01", NOW - timedelta(days=1))  # yesterday: not today's budget
    check_budget("acme", None, DEFAULT_PRICES, now=NOW)  # 900 < 1000
    check_budget("acme", Usage(prompt_tokens=60, completion_tokens=40), DEFAULT_PRICES, now=NOW)  # exactly 1000
    with pytest.raises(InvalidJob) as err:
        check_budget("acme", Usage(prompt_tokens=60, completion_tokens=41), DEFAULT_PRICES, now=NOW)
    assert err.value.code == "over_budget" and err.value.field == "tenant"
    assert "daily token budget: used 900 of 1000; this job needs up to 101" in str(err.value)
    spend("acme", 100, "0", NOW - timedelta(minutes=1))
    with pytest.raises(InvalidJob, match="used 1000 of 1000"):
        check_budget("acme", None, DEFAULT_PRICES, now=NOW)


def test_monthly_cost_budget_prices_the_estimate(sqlite_ledger):
    add_tenant(sqlite_ledger, "acme", monthly_cost_budget=Decimal("1.00"))
    spend("acme", 10, "0.999", NOW - timedelta(days=10))
    spend("acme", 10, "50", NOW - timedelta(days=40))  # last month
    # 1000 prompt tokens at 0.0005/1k = 0.0005 → 0.9995 ≤ 1.00
    check_budget("acme", Usage(prompt_tokens=1000), DEFAULT_PRICES, now=NOW)
    with pytest.raises(InvalidJob, match="monthly cost budget"):  # + 2000 completion tokens at 0.0015/1k
        check_budget("acme", Usage(prompt_tokens=1000, completion_tokens=2000), DEFAULT_PRICES, now=NOW)


def test_set_and_show(sqlite_ledger):
    add_tenant(sqlite_ledger, "acme")
    status = set_budget("acme", daily_tokens=5000, monthly_cost="12.5")
    assert status["daily_token_budget"] == 5000 and status["monthly_cost_budget"] == Decimal("12.5")
    status = set_budget("acme", daily_tokens=None)  # cleared; the cost budget is kept
    assert status["daily_token_budget"] is None and status["monthly_cost_budget"] == Decimal("12.5")
    spend("acme", 300, "0.25", datetime.now(timezone.utc))
    now = budget_status("acme")
    assert (now["tokens_today"], now["cost_this_month"]) == (300, Decimal("0.25"))
    with pytest.raises(LookupError):
        set_budget("ghost", daily_tokens=1)
    with pytest.raises(ValueError):
        set_budget("acme", daily_tokens=-1)
