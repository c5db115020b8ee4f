"""The CLI's conventions, checked on every command: --json on read commands, --tenant (never positional),
exit status 0/1/2, no tracebacks for known failures, --version, units in the help text."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from domain import jobs
from tests.conftest import add_tenant
from worker.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]

# Every command that only reads, with the arguments it needs (filled in by the ledger fixture below).
READ_COMMANDS = [
    ["jobs"], ["job", "{job}"], ["schema", "noop"], ["tenants", "list"],
    ["adapters", "list", "--tenant", "acme"], ["adapters", "history", "--tenant", "acme"],
    ["schedule", "list"], ["artifacts", "list"], ["serve", "show"], ["budget", "show", "--tenant", "acme"],
    ["dlq", "list"], ["ledger", "check", "--no-files"], ["audit", "jobs"], ["audit", "failures"],
    ["audit", "costs"], ["audit", "sql", "v_job_failures"], ["health"],
]
READ_ONLY_WITHOUT_FIXTURE = {("adapters", "show"), ("adapters", "diff"), ("artifacts", "show"), ("audit", "review"),
                             ("index", "search"), ("index", "stats")}  # need adapters/artifacts/reviews/an index


def _leaves(parser: argparse.ArgumentParser, path=()):
    """(command path, parser) for every runnable subcommand."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, p in subs[0].choices.items():
        yield from _leaves(p, (*path, name))


LEAVES = dict(_leaves(build_parser()))


def _options(p) -> dict[str, argparse.Action]:
    return {s: a for a in p._actions for s in a.option_strings}


@pytest.fixture
def ledger(sqlite_ledger, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    add_tenant(sqlite_ledger, "acme")
    job = uuid.uuid4().hex
    jobs.execute("noop", job, {"tenant": "acme"}, "w:1")
    return job


def test_every_read_command_takes_json():
    for cmd in [c for c in READ_COMMANDS] + [list(c) for c in READ_ONLY_WITHOUT_FIXTURE]:
        key = tuple(w for w in cmd if not w.startswith("-") and w not in ("acme", "{job}", "noop", "v_job_failures"))
        assert "--json" in _options(LEAVES[key]), key


@pytest.mark.parametrize("cmd", READ_COMMANDS, ids=" ".join)
def test_json_output_is_one_document(ledger, capsys, cmd):
    code = main([w.format(job=ledger) for w in cmd] + ["--json"])
    out = capsys.readouterr().out
    assert code in (0, 1) if cmd[0] == "health" else code == 0  # health: 1 when the broker is not up
    json.loads(out)  # the whole of standard output is one JSON document


def test_the_tenant_is_never_positional():
    for path, p in LEAVES.items():
        positional = [a.dest for a in p._actions if not a.option_strings and a.help != argparse.SUPPRESS]
        assert "tenant" not in positional, path


def test_help_states_units_and_directions():
    for path, p in LEAVES.items():
        for flag in ("--timeout", "--limit", "--port", "--older-than"):
            action = _options(p).get(flag)
            if action is not None:
                assert action.help and any(w in action.help for w in ("second", "default", "newest", "most")), (path, flag)
        since = _options(p).get("--since")
        if since is not None:
            assert "24h" in since.help or "7d" in since.help, path
    assert "9 = highest" in _options(LEAVES[("enqueue",)])["--priority"].help


def test_exit_status_usage_runtime_success(ledger, capsys):
    assert main(["jobs", "--no-such-option"]) == 2                      # usage: argparse
    assert main(["enqueue", "noop", "--body", "{not json"]) == 2         # usage: a bad value
    assert main(["enqueue", "noop", "--tenant", "acme", "--body", '{"sleep_s": -1}']) == 2  # rejected body
    assert main(["schedule", "set", "--tenant", "acme", "--cron", "* * * * MON-FUN"]) == 2
    assert main(["job", "no-such-job"]) == 1                             # runtime: not found
    assert main(["schedule", "remove", "--tenant", "acme"]) == 1         # runtime: nothing to remove
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err
    assert main(["schedule", "set", "--tenant", "acme", "--cron", "CRON_TZ=Europe/Berlin 0 3 * * MON-FRI"]) == 0
    out = capsys.readouterr().out
    assert "next fire times (UTC)" in out and out.count(":00:00") >= 3
    assert main(["schedule", "set", "--tenant", "acme", "--cron", "0 3 * * MON-FRI", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert len(row["next_runs"]) == 3 and all(t.endswith("03:00:00+00:00") for t in row["next_runs"])


def test_enqueue_body_options(ledger, capsys, tmp_path):
    body = tmp_path / "body.json"
    body.write_text('{"sleep_s": 0, "priority": 7}')
    parser = build_parser()
    args = parser.parse_args(["enqueue", "noop", "--body-file", str(body), "--tenant", "acme"])
    from worker.cli.jobs import build_body

    assert build_body(args) == {"sleep_s": 0, "priority": 7, "tenant": "acme"}
    assert main(["enqueue", "noop", "--body", "{}", "--body-file", str(body)]) == 2


def _cli(args: list[str], cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOUNDRY_")}
    env.update({"PYTHONPATH": str(ROOT), **(env_extra or {})})
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=cwd, env=env, capture_output=True,
                          check=False, text=True, timeout=120)


def test_version():
    r = _cli(["--version"], ROOT)
    assert r.returncode == 0 and r.stdout.startswith("foundry ")


def test_a_missing_ledger_says_upgrade_and_creates_nothing(tmp_path):
    r = _cli(["jobs"], tmp_path)
    assert r.returncode == 1
    assert "foundry db upgrade" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / ".foundry" / "ledger.db").exists()


def test_a_ledger_without_tables_says_upgrade(tmp_path):
    (tmp_path / "ledger.db").touch()  # an empty SQLite file: no tables
    env = {"FOUNDRY_DATABASE_URL": f"sqlite:///{tmp_path / 'ledger.db'}"}
    for cmd in (["jobs", "--json"], ["tenants", "list"], ["audit", "failures"]):
        r = _cli(cmd, tmp_path, env)
        assert r.returncode == 1, (cmd, r.stderr)
        assert "foundry db upgrade" in r.stderr and "Traceback" not in r.stderr, cmd
    r = _cli(["db", "upgrade"], tmp_path, env)
    assert r.returncode == 0, r.stderr
    assert _cli(["jobs", "--json"], tmp_path, env).stdout.strip() == "[]"
