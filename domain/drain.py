"""Draining workers, recorded in the ledger so every host sees it.

An operator drains one worker node (``a@host-a``), every node of a host (``host:host-a``) or all of them
(``all``); a drained worker fails its health check, stops consuming its queues and finishes what it
runs (worker/signals.py). Drains used to be files under the host's own ``FOUNDRY_DATA_DIR/drain/``, which a
worker on another host never saw; a file there is still honoured, as a host-local override.

A drain is a row of the ledger's ``leases`` table named ``drain:<target>`` (holder: who drained it; expiry:
when it ends by itself, or never), so no schema change was needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, select

from domain.ledger.db import session_scope
from domain.ledger.models import Lease, utcnow

PREFIX = "drain:"
FOREVER = datetime(9999, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class Drain:
    target: str
    by: str
    until: datetime | None


def targets_for(node: str) -> list[str]:
    """What drains a node: its own name, its host (the part after '@'), or everything."""
    host = node.split("@", 1)[1] if "@" in node else node
    return [node, f"host:{host}", "all"]


def drain(target: str, by: str, *, for_s: float | None = None, url: str | None = None) -> Drain:
    if not target or len(target) > 90:
        raise ValueError("target: a worker node name, 'host:<hostname>' or 'all' (at most 90 characters)")
    until = utcnow() + timedelta(seconds=for_s) if for_s else FOREVER
    with session_scope(url) as s:
        row = s.get(Lease, PREFIX + target)
        if row is None:
            s.add(Lease(name=PREFIX + target, holder=by[:200], expires_at=until, acquired_at=utcnow()))
        else:
            row.holder, row.expires_at, row.acquired_at = by[:200], until, utcnow()
    return Drain(target, by, None if until == FOREVER else until)


def undrain(target: str, url: str | None = None) -> bool:
    with session_scope(url) as s:
        return bool(s.execute(delete(Lease).where(Lease.name == PREFIX + target)).rowcount)


def active(url: str | None = None) -> list[Drain]:
    with session_scope(url) as s:
        rows = s.scalars(select(Lease).where(Lease.name.startswith(PREFIX), Lease.expires_at > utcnow())
                         .order_by(Lease.name)).all()
        return [_drain(r) for r in rows]


def drained(node: str, url: str | None = None) -> Drain | None:
    """The drain that applies to this node now, if any."""
    names = [PREFIX + t for t in targets_for(node)]
    with session_scope(url) as s:
        row = s.scalars(select(Lease).where(Lease.name.in_(names), Lease.expires_at > utcnow())
                        .order_by(Lease.name)).first()
        return _drain(row) if row is not None else None


def _drain(row: Lease) -> Drain:
    until = row.expires_at if row.expires_at.tzinfo else row.expires_at.replace(tzinfo=timezone.utc)
    return Drain(row.name[len(PREFIX):], row.holder, None if until >= FOREVER - timedelta(days=1) else until)
