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
