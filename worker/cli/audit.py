"""foundry audit jobs|failures|attempts|sql — what ran, what broke, and raw access to the audit views."""

from __future__ import annotations

from rich.table import Table
from sqlalchemy import func, select, text

from domain.ledger.db import session_scope
from domain.ledger.models import HealthEvent, Job
from worker.cli._common import add_json, add_tenant, console, dump, fmt_time, print_json, since

VIEWS = ("v_review_audit", "v_job_failures", "v_costs_daily", "v_adapter_lineage", "v_job_attempts")


def register_audit(sub) -> None:
    p = sub.add_parser("jobs", help="job counts by kind and status")
    p.add_argument("--since", default="24h", help="how far back (enqueued since): 24h (default), 7d, 30m or an ISO time")
    add_tenant(p)
    add_json(p, "the counts")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("failures", help="what broke: failed/dead/rejected jobs and failing health events")
    p.add_argument("--since", default="24h", help="how far back: 24h (default), 12h (last night), 7d or an ISO time")
    add_tenant(p)
    add_json(p, "the jobs and health events")
    p.set_defaults(func=cmd_failures)

    p = sub.add_parser("sql", help=f"rows of an audit view ({', '.join(VIEWS)})")
    p.add_argument("view", choices=VIEWS)
    add_tenant(p)
    p.add_argument("--limit", type=int, default=50, help="rows to show at most (default 50)")
    add_json(p, "the rows")
    p.set_defaults(func=cmd_sql)


def cmd_jobs(args) -> int:
    q = (select(Job.kind, Job.status, func.count(), func.avg(Job.attempts))
         .where(Job.enqueued_at >= since(args.since)).group_by(Job.kind, Job.status).order_by(Job.kind, Job.status))
    if args.tenant:
        q = q.where(Job.tenant_id == args.tenant)
    with session_scope() as s:
        rows = s.execute(q).all()
    if args.json:
        print_json([{"kind": k, "status": st, "jobs": n, "avg_attempts": float(avg or 0)} for k, st, n, avg in rows])
        return 0
    t = Table(title=f"jobs since {args.since}")
    for col in ("kind", "status", "jobs", "avg attempts"):
        t.add_column(col)
    for kind, status, n, avg in rows:
        t.add_row(kind, status, str(n), f"{float(avg or 0):.2f}")
    console.print(t)
    return 0


def failures(since_text: str, tenant: str | None = None) -> dict:
    start = since(since_text)
    with session_scope() as s:
        q = select(Job).where(Job.status.in_(("failed", "dead", "rejected")), Job.enqueued_at >= start)
        if tenant:
            q = q.where(Job.tenant_id == tenant)
        jobs = [{"id": j.id, "kind": j.kind, "tenant": j.tenant_id, "status": j.status, "code": j.error_code,
                 "error": j.error, "attempts": j.attempts, "finished": fmt_time(j.finished_at)}
                for j in s.scalars(q.order_by(Job.finished_at))]
        hq = select(HealthEvent).where(HealthEvent.status != "ok", HealthEvent.at >= start)
        if tenant:
            hq = hq.where(HealthEvent.tenant_id == tenant)
        events = [{"at": fmt_time(e.at), "component": e.component, "event": e.event, "status": e.status,
                   "source": e.source, "message": e.message} for e in s.scalars(hq.order_by(HealthEvent.at))]
    return {"jobs": jobs, "health": events}


def cmd_failures(args) -> int:
    data = failures(args.since, args.tenant)
    if args.json:
        print(dump(data))
        return 0
    t = Table(title=f"jobs that did not succeed since {args.since}")
    for col in ("job", "kind", "tenant", "status", "code", "attempts", "finished", "error"):
        t.add_column(col, overflow="fold")
    for j in data["jobs"]:
        t.add_row(j["id"][:12], j["kind"], j["tenant"], j["status"], j["code"] or "-", str(j["attempts"]),
                  j["finished"], (j["error"] or "")[:100])
    console.print(t)
    h = Table(title="health events not ok")
    for col in ("at", "component", "event", "status", "source", "message"):
        h.add_column(col, overflow="fold")
    for e in data["health"]:
        h.add_row(e["at"], e["component"], e["event"], e["status"], e["source"], (e["message"] or "")[:100])
    console.print(h)
    return 0


def cmd_sql(args) -> int:
    sql = f"SELECT * FROM {args.view}"  # the view name is one of VIEWS (argparse choices)
    params = {}
    if args.tenant:
        sql += " WHERE tenant_id = :tenant"
        params["tenant"] = args.tenant
    sql += " LIMIT :limit"
    params["limit"] = args.limit
    with session_scope() as s:
        result = s.execute(text(sql), params)
        cols = list(result.keys())
        rows = [dict(zip(cols, r)) for r in result]
    if args.json:
        print(dump(rows))
        return 0
    t = Table(title=args.view)
    for c in cols:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*("-" if r[c] is None else str(r[c]) for c in cols))
    console.print(t)
    return 0
