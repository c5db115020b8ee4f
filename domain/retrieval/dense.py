"""The dense index: FAISS with our own int64 ids (``IndexIDMap2``), exact or HNSW by size.

- ``flat``: exact inner-product search (vectors are normalized: inner product = cosine). Deletes are real.
- ``hnsw``: approximate; HNSW cannot delete, so deleted ids become tombstones that searches skip (an
  ``IDSelector`` inside the graph search) until the index is compacted (rebuilt from its live vectors).
"""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np

HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 96


class DenseIndex:
    def __init__(self, dim: int, kind: str = "flat", ef_search: int = HNSW_EF_SEARCH):
        if kind not in ("flat", "hnsw"):
            raise ValueError(f"unknown dense index kind {kind!r} (flat | hnsw)")
        self.dim, self.kind, self.ef_search = dim, kind, ef_search
        if kind == "flat":
            inner = faiss.IndexFlatIP(dim)
        else:
            inner = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            inner.hnsw.efSearch = ef_search
        self.index = faiss.IndexIDMap2(inner)
        self.tombstones: set[int] = set()
        self._skip: tuple | None = None  # (IDSelectorBatch, IDSelectorNot) for the current tombstones

    @classmethod
    def build(cls, dim: int, ids: np.ndarray, vectors: np.ndarray, exact_max: int) -> "DenseIndex":
        """A fresh index of the right kind for this many vectors."""
        index = cls(dim, "flat" if len(ids) <= exact_max else "hnsw")
        index.add(ids, vectors)
        return index

    @property
    def live(self) -> int:
        return int(self.index.ntotal) - len(self.tombstones)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))

    def remove(self, ids) -> None:
        ids = np.asarray(sorted(set(int(i) for i in ids)), dtype=np.int64)
        if not len(ids):
            return
        if self.kind == "flat":
            self.index.remove_ids(faiss.IDSelectorBatch(ids))
        else:
            self.tombstones.update(int(i) for i in ids)
            self._skip = None

    def needs_rebuild(self, tombstone_fraction: float, exact_max: int) -> bool:
        """Too many tombstones, or the size crossed the exact/approximate threshold."""
        total = int(self.index.ntotal)
        if self.kind == "hnsw" and (total and len(self.tombstones) / total > tombstone_fraction or self.live <= exact_max // 2):
            return True
        return self.kind == "flat" and total > exact_max

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of every live entry."""
        total = int(self.index.ntotal)
        if not total:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), dtype=np.float32)
        ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        vecs = self.index.index.reconstruct_n(0, total)
        if self.tombstones:
            keep = ~np.isin(ids, np.fromiter(self.tombstones, dtype=np.int64))
            ids, vecs = ids[keep], vecs[keep]
        return ids, vecs

    def vectors(self, ids) -> np.ndarray:
        return np.vstack([self.index.reconstruct(int(i)) for i in ids]) if len(ids) else np.zeros((0, self.dim), np.float32)

    def rebuilt(self, exact_max: int) -> "DenseIndex":
        """Compaction: a new index of the right kind from the live vectors (tombstones gone)."""
        ids, vecs = self.all_vectors()
        return DenseIndex.build(self.dim, ids, vecs, exact_max)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of shape (n, k); missing results have id -1. A few queries (the serving pattern) run
        on one OpenMP thread: waking a thread team costs more than the search itself on a busy machine."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if len(queries) >= 8:
            return self._search(queries, k)
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # per calling thread (an OpenMP ICV): builds elsewhere keep all cores
        try:
            return self._search(queries, k)
        finally:
            faiss.omp_set_num_threads(threads)

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = max(1, min(k, max(1, self.live)))
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, k))
            if self.tombstones:
                if self._skip is None:  # kept on the object: SWIG does not keep the selectors alive for us
                    dead = faiss.IDSelectorBatch(np.fromiter(self.tombstones, dtype=np.int64))
                    self._skip = (dead, faiss.IDSelectorNot(dead))
                params.sel = self._skip[1]
            return self.index.search(queries, k, params=params)
        return self.index.search(queries, k)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(folder / "dense.faiss"))
        (folder / "dense.json").write_text(json.dumps({"dim": self.dim, "kind": self.kind, "ef_search": self.ef_search,
                                                       "tombstones": sorted(self.tombstones)}))

    @classmethod
    def load(cls, folder: Path) -> "DenseIndex":
        meta = json.loads((folder / "dense.json").read_text())
        index = cls(meta["dim"], meta["kind"], meta.get("ef_search", HNSW_EF_SEARCH))
        index.index = faiss.read_index(str(folder / "dense.faiss"))
        if meta["kind"] == "hnsw":
            faiss.downcast_index(index.index.index).hnsw.efSearch = index.ef_search
        index.tombstones = set(meta["tombstones"])
        return index
