"""Reading the index: the current snapshot of a tenant, cached per process, and hybrid search over it.

Each call stats the tenant's CURRENT file (one ``os.stat``), or, with a remote artifact store, reads the
store's pointer at most every couple of seconds (domain/retrieval/snapshots.py); only when it changed is
the new version loaded (fetched into this host's cache) and verified, so readers on every host pick up a
new snapshot without a restart. A version that fails verification is
reported once as a health event and the previously loaded (or newest intact older) version keeps serving.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np

from domain import health
from domain.retrieval.embedding import get_embedder
from domain.retrieval.fusion import DEFAULT_FUSION, FusionConfig, fuse, top_keyword
from domain.retrieval.snapshots import (
    CorruptSnapshot, Snapshot, current_signature, load_snapshot, read_current, versions_on_disk,
)

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    signature: tuple
    snapshot: Snapshot | None


_cache: dict[str, _Entry] = {}
_lock = threading.Lock()
_reported: set[tuple[str, int]] = set()


def current_snapshot(tenant: str) -> Snapshot | None:
    """The tenant's serving snapshot (None if it has no index). If the artifact store cannot be reached,
    the snapshot already loaded keeps serving."""
    from domain.storage import StoreUnavailable

    try:
        sig = current_signature(tenant)
    except StoreUnavailable:
        entry = _cache.get(tenant)
        if entry is None:
            raise
        return entry.snapshot
    if sig is None:
        _cache.pop(tenant, None)
        return None
    entry = _cache.get(tenant)
    if entry is not None and entry.signature == sig:
        return entry.snapshot
    with _lock:
        entry = _cache.get(tenant)
        if entry is not None and entry.signature == sig:
            return entry.snapshot
        previous = entry.snapshot if entry else None
        snapshot = _load_current(tenant, previous)
        _cache[tenant] = _Entry(sig, snapshot)
        return snapshot


def _load_current(tenant: str, previous: Snapshot | None) -> Snapshot | None:
    try:
        version = read_current(tenant)
    except CorruptSnapshot as exc:
        _report(tenant, -1, str(exc), previous)
        return previous
    if version is None:
        return None
    if previous is not None and previous.version == version:
        return previous
    from domain.storage import StoreUnavailable

    try:
        return load_snapshot(tenant, version)
    except StoreUnavailable:
        if previous is None:
            raise
        return previous  # the store is away: keep serving what is loaded
    except CorruptSnapshot as exc:
        fallback = previous
        if fallback is None:  # a fresh process: serve the newest intact older version on disk
            for older in reversed([v for v in versions_on_disk(tenant) if v < version]):
                try:
                    fallback = load_snapshot(tenant, older)
                    break
                except CorruptSnapshot:
                    continue
        _report(tenant, version, str(exc), fallback)
        return fallback


def _report(tenant: str, version: int, message: str, serving: Snapshot | None) -> None:
    if (tenant, version) in _reported:
        return
    _reported.add((tenant, version))
    status = "degraded" if serving is not None else "fail"
    served = serving.version if serving else None
    log.error("index %s v%s is corrupt (%s); serving %s", tenant, version, message, served)
    health.record("index", "corrupt", status, f"index snapshot v{version} of {tenant} failed verification: {message}; "
                  f"serving {'v' + str(served) if served else 'nothing'}",
                  detail={"tenant": tenant, "version": version, "serving_version": served}, tenant_id=tenant)


def forget(tenant: str | None = None) -> None:
    """Drop cached snapshots (tests; memory)."""
    with _lock:
        if tenant is None:
            _cache.clear()
            _reported.clear()
        else:
            _cache.pop(tenant, None)


@dataclass
class Hit:
    position: int  # row in snapshot.chunks
    chunk: dict
    score: float  # fused ranking score
    similarity: float  # cosine similarity of the chunk to the query (what the relevance floor checks)
    keyword_score: float


def search(snapshot: Snapshot, query: str, k: int = 10, fusion: FusionConfig = DEFAULT_FUSION,
           query_vector: np.ndarray | None = None) -> list[Hit]:
    """Hybrid search: dense and BM25 candidates (``fusion.depth`` each), fused, best ``k`` first."""
    if not snapshot.chunks or k <= 0:
        return []
    qv = query_vector if query_vector is not None else get_embedder(snapshot.manifest["embedding_model"]).encode([query])[0]
    dense: dict[int, float] = {}
    if fusion.method != "keyword":
        scores, ids = snapshot.dense.search(qv[None, :], fusion.depth if fusion.method != "dense" else k)
        for s, fid in zip(scores[0], ids[0]):
            pos = snapshot.position.get(int(fid))
            if pos is not None:
                dense[pos] = float(s)
    kw_scores = snapshot.keyword.scores(query) if fusion.method != "dense" else np.zeros(0)
    keyword = top_keyword(kw_scores, fusion.depth if fusion.method != "keyword" else k) if len(kw_scores) else {}
    hits = []
    for pos, fused in fuse(dense, keyword, fusion)[:k]:
        sim = dense.get(pos)
        if sim is None:
            vec = snapshot.dense.vectors([int(snapshot.chunks[pos]["faiss_id"])])[0]
            sim = float(np.dot(vec, qv))
        hits.append(Hit(pos, snapshot.chunks[pos], fused, sim, float(kw_scores[pos]) if len(kw_scores) else 0.0))
    return hits
