"""costs roll-up: closed UTC days of usage summed once, so cost queries stop reading every usage row

- ``usage_daily``: one row per tenant, UTC day, kind, adapter version and model of a closed day, with the
  summed columns of ``v_costs_daily``; ``rollups``: how far it has got (``through``, inclusive).
- PostgreSQL: ``v_costs_daily`` = the roll-up rows (days up to the mark) UNION ALL the usage rows grouped by
  day after the mark (still an index-only range scan of ``ix_usage_tenant_day``). One tenant's costs per day
  over a month reads about 30 roll-up rows per kind plus today's usage rows; all-time costs per tenant read
  the roll-up instead of every usage row. ``domain.costs.roll_up_costs`` moves the mark (beat, hourly).
  Before the first roll-up the mark is empty and the view reads every usage row, as before.
  No index is added to ``usage_costs``: the job hot path writes exactly what it wrote before; the roll-up's
  once-a-day range read goes through ``ix_usage_tenant_day`` (covering) or a scan.
- SQLite (the embedded ledger) creates the tables so the models match, and keeps its plain view.

Revision ID: 0007_costs_rollup
Revises: 0006_reviews
"""
from alembic import op
import sqlalchemy as sa

revision = "0007_costs_rollup"
down_revision = "0006_reviews"
branch_labels = None
depends_on = None

UTC_DAY = "((u.created_at AT TIME ZONE 'UTC')::date)"
GROUPED = f"""SELECT u.tenant_id, {UTC_DAY} AS day, u.kind, u.adapter_version_id, u.model_id,
               COUNT(*) AS jobs, SUM(u.prompt_tokens) AS prompt_tokens, SUM(u.completion_tokens) AS completion_tokens,
               SUM(u.wall_seconds) AS wall_seconds, SUM(u.gpu_seconds) AS gpu_seconds, SUM(u.cost) AS cost,
               MIN(u.currency) AS currency
        FROM usage_costs u"""
GROUP_BY = f"GROUP BY u.tenant_id, {UTC_DAY}, u.kind, u.adapter_version_id, u.model_id"


def upgrade() -> None:
    op.create_table(
        "usage_daily",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("adapter_version_id", sa.String(length=32), nullable=True),
        sa.Column("model_id", sa.Text(), nullable=True),
        sa.Column("jobs", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("wall_seconds", sa.Float(), nullable=False),
        sa.Column("gpu_seconds", sa.Float(), nullable=False),
        sa.Column("cost", sa.Numeric(precision=20, scale=6), nullable=False),
        sa.Column("currency", sa.String(length=8), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_usage_daily_tenant_day", "usage_daily", ["tenant_id", "day"])
    op.create_table(
        "rollups",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("through", sa.Date(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP VIEW v_costs_daily")
        op.execute(f"""CREATE VIEW v_costs_daily AS
        SELECT d.tenant_id, d.day, d.kind, d.adapter_version_id, d.model_id, d.jobs, d.prompt_tokens,
               d.completion_tokens, d.wall_seconds, d.gpu_seconds, d.cost, d.currency
        FROM usage_daily d
        UNION ALL
        {GROUPED}
        WHERE {UTC_DAY} > COALESCE((SELECT r.through FROM rollups r WHERE r.name = 'costs_daily'), '-infinity'::date)
        {GROUP_BY}""")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP VIEW v_costs_daily")
        op.execute(f"CREATE VIEW v_costs_daily AS {GROUPED} {GROUP_BY}")
    op.drop_table("rollups")
    op.drop_index("ix_usage_daily_tenant_day", table_name="usage_daily")
    op.drop_table("usage_daily")
