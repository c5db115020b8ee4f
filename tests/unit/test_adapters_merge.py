"""Merging versions with add_weighted_adapter (lineage to every parent) and diffing two versions."""

from __future__ import annotations

import pytest
import torch
from sqlalchemy import select

from domain import adapter_lookup
from domain.adapters import merge
from tests.fixtures.adapters import make_version
from domain.config import reset_settings
from domain.errors import InvalidJob
from domain.ledger.db import session_scope
from domain.ledger.models import AdapterLineage, AdapterVersion
from tests.conftest import add_tenant


@pytest.fixture
def two_versions(sqlite_ledger, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("FOUNDRY_DEVICE", "cpu")
    reset_settings()
    add_tenant(sqlite_ledger, "acme")
    a = make_version("acme", str(tiny_model_dir), seed=1, alias="champion")
    b = make_version("acme", str(tiny_model_dir), seed=2, alias="candidate")
    return a, b


def _deltas(version_id):
    with session_scope() as s:
        return merge.lora_deltas(adapter_lookup.verified_adapter_path(s.get(AdapterVersion, version_id)))


def test_cat_merge_is_the_weighted_sum_with_lineage_to_both(two_versions):
    a, b = two_versions
    with session_scope() as s:
        merged = merge.merge_versions(s, "acme", ["champion", b], [0.7, 0.3], alias="merged", moved_by="cli:test")
        mid = merged.id
    da, db, dm = _deltas(a), _deltas(b), _deltas(mid)
    assert set(dm) == set(da)
    for key in da:
        assert torch.allclose(dm[key], 0.7 * da[key] + 0.3 * db[key], atol=1e-5), key
    with session_scope() as s:
        row = s.get(AdapterVersion, mid)
        assert row.version == 3 and row.parent_id == a and row.status == "candidate"
        assert row.hyperparams["merge"]["weights"] == [0.7, 0.3]
        lineage = {(r.parent_id, r.relation, r.weight)
                   for r in s.scalars(select(AdapterLineage).where(AdapterLineage.child_id == mid))}
        assert lineage == {(a, "merge", 0.7), (b, "merge", 0.3)}
        assert adapter_lookup.aliases_of(s, "acme")["merged"] == mid
        assert adapter_lookup.resolve_adapter(s, "acme", None).id == a  # the champion did not move
        adapter_lookup.verified_adapter_path(row)


def test_merge_refuses_bad_requests(two_versions):
    a, _ = two_versions
    with session_scope() as s:
        with pytest.raises(InvalidJob):
            merge.merge_versions(s, "acme", [a])
        with pytest.raises(InvalidJob):
            merge.merge_versions(s, "acme", [a, "champion"])  # the same version twice
        with pytest.raises(InvalidJob):
            merge.merge_versions(s, "acme", [a, "candidate"], [1.0])


def test_diff_reports_fields_and_weight_similarity(two_versions):
    a, b = two_versions
    with session_scope() as s:
        d = merge.diff_versions(s, "acme", a, b)
        same = merge.diff_versions(s, "acme", a, "champion")
    assert d["a"]["id"] == a and d["b"]["id"] == b
    assert "version" in d["fields"] and "artifact_sha256" in d["fields"]
    assert d["modules"] and all(-1.0 <= m["cosine"] <= 1.0 for m in d["modules"].values())
    assert abs(d["mean_cosine"]) < 0.5  # independent random adapters are nearly orthogonal
    assert same["fields"] == {} and same["mean_cosine"] == pytest.approx(1.0)
