"""domain.canary on a tiny model: a sane adapter passes; an adapter producing NaN logits fails the canary
and the circuit breaker rolls the champion back; a corrupted file fails before loading."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from domain import canary
from domain.adapters import store
from tests.fixtures.adapters import make_version
from domain.config import reset_settings
from domain.ledger.db import session_scope
from domain.ledger.models import AdapterAlias, AdapterVersion
from domain.paths import resolve_in_data_root, sha256_file
from tests.conftest import add_tenant


@pytest.fixture
def tenant(sqlite_ledger, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("FOUNDRY_BASE_MODEL", str(tiny_model_dir))
    reset_settings()
    add_tenant(sqlite_ledger, "acme")
    good = make_version("acme", tiny_model_dir, seed=1, alias="champion")
    bad = make_version("acme", tiny_model_dir, seed=2, alias="champion")
    return good, bad


def poison_with_nan(version_id: str) -> None:
    """A badly trained adapter: valid safetensors, recorded hash, NaN weights."""
    with session_scope() as s:
        v = s.get(AdapterVersion, version_id)
        weights = resolve_in_data_root(v.artifact_path) / store.WEIGHTS_FILE
        tensors = {k: torch.full_like(t, float("nan")) if "lora_B" in k else t for k, t in load_file(str(weights)).items()}
        save_file(tensors, str(weights))
        v.artifact_sha256 = sha256_file(weights)


def champion():
    with session_scope() as s:
        return s.get(AdapterAlias, ("acme", "champion")).version_id


def test_base_model_and_sane_adapter_pass(tenant, tiny_model_dir):
    good, bad = tenant
    r = canary.run_canary(str(tiny_model_dir))
    assert r.ok and r.finite and r.new_tokens > 0 and r.error is None
    result = canary.canary_for_tenant("acme")
    assert result.ok and result.adapter_version_id == bad and result.action is None
    assert champion() == bad


def test_nan_adapter_fails_the_canary_and_is_rolled_back(tenant):
    good, bad = tenant
    poison_with_nan(bad)
    result = canary.canary_for_tenant("acme")
    assert not result.ok and not result.finite and "non-finite" in result.error
    assert result.action == "rolled_back" and champion() == good


def test_corrupted_adapter_file_fails_before_loading(tenant, tiny_model_dir):
    good, bad = tenant
    with session_scope() as s:
        v = s.get(AdapterVersion, bad)
        (resolve_in_data_root(v.artifact_path) / store.WEIGHTS_FILE).write_bytes(b"not safetensors")
        s.expunge(v)
    r = canary.run_canary(str(tiny_model_dir), v)
    assert not r.ok and "sha256" in r.error
