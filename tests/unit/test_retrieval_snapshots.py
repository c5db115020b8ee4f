"""Snapshot safety: a writer SIGKILLed mid-build leaves the previous version serving; a corrupt snapshot is
detected by hash, the previous version keeps serving and a health event is written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from domain.jobs import execute
from domain.ledger.db import session_scope
from domain.ledger.models import Artifact, HealthEvent, Job
from domain.retrieval import reader, service
from domain.retrieval.service import retrieve_context
from domain.config import reset_settings
from domain.retrieval.snapshots import read_current, tenant_dir, version_dir
from tests.conftest import add_tenant

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def index_env(sqlite_ledger, monkeypatch):
    monkeypatch.setenv("FOUNDRY_EMBEDDING_MODEL", "hashing:128")
    monkeypatch.setenv("FOUNDRY_INDEX_LEASE_TTL_S", "2")
    reset_settings()
    reader.forget()
    add_tenant(sqlite_ledger, "acme")
    yield sqlite_ledger
    reader.forget()
    reset_settings()


def run(body: dict) -> dict:
    return execute("index", uuid.uuid4().hex, body, "test-worker")


def docs(prefix: str, n: int) -> list[dict]:
    return [{"id": f"{prefix}{i}", "text": f"def {prefix}_handler_{i}(event):\n    return event['{prefix}{i}']\n",
             "language": "python"} for i in range(n)]


# The writer runs in its own process; it stops inside DenseIndex.save (the snapshot is half written) and
# announces it, so the test can SIGKILL it at exactly that point.
WRITER = textwrap.dedent("""
    import sys, time, uuid, json
    from domain.retrieval import dense
    real_save = dense.DenseIndex.save
    def slow_save(self, folder):
        real_save(self, folder)
        print("HALF-WRITTEN", folder, flush=True)
        time.sleep(60)
    dense.DenseIndex.save = slow_save
    from domain.jobs import execute
    body = json.loads(sys.argv[1])
    print(execute("index", sys.argv[2], body, "doomed-writer"), flush=True)
""")


def test_writer_killed_mid_build_leaves_previous_version_serving(index_env):
    assert run({"tenant": "acme", "documents": docs("old", 5)})["status"] == "succeeded"
    assert retrieve_context("acme", "old handler 3", k=1, floor=-1).index_version == 1
    job_id = uuid.uuid4().hex
    import json
    proc = subprocess.Popen([sys.executable, "-c", WRITER, json.dumps({"tenant": "acme", "documents": docs("new", 5)}), job_id],
                            cwd=ROOT, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        line = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if "HALF-WRITTEN" in line or not line:
                break
        assert "HALF-WRITTEN" in line, line
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(10)
    builds = list(tenant_dir("acme").glob(".build-*"))
    assert builds and not (builds[0] / "manifest.json").exists()  # half a snapshot, never pointed to
    assert read_current("acme") == 1
    ctx = retrieve_context("acme", "new_handler_3", k=10, floor=-1)
    assert ctx.index_version == 1 and all(c.document_id.startswith("old") for c in ctx.chunks)
    with session_scope() as s:
        assert [a.version for a in s.scalars(select(Artifact))] == [1]
        assert s.get(Job, job_id).status == "running"  # lost with its worker; the ledger sweeps it later
    time.sleep(2.2)  # the dead writer's lease expires (TTL 2 s) and its stale build folder gets cleaned
    out = run({"tenant": "acme", "documents": docs("new", 5)})
    assert out["status"] == "succeeded" and out["result"]["index_version"] == 2
    assert not list(tenant_dir("acme").glob(".build-*"))
    ctx = retrieve_context("acme", "new_handler_3", k=1, floor=-1)
    assert ctx.index_version == 2 and ctx.chunks[0].document_id == "new3"


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_snapshot_keeps_previous_version_serving(index_env):
    run({"tenant": "acme", "documents": docs("one", 3)})
    assert retrieve_context("acme", "one handler", k=1, floor=-1).index_version == 1  # this reader holds v1
    run({"tenant": "acme", "documents": docs("two", 3)})
    _corrupt(version_dir("acme", 2) / "dense.faiss")
    ctx = retrieve_context("acme", "two_handler_1", k=3, floor=-1)
    assert ctx.index_version == 1 and ctx.chunks  # v2 failed its hash check: v1 keeps serving
    with session_scope() as s:
        events = list(s.scalars(select(HealthEvent).where(HealthEvent.component == "index")))
    assert len(events) == 1 and events[0].event == "corrupt" and events[0].status == "degraded"
    assert events[0].detail["version"] == 2 and events[0].detail["serving_version"] == 1
    retrieve_context("acme", "two handler", k=1, floor=-1)
    with session_scope() as s:  # reported once, not on every query
        assert len(list(s.scalars(select(HealthEvent).where(HealthEvent.component == "index")))) == 1

    reader.forget()  # a freshly started reader falls back to the newest intact version on disk
    assert retrieve_context("acme", "one handler", k=1, floor=-1).index_version == 1

    service._written.clear()  # a writer process that did not write v2 itself must read it from disk...
    out = run({"tenant": "acme", "documents": docs("three", 1)})  # ...and refuses to build on a corrupt base
    assert out["status"] == "failed" and out["code"] == "index_corrupt"
    out = run({"tenant": "acme", "action": "rebuild", "documents": docs("one", 3) + docs("two", 3)})
    assert out["status"] == "succeeded" and out["result"]["index_version"] == 3
    ctx = retrieve_context("acme", "two_handler_1", k=1, floor=-1)
    assert ctx.index_version == 3 and ctx.chunks[0].document_id == "two1"


def test_missing_file_and_bad_pointer_are_detected(index_env):
    run({"tenant": "acme", "documents": docs("one", 2)})
    run({"tenant": "acme", "documents": docs("two", 2)})
    (version_dir("acme", 2) / "chunks.jsonl").unlink()
    assert retrieve_context("acme", "two handler", k=1, floor=-1).index_version == 1
    (tenant_dir("acme") / "CURRENT").write_text("not json")
    reader.forget()
    ctx = retrieve_context("acme", "one handler", k=1, floor=-1)
    assert ctx.index_version is None and ctx.chunks == []  # unreadable pointer, nothing loaded before: empty
