"""Engines and sessions for the ledger, created lazily per process (safe under forking workers)."""

from __future__ import annotations

import functools
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Iterator

from sqlalchemy import DateTime, Numeric, bindparam, create_engine, event, text
from sqlalchemy import exc as sa_exc
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


_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%%")


@functools.lru_cache(maxsize=256)
def _compile(sql: str) -> tuple[bytes, tuple[str, ...]]:
    """``%(name)s`` placeholders to PostgreSQL's ``$n`` (a name used twice is one parameter)."""
    names: list[str] = []

    def number(m: re.Match) -> str:
        if m.group(0) == "%%":
            return "%"
        if m.group(1) not in names:
            names.append(m.group(1))
        return f"${names.index(m.group(1)) + 1}"

    return _PLACEHOLDER.sub(number, sql).encode(), tuple(names)


class _Conn:
    """A psycopg connection with the hot path's own prepared statements and value adapter."""

    __slots__ = ("conn", "tx", "prepared", "encoding")

    def __init__(self, conn):
        from psycopg.adapt import Transformer

        self.conn = conn
        self.tx = Transformer(conn)
        self.prepared: dict[tuple, bytes] = {}  # (sql, parameter types) -> statement name
        self.encoding = conn.info.encoding

    @property
    def closed(self) -> bool:
        return self.conn.closed

    def close(self) -> None:
        self.conn.close()

    def _result(self):
        from psycopg import errors, generators, pq

        res = self.conn.wait(generators.execute(self.conn.pgconn))[-1]
        if res.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
            raise errors.error_from_result(res, encoding=self.encoding)
        return res

    def one(self, sql: str, params: dict) -> tuple | None:
        from psycopg import pq
        from psycopg.adapt import PyFormat

        text, names = _compile(sql)
        tx = self.tx
        values = tx.dump_sequence([params[n] for n in names], [PyFormat.AUTO] * len(names))
        key = (sql, tx.types)
        name = self.prepared.get(key)
        pgconn = self.conn.pgconn
        if name is None:
            name = f"foundry_{len(self.prepared)}".encode()
            pgconn.send_prepare(name, text, param_types=tx.types)
            self._result()
            self.prepared[key] = name
        pgconn.send_query_prepared(name, values, param_formats=tx.formats)
        res = self._result()
        if res.status != pq.ExecStatus.TUPLES_OK or not res.ntuples:
            return None
        tx.set_pgresult(res)
        return tx.load_row(0, tuple)


class FastLedger:
    """PostgreSQL only: one-statement autocommit transactions (one round trip each) over plain psycopg
    connections with server-side prepared statements, for the job hot path (enqueue, claim, finish).

    Statements run through libpq's prepared-statement calls with psycopg's own value adapters and wait loop
    (interruptible, like ``Connection.execute``), without psycopg's cursor layer: about 25 µs of client CPU
    per statement against 65-90 µs through ``Connection.execute(prepare=True)`` and 0.44 ms through a
    SQLAlchemy connection (measured here; docs/benchmarks.md). ``durable=False`` sets
    ``synchronous_commit=off`` (see session_scope).

    Errors come out as SQLAlchemy's ``OperationalError`` / ``IntegrityError`` (wrapping psycopg's), so
    callers handle one family. A failed connection is closed with every idle one (after a database
    restart they are all dead), like SQLAlchemy's pool invalidation; the caller's retry gets fresh ones.
    """

    IDLE_MAX = 5

    def __init__(self, url: str, durable: bool):
        from sqlalchemy.engine import make_url

        self.conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        # Generic plans: every hot-path statement finds its rows by primary or unique key, so its plan does not
        # depend on the parameters, and planning the CTEs anew on each execution (PostgreSQL's custom plans)
        # costs server CPU for nothing (finish 0.32 -> 0.24 ms, claim 0.25 -> 0.21 ms per statement here).
        self.options = "-c plan_cache_mode=force_generic_plan" + ("" if durable else " -c synchronous_commit=off")
        self._idle: list[_Conn] = []
        self._lock = threading.Lock()

    def _connect(self) -> _Conn:
        import psycopg

        return _Conn(psycopg.connect(self.conninfo, autocommit=True, connect_timeout=10, options=self.options))

    def one(self, sql: str, params: dict) -> tuple | None:
        """Run one statement (``%(name)s`` placeholders) in its own transaction; its first row, if any."""
        import psycopg

        with self._lock:
            conn = self._idle.pop() if self._idle else None
        try:
            if conn is None or conn.closed:
                conn = self._connect()
            row = conn.one(sql, params)
        except psycopg.IntegrityError as exc:
            self._release(conn)
            raise sa_exc.IntegrityError(sql, params, exc) from exc
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self._discard(conn)
            raise sa_exc.OperationalError(sql, params, exc) from exc
        except BaseException:
            self._discard(conn)
            raise
        self._release(conn)
        return row

    def _release(self, conn: _Conn) -> None:
        with self._lock:
            if not conn.closed and len(self._idle) < self.IDLE_MAX:
                self._idle.append(conn)
                return
        conn.close()

    def _discard(self, conn: _Conn | None) -> None:
        with self._lock:
            dead, self._idle = self._idle, []
        for c in [conn, *dead]:
            if c is not None:
                try:
                    c.close()
                except Exception:  # noqa: BLE001
                    pass

    def close(self) -> None:
        self._discard(None)


_fast: dict[tuple[int, str, bool], FastLedger] = {}


def fast_ledger(url: str | None = None, durable: bool = True) -> FastLedger | None:
    """The hot-path statement runner for a PostgreSQL ledger (None for SQLite: callers use a session)."""
    if url is None:
        from domain.config import get_settings

        url = get_settings().ledger_url
    if not url.startswith("postgresql"):
        return None
    key = (os.getpid(), url, durable)
    with _lock:
        fast = _fast.get(key)
        if fast is None:
            fast = _fast[key] = FastLedger(url, durable)
        return fast


def dispose_all() -> None:
    """Drop this process's connections (call after fork, and in tests between databases)."""
    with _lock:
        for (pid, _), (engine, _) in list(_engines.items()):
            if pid == os.getpid():
                engine.dispose()
        for (pid, _, _), fast in list(_fast.items()):
            if pid == os.getpid():
                fast.close()
        # a forked child only drops its parent's connections: psycopg ends a session on collection only in
        # the process that opened it (tests/integration/test_fast_ledger.py checks it)
        _engines.clear()
        _fast.clear()



# ---- the hot-path statements, one source for both dialects -----------------------------------------

@dataclass(frozen=True)
class HotStatement:
    """A job hot-path statement (enqueue, claim, finish) written once for PostgreSQL and SQLite.

    ``first`` is an INSERT or UPDATE ``... RETURNING`` the columns ``cols``: the row called ``j``; each of
    ``then`` reads ``j`` and runs only when ``first`` returned a row. PostgreSQL runs the whole as one
    statement (data-modifying CTEs: one round trip, prepared by ``FastLedger``); a session (SQLite, or
    PostgreSQL inside a larger transaction) runs the parts in order, ``j`` bound as a ``VALUES`` row.
    Placeholders are ``%(name)s``; the statement's value is ``j``'s row (or None)."""

    first: str
    cols: tuple[str, ...]
    then: tuple[str, ...] = ()

    @functools.cached_property
    def postgresql(self) -> str:
        if not self.then:
            return self.first
        ctes = [f"j AS ({self.first})", *(f"s{i} AS ({sql})" for i, sql in enumerate(self.then))]
        return f"WITH {', '.join(ctes)} SELECT {', '.join(self.cols)} FROM j"

    @functools.cached_property
    def j_values(self) -> str:
        return f"WITH j({', '.join(self.cols)}) AS (VALUES ({', '.join(f'%(j_{c})s' for c in self.cols)})) "


def run_hot(statement: HotStatement, params: dict, url: str | None = None, durable: bool = True) -> tuple | None:
    """Run a hot-path statement in its own transaction: one prepared round trip on PostgreSQL, a short
    transaction of its parts on SQLite."""
    fast = fast_ledger(url, durable=durable)
    if fast is not None:
        return fast.one(statement.postgresql, params)
    with session_scope(url, durable=durable) as s:
        return run_hot_in(s, statement, params)


def run_hot_in(session: Session, statement: HotStatement, params: dict) -> tuple | None:
    """Run a hot-path statement's parts inside ``session``'s transaction (any dialect)."""
    row = session.execute(_text(statement.first, params), params).first()
    if row is None:
        return None
    row = tuple(row)
    if statement.then:
        bound = {**params, **{f"j_{c}": v for c, v in zip(statement.cols, row)}}
        for sql in statement.then:
            session.execute(_text(statement.j_values + sql, bound), bound)
    return row


_NAMED = re.compile(r"%\((\w+)\)s")


_BIND_TYPES = {datetime: DateTime(timezone=True), Decimal: Numeric(14, 6)}  # stored as the ORM's columns store them


def _text(sql: str, params: dict):
    """A SQLAlchemy ``text()`` of a ``%(name)s`` statement, datetimes and decimals bound as the ORM binds them."""
    return _text_for(sql, tuple(sorted((k, type(v)) for k, v in params.items() if type(v) in _BIND_TYPES)))


@functools.lru_cache(maxsize=64)
def _text_for(sql: str, typed: tuple[tuple[str, type], ...]):
    used = set(_NAMED.findall(sql))
    stmt = text(_NAMED.sub(r":\1", sql).replace("%%", "%"))
    binds = [bindparam(n, type_=_BIND_TYPES[t]) for n, t in typed if n in used]
    return stmt.bindparams(*binds) if binds else stmt
