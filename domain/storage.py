"""The artifact store, addressed by URL, and the node-local cache in front of it.

``FOUNDRY_ARTIFACT_URL`` says where every artifact lives: ``file:///some/folder`` (default: the data
folder itself, so the embedded default keeps its files where they always were and uploads nothing) or
``s3://bucket/prefix`` on any S3-compatible store (MinIO, AWS S3, R2), reached through fsspec + s3fs.
Endpoint and region come from ``FOUNDRY_ARTIFACT_ENDPOINT_URL`` / ``FOUNDRY_ARTIFACT_REGION``, credentials
from the standard AWS variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, profiles, instance
roles) or from files named by ``AWS_ACCESS_KEY_ID_FILE`` / ``AWS_SECRET_ACCESS_KEY_FILE`` (compose secrets,
``domain.secrets``), never from Foundry's settings and never logged.

Keys are the paths the ledger already records (``adapters/<tenant>/<name>/<folder>``...), relative to the
store's root: the default store's keys are today's paths under the data folder, so nothing moves. A
folder is stored as its files plus a manifest (``.foundry-manifest.json``: sha256 and size of every file
and of the whole tree), written last: an object without its manifest does not exist for a reader.

Writes are atomic: each file goes to a temporary key, is read back and checked (size and sha256), then
copied to its final key; the manifest follows the same way, last. Reads are verified: every file fetched
must match the manifest, and the manifest must match the sha256 the ledger recorded.

``NodeCache`` keeps fetched objects on this host, content-addressed by that sha256
(``<cache>/objects/<sha256>/``), bounded by ``FOUNDRY_CACHE_MAX_GB`` with least-recently-used eviction.
Several worker processes on one host share it safely: one process downloads an object (a file lock per
object), into a private temporary folder, verified, then renamed into place; eviction renames an entry
away before deleting it, so a reader sees a whole entry or none.

Faults: a store that cannot be reached is retried with backoff, then ``StoreUnavailable`` (a
``TransientError``: the job is retried later; nothing is recorded as succeeded without its objects) with a
``store/unreachable`` health event; a missing object is ``ObjectMissing``, a corrupt one ``ObjectCorrupt``
(both ``JobFailed`` with a clear code, and a health event); a key outside the tenant's prefix is refused
(``KeyRefused``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from domain import health
from domain.errors import JobFailed, TransientError
from domain.paths import UnsafePath

log = logging.getLogger(__name__)

MANIFEST = ".foundry-manifest.json"
TMP_PREFIX = "tmp/uploads"


class StoreUnavailable(TransientError):
    def __init__(self, message: str):
        super().__init__(message, code="store_unavailable")


class ObjectMissing(JobFailed):
    def __init__(self, message: str):
        super().__init__(message, code="object_missing")


class ObjectCorrupt(JobFailed):
    def __init__(self, message: str):
        super().__init__(message, code="object_corrupt")


class KeyRefused(UnsafePath):
    """A key that leaves the store's root or the tenant's prefix."""


def check_key(key: str, tenant: str | None = None) -> str:
    """The key, normalized; refuses absolute keys, ``..``, empty or odd segments, and (with ``tenant``) a
    key whose tenant segment (``<area>/<tenant>/...``) is not that tenant."""
    text = str(key).replace("\\", "/")
    if not text or text.startswith("/") or "://" in text or any(ord(c) < 32 for c in text):
        raise KeyRefused(f"store key {key!r} is not a relative key")
    parts = PurePosixPath(text).parts
    if any(p in ("", ".", "..") for p in parts):
        raise KeyRefused(f"store key {key!r} contains '.' or '..'")
    if tenant is not None and (len(parts) < 3 or parts[1] != tenant):
        raise KeyRefused(f"store key {key!r} is outside tenant {tenant!r}'s prefix (<area>/{tenant}/...)")
    return "/".join(parts)


@dataclass(frozen=True)
class Manifest:
    sha256: str  # of the tree: names and sha256 of its files, in sorted order (domain.paths.sha256_tree)
    size_bytes: int
    files: dict[str, dict] = field(default_factory=dict)  # relative name -> {"sha256", "size"}
    primary: str | None = None  # the file whose sha256 the ledger records (adapter weights), if not the tree's

    def accepts(self, sha256: str) -> bool:
        """Whether ``sha256`` (as the ledger recorded it) names this object: its tree or its primary file."""
        return sha256 in (self.sha256, (self.files.get(self.primary) or {}).get("sha256"))

    def to_json(self) -> str:
        return json.dumps({"sha256": self.sha256, "size_bytes": self.size_bytes, "files": self.files,
                           "primary": self.primary}, sort_keys=True)

    @staticmethod
    def from_json(text: str | bytes) -> Manifest:
        d = json.loads(text)
        return Manifest(str(d["sha256"]), int(d["size_bytes"]), dict(d["files"]), d.get("primary"))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def describe_tree(folder: Path, primary: str | None = None) -> Manifest:
    """The manifest of a local folder (the tree hash is ``domain.paths.sha256_tree``'s)."""
    files, tree = {}, hashlib.sha256()
    # dot-files skipped, as by paths.sha256_tree: caches a library writes next to weights are not the object
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith(".")):
        name, digest = f.relative_to(folder).as_posix(), _sha256_file(f)
        files[name] = {"sha256": digest, "size": f.stat().st_size}
        tree.update(name.encode())
        tree.update(digest.encode())
    if not files:
        raise ObjectMissing(f"folder {folder} has no files to store")
    return Manifest(tree.hexdigest(), sum(v["size"] for v in files.values()), files, primary)


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    names = " ".join(c.__name__ for c in type(exc).__mro__)
    return any(w in names for w in ("Connect", "Endpoint", "Timeout", "ServerDisconnected")) or (
        isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError))


def _file_credentials() -> dict:
    """s3fs ``key``/``secret`` from ``AWS_ACCESS_KEY_ID_FILE`` / ``AWS_SECRET_ACCESS_KEY_FILE`` when the
    variables themselves are not set; else nothing (botocore finds the standard ones itself)."""
    from domain.secrets import secret

    if os.environ.get("AWS_ACCESS_KEY_ID") or not os.environ.get("AWS_ACCESS_KEY_ID_FILE"):
        return {}
    return {"key": secret("AWS_ACCESS_KEY_ID"), "secret": secret("AWS_SECRET_ACCESS_KEY")}


class ArtifactStore:
    """One store by URL: put/get verified objects under relative keys."""

    def __init__(self, url: str, *, endpoint_url: str | None = None, region: str | None = None,
                 retries: int = 4, backoff_s: float = 0.5, source: str | None = None):
        import fsspec

        options: dict = {}
        if url.startswith("s3://"):
            client = {k: v for k, v in (("endpoint_url", endpoint_url), ("region_name", region)) if v}
            options = {"client_kwargs": client, "skip_instance_cache": True, "use_listings_cache": False,
                       "config_kwargs": {"connect_timeout": 3, "read_timeout": 30,
                                         "retries": {"max_attempts": 2, "mode": "standard"}}, **_file_credentials()}
        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.url, **options)
        self.root = root.rstrip("/")
        self.local = self.url.startswith("file://") or "://" not in self.url
        self.retries, self.backoff_s, self.source = retries, backoff_s, source

    def __repr__(self) -> str:  # the URL only: credentials never live in it
        return f"ArtifactStore({self.url!r})"

    def path(self, key: str) -> str:
        return f"{self.root}/{check_key(key)}"

    def local_path(self, key: str) -> Path | None:
        """Where a key's bytes already lie on this host (a file:// store), else None."""
        return Path(self.path(key)) if self.local else None

    # ---- retries -------------------------------------------------------------------------
    def _call(self, what: str, fn, *args, **kwargs):
        delay = self.backoff_s
        for attempt in range(1, self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if not _transient(exc):
                    raise
                if attempt == self.retries:
                    msg = f"artifact store {self.url} unreachable ({what}): {type(exc).__name__}: {exc}"[:500]
                    health.record("store", "unreachable", "fail", msg, source=self.source,
                                  detail={"url": self.url, "operation": what, "attempts": attempt})
                    raise StoreUnavailable(msg) from exc
                log.warning("artifact store %s: %s failed (%s); retry %d in %.1f s", self.url, what,
                            type(exc).__name__, attempt, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    # ---- writing -------------------------------------------------------------------------
    def _put_verified(self, local: Path, key: str, digest: str, size: int) -> None:
        """Upload to a temporary key, read it back (size and sha256), then copy it to ``key``."""
        tmp_dir = self.path(f"{TMP_PREFIX}/{uuid.uuid4().hex}")
        tmp, final = f"{tmp_dir}/{PurePosixPath(key).name}", self.path(key)
        if self.local:
            Path(tmp_dir).mkdir(parents=True, exist_ok=True)
        self._call("put", self.fs.put_file, str(local), tmp)
        try:
            got = self._call("verify", self.fs.cat_file, tmp)
            if len(got) != size or hashlib.sha256(got).hexdigest() != digest:
                raise ObjectCorrupt(f"store object {key!r}: the uploaded bytes differ from {local} (size {len(got)} "
                                    f"!= {size} or sha256 mismatch); not published")
            if self.local:
                Path(final).parent.mkdir(parents=True, exist_ok=True)
            self._call("copy", self.fs.copy, tmp, final)
        finally:
            with contextlib.suppress(Exception):
                self.fs.rm(tmp_dir if self.local else tmp, recursive=self.local)

    def put_tree(self, folder: Path, key: str, *, primary: str | None = None) -> Manifest:
        """Store a folder under ``key``: its files, each verified, then its manifest (last)."""
        key = check_key(key)
        folder = Path(folder)
        manifest = describe_tree(folder, primary)
        if self.local and Path(self.path(key)).resolve() == folder.resolve():
            return manifest  # the folder already is the object (the default store: the data folder)
        for name, meta in manifest.files.items():
            self._put_verified(folder / name, f"{key}/{name}", meta["sha256"], meta["size"])
        self.put_bytes(f"{key}/{MANIFEST}", manifest.to_json().encode())
        return manifest

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write one small object atomically (temporary key, read back, then the final key)."""
        key = check_key(key)
        tmp_local = Path(os.environ.get("TMPDIR", "/tmp")) / f"foundry-put-{uuid.uuid4().hex}"
        tmp_local.write_bytes(data)
        try:
            self._put_verified(tmp_local, key, hashlib.sha256(data).hexdigest(), len(data))
        finally:
            tmp_local.unlink(missing_ok=True)

    # ---- reading -------------------------------------------------------------------------
    def get_bytes(self, key: str) -> bytes:
        try:
            return self._call("get", self.fs.cat_file, self.path(key))
        except FileNotFoundError as exc:
            raise ObjectMissing(f"store object {key!r} not found in {self.url}") from exc

    def manifest(self, key: str) -> Manifest:
        raw = self.get_bytes(f"{check_key(key)}/{MANIFEST}")
        try:
            return Manifest.from_json(raw)
        except (ValueError, KeyError, TypeError) as exc:
            raise ObjectCorrupt(f"store object {key!r}: unreadable manifest ({exc})") from exc

    def download_tree(self, key: str, dest: Path, manifest: Manifest) -> None:
        """Fetch every file of ``key`` into ``dest``, each checked against the manifest."""
        dest.mkdir(parents=True, exist_ok=True)
        for name, meta in manifest.files.items():
            target = dest / check_key(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._call("get", self.fs.get_file, self.path(f"{key}/{name}"), str(target))
            except FileNotFoundError as exc:
                raise ObjectMissing(f"store object {key!r}: file {name!r} listed in its manifest is missing") from exc
            if target.stat().st_size != meta["size"] or _sha256_file(target) != meta["sha256"]:
                raise ObjectCorrupt(f"store object {key!r}: file {name!r} does not match its manifest's sha256")
        (dest / MANIFEST).write_text(manifest.to_json())

    def exists(self, key: str) -> bool:
        return bool(self._call("exists", self.fs.exists, self.path(key)))

    def stamp(self, key: str) -> str:
        """What changes when the object ``key`` is rewritten, read without its bytes (one HEAD on S3): its
        size and ETag, else (a folder store) its size and modification time."""
        try:
            info = self._call("info", self.fs.info, self.path(key))
        except FileNotFoundError as exc:
            raise ObjectMissing(f"store object {key!r} not found in {self.url}") from exc
        version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
        return json.dumps([info.get("size"), version], default=str)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._call("delete", self.fs.rm, self.path(key), recursive=True)


@contextlib.contextmanager
def _flock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class NodeCache:
    """This host's verified copies of store objects, by sha256, LRU-bounded to ``max_bytes``."""

    def __init__(self, root: Path, max_bytes: int, min_age_s: float = 60.0):
        self.root, self.max_bytes, self.min_age_s = Path(root), int(max_bytes), min_age_s
        self.objects = self.root / "objects"
        self.stats = {"hits": 0, "fetches": 0, "evictions": 0}

    def entry(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise KeyRefused(f"cache entry {sha256!r} is not a sha256")
        return self.objects / sha256

    def get_tree(self, store: ArtifactStore, key: str, sha256: str) -> Path:
        """The local folder of ``key`` (whose ledger sha256 is ``sha256``), fetched and verified if need be."""
        entry = self.entry(sha256)

        def fetch(tmp: Path) -> None:
            manifest = store.manifest(key)
            if not manifest.accepts(sha256):
                raise ObjectCorrupt(f"store object {key!r} holds sha256 {manifest.sha256[:12]}..., not the "
                                    f"{sha256[:12]}... the ledger recorded")
            store.download_tree(key, tmp, manifest)

        self._fill(sha256, entry.is_dir, fetch)
        return entry

    def put_file(self, sha256: str, name: str, data: bytes) -> Path:
        """``data`` (whose sha256 the caller computed) as the entry ``sha256`` holding one file ``name``."""
        target = self.entry(sha256) / name

        def write(tmp: Path) -> None:
            tmp.mkdir(parents=True)
            (tmp / name).write_bytes(data)

        self._fill(sha256, target.is_file, write)
        return target

    def _file_index(self, key: str) -> Path:
        return self.root / "files" / f"{hashlib.sha256(key.encode()).hexdigest()}.json"

    def known_file(self, key: str, stamp: str) -> Path | None:
        """The cached copy of data file ``key`` when the store's object still has ``stamp`` (a hit: marked most
        recently used), else None."""
        try:
            index = json.loads(self._file_index(key).read_text())
            target = self.entry(index["sha256"]) / index["name"]
        except (OSError, ValueError, KeyError, TypeError, KeyRefused):
            return None
        if index.get("stamp") != stamp or not target.is_file():
            return None
        self._hit(target.parent)
        return target

    def remember_file(self, key: str, stamp: str, path: Path) -> None:
        """Note that data file ``key`` at ``stamp`` is the cached ``path`` (``put_file``'s), for ``known_file``."""
        index = self._file_index(key)
        index.parent.mkdir(parents=True, exist_ok=True)
        tmp = index.with_suffix(f".{os.getpid()}.{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps({"key": key, "stamp": stamp, "sha256": path.parent.name, "name": path.name}))
        os.replace(tmp, index)

    def _hit(self, entry: Path) -> None:
        self.stats["hits"] += 1
        os.utime(entry)  # most recently used

    def _fill(self, sha256: str, present, build) -> None:
        """Make the entry ``sha256`` hold what ``present()`` checks for: a hit marks it most recently used;
        else, under the entry's lock (several processes of this host), ``build(tmp)`` writes a fresh folder
        that is renamed into place (its files moved into the entry when the entry exists: the same bytes
        under another file name), then the cache is evicted down to its bound."""
        entry = self.entry(sha256)
        if present():
            self._hit(entry)
            return
        with _flock(self.root / "locks" / f"{sha256}.lock"):
            if not present():  # another process may have fetched it while we waited
                tmp = self.root / "tmp" / f"{sha256}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
                try:
                    build(tmp)
                    self.objects.mkdir(parents=True, exist_ok=True)
                    if entry.is_dir():
                        for f in tmp.iterdir():
                            os.replace(f, entry / f.name)
                    else:
                        os.rename(tmp, entry)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                self.stats["fetches"] += 1
        self.evict(keep={sha256})

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.objects.rglob("*") if f.is_file()) if self.objects.is_dir() else 0

    def evict(self, keep: set[str] = frozenset()) -> list[str]:
        """Remove least-recently-used entries until the cache fits ``max_bytes`` (entries used in the last
        ``min_age_s`` seconds stay: a process may be about to read them)."""
        removed: list[str] = []
        if not self.objects.is_dir():
            return removed
        with _flock(self.root / "locks" / "evict.lock"):
            entries = []
            for e in self.objects.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    size = sum(f.stat().st_size for f in e.rglob("*") if f.is_file())
                    entries.append((e.stat().st_mtime, e, size))
            total = sum(s for _, _, s in entries)
            now = time.time()
            for mtime, e, size in sorted(entries, key=lambda t: t[0]):
                if total <= self.max_bytes:
                    break
                if e.name in keep or now - mtime < self.min_age_s:
                    continue
                trash = self.root / "tmp" / f"evicted.{e.name}.{uuid.uuid4().hex[:8]}"
                trash.parent.mkdir(parents=True, exist_ok=True)
                os.rename(e, trash)  # gone for readers at once; then deleted
                shutil.rmtree(trash, ignore_errors=True)
                total -= size
                removed.append(e.name)
                self.stats["evictions"] += 1
        return removed


# ---- the process's store and cache, from the settings -------------------------------------------

_stores: dict[tuple, ArtifactStore] = {}
_caches: dict[tuple, NodeCache] = {}


def artifact_url(settings) -> str:
    return settings.artifact_url or settings.data_dir.resolve().as_uri()


def get_store(settings=None) -> ArtifactStore:
    from domain.config import get_settings

    settings = settings or get_settings()
    key = (artifact_url(settings), settings.artifact_endpoint_url, settings.artifact_region)
    if key not in _stores:
        _stores[key] = ArtifactStore(key[0], endpoint_url=key[1] or None, region=key[2] or None)
    return _stores[key]


def get_cache(settings=None) -> NodeCache:
    from domain.config import get_settings

    settings = settings or get_settings()
    key = (str(settings.cache_dir or settings.data_dir / "cache"), settings.cache_max_gb)
    if key not in _caches:
        _caches[key] = NodeCache(Path(key[0]), int(settings.cache_max_gb * 1e9))
    return _caches[key]


def holds_data_folder(store: ArtifactStore | None = None) -> bool:
    """Whether the store is this host's data folder itself (the embedded default): its objects are the
    files under the data root, so nothing is uploaded, fetched or deleted twice."""
    from domain.paths import data_root

    store = store or get_store()
    return store.local and Path(store.root).resolve() == data_root()


def publish_tree(folder: Path, key: str, *, primary: str | None = None, tenant: str | None = None) -> Manifest:
    """Store a finished local folder under ``key`` (a no-op upload when the store is the data folder)."""
    return get_store().put_tree(folder, check_key(key, tenant), primary=primary)


def fetch_file(key: str, *, tenant: str | None = None) -> Path:
    """A data file a job names (``data_path``, ``eval_data_path``) that is not under this host's data folder:
    read from the store and kept in this host's cache as an entry named by the sha256 of its bytes (a file
    replaced under the same key is a new entry), LRU-bounded with the rest of the cache. A later call reads
    only the object's stamp (size and ETag: ``ArtifactStore.stamp``) and downloads again only when it
    changed. Raises ObjectMissing when the store does not hold it either."""
    key = check_key(key, tenant)
    store, cache = get_store(), get_cache()
    stamp = store.stamp(key)  # read first: an object rewritten meanwhile is fetched again next time
    known = cache.known_file(key, stamp)
    if known is not None:
        return known  # unchanged in the store since it was fetched: no download
    data = store.get_bytes(key)
    path = cache.put_file(hashlib.sha256(data).hexdigest(), PurePosixPath(key).name, data)
    cache.remember_file(key, stamp, path)
    return path


def fetch_tree(key: str, sha256: str, *, tenant: str | None = None, local: Path | None = None) -> Path:
    """A local folder holding ``key``: ``local`` (this host wrote it) or, for the default store, the data
    folder's own copy (callers check those against the ledger as before); else this host's cache, fetched
    from the store and verified. Missing or corrupt objects
    record a ``store`` health event before raising."""
    key = check_key(key, tenant)
    store = get_store()
    here = store.local_path(key) if holds_data_folder(store) else None
    for candidate in (local, here):  # the default store: the data folder is the object itself
        if candidate is not None and candidate.is_dir() and any(candidate.iterdir()):
            return candidate
    try:
        return get_cache().get_tree(store, key, sha256)
    except (ObjectMissing, ObjectCorrupt) as exc:
        health.record("store", "object_missing" if isinstance(exc, ObjectMissing) else "object_corrupt", "fail",
                      str(exc)[:500], tenant_id=tenant, detail={"key": key, "sha256": sha256, "url": store.url})
        raise
