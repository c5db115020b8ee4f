"""Drains live in the ledger (domain/drain.py): a drain written on one host applies to workers on any."""

from __future__ import annotations

import pytest

from domain import drain
from worker import signals


def test_a_drain_applies_to_its_node_its_host_or_everything(sqlite_ledger):
    assert drain.drained("review@host-a") is None
    drain.drain("host:host-a", by="ops")
    assert drain.drained("review@host-a").target == "host:host-a"
    assert drain.drained("retrain@host-a").by == "ops"
    assert drain.drained("review@host-b") is None
    drain.drain("review@host-b", by="ops")
    assert drain.drained("review@host-b").target == "review@host-b" and drain.drained("long@host-b") is None
    assert [d.target for d in drain.active()] == ["host:host-a", "review@host-b"]
    assert drain.undrain("host:host-a") and not drain.undrain("host:host-a")
    assert drain.drained("review@host-a") is None
    drain.drain("all", by="ops")
    assert drain.drained("anything@anywhere").target == "all"


def test_a_drain_for_a_while_ends_by_itself(sqlite_ledger):
    d = drain.drain("all", by="ops", for_s=-1)  # already over
    assert d.until is not None and drain.drained("review@host-a") is None and drain.active() == []
    assert drain.drain("all", by="ops", for_s=3600).until is not None
    assert drain.drained("review@host-a").until is not None


def test_the_health_check_reads_the_ledger_drain_and_the_local_file(sqlite_ledger, tmp_path):
    assert signals._drain_file("review@host-a") is None
    drain.drain("host:host-a", by="ops")
    assert "host:host-a" in signals._drain_file("review@host-a")
    drain.undrain("host:host-a")
    (tmp_path / "drain").mkdir()
    (tmp_path / "drain" / "all").touch()
    assert signals._drain_file("review@host-a").endswith("drain/all")


def test_a_bad_target_is_refused_with_the_field_named(sqlite_ledger):
    with pytest.raises(ValueError, match="target"):
        drain.drain("", by="ops")
