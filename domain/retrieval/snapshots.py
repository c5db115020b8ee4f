"""Versioned index snapshots on disk, the CURRENT pointer, and the single-writer lease.

    <data root>/index/<tenant>/
        CURRENT                  {"version": 7}  (replaced atomically: write a temp file, fsync, os.replace)
        v7/ manifest.json        version, model, counts, sha256 of every other file
            chunks.jsonl         one chunk per line; line i = BM25 row i; faiss_id = its id in the dense index;
                                 doc_hash = the hash of its document (documents are derived from the chunks)
            dense.faiss dense.json keyword.json bm25/...   (FAISS and bm25s's own .npy/.json: no pickle)
        .build-<job id>/         a snapshot being written; renamed to v<N> only when complete

A crash mid-build leaves a ``.build-*`` folder and CURRENT untouched: readers keep the previous version.

With an artifact store other than the data folder (``FOUNDRY_ARTIFACT_URL=s3://...``, domain/storage.py),
each finished snapshot is also put in the store (``index/<tenant>/v<N>``, verified), and the pointer too:
``index/<tenant>/CURRENT`` holds the version and the sha256 of its manifest.json, replaced in one PUT after
the snapshot is stored. Readers on any host read that pointer (at most every ``POINTER_POLL_S`` seconds)
and fetch a version they do not have into their node-local cache, verified; so a new version reaches
every host without a restart. If the store cannot be reached, readers keep the version they serve.
Loading checks every file against the manifest's hashes; a mismatch raises ``CorruptSnapshot``.

One writer per tenant: a row in the ledger's ``leases`` table (``index:<tenant>``), taken with a
conditional UPDATE/INSERT so it works on PostgreSQL and SQLite and across hosts sharing the data root. It
expires (``FOUNDRY_INDEX_LEASE_TTL_S``) unless renewed, so a writer killed mid-build blocks the next one for
at most that long; it is released in the same transaction that records the new snapshot.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from sqlalchemy import delete, insert, or_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from domain.ledger.db import session_scope
from domain.ledger.models import Lease, utcnow
from domain.paths import data_root, fresh_dir, publish_dir, sha256_file
from domain.retrieval.dense import DenseIndex
from domain.retrieval.keyword import KeywordIndex

MANIFEST = "manifest.json"
POINTER_POLL_S = 2.0  # how often a reader asks the store whether CURRENT moved
_pointers: dict[str, tuple[float, dict | None]] = {}  # tenant -> (monotonic time read, pointer)


class CorruptSnapshot(RuntimeError):
    """A snapshot's files do not match its manifest (or it cannot be read)."""


@dataclass
class Snapshot:
    """One loaded, immutable index version."""

    tenant: str
    version: int
    folder: Path
    manifest: dict
    chunks: list[dict]  # position i = BM25 row i
    documents: dict[str, dict]  # id -> {"hash", "chunk_ids"}
    dense: DenseIndex
    keyword: KeywordIndex
    lines: list[str] | None = None  # chunks as their JSON lines (an update rewrites unchanged ones verbatim)
    manifest_sha256: str | None = None
    position: dict[int, int] = field(default_factory=dict)  # faiss id -> position in chunks

    def __post_init__(self):
        if not self.position:
            self.position = {int(c["faiss_id"]): i for i, c in enumerate(self.chunks)}


def tenant_dir(tenant: str) -> Path:
    return data_root() / "index" / tenant


def version_dir(tenant: str, version: int) -> Path:
    return tenant_dir(tenant) / f"v{version}"


def relative_path(tenant: str, version: int) -> str:
    return f"index/{tenant}/v{version}"


# ---- the CURRENT pointer ---------------------------------------------------------------------

def _remote_store():
    """The artifact store when it is not this host's data folder, else None."""
    from domain import storage

    store = storage.get_store()
    return None if storage.holds_data_folder(store) else store


def store_pointer(tenant: str, *, fresh: bool = False) -> dict | None:
    """The store's CURRENT pointer ({"version", "sha256"}), re-read at most every POINTER_POLL_S seconds;
    None without a remote store or when it holds no pointer. Raises StoreUnavailable."""
    from domain import storage

    store = _remote_store()
    if store is None:
        return None
    now = time.monotonic()
    seen = _pointers.get(tenant)
    if seen is not None and not fresh and now - seen[0] < POINTER_POLL_S:
        return seen[1]
    try:
        pointer = json.loads(store.get_bytes(f"index/{tenant}/CURRENT"))
    except storage.ObjectMissing:
        pointer = None
    except ValueError as exc:
        raise CorruptSnapshot(f"the store's index/{tenant}/CURRENT is unreadable: {exc}") from exc
    _pointers[tenant] = (now, pointer)
    return pointer


def read_current(tenant: str) -> int | None:
    pointer = store_pointer(tenant)
    if pointer is not None:
        try:
            return int(pointer["version"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptSnapshot(f"the store's index/{tenant}/CURRENT is unreadable: {exc}") from exc
    try:
        return int(json.loads((tenant_dir(tenant) / "CURRENT").read_text())["version"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptSnapshot(f"index/{tenant}/CURRENT is unreadable: {exc}") from exc


def current_signature(tenant: str) -> tuple | None:
    """A cheap fingerprint of the CURRENT pointer (changes when it is replaced), or None if there is none:
    the store's pointer (version, sha256) with a remote store, else the local file's stat."""
    pointer = store_pointer(tenant)
    if pointer is not None:
        return ("store", pointer.get("version"), pointer.get("sha256"))
    try:
        st = os.stat(tenant_dir(tenant) / "CURRENT")
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def switch_current(tenant: str, version: int) -> None:
    """Point readers at ``version``: write a temp file, fsync it, rename it over CURRENT (atomic)."""
    folder = tenant_dir(tenant)
    tmp = folder / f".CURRENT.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps({"version": version, "switched_at": time.time()}))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / "CURRENT")
    _fsync_dir(folder)
    store = _remote_store()
    if store is not None:  # the snapshot is in the store already (write_snapshot): now point every host at it
        sha = sha256_file(version_dir(tenant, version) / MANIFEST)
        store.put_bytes(f"index/{tenant}/CURRENT", json.dumps({"version": version, "sha256": sha}).encode())
        _pointers.pop(tenant, None)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def versions_on_disk(tenant: str) -> list[int]:
    folder = tenant_dir(tenant)
    if not folder.exists():
        return []
    found = []
    for p in folder.iterdir():
        if p.is_dir() and p.name.startswith("v") and p.name[1:].isdigit():
            found.append(int(p.name[1:]))
    return sorted(found)


def next_version(tenant: str) -> int:
    current = read_current(tenant) if (tenant_dir(tenant) / "CURRENT").exists() else None
    return max(versions_on_disk(tenant) + [current or 0]) + 1


# ---- writing and reading a snapshot ----------------------------------------------------------

def write_snapshot(tenant: str, version: int, build_name: str, *, lines: list[str], dense: DenseIndex,
                   keyword: KeywordIndex, manifest: dict) -> tuple[Path, str, int]:
    """Write a complete snapshot under a temp name, then rename it to v<version>.
    Returns (folder, sha256 of the manifest, size in bytes)."""
    root = tenant_dir(tenant)
    tmp = fresh_dir(root / f".build-{build_name}")
    with open(tmp / "chunks.jsonl", "w") as f:
        f.write("".join(line + "\n" for line in lines))
    dense.save(tmp)
    keyword.save(tmp)
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    for p in files:
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
    manifest = {**manifest, "version": version, "tenant": tenant,
                "files": {str(p.relative_to(tmp)): sha256_file(p) for p in files}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    final = version_dir(tenant, version)
    publish_dir(tmp, final)  # replaces a copy left by an attempt whose ledger commit failed (never pointed to)
    _fsync_dir(root)
    if _remote_store() is not None:  # verified upload before the ledger records it (StoreUnavailable: retried)
        from domain import storage

        storage.publish_tree(final, relative_path(tenant, version), primary=MANIFEST, tenant=tenant)
    size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
    return final, sha256_file(final / MANIFEST), size


def verify(folder: Path) -> dict:
    """The manifest, after checking every file it lists; raises CorruptSnapshot."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise CorruptSnapshot(f"{folder.name}: manifest unreadable: {exc}") from exc
    for rel, expected in manifest.get("files", {}).items():
        path = folder / rel
        if not path.is_file():
            raise CorruptSnapshot(f"{folder.name}: {rel} is missing")
        if sha256_file(path) != expected:
            raise CorruptSnapshot(f"{folder.name}: {rel} does not match its sha256 in the manifest")
    return manifest


def _fetched(tenant: str, version: int) -> Path | None:
    """A version not on this host, from the store into the node-local cache (verified), or None."""
    from domain import storage

    store = _remote_store()
    if store is None:
        return None
    key = relative_path(tenant, version)
    pointer = store_pointer(tenant) or {}
    try:
        sha = pointer["sha256"] if pointer.get("version") == version else store.manifest(key).sha256
        return storage.fetch_tree(key, sha, tenant=tenant)
    except (storage.ObjectMissing, storage.ObjectCorrupt) as exc:
        raise CorruptSnapshot(f"index/{tenant}/v{version} in the store: {exc}") from exc


def load_snapshot(tenant: str, version: int, *, check: bool = True) -> Snapshot:
    folder = version_dir(tenant, version)
    if not folder.is_dir():
        folder = _fetched(tenant, version) or folder
    if not folder.is_dir():
        raise CorruptSnapshot(f"index/{tenant}/v{version} does not exist")
    manifest = verify(folder) if check else json.loads((folder / MANIFEST).read_text())
    try:
        with open(folder / "chunks.jsonl") as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
        chunks = [json.loads(line) for line in lines]
        documents = documents_of(chunks)
        dense = DenseIndex.load(folder)
        keyword = KeywordIndex.load(folder)
    except Exception as exc:  # noqa: BLE001 - any unreadable part makes the snapshot unusable
        raise CorruptSnapshot(f"index/{tenant}/v{version} cannot be loaded: {type(exc).__name__}: {exc}") from exc
    if keyword.size != len(chunks) or dense.live != len(chunks):
        raise CorruptSnapshot(f"index/{tenant}/v{version}: {len(chunks)} chunks but {keyword.size} BM25 rows and "
                              f"{dense.live} live vectors")
    return Snapshot(tenant, version, folder, manifest, chunks, documents, dense, keyword, lines=lines,
                    manifest_sha256=sha256_file(folder / MANIFEST))


def documents_of(chunks: list[dict]) -> dict[str, dict]:
    """Document id -> {hash, chunk_ids, source, path}, from the chunks (a document's chunks are contiguous)."""
    documents: dict[str, dict] = {}
    for c in chunks:
        d = documents.get(c["document_id"])
        if d is None:
            d = documents[c["document_id"]] = {"hash": c.get("doc_hash"), "chunk_ids": [], "source": c.get("source"),
                                               "path": c.get("path")}
        d["chunk_ids"].append(c["id"])
    return documents


def prune(tenant: str, keep: int, current: int) -> list[int]:
    """Delete snapshot folders beyond the newest ``keep`` (never the current one) and stale build folders."""
    removed = []
    for v in versions_on_disk(tenant)[:-keep] if keep > 0 else []:
        if v != current:
            shutil.rmtree(version_dir(tenant, v), ignore_errors=True)
            removed.append(v)
    return removed


def clean_stale_builds(tenant: str, older_than_s: float) -> None:
    """Remove ``.build-*`` folders a crashed writer left (only old ones: a live writer holds the lease)."""
    folder = tenant_dir(tenant)
    if not folder.exists():
        return
    for p in folder.glob(".build-*"):
        try:
            if time.time() - p.stat().st_mtime > older_than_s:
                shutil.rmtree(p, ignore_errors=True)
        except FileNotFoundError:
            pass


# ---- the writer lease ------------------------------------------------------------------------

class WriterBusy(RuntimeError):
    """Another writer holds the tenant's index lease."""


def lease_name(tenant: str) -> str:
    return f"index:{tenant}"


def acquire_lease(tenant: str, holder: str, ttl_s: float) -> None:
    """Take the tenant's writer lease (or renew our own, or take over an expired one); WriterBusy if held."""
    name, now = lease_name(tenant), utcnow()
    expires = now + timedelta(seconds=ttl_s)
    with session_scope() as s:
        taken = s.execute(update(Lease).where(Lease.name == name, or_(Lease.holder == holder, Lease.expires_at < now))
                          .values(holder=holder, expires_at=expires, acquired_at=now)).rowcount
    if taken:
        return
    try:
        with session_scope() as s:
            s.execute(insert(Lease).values(name=name, holder=holder, expires_at=expires, acquired_at=now))
    except IntegrityError:
        with session_scope() as s:
            other = s.get(Lease, name)
        raise WriterBusy(f"the index of tenant {tenant!r} is being written by {other.holder if other else '?'} "
                         f"(lease until {other.expires_at if other else '?'})") from None


def renew_lease(tenant: str, holder: str, ttl_s: float) -> bool:
    with session_scope() as s:
        return bool(s.execute(update(Lease).where(Lease.name == lease_name(tenant), Lease.holder == holder)
                              .values(expires_at=utcnow() + timedelta(seconds=ttl_s))).rowcount)


def release_lease(tenant: str, holder: str, session: Session | None = None) -> None:
    stmt = delete(Lease).where(Lease.name == lease_name(tenant), Lease.holder == holder)
    if session is not None:
        session.execute(stmt)
        return
    with session_scope() as s:
        s.execute(stmt)
