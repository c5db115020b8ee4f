"""domain.circuit: failures on a newly promoted champion roll it back once; everything else only counts."""

from datetime import timedelta

import pytest
from sqlalchemy import select

from domain import circuit
from domain.adapters import store
from domain.config import Settings
from domain.ledger.db import session_scope
from domain.ledger.models import AdapterAlias, AdapterVersion, AliasHistory, HealthEvent, utcnow
from tests.conftest import add_tenant
from tests.unit.test_consistency import fake_adapter


@pytest.fixture
def two_versions(sqlite_ledger):
    """acme: v1 champion, then v2 promoted over it (the newly promoted champion)."""
    add_tenant(sqlite_ledger, "acme")
    with session_scope() as s:
        v1 = fake_adapter("acme", "reviewer", "v1", s)
        store.move_alias(s, "acme", "champion", v1.id, "test", "first")
        v2 = fake_adapter("acme", "reviewer", "v2", s, parent_id=v1.id)
        store.move_alias(s, "acme", "champion", v2.id, "test", "gate passed")
        return v1.id, v2.id


def champion(tenant="acme"):
    with session_scope() as s:
        a = s.get(AdapterAlias, (tenant, "champion"))
        return a.version_id if a else None


SETTINGS = circuit.CircuitSettings(failures=3, window_s=600, recent_s=3600)


def test_k_failures_on_new_champion_roll_it_back_once(two_versions):
    v1, v2 = two_versions
    assert circuit.observe_review("acme", v2, True, None, "review", settings=SETTINGS) is None
    assert circuit.observe_review("acme", v2, False, "nan logits", "review", settings=SETTINGS) == "recorded"
    assert circuit.observe_review("acme", v2, False, "nan logits", "review", settings=SETTINGS) == "recorded"
    assert champion() == v2
    assert circuit.observe_review("acme", v2, False, "nan logits", "w1", settings=SETTINGS) == "rolled_back"
    assert champion() == v1
    # later failures of the old champion do not roll back again
    assert circuit.observe_review("acme", v2, False, "nan logits", "w1", settings=SETTINGS) == "recorded"
    with session_scope() as s:
        moves = list(s.scalars(select(AliasHistory).where(AliasHistory.moved_by == circuit.MOVED_BY)))
        assert len(moves) == 1 and moves[0].from_version_id == v2 and moves[0].to_version_id == v1
        assert moves[0].reason.startswith("rollback: 3 review failures") and "nan logits" in moves[0].reason
        assert s.get(AdapterVersion, v2).status == "rejected"
        events = list(s.scalars(select(HealthEvent).where(HealthEvent.event == "rollback")))
        assert len(events) == 1 and events[0].detail["to_version_id"] == v1 and events[0].tenant_id == "acme"


def test_failures_outside_the_window_or_on_an_old_champion_only_count(two_versions):
    v1, v2 = two_versions
    later = utcnow() + timedelta(seconds=700)  # the first failures fall out of the 600 s window
    for _ in range(2):
        circuit.observe_review("acme", v2, False, "boom", settings=SETTINGS)
    assert circuit.observe_review("acme", v2, False, "boom", settings=SETTINGS, now=later) == "recorded"
    assert champion() == v2
    old = utcnow() + timedelta(hours=2)  # promoted more than recent_s ago
    for _ in range(4):
        assert circuit.observe_review("acme", v2, False, "boom", settings=SETTINGS, now=old) == "recorded"
    assert champion() == v2


def test_failures_of_a_non_champion_or_no_adapter_do_nothing(two_versions):
    v1, v2 = two_versions
    for _ in range(5):
        assert circuit.observe_review("acme", v1, False, "x", settings=SETTINGS) == "recorded"
    assert circuit.observe_review("acme", None, False, "x", settings=SETTINGS) is None
    assert champion() == v2


def test_failing_canary_rolls_back_at_once_and_disabled_breaker_only_records(two_versions):
    v1, v2 = two_versions
    off = circuit.CircuitSettings(enabled=False)
    assert circuit.observe_review("acme", v2, False, "empty output", "canary", settings=off) == "recorded"
    assert champion() == v2
    assert circuit.observe_review("acme", v2, False, "empty output", "canary", settings=SETTINGS) == "rolled_back"
    assert champion() == v1


def test_rollback_of_the_first_champion_serves_the_base_model(sqlite_ledger):
    add_tenant(sqlite_ledger, "solo")
    with session_scope() as s:
        v = fake_adapter("solo", "reviewer", "v1", s)
        store.move_alias(s, "solo", "champion", v.id, "test")
        vid = v.id
    assert circuit.observe_review("solo", vid, False, "inf", "canary", settings=SETTINGS) == "rolled_back"
    assert champion("solo") is None


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("FOUNDRY_CIRCUIT_FAILURES", "7")
    monkeypatch.setenv("FOUNDRY_CIRCUIT_WINDOW_S", "30")
    s = Settings().circuit
    assert s.failures == 7 and s.window_s == 30 and s.enabled
