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
    same_model = base is not None and base.manifest.get("embedding_model") == embedder.name
    base_chunks = {c["id"]: c for c in base.chunks} if base else {}
    by_hash = {c["content_hash"]: int(c["faiss_id"]) for c in base.chunks} if same_model else {}
    next_id = int(base.manifest.get("next_id", 0)) if base else 0

    docs: dict[str, dict] = {} if action == "rebuild" and documents else dict(base.documents) if base else {}
    chunks: dict[str, dict] = {} if action == "rebuild" and documents else dict(base_chunks)
    stats = {"documents_added": 0, "documents_updated": 0, "documents_unchanged": 0, "documents_removed": 0,
             "missing": [], "chunks_embedded": 0, "chunks_reused": 0}

    def drop(doc_id: str) -> None:
        for cid in docs.pop(doc_id, {}).get("chunk_ids", []):
            chunks.pop(cid, None)

    if action == "remove":
        for doc_id in dict.fromkeys(remove_ids):
            if doc_id in docs:
                drop(doc_id)
                stats["documents_removed"] += 1
            else:
                stats["missing"].append(doc_id)

    to_embed: list[dict] = []
    added: list[str] = []  # chunk ids (re)inserted by this build, in order
    latest = {d["id"]: d for d in documents} if action != "remove" else {}  # same id twice: the last one wins
    for doc_id, doc in latest.items():
        h = document_hash(doc)
        if doc_id in docs and docs[doc_id]["hash"] == h:
            stats["documents_unchanged"] += 1
            continue
        stats["documents_updated" if doc_id in docs else "documents_added"] += 1
        drop(doc_id)
        new = chunk_document(doc_id, doc["text"], source=doc.get("source"), language=doc.get("language"),
                             path=doc.get("path"), metadata=doc.get("metadata"))
        for ch in new:
            entry = {**ch.to_json(), "doc_hash": h}
            old = base_chunks.get(ch.id)
            if same_model and old is not None and old["content_hash"] == ch.content_hash:
                entry["faiss_id"] = old["faiss_id"]  # the very same vector stays in the index
            else:
                entry["faiss_id"] = next_id
                next_id += 1
                to_embed.append(entry)
            chunks[ch.id] = entry
            added.append(ch.id)
        docs[doc_id] = {"hash": h, "chunk_ids": [c.id for c in new], "source": doc.get("source"), "path": doc.get("path")}

    if base is not None and not same_model:
        to_embed = list(chunks.values())  # the embedding model changed: every vector must be recomputed
    changed = action == "rebuild" or stats["documents_added"] or stats["documents_updated"] or stats["documents_removed"]
    if not changed:
        return BuildResult(version=None, base_version=base.version if base else None, stats=stats)

    # vectors: reuse by content hash, embed the rest
    reuse = [e for e in to_embed if e["content_hash"] in by_hash]
    fresh = [e for e in to_embed if e["content_hash"] not in by_hash]
    vectors: dict[int, np.ndarray] = {}
    if reuse:
        got = base.dense.vectors([by_hash[e["content_hash"]] for e in reuse])
        vectors.update({e["faiss_id"]: got[i] for i, e in enumerate(reuse)})
    if fresh:
        progress(0.0, f"embedding {len(fresh)} chunks")
        emb = embedder.encode([e["text"] for e in fresh], batch_size=batch_size,
                              progress=lambda done, total: progress(0.8 * done / total, f"embedded {done}/{total} chunks"))
        vectors.update({e["faiss_id"]: emb[i] for i, e in enumerate(fresh)})
    stats["chunks_embedded"], stats["chunks_reused"] = len(fresh), len(reuse)
    progress(0.8, "indexing")

    incremental = base is not None and same_model and action != "rebuild"
    if incremental:  # base rows that survive untouched keep their order (and BM25 rows); the rest follow
        added_set = set(added)
        keep = np.array([c["id"] in chunks and c["id"] not in added_set for c in base.chunks], dtype=bool)
        final = [c for c, k in zip(base.chunks, keep) if k] + [chunks[cid] for cid in added if cid in chunks]
        lines = [line for line, k in zip(base.lines, keep) if k] if base.lines is not None else None
    else:
        final, lines = list(chunks.values()), None
    final_ids = {int(c["faiss_id"]) for c in final}
    if not incremental:
        known = base.dense.all_vectors() if base is not None and same_model else (np.zeros(0, np.int64), None)
        old_pos = {int(fid): i for i, fid in enumerate(known[0])}
        ids = np.array([int(c["faiss_id"]) for c in final], dtype=np.int64)
        vecs = np.zeros((len(final), embedder.dim), dtype=np.float32)
        for i, fid in enumerate(ids):
            vecs[i] = vectors[int(fid)] if int(fid) in vectors else known[1][old_pos[int(fid)]]
        dense = DenseIndex.build(embedder.dim, ids, vecs, exact_max)
        keyword = KeywordIndex().build([tokenize(c["text"]) for c in final])
    else:
        dense = base.dense  # the writer's own copy of the base (never a reader's)
        gone = [fid for fid in base.position if fid not in final_ids]
        dense.remove(gone)
        new_ids = np.array(sorted(vectors), dtype=np.int64)
        dense.add(new_ids, np.vstack([vectors[int(i)] for i in new_ids]) if len(new_ids) else np.zeros((0, embedder.dim), np.float32))
        if dense.needs_rebuild(tombstone_fraction, exact_max):
            dense = dense.rebuilt(exact_max)
            stats["compacted"] = True
        keyword = base.keyword.updated(keep, [tokenize(chunks[cid]["text"]) for cid in added if cid in chunks])
        if lines is not None:
            lines += [json.dumps(chunks[cid], ensure_ascii=False) for cid in added if cid in chunks]
    progress(0.9, "writing snapshot")

    version = next_version(tenant)
    manifest = {"embedding_model": embedder.name, "dim": embedder.dim, "dense_kind": dense.kind,
                "documents": len(docs), "chunks": len(final), "tombstones": len(dense.tombstones), "next_id": next_id,
                "parent_version": base.version if base else None, "action": action, "build": build_name,
                "created_at": time.time()}
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
