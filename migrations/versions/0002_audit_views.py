"""audit views over the ledger (portable SQL: PostgreSQL and SQLite)

Revision ID: 0002
Revises: 0001
"""
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

VIEWS = {
    # Which adapter wrote this review, what did it cost, where did that adapter come from?
    "v_review_audit": """
        SELECT r.id AS review_id, r.job_id, r.tenant_id, r.created_at, r.model_id, r.serving_artifact_id,
               r.adapter_version_id, av.name AS adapter_name, av.version AS adapter_version,
               av.parent_id AS adapter_parent_id, av.created_by_job_id AS adapter_trained_by_job,
               av.dataset_hash AS adapter_dataset_hash, av.artifact_sha256 AS adapter_sha256,
               u.prompt_tokens, u.completion_tokens, u.wall_seconds, u.gpu_seconds, u.cost, u.currency,
               j.attempts, j.worker, r.index_version, r.prompt_truncated
        FROM reviews r
        JOIN jobs j ON j.id = r.job_id
        LEFT JOIN adapter_versions av ON av.id = r.adapter_version_id
        LEFT JOIN usage_costs u ON u.job_id = r.job_id""",
    # What broke: every job that did not succeed, with its attempts and last error.
    "v_job_failures": """
        SELECT j.id AS job_id, j.kind, j.tenant_id, j.status, j.error_code, j.error, j.attempts, j.max_attempts,
               j.worker, j.enqueued_at, j.started_at, j.finished_at
        FROM jobs j
        WHERE j.status IN ('failed', 'rejected', 'dead')""",
    # Money and tokens by tenant, day, kind and adapter version.
    "v_costs_daily": """
        SELECT u.tenant_id, DATE(u.created_at) AS day, u.kind, u.adapter_version_id, u.model_id,
               COUNT(*) AS jobs, SUM(u.prompt_tokens) AS prompt_tokens, SUM(u.completion_tokens) AS completion_tokens,
               SUM(u.wall_seconds) AS wall_seconds, SUM(u.gpu_seconds) AS gpu_seconds, SUM(u.cost) AS cost,
               MIN(u.currency) AS currency
        FROM usage_costs u
        GROUP BY u.tenant_id, DATE(u.created_at), u.kind, u.adapter_version_id, u.model_id""",
    # Adapter lineage: each version with its parent and the job (and data) that made it.
    "v_adapter_lineage": """
        SELECT av.id, av.tenant_id, av.name, av.version, av.status, av.parent_id,
               p.version AS parent_version, av.base_model_id, av.base_model_hash, av.dataset_hash, av.dataset_size,
               av.artifact_path, av.artifact_sha256, av.created_by_job_id, av.created_at
        FROM adapter_versions av
        LEFT JOIN adapter_versions p ON p.id = av.parent_id""",
    # Job timeline: every attempt of every job, newest first when ordered by started_at.
    "v_job_attempts": """
        SELECT a.job_id, j.kind, j.tenant_id, a.attempt, a.worker, a.started_at, a.finished_at, a.outcome, a.error,
               j.status AS job_status
        FROM job_attempts a JOIN jobs j ON j.id = a.job_id""",
}


def upgrade() -> None:
    for name, sql in VIEWS.items():
        op.execute(f"CREATE VIEW {name} AS {sql}")


def downgrade() -> None:
    for name in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {name}")
