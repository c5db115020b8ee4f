"""foundry suppressions list|clear: the rules a tenant kept rejecting, left out of its reviews until cleared."""

from __future__ import annotations

from rich.table import Table

from worker.cli._common import console, dump, fmt_time


def register(sub) -> None:
    p = sub.add_parser("suppressions", help="rules suppressed for a tenant after repeated rejected findings")
    ssub = p.add_subparsers(dest="suppressions_command", required=True)
    ls = ssub.add_parser("list", help="suppressed rules (and cleared ones) with their rejection counts")
    ls.add_argument("--tenant")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)
    cl = ssub.add_parser("clear", help="lift a tenant's suppressions (all, or one --rule)")
    cl.add_argument("--tenant", required=True)
    cl.add_argument("--rule", help="the rule id (e.g. B105, or model:sql_injection)")
    cl.set_defaults(func=cmd_clear)


def cmd_list(args) -> int:
    from domain.feedback import list_suppressions, suppress_after

    rows = list_suppressions(args.tenant)
    if args.json:
        print(dump(rows))
        return 0
    t = Table(title=f"rule suppressions (after {suppress_after()} net rejections)")
    for col in ("tenant", "rule", "rejections", "active", "since", "cleared"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["tenant"], r["rule_id"], str(r["rejections"]), "yes" if r["active"] else "no",
                  fmt_time(r["created_at"]), fmt_time(r["cleared_at"]) if r["cleared_at"] else "-")
    console.print(t)
    return 0


def cmd_clear(args) -> int:
    from domain.feedback import clear_suppressions

    n = clear_suppressions(args.tenant, args.rule)
    console.print(f"cleared {n} suppression(s) for tenant {args.tenant}" + (f" (rule {args.rule})" if args.rule else ""))
    return 0
