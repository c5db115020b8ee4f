"""foundry artifacts list|show, foundry serve set|show: the models jobs produced and which one a tenant serves."""

from __future__ import annotations

import getpass
import json

from rich.table import Table
from sqlalchemy import desc, select

from domain import health
from domain.ledger.db import session_scope
from domain.ledger.models import Artifact, Tenant
from worker.cli._common import UsageError, add_json, add_tenant, console, dump, fmt_time, print_json

SERVABLE_KINDS = ("quantized_model", "distilled_model")  # = domain.artifacts.SERVABLE_KINDS (no torch import here)


def register(sub) -> None:
    p = sub.add_parser("artifacts", help="models, adapters and snapshots that jobs produced")
    asub = p.add_subparsers(dest="artifacts_command", required=True)
    ls = asub.add_parser("list", help="list artifacts, newest first")
    ls.add_argument("--kind", help="quantized_model, distilled_model, adapter, index_snapshot, ...")
    add_tenant(ls)
    ls.add_argument("--limit", type=int, default=30, help="most recent artifacts to show (default 30), newest first")
    add_json(ls, "the artifacts")
    ls.set_defaults(func=cmd_list)
    show = asub.add_parser("show", help="one artifact with its lineage and report")
    show.add_argument("artifact_id")
    add_json(show, "the artifact (the output is JSON either way)")
    show.set_defaults(func=cmd_show)

    push = asub.add_parser("push", help="put this host's adapters and index snapshots into FOUNDRY_ARTIFACT_URL "
                                        "(after moving to a new store; the ledger's paths are its keys)")
    push.add_argument("--dry-run", action="store_true")
    push.set_defaults(func=cmd_push)

    p = sub.add_parser("serve", help="choose the model a tenant's reviews are served with")
    ssub = p.add_subparsers(dest="serve_command", required=True)
    st = ssub.add_parser("set", help="serve --tenant T with a quantized/distilled ARTIFACT_ID, or --base for the base model")
    add_tenant(st, required=True)
    st.add_argument("artifact_id", nargs="?")
    st.add_argument("--base", action="store_true", help="serve the base model again")
    st.set_defaults(func=cmd_serve_set)
    sh = ssub.add_parser("show", help="what each tenant (or one) is served with")
    add_tenant(sh)
    add_json(sh, "each tenant's serving choice")
    sh.set_defaults(func=cmd_serve_show)


def headline(a: Artifact) -> str:
    """The one figure that says what an artifact is worth."""
    r = a.report or {}
    if a.kind == "quantized_model" and "perplexity_after" in r:
        return f"{r['method']}: {r['compression_ratio']:.2f}x smaller, ppl {r['perplexity_before']:.2f}→{r['perplexity_after']:.2f}"
    if a.kind == "distilled_model" and "perplexity_student" in r:
        return (f"{r['parameter_compression_ratio']:.2f}x fewer params, ppl {r['perplexity_teacher']:.2f}→"
                f"{r['perplexity_student']:.2f}, {r['speedup']:.2f}x tokens/s")
    return ""


def cmd_list(args) -> int:
    q = select(Artifact).order_by(desc(Artifact.created_at)).limit(args.limit)
    if args.kind:
        q = q.where(Artifact.kind == args.kind)
    if args.tenant:
        q = q.where(Artifact.tenant_id == args.tenant)
    with session_scope() as s:
        rows = list(s.scalars(q))
    if args.json:
        console.print_json(json.dumps([_as_dict(a) for a in rows], default=str))
        return 0
    t = Table(title="artifacts")
    for col in ("id", "kind", "tenant", "name", "v", "status", "MB", "summary", "created"):
        t.add_column(col)
    for a in rows:
        t.add_row(a.id, a.kind, a.tenant_id or "-", a.name or "-", str(a.version or "-"), a.status,
                  f"{(a.size_bytes or 0) / 1e6:.1f}", headline(a), fmt_time(a.created_at))
    console.print(t)
    return 0


def _as_dict(a: Artifact) -> dict:
    return {c: getattr(a, c) for c in ("id", "kind", "tenant_id", "name", "version", "path", "sha256", "size_bytes",
                                       "status", "lineage", "report", "created_by_job_id", "created_at")}


def cmd_show(args) -> int:
    with session_scope() as s:
        a = s.get(Artifact, args.artifact_id)
    if a is None:
        raise LookupError(f"no artifact {args.artifact_id!r} (see `foundry artifacts list`)")
    console.print(dump(_as_dict(a)), markup=False, highlight=False)
    return 0


def set_serving(tenant: str, artifact_id: str | None, by: str = "cli") -> str | None:
    """Point a tenant at a servable artifact (None = the base model). Returns the previous choice."""
    with session_scope() as s:
        t = s.get(Tenant, tenant, with_for_update=True)
        if t is None:
            raise LookupError(f"no tenant {tenant!r} (create it with `foundry tenants add {tenant}`)")
        if artifact_id is not None:
            a = s.get(Artifact, artifact_id)
            if a is None:
                raise LookupError(f"no artifact {artifact_id!r} (see `foundry artifacts list`)")
            if a.kind not in SERVABLE_KINDS:
                raise ValueError(f"artifact {artifact_id} is a {a.kind}; a tenant can be served a {' or '.join(SERVABLE_KINDS)}")
            if a.status not in ("ready", "active"):
                raise ValueError(f"artifact {artifact_id} is {a.status}, not ready")
            if a.tenant_id not in (None, tenant):
                raise ValueError(f"artifact {artifact_id} belongs to tenant {a.tenant_id!r}, not {tenant!r}")
        previous, t.serving_artifact_id = t.serving_artifact_id, artifact_id
    health.record("model", "serving_changed", "ok", f"tenant {tenant} now served with {artifact_id or 'the base model'}",
                  source=by, detail={"from": previous, "to": artifact_id}, tenant_id=tenant)
    return previous


def cmd_serve_set(args) -> int:
    if bool(args.artifact_id) == bool(args.base):
        raise UsageError("give either an ARTIFACT_ID or --base")
    previous = set_serving(args.tenant, None if args.base else args.artifact_id, by=f"cli:{getpass.getuser()}")
    console.print(f"tenant {args.tenant}: {previous or 'base model'} → {args.artifact_id or 'base model'}")
    return 0


def cmd_serve_show(args) -> int:
    with session_scope() as s:
        q = select(Tenant).order_by(Tenant.id)
        if args.tenant:
            q = q.where(Tenant.id == args.tenant)
        rows = [(t.id, t.serving_artifact_id, s.get(Artifact, t.serving_artifact_id) if t.serving_artifact_id else None)
                for t in s.scalars(q)]
    if args.json:
        print_json([{"tenant": tenant, "artifact_id": aid, "kind": a.kind if a else None, "name": a.name if a else None,
                     "summary": headline(a) if a else None} for tenant, aid, a in rows])
        return 0
    t = Table(title="serving")
    for col in ("tenant", "artifact", "kind", "name", "summary"):
        t.add_column(col)
    for tenant, aid, a in rows:
        t.add_row(tenant, aid or "base model", a.kind if a else "-", (a.name or "-") if a else "-", headline(a) if a else "")
    console.print(t)
    return 0


def cmd_push(args) -> int:
    from dataclasses import asdict

    from domain.store_backfill import push_existing

    print(dump({**asdict(push_existing(dry_run=args.dry_run)), "dry_run": args.dry_run}))
    return 0
