"""Building the next index version from the current one: upserts, removals, rebuilds.

Only what changed costs anything: a document whose content hash is unchanged is skipped, and a chunk whose
content hash is already in the index reuses its vector (read back from FAISS) instead of being embedded.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from domain.retrieval.chunking import chunk_document
from domain.retrieval.dense import DenseIndex
from domain.retrieval.embedding import Embedder
from domain.retrieval.keyword import KeywordIndex, tokenize
from domain.retrieval.snapshots import Snapshot, next_version, write_snapshot

Progress = Callable[[float, str], None]  # (fraction 0..1, what is happening)


@dataclass
class BuildResult:
    version: int | None  # None: nothing changed, no new version
    base_version: int | None
    stats: dict = field(default_factory=dict)
    folder: str | None = None
    sha256: str | None = None
    size_bytes: int = 0
    manifest: dict = field(default_factory=dict)
    snapshot: Snapshot | None = None  # the new version, in memory (the writer keeps it for its next build)


def document_hash(doc: dict) -> str:
    key = {k: doc.get(k) for k in ("text", "source", "language", "path", "metadata")}
    return hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def build_version(tenant: str, *, action: str, documents: list[dict], remove_ids: list[str], base: Snapshot | None,
                  embedder: Embedder, build_name: str, exact_max: int, tombstone_fraction: float,
                  batch_size: int = 64, progress: Progress | None = None) -> BuildResult:
    """Apply one change set to ``base`` and write the result as a new snapshot (or report no change).

    - ``add``: upsert ``documents`` (same id = replace). ``remove``: drop ``remove_ids``.
    - ``rebuild``: ``documents`` become the whole index; with none, the current chunks are rebuilt as they are
      (fresh dense index without tombstones, re-embedded if the configured model changed).
    """
    t0 = time.perf_counter()
    progress = progress or (lambda f, what: None)
    change = _Change.start(action, documents, base, embedder)
    if action == "remove":
        change.remove(remove_ids)
    else:
        change.upsert(documents)
    if base is not None and not change.same_model:
        change.to_embed = list(change.chunks.values())  # the embedding model changed: every vector must be recomputed
    stats = change.stats
    if not (action == "rebuild" or stats["documents_added"] or stats["documents_updated"] or stats["documents_removed"]):
        return BuildResult(version=None, base_version=base.version if base else None, stats=stats)

    vectors = _vectors(change, base, embedder, batch_size, progress)
    progress(0.8, "indexing")
    if base is not None and change.same_model and action != "rebuild":
        final, lines, dense, keyword = _updated_indexes(change, base, vectors, embedder.dim, exact_max, tombstone_fraction)
    else:
        final, lines = list(change.chunks.values()), None
        dense, keyword = _fresh_indexes(final, base if change.same_model else None, vectors, embedder.dim, exact_max)
    progress(0.9, "writing snapshot")
    return _write(tenant, change, base, final, lines, dense, keyword, embedder=embedder, action=action,
                  build_name=build_name, t0=t0, progress=progress)


@dataclass
class _Change:
    """The documents and chunks of the version being built, and what changed against the base."""

    base_chunks: dict[str, dict]
    same_model: bool
    next_id: int
    docs: dict[str, dict]
    chunks: dict[str, dict]
    stats: dict
    to_embed: list[dict] = field(default_factory=list)
    added: list[str] = field(default_factory=list)  # chunk ids (re)inserted by this build, in order

    @classmethod
    def start(cls, action: str, documents: list[dict], base: Snapshot | None, embedder: Embedder) -> _Change:
        base_chunks = {c["id"]: c for c in base.chunks} if base else {}
        replace = action == "rebuild" and documents
        return cls(base_chunks=base_chunks,
                   same_model=base is not None and base.manifest.get("embedding_model") == embedder.name,
                   next_id=int(base.manifest.get("next_id", 0)) if base else 0,
                   docs={} if replace else dict(base.documents) if base else {},
                   chunks={} if replace else dict(base_chunks),
                   stats={"documents_added": 0, "documents_updated": 0, "documents_unchanged": 0,
                          "documents_removed": 0, "missing": [], "chunks_embedded": 0, "chunks_reused": 0})

    def drop(self, doc_id: str) -> None:
        for cid in self.docs.pop(doc_id, {}).get("chunk_ids", []):
            self.chunks.pop(cid, None)

    def remove(self, remove_ids: list[str]) -> None:
        for doc_id in dict.fromkeys(remove_ids):
            if doc_id in self.docs:
                self.drop(doc_id)
                self.stats["documents_removed"] += 1
            else:
                self.stats["missing"].append(doc_id)

    def upsert(self, documents: list[dict]) -> None:
        latest = {d["id"]: d for d in documents}  # same id twice: the last one wins
        for doc_id, doc in latest.items():
            h = document_hash(doc)
            if doc_id in self.docs and self.docs[doc_id]["hash"] == h:
                self.stats["documents_unchanged"] += 1
                continue
            self.stats["documents_updated" if doc_id in self.docs else "documents_added"] += 1
            self.drop(doc_id)
            new = chunk_document(doc_id, doc["text"], source=doc.get("source"), language=doc.get("language"),
                                 path=doc.get("path"), metadata=doc.get("metadata"))
            for ch in new:
                self._add_chunk({**ch.to_json(), "doc_hash": h})
            self.docs[doc_id] = {"hash": h, "chunk_ids": [c.id for c in new], "source": doc.get("source"),
                                 "path": doc.get("path")}

    def _add_chunk(self, entry: dict) -> None:
        old = self.base_chunks.get(entry["id"])
        if self.same_model and old is not None and old["content_hash"] == entry["content_hash"]:
            entry["faiss_id"] = old["faiss_id"]  # the very same vector stays in the index
        else:
            entry["faiss_id"] = self.next_id
            self.next_id += 1
            self.to_embed.append(entry)
        self.chunks[entry["id"]] = entry
        self.added.append(entry["id"])


def _vectors(change: _Change, base: Snapshot | None, embedder: Embedder, batch_size: int,
             progress: Progress) -> dict[int, np.ndarray]:
    """Vectors of the chunks to (re)insert by FAISS id: read back by content hash when the base has them
    (same embedding model), embedded otherwise."""
    by_hash = {c["content_hash"]: int(c["faiss_id"]) for c in base.chunks} if change.same_model else {}
    reuse = [e for e in change.to_embed if e["content_hash"] in by_hash]
    fresh = [e for e in change.to_embed if e["content_hash"] not in by_hash]
    vectors: dict[int, np.ndarray] = {}
    if reuse:
        got = base.dense.vectors([by_hash[e["content_hash"]] for e in reuse])
        vectors.update({e["faiss_id"]: got[i] for i, e in enumerate(reuse)})
    if fresh:
        progress(0.0, f"embedding {len(fresh)} chunks")
        emb = embedder.encode([e["text"] for e in fresh], batch_size=batch_size,
                              progress=lambda done, total: progress(0.8 * done / total, f"embedded {done}/{total} chunks"))
        vectors.update({e["faiss_id"]: emb[i] for i, e in enumerate(fresh)})
    change.stats["chunks_embedded"], change.stats["chunks_reused"] = len(fresh), len(reuse)
    return vectors


def _fresh_indexes(final: list[dict], base: Snapshot | None, vectors: dict[int, np.ndarray], dim: int,
                   exact_max: int) -> tuple[DenseIndex, KeywordIndex]:
    """New dense and keyword indexes over ``final``; vectors not in ``vectors`` come from ``base``."""
    known = base.dense.all_vectors() if base is not None else (np.zeros(0, np.int64), None)
    old_pos = {int(fid): i for i, fid in enumerate(known[0])}
    ids = np.array([int(c["faiss_id"]) for c in final], dtype=np.int64)
    vecs = np.zeros((len(final), dim), dtype=np.float32)
    for i, fid in enumerate(ids):
        vecs[i] = vectors[int(fid)] if int(fid) in vectors else known[1][old_pos[int(fid)]]
    return DenseIndex.build(dim, ids, vecs, exact_max), KeywordIndex().build([tokenize(c["text"]) for c in final])


def _updated_indexes(change: _Change, base: Snapshot, vectors: dict[int, np.ndarray], dim: int, exact_max: int,
                     tombstone_fraction: float):
    """The base's indexes changed in place: base rows that survive untouched keep their order (and BM25 rows);
    the rest follow. Returns (final chunks, chunk lines, dense, keyword)."""
    chunks, added = change.chunks, change.added
    added_set = set(added)
    keep = np.array([c["id"] in chunks and c["id"] not in added_set for c in base.chunks], dtype=bool)
    final = [c for c, k in zip(base.chunks, keep) if k] + [chunks[cid] for cid in added if cid in chunks]
    lines = [line for line, k in zip(base.lines, keep) if k] if base.lines is not None else None
    final_ids = {int(c["faiss_id"]) for c in final}
    dense = base.dense  # the writer's own copy of the base (never a reader's)
    dense.remove([fid for fid in base.position if fid not in final_ids])
    new_ids = np.array(sorted(vectors), dtype=np.int64)
    dense.add(new_ids, np.vstack([vectors[int(i)] for i in new_ids]) if len(new_ids) else np.zeros((0, dim), np.float32))
    if dense.needs_rebuild(tombstone_fraction, exact_max):
        dense = dense.rebuilt(exact_max)
        change.stats["compacted"] = True
    keyword = base.keyword.updated(keep, [tokenize(chunks[cid]["text"]) for cid in added if cid in chunks])
    if lines is not None:
        lines += [json.dumps(chunks[cid], ensure_ascii=False) for cid in added if cid in chunks]
    return final, lines, dense, keyword


def _write(tenant: str, change: _Change, base: Snapshot | None, final: list[dict], lines: list[str] | None,
           dense: DenseIndex, keyword: KeywordIndex, *, embedder: Embedder, action: str, build_name: str, t0: float,
           progress: Progress) -> BuildResult:
    docs, stats = change.docs, change.stats
    version = next_version(tenant)
    manifest = {"embedding_model": embedder.name, "dim": embedder.dim, "dense_kind": dense.kind,
                "documents": len(docs), "chunks": len(final), "tombstones": len(dense.tombstones),
                "next_id": change.next_id, "parent_version": base.version if base else None, "action": action,
                "build": build_name, "created_at": time.time()}
    lines = lines if lines is not None else [json.dumps(c, ensure_ascii=False) for c in final]
    folder, sha, size = write_snapshot(tenant, version, build_name, lines=lines, dense=dense, keyword=keyword,
                                       manifest=manifest)
    stats.update(documents=len(docs), chunks=len(final), dense_kind=dense.kind, tombstones=len(dense.tombstones),
                 seconds=round(time.perf_counter() - t0, 3))
    progress(1.0, f"wrote v{version}")
    snapshot = Snapshot(tenant, version, folder, {**manifest, "version": version}, final, docs, dense, keyword,
                        lines=lines, manifest_sha256=sha)
    return BuildResult(version=version, base_version=base.version if base else None, stats=stats, folder=str(folder),
                       sha256=sha, size_bytes=size, manifest=manifest, snapshot=snapshot)
