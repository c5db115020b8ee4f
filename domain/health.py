"""Health events and checks: broker and database reachability, worker start/stop, recorded in the ledger."""

from __future__ import annotations

import logging
import socket
import time

from sqlalchemy import text

from domain.ledger.db import get_engine, session_scope
from domain.ledger.models import HealthEvent

log = logging.getLogger(__name__)


def record(component: str, event: str, status: str, message: str | None = None, *, source: str | None = None,
           detail: dict | None = None, tenant_id: str | None = None, job_id: str | None = None,
           url: str | None = None) -> bool:
    """Write one health event; never raises (a health event about a dead database cannot be written)."""
    try:
        with session_scope(url) as s:
            s.add(HealthEvent(component=component, event=event, status=status, message=message,
                              source=source or socket.gethostname(), detail=detail or {}, tenant_id=tenant_id,
                              job_id=job_id))
        return True
    except Exception as exc:  # noqa: BLE001 - health reporting must not take the caller down
        log.warning("could not record health event %s/%s: %s", component, event, exc)
        return False


def check_database(url: str | None = None) -> tuple[bool, str, float]:
    t0 = time.perf_counter()
    try:
        with get_engine(url).connect() as conn:
            conn.execute(text("SELECT 1"))
        return True, "reachable", time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001
        return False, f"unreachable: {type(exc).__name__}: {exc}".splitlines()[0][:500], time.perf_counter() - t0


def check_broker(broker_url: str, transport_options: dict | None = None, timeout: float = 3.0) -> tuple[bool, str, float]:
    """Open a connection to the broker with kombu (no Celery import)."""
    from kombu import Connection

    t0 = time.perf_counter()
    try:
        with Connection(broker_url, transport_options=transport_options or {}, connect_timeout=timeout) as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
        return True, "reachable", time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001
        return False, f"unreachable: {type(exc).__name__}: {exc}".splitlines()[0][:500], time.perf_counter() - t0


def check_and_record(broker_url: str, transport_options: dict | None, source: str, url: str | None = None) -> dict:
    """Check broker and database; record one event each (the database event only if it is reachable)."""
    db_ok, db_msg, db_s = check_database(url)
    br_ok, br_msg, br_s = check_broker(broker_url, transport_options)
    if db_ok:
        record("database", "check", "ok", db_msg, source=source, detail={"seconds": round(db_s, 4)}, url=url)
        record("broker", "check", "ok" if br_ok else "fail", br_msg, source=source,
               detail={"seconds": round(br_s, 4)}, url=url)
    return {"database": {"ok": db_ok, "message": db_msg}, "broker": {"ok": br_ok, "message": br_msg}}
