"""foundry tenants add|list, foundry db upgrade|check."""

from __future__ import annotations

import argparse

from rich.table import Table
from sqlalchemy import select

from domain.ledger.db import session_scope
from domain.ledger.models import Tenant
from worker.cli._common import UsageError, add_json, console, print_json


def register(sub) -> None:
    p = sub.add_parser("tenants", help="manage tenants")
    tsub = p.add_subparsers(dest="tenants_command", required=True)
    a = tsub.add_parser("add", help="create a tenant (idempotent): foundry tenants add --tenant ID")
    a.add_argument("--tenant", dest="tenant_option", help="the new tenant's id (lowercase letters, digits, _ . -)")
    a.add_argument("tenant", nargs="?", help=argparse.SUPPRESS)  # `foundry tenants add ID` still works
    a.add_argument("--display-name")
    a.set_defaults(func=cmd_add)
    ls = tsub.add_parser("list", help="list tenants")
    add_json(ls, "the tenants")
    ls.set_defaults(func=cmd_list)

    p = sub.add_parser("db", help="ledger schema: upgrade to the newest migration, or check models vs migrations")
    p.add_argument("action", choices=["upgrade", "check"])
    p.set_defaults(func=cmd_db)


def add_tenant(tenant: str, display_name: str | None = None) -> bool:
    from domain.specs import JobSpec

    JobSpec(tenant=tenant)  # same id rules as job messages
    with session_scope() as s:
        if s.get(Tenant, tenant) is not None:
            return False
        s.add(Tenant(id=tenant, display_name=display_name or tenant))
        return True


def cmd_add(args) -> int:
    tenant = args.tenant_option or args.tenant
    if not tenant or (args.tenant_option and args.tenant and args.tenant != args.tenant_option):
        raise UsageError("give the new tenant as --tenant ID")
    created = add_tenant(tenant, args.display_name)
    console.print(f"tenant {tenant} {'created' if created else 'already exists'}")
    return 0


def cmd_list(args) -> int:
    with session_scope() as s:
        rows = list(s.scalars(select(Tenant).order_by(Tenant.id)))
    if args.json:
        print_json([{"id": r.id, "display_name": r.display_name, "daily_token_budget": r.daily_token_budget,
                     "monthly_token_budget": r.monthly_token_budget, "daily_cost_budget": r.daily_cost_budget,
                     "monthly_cost_budget": r.monthly_cost_budget, "serving_artifact_id": r.serving_artifact_id}
                    for r in rows])
        return 0
    t = Table(title="tenants")
    for col in ("id", "display name", "daily tokens", "monthly tokens", "daily cost", "monthly cost", "serving artifact"):
        t.add_column(col)
    for r in rows:
        t.add_row(r.id, r.display_name or "", *(str(v) if v is not None else "-" for v in (
            r.daily_token_budget, r.monthly_token_budget, r.daily_cost_budget, r.monthly_cost_budget, r.serving_artifact_id)))
    console.print(t)
    return 0


def cmd_db(args) -> int:
    from domain.ledger.migrate import check, upgrade

    if args.action == "upgrade":
        upgrade()
        console.print("ledger at head")
    else:
        check()
        console.print("models and migrations agree")
    return 0
