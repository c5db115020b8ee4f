"""foundry jobs / job ID / enqueue KIND / schema KIND."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import desc, select

from domain.ledger.db import session_scope
from domain.ledger.models import FINAL_STATUSES, Job, JobAttempt
from worker.cli._common import console, dump, fmt_time, since

STATUS_STYLE = {"succeeded": "green", "failed": "red", "dead": "red", "rejected": "yellow", "running": "cyan", "queued": "white"}


def register(sub) -> None:
    p = sub.add_parser("jobs", help="list jobs from the ledger")
    p.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "rejected", "dead"])
    p.add_argument("--kind")
    p.add_argument("--tenant")
    p.add_argument("--since", help="e.g. 24h, 7d, or an ISO timestamp")
    p.add_argument("--limit", type=int, default=30)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("job", help="show one job (status, progress, attempts, error); --watch for a live view")
    p.add_argument("job_id")
    p.add_argument("--watch", action="store_true", help="live progress bar until the job finishes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_job)

    p = sub.add_parser("enqueue", help="enqueue a job (review, retrain, quantize, distill, index, noop)")
    p.add_argument("kind", choices=["review", "retrain", "quantize", "distill", "index", "noop"])
    p.add_argument("--file", type=Path, help="review: the code/diff file; index: a JSON file of documents")
    p.add_argument("--json", dest="body", help="the job body as JSON (merged with the other options)")
    p.add_argument("--tenant", default=None)
    p.add_argument("--priority", type=int)
    p.add_argument("--idempotency-key")
    p.add_argument("--adapter", help="review: alias or adapter version id")
    p.add_argument("--wait", action="store_true", help="wait and show the result")
    p.add_argument("--timeout", type=float, default=600)
    p.set_defaults(func=cmd_enqueue)

    p = sub.add_parser("schema", help="print the JSON Schema of a job kind's message body")
    p.add_argument("kind", choices=["review", "retrain", "quantize", "distill", "index", "noop"])
    p.set_defaults(func=cmd_schema)


def cmd_jobs(args) -> int:
    q = select(Job).order_by(desc(Job.enqueued_at)).limit(args.limit)
    if args.status:
        q = q.where(Job.status == args.status)
    if args.kind:
        q = q.where(Job.kind == args.kind)
    if args.tenant:
        q = q.where(Job.tenant_id == args.tenant)
    if args.since:
        q = q.where(Job.enqueued_at >= since(args.since))
    with session_scope() as s:
        rows = list(s.scalars(q))
    if args.json:
        print(dump([_job_dict(j) for j in rows]))
        return 0
    t = Table(title=f"jobs ({len(rows)})")
    for col in ("id", "kind", "tenant", "status", "attempts", "progress", "enqueued", "worker", "error"):
        t.add_column(col, overflow="fold")
    for j in rows:
        t.add_row(j.id[:12], j.kind, j.tenant_id, f"[{STATUS_STYLE.get(j.status, 'white')}]{j.status}[/]",
                  f"{j.attempts}/{j.max_attempts}", f"{j.progress:.0%}", fmt_time(j.enqueued_at), j.worker or "-",
                  (j.error or "")[:80])
    console.print(t)
    return 0


def _job_dict(j: Job) -> dict:
    return {c.name: getattr(j, c.name) for c in Job.__table__.columns}


def _find(s, job_id: str) -> Job:
    job = s.get(Job, job_id)
    if job is None:
        matches = list(s.scalars(select(Job).where(Job.id.like(f"{job_id}%")).limit(2)))
        if len(matches) == 1:
            return matches[0]
        raise LookupError(f"no job {job_id!r}" if not matches else f"job id prefix {job_id!r} is ambiguous")
    return job


def cmd_job(args) -> int:
    if args.watch:
        return _watch(args.job_id)
    with session_scope() as s:
        job = _find(s, args.job_id)
        attempts = list(s.scalars(select(JobAttempt).where(JobAttempt.job_id == job.id).order_by(JobAttempt.attempt)))
        data = _job_dict(job)
        tries = [{"attempt": a.attempt, "worker": a.worker, "started": fmt_time(a.started_at),
                  "finished": fmt_time(a.finished_at), "outcome": a.outcome or "lost?", "error": a.error} for a in attempts]
    if args.json:
        print(dump({**data, "attempt_log": tries}))
        return 0
    t = Table(show_header=False, title=f"job {data['id']}")
    for key in ("kind", "tenant_id", "status", "attempts", "max_attempts", "priority", "queue", "worker", "created_by",
                "enqueued_at", "started_at", "finished_at", "progress", "error_code", "error"):
        val = data[key]
        if key == "status":
            val = f"[{STATUS_STYLE.get(val, 'white')}]{val}[/]"
        t.add_row(key, fmt_time(val) if key.endswith("_at") else str(val if val is not None else "-"))
    if data["progress_info"]:
        t.add_row("progress_info", dump(data["progress_info"]))
    if data["result"] is not None:
        t.add_row("result", dump(data["result"])[:3000])
    console.print(t)
    if tries:
        at = Table(title="attempts")
        for col in ("attempt", "worker", "started", "finished", "outcome", "error"):
            at.add_column(col, overflow="fold")
        for a in tries:
            at.add_row(str(a["attempt"]), a["worker"] or "-", a["started"], a["finished"], a["outcome"], (a["error"] or "")[:120])
        console.print(at)
    return 0


def _watch(job_id: str, poll: float = 0.5) -> int:
    with session_scope() as s:
        job_id = _find(s, job_id).id
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console) as bar:
        task = bar.add_task(job_id[:12], total=1.0, info="")
        while True:
            with session_scope() as s:
                job = s.get(Job, job_id)
            info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in (job.progress_info or {}).items() if not isinstance(v, (dict, list)))
            bar.update(task, completed=job.progress, description=f"{job.kind} {job_id[:12]} {job.status}", info=info[:80])
            if job.status in FINAL_STATUSES:
                break
            time.sleep(poll)
    console.print(f"{job.status}" + (f": {job.error}" if job.error else ""))
    return 0 if job.status == "succeeded" else 1


def build_body(args) -> dict:
    body: dict = json.loads(args.body) if args.body else {}
    if args.file:
        text = args.file.read_bytes()
        if args.kind == "review":
            try:
                body["code"] = text.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{args.file}: binary content cannot be reviewed (not UTF-8 text)") from None
            body.setdefault("path", str(args.file))
        elif args.kind == "index":
            docs = json.loads(text)
            body["documents"] = docs["documents"] if isinstance(docs, dict) else docs
        else:
            body.update(json.loads(text))
    for opt, key in (("tenant", "tenant"), ("priority", "priority"), ("idempotency_key", "idempotency_key"),
                     ("adapter", "adapter")):
        if getattr(args, opt, None) is not None:
            body[key] = getattr(args, opt)
    return body


def cmd_enqueue(args) -> int:
    return enqueue_and_report(args.kind, build_body(args), wait_for=args.wait, timeout=args.timeout)


def enqueue_and_report(kind: str, body: dict, *, wait_for: bool, timeout: float) -> int:
    """Enqueue from the CLI: print the job id (and the final status with --wait); 2 if the job is rejected."""
    from domain.errors import InvalidJob
    from worker.client import enqueue, wait

    try:
        job_id = enqueue(kind, body, created_by="cli")
    except InvalidJob as exc:
        console.print(f"[red]rejected[/red] ({exc.field}): {exc}")
        return 2
    console.print(job_id)
    if wait_for:
        status = wait(job_id, timeout=timeout)
        print(dump(status))
        return 0 if status["status"] == "succeeded" else 1
    return 0


def cmd_schema(args) -> int:
    from domain.kinds import json_schema

    json.dump(json_schema(args.kind), sys.stdout, indent=2)
    print()
    return 0
