"""Structured logs: every record carries the job id, kind and tenant being worked on, and URLs never
show their passwords. ``configure(json_logs=True)`` switches to one JSON object per line."""

from __future__ import annotations

import contextvars
import functools
import getpass
import json
import logging
import re
import socket
import time
from collections.abc import Mapping
from contextlib import contextmanager

_job: contextvars.ContextVar[dict] = contextvars.ContextVar("foundry_job", default={})
_SECRET_URL = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@", re.I)


@functools.cache
def actor(role: str) -> str:
    """``role:user@host``: who did something, as the ledger records it (``created_by``, ``moved_by``);
    ``role`` alone where the user or host cannot be found."""
    try:
        return f"{role}:{getpass.getuser()}@{socket.gethostname()}"
    except Exception:  # noqa: BLE001 - no passwd entry, no hostname: the role still says enough
        return role


def mask_secrets(text: str) -> str:
    """``postgresql://u:secret@h/db`` → ``postgresql://u:***@h/db``."""
    return _SECRET_URL.sub(lambda m: f"{m.group('scheme')}{m.group('user')}:***@", text)


@contextmanager
def job_context(**fields):
    token = _job.set({**_job.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _job.reset(token)


def bind(**fields) -> None:
    """Add fields (e.g. the tenant once the body is parsed) to the current job's log context."""
    _job.set({**_job.get(), **{k: v for k, v in fields.items() if v is not None}})


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _job.get()
        record.job_id = ctx.get("job_id", "-")
        record.kind = ctx.get("kind", "-")
        record.tenant = ctx.get("tenant", "-")
        if isinstance(record.msg, str) and "://" in record.msg:
            record.msg = mask_secrets(record.msg)
        if isinstance(record.args, Mapping):  # "%(name)s" style, as Celery logs: keep it a mapping
            record.args = {k: mask_secrets(v) if isinstance(v, str) else v for k, v in record.args.items()}
        elif isinstance(record.args, tuple):
            record.args = tuple(mask_secrets(a) if isinstance(a, str) else a for a in record.args)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "message": mask_secrets(record.getMessage()),
               "job_id": getattr(record, "job_id", "-"), "kind": getattr(record, "kind", "-"),
               "tenant": getattr(record, "tenant", "-"), "process": record.process}
        if record.exc_info:
            out["exc"] = mask_secrets(self.formatException(record.exc_info))
        return json.dumps(out, default=str)


TEXT_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] job=%(job_id)s tenant=%(tenant)s %(name)s: %(message)s"


def configure(logger: logging.Logger, json_logs: bool) -> None:
    """Install the context filter (and the JSON formatter when asked) on every handler of ``logger``."""
    for handler in logger.handlers:
        if not any(isinstance(f, ContextFilter) for f in handler.filters):
            handler.addFilter(ContextFilter())
        handler.setFormatter(JsonFormatter() if json_logs else logging.Formatter(TEXT_FORMAT))
