"""The foundry CLI against a SQLite ledger (no broker needed for these commands)."""

import json
import uuid

import pytest

from domain import jobs
from worker.cli import build_parser, main


@pytest.fixture
def ledger(ledger, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    return ledger

def run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_every_documented_command_exists():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for cmd in ("jobs", "job", "enqueue", "schema", "tenants", "db", "audit", "worker", "beat", "health", "demo",
                "prepare-model"):
        assert cmd in sub.choices, cmd
    audit = next(a for a in sub.choices["audit"]._actions if a.dest == "audit_command")
    assert {"jobs", "failures", "sql"} <= set(audit.choices)


def test_jobs_and_job_show_status_attempts_and_error(ledger, capsys):
    ok, bad = uuid.uuid4().hex, uuid.uuid4().hex
    jobs.execute("noop", ok, {"tenant": "acme"}, "w:1")
    jobs.execute("review", bad, {"tenant": "acme", "code": ""}, "w:1")
    code, out = run(capsys, "jobs")
    assert code == 0 and ok[:12] in out and "rejected" in out
    code, out = run(capsys, "job", bad[:10])
    assert code == 0 and "code is empty" in out and "rejected" in out
    code, out = run(capsys, "job", ok, "--json")
    data = json.loads(out)
    assert data["status"] == "succeeded" and data["attempt_log"][0]["outcome"] == "succeeded"
    code, out = run(capsys, "jobs", "--status", "rejected", "--json")
    assert [j["id"] for j in json.loads(out)] == [bad]


def test_watch_ends_with_the_final_status(ledger, capsys):
    jid = uuid.uuid4().hex
    jobs.execute("noop", jid, {"tenant": "acme"}, "w:1")
    code, out = run(capsys, "job", jid, "--watch")
    assert code == 0 and "succeeded" in out


def test_enqueue_rejects_a_bad_job_naming_the_field_and_records_it(ledger, capsys, tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    return 1\n")
    code, out = run(capsys, "enqueue", "review", "--file", str(f), "--tenant", "acme", "--body", '{"max_new_tokens": -3}')
    assert code == 2 and "max_new_tokens" in out
    code, out = run(capsys, "jobs", "--status", "rejected", "--json")
    assert json.loads(out)[0]["payload"]["code"].startswith("def f")


def test_enqueue_refuses_binary_files(ledger, capsys, tmp_path):
    f = tmp_path / "blob.bin"
    f.write_bytes(b"\xff\xfe\x00\x01")
    code, out = run(capsys, "enqueue", "review", "--file", str(f), "--tenant", "acme")
    assert code == 2 and "binary" in out


def test_audit_failures_lists_what_broke(ledger, capsys):
    jobs.execute("review", uuid.uuid4().hex, {"tenant": "ghost", "code": "x"}, "w:1")
    code, out = run(capsys, "audit", "failures", "--since", "1h", "--json")
    data = json.loads(out)
    assert code == 0 and data["jobs"][0]["code"] == "unknown_tenant"


def test_audit_sql_views(ledger, capsys):
    jobs.execute("review", uuid.uuid4().hex, {"tenant": "acme", "code": ""}, "w:1")
    code, out = run(capsys, "audit", "sql", "v_job_failures", "--json")
    assert code == 0 and json.loads(out)[0]["status"] == "rejected"


def test_schema_command_prints_json_schema(capsys):
    code, out = run(capsys, "schema", "review")
    assert code == 0 and "code" in json.loads(out)["properties"]


def test_tenants_add_is_idempotent_and_validated(ledger, capsys):
    assert run(capsys, "tenants", "add", "beta")[0] == 0
    assert "already exists" in run(capsys, "tenants", "add", "beta")[1]
    code, out = run(capsys, "tenants", "add", "Bad Name")
    assert code == 2
    assert "beta" in run(capsys, "tenants", "list")[1]


def test_db_check_is_clean(ledger, capsys):
    assert run(capsys, "db", "check")[0] == 0


def test_worker_flavours_use_the_documented_pools():
    from worker.cli.service import worker_argv

    assert worker_argv("gpu")[worker_argv("gpu").index("-P") + 1] == "solo"
    review = worker_argv("review")
    assert review[review.index("-P") + 1] == "threads"
    cpu = worker_argv("cpu")
    assert cpu[cpu.index("-P") + 1] == "prefork" and "--max-tasks-per-child" in cpu
