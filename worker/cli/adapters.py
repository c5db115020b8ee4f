"""foundry adapters list|show|history|promote|rollback|merge|diff, foundry schedule set|list|remove|tick."""

from __future__ import annotations

import json

from rich.table import Table
from sqlalchemy import desc, select

from domain.ledger.db import session_scope
from domain.logs import actor
from domain.ledger.models import AdapterLineage, AdapterVersion
from worker.cli._common import UsageError, add_json, add_tenant, console, dump, fmt_time, print_json


def register(sub) -> None:
    _register_adapters(sub)
    _register_schedule(sub)


def _register_adapters(sub) -> None:
    p = sub.add_parser("adapters", help="adapter versions and aliases: list, show, promote, rollback, merge, diff")
    a = p.add_subparsers(dest="adapters_command", required=True)
    ls = a.add_parser("list", help="a tenant's adapter versions, newest first, with their aliases")
    add_tenant(ls, required=True)
    ls.add_argument("--name", help="only this adapter name")
    add_json(ls, "the versions")
    ls.set_defaults(func=cmd_list)
    sh = a.add_parser("show", help="one version (alias or id): ledger fields, metrics, lineage")
    add_tenant(sh, required=True)
    sh.add_argument("ref", nargs="?", help="alias or version id (default: champion)")
    add_json(sh, "the version (the output is JSON either way)")
    sh.set_defaults(func=cmd_show)
    hi = a.add_parser("history", help="alias moves: who, when, why")
    add_tenant(hi, required=True)
    hi.add_argument("--alias", help="only moves of this alias (default: all aliases)")
    hi.add_argument("--limit", type=int, default=30, help="most recent moves to show (default 30), newest first")
    add_json(hi, "the moves")
    hi.set_defaults(func=cmd_history)
    pr = a.add_parser("promote", help="point an alias (default champion) at a version")
    add_tenant(pr, required=True)
    pr.add_argument("ref", help="alias or version id")
    pr.add_argument("--alias", default="champion")
    pr.add_argument("--reason", default="manual promotion")
    pr.set_defaults(func=cmd_promote)
    rb = a.add_parser("rollback", help="move the champion (or --alias) back to its previous version")
    add_tenant(rb, required=True)
    rb.add_argument("--alias", default="champion")
    rb.add_argument("--reason", default="manual rollback")
    rb.set_defaults(func=cmd_rollback)
    mg = a.add_parser("merge", help="combine versions with add_weighted_adapter into a new version")
    add_tenant(mg, required=True)
    mg.add_argument("refs", nargs="+", help="two or more aliases or version ids")
    mg.add_argument("--weights", help="comma-separated relative weights, one per version (default: equal)")
    mg.add_argument("--name", help="adapter name of the new version (default: the first one's)")
    mg.add_argument("--combination", default="cat", choices=["cat", "linear", "svd"],
                    help="cat = exact weighted sum of the updates (default); linear needs equal ranks")
    mg.add_argument("--alias", help="also point this alias at the new version (e.g. candidate)")
    mg.set_defaults(func=cmd_merge)
    df = a.add_parser("diff", help="compare two versions: ledger fields and weight updates per module")
    add_tenant(df, required=True)
    df.add_argument("a", help="alias or version id (the 'from' side)")
    df.add_argument("b", help="alias or version id (the 'to' side)")
    add_json(df, "the comparison")
    df.set_defaults(func=cmd_diff)


def _register_schedule(sub) -> None:
    p = sub.add_parser("schedule", help="retraining schedules (evaluated by the beat every minute)")
    s = p.add_subparsers(dest="schedule_command", required=True)
    st = s.add_parser("set", help="create or change a tenant's retraining schedule")
    add_tenant(st, required=True)
    st.add_argument("--cron", required=True,
                    help="@hourly, @daily, @weekly, @monthly, @yearly or 5 fields 'minute hour day-of-month month "
                         "day-of-week' (names MON-FRI/JAN-DEC, L, steps */n, 5#2); UTC unless prefixed "
                         "'CRON_TZ=Europe/Berlin '")
    st.add_argument("--min-feedback", type=int, default=10,
                    help="new feedback items (since the newest adapter version) needed to retrain (default 10)")
    st.add_argument("--adapter-name", default="reviewer")
    st.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="retrain spec override, JSON value (e.g. max_steps=100, qlora=true)")
    st.add_argument("--disable", action="store_true", help="keep the schedule but stop evaluating it")
    add_json(st, "the schedule with its next three fire times")
    st.set_defaults(func=cmd_schedule_set)
    sl = s.add_parser("list", help="schedules with their last and next run")
    add_tenant(sl)
    add_json(sl, "the schedules")
    sl.set_defaults(func=cmd_schedule_list)
    sr = s.add_parser("remove", help="delete a schedule")
    add_tenant(sr, required=True)
    sr.add_argument("--adapter-name", default="reviewer")
    sr.set_defaults(func=cmd_schedule_remove)
    tk = s.add_parser("tick", help="evaluate the schedules once now (what the beat does every minute)")
    add_json(tk, "what each due schedule did")
    tk.set_defaults(func=cmd_schedule_tick)


# ---- adapters -----------------------------------------------------------------------------------------

def cmd_list(args) -> int:
    from domain.adapter_lookup import aliases_of
    from domain.adapters.store import version_summary

    with session_scope() as s:
        q = select(AdapterVersion).where(AdapterVersion.tenant_id == args.tenant)
        if args.name:
            q = q.where(AdapterVersion.name == args.name)
        rows = list(s.scalars(q.order_by(desc(AdapterVersion.created_at), desc(AdapterVersion.version))))
        aliases = aliases_of(s, args.tenant)
    by_version: dict[str, list[str]] = {}
    for alias, vid in aliases.items():
        by_version.setdefault(vid, []).append(alias)
    if args.json:
        console.print_json(dump([{**version_summary(v), "aliases": sorted(by_version.get(v.id, []))} for v in rows]))
        return 0
    t = Table(title=f"adapters of {args.tenant}")
    for col in ("id", "name", "ver", "status", "aliases", "parent", "data", "eval loss", "created", "job"):
        t.add_column(col)
    for v in rows:
        ev = (v.metrics or {}).get("eval") or {}
        t.add_row(v.id, v.name, str(v.version), v.status, ",".join(sorted(by_version.get(v.id, []))),
                  (v.parent_id or "-")[:8], str(v.dataset_size or "-"),
                  f"{ev['loss']:.4f}" if isinstance(ev.get("loss"), (int, float)) else "-",
                  fmt_time(v.created_at), (v.created_by_job_id or "-")[:8])
    console.print(t)
    if not rows:
        console.print("no adapter versions yet: the base model is served")  # (an empty list with --json)
    return 0


def cmd_show(args) -> int:
    from domain.adapter_lookup import aliases_of, resolve_adapter
    from domain.adapters.store import version_summary

    with session_scope() as s:
        v = resolve_adapter(s, args.tenant, args.ref)
        if v is None:
            raise LookupError(f"tenant {args.tenant} has no champion: the base model is served")
        lineage = [{"parent_id": r.parent_id, "relation": r.relation, "weight": r.weight}
                   for r in s.scalars(select(AdapterLineage).where(AdapterLineage.child_id == v.id))]
        aliases = sorted(a for a, vid in aliases_of(s, args.tenant).items() if vid == v.id)
        out = {**version_summary(v), "aliases": aliases, "lineage": lineage}
    console.print_json(dump(out))
    return 0


def cmd_history(args) -> int:
    from domain.adapters.store import alias_history

    with session_scope() as s:
        rows = alias_history(s, args.tenant, args.alias, args.limit)
    if args.json:
        print_json([{"moved_at": h.moved_at, "alias": h.alias, "from_version_id": h.from_version_id,
                     "to_version_id": h.to_version_id, "moved_by": h.moved_by, "reason": h.reason} for h in rows])
        return 0
    t = Table(title=f"alias history of {args.tenant}")
    for col in ("when", "alias", "from", "to", "by", "reason"):
        t.add_column(col)
    for h in rows:
        t.add_row(fmt_time(h.moved_at), h.alias, h.from_version_id or "(base)", h.to_version_id or "(base)",
                  h.moved_by, h.reason or "")
    console.print(t)
    return 0


def cmd_promote(args) -> int:
    from domain.adapter_lookup import resolve_adapter
    from domain.adapters.store import move_alias

    with session_scope() as s:
        v = resolve_adapter(s, args.tenant, args.ref)
        entry = move_alias(s, args.tenant, args.alias, v.id, actor("cli"), args.reason)
        console.print(f"{args.alias} of {args.tenant}: {entry.from_version_id or '(base)'} → {v.id} ({v.name} v{v.version})")
    return 0


def cmd_rollback(args) -> int:
    from domain import health
    from domain.adapters.store import rollback

    with session_scope() as s:
        entry = rollback(s, args.tenant, actor("cli"), args.reason, alias=args.alias)
        frm, to = entry.from_version_id, entry.to_version_id
    health.record("adapter", "rollback", "ok", f"{args.alias} rolled back {frm} → {to or '(base)'}: {args.reason}",
                  source="cli", tenant_id=args.tenant, detail={"from": frm, "to": to, "alias": args.alias})
    console.print(f"{args.alias} of {args.tenant}: {frm} → {to or '(base model)'}")
    return 0


def cmd_merge(args) -> int:
    from domain.adapters.merge import merge_versions

    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    with session_scope() as s:
        v = merge_versions(s, args.tenant, args.refs, weights, name=args.name, combination=args.combination,
                           moved_by=actor("cli"), alias=args.alias)
        console.print(f"merged into {v.id} ({v.name} v{v.version}) at {v.artifact_path}")
    return 0


def cmd_diff(args) -> int:
    from domain.adapters.merge import diff_versions

    with session_scope() as s:
        d = diff_versions(s, args.tenant, args.a, args.b)
    if args.json:
        console.print_json(dump(d))
        return 0
    console.print(f"a = {d['a']['name']} v{d['a']['version']} ({d['a']['id']}), "
                  f"b = {d['b']['name']} v{d['b']['version']} ({d['b']['id']})")
    for k, v in {**d["fields"], **d["hyperparams"]}.items():
        console.print(f"  {k}: {v['a']!r} → {v['b']!r}")
    t = Table(title="weight updates per module")
    for col in ("module", "|Δa|", "|Δb|", "cosine", "relative change"):
        t.add_column(col)
    for key, m in d["modules"].items():
        if "cosine" in m:
            t.add_row(key, f"{m['norm_a']:.4f}", f"{m['norm_b']:.4f}", f"{m['cosine']:.3f}", f"{m['relative_change']:.3f}")
        else:
            t.add_row(key, "", "", "", str(m.get("only_in")))
    console.print(t)
    mc = d["mean_cosine"]
    console.print(f"mean cosine similarity: {mc:.3f}" if mc is not None else "no common modules")
    return 0


# ---- schedules ----------------------------------------------------------------------------------------

def _params(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--param {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def cmd_schedule_set(args) -> int:
    from domain.adapters.schedule import set_schedule

    row = set_schedule(args.tenant, args.cron, min_new_feedback=args.min_feedback, adapter_name=args.adapter_name,
                       params=_params(args.param), enabled=not args.disable)
    if args.json:
        print_json(row)
        return 0
    console.print(f"schedule {row['id']} for {row['tenant']}/{row['adapter_name']}: {row['cron']}, "
                  f"at least {row['min_new_feedback']} new feedback" + ("" if row["enabled"] else " (disabled)"))
    if row["next_runs"]:
        console.print("next fire times (UTC): " + ", ".join(fmt_time(t) for t in row["next_runs"]))
    return 0


def cmd_schedule_list(args) -> int:
    from domain.adapters.schedule import list_schedules

    rows = list_schedules(args.tenant)
    if args.json:
        print_json(rows)
        return 0
    t = Table(title="retraining schedules (times UTC)")
    for col in ("id", "tenant", "adapter", "cron", "min feedback", "enabled", "last run", "last job", "next run", "params"):
        t.add_column(col)
    for r in rows:
        t.add_row(str(r["id"]), r["tenant"], r["adapter_name"], r["cron"], str(r["min_new_feedback"]),
                  "yes" if r["enabled"] else "no", fmt_time(r["last_run_at"]), (r["last_job_id"] or "-")[:12],
                  fmt_time(r["next_run_at"]), json.dumps(r["params"]) if r["params"] else "")
    console.print(t)
    return 0


def cmd_schedule_remove(args) -> int:
    from domain.adapters.schedule import remove_schedule

    if not remove_schedule(args.tenant, args.adapter_name):
        raise LookupError(f"no schedule for {args.tenant}/{args.adapter_name}")
    console.print(f"schedule for {args.tenant}/{args.adapter_name} removed")
    return 0


def cmd_schedule_tick(args) -> int:
    from domain.adapters.schedule import tick
    from domain.ledger.models import utcnow
    from worker.client import enqueue

    report: list = []
    jobs = tick(utcnow(), lambda kind, body, parent=None: enqueue(kind, body, parent_job_id=parent, created_by="cli"),
                holder=actor("cli"), report=report)
    if args.json:
        print_json({"enqueued": jobs, "report": report})
        return 0
    for r in report:
        console.print(f"{r['tenant']}/{r['adapter_name']} fire {r['fire']}: {r['action']}"
                      f"{' ' + r['job_id'] if r.get('job_id') else ''}{' (' + r['why'] + ')' if r.get('why') else ''}")
    console.print(f"{len(jobs)} retrain job(s) enqueued")
    return 0
