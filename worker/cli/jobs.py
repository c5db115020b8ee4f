"""foundry jobs / job ID / enqueue KIND / schema KIND."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import desc, select

from domain.kinds import KINDS
from domain.ledger.db import session_scope
from domain.ledger.models import FINAL_STATUSES, JOB_STATUSES, Job, JobAttempt
from worker.cli._common import CliError, UsageError, add_json, add_tenant, console, dump, fmt_time, print_json, since

STATUS_STYLE = {"succeeded": "green", "failed": "red", "dead": "red", "rejected": "yellow", "running": "cyan", "queued": "white"}


def register(sub) -> None:
    p = sub.add_parser("jobs", help="list jobs from the ledger")
    p.add_argument("--status", choices=list(JOB_STATUSES))
    p.add_argument("--kind", help="only this kind (review, retrain, quantize, distill, index, noop)")
    add_tenant(p)
    p.add_argument("--since", help="enqueued within: 24h, 7d, 30m or since an ISO timestamp")
    p.add_argument("--limit", type=int, default=30, help="most recent jobs to show (default 30), newest first")
    add_json(p, "the jobs")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("job", help="show one job (status, progress, attempts, error); --watch for a live view")
    p.add_argument("job_id", help="a job id, or a unique prefix of one")
    p.add_argument("--watch", action="store_true", help="live progress bar until the job finishes")
    add_json(p, "the job and its attempts")
    p.set_defaults(func=cmd_job)

    p = sub.add_parser("enqueue", help=f"enqueue a job ({', '.join(KINDS)})")
    p.add_argument("kind", choices=list(KINDS))
    p.add_argument("--file", type=Path, help="review: the code/diff file; index: a JSON file of documents")
    p.add_argument("--body", help="the job body as a JSON object (merged with the other options; see `foundry schema KIND`)")
    p.add_argument("--body-file", type=Path, help="read the job body (a JSON object) from this file ('-': standard input)")
    add_tenant(p, default="default")
    p.add_argument("--priority", type=int, choices=range(10), metavar="0-9",
                   help="0 = lowest, 9 = highest (runs first on Redis); default 5")
    p.add_argument("--idempotency-key", help="same key + tenant + kind = the same job (a repeat returns the first)")
    p.add_argument("--adapter", help="review: alias or adapter version id")
    p.add_argument("--wait", action="store_true", help="wait for the job to finish and show its final status")
    p.add_argument("--timeout", type=float, default=600, help="with --wait: seconds to wait at most (default 600)")
    add_json(p, "the job id (with --wait: the final status, including job_id)")
    p.set_defaults(func=cmd_enqueue)

    p = sub.add_parser("schema", help="print the JSON Schema of a job kind's message body")
    p.add_argument("kind", choices=list(KINDS))
    p.add_argument("--json", action="store_true", help="(the schema is JSON either way)")
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
    if args.body and args.body_file:
        raise UsageError("give the body with --body or --body-file, not both")
    raw = args.body
    if args.body_file:
        raw = sys.stdin.read() if str(args.body_file) == "-" else args.body_file.read_text()
    try:
        body = json.loads(raw) if raw else {}
    except ValueError as exc:
        raise UsageError(f"--body: not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise UsageError("--body: expected a JSON object")
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
    return enqueue_and_report(args.kind, build_body(args), wait_for=args.wait, timeout=args.timeout,
                              as_json=args.json)


def enqueue_and_report(kind: str, body: dict, *, wait_for: bool, timeout: float, as_json: bool = False) -> int:
    """Enqueue from the CLI. Prints the job id, or with --wait the final status (one JSON document with
    --json: ``{"job_id": ..., "status": ...}``). Exit 0 when queued / succeeded, 1 when the job did not
    succeed or the wait timed out, 2 when the body is invalid (recorded ``rejected``)."""
    from domain.errors import InvalidJob
    from worker.client import EnqueueError, enqueue, wait

    try:
        job_id = enqueue(kind, body, created_by="cli")
    except InvalidJob as exc:
        raise UsageError(f"job rejected ({exc.field}): {exc}") from None
    except EnqueueError as exc:
        raise CliError(str(exc)) from None
    if not wait_for:
        print_json({"job_id": job_id}) if as_json else console.print(job_id)
        return 0
    try:
        status = wait(job_id, timeout=timeout)
    except TimeoutError as exc:
        raise CliError(f"{exc} (it keeps running; see `foundry job {job_id}`)") from None
    if as_json:
        print_json({"job_id": job_id, **status})
    else:
        console.print(f"job {job_id}: {status['status']}" + (f" ({status['error']})" if status["error"] else ""))
        if status["result"] is not None:
            console.print(dump(status["result"]), markup=False, highlight=False)
    return 0 if status["status"] == "succeeded" else 1


def cmd_schema(args) -> int:
    from domain.kinds import json_schema

    json.dump(json_schema(args.kind), sys.stdout, indent=2)
    print()
    return 0
