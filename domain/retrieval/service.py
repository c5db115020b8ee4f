"""The index job (``handle_index``) and what reviews call (``retrieve_context``).

    ctx = retrieve_context("acme", code, k=4)         # RetrievedContext(chunks=[...], index_version=7)
    for c in ctx.chunks: c.id, c.score, c.text, c.path, c.source, c.document_id

The relevance floor is the context quality check: a chunk whose cosine similarity to the query is below it is
not returned, so a review gets no context rather than irrelevant context.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

from sqlalchemy import select

from domain import costs
from domain.config import get_settings
from domain.contract import Outcome
from domain.errors import JobFailed, TransientError
from domain.ledger.db import session_scope
from domain.ledger.models import Artifact, Feedback, Review
from domain.paths import sha256_file
from domain.retrieval import reader
from domain.retrieval.builder import build_version
from domain.retrieval.embedding import get_embedder
from domain.retrieval.fusion import DEFAULT_FUSION, FusionConfig
from domain.retrieval.snapshots import (
    CorruptSnapshot, Snapshot, WriterBusy, acquire_lease, clean_stale_builds, load_snapshot, prune, read_current,
    relative_path, release_lease, renew_lease, switch_current, version_dir, versions_on_disk,
)

log = logging.getLogger(__name__)


# ---- readers ---------------------------------------------------------------------------------

@dataclass
class ContextChunk:
    id: str
    text: str
    score: float  # cosine similarity to the query: the value the relevance floor is compared with
    path: str | None
    source: str | None
    document_id: str
    rank_score: float = 0.0  # the fused dense+BM25 score the chunks are ordered by
    symbol: str | None = None
    language: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class RetrievedContext:
    chunks: list[ContextChunk] = field(default_factory=list)
    index_version: int | None = None  # None: the tenant has no index yet


def retrieve_context(tenant: str, query: str, k: int = 4, floor: float | None = None,
                     fusion: FusionConfig = DEFAULT_FUSION) -> RetrievedContext:
    """The top ``k`` chunks of the tenant's current index for ``query`` whose similarity is at least ``floor``
    (default FOUNDRY_RETRIEVAL_FLOOR). An empty context when the tenant has no index yet."""
    snapshot = reader.current_snapshot(tenant)
    if snapshot is None:
        return RetrievedContext([], None)
    floor = get_settings().retrieval.retrieval_floor if floor is None else floor
    hits = reader.search(snapshot, query, k=max(k, 1) * 2 if k > 0 else 0, fusion=fusion)
    chunks = [ContextChunk(id=h.chunk["id"], text=h.chunk["text"], score=round(h.similarity, 6),
                           path=h.chunk.get("path"), source=h.chunk.get("source"), document_id=h.chunk["document_id"],
                           rank_score=round(h.score, 6), symbol=h.chunk.get("symbol"), language=h.chunk.get("language"))
              for h in hits if h.similarity >= floor]
    return RetrievedContext(chunks[:k], snapshot.version)


def index_stats(tenant: str) -> dict:
    """What `foundry index stats` shows: the serving version and its counts, the versions on disk, the lease."""
    from domain.ledger.models import Lease
    from domain.retrieval.snapshots import lease_name

    out: dict = {"tenant": tenant, "current_version": None, "versions_on_disk": versions_on_disk(tenant)}
    try:
        out["current_version"] = read_current(tenant)
    except CorruptSnapshot as exc:
        out["error"] = str(exc)
    snapshot = reader.current_snapshot(tenant)
    if snapshot is not None:
        m = snapshot.manifest
        out.update(serving_version=snapshot.version, documents=len(snapshot.documents), chunks=len(snapshot.chunks),
                   dense_kind=snapshot.dense.kind, tombstones=len(snapshot.dense.tombstones),
                   embedding_model=m.get("embedding_model"), dim=m.get("dim"))
    with session_scope() as s:
        lease = s.get(Lease, lease_name(tenant))
        out["writer"] = {"holder": lease.holder, "expires_at": str(lease.expires_at)} if lease else None
        arts = list(s.scalars(select(Artifact).where(Artifact.kind == "index_snapshot", Artifact.tenant_id == tenant)
                              .order_by(Artifact.created_at.desc()).limit(10)))
        out["artifacts"] = [{"id": a.id, "version": a.version, "status": a.status, "sha256": a.sha256,
                             "documents": a.report.get("documents"), "chunks": a.report.get("chunks"),
                             "job": a.created_by_job_id, "created_at": str(a.created_at)} for a in arts]
    return out


# ---- the index job ---------------------------------------------------------------------------

def accepted_review_documents(tenant: str) -> list[dict]:
    """The tenant's reviews with an 'accept' verdict, as documents (id ``review:<review id>``)."""
    with session_scope() as s:
        rows = s.execute(select(Review, Feedback).join(Feedback, Feedback.review_id == Review.id)
                         .where(Review.tenant_id == tenant, Feedback.verdict == "accept")
                         .order_by(Review.created_at)).all()
        docs: dict[str, dict] = {}
        for review, fb in rows:
            findings = "\n".join(f"- line {f.get('line', '?')} [{f.get('severity', 'info')}]: {f.get('message', '')}"
                                 for f in (review.findings or []) if isinstance(f, dict))
            parts = [f"Accepted review of {review.path or 'a snippet'}" + (f" ({review.language})" if review.language else ""),
                     "Code:\n" + review.code[:4000], "Review:\n" + (review.summary or review.raw_text or "")]
            if findings:
                parts.append("Findings:\n" + findings)
            if fb.correction:
                parts.append("Reviewer correction:\n" + fb.correction)
            docs[f"review:{review.id}"] = {"id": f"review:{review.id}", "text": "\n\n".join(parts), "source": "review",
                                          "language": None, "path": review.path,
                                          "metadata": {"review_id": review.id, "feedback_id": fb.id}}
    return list(docs.values())


# The last snapshot this process wrote, per tenant: the next build starts from it instead of reloading and
# re-verifying it from disk, as long as CURRENT still points to it and its manifest is unchanged. A build takes
# it out (the builder changes its dense index in place) and the commit puts the new version back; a build that
# fails leaves nothing behind, so the next one reads the current version from disk.
_written: dict[str, Snapshot] = {}


def _latest_recorded_version(tenant: str) -> int | None:
    from sqlalchemy import func

    from domain.ledger.db import session_scope

    with session_scope() as s:
        return s.scalar(select(func.max(Artifact.version)).where(Artifact.kind == "index_snapshot",
                                                                 Artifact.tenant_id == tenant))


def _writer_base(tenant: str, action: str, ctx):
    """The snapshot to build on: the current one (a private copy: the writer mutates it)."""
    try:
        version = read_current(tenant)
    except CorruptSnapshot as exc:
        version, err = None, exc
    else:
        err = None
        if version is None:
            return None
        recorded = _latest_recorded_version(tenant)
        if recorded is None or version > recorded:
            # CURRENT was switched by a job whose ledger commit never landed (killed in between): that version is
            # not part of the record, so build on the last recorded one and let this job record a new version.
            ctx.health("index", "unrecorded_version", "degraded",
                       f"index/{tenant}/CURRENT points at v{version}, which the ledger does not record; "
                       f"building on {'v' + str(recorded) if recorded else 'an empty index'}", version=version)
            if recorded is None:
                return None
            version = recorded
        mine = _written.pop(tenant, None)
        if mine is not None and mine.version == version:
            try:
                if sha256_file(version_dir(tenant, version) / "manifest.json") == mine.manifest_sha256:
                    return mine
            except OSError:
                pass
        try:
            return load_snapshot(tenant, version)
        except CorruptSnapshot as exc:
            err = exc
    ctx.health("index", "corrupt", "degraded", f"current index snapshot of {tenant} is corrupt: {err}", version=version)
    if action != "rebuild":
        raise JobFailed(f"the current index snapshot of tenant {tenant!r} is corrupt ({err}); readers keep the last "
                        f"intact version; run an index rebuild (`foundry index rebuild --tenant {tenant} ...`)",
                        code="index_corrupt")
    for older in reversed(versions_on_disk(tenant)):  # a rebuild only reuses vectors: any intact version helps
        try:
            return load_snapshot(tenant, older)
        except CorruptSnapshot:
            continue
    return None


def _take_lease(tenant: str, holder: str, ttl: float, ctx) -> None:
    deadline = time.monotonic() + min(ttl, 60.0)
    while True:
        try:
            acquire_lease(tenant, holder, ttl)
            return
        except WriterBusy as exc:
            if time.monotonic() > deadline:
                raise TransientError(str(exc), code="index_busy") from None
        ctx.progress(0.0, step="waiting for the index writer lease")
        time.sleep(0.5)


def handle_index(spec, ctx):
    """Index job: add (upsert) / remove / rebuild the tenant's index as a new snapshot version. Stages: build
    the version under the tenant's writer lease, then (in the runner's success transaction) record it and
    switch readers to it."""
    settings = get_settings().retrieval
    tenant, holder = spec.tenant, f"job:{ctx.job_id}"
    t0 = time.perf_counter()
    built, embedder = _build_under_lease(spec, ctx, holder, settings)
    result = {"action": spec.action, "changed": built.version is not None, "base_version": built.base_version,
              "index_version": built.version if built.version is not None else built.base_version, **built.stats}
    usage = costs.Usage(model_id=embedder.name, wall_seconds=time.perf_counter() - t0)
    if built.version is None:
        release_lease(tenant, holder)
        return Outcome(result=result, usage=usage)
    return Outcome(result=result, usage=usage, commit=_commit_version(tenant, holder, built, embedder, ctx, settings))


def _build_under_lease(spec, ctx, holder: str, settings):
    """Take the tenant's writer lease and build the new snapshot version (renewing the lease as it goes);
    the lease is released on any failure, and stays held on success until the version is recorded."""
    tenant, ttl = spec.tenant, settings.index_lease_ttl_s
    _take_lease(tenant, holder, ttl, ctx)
    try:
        clean_stale_builds(tenant, older_than_s=ttl)
        base = _writer_base(tenant, spec.action, ctx)
        documents = [d.model_dump() for d in spec.documents]
        if spec.include_accepted_reviews:
            documents += accepted_review_documents(tenant)
        embedder = get_embedder()
        renewed = [time.monotonic()]

        def progress(fraction: float, what: str) -> None:
            ctx.progress(fraction, step=what)
            ctx.check()
            if time.monotonic() - renewed[0] > ttl / 4:
                if not renew_lease(tenant, holder, ttl):
                    raise TransientError(f"lost the index writer lease of {tenant}", code="index_lease_lost")
                renewed[0] = time.monotonic()

        built = build_version(tenant, action=spec.action, documents=documents, remove_ids=list(spec.document_ids),
                              base=base, embedder=embedder, build_name=ctx.job_id, exact_max=settings.index_exact_max,
                              tombstone_fraction=settings.index_tombstone_rebuild,
                              batch_size=settings.embedding_batch_size, progress=progress)
        if built.version is not None and not renew_lease(tenant, holder, ttl):
            raise TransientError(f"lost the index writer lease of {tenant}", code="index_lease_lost")
        return built, embedder
    except BaseException:
        release_lease(tenant, holder)
        raise


def _commit_version(tenant: str, holder: str, built, embedder, ctx, settings):
    """The success transaction's part: the new snapshot is the tenant's active index artifact, the lease is
    released, readers switch to it, old versions beyond the kept number are pruned."""

    def commit(session) -> dict:
        for old in session.scalars(select(Artifact).where(Artifact.kind == "index_snapshot", Artifact.tenant_id == tenant,
                                                          Artifact.status == "active")):
            old.status = "superseded"
        art = Artifact(kind="index_snapshot", tenant_id=tenant, name=f"index:{tenant}", version=built.version,
                       path=relative_path(tenant, built.version), sha256=built.sha256, size_bytes=built.size_bytes,
                       status="active", created_by_job_id=ctx.job_id,
                       lineage={"parent_version": built.base_version, "embedding_model": embedder.name},
                       report={k: v for k, v in built.stats.items() if k != "missing"})
        session.add(art)
        release_lease(tenant, holder, session)
        session.flush()
        switch_current(tenant, built.version)  # last step: readers switch only to a recorded, complete snapshot
        _written[tenant] = built.snapshot
        try:
            prune(tenant, settings.index_keep_versions, built.version)
        except OSError as exc:
            log.warning("could not prune old index versions of %s: %s", tenant, exc)
        return {"artifact_id": art.id}

    return commit
