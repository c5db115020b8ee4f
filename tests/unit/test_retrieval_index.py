"""Index jobs end to end on a SQLite ledger with the fast hashing embedder: upsert/delete semantics, content
hash reuse, versioned snapshots recorded as artifacts, readers picking up new versions, tenant isolation,
HNSW tombstones, the writer lease, accepted reviews, and bad input."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from domain.jobs import RetryLater, execute
from domain.ledger.db import session_scope
from domain.ledger.models import Artifact, Feedback, Job, Lease, Review
from domain.paths import sha256_file
from domain.retrieval import reader
from domain.retrieval.service import retrieve_context
from domain.config import reset_settings
from domain.retrieval.snapshots import acquire_lease, read_current, tenant_dir, version_dir
from tests.conftest import add_tenant

CALC = '''def add(a, b):
    """Add two numbers."""
    return a + b


def subtract_numbers(a, b):
    """Subtract b from a."""
    return a - b


def multiply_matrix(rows, cols):
    """Multiply two matrices."""
    return [[sum(x * y for x, y in zip(r, c)) for c in zip(*cols)] for r in rows]
'''


@pytest.fixture
def index_env(sqlite_ledger, monkeypatch):
    monkeypatch.setenv("FOUNDRY_EMBEDDING_MODEL", "hashing:256")
    reset_settings()
    reader.forget()
    add_tenant(sqlite_ledger, "acme")
    add_tenant(sqlite_ledger, "globex")
    yield sqlite_ledger
    reader.forget()
    reset_settings()


def run(body: dict) -> dict:
    out = execute("index", uuid.uuid4().hex, body, "test-worker")
    return out


def add(tenant: str, *docs: dict) -> dict:
    out = run({"tenant": tenant, "action": "add", "documents": list(docs)})
    assert out["status"] == "succeeded", out
    return out["result"]


def doc(doc_id: str, text: str, **kw) -> dict:
    return {"id": doc_id, "text": text, **kw}


def test_add_records_artifact_and_serves(index_env):
    res = add("acme", doc("calc.py", CALC, path="calc.py"), doc("style.md", "Prefer pathlib over os.path for paths.", source="doc"))
    assert res["index_version"] == 1 and res["documents"] == 2 and res["chunks"] == 4
    assert res["chunks_embedded"] == 4 and res["dense_kind"] == "flat"
    ctx = retrieve_context("acme", "multiply matrix rows cols", k=2, floor=0.0)
    assert ctx.index_version == 1
    assert ctx.chunks[0].id == "calc.py#2" and ctx.chunks[0].path == "calc.py" and ctx.chunks[0].document_id == "calc.py"
    assert ctx.chunks[0].score >= ctx.chunks[-1].score - 1.0 and "multiply_matrix" in ctx.chunks[0].text
    with session_scope() as s:
        art = s.scalar(select(Artifact).where(Artifact.kind == "index_snapshot"))
        assert art.version == 1 and art.status == "active" and art.tenant_id == "acme"
        assert art.path == "index/acme/v1"  # relative to the data root
        assert art.sha256 == sha256_file(version_dir("acme", 1) / "manifest.json")
        assert art.report["documents"] == 2 and art.report["chunks"] == 4 and art.created_by_job_id


def test_upsert_reembeds_only_changed_chunks_and_unchanged_is_free(index_env):
    add("acme", doc("calc.py", CALC, path="calc.py"))
    again = add("acme", doc("calc.py", CALC, path="calc.py"))
    assert again["changed"] is False and again["index_version"] == 1 and again["documents_unchanged"] == 1
    assert read_current("acme") == 1
    changed = CALC.replace("return a - b", "return a - b - 0  # weird")
    res = add("acme", doc("calc.py", changed, path="calc.py"))
    assert res["index_version"] == 2 and res["documents_updated"] == 1
    assert res["chunks_embedded"] == 1 and res["chunks"] == 3  # the two untouched functions kept their vectors
    ctx = retrieve_context("acme", "subtract weird", k=1, floor=-1)
    assert "# weird" in ctx.chunks[0].text  # the old version of the chunk is gone
    # same content under another id: the vector is reused, not recomputed
    res = add("acme", doc("copy.py", changed, path="calc.py"))
    assert res["chunks_reused"] == 3 and res["chunks_embedded"] == 0
    with session_scope() as s:
        statuses = sorted((a.version, a.status) for a in s.scalars(select(Artifact)))
    assert statuses == [(1, "superseded"), (2, "superseded"), (3, "active")]


def test_remove_by_document_id(index_env):
    add("acme", doc("calc.py", CALC, path="calc.py"), doc("notes", "Always validate user input before SQL."))
    out = run({"tenant": "acme", "action": "remove", "document_ids": ["notes", "never-indexed"]})
    res = out["result"]
    assert res["documents_removed"] == 1 and res["missing"] == ["never-indexed"] and res["documents"] == 1
    ctx = retrieve_context("acme", "validate user input SQL", k=10, floor=-1)
    assert ctx.index_version == 2 and all(c.document_id != "notes" for c in ctx.chunks)


def test_readers_pick_up_new_versions_without_restart(index_env):
    assert retrieve_context("acme", "anything") .index_version is None  # no index yet: a valid, empty answer
    add("acme", doc("a", "def alpha_function(): return 1\n", language="python"))
    first = retrieve_context("acme", "alpha function", k=1, floor=-1)
    assert first.index_version == 1 and first.chunks[0].document_id == "a"
    add("acme", doc("b", "def beta_handler(request): return request.json\n", language="python"))
    second = retrieve_context("acme", "beta handler request", k=1, floor=-1)
    assert second.index_version == 2 and second.chunks[0].document_id == "b"
    snap = reader.current_snapshot("acme")
    assert reader.current_snapshot("acme") is snap  # cached while CURRENT is unchanged


def test_relevance_floor_filters_weak_chunks(index_env):
    add("acme", doc("calc.py", CALC, path="calc.py"))
    everything = retrieve_context("acme", "multiply matrix", k=3, floor=-1.0)
    assert len(everything.chunks) == 3
    top = everything.chunks[0].score
    strict = retrieve_context("acme", "multiply matrix", k=3, floor=top - 1e-6)
    assert [c.id for c in strict.chunks] == [everything.chunks[0].id]
    nothing = retrieve_context("acme", "multiply matrix", k=3, floor=top + 0.01)
    assert nothing.chunks == [] and nothing.index_version == 1


def test_tenant_isolation(index_env):
    add("acme", doc("secret", "def acme_private_pricing(): return 42\n", language="python"))
    add("globex", doc("public", "def globex_public_api(): return 1\n", language="python"))
    ctx = retrieve_context("globex", "acme private pricing", k=5, floor=-1)
    assert ctx.chunks and all(c.document_id == "public" for c in ctx.chunks)
    run({"tenant": "globex", "action": "remove", "document_ids": ["public"]})
    assert retrieve_context("acme", "acme private pricing", k=1, floor=-1).chunks[0].document_id == "secret"
    assert read_current("acme") == 1 and read_current("globex") == 2
    assert retrieve_context("initech", "anything").index_version is None


def test_hnsw_tombstones_compaction_and_rebuild(index_env, monkeypatch):
    monkeypatch.setenv("FOUNDRY_INDEX_EXACT_MAX", "8")
    monkeypatch.setenv("FOUNDRY_INDEX_TOMBSTONE_REBUILD", "0.3")
    reset_settings()
    docs = [doc(f"d{i}", f"def function_number_{i}(value):\n    return value * {i} + {i * 7}\n", language="python")
            for i in range(20)]
    res = add("acme", *docs)
    assert res["dense_kind"] == "hnsw" and res["chunks"] == 20
    out = run({"tenant": "acme", "action": "remove", "document_ids": ["d0", "d1", "d2"]})["result"]
    assert out["tombstones"] == 3 and out["chunks"] == 17
    ctx = retrieve_context("acme", "function number 1 value", k=17, floor=-1)
    assert {c.document_id for c in ctx.chunks}.isdisjoint({"d0", "d1", "d2"})
    out = run({"tenant": "acme", "action": "remove", "document_ids": ["d3", "d4", "d5", "d6"]})["result"]
    assert out.get("compacted") and out["tombstones"] == 0 and out["chunks"] == 13
    out = run({"tenant": "acme", "action": "rebuild"})["result"]  # rebuild from the current chunks
    assert out["chunks"] == 13 and out["chunks_embedded"] == 0 and out["index_version"] == 4
    out = run({"tenant": "acme", "action": "rebuild", "documents": docs[:2]})["result"]  # documents replace all
    assert out["documents"] == 2 and out["dense_kind"] == "flat"


def test_old_versions_are_pruned(index_env):
    for i in range(5):
        add("acme", doc(f"d{i}", f"def f{i}(): return {i}\n", language="python"))
    versions = sorted(p.name for p in tenant_dir("acme").iterdir() if p.name.startswith("v"))
    assert versions == ["v3", "v4", "v5"]


def test_writer_lease_is_exclusive(index_env, monkeypatch):
    acquire_lease("acme", "someone-else", ttl_s=300)
    monkeypatch.setenv("FOUNDRY_INDEX_LEASE_TTL_S", "0.5")  # the job waits at most this long for the lease
    reset_settings()
    with pytest.raises(RetryLater):
        run({"tenant": "acme", "action": "add", "documents": [doc("a", "text one two three")]})
    assert read_current("acme") is None
    acquire_lease("acme", "someone-else", ttl_s=-1)  # expired: the next writer takes it over
    add("acme", doc("a", "text one two three"))
    with session_scope() as s:
        assert s.get(Lease, "index:acme") is None  # released with the commit


def test_accepted_reviews_are_indexed(index_env):
    with session_scope() as s:
        for n, verdict in ((1, "accept"), (2, "reject")):
            s.add(Job(id=f"job{n}", kind="review", tenant_id="acme", status="succeeded"))
            s.flush()
            s.add(Review(id=f"rev{n}", job_id=f"job{n}", tenant_id="acme", model_id="m", code=f"eval(user_input_{n})",
                         code_sha256="x", summary=f"Never call eval on user input {n}", raw_text="...", path="app.py",
                         findings=[{"line": 1, "severity": "high", "message": "eval on untrusted input"}]))
            s.flush()
            s.add(Feedback(review_id=f"rev{n}", tenant_id="acme", verdict=verdict))
    out = run({"tenant": "acme", "action": "add", "include_accepted_reviews": True})
    assert out["status"] == "succeeded" and out["result"]["documents"] == 1
    ctx = retrieve_context("acme", "eval user input", k=3, floor=-1)
    assert [c.document_id for c in ctx.chunks] == ["review:rev1"] and ctx.chunks[0].source == "review"


def test_bad_input_is_rejected(index_env):
    assert run({"tenant": "acme", "documents": [doc("e", "   ")]})["status"] == "rejected"
    assert run({"tenant": "acme", "documents": [doc("b", "abc\x00def")]})["status"] == "rejected"
    out = run({"tenant": "nobody", "documents": [doc("a", "text")]})
    assert out["status"] == "rejected" and out["field"] == "tenant"
    assert run({"tenant": "acme", "action": "remove"})["status"] == "rejected"


def test_cli_add_search_remove_stats(index_env, tmp_path, capsys):
    from worker.cli import main

    src = tmp_path / "src"
    src.mkdir()
    (src / "calc.py").write_text(CALC)
    (src / "notes.md").write_text("Review rule: never log passwords or tokens.")
    (src / "blob.bin").write_bytes(b"\x00\x01")  # not a text suffix: ignored
    assert main(["index", "add", "--tenant", "acme", "--inline", str(src)]) == 0
    capsys.readouterr()
    assert main(["index", "search", "--tenant", "acme", "multiply matrix", "-k", "1", "--floor", "0", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"index_version": 1' in out and "multiply_matrix" in out
    assert main(["index", "remove", "--tenant", "acme", "--inline", str(src / "notes.md")]) == 0
    capsys.readouterr()
    assert main(["index", "stats", "--tenant", "acme", "--json"]) == 0
    import json
    stats = json.loads(capsys.readouterr().out)
    assert stats["current_version"] == 2 and stats["documents"] == 1 and stats["chunks"] == 3
    assert [a["status"] for a in stats["artifacts"]] == ["active", "superseded"] and stats["writer"] is None
    assert main(["index", "rebuild", "--tenant", "acme", "--inline"]) == 0


def test_a_version_switched_without_its_ledger_commit_is_not_built_on(sqlite_ledger, monkeypatch):
    """A worker killed between switching CURRENT and committing: the redelivered job must still record a version."""
    import uuid as _uuid

    from domain import jobs as _jobs
    from domain.ledger.db import session_scope as _scope
    from domain.ledger.models import Artifact as _Artifact
    from domain.retrieval import service as _service
    from tests.conftest import add_tenant as _add

    monkeypatch.setenv("FOUNDRY_EMBEDDING_MODEL", "hashing:32")
    from domain.config import reset_settings as _reset

    _reset()
    _add(sqlite_ledger, "acme")
    body = {"tenant": "acme", "documents": [{"id": "d1", "text": "def f():\n    return 1\n", "language": "python"}]}
    jid = _uuid.uuid4().hex
    real = _service.switch_current

    def switch_then_die(tenant, version):
        real(tenant, version)
        raise KeyboardInterrupt("killed between the switch and the ledger commit")

    monkeypatch.setattr(_service, "switch_current", switch_then_die)
    try:
        _jobs.execute("index", jid, body, "w1:1")
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(_service, "switch_current", real)
    monkeypatch.setenv("FOUNDRY_STALE_AFTER_S", "0")
    _reset()
    out = _jobs.execute("index", jid, body, "w2:2")
    assert out["status"] == "succeeded" and out["result"]["changed"], out
    with _scope() as s:
        arts = list(s.scalars(select(_Artifact).where(_Artifact.kind == "index_snapshot")))
    assert len(arts) == 1 and arts[0].created_by_job_id == jid
