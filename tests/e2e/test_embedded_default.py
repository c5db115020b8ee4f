"""The embedded default end to end: `foundry demo` as a user runs it — filesystem broker, SQLite ledger
under one data folder, a real worker process — then the ledger is checked for every step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[2]


def run_demo(data_dir: Path, model: str | None, *extra: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOUNDRY_")}
    env.update({"FOUNDRY_DATA_DIR": str(data_dir), "COLUMNS": "120", "PYTHONUNBUFFERED": "1"})
    if model:
        env["FOUNDRY_BASE_MODEL"] = model
    return subprocess.run([sys.executable, "-m", "worker.cli", "demo", *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def ledger_rows(data_dir: Path, sql: str) -> list:
    eng = create_engine(f"sqlite:///{data_dir / 'ledger.db'}")
    with eng.connect() as conn:
        rows = conn.execute(text(sql)).all()
    eng.dispose()
    return rows


def check_ledger(data_dir: Path) -> None:
    jobs = dict(ledger_rows(data_dir, "SELECT kind, count(*) FROM jobs WHERE status = 'succeeded' GROUP BY kind"))
    assert {"index", "review", "retrain", "quantize", "distill"} <= set(jobs), jobs
    assert ledger_rows(data_dir, "SELECT count(*) FROM jobs WHERE status != 'succeeded'")[0][0] == 0
    reviews = ledger_rows(data_dir, "SELECT count(*), count(DISTINCT job_id) FROM reviews")[0]
    assert reviews[0] == reviews[1] == jobs["review"]
    # every review's cost is in the ledger exactly once
    assert ledger_rows(data_dir, "SELECT count(*) FROM usage_costs WHERE kind = 'review'")[0][0] == jobs["review"]
    assert ledger_rows(data_dir, "SELECT count(*) FROM feedback")[0][0] >= 2
    assert ledger_rows(data_dir, "SELECT count(*) FROM adapter_versions")[0][0] >= 1
    kinds = {r[0] for r in ledger_rows(data_dir, "SELECT kind FROM artifacts")}
    assert {"index_snapshot", "quantized_model", "distilled_model"} <= kinds, kinds
    events = {r[0] for r in ledger_rows(data_dir, "SELECT event FROM health_events")}
    assert {"worker_start", "worker_stop"} <= events
    # the audit view answers "which adapter wrote this review, what did it cost"
    assert ledger_rows(data_dir, "SELECT review_id, cost FROM v_review_audit")


def test_demo_runs_the_whole_loop_with_a_tiny_model(tmp_path, tiny_model_dir):
    result = run_demo(tmp_path / "data", str(tiny_model_dir), "--quick")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "every step succeeded" in result.stdout
    data = tmp_path / "data"
    # the demo says what the eval gate decided, as the ledger recorded it
    out = " ".join(result.stdout.split())
    champion = ledger_rows(data, "SELECT v.name, v.version FROM adapter_aliases a JOIN adapter_versions v "
                                 "ON v.id = a.version_id WHERE a.alias = 'champion'")
    if champion:
        name, version = champion[0]
        assert f"eval gate: promoted adapter {name} v{version}" in out
        assert f"review again: served with adapter {name} v{version}" in out
    else:
        assert "eval gate: kept the champion (the base model)" in out
        assert "review again: served with the base model" in out
    assert (data / "ledger.db").exists() and (data / "broker").is_dir()
    check_ledger(data)


@pytest.mark.slow
def test_demo_with_the_real_embedded_model(tmp_path):
    """`make demo` exactly: SmolLM2-135M-Instruct converted from the PyPI package, no hub, no services."""
    result = run_demo(tmp_path / "data", None, "--quick", timeout=1800)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    check_ledger(tmp_path / "data")
