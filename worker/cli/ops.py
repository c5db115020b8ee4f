"""foundry dlq list|retry|drop, foundry ledger check, foundry metrics serve, foundry canary."""

from __future__ import annotations

import json
import socket
import sys

from rich.table import Table

from domain.logs import actor
from worker.cli._common import add_json, console, dump, err_console, fmt_time


def register(sub) -> None:
    dlq = sub.add_parser("dlq", help="dead-lettered jobs: list, retry (as a new job) or drop (acknowledge)")
    dsub = dlq.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)
    p = dsub.add_parser("list", help="dead jobs not yet retried or dropped")
    p.add_argument("--tenant")
    p.add_argument("--all", action="store_true", help="include jobs already retried or dropped")
    p.add_argument("--limit", type=int, default=100, help="dead jobs to show at most (default 100)")
    add_json(p, "the dead jobs")
    p.set_defaults(func=cmd_dlq_list)
    p = dsub.add_parser("retry", help="enqueue a new job with a dead job's body (linked by parent_job_id)")
    p.add_argument("job_ids", nargs="+")
    p.add_argument("--tenant", help="refuse jobs of other tenants")
    p.set_defaults(func=cmd_dlq_retry)
    p = dsub.add_parser("drop", help="acknowledge dead jobs: kept in the ledger, no longer listed")
    p.add_argument("job_ids", nargs="+")
    p.add_argument("--tenant", help="refuse jobs of other tenants")
    p.add_argument("--reason")
    p.set_defaults(func=cmd_dlq_drop)

    ledger = sub.add_parser("ledger", help="ledger maintenance")
    lsub = ledger.add_subparsers(dest="ledger_command", metavar="ACTION", required=True)
    p = lsub.add_parser("check", help="check the ledger's invariants; exit 1 on any inconsistency")
    p.add_argument("--tenant")
    p.add_argument("--no-files", action="store_true", help="skip hashing artifact files")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ledger_check)
    p = _sweep_parser(lsub, "prune-checkpoints", cmd_prune_checkpoints, "say what would be removed",
                      "remove checkpoint files of succeeded jobs, and of failed/dead jobs past "
                      "FOUNDRY_CHECKPOINT_RETENTION_DAYS (ledger rows stay, marked pruned)")
    p.add_argument("--retention-days", type=float, help="override FOUNDRY_CHECKPOINT_RETENTION_DAYS")
    p = _sweep_parser(lsub, "resend-stranded", cmd_resend_stranded, "list them, send nothing",
                      "send again queued jobs whose Redis message was lost in a worker crash "
                      "and hand back running jobs of vanished workers (beat does this every FOUNDRY_STRANDED_SWEEP_S)")
    p.add_argument("--older-than", type=float, help="seconds a job must be quiet (default FOUNDRY_STRANDED_AFTER_S)")

    metrics = sub.add_parser("metrics", help="Prometheus metrics")
    msub = metrics.add_subparsers(dest="metrics_command", metavar="ACTION", required=True)
    p = msub.add_parser("serve", help="serve /metrics behind basic auth (FOUNDRY_METRICS_USER/FOUNDRY_METRICS_PASSWORD)")
    p.add_argument("--port", type=int, default=9808, help="TCP port to listen on (default 9808; 0 = any free port)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0, all interfaces)")
    p.add_argument("--no-auth-i-know", action="store_true", help="serve without authentication (loopback/dev only)")
    p.set_defaults(func=cmd_metrics_serve)

    p = sub.add_parser("canary", help="short greedy generation with the base model + a tenant's champion (or --adapter)")
    p.add_argument("--tenant", default="default")
    p.add_argument("--adapter", help="alias or version id (default: the champion)")
    p.add_argument("--base-model", help="default: the deployment's base model")
    p.add_argument("--device", default="cpu", help="torch device to run on (default cpu)")
    add_json(p, "the canary's result")
    p.set_defaults(func=cmd_canary)


def _sweep_parser(lsub, name: str, func, dry_run_help: str, help: str):
    """A ledger maintenance sweep: ``--dry-run`` and ``--json`` like every other one."""
    p = lsub.add_parser(name, help=help)
    p.add_argument("--dry-run", action="store_true", help=dry_run_help)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=func)
    return p


def cmd_prune_checkpoints(args) -> int:
    from domain import checkpoints

    report = checkpoints.prune_finished(retention_days=args.retention_days, dry_run=args.dry_run).as_dict()
    if args.json:
        print(dump({**report, "dry_run": args.dry_run}))
    else:
        verb = "would remove" if args.dry_run else "removed"
        console.print(f"{verb} {report['checkpoints']} checkpoints of {report['jobs']} jobs "
                      f"({report['bytes_freed'] / 1e6:.1f} MB)")
    return 0


def cmd_resend_stranded(args) -> int:
    from domain.config import get_settings
    from worker import maintenance

    older = get_settings().stranded_after_s if args.older_than is None else args.older_than
    report = maintenance.resend_stranded(older_than_s=older, dry_run=args.dry_run, source=actor("cli"))
    report["handed_back"] = maintenance.hand_back_lost_running(dry_run=args.dry_run, source=actor("cli"))["handed_back"]
    if args.json:
        print(dump(report))
    elif not report["supported"]:
        err_console.print("the broker is not Redis: nothing to check (the filesystem broker has no such gap)")
    else:
        verb = "would send again" if args.dry_run else "sent again"
        console.print(f"{verb} {len(report['resent'])} stranded job(s)" + (": " + ", ".join(report["resent"][:20])
                                                                             if report["resent"] else ""))
        verb = "would hand back" if args.dry_run else "handed back"
        console.print(f"{verb} {len(report['handed_back'])} running job(s) of vanished workers"
                      + (": " + ", ".join(report["handed_back"][:20]) if report["handed_back"] else ""))
    return 0


def cmd_dlq_list(args) -> int:
    from domain import dlq

    rows = dlq.list_dead(args.tenant, include_handled=args.all, limit=args.limit)
    if args.json:
        print(dump([r.__dict__ for r in rows]))
        return 0
    t = Table(title=f"dead-letter list ({len(rows)})")
    for col in ("job", "kind", "tenant", "attempts", "finished", "error", "handled"):
        t.add_column(col, overflow="fold")
    for r in rows:
        handled = f"{r.handled['action']} {r.handled.get('retry_job_id') or ''}" if r.handled else ""
        t.add_row(r.id, r.kind, r.tenant, str(r.attempts), fmt_time(r.finished_at), (r.error or "")[:120], handled)
    console.print(t)
    return 0


def cmd_dlq_retry(args) -> int:
    from domain import dlq
    from worker.client import enqueue

    failed = 0
    for jid in args.job_ids:
        try:
            new = dlq.retry(jid, enqueue, by=actor("cli"), tenant=args.tenant)
            console.print(f"{jid} → retried as [bold]{new}[/bold]")
        except (LookupError, ValueError, RuntimeError) as exc:
            err_console.print(f"[red]{jid}:[/red] {exc}")
            failed += 1
    return 1 if failed else 0


def cmd_dlq_drop(args) -> int:
    from domain import dlq

    failed = 0
    for jid in args.job_ids:
        try:
            dlq.drop(jid, by=actor("cli"), reason=args.reason, tenant=args.tenant)
            console.print(f"{jid} dropped")
        except (LookupError, ValueError) as exc:
            err_console.print(f"[red]{jid}:[/red] {exc}")
            failed += 1
    return 1 if failed else 0


def cmd_ledger_check(args) -> int:
    from domain import consistency

    report = consistency.check(tenant=args.tenant, check_files=not args.no_files)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        t = Table(title=f"ledger check: {'consistent' if report.ok else 'INCONSISTENT'} "
                        f"({report.counts.get('jobs', 0)} jobs, {report.counts.get('attempts', 0)} attempts)")
        for col in ("severity", "check", "message", "ids"):
            t.add_column(col, overflow="fold")
        for i in report.issues:
            style = "red" if i.severity == "error" else "yellow"
            t.add_row(f"[{style}]{i.severity}[/]", i.check, i.message, ", ".join(i.ids[:5]))
        console.print(t)
    return 0 if report.ok else 1


def cmd_metrics_serve(args) -> int:
    from domain.config import get_settings
    from domain.metrics import LedgerMetrics, serve
    from domain.kinds import QUEUES
    from domain.secrets import secret
    from worker.celery_app import broker_settings

    user, password = secret("FOUNDRY_METRICS_USER"), secret("FOUNDRY_METRICS_PASSWORD")  # or their *_FILE
    if not args.no_auth_i_know and not (user and password):
        err_console.print("[red]error:[/red] set FOUNDRY_METRICS_USER and FOUNDRY_METRICS_PASSWORD (basic auth), "
                          "or pass --no-auth-i-know to serve without authentication")
        return 2
    if args.no_auth_i_know:
        user = password = None
    broker, options, _ = broker_settings(get_settings())
    metrics = LedgerMetrics()
    server = serve(args.port, metrics.registry, lambda: metrics.refresh(broker, options, QUEUES),
                   user=user, password=password, host=args.host)
    err_console.print(f"serving Foundry metrics on http://{args.host}:{server.server_address[1]}/metrics"
                      + ("" if user else " WITHOUT authentication"))
    sys.stderr.flush()
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def cmd_canary(args) -> int:
    from domain.canary import canary_for_tenant

    result = canary_for_tenant(args.tenant, args.adapter, base_model=args.base_model, device=args.device,
                               source=f"cli@{socket.gethostname()}")
    if args.json:
        print(dump(result.to_dict()))
    else:
        colour = "green" if result.ok else "red"
        console.print(f"[{colour}]canary {'ok' if result.ok else 'FAILED'}[/] model={result.model} "
                      f"adapter={result.adapter_version_id or '-'} tokens={result.new_tokens} "
                      f"finite={result.finite} {result.seconds:.2f}s")
        if result.error:
            console.print(f"error: {result.error}")
        if result.action == "rolled_back":
            console.print(f"[yellow]circuit breaker rolled the champion of {args.tenant} back[/]")
    return 0 if result.ok else 1
