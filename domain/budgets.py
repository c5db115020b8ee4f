"""Per-tenant budgets: daily and monthly limits in tokens (prompt + completion) and in money.

Budgets live on the ``tenants`` row (None = unlimited). ``check_budget`` runs before a review
generates anything: the tenant's spend so far in the current UTC day and month (from ``usage_costs``)
plus the job's worst case (its prompt tokens + ``max_new_tokens``, priced by the price table) must stay
within every limit, otherwise the job is rejected (``InvalidJob(code="over_budget")``) with the numbers
in the message. Jobs running concurrently are not reserved against each other: a burst of parallel
jobs can overshoot a limit by at most those jobs' own usage.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from domain.costs import Usage, price
from domain.errors import InvalidJob
from domain.ledger.db import session_scope
from domain.ledger.models import Tenant, UsageCost

LIMITS = ("daily_token_budget", "monthly_token_budget", "daily_cost_budget", "monthly_cost_budget")


@dataclass
class Spend:
    tokens: int
    cost: Decimal


def period_starts(now: datetime | None = None) -> tuple[datetime, datetime]:
    """Start of the current UTC day and month."""
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return day, day.replace(day=1)


def spent(session: Session, tenant: str, since: datetime) -> Spend:
    tokens, cost = session.execute(
        select(func.coalesce(func.sum(UsageCost.prompt_tokens + UsageCost.completion_tokens), 0),
               func.coalesce(func.sum(UsageCost.cost), 0))
        .where(UsageCost.tenant_id == tenant, UsageCost.created_at >= since)).one()
    return Spend(int(tokens or 0), Decimal(str(cost or 0)))


def budget_status(tenant: str, now: datetime | None = None, url: str | None = None) -> dict:
    """Limits and spend of the current day and month. Raises LookupError for an unknown tenant."""
    day, month = period_starts(now)
    with session_scope(url) as s:
        row = s.get(Tenant, tenant)
        if row is None:
            raise LookupError(f"unknown tenant {tenant!r}")
        today, this_month = spent(s, tenant, day), spent(s, tenant, month)
        return {"tenant": tenant, **{k: getattr(row, k) for k in LIMITS},
                "day_start": day, "month_start": month,
                "tokens_today": today.tokens, "cost_today": today.cost,
                "tokens_this_month": this_month.tokens, "cost_this_month": this_month.cost}


def check_budget(tenant: str, estimate: Usage | None = None, prices: dict | None = None,
                 now: datetime | None = None, url: str | None = None) -> None:
    """Raise ``InvalidJob(code="over_budget", field="tenant")`` if the tenant's spend so far plus this
    job's worst-case ``estimate`` would pass any of its limits. Unknown tenants pass (checked elsewhere)."""
    try:
        status = budget_status(tenant, now, url)
    except LookupError:
        return
    if all(status[k] is None for k in LIMITS):
        return
    need_tokens = estimate.tokens if estimate else 0
    need_cost = price(estimate, prices or {})[0] if estimate else Decimal(0)
    checks = [
        ("daily", "token", status["daily_token_budget"], status["tokens_today"], need_tokens),
        ("monthly", "token", status["monthly_token_budget"], status["tokens_this_month"], need_tokens),
        ("daily", "cost", status["daily_cost_budget"], status["cost_today"], need_cost),
        ("monthly", "cost", status["monthly_cost_budget"], status["cost_this_month"], need_cost),
    ]
    for period, unit, limit, used, need in checks:
        if limit is None:
            continue
        over = used >= limit if not need else used + need > limit
        if over:
            extra = f"; this job needs up to {need}" if need else ""
            raise InvalidJob(f"tenant: {tenant!r} is over its {period} {unit} budget: used {used} of {limit}{extra} "
                             f"(raise it with `foundry budget set --tenant {tenant} --{period}-{unit}{'s' if unit == 'token' else ''} ...`)",
                             field="tenant", code="over_budget")


_KEEP = object()


def set_budget(tenant: str, *, daily_tokens=_KEEP, monthly_tokens=_KEEP, daily_cost=_KEEP, monthly_cost=_KEEP,
               url: str | None = None) -> dict:
    """Change some limits (None clears one: unlimited); the others keep their value."""
    values = dict(zip(LIMITS, (daily_tokens, monthly_tokens, daily_cost, monthly_cost)))
    with session_scope(url) as s:
        row = s.get(Tenant, tenant, with_for_update=True)
        if row is None:
            raise LookupError(f"unknown tenant {tenant!r} (create it with `foundry tenants add {tenant}`)")
        for name, value in values.items():
            if value is _KEEP:
                continue
            if value is not None:
                value = int(value) if "token" in name else Decimal(str(value))
                if value < 0:
                    raise ValueError(f"{name} must be >= 0")
            setattr(row, name, value)
    return budget_status(tenant, url=url)
