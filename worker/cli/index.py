"""foundry index add|remove|rebuild|search|stats: manage and query a tenant's retrieval index.

add/remove/rebuild enqueue an ``index`` job (``--wait`` to follow it; ``--inline`` runs it in this process,
recorded in the ledger like any job, for the embedded setup without a worker). search and stats read the
tenant's current snapshot directly.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from rich.table import Table

from worker.cli._common import console, dump

TEXT_SUFFIXES = {".py", ".js", ".jsx", ".ts", ".tsx", ".java", ".go", ".c", ".h", ".cc", ".cpp", ".hpp", ".cs", ".rs",
                 ".kt", ".scala", ".swift", ".php", ".rb", ".md", ".rst", ".txt", ".toml", ".yaml", ".yml", ".json",
                 ".sh", ".sql", ".html", ".css"}


def register(sub) -> None:
    p = sub.add_parser("index", help="retrieval index: add/remove/rebuild documents, search, stats")
    isub = p.add_subparsers(dest="index_command", required=True)

    def job_options(q):
        q.add_argument("--tenant", default="default")
        q.add_argument("--wait", action="store_true", help="wait for the job and show its result")
        q.add_argument("--inline", action="store_true", help="run the job in this process (no worker needed)")
        q.add_argument("--timeout", type=float, default=3600, help="with --wait: seconds to wait at most (default 3600)")
        q.add_argument("--json", action="store_true", help="print the job id (with --wait: its final status) as JSON")

    a = isub.add_parser("add", help="add or update documents (files, folders, or a JSON list of documents)")
    a.add_argument("paths", nargs="*", type=Path, help="files or folders; ids are the paths as given")
    a.add_argument("--documents", type=Path, help='a JSON file: [{"id", "text", "source", "language", "path", "metadata"}]')
    a.add_argument("--source", default="code", help="source tag for files (code, doc, ...)")
    a.add_argument("--include-accepted-reviews", action="store_true")
    job_options(a)
    a.set_defaults(func=cmd_add, action="add")

    r = isub.add_parser("remove", help="remove documents by id")
    r.add_argument("document_ids", nargs="+")
    job_options(r)
    r.set_defaults(func=cmd_remove)

    b = isub.add_parser("rebuild", help="rebuild the index: from the given documents, or (none given) from its own chunks")
    b.add_argument("paths", nargs="*", type=Path)
    b.add_argument("--documents", type=Path)
    b.add_argument("--source", default="code")
    b.add_argument("--include-accepted-reviews", action="store_true")
    job_options(b)
    b.set_defaults(func=cmd_add, action="rebuild")

    s = isub.add_parser("search", help="hybrid search over the tenant's current index")
    s.add_argument("query")
    s.add_argument("--tenant", default="default")
    s.add_argument("-k", type=int, default=5, help="results to return (default 5), best first")
    s.add_argument("--floor", type=float, default=None, help="relevance floor (cosine); default FOUNDRY_RETRIEVAL_FLOOR")
    s.add_argument("--method", choices=["hybrid", "dense", "keyword", "rrf"], default="hybrid")
    s.add_argument("--json", action="store_true", help="print the results as one JSON document")
    s.set_defaults(func=cmd_search)

    st = isub.add_parser("stats", help="serving version, counts, versions on disk, writer lease, snapshot artifacts")
    st.add_argument("--tenant", default="default")
    st.add_argument("--json", action="store_true", help="print the stats as one JSON document")
    st.set_defaults(func=cmd_stats)


def read_documents(paths: list[Path], documents: Path | None, source: str) -> list[dict]:
    docs: list[dict] = []
    if documents:
        loaded = json.loads(documents.read_text())
        docs.extend(loaded["documents"] if isinstance(loaded, dict) else loaded)
    for root in paths:
        files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES) if root.is_dir() else [root]
        for f in files:
            try:
                text = f.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                console.print(f"[yellow]skipped[/yellow] {f}: not UTF-8 text")
                continue
            if not text.strip() or "\x00" in text:
                console.print(f"[yellow]skipped[/yellow] {f}: empty or binary")
                continue
            docs.append({"id": str(f), "text": text, "path": str(f), "source": source})
    return docs


def _submit(args, body: dict) -> int:
    from domain.errors import InvalidJob

    body = {"tenant": args.tenant, **body}
    if args.inline:
        from domain.jobs import execute
        from domain.ledger import jobstore
        from domain.kinds import parse_spec

        try:
            spec = parse_spec("index", body)
        except InvalidJob as exc:
            console.print(f"[red]rejected[/red] ({exc.field}): {exc}")
            return 2
        job_id = uuid.uuid4().hex
        payload = spec.model_dump(mode="json")
        jobstore.record_enqueued(job_id, "index", spec.tenant, payload, idempotency_key=None, priority=spec.priority,
                                 queue="inline", max_attempts=1, created_by="cli:inline")
        out = execute("index", job_id, payload, "cli:inline")
        print(dump(out))
        return 0 if out["status"] == "succeeded" else 1
    from worker.cli.jobs import enqueue_and_report

    return enqueue_and_report("index", body, wait_for=args.wait, timeout=args.timeout, as_json=args.json)


def cmd_add(args) -> int:
    docs = read_documents(args.paths, args.documents, args.source)
    return _submit(args, {"action": args.action, "documents": docs, "include_accepted_reviews": args.include_accepted_reviews})


def cmd_remove(args) -> int:
    return _submit(args, {"action": "remove", "document_ids": args.document_ids})


def cmd_search(args) -> int:
    from domain.retrieval.fusion import DEFAULT_FUSION, FusionConfig
    from domain.retrieval.service import retrieve_context

    fusion = {"hybrid": DEFAULT_FUSION, "dense": FusionConfig("dense"), "keyword": FusionConfig("keyword"),
              "rrf": FusionConfig("rrf", 1.0, 1.0, 60.0, DEFAULT_FUSION.depth)}[args.method]
    found = retrieve_context(args.tenant, args.query, k=args.k, floor=args.floor, fusion=fusion)
    if args.json:
        print(dump({"index_version": found.index_version, "chunks": [c.to_json() for c in found.chunks]}))
        return 0
    if found.index_version is None:
        console.print(f"tenant {args.tenant} has no index yet")
        return 0
    t = Table(title=f"{args.tenant} index v{found.index_version}: {len(found.chunks)} chunks")
    for col in ("score", "rank", "id", "path", "symbol", "text"):
        t.add_column(col, overflow="fold")
    for c in found.chunks:
        t.add_row(f"{c.score:.3f}", f"{c.rank_score:.3f}", c.id, c.path or "-", c.symbol or "-", c.text.strip()[:160])
    console.print(t)
    return 0


def cmd_stats(args) -> int:
    from domain.retrieval.service import index_stats

    stats = index_stats(args.tenant)
    if args.json:
        print(dump(stats))
        return 0
    t = Table(show_header=False, title=f"index of {args.tenant}")
    for key in ("current_version", "serving_version", "documents", "chunks", "dense_kind", "tombstones",
                "embedding_model", "versions_on_disk", "writer", "error"):
        if key in stats:
            t.add_row(key, str(stats[key]))
    console.print(t)
    if stats["artifacts"]:
        at = Table(title="snapshot artifacts")
        for col in ("version", "status", "documents", "chunks", "sha256", "job", "created_at"):
            at.add_column(col)
        for a in stats["artifacts"]:
            at.add_row(str(a["version"]), a["status"], str(a["documents"]), str(a["chunks"]), (a["sha256"] or "")[:12],
                       (a["job"] or "")[:12], a["created_at"])
        console.print(at)
    return 0
