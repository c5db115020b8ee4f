"""Helpers shared by CLI modules: console, time parsing, ledger access."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone

from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def since(text: str | None) -> datetime | None:
    """'24h', '7d', '30m' or an ISO timestamp → an aware datetime."""
    if not text:
        return None
    m = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if m:
        n, unit = int(m.group(1)), m.group(2)
        return datetime.now(timezone.utc) - timedelta(**{{"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[unit]: n})
    ts = datetime.fromisoformat(text)
    return ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)


def fmt_time(ts: datetime | None) -> str:
    return ts.strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def dump(obj) -> str:
    return json.dumps(obj, indent=2, default=str, sort_keys=True)


class UsageError(ValueError):
    """The command line is wrong (exit status 2)."""


class CliError(Exception):
    """A known failure with its exit status (1 unless said otherwise)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


UPGRADE_HINT = "run `foundry db upgrade` (or set FOUNDRY_DATABASE_URL to your ledger)"


def _ledger_url(hide_password: bool = True) -> str:
    from sqlalchemy.engine import make_url

    from domain.config import get_settings

    url = get_settings().ledger_url
    try:
        return make_url(url).render_as_string(hide_password=hide_password)
    except Exception:  # noqa: BLE001
        return "the configured ledger"


def missing_ledger() -> None:
    """Refuse to run against a SQLite ledger file that does not exist, instead of creating an empty one."""
    from pathlib import Path

    from domain.config import get_settings

    url = get_settings().ledger_url
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:" and not Path(path).exists():
            raise CliError(f"no ledger at {path}: {UPGRADE_HINT}")


def ledger_problem(exc: BaseException) -> str | None:
    """A one-line explanation when ``exc`` says the ledger has no tables (or cannot be reached)."""
    from sqlalchemy.exc import OperationalError, ProgrammingError

    if not isinstance(exc, (OperationalError, ProgrammingError)):
        return None
    text = str(getattr(exc, "orig", exc)).lower()
    if "no such table" in text or ("relation" in text and "does not exist" in text) or "no such column" in text \
            or ("column" in text and "does not exist" in text):
        return f"the ledger {_ledger_url()} has no tables or an older schema: {UPGRADE_HINT}"
    if isinstance(exc, OperationalError):
        return f"cannot reach the ledger {_ledger_url()}: {text.splitlines()[0] if text else exc.__class__.__name__}"
    return None


def add_json(p, what: str = "the result") -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} as one JSON document")


def add_tenant(p, *, required: bool = False, default: str | None = None, help: str | None = None) -> None:
    p.add_argument("--tenant", required=required, default=default,
                   help=help or ("the tenant (required)" if required else
                                 f"the tenant (default: {default})" if default else "only this tenant"))


def print_json(obj) -> None:
    print(dump(obj))
