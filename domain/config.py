"""Foundry configuration, read from environment variables (prefix ``FOUNDRY_``).

One table of every setting lives in README.md ("Configuration"); keep the two in step.
The embedded default needs none of them: everything lives under ``FOUNDRY_DATA_DIR``
(``./.foundry``), the broker is kombu's ``filesystem://`` transport and the ledger is SQLite.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

JOB_KINDS = ("review", "retrain", "quantize", "distill", "index")

# Default price table: money per 1k tokens and per GPU/CPU second. Override with FOUNDRY_PRICE_TABLE
# (a JSON object or a path to a JSON file). Keys: "default" and optionally one per model id.
DEFAULT_PRICES = {
    "version": "2026-11-default",
    "currency": "USD",
    "default": {"prompt_per_1k": 0.0005, "completion_per_1k": 0.0015, "gpu_second": 0.0008, "cpu_second": 0.00002},
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FOUNDRY_", extra="ignore")

    data_dir: Path = Field(Path(".foundry"), description="Root of every file Foundry writes (ledger, broker, models, artifacts).")
    broker_url: str = Field("", description="Celery broker URL; empty = embedded filesystem broker under data_dir/broker.")
    result_backend: str = Field("", description="Celery result backend; empty = same Redis as the broker, or a file backend when embedded.")
    celery_results: bool = Field(False, description="Also store each job's summary in the Celery result backend (for producers that wait on AsyncResult); off: the ledger is the only result store, which saves two Redis writes per job.")
    database_url: str = Field("", description="SQLAlchemy URL of the ledger; empty = sqlite under data_dir/ledger.db.")

    base_model: str = Field("", description="Base causal LM: a Hugging Face id or local path; empty = the prepared embedded SmolLM2.")
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda[:N]'.")

    longest_job_s: int = Field(6 * 3600, description="Longest job the deployment runs; the broker visibility timeout is set above it.")
    visibility_timeout_s: int = Field(0, description="Redis visibility timeout; 0 = derived from longest_job_s (1.25x + 60 s).")
    restore_interval_s: int = Field(10, description="How often a Redis worker re-queues unacknowledged messages past the visibility timeout.")
    max_attempts: int = Field(3, ge=1, description="Deliveries of one job before it is dead-lettered.")
    time_limits: dict[str, float] = Field(
        default_factory=lambda: {"review": 600, "retrain": 4 * 3600, "quantize": 2 * 3600, "distill": 4 * 3600, "index": 3600, "noop": 300},
        description="Per-kind hard time limit in seconds (enforced by Foundry, also under the solo pool).",
    )
    heartbeat_s: float = Field(10.0, description="How often a running job refreshes its heartbeat in the ledger.")
    stale_after_s: float = Field(60.0, description="A running job whose heartbeat is older than this is presumed lost.")
    worker_max_memory_mb: int = Field(0, description="Warm-restart a worker whose RSS exceeds this after a job (0 = off).")
    ledger_outage_max_s: float = Field(900.0, description="How long a worker keeps retrying ledger writes (holding the job's message unacknowledged) before handing the job back to the broker.")
    retry_backoff_s: float = Field(2.0, description="Base of the exponential backoff for transient errors.")
    retry_backoff_max_s: float = Field(300.0, description="Cap of that backoff.")

    checkpoint_keep: int = Field(2, ge=1, description="Checkpoints of a running retrain/distill job kept on disk (older ones are pruned).")
    checkpoint_retention_days: float = Field(7.0, description="Days a failed or dead job keeps its checkpoints (for `foundry dlq retry`); a succeeded job's are removed at once.")

    stranded_after_s: float = Field(120.0, description="A queued job quiet this long whose message the Redis broker no longer holds (lost in a worker crash) is sent again by beat's sweep.")
    stranded_sweep_s: float = Field(60.0, description="How often beat runs that sweep (0 = never).")
    beat_tick_s: float = Field(60.0, description="How often beat asks a worker to evaluate the retrain schedules.")
    price_table: str = Field("", description="JSON object or path to a JSON file with prices; empty = built-in table.")
    max_review_bytes: int = Field(200_000, description="Largest code/diff a review accepts.")
    review_batch_size: int = Field(8, description="Review jobs a worker drains into one generation batch.")
    review_batch_wait_ms: float = Field(20.0, description="How long the review batcher waits to fill a batch.")
    max_resident_adapters: int = Field(8, ge=1, description="LoRA adapters kept loaded per review worker (LRU, evicted adapters are deleted).")
    # ---- artifact store and node-local cache (domain/storage.py) ----
    artifact_url: str = Field("", description="Where artifacts live: file:///folder or s3://bucket/prefix (any S3-compatible store); empty = the data folder. Credentials: the standard AWS variables, never logged.")
    artifact_endpoint_url: str = Field("", description="S3 endpoint (MinIO, R2...); empty = AWS's own (or AWS_ENDPOINT_URL).")
    artifact_region: str = Field("", description="S3 region; empty = the AWS default chain.")
    cache_dir: Path | None = Field(None, description="This host's cache of store objects; empty = data_dir/cache.")
    cache_max_gb: float = Field(20.0, description="Size bound of that cache (least recently used objects are evicted).")
    cpu_adapters: int = Field(32, ge=0, description="Adapters whose weights a review worker keeps in CPU memory between swaps (0 = none).")
    champion_prefetch_s: float = Field(15.0, description="How often a review worker fetches newly promoted champions into its host's cache (0 = never).")

    allow_fault_injection: bool = Field(False, description="Lets noop jobs crash/exit on purpose (tests and benchmarks only).")
    log_json: bool = Field(False, description="Structured JSON logs.")

    @field_validator("time_limits", mode="before")
    @classmethod
    def _parse_limits(cls, v):
        if isinstance(v, str):
            v = json.loads(v)
        return v

    # ---- derived values -------------------------------------------------------------------
    @property
    def embedded(self) -> bool:
        return not self.broker_url or self.broker_url.startswith("filesystem://")

    @property
    def ledger_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'ledger.db').resolve()}"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def visibility_timeout(self) -> int:
        """Seconds before Redis redelivers an unacknowledged message: above the longest job."""
        return self.visibility_timeout_s or int(self.longest_job_s * 1.25) + 60

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    def base_model_ref(self) -> str:
        return self.base_model or str((self.models_dir / "smollm2-135m-instruct").resolve())

    def prices(self) -> dict:
        if not self.price_table:
            return DEFAULT_PRICES
        text = self.price_table
        if not text.lstrip().startswith("{"):
            text = Path(text).read_text()
        return json.loads(text)


@functools.cache
def get_settings() -> Settings:
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings, the capabilities' own included (tests change the environment)."""
    get_settings.cache_clear()
    try:
        from domain.retrieval.settings import reset_retrieval_settings

        reset_retrieval_settings()
    except ImportError:
        pass
