"""Pricing and the cost report behind `foundry audit costs` (by tenant, day, adapter)."""

from __future__ import annotations

import uuid
from datetime import date, datetime, timezone
from decimal import Decimal

import pytest

from domain.costs import Usage, cost_report, price, usage_row
from domain.ledger.db import session_scope
from domain.ledger.models import Job, UsageCost

PRICES = {"version": "t1", "currency": "EUR",
          "default": {"prompt_per_1k": 1, "completion_per_1k": 2, "gpu_second": 0.5, "cpu_second": 0.01},
          "big-model": {"prompt_per_1k": 10, "completion_per_1k": 20}}


def test_price_uses_the_models_row_and_charges_cpu_only_without_gpu():
    cpu = Usage(prompt_tokens=1000, completion_tokens=500, wall_seconds=10)
    assert price(cpu, PRICES) == (Decimal("2.100000"), "EUR", "t1")  # 1 + 1 + 0.1 cpu
    gpu = Usage(prompt_tokens=1000, completion_tokens=500, wall_seconds=10, gpu_seconds=2)
    assert price(gpu, PRICES)[0] == Decimal("3.000000")  # 1 + 1 + 1 gpu, no cpu charge
    assert price(Usage(prompt_tokens=1000, model_id="big-model"), PRICES)[0] == Decimal("10.000000")
    row = usage_row(Usage(completion_tokens=1000, adapter_version_id="v1", model_id="m"), PRICES)
    assert row["cost"] == Decimal("2.000000") and row["adapter_version_id"] == "v1" and row["price_version"] == "t1"


def add_usage(tenant, adapter, tokens, cost, at):
    with session_scope() as s:
        job = Job(id=uuid.uuid4().hex, kind="review", tenant_id=tenant, status="succeeded")
        s.add(job)
        s.flush()
        s.add(UsageCost(job_id=job.id, tenant_id=tenant, kind="review", adapter_version_id=adapter, model_id="m",
                        prompt_tokens=tokens, completion_tokens=1, wall_seconds=1.5, cost=Decimal(cost), created_at=at))


def test_cost_report_groups(sqlite_ledger):
    d1, d2 = datetime(2026, 11, 20, 9, tzinfo=timezone.utc), datetime(2026, 11, 21, 9, tzinfo=timezone.utc)
    add_usage("acme", "v1", 100, "0.10", d1)
    add_usage("acme", "v1", 100, "0.10", d2)
    add_usage("acme", "v2", 50, "0.05", d2)
    add_usage("zeta", None, 10, "0.01", d2)

    by_tenant = {r["tenant_id"]: r for r in cost_report("tenant")}
    assert by_tenant["acme"]["jobs"] == 3 and by_tenant["acme"]["cost"] == Decimal("0.250000")
    assert by_tenant["acme"]["tokens"] == 253 and by_tenant["zeta"]["jobs"] == 1

    by_day = cost_report("day", tenant="acme")
    assert [(r["day"], r["jobs"]) for r in by_day] == [("2026-11-20", 1), ("2026-11-21", 2)]
    assert [r["day"] for r in cost_report("day", since=date(2026, 11, 21))] == ["2026-11-21", "2026-11-21"]

    by_adapter = {(r["tenant_id"], r["adapter_version_id"]): r["cost"] for r in cost_report("adapter")}
    assert by_adapter == {("acme", "v1"): Decimal("0.200000"), ("acme", "v2"): Decimal("0.050000"),
                          ("zeta", None): Decimal("0.010000")}
    with pytest.raises(ValueError, match="cannot group"):
        cost_report("color")
