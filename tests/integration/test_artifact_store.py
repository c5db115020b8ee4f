"""The artifact store (domain/storage.py) on a real S3-compatible server on loopback (moto's server mode, or
the MinIO named by FOUNDRY_TEST_S3_URL) and on a file:// folder: verified atomic puts, verified fetches
through the node-local cache, tenant prefixes, corrupt/missing objects and an unreachable store."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from domain import storage
from domain.config import get_settings, reset_settings
from domain.ledger.db import session_scope
from domain.ledger.models import HealthEvent


def make_folder(root: Path, name: str = "adapter", size: int = 50_000) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(size))
    (folder / "adapter_config.json").write_text('{"r": 4}')
    (folder / "sub").mkdir()
    (folder / "sub" / "extra.txt").write_text("nested")
    return folder


@pytest.fixture(params=["s3", "file"])
def store_env(request, tmp_path, monkeypatch, sqlite_ledger):
    """The settings of a store that is NOT this host's data folder: an S3 bucket, or another folder."""
    if request.param == "s3":
        env = request.getfixturevalue("s3_store")
    else:
        shared = tmp_path / "shared-store"
        shared.mkdir()
        monkeypatch.setenv("FOUNDRY_ARTIFACT_URL", shared.as_uri())
        reset_settings()
        storage._stores.clear()
        storage._caches.clear()
        env = {"FOUNDRY_ARTIFACT_URL": shared.as_uri()}
    return env


def test_a_folder_put_on_one_host_is_fetched_verified_on_another(store_env, tmp_path):
    folder = make_folder(tmp_path / "host-a")
    manifest = storage.publish_tree(folder, "adapters/acme/reviewer/v1", primary="adapter_model.safetensors",
                                    tenant="acme")
    assert manifest.size_bytes == sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    weights_sha = manifest.files["adapter_model.safetensors"]["sha256"]
    assert not storage.get_store().exists(storage.TMP_PREFIX + "/x")  # no temporary key left behind

    cache = storage.NodeCache(tmp_path / "host-b-cache", max_bytes=10**9)
    got = cache.get_tree(storage.get_store(), "adapters/acme/reviewer/v1", weights_sha)  # by the ledger's sha
    assert (got / "adapter_model.safetensors").read_bytes() == (folder / "adapter_model.safetensors").read_bytes()
    assert (got / "sub" / "extra.txt").read_text() == "nested"
    assert storage.describe_tree(got).sha256 == manifest.sha256 and got.name == weights_sha
    again = cache.get_tree(storage.get_store(), "adapters/acme/reviewer/v1", manifest.sha256)  # by the tree sha
    assert cache.stats["fetches"] == 2 and again.name == manifest.sha256
    cache.get_tree(storage.get_store(), "adapters/acme/reviewer/v1", weights_sha)
    assert cache.stats["hits"] == 1


def test_a_corrupt_or_missing_object_is_refused_and_reported(store_env, tmp_path):
    folder = make_folder(tmp_path / "host-a")
    store = storage.get_store()
    manifest = store.put_tree(folder, "adapters/acme/reviewer/v2", primary="adapter_model.safetensors")
    store.fs.pipe_file(store.path("adapters/acme/reviewer/v2/adapter_model.safetensors"), b"tampered")
    with pytest.raises(storage.ObjectCorrupt, match="does not match"):
        storage.fetch_tree("adapters/acme/reviewer/v2", manifest.sha256, tenant="acme")
    with pytest.raises(storage.ObjectCorrupt, match="not the"):  # the ledger names other bytes than the store holds
        storage.fetch_tree("adapters/acme/reviewer/v2", "0" * 64, tenant="acme")
    with pytest.raises(storage.ObjectMissing):
        storage.fetch_tree("adapters/acme/reviewer/v9", manifest.sha256, tenant="acme")
    cache = storage.get_cache()
    assert not cache.entry(manifest.sha256).exists() and not any((cache.root / "tmp").iterdir())
    with session_scope() as s:
        events = {e.event for e in s.query(HealthEvent).filter(HealthEvent.component == "store")}
    assert {"object_corrupt", "object_missing"} <= events


@pytest.mark.parametrize("key", ["adapters/other/reviewer/v1", "../adapters/acme/x", "/etc/passwd",
                                 "adapters/acme/../other/v1", "s3://elsewhere/adapters/acme/v1", "adapters/acme"])
def test_a_key_outside_the_tenants_prefix_is_refused(key, store_env, tmp_path):
    with pytest.raises(storage.KeyRefused):
        storage.fetch_tree(key, "0" * 64, tenant="acme")
    with pytest.raises(storage.KeyRefused):
        storage.publish_tree(tmp_path, key, tenant="acme")


def test_an_unreachable_store_is_retried_then_a_transient_error_with_a_health_event(s3_store, sqlite_ledger,
                                                                                     tmp_path, monkeypatch):
    monkeypatch.setenv("FOUNDRY_ARTIFACT_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    reset_settings()
    storage._stores.clear()
    store = storage.get_store()
    store.retries, store.backoff_s = 2, 0.05
    with pytest.raises(storage.StoreUnavailable) as err:
        store.put_tree(make_folder(tmp_path), "adapters/acme/reviewer/v1")
    assert err.value.code == "store_unavailable" and "AWS_SECRET" not in str(err.value)
    assert s3_store["AWS_SECRET_ACCESS_KEY"] not in str(err.value) and "unreachable" in str(err.value)
    with session_scope() as s:
        event = s.query(HealthEvent).filter_by(component="store", event="unreachable").one()
        assert event.detail["attempts"] == 2 and s3_store["AWS_SECRET_ACCESS_KEY"] not in str(event.detail)


def test_the_default_store_is_the_data_folder_and_uploads_nothing(sqlite_ledger, tmp_path):
    assert storage.artifact_url(get_settings()) == tmp_path.resolve().as_uri()
    storage._stores.clear()
    folder = make_folder(tmp_path / "adapters" / "acme" / "reviewer", "v1")
    manifest = storage.publish_tree(folder, "adapters/acme/reviewer/v1/", tenant="acme")
    assert not (folder / storage.MANIFEST).exists()  # the folder already is the object
    assert storage.fetch_tree("adapters/acme/reviewer/v1", manifest.sha256, tenant="acme") == folder


def test_the_cache_evicts_the_least_recently_used_beyond_its_bound(store_env, tmp_path):
    store = storage.get_store()
    shas = []
    for i in range(3):
        m = store.put_tree(make_folder(tmp_path / f"src{i}", size=40_000), f"adapters/acme/r/v{i}")
        shas.append(m.sha256)
    cache = storage.NodeCache(tmp_path / "cache", max_bytes=10**9, min_age_s=0)
    for i in range(3):
        cache.get_tree(store, f"adapters/acme/r/v{i}", shas[i])
        os.utime(cache.entry(shas[i]), (1000 + i, 1000 + i))  # v0 oldest
    os.utime(cache.entry(shas[0]), (5000, 5000))  # v0 used again: v1 is now the least recently used
    cache.max_bytes = 100_000  # room for two of the three
    assert cache.evict() == [shas[1]]
    assert not cache.entry(shas[1]).exists() and cache.entry(shas[0]).exists() and cache.entry(shas[2]).exists()
    assert cache.size_bytes() <= 100_000


def test_data_files_fetched_from_the_store_are_cache_entries_under_the_same_lru_bound(store_env, tmp_path):
    store = storage.get_store()
    store.put_bytes("datasets/acme/train.jsonl", b'{"a": 1}\n' * 5_000)
    path = storage.fetch_file("datasets/acme/train.jsonl", tenant="acme")
    cache = storage.get_cache()
    digest = path.parent.name
    assert path.read_bytes() == b'{"a": 1}\n' * 5_000 and path.parent == cache.entry(digest)
    assert storage.fetch_file("datasets/acme/train.jsonl", tenant="acme") == path  # a hit: the same entry
    m = store.put_tree(make_folder(tmp_path / "src", size=40_000), "adapters/acme/r/v1")
    cache.get_tree(store, "adapters/acme/r/v1", m.sha256)
    os.utime(cache.entry(digest), (1000, 1000))  # the data file is the least recently used
    cache.min_age_s, cache.max_bytes = 0, 45_000
    assert cache.evict() == [digest] and not path.exists() and cache.entry(m.sha256).is_dir()


def test_a_data_file_unchanged_in_the_store_is_not_downloaded_again_and_a_rewritten_one_is(store_env):
    """The second fetch of an unchanged data file reads its stamp (one HEAD), not its bytes; after the object is
    rewritten under the same key, the next fetch downloads the new bytes into a new entry."""
    store = storage.get_store()
    key = "datasets/acme/eval.jsonl"
    store.put_bytes(key, b'{"v": 1}\n' * 1_000)
    gets = []
    real_get = store.get_bytes
    store.get_bytes = lambda k: gets.append(k) or real_get(k)  # counts the downloads of the real store
    try:
        first = storage.fetch_file(key, tenant="acme")
        hits = storage.get_cache().stats["hits"]
        assert storage.fetch_file(key, tenant="acme") == first and gets == [key]
        assert storage.get_cache().stats["hits"] == hits + 1
        store.put_bytes(key, b'{"v": 2}\n' * 1_000)
        second = storage.fetch_file(key, tenant="acme")
        assert gets == [key, key] and second != first and second.read_bytes() == b'{"v": 2}\n' * 1_000
        assert storage.fetch_file(key, tenant="acme") == second and len(gets) == 2
    finally:
        del store.get_bytes


def _fetch_in_child(args) -> str:
    cache_root, env, key, sha = args
    os.environ.update(env)
    reset_settings()
    storage._stores.clear()
    return str(storage.NodeCache(Path(cache_root), 10**9).get_tree(storage.get_store(), key, sha))


def test_several_processes_fetching_one_object_share_one_verified_copy(store_env, tmp_path):
    m = storage.get_store().put_tree(make_folder(tmp_path / "src", size=2_000_000), "adapters/acme/r/v1")
    env = {k: v for k, v in store_env.items() if isinstance(v, str)}
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        paths = pool.map(_fetch_in_child, [(str(tmp_path / "cache"), env, "adapters/acme/r/v1", m.sha256)] * 4)
    assert len(set(paths)) == 1
    assert storage.describe_tree(Path(paths[0])).sha256 == m.sha256
    assert list((tmp_path / "cache" / "objects").iterdir()) == [Path(paths[0])]
    assert not list((tmp_path / "cache" / "tmp").iterdir())


def test_an_adapter_saved_on_host_a_loads_on_host_b_through_its_cache(s3_store, sqlite_ledger, tmp_path, monkeypatch):
    from domain import adapter_lookup
    from domain.adapters import store as adapter_store
    from domain.errors import JobFailed
    from domain.ledger.models import AdapterVersion
    from tests.fixtures.adapters import make_version
    from tests.fixtures.tiny_models import save_tiny_model

    base = save_tiny_model(tmp_path / "tiny-base", layers=1, hidden=32)
    version_id = make_version("acme", base)  # saved under host A's data folder and put in the store
    with session_scope() as s:
        version = s.get(AdapterVersion, version_id)
        s.expunge(version)
    monkeypatch.setenv("FOUNDRY_DATA_DIR", str(tmp_path / "host-b"))  # same ledger, another host's folder
    reset_settings()
    storage._caches.clear()
    folder = adapter_lookup.verified_adapter_path(version)
    assert folder == tmp_path / "host-b" / "cache" / "objects" / version.artifact_sha256
    assert (folder / adapter_store.WEIGHTS_FILE).is_file()

    store = storage.get_store()
    outside = AdapterVersion(**{c: getattr(version, c) for c in ("id", "tenant_id", "name", "version", "hyperparams")},
                             artifact_path="adapters/other/reviewer/x", artifact_sha256="1" * 64)
    with pytest.raises(JobFailed, match="outside tenant") as err:
        adapter_lookup.verified_adapter_path(outside)
    assert err.value.code == "key_refused"
    store.fs.pipe_file(store.path(f"{version.artifact_path}/{adapter_store.WEIGHTS_FILE}"), b"tampered")
    # host B's cached copy stays valid and keeps serving; a fresh host is refused the corrupt object
    monkeypatch.setenv("FOUNDRY_DATA_DIR", str(tmp_path / "host-c"))
    reset_settings()
    storage._caches.clear()
    with pytest.raises(JobFailed) as err:
        adapter_lookup.verified_adapter_path(version)
    assert err.value.code == "object_corrupt"
    assert (folder / adapter_store.WEIGHTS_FILE).is_file()


def test_a_promoted_champion_is_prefetched_into_a_host_that_never_had_it(s3_store, sqlite_ledger, tmp_path,
                                                                          monkeypatch):
    from domain import adapter_lookup
    from domain.ledger.models import AdapterVersion
    from tests.fixtures.adapters import make_version
    from tests.fixtures.tiny_models import save_tiny_model

    base = save_tiny_model(tmp_path / "tiny-base", layers=1, hidden=32)
    champion = make_version("acme", base, alias="champion")
    make_version("acme", base, seed=1)  # a candidate: not prefetched
    monkeypatch.setenv("FOUNDRY_DATA_DIR", str(tmp_path / "host-b"))
    reset_settings()
    storage._caches.clear()
    assert adapter_lookup.prefetch_champions() == [champion]
    assert adapter_lookup.prefetch_champions() == []  # cached now
    with session_scope() as s:
        sha = s.get(AdapterVersion, champion).artifact_sha256
    assert list((tmp_path / "host-b" / "cache" / "objects").iterdir()) == [tmp_path / "host-b" / "cache" / "objects" / sha]


def test_existing_artifacts_are_pushed_into_a_new_store_once(s3_store, sqlite_ledger, tmp_path, capsys):
    from domain.adapters.store import WEIGHTS_FILE
    from domain.ledger.models import AdapterVersion, Tenant
    from domain.store_backfill import push_existing
    from worker.cli import main

    folder = make_folder(tmp_path / "adapters" / "acme" / "reviewer", "v1")
    with session_scope() as s:
        s.add(Tenant(id="acme", display_name="acme"))
        s.flush()
        for key, vid in (("adapters/acme/reviewer/v1", "a1"), ("adapters/acme/reviewer/gone", "a2"),
                         ("adapters/other/reviewer/v1", "a3")):
            s.add(AdapterVersion(id=vid, tenant_id="acme", name="reviewer", version=int(vid[1]), base_model_id="b",
                                 base_model_hash="h", artifact_path=key, artifact_sha256="0" * 64))
    assert push_existing(dry_run=True).pushed == ["adapters/acme/reviewer/v1"]
    assert not storage.get_store().exists(f"adapters/acme/reviewer/v1/{storage.MANIFEST}")
    report = push_existing()
    assert report.pushed == ["adapters/acme/reviewer/v1"] and report.not_here == ["adapters/acme/reviewer/gone"]
    assert report.refused == ["adapters/other/reviewer/v1"]  # outside its tenant's prefix
    manifest = storage.get_store().manifest("adapters/acme/reviewer/v1")
    assert manifest.files[WEIGHTS_FILE]["sha256"] == storage.describe_tree(folder).files[WEIGHTS_FILE]["sha256"]
    capsys.readouterr()
    assert main(["artifacts", "push", "--dry-run"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["present"] == ["adapters/acme/reviewer/v1"] and out["pushed"] == [] and out["dry_run"] is True
    assert push_existing().present == ["adapters/acme/reviewer/v1"]


def test_a_served_model_made_on_host_a_loads_on_host_b_and_a_corrupt_one_is_refused(s3_store, sqlite_ledger, tmp_path,
                                                                                       monkeypatch):
    """A quantized/distilled model folder is put in the store as it is published; another host's
    ``servable_folder`` fetches it into its cache, verified; a changed object is refused there (the model is
    not served), while a host that holds a good copy keeps it."""
    from domain import artifacts
    from domain.ledger.models import Artifact, Tenant
    from domain.models import ModelLoadError
    from domain.paths import data_root
    from tests.fixtures.tiny_models import save_tiny_model

    with session_scope() as s:
        s.add(Tenant(id="acme", display_name="acme"))
    staging = save_tiny_model(data_root() / "artifacts" / "distilled" / "job1.staging", layers=1, hidden=32)
    published = artifacts.publish_model(staging, staging.parent / "job1", "distilled_model", {"ok": 1}, {})
    assert published.path == "artifacts/distilled/job1"
    assert storage.get_store().manifest(published.path).sha256 == published.sha256
    with session_scope() as s:
        artifacts.add_artifact(s, "art1", kind="distilled_model", tenant="acme", name="student", path=published.path,
                               sha256=published.sha256, size_bytes=published.size_bytes, lineage={}, report={},
                               job_id=None)

    def host(name: str) -> Artifact:
        monkeypatch.setenv("FOUNDRY_DATA_DIR", str(tmp_path / name))
        reset_settings()
        storage._caches.clear()
        with session_scope() as s:
            row = s.get(Artifact, "art1")
            s.expunge(row)
        return row

    art = host("host-b")
    folder = artifacts.servable_folder(art)
    assert folder == tmp_path / "host-b" / "cache" / "objects" / published.sha256
    assert artifacts.load_serving_model(art, device="cpu").model is not None
    store = storage.get_store()
    store.fs.pipe_file(store.path(f"{published.path}/config.json"), b"{}")
    art = host("host-c")
    with pytest.raises(ModelLoadError, match="sha256"):
        artifacts.servable_folder(art)
    assert (folder / "config.json").is_file()  # host B's verified copy is untouched


def test_store_credentials_can_come_from_secret_files(s3_store, sqlite_ledger, tmp_path, monkeypatch):
    """compose mounts the MinIO user and password as secret files; AWS_*_FILE names them (a real MinIO behind
    FOUNDRY_TEST_S3_URL checks them; moto takes any, so the test also checks what the client was given)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        (tmp_path / name).write_text(os.environ[name] + "\n")
        monkeypatch.setenv(f"{name}_FILE", str(tmp_path / name))
        monkeypatch.delenv(name)
    storage._stores.clear()
    store = storage.get_store()
    assert (store.fs.key, store.fs.secret) == (s3_store["AWS_ACCESS_KEY_ID"], s3_store["AWS_SECRET_ACCESS_KEY"])
    store.put_bytes("probe/acme/x.txt", b"hello")
    assert store.get_bytes("probe/acme/x.txt") == b"hello"
    assert s3_store["AWS_SECRET_ACCESS_KEY"] not in repr(store)


def test_a_data_file_named_by_a_job_is_read_from_the_store_on_a_host_without_it(s3_store, sqlite_ledger, tmp_path):
    from domain import artifacts
    from domain.errors import InvalidJob

    storage.get_store().put_bytes("data/acme/eval.txt", b"def f():\n    return 1\n")
    got = artifacts.data_file("data/acme/eval.txt", "eval_data_path")
    assert got.read_bytes() == b"def f():\n    return 1\n" and got.is_relative_to(tmp_path)
    with pytest.raises(InvalidJob, match="eval_data_path: .* or in the artifact store"):
        artifacts.data_file("data/acme/missing.txt", "eval_data_path")
