"""Retrieval benchmark on the standard-library docstring → function set (domain/corpus.py).

1. Quality: MRR@10 and recall@10 of dense-only (MiniLM), BM25-only and the hybrid (the shipped default
   fusion), on the held-out half of the pairs; the fusion grid is shown on the other (tuning) half.
2. Approximate vs exact at 100k chunks: recall@10 of the HNSW index against exact search, and its
   query throughput ratio. The stdlib has ~3.5k functions, so the 100k vectors are SYNTHESIZED around the
   real MiniLM vectors (each = a real vector + Gaussian noise, renormalized); queries are the real docstrings.
3. Updating 1k documents in a 100k-chunk index vs a full rebuild, through the real builder (snapshot
   written to disk, BM25 rebuilt). Embedding is excluded from both (vectors are precomputed: the synthetic
   ones); the embedding cost MiniLM would add is printed separately from the measured rate.

Headline: ratio = hybrid MRR@10 / dense-only MRR@10 (held-out half).
Embeddings are cached under .foundry/cache/retrieval/ keyed by model and content hash.

    .venv/bin/python bench/retrieval.py            # all pairs, 100k scale parts
    .venv/bin/python bench/retrieval.py --quick    # 600 pairs, 20k scale: < 1 minute once cached
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = Path(tempfile.mkdtemp(prefix="foundry-bench-retrieval-"))
os.environ["FOUNDRY_DATA_DIR"] = str(WORK)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from domain.config import reset_settings  # noqa: E402
from domain.corpus import metrics, stdlib_pairs  # noqa: E402
from domain.retrieval import reader  # noqa: E402
from domain.retrieval.builder import build_version  # noqa: E402
from domain.retrieval.dense import DenseIndex  # noqa: E402
from domain.retrieval.embedding import get_embedder  # noqa: E402
from domain.retrieval.fusion import DEFAULT_FUSION, FusionConfig  # noqa: E402
from domain.retrieval.snapshots import load_snapshot  # noqa: E402

reset_settings()
CACHE = ROOT / ".foundry" / "cache" / "retrieval"


class CachedEmbedder:
    """Wraps an embedder with an on-disk cache (content hash → vector); keeps the wrapped model's name."""

    def __init__(self, inner):
        self.inner, self.name, self.dim = inner, inner.name, inner.dim
        self.folder = CACHE / hashlib.sha256(inner.name.encode()).hexdigest()[:16]
        self.store: dict[str, np.ndarray] = {}
        self.computed = 0
        self.compute_seconds = 0.0
        keys, vecs = self.folder / "keys.json", self.folder / "vectors.npy"
        if keys.exists() and vecs.exists():
            matrix = np.load(vecs, allow_pickle=False)
            self.store = dict(zip(json.loads(keys.read_text()), matrix))

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    def encode(self, texts, batch_size=64, progress=None):
        missing = list(dict.fromkeys(t for t in texts if self.key(t) not in self.store))
        if missing:
            t0 = time.perf_counter()
            vecs = self.inner.encode(missing, batch_size=batch_size)
            self.compute_seconds += time.perf_counter() - t0
            self.computed += len(missing)
            self.store.update({self.key(t): v for t, v in zip(missing, vecs)})
            self.save()
        if progress:
            progress(len(texts), len(texts))
        return np.vstack([self.store[self.key(t)] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)

    def save(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        keys = list(self.store)
        np.save(self.folder / "vectors.npy", np.vstack([self.store[k] for k in keys]).astype(np.float32))
        (self.folder / "keys.json").write_text(json.dumps(keys))


class LookupEmbedder:
    """Precomputed vectors by text (the synthetic scale parts): embedding costs nothing on either side."""

    def __init__(self, table: dict[str, np.ndarray], dim: int, name: str):
        self.table, self.dim, self.name = table, dim, name

    def encode(self, texts, batch_size=64, progress=None):
        return np.vstack([self.table[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)


def as_documents(pairs) -> list[dict]:
    return [{"id": p.id, "text": p.text, "language": "python", "path": p.path, "source": "code"} for p in pairs]


def evaluate(snapshot, pairs, qvecs: dict[str, np.ndarray], config: FusionConfig) -> dict:
    ranked = {}
    for p in pairs:
        hits = reader.search(snapshot, p.query, k=30, fusion=config, query_vector=qvecs[p.id])
        ranked[p.id] = [h.chunk["document_id"] for h in hits]
    return metrics(ranked, pairs)


GRID = ([FusionConfig("rrf", 1.0, w, k, d) for w in (1.0, 0.5, 0.3) for k in (10, 60) for d in (20, 50)]
        + [FusionConfig("linear", 1.0, w, 60, d) for w in (0.1, 0.2, 0.3, 0.5) for d in (20, 50)])


def quality(pairs, embedder, grid: bool) -> dict:
    t0 = time.perf_counter()
    built = build_version("bench", action="rebuild", documents=as_documents(pairs), remove_ids=[], base=None,
                          embedder=embedder, build_name="quality", exact_max=10**9, tombstone_fraction=0.2)
    snapshot = load_snapshot("bench", built.version)
    qv = embedder.encode([p.query for p in pairs])
    qvecs = {p.id: qv[i] for i, p in enumerate(pairs)}
    build_s = time.perf_counter() - t0
    tune = [p for p in pairs if int(hashlib.sha256(p.id.encode()).hexdigest(), 16) % 2 == 0]
    held = [p for p in pairs if int(hashlib.sha256(p.id.encode()).hexdigest(), 16) % 2 == 1]
    out = {"pairs": len(pairs), "chunks": len(snapshot.chunks), "build_seconds": round(build_s, 2),
           "embedded_now": embedder.computed,
           "embed_rate_per_s": round(embedder.computed / embedder.compute_seconds, 1) if embedder.compute_seconds else None}
    for name, cfg in (("dense", FusionConfig("dense")), ("bm25", FusionConfig("keyword")), ("hybrid", DEFAULT_FUSION),
                      ("naive_rrf", FusionConfig("rrf", 1.0, 1.0, 60, 50))):
        out[name] = {"held_out": evaluate(snapshot, held, qvecs, cfg), "all": evaluate(snapshot, pairs, qvecs, cfg)}
    out["hybrid_config"] = DEFAULT_FUSION.__dict__
    if grid:
        out["grid_on_tuning_half"] = [{**cfg.__dict__, **evaluate(snapshot, tune, qvecs, cfg)} for cfg in GRID]
        out["dense_on_tuning_half"] = evaluate(snapshot, tune, qvecs, FusionConfig("dense"))
    return out
