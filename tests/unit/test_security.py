"""Security rules, checked on the code and the configuration: JSON only on the wire, safetensors only for
weights, torch.load(weights_only=True), paths confined to the data root, tenant isolation, no secrets in
messages or logs."""

from __future__ import annotations

import ast
import logging
import os
import re
from pathlib import Path

import pytest

from domain.paths import UnsafePath, resolve_in_data_root

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [p for d in ("domain", "worker", "bench") for p in (ROOT / d).rglob("*.py")]


def calls(name_suffix: str):
    """(path, call node) for every call whose dotted name ends with ``name_suffix``."""
    for path in SOURCES:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                try:
                    name = ast.unparse(node.func)
                except Exception:  # noqa: BLE001
                    continue
                if name.endswith(name_suffix):
                    yield path, node


# ---- the wire ---------------------------------------------------------------------------------------

def test_celery_accepts_and_sends_json_only():
    from worker.celery_app import make_celery

    from domain.config import Settings

    for settings in (Settings(broker_url="redis://127.0.0.1:6379/0"), Settings(broker_url="")):
        conf = make_celery(settings).conf
        assert conf.accept_content == ["json"] and conf.result_accept_content == ["json"]
        assert conf.task_serializer == "json" and conf.result_serializer == "json"
        assert conf.event_serializer == "json"


def test_no_pickle_in_the_code():
    offenders = []
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle") for n in names):
                    offenders.append(str(path.relative_to(ROOT)))
            if isinstance(node, ast.keyword) and node.arg == "allow_pickle":
                if not (isinstance(node.value, ast.Constant) and node.value.value is False):
                    offenders.append(f"{path.relative_to(ROOT)}: allow_pickle")
    assert not offenders, offenders


# ---- weights ----------------------------------------------------------------------------------------

def test_torch_load_always_weights_only():
    bad = []
    for path, node in calls("torch.load"):
        kw = {k.arg: k.value for k in node.keywords}
        if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
            bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, f"torch.load without weights_only=True: {bad}"


def test_torch_save_only_for_training_state_never_weights():
    """torch.save is allowed for optimizer/scheduler/RNG state dicts only; weights go through safetensors."""
    bad = []
    for path, node in calls("torch.save"):
        saved = ast.unparse(node.args[0]) if node.args else ""
        if not node.args or not isinstance(node.args[0], ast.Dict):  # a bare model / state_dict: weights
            bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {saved[:80]}")
            continue
        keys = {k.value for k in node.args[0].keys if isinstance(k, ast.Constant)}
        if keys & {"model", "weights", "state_dict", "student", "adapter"}:
            bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: saves {keys}")
    assert not bad, bad


def test_save_pretrained_is_always_safetensors():
    bad = []
    for path, node in calls("save_pretrained"):
        kw = {k.arg: k.value for k in node.keywords}
        flag = kw.get("safe_serialization")
        if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is True):
            bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, bad
    writes_bin = [str(p.relative_to(ROOT)) for p in SOURCES if re.search(r"pytorch_model\.bin|\.bin['\"]\s*\)", p.read_text())
                  and "glob" not in p.read_text()]
    assert not writes_bin, writes_bin


# ---- paths ------------------------------------------------------------------------------------------

def test_paths_are_confined_to_the_data_root(sqlite_ledger, tmp_path):
    root = tmp_path.resolve()
    assert resolve_in_data_root("artifacts/x/y") == root / "artifacts/x/y"
    assert resolve_in_data_root(root / "inside") == root / "inside"
    for bad in ("../etc/passwd", "a/../../b", "/etc/passwd", str(root.parent / "sibling")):
        with pytest.raises(UnsafePath):
            resolve_in_data_root(bad)
    outside = tmp_path.parent / f"outside-{os.getpid()}"
    outside.mkdir(exist_ok=True)
    (tmp_path / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePath, match="outside the data root"):
        resolve_in_data_root("link/file")


# ---- tenants ----------------------------------------------------------------------------------------

def test_tenant_isolation_in_adapter_lookups_and_moves(sqlite_ledger):
    from domain import adapter_lookup
    from domain.adapters import store
    from domain.errors import InvalidJob
    from domain.ledger.db import session_scope
    from tests.conftest import add_tenant
    from tests.unit.test_consistency import fake_adapter

    add_tenant(sqlite_ledger, "acme")
    add_tenant(sqlite_ledger, "globex")
    with session_scope() as s:
        theirs = fake_adapter("globex", "reviewer", "v1", s).id
    with session_scope() as s:
        with pytest.raises(InvalidJob, match="unknown adapter"):
            adapter_lookup.resolve_adapter(s, "acme", theirs)
        with pytest.raises(InvalidJob):
            store.move_alias(s, "acme", "champion", theirs, "test")
        assert adapter_lookup.resolve_adapter(s, "acme", None) is None


def test_tenant_isolation_in_dead_letter_operations(sqlite_ledger):
    from domain import dlq
    from domain.ledger.db import session_scope
    from domain.ledger.models import Job

    with session_scope() as s:
        s.add(Job(id="dead-g", kind="noop", tenant_id="globex", payload={"tenant": "globex"}, status="dead"))
    assert [d.id for d in dlq.list_dead("globex")] == ["dead-g"] and dlq.list_dead("acme") == []
    with pytest.raises(LookupError):
        dlq.drop("dead-g", by="t", tenant="acme")
    with pytest.raises(LookupError):
        dlq.retry("dead-g", lambda *a, **k: "x", by="t", tenant="acme")


def test_tenant_isolation_in_feedback(sqlite_ledger):
    from tests.fixtures.adapters import seed_feedback
    from domain.feedback import record_feedback
    from domain.ledger.db import session_scope
    from domain.ledger.models import Feedback

    seed_feedback("acme", [("a.py", "x = 1", "Summary: fine")])
    with session_scope() as s:
        review_id = s.get(Feedback, s.query(Feedback.id).scalar()).review_id
    with pytest.raises(Exception):  # noqa: B017 - the feedback module's own error type
        record_feedback(review_id, "accept", tenant="globex")


# ---- secrets ----------------------------------------------------------------------------------------

SECRET = "s3cr3t-Pa55"


def test_connection_errors_never_carry_the_password(caplog):
    from domain import health

    caplog.set_level(logging.DEBUG)
    ok, msg, _ = health.check_database(f"postgresql+psycopg://foundry:{SECRET}@127.0.0.1:1/foundry")
    assert not ok and SECRET not in msg
    ok, msg, _ = health.check_broker(f"redis://:{SECRET}@127.0.0.1:1/0", timeout=1)
    assert not ok and SECRET not in msg
    assert SECRET not in caplog.text


def test_enqueue_error_and_ledger_row_never_carry_the_broker_password(sqlite_ledger, monkeypatch, caplog):
    from domain.config import reset_settings
    from domain.ledger.db import session_scope
    from domain.ledger.models import Job
    from worker import client

    monkeypatch.setenv("FOUNDRY_BROKER_URL", f"redis://:{SECRET}@127.0.0.1:1/0")
    reset_settings()
    client._apps.clear()
    caplog.set_level(logging.DEBUG)
    with pytest.raises(client.EnqueueError) as err:
        client.enqueue("noop", {"tenant": "default"}, job_id="secret-1")
    assert SECRET not in str(err.value) and SECRET not in caplog.text
    with session_scope() as s:
        assert SECRET not in (s.get(Job, "secret-1").error or "")
    client._apps.clear()


def test_metrics_server_refuses_to_start_without_credentials(monkeypatch, capsys):
    from worker.cli import main

    monkeypatch.delenv("FOUNDRY_METRICS_USER", raising=False)
    monkeypatch.delenv("FOUNDRY_METRICS_PASSWORD", raising=False)
    assert main(["metrics", "serve", "--port", "0"]) == 2
    assert "FOUNDRY_METRICS_PASSWORD" in capsys.readouterr().err


def test_compose_takes_secrets_from_files():
    import yaml

    text = (ROOT / "docker-compose.yml").read_text()
    services = yaml.safe_load(text)["services"]
    assert "POSTGRES_PASSWORD_FILE: /run/secrets/postgres_password" in text
    assert "FLOWER_BASIC_AUTH_FILE: /run/secrets/flower_basic_auth" in text
    assert not any("auth" in str(p).lower() for p in services["flower"]["command"])
    assert not re.search(r"(PASSWORD|SECRET)[A-Z_]*:\s*['\"]?[A-Za-z0-9]{4,}", text), "a hard-coded secret"
