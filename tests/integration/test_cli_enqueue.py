"""`foundry enqueue --wait --json` against a real worker: one JSON document on standard output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.integration.workers import ROOT, running_worker


def _foundry(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          check=False, env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, timeout=120)


def test_enqueue_wait_json_prints_one_document(env):
    with running_worker(env, ["control"]):
        ok = _foundry(env, "enqueue", "noop", "--tenant", "acme", "--body", '{"cost_tokens": 2}', "--wait", "--json")
        failed = _foundry(env, "enqueue", "noop", "--tenant", "acme", "--body", '{"crash": "raise"}', "--wait",
                          "--json")
    doc = json.loads(ok.stdout)  # the whole output: one document
    assert ok.returncode == 0 and doc["status"] == "succeeded" and doc["job_id"] == doc["id"]
    bad = json.loads(failed.stdout)
    assert failed.returncode == 1 and bad["status"] in ("failed", "dead") and bad["error"]
    queued = _foundry(env, "enqueue", "noop", "--tenant", "acme", "--json")
    assert queued.returncode == 0 and set(json.loads(queued.stdout)) == {"job_id"}
