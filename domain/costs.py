"""Usage pricing: turn a job's usage (tokens, seconds) into money with a configurable price table.

The price table (``FOUNDRY_PRICE_TABLE``) is JSON: ``{"version", "currency", "default": {...}, "<model id>": {...}}``
with per-1k-token prices for prompt and completion tokens and per-second prices for GPU and CPU time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from decimal import ROUND_HALF_UP, Decimal


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_seconds: float = 0.0
    gpu_seconds: float = 0.0
    model_id: str | None = None
    adapter_version_id: str | None = None

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def price(usage: Usage, prices: dict) -> tuple[Decimal, str, str]:
    """(cost, currency, price table version) for one job's usage."""
    table = prices.get(usage.model_id or "", None) or prices.get("default", {})
    d = lambda k: Decimal(str(table.get(k, 0)))  # noqa: E731
    cpu_seconds = max(0.0, usage.wall_seconds - usage.gpu_seconds) if not usage.gpu_seconds else 0.0
    cost = (d("prompt_per_1k") * usage.prompt_tokens / 1000 + d("completion_per_1k") * usage.completion_tokens / 1000
            + d("gpu_second") * Decimal(str(usage.gpu_seconds)) + d("cpu_second") * Decimal(str(cpu_seconds)))
    return cost.quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP), prices.get("currency", "USD"), prices.get("version", "")


def usage_row(usage: Usage, prices: dict) -> dict:
    """The columns of a ``usage_costs`` row for this usage."""
    cost, currency, version = price(usage, prices)
    return {**asdict(usage), "cost": cost, "currency": currency, "price_version": version}


# ---- reports (``foundry audit costs``) -------------------------------------------------------------

REPORT_GROUPS = {"tenant": ("tenant_id",), "day": ("day", "tenant_id"), "adapter": ("tenant_id", "adapter_version_id"),
                 "model": ("model_id",), "kind": ("tenant_id", "kind")}


def cost_report(by: str = "tenant", tenant: str | None = None, since=None, url: str | None = None) -> list[dict]:
    """Jobs, tokens, seconds and money from the ``v_costs_daily`` view, grouped ``by`` tenant, day, adapter,
    model or kind; optionally for one tenant and from a UTC date/datetime on."""
    from sqlalchemy import text

    from domain.ledger.db import session_scope

    if by not in REPORT_GROUPS:
        raise ValueError(f"cannot group costs by {by!r}; choose one of {', '.join(REPORT_GROUPS)}")
    cols = ", ".join(REPORT_GROUPS[by])  # fixed column names, never user text
    where, params = [], {}
    if tenant:
        where.append("tenant_id = :tenant")
        params["tenant"] = tenant
    if since is not None:
        where.append("day >= :since")
        params["since"] = since.date() if hasattr(since, "date") else since
    sql = (f"SELECT {cols}, SUM(jobs) AS jobs, SUM(prompt_tokens) AS prompt_tokens, "
           f"SUM(completion_tokens) AS completion_tokens, SUM(wall_seconds) AS wall_seconds, "
           f"SUM(gpu_seconds) AS gpu_seconds, SUM(cost) AS cost, MIN(currency) AS currency FROM v_costs_daily"
           + (f" WHERE {' AND '.join(where)}" if where else "") + f" GROUP BY {cols} ORDER BY {cols}")
    with session_scope(url) as s:
        result = s.execute(text(sql), params)
        keys = list(result.keys())
        rows = [dict(zip(keys, r)) for r in result]
    for r in rows:
        r["day"] = str(r["day"]) if "day" in r and r["day"] is not None else r.get("day")
        r["cost"] = Decimal(str(r["cost"] or 0)).quantize(Decimal("0.000001"))
        for k in ("jobs", "prompt_tokens", "completion_tokens"):  # SUM() of integers is numeric on PostgreSQL
            r[k] = int(r[k] or 0)
        for k in ("wall_seconds", "gpu_seconds"):
            r[k] = float(r[k] or 0.0)
        r["tokens"] = r["prompt_tokens"] + r["completion_tokens"]
    return rows


# ---- the daily roll-up (PostgreSQL) ------------------------------------------------------------------

ROLLUP = "costs_daily"
ROLLUP_GRACE_S = 3600.0  # a day is closed this long after its UTC midnight (commits and worker clocks lag)


def roll_up_costs(now=None, *, grace_s: float = ROLLUP_GRACE_S, url: str | None = None) -> dict:
    """Sum every closed UTC day of ``usage_costs`` not rolled up yet into ``usage_daily`` and move the mark,
    in one transaction that holds the mark's row lock (two sweeps at once cannot count a day twice).
    ``v_costs_daily`` then reads those days from the roll-up (migration 0007). A no-op on SQLite, whose view
    reads the usage rows (the embedded ledger is small). Returns ``{"from", "through", "rows"}``; the days
    are ``None`` when nothing was closed since the last run."""
    from datetime import datetime, timedelta, timezone

    from sqlalchemy import text

    from domain.ledger.db import session_scope

    now = now or datetime.now(timezone.utc)
    last_closed = (now - timedelta(seconds=grace_s)).astimezone(timezone.utc).date() - timedelta(days=1)
    with session_scope(url) as s:
        if s.get_bind().dialect.name != "postgresql":
            return {"from": None, "through": None, "rows": 0, "skipped": "sqlite"}
        s.execute(text("INSERT INTO rollups (name, through, updated_at) VALUES (:n, NULL, now()) "
                       "ON CONFLICT (name) DO NOTHING"), {"n": ROLLUP})
        through = s.execute(text("SELECT through FROM rollups WHERE name = :n FOR UPDATE"), {"n": ROLLUP}).scalar()
        start = through + timedelta(days=1) if through else s.execute(text(
            "SELECT MIN((created_at AT TIME ZONE 'UTC')::date) FROM usage_costs")).scalar()
        if start is None or start > last_closed:
            return {"from": None, "through": None, "rows": 0}
        rows = s.execute(text(
            "INSERT INTO usage_daily (tenant_id, day, kind, adapter_version_id, model_id, jobs, prompt_tokens, "
            "completion_tokens, wall_seconds, gpu_seconds, cost, currency) "
            "SELECT tenant_id, (created_at AT TIME ZONE 'UTC')::date, kind, adapter_version_id, model_id, COUNT(*), "
            "SUM(prompt_tokens), SUM(completion_tokens), SUM(wall_seconds), SUM(gpu_seconds), SUM(cost), MIN(currency) "
            "FROM usage_costs WHERE (created_at AT TIME ZONE 'UTC')::date BETWEEN :start AND :end "
            "GROUP BY tenant_id, (created_at AT TIME ZONE 'UTC')::date, kind, adapter_version_id, model_id"),
            {"start": start, "end": last_closed}).rowcount
        s.execute(text("UPDATE rollups SET through = :end, updated_at = now() WHERE name = :n"),
                  {"end": last_closed, "n": ROLLUP})
    return {"from": str(start), "through": str(last_closed), "rows": rows}
