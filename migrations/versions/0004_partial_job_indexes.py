"""jobs: partial status indexes (open jobs, failed jobs) and finished_at only where set

A succeeded job, nearly every row of a big ledger, is in none of the status indexes: finishing it adds no
index entry there, and the sweeps over queued/running jobs read an index of open jobs only. They are keyed by
time, not status, so that a lookup by id with a status condition (claim, finish) always uses the primary key.
job_attempts gets fillfactor 80 on PostgreSQL so closing an attempt is a HOT update.

Revision ID: 0004
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

OPEN = "status IN ('queued', 'running')"
FAILED = "status IN ('failed', 'dead', 'rejected')"
FINISHED = "finished_at IS NOT NULL"


def _where(clause: str) -> dict:
    return {"postgresql_where": sa.text(clause), "sqlite_where": sa.text(clause)}


def upgrade() -> None:
    op.drop_index("ix_jobs_status_kind", table_name="jobs")
    op.drop_index("ix_jobs_finished", table_name="jobs")
    op.create_index("ix_jobs_open", "jobs", ["enqueued_at"], **_where(OPEN))
    op.create_index("ix_jobs_failed", "jobs", ["finished_at"], **_where(FAILED))
    op.create_index("ix_jobs_finished", "jobs", ["finished_at"], **_where(FINISHED))
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE job_attempts SET (fillfactor = 80)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE job_attempts RESET (fillfactor)")
    op.drop_index("ix_jobs_finished", table_name="jobs")
    op.drop_index("ix_jobs_failed", table_name="jobs")
    op.drop_index("ix_jobs_open", table_name="jobs")
    op.create_index("ix_jobs_finished", "jobs", ["finished_at"])
    op.create_index("ix_jobs_status_kind", "jobs", ["status", "kind"])
