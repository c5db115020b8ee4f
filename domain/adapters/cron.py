"""A small cron matcher: ``@hourly``, ``@daily``, ``@weekly``, ``@monthly``, ``@yearly`` or five fields
``minute hour day-of-month month day-of-week`` with ``*``, numbers, ranges ``a-b``, steps ``*/n`` / ``a-b/n``
and lists ``a,b``. Day of week: 0-7 (0 and 7 are Sunday). As in Vixie cron, when both day fields are
restricted a time matches if either matches. All times are UTC.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

ALIASES = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@weekly": "0 0 * * 0",
           "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *"}
_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_NAMES = ("minute", "hour", "day of month", "month", "day of week")


@dataclass(frozen=True)
class Cron:
    expr: str
    minutes: frozenset
    hours: frozenset
    days: frozenset
    months: frozenset
    weekdays: frozenset  # 0 = Sunday
    any_day: bool
    any_weekday: bool

    def matches(self, t: datetime) -> bool:
        if t.minute not in self.minutes or t.hour not in self.hours or t.month not in self.months:
            return False
        dom = t.day in self.days
        dow = (t.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return dom and dow
        return dom or dow

    def previous(self, now: datetime, horizon_days: int = 400) -> datetime | None:
        """The latest matching minute at or before ``now`` (None within ``horizon_days``)."""
        t = now.replace(second=0, microsecond=0)
        end = t - timedelta(days=horizon_days)
        while t >= end:
            if t.month not in self.months or not self._day_ok(t):
                t = t.replace(hour=0, minute=0) - timedelta(minutes=1)  # go to the end of the previous day
                continue
            if t.hour not in self.hours:
                t = t.replace(minute=0) - timedelta(minutes=1)
                continue
            if t.minute in self.minutes:
                return t
            t -= timedelta(minutes=1)
        return None

    def next(self, after: datetime, horizon_days: int = 400) -> datetime | None:
        """The first matching minute strictly after ``after``."""
        t = after.replace(second=0, microsecond=0) + timedelta(minutes=1)
        end = t + timedelta(days=horizon_days)
        while t <= end:
            if t.month not in self.months or not self._day_ok(t):
                t = t.replace(hour=0, minute=0) + timedelta(days=1)
                continue
            if t.hour not in self.hours:
                t = t.replace(minute=0) + timedelta(hours=1)
                continue
            if t.minute in self.minutes:
                return t
            t += timedelta(minutes=1)
        return None

    def _day_ok(self, t: datetime) -> bool:
        dom = t.day in self.days
        dow = (t.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return dom and dow
        return dom or dow


def _field(text: str, index: int) -> frozenset:
    lo, hi = _RANGES[index]
    values: set[int] = set()
    for part in text.split(","):
        base, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if step < 1:
            raise ValueError(f"cron {_NAMES[index]}: step must be >= 1 in {part!r}")
        if base == "*":
            a, b = lo, hi
        elif "-" in base:
            a, b = (int(x) for x in base.split("-", 1))
        else:
            a = int(base)
            b = hi if step_text else a
        if not (lo <= a <= hi and lo <= b <= hi and a <= b):
            raise ValueError(f"cron {_NAMES[index]}: {part!r} is outside {lo}-{hi}")
        values.update(range(a, b + 1, step))
    if index == 4 and 7 in values:
        values = (values - {7}) | {0}
    return frozenset(values)


def parse(expr: str) -> Cron:
    """Parse a cron expression; raises ValueError naming the bad field."""
    text = ALIASES.get(expr.strip().lower(), expr.strip())
    fields = text.split()
    if len(fields) != 5:
        raise ValueError(f"cron expression {expr!r}: expected @hourly/@daily/@weekly/@monthly/@yearly or 5 fields "
                         f"(minute hour day-of-month month day-of-week), got {len(fields)}")
    try:
        parsed = [_field(f, i) for i, f in enumerate(fields)]
    except ValueError as exc:
        if "cron" in str(exc):
            raise ValueError(f"cron expression {expr!r}: {exc}") from None
        raise ValueError(f"cron expression {expr!r}: not a number in {text!r}") from None
    return Cron(expr=expr, minutes=parsed[0], hours=parsed[1], days=parsed[2], months=parsed[3], weekdays=parsed[4],
                any_day=fields[2] == "*", any_weekday=fields[4] == "*")
