"""audit queries at scale: feedback by review; on PostgreSQL, costs per tenant and UTC day from one index

- ``ix_feedback_review``: `foundry audit review` reads a review's feedback by ``review_id`` (a scan of the
  whole feedback table before).
- PostgreSQL: ``v_costs_daily`` groups by the UTC day, ``(created_at AT TIME ZONE 'UTC')::date`` (``DATE()``
  of a timestamptz follows the session's TimeZone, so no index can hold it), and
  ``ix_usage_tenant_day`` on (tenant_id, that day) INCLUDE the summed columns: one tenant's costs per day
  over a month is an index-only range scan instead of reading every usage row of the tenant. SQLite keeps
  its view (its DATE() is UTC already).

bench/audit_queries.py measures both (docs/ledger.md).

Revision ID: 0005_ops
Revises: 0004
"""
from alembic import op

revision = "0005_ops"
down_revision = "0004"
branch_labels = None
depends_on = None

UTC_DAY = "((created_at AT TIME ZONE 'UTC')::date)"
SUMMED = "kind, adapter_version_id, model_id, prompt_tokens, completion_tokens, wall_seconds, gpu_seconds, cost, currency"


def _costs_view(day: str) -> str:
    return f"""CREATE VIEW v_costs_daily AS
        SELECT u.tenant_id, {day} AS day, u.kind, u.adapter_version_id, u.model_id,
               COUNT(*) AS jobs, SUM(u.prompt_tokens) AS prompt_tokens, SUM(u.completion_tokens) AS completion_tokens,
               SUM(u.wall_seconds) AS wall_seconds, SUM(u.gpu_seconds) AS gpu_seconds, SUM(u.cost) AS cost,
               MIN(u.currency) AS currency
        FROM usage_costs u
        GROUP BY u.tenant_id, {day}, u.kind, u.adapter_version_id, u.model_id"""


def upgrade() -> None:
    op.create_index("ix_feedback_review", "feedback", ["review_id"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"CREATE INDEX ix_usage_tenant_day ON usage_costs (tenant_id, {UTC_DAY}) INCLUDE ({SUMMED})")
        op.execute("DROP VIEW v_costs_daily")
        op.execute(_costs_view("(u.created_at AT TIME ZONE 'UTC')::date"))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP VIEW v_costs_daily")
        op.execute(_costs_view("DATE(u.created_at)"))
        op.execute("DROP INDEX ix_usage_tenant_day")
    op.drop_index("ix_feedback_review", table_name="feedback")
