"""`foundry adapters ...` and `foundry schedule ...` on a SQLite ledger."""

from __future__ import annotations

import json

import pytest

from domain import adapter_lookup
from tests.fixtures.adapters import make_version
from domain.config import reset_settings
from domain.ledger.db import session_scope
from domain.ledger.models import HealthEvent
from tests.conftest import add_tenant
from worker.cli import main


@pytest.fixture
def versions(sqlite_ledger, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setenv("FOUNDRY_DEVICE", "cpu")
    reset_settings()
    add_tenant(sqlite_ledger, "acme")
    v1 = make_version("acme", str(tiny_model_dir), seed=1, alias="champion")
    v2 = make_version("acme", str(tiny_model_dir), seed=2)
    return v1, v2


def test_list_show_promote_history_rollback(versions, capsys):
    v1, v2 = versions
    assert main(["adapters", "list", "--tenant", "acme"]) == 0
    out = capsys.readouterr().out
    assert v1 in out and v2 in out and "champion" in out

    assert main(["adapters", "promote", "--tenant", "acme", v2, "--reason", "better on held-out"]) == 0
    assert f"{v1} → {v2}" in capsys.readouterr().out
    assert main(["adapters", "show", "--tenant", "acme"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["id"] == v2 and shown["aliases"] == ["champion"] and shown["status"] == "promoted"

    assert main(["adapters", "rollback", "--tenant", "acme", "--reason", "users complain"]) == 0
    assert f"{v2} → {v1}" in capsys.readouterr().out
    with session_scope() as s:
        assert adapter_lookup.resolve_adapter(s, "acme", None).id == v1
        ev = s.query(HealthEvent).filter_by(event="rollback").one()
        assert ev.tenant_id == "acme" and ev.detail == {"from": v2, "to": v1, "alias": "champion"}
    assert main(["adapters", "history", "--tenant", "acme"]) == 0
    out = capsys.readouterr().out
    assert "rollback: users complain" in out and "better on held-out" in out

    assert main(["adapters", "list", "--tenant", "acme", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["id"]: r["aliases"] for r in rows} == {v1: ["champion"], v2: []}


def test_unknown_adapter_is_an_error_not_a_crash(versions, capsys):
    assert main(["adapters", "show", "--tenant", "acme", "nope"]) == 2  # an unknown reference: a bad value
    assert "unknown adapter" in capsys.readouterr().err


def test_merge_and_diff(versions, capsys):
    v1, v2 = versions
    assert main(["adapters", "merge", "--tenant", "acme", v1, v2, "--weights", "0.5,0.5", "--alias", "candidate"]) == 0
    assert "merged into" in capsys.readouterr().out
    assert main(["adapters", "diff", "--tenant", "acme", "champion", "candidate"]) == 0
    out = capsys.readouterr().out
    assert "weight updates per module" in out and "mean cosine" in out
    assert main(["adapters", "diff", "--tenant", "acme", v1, v2, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["b"]["id"] == v2


def test_schedule_set_list_remove(versions, capsys):
    assert main(["schedule", "set", "--tenant", "acme", "--cron", "@daily", "--min-feedback", "10", "--param", "max_steps=100",
                 "--param", "qlora=true"]) == 0
    assert "at least 10 new feedback" in capsys.readouterr().out
    assert main(["schedule", "list"]) == 0
    out = capsys.readouterr().out
    assert "@daily" in out and '"qlora": true' in out
    assert main(["schedule", "set", "--tenant", "acme", "--cron", "61 * * * *"]) == 2
    assert "cron" in capsys.readouterr().err
    assert main(["schedule", "remove", "--tenant", "acme"]) == 0
    assert main(["schedule", "remove", "--tenant", "acme"]) == 1
