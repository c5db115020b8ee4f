"""Engines and sessions for the ledger, created lazily per process (safe under forking workers)."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Iterator

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

_lock = threading.Lock()
_engines: dict[tuple[int, str], tuple[Engine, sessionmaker]] = {}


def _sqlite_pragmas(dbapi_conn, _record):
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def get_engine(url: str | None = None) -> Engine:
    return _get(url)[0]


def _get(url: str | None) -> tuple[Engine, sessionmaker]:
    if url is None:
        from domain.config import get_settings

        url = get_settings().ledger_url
    key = (os.getpid(), url)
    with _lock:
        hit = _engines.get(key)
        if hit:
            return hit
        if url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10, pool_recycle=1800)
        made = (engine, sessionmaker(engine, expire_on_commit=False))
        _engines[key] = made
        return made


@contextmanager
def session_scope(url: str | None = None, durable: bool = True) -> Iterator[Session]:
    """A transaction: commits on success, rolls back on error.

    ``durable=False`` lets PostgreSQL acknowledge the commit before its WAL reaches disk
    (``synchronous_commit = off``): a database crash may lose the last fraction of a second of such
    commits, never corrupt anything. Use it only for writes whose loss the job protocol tolerates
    (the producer's ``queued`` row, which the worker re-creates; a claim, which only counts an attempt).
    """
    factory = _get(url)[1]
    with factory() as session:
        try:
            if not durable and session.bind.dialect.name == "postgresql":
                session.execute(text("SET LOCAL synchronous_commit = off"))
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


_fast: dict[tuple[int, str, bool], Engine] = {}


def autocommit_engine(url: str | None = None, durable: bool = True) -> Engine | None:
    """PostgreSQL only: an autocommit engine for one-statement transactions (one round trip each).
    ``durable=False`` sets ``synchronous_commit=off`` on its connections (see session_scope)."""
    if url is None:
        from domain.config import get_settings

        url = get_settings().ledger_url
    if not url.startswith("postgresql"):
        return None
    key = (os.getpid(), url, durable)
    with _lock:
        eng = _fast.get(key)
        if eng is None:
            args = {} if durable else {"options": "-c synchronous_commit=off"}
            # no pre-ping (a round trip per checkout): callers retry once on a dropped connection instead
            eng = create_engine(url, isolation_level="AUTOCOMMIT", pool_size=5, max_overflow=10,
                                pool_recycle=1800, connect_args=args)
            _fast[key] = eng
        return eng


def dispose_all() -> None:
    """Drop this process's connections (call after fork, and in tests between databases)."""
    with _lock:
        for (pid, _), (engine, _) in list(_engines.items()):
            if pid == os.getpid():
                engine.dispose()
        for (pid, _, _), engine in list(_fast.items()):
            if pid == os.getpid():
                engine.dispose()
        _engines.clear()
        _fast.clear()


def create_all(url: str | None = None) -> None:
    """Bring the schema to the newest migration (``alembic upgrade head``) programmatically."""
    from domain.ledger.migrate import upgrade

    upgrade(url)
