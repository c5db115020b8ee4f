"""Adapter versions and aliases: resolving per tenant, hash and base-model checks, alias history, rollback."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from domain import adapter_lookup
from domain.adapters import store
from tests.fixtures.adapters import make_version
from domain.errors import InvalidJob, JobFailed
from domain.ledger.db import session_scope
from domain.ledger.models import AdapterAlias, AdapterVersion, Artifact, HealthEvent
from tests.conftest import add_tenant


@pytest.fixture
def base(sqlite_ledger, tiny_model_dir):
    add_tenant(sqlite_ledger, "acme")
    add_tenant(sqlite_ledger, "other")
    return str(tiny_model_dir)


def test_resolve_champion_alias_id_and_refuses_other_tenants(base):
    with session_scope() as s:
        assert adapter_lookup.resolve_adapter(s, "acme", None) is None  # no champion: the base model is served
    v1 = make_version("acme", base, seed=1, alias="champion")
    v2 = make_version("acme", base, seed=2, alias="canary")
    foreign = make_version("other", base, seed=3, alias="champion")
    with session_scope() as s:
        assert adapter_lookup.resolve_adapter(s, "acme", None).id == v1
        assert adapter_lookup.resolve_adapter(s, "acme", "champion").id == v1
        assert adapter_lookup.resolve_adapter(s, "acme", "canary").id == v2
        assert adapter_lookup.resolve_adapter(s, "acme", v2).id == v2
        assert adapter_lookup.resolve_adapter(s, "other", None).id == foreign
        with pytest.raises(InvalidJob) as err:
            adapter_lookup.resolve_adapter(s, "acme", foreign)  # another tenant's version id
        assert err.value.field == "adapter"
        with pytest.raises(InvalidJob):
            adapter_lookup.resolve_adapter(s, "acme", "nightly")


def test_register_records_artifact_versions_and_hashes(base):
    a = make_version("acme", base, seed=1)
    b = make_version("acme", base, seed=2)
    with session_scope() as s:
        va, vb = s.get(AdapterVersion, a), s.get(AdapterVersion, b)
        assert (va.version, vb.version) == (1, 2)
        art = s.get(Artifact, va.artifact_id)
        assert art.kind == "adapter" and art.path == va.artifact_path and art.sha256 == va.artifact_sha256
        assert not va.artifact_path.startswith("/")  # relative to the data root
        folder = adapter_lookup.verified_adapter_path(va)
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        assert va.hyperparams["adapter_config_sha256"]


def test_hash_mismatch_is_refused_and_recorded(base):
    vid = make_version("acme", base, seed=1, alias="champion")
    with session_scope() as s:
        v = s.get(AdapterVersion, vid)
        weights = adapter_lookup.verified_adapter_path(v) / store.WEIGHTS_FILE
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
        with pytest.raises(JobFailed) as err:
            adapter_lookup.verified_adapter_path(v)
        assert err.value.code == "adapter_hash_mismatch"
    with session_scope() as s:
        ev = s.scalars(select(HealthEvent).where(HealthEvent.event == "hash_mismatch")).one()
        assert ev.component == "adapter" and ev.status == "fail" and ev.tenant_id == "acme"
        assert ev.detail["version_id"] == vid


def test_changed_config_is_refused_and_missing_files_reported(base):
    vid = make_version("acme", base, seed=1)
    with session_scope() as s:
        v = s.get(AdapterVersion, vid)
        folder = adapter_lookup.verified_adapter_path(v)
        (folder / store.CONFIG_FILE).write_text((folder / store.CONFIG_FILE).read_text().replace('"r": 4', '"r": 8'))
        with pytest.raises(JobFailed) as err:
            adapter_lookup.verified_adapter_path(v)
        assert err.value.code == "adapter_hash_mismatch"
        (folder / store.WEIGHTS_FILE).unlink()
        with pytest.raises(JobFailed) as err:
            adapter_lookup.verified_adapter_path(v)
        assert err.value.code == "adapter_missing"


def test_base_model_mismatch_is_refused_with_a_clear_error(base, tmp_path):
    from tests.fixtures.tiny_models import save_tiny_model

    vid = make_version("acme", base, seed=1)
    other = save_tiny_model(tmp_path / "other-base", seed=7)
    with session_scope() as s:
        v = s.get(AdapterVersion, vid)
        adapter_lookup.check_base_model(v, base)  # same base: fine
        with pytest.raises(JobFailed) as err:
            adapter_lookup.check_base_model(v, str(other))
    assert err.value.code == "base_model_mismatch"
    assert "trained on" in str(err.value) and str(other) in str(err.value)


def test_alias_moves_are_recorded_and_rollback_walks_back(base):
    v1 = make_version("acme", base, seed=1)
    v2 = make_version("acme", base, seed=2)
    v3 = make_version("acme", base, seed=3)
    with session_scope() as s:
        for v in (v1, v2, v3):
            store.move_alias(s, "acme", "champion", v, "job:x", f"promote {v}")
    with session_scope() as s:
        entry = store.rollback(s, "acme", "circuit-breaker", "error rate 40%")
        assert (entry.from_version_id, entry.to_version_id) == (v3, v2)
        assert entry.moved_by == "circuit-breaker" and entry.reason.startswith("rollback: error rate")
        assert s.get(AdapterVersion, v3).status == "rejected"
        assert s.get(AdapterVersion, v2).status == "promoted"
    with session_scope() as s:  # a second rollback goes further back, not back to v3
        assert store.rollback(s, "acme", "cli:me", None).to_version_id == v1
        assert adapter_lookup.resolve_adapter(s, "acme", None).id == v1
    with session_scope() as s:  # before v1 there was no adapter: the base model is served again
        assert store.rollback(s, "acme", "cli:me", "bad").to_version_id is None
        assert adapter_lookup.resolve_adapter(s, "acme", None) is None
        assert s.get(AdapterAlias, ("acme", "champion")) is None
    with session_scope() as s:
        with pytest.raises(LookupError):
            store.rollback(s, "acme", "cli:me", "again")
        history = store.alias_history(s, "acme", "champion")
        assert [(h.from_version_id, h.to_version_id) for h in reversed(history)] == [
            (None, v1), (v1, v2), (v2, v3), (v3, v2), (v2, v1), (v1, None)]


def test_move_alias_refuses_other_tenants_version_and_bad_names(base):
    foreign = make_version("other", base, seed=1)
    with session_scope() as s:
        with pytest.raises(InvalidJob):
            store.move_alias(s, "acme", "champion", foreign, "cli", "steal")
        with pytest.raises(InvalidJob):
            store.move_alias(s, "other", "bad alias!", foreign, "cli", None)
