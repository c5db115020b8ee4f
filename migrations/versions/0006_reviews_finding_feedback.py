"""reviews: the analyzer stage's record; feedback per finding (finding index, rule); rule suppressions

Revision ID: 0006_reviews
Revises: 0004
"""
from alembic import op
import sqlalchemy as sa

revision = "0006_reviews"
down_revision = "0005_ops"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("reviews") as b:
        b.add_column(sa.Column("analysis", sa.JSON(), nullable=True))
    with op.batch_alter_table("feedback") as b:
        b.add_column(sa.Column("finding_index", sa.Integer(), nullable=True))
        b.add_column(sa.Column("rule_id", sa.String(length=200), nullable=True))
    op.create_index("ix_feedback_tenant_rule", "feedback", ["tenant_id", "rule_id"])
    op.create_table(
        "rule_suppressions",
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("rule_id", sa.String(length=200), nullable=False),
        sa.Column("rejections", sa.Integer(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cleared_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("tenant_id", "rule_id"),
    )


def downgrade() -> None:
    op.drop_table("rule_suppressions")
    op.drop_index("ix_feedback_tenant_rule", table_name="feedback")
    with op.batch_alter_table("feedback") as b:
        b.drop_column("rule_id")
        b.drop_column("finding_index")
    with op.batch_alter_table("reviews") as b:
        b.drop_column("analysis")
