"""`foundry artifacts list|show` and `foundry serve set|show` against a SQLite ledger."""

from __future__ import annotations

import json
import uuid

import pytest

from domain import jobs
from domain.ledger.db import session_scope
from domain.ledger.models import Artifact, HealthEvent, Tenant
from tests.conftest import add_tenant
from worker.cli import main


@pytest.fixture
def quantized(sqlite_ledger, tiny_model_dir):
    add_tenant(sqlite_ledger, "acme")
    add_tenant(sqlite_ledger, "other")
    out = jobs.execute("quantize", uuid.uuid4().hex, {"tenant": "acme", "source_model": str(tiny_model_dir),
                                                      "method": "int8", "eval_max_tokens": 256}, "test:1")
    assert out["status"] == "succeeded", out
    return out["result"]["artifact_id"]


def serving(tenant: str) -> str | None:
    with session_scope() as s:
        return s.get(Tenant, tenant).serving_artifact_id


def test_list_and_show(quantized, capsys):
    assert main(["artifacts", "list", "--kind", "quantized_model", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in rows] == [quantized] and rows[0]["report"]["method"] == "int8"
    assert main(["artifacts", "list"]) == 0
    assert "int8" in capsys.readouterr().out
    assert main(["artifacts", "show", quantized]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["lineage"]["method"] == "int8" and "kl_divergence" in shown["report"]
    assert main(["artifacts", "show", "nope"]) == 1


def test_serve_set_and_back_to_base(quantized, capsys):
    assert main(["serve", "set", "--tenant", "acme", quantized]) == 0
    assert serving("acme") == quantized
    assert main(["serve", "show", "--tenant", "acme"]) == 0
    assert quantized in capsys.readouterr().out
    assert main(["serve", "set", "--tenant", "acme", "--base"]) == 0
    assert serving("acme") is None
    with session_scope() as s:
        events = [e.detail for e in s.query(HealthEvent).filter_by(event="serving_changed").order_by(HealthEvent.id)]
    assert events == [{"from": None, "to": quantized}, {"from": quantized, "to": None}]


def test_serve_set_refuses_what_cannot_be_served(quantized):
    assert main(["serve", "set", "--tenant", "other", quantized]) == 2  # another tenant's artifact
    assert main(["serve", "set", "--tenant", "ghost", quantized]) == 1  # unknown tenant
    assert main(["serve", "set", "--tenant", "acme", "nope"]) == 1
    assert main(["serve", "set", "--tenant", "acme"]) == 2  # neither an id nor --base
    with session_scope() as s:
        s.add(Artifact(id="snap1", kind="index_snapshot", tenant_id="acme", path="x"))
    assert main(["serve", "set", "--tenant", "acme", "snap1"]) == 2
    assert serving("acme") is None and serving("other") is None
