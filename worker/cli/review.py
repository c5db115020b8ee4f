"""foundry review FILE, foundry feedback REVIEW_ID, foundry budget set|show, foundry audit costs|review."""

from __future__ import annotations

import sys
from decimal import Decimal
from pathlib import Path

from rich.table import Table
from sqlalchemy import select, text

from domain.ledger.db import session_scope
from domain.ledger.models import AdapterLineage, AdapterVersion, Review
from worker.cli._common import add_json, add_tenant, console, dump, fmt_time, since


def register(sub) -> None:
    p = sub.add_parser("review", help="review a file or diff: enqueue a review job, wait, print the review")
    p.add_argument("file", help="the code or diff to review ('-' reads standard input)")
    p.add_argument("--tenant", default="default")
    p.add_argument("--adapter", help="an alias or adapter version id (default: the tenant's champion)")
    p.add_argument("--language")
    p.add_argument("--diff", action="store_true", help="the file is a unified diff")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest review to generate, in tokens (default 256)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the review (default 600)")
    add_json(p, "the job's final status and result")
    p.set_defaults(func=cmd_review)

    p = sub.add_parser("feedback", help="accept or reject a review (the retraining data set)")
    p.add_argument("review_id")
    verdict = p.add_mutually_exclusive_group(required=True)
    verdict.add_argument("--accept", dest="verdict", action="store_const", const="accept")
    verdict.add_argument("--reject", dest="verdict", action="store_const", const="reject")
    p.add_argument("--correction", help="a file holding the corrected review ('-' reads standard input)")
    p.add_argument("--tenant", help="only accept a review of this tenant")
    p.add_argument("--finding", type=int, metavar="N", help="judge the review's N-th finding (1-based), not the whole review")
    p.set_defaults(func=cmd_feedback)

    p = sub.add_parser("budget", help="per-tenant daily/monthly budgets in tokens and money")
    bsub = p.add_subparsers(dest="budget_command", required=True)
    s = bsub.add_parser("set", help="set limits ('none' clears one); unnamed limits are kept")
    add_tenant(s, required=True)
    for flag, unit in (("--daily-tokens", "tokens per UTC day"), ("--monthly-tokens", "tokens per UTC month"),
                       ("--daily-cost", "money per UTC day, in the FOUNDRY_PRICES currency"),
                       ("--monthly-cost", "money per UTC month, in the FOUNDRY_PRICES currency")):
        s.add_argument(flag, metavar="N|none", help=unit)
    add_json(s, "the budget after the change")
    s.set_defaults(func=cmd_budget_set)
    s = bsub.add_parser("show", help="limits and spend of the current UTC day and month")
    add_tenant(s, required=True)
    add_json(s, "the budget")
    s.set_defaults(func=cmd_budget_show)


def register_audit(sub) -> None:
    p = sub.add_parser("costs", help="tokens, seconds and money by tenant, day or adapter")
    p.add_argument("--by", choices=["tenant", "day", "adapter", "model", "kind"], default="tenant")
    add_tenant(p)
    p.add_argument("--since", help="how far back: 7d, 24h, 30m or an ISO date (default: all time)")
    add_json(p, "the rows")
    p.set_defaults(func=cmd_audit_costs)

    p = sub.add_parser("review", help="one review: which adapter wrote it, its cost, the adapter's lineage, feedback")
    p.add_argument("review_id")
    p.add_argument("--tenant", help="only show a review of this tenant")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_audit_review)


def _read(path: str) -> str:
    data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text (binary content cannot be reviewed): {exc}") from None


def cmd_review(args) -> int:
    from worker.client import enqueue_review, wait

    fields = {"is_diff": args.diff, "max_new_tokens": args.max_new_tokens}
    if args.file != "-":
        fields["path"] = args.file
    for name in ("adapter", "language"):
        if getattr(args, name):
            fields[name] = getattr(args, name)
    job_id = enqueue_review(_read(args.file), tenant=args.tenant, **fields)
    if args.no_wait:
        print(job_id)
        return 0
    status = wait(job_id, timeout=args.timeout)
    if args.json:
        print(dump(status))
        return 0 if status["status"] == "succeeded" else 1
    if status["status"] != "succeeded":
        console.print(f"[red]job {job_id} {status['status']}[/red]: {status['error']}")
        return 1
    r = status["result"]
    console.print(f"[bold]review {r['review_id']}[/bold] (job {job_id}, {r.get('adapter') or 'base model'}, "
                  f"{r['prompt_tokens']}+{r['completion_tokens']} tokens{', prompt truncated' if r['prompt_truncated'] else ''})")
    console.print(f"[bold]Summary:[/bold] {r['summary'] or '-'}")
    for n, f in enumerate(r["findings"], start=1):
        where = f"line {f['line']}" + (f"-{f['end_line']}" if f.get("end_line") else "") if f["line"] else "general"
        origin = f" {f.get('category')} ({f.get('source')} {f.get('rule_id') or ''})".rstrip() if f.get("source") else ""
        console.print(f"  {n}. [{f['severity'] or '?'}] {where}:{origin} {f['message']}", markup=False)
        if f.get("fix"):
            console.print(f"     verified fix:\n{f['fix']}", markup=False)
    console.print(f"accept or reject it: foundry feedback {r['review_id']} [--finding N] --accept | --reject [--correction FILE]")
    return 0


def cmd_feedback(args) -> int:
    from worker.client import feedback

    correction = _read(args.correction) if args.correction else None
    if args.finding is not None:
        return _finding_feedback(args, correction)
    fid = feedback(args.review_id, args.verdict, correction, tenant=args.tenant)
    console.print(f"feedback {fid}: {args.verdict} on review {args.review_id}")
    return 0


def _finding_feedback(args, correction: str | None) -> int:
    from domain.feedback import record_finding_feedback
    from domain.logs import actor

    out = record_finding_feedback(args.review_id, args.finding, args.verdict, correction, tenant=args.tenant,
                                  created_by=actor("cli"))
    console.print(f"feedback {out['id']}: {args.verdict} on finding {args.finding} ({out['rule_id']}) of review {args.review_id}")
    if out["suppressed"]:
        console.print(f"rule {out['rule_id']} is now suppressed for this tenant (foundry suppressions clear to undo)")
    return 0


def _limit(value: str | None, as_int: bool):
    if value is None:
        return ...
    if value.strip().lower() in ("none", "unlimited", ""):
        return None
    return int(value) if as_int else Decimal(value)


def cmd_budget_set(args) -> int:
    from domain.budgets import set_budget

    changes = {name: _limit(getattr(args, name), "tokens" in name)
               for name in ("daily_tokens", "monthly_tokens", "daily_cost", "monthly_cost")}
    status = set_budget(args.tenant, **{k: v for k, v in changes.items() if v is not ...})
    if args.json:
        print(dump(status))
        return 0
    _print_budget(status)
    return 0


def cmd_budget_show(args) -> int:
    from domain.budgets import budget_status

    status = budget_status(args.tenant)
    if args.json:
        print(dump(status))
    else:
        _print_budget(status)
    return 0


def _print_budget(st: dict) -> None:
    t = Table(title=f"budget of {st['tenant']} (UTC day from {fmt_time(st['day_start'])})")
    for col in ("period", "token limit", "tokens used", "cost limit", "cost used"):
        t.add_column(col)
    show = lambda v: "unlimited" if v is None else str(v)  # noqa: E731
    t.add_row("today", show(st["daily_token_budget"]), str(st["tokens_today"]), show(st["daily_cost_budget"]),
              str(st["cost_today"]))
    t.add_row("this month", show(st["monthly_token_budget"]), str(st["tokens_this_month"]),
              show(st["monthly_cost_budget"]), str(st["cost_this_month"]))
    console.print(t)


def cmd_audit_costs(args) -> int:
    from domain.costs import REPORT_GROUPS, cost_report

    rows = cost_report(args.by, tenant=args.tenant, since=since(args.since))
    if args.json:
        print(dump(rows))
        return 0
    keys = list(REPORT_GROUPS[args.by])
    t = Table(title=f"costs by {args.by}" + (f" since {args.since}" if args.since else ""))
    for col in (*keys, "jobs", "prompt tokens", "completion tokens", "wall s", "gpu s", "cost"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(*(str(r[k]) if r[k] is not None else "-" for k in keys), str(r["jobs"]), str(r["prompt_tokens"]),
                  str(r["completion_tokens"]), f"{float(r['wall_seconds'] or 0):.2f}",
                  f"{float(r['gpu_seconds'] or 0):.2f}", f"{r['cost']} {r['currency'] or ''}")
    console.print(t)
    return 0


LINEAGE_DEPTH = 50

# The adapter, its parent, its parent's parent... in one statement (PostgreSQL and SQLite).
_CHAIN = text("""WITH RECURSIVE chain(id, depth) AS (
        SELECT CAST(:vid AS VARCHAR(32)), 0
        UNION ALL
        SELECT av.parent_id, c.depth + 1 FROM chain c JOIN adapter_versions av ON av.id = c.id
        WHERE av.parent_id IS NOT NULL AND c.depth < :limit - 1)
    SELECT av.* FROM chain c JOIN adapter_versions av ON av.id = c.id ORDER BY c.depth""")


def _lineage(s, version_id: str | None) -> list[dict]:
    """The adapter version and its ancestors (at most LINEAGE_DEPTH), with their merge parents: two
    statements whatever the depth (docs/ledger.md, bench/audit_queries.py)."""
    if not version_id:
        return []
    versions: dict[str, AdapterVersion] = {}
    for v in s.scalars(select(AdapterVersion).from_statement(_CHAIN), {"vid": version_id, "limit": LINEAGE_DEPTH}):
        if v.id in versions:  # a cycle: stop at the first repeat
            break
        versions[v.id] = v
    ids = list(versions)
    merged: dict[str, list] = {}
    for m in s.scalars(select(AdapterLineage).where(AdapterLineage.child_id.in_(ids))):
        merged.setdefault(m.child_id, []).append({"parent_id": m.parent_id, "relation": m.relation, "weight": m.weight})
    out = []
    for vid, v in versions.items():
        out.append({"id": v.id, "name": v.name, "version": v.version, "status": v.status,
                    "parent_id": v.parent_id, "base_model_id": v.base_model_id, "dataset_hash": v.dataset_hash,
                    "dataset_size": v.dataset_size, "trained_by_job": v.created_by_job_id,
                    "artifact_sha256": v.artifact_sha256, "created_at": v.created_at,
                    "merged_from": merged.get(vid, [])})
    return out


def review_audit(review_id: str, tenant: str | None = None) -> dict:
    """Everything the ledger knows about one review. Raises LookupError if absent (or another tenant's)."""
    from domain.feedback import feedback_for_review

    with session_scope() as s:
        review = s.get(Review, review_id)
        if review is None or (tenant is not None and review.tenant_id != tenant):
            raise LookupError(f"review {review_id!r} not found" + (f" for tenant {tenant!r}" if tenant else ""))
        res = s.execute(text("SELECT * FROM v_review_audit WHERE review_id = :id"), {"id": review_id})
        audit = dict(zip(res.keys(), res.one()))
        lineage = _lineage(s, review.adapter_version_id)
        body = {"summary": review.summary, "findings": review.findings, "path": review.path,
                "language": review.language, "truncation": review.truncation, "context_chunks": review.context_chunks}
    return {"audit": audit, "review": body, "adapter_lineage": lineage,
            "feedback": feedback_for_review(review_id)}


def cmd_audit_review(args) -> int:
    data = review_audit(args.review_id, args.tenant)
    if args.json:
        print(dump(data))
        return 0
    a = data["audit"]
    t = Table(title=f"review {args.review_id}", show_header=False)
    t.add_column("field")
    t.add_column("value", overflow="fold")
    adapter = f"{a['adapter_name']} v{a['adapter_version']} ({a['adapter_version_id']})" if a["adapter_version_id"] else "base model"
    rows = [("tenant", a["tenant_id"]), ("job", f"{a['job_id']} (attempts {a['attempts']}, worker {a['worker']})"),
            ("written at", str(a["created_at"])), ("model", a["model_id"]),
            ("serving artifact", a["serving_artifact_id"] or "-"), ("adapter", adapter),
            ("adapter sha256", a["adapter_sha256"] or "-"), ("adapter trained by job", a["adapter_trained_by_job"] or "-"),
            ("tokens", f"{a['prompt_tokens']} prompt + {a['completion_tokens']} completion"),
            ("seconds", f"wall {float(a['wall_seconds'] or 0):.3f}, gpu {float(a['gpu_seconds'] or 0):.3f}"),
            ("cost", f"{a['cost']} {a['currency'] or ''}"), ("prompt truncated", str(bool(a["prompt_truncated"]))),
            ("index version", str(a["index_version"]) if a["index_version"] is not None else "-"),
            ("context chunks", ", ".join(str(c.get("id")) for c in data["review"]["context_chunks"]) or "-"),
            ("summary", data["review"]["summary"] or "-"), ("findings", str(len(data["review"]["findings"])))]
    for k, v in rows:
        t.add_row(k, str(v))
    console.print(t)
    if data["adapter_lineage"]:
        lt = Table(title="adapter lineage (newest first)")
        for col in ("version", "id", "status", "parent", "dataset", "trained by job", "merged from"):
            lt.add_column(col, overflow="fold")
        for v in data["adapter_lineage"]:
            lt.add_row(f"{v['name']} v{v['version']}", v["id"], v["status"], v["parent_id"] or "-",
                       f"{v['dataset_hash'] or '-'} ({v['dataset_size'] or 0})", v["trained_by_job"] or "-",
                       ", ".join(m["parent_id"] for m in v["merged_from"]) or "-")
        console.print(lt)
    for f in data["feedback"]:
        console.print(f"feedback {f['id']}: {f['verdict']} by {f['created_by'] or '?'} at {fmt_time(f['created_at'])}"
                      + (" (with correction)" if f["correction"] else ""))
    return 0
