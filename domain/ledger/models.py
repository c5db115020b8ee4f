"""The ledger schema: SQLAlchemy 2.x typed models, portable between PostgreSQL and SQLite.

Every job, its attempts, the adapter versions and aliases it made or moved, the usage it cost, the
checkpoints and artifacts it wrote, and the health events around it. Audit views over these tables
are created by the migrations (see docs/ledger.md).
"""

from __future__ import annotations

import uuid
from datetime import date, datetime, timezone
from decimal import Decimal

from sqlalchemy import (
    JSON, BigInteger, Boolean, Date, DateTime, Float, ForeignKey, Index, Integer, Numeric, String, Text,
    UniqueConstraint, text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "rejected", "dead")
FINAL_STATUSES = ("succeeded", "failed", "rejected", "dead")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def aware(ts: datetime | None) -> datetime | None:
    """A ledger timestamp as an aware UTC datetime (SQLite hands back naive ones)."""
    return ts.replace(tzinfo=timezone.utc) if ts is not None and ts.tzinfo is None else ts


def new_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    type_annotation_map = {dict: JSON, list: JSON, datetime: DateTime(timezone=True)}


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    display_name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Budgets: None = unlimited. Tokens count prompt + completion.
    daily_token_budget: Mapped[int | None] = mapped_column(BigInteger)
    monthly_token_budget: Mapped[int | None] = mapped_column(BigInteger)
    daily_cost_budget: Mapped[Decimal | None] = mapped_column(Numeric(14, 6))
    monthly_cost_budget: Mapped[Decimal | None] = mapped_column(Numeric(14, 6))
    # Serving choice: a quantized/distilled artifact to serve instead of the base model (None = base).
    serving_artifact_id: Mapped[str | None] = mapped_column(String(32))  # an artifacts.id
    settings: Mapped[dict] = mapped_column(default=dict)


_OPEN = text("status IN ('queued', 'running')")
_FAILED = text("status IN ('failed', 'dead', 'rejected')")
_FINISHED = text("finished_at IS NOT NULL")


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_id)  # = Celery task id
    kind: Mapped[str] = mapped_column(String(16))
    tenant_id: Mapped[str] = mapped_column(String(64))  # not a foreign key: rejected jobs name unknown tenants
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    priority: Mapped[int] = mapped_column(Integer, default=5)
    queue: Mapped[str | None] = mapped_column(String(32))
    payload: Mapped[dict] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    worker: Mapped[str | None] = mapped_column(String(200))
    enqueued_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    progress: Mapped[float] = mapped_column(Float, default=0.0)  # 0..1
    progress_info: Mapped[dict] = mapped_column(default=dict)  # step, loss, tokens_per_s, message...
    result: Mapped[dict | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(64))
    parent_job_id: Mapped[str | None] = mapped_column(String(64))  # e.g. the beat tick or DLQ retry that made it
    created_by: Mapped[str | None] = mapped_column(String(200))  # producer: "client:host", "beat", "cli", "foreign"

    __table_args__ = (
        UniqueConstraint("tenant_id", "kind", "idempotency_key", name="uq_jobs_idempotency"),
        # Partial indexes: the succeeded rows (nearly all of a big ledger) are in none of the status indexes,
        # so finishing a job adds no entry to them, and the sweeps over open jobs read a small index. Their key
        # is a time, not the status: a lookup by id with a status condition (claim, finish) then has nothing
        # to gain from them and always takes the primary key, even on a table without statistics yet.
        Index("ix_jobs_open", "enqueued_at", postgresql_where=_OPEN, sqlite_where=_OPEN),
        Index("ix_jobs_failed", "finished_at", postgresql_where=_FAILED, sqlite_where=_FAILED),
        Index("ix_jobs_tenant_enqueued", "tenant_id", "enqueued_at"),
        Index("ix_jobs_finished", "finished_at", postgresql_where=_FINISHED, sqlite_where=_FINISHED),
    )


class JobAttempt(Base):
    """One delivery of a job to a worker: the trail that shows redeliveries, crashes and retries."""

    __tablename__ = "job_attempts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64), ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(String(200))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    outcome: Mapped[str | None] = mapped_column(String(16))  # succeeded/failed/retry/rejected/dead/skipped; NULL = lost
    error: Mapped[str | None] = mapped_column(Text)
    __table_args__ = (UniqueConstraint("job_id", "attempt", name="uq_job_attempts"),)


class Artifact(Base):
    """A file or folder a job produced: adapter weights, quantized/distilled models, index snapshots."""

    __tablename__ = "artifacts"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(32))  # adapter | quantized_model | distilled_model | index_snapshot | merged_model
    tenant_id: Mapped[str | None] = mapped_column(String(64))
    name: Mapped[str | None] = mapped_column(String(200))
    version: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)  # relative to the data root
    sha256: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default="ready")  # building | ready | active | superseded | corrupt
    lineage: Mapped[dict] = mapped_column(default=dict)  # source model / adapter versions / parent snapshot
    report: Mapped[dict] = mapped_column(default=dict)  # quantization/distillation report, index stats
    created_by_job_id: Mapped[str | None] = mapped_column(String(64), ForeignKey("jobs.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    __table_args__ = (
        Index("ix_artifacts_kind_tenant", "kind", "tenant_id", "created_at"),
        Index("ix_artifacts_job", "created_by_job_id"),
    )


class AdapterVersion(Base):
    __tablename__ = "adapter_versions"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(String(64), ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(100))
    version: Mapped[int] = mapped_column(Integer)
    parent_id: Mapped[str | None] = mapped_column(String(32), ForeignKey("adapter_versions.id"))
    base_model_id: Mapped[str] = mapped_column(Text)
    base_model_hash: Mapped[str] = mapped_column(String(80))
    dataset_hash: Mapped[str | None] = mapped_column(String(64))
    dataset_size: Mapped[int | None] = mapped_column(Integer)
    feedback_until: Mapped[datetime | None]  # newest feedback included: the next retrain starts after it
    hyperparams: Mapped[dict] = mapped_column(default=dict)
    metrics: Mapped[dict] = mapped_column(default=dict)
    artifact_id: Mapped[str | None] = mapped_column(String(32), ForeignKey("artifacts.id"))
    artifact_path: Mapped[str | None] = mapped_column(Text)  # relative to the data root; safetensors only
    artifact_sha256: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="candidate")  # training | candidate | promoted | rejected | archived
    created_by_job_id: Mapped[str | None] = mapped_column(String(64), ForeignKey("jobs.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    __table_args__ = (
        UniqueConstraint("tenant_id", "name", "version", name="uq_adapter_versions"),
        Index("ix_adapter_versions_tenant", "tenant_id", "created_at"),
    )


class AdapterLineage(Base):
    """Extra parents of an adapter version (merges combine several with weights)."""

    __tablename__ = "adapter_lineage"
    child_id: Mapped[str] = mapped_column(String(32), ForeignKey("adapter_versions.id"), primary_key=True)
    parent_id: Mapped[str] = mapped_column(String(32), ForeignKey("adapter_versions.id"), primary_key=True)
    relation: Mapped[str] = mapped_column(String(16), default="merge")  # retrain | merge
    weight: Mapped[float | None] = mapped_column(Float)


class AdapterAlias(Base):
    """Movable names per tenant: `champion`, `candidate`, or any custom alias."""

    __tablename__ = "adapter_aliases"
    tenant_id: Mapped[str] = mapped_column(String(64), ForeignKey("tenants.id"), primary_key=True)
    alias: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_id: Mapped[str] = mapped_column(String(32), ForeignKey("adapter_versions.id"))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class AliasHistory(Base):
    __tablename__ = "alias_history"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    alias: Mapped[str] = mapped_column(String(64))
    from_version_id: Mapped[str | None] = mapped_column(String(32))
    to_version_id: Mapped[str | None] = mapped_column(String(32))
    moved_by: Mapped[str] = mapped_column(String(200))  # "cli:user@host", "job:<id>", "circuit-breaker"
    reason: Mapped[str | None] = mapped_column(Text)
    moved_at: Mapped[datetime] = mapped_column(default=utcnow)
    __table_args__ = (Index("ix_alias_history_tenant", "tenant_id", "alias", "moved_at"),)


class Review(Base):
    __tablename__ = "reviews"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(String(64), ForeignKey("jobs.id"), unique=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    adapter_version_id: Mapped[str | None] = mapped_column(String(32), ForeignKey("adapter_versions.id"))
    model_id: Mapped[str] = mapped_column(Text)
    serving_artifact_id: Mapped[str | None] = mapped_column(String(32))  # quantized/distilled model served, if any
    language: Mapped[str | None] = mapped_column(String(32))
    path: Mapped[str | None] = mapped_column(Text)
    code: Mapped[str] = mapped_column(Text)  # the input, kept: accepted reviews become training data
    code_sha256: Mapped[str] = mapped_column(String(64))
    prompt_truncated: Mapped[bool] = mapped_column(Boolean, default=False)
    truncation: Mapped[dict] = mapped_column(default=dict)  # what was cut and by which rule
    summary: Mapped[str | None] = mapped_column(Text)
    findings: Mapped[list] = mapped_column(default=list)  # [{line, severity, message}]
    raw_text: Mapped[str] = mapped_column(Text)
    context_chunks: Mapped[list] = mapped_column(default=list)  # retrieval chunk ids + scores used
    index_version: Mapped[int | None] = mapped_column(Integer)
    analysis: Mapped[dict | None] = mapped_column(JSON, default=dict)  # analyzer stage: supported, skipped, stages
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    __table_args__ = (
        Index("ix_reviews_tenant_created", "tenant_id", "created_at"),
        Index("ix_reviews_adapter", "adapter_version_id"),
    )


class Feedback(Base):
    __tablename__ = "feedback"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    review_id: Mapped[str] = mapped_column(String(32), ForeignKey("reviews.id"))
    tenant_id: Mapped[str] = mapped_column(String(64))
    adapter_version_id: Mapped[str | None] = mapped_column(String(32))
    verdict: Mapped[str] = mapped_column(String(8))  # accept | reject
    correction: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finding_index: Mapped[int | None] = mapped_column(Integer)  # None: the verdict is on the whole review
    rule_id: Mapped[str | None] = mapped_column(String(200))  # the finding's rule (or "model:<category>")
    __table_args__ = (Index("ix_feedback_tenant_created", "tenant_id", "created_at"),
                      Index("ix_feedback_review", "review_id"),
                      Index("ix_feedback_tenant_rule", "tenant_id", "rule_id"))


class RuleSuppression(Base):
    """A rule a tenant keeps rejecting: its findings are left out of that tenant's reviews until cleared."""

    __tablename__ = "rule_suppressions"
    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    rule_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    rejections: Mapped[int] = mapped_column(Integer, default=0)  # rejections counted when it was suppressed
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    cleared_at: Mapped[datetime | None] = mapped_column()  # rejections before this no longer count


class UsageCost(Base):
    """What one job used and cost. One row per job at most (unique job_id): redelivery cannot double it."""

    __tablename__ = "usage_costs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64), ForeignKey("jobs.id"), unique=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    model_id: Mapped[str | None] = mapped_column(Text)
    adapter_version_id: Mapped[str | None] = mapped_column(String(32))
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    wall_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    gpu_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    cost: Mapped[Decimal] = mapped_column(Numeric(14, 6), default=Decimal(0))
    currency: Mapped[str] = mapped_column(String(8), default="USD")
    price_version: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    __table_args__ = (
        Index("ix_usage_tenant_created", "tenant_id", "created_at"),
        Index("ix_usage_adapter", "adapter_version_id"),
        # PostgreSQL: one tenant's costs per UTC day, index-only (migration 0005_ops, v_costs_daily)
        Index("ix_usage_tenant_day", "tenant_id", text("((created_at AT TIME ZONE 'UTC')::date)"),
              postgresql_include=["kind", "adapter_version_id", "model_id", "prompt_tokens", "completion_tokens",
                                  "wall_seconds", "gpu_seconds", "cost", "currency"]).ddl_if(dialect="postgresql"),
    )


class UsageDaily(Base):
    """Closed UTC days of ``usage_costs``, summed per tenant, kind, adapter and model (PostgreSQL; filled by
    ``domain.costs.roll_up_costs`` from beat). ``v_costs_daily`` reads these for the days up to the
    ``rollups`` mark and the usage rows themselves after it."""
    __tablename__ = "usage_daily"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    day: Mapped[date] = mapped_column(Date)
    kind: Mapped[str] = mapped_column(String(16))
    adapter_version_id: Mapped[str | None] = mapped_column(String(32))
    model_id: Mapped[str | None] = mapped_column(Text)
    jobs: Mapped[int] = mapped_column(BigInteger)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)
    wall_seconds: Mapped[float] = mapped_column(Float)
    gpu_seconds: Mapped[float] = mapped_column(Float)
    cost: Mapped[Decimal] = mapped_column(Numeric(20, 6))
    currency: Mapped[str | None] = mapped_column(String(8))
    __table_args__ = (Index("ix_usage_daily_tenant_day", "tenant_id", "day"),)


class Rollup(Base):
    """How far a roll-up has got: every UTC day up to and including ``through`` is in its table."""
    __tablename__ = "rollups"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    through: Mapped[date | None] = mapped_column(Date)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64), ForeignKey("jobs.id"))
    kind: Mapped[str] = mapped_column(String(16))  # retrain | distill
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)  # relative to the data root
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    metrics: Mapped[dict] = mapped_column(default=dict)
    reason: Mapped[str] = mapped_column(String(16), default="interval")  # interval | soft_stop | final
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    pruned_at: Mapped[datetime | None] = mapped_column(default=None)  # files removed (domain/checkpoints.py)
    __table_args__ = (Index("ix_checkpoints_job_step", "job_id", "step"),
                      Index("ix_checkpoints_unpruned", "pruned_at", "job_id"))


class HealthEvent(Base):
    __tablename__ = "health_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    source: Mapped[str] = mapped_column(String(200))  # worker hostname, "cli", "beat"
    component: Mapped[str] = mapped_column(String(32))  # worker | broker | database | model | adapter | index | memory | gpu
    event: Mapped[str] = mapped_column(String(48))  # worker_start | worker_stop | check | rollback | corrupt | ...
    status: Mapped[str] = mapped_column(String(16))  # ok | degraded | fail
    message: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[dict] = mapped_column(default=dict)
    tenant_id: Mapped[str | None] = mapped_column(String(64))
    job_id: Mapped[str | None] = mapped_column(String(64))
    __table_args__ = (Index("ix_health_at", "at"), Index("ix_health_component_at", "component", "at"))


class RetrainSchedule(Base):
    __tablename__ = "retrain_schedules"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(64), ForeignKey("tenants.id"))
    adapter_name: Mapped[str] = mapped_column(String(100), default="reviewer")
    cron: Mapped[str] = mapped_column(String(100))  # "@daily", "@weekly" or a 5-field cron expression
    min_new_feedback: Mapped[int] = mapped_column(Integer, default=10)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    params: Mapped[dict] = mapped_column(default=dict)  # retrain spec overrides
    last_run_at: Mapped[datetime | None]
    last_job_id: Mapped[str | None] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    __table_args__ = (UniqueConstraint("tenant_id", "adapter_name", name="uq_retrain_schedule"),)


class Lease(Base):
    """A named lock with expiry (beat leadership, index writer), portable across databases."""

    __tablename__ = "leases"
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[datetime]
    acquired_at: Mapped[datetime] = mapped_column(default=utcnow)
