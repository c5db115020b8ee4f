"""Cron expressions for retraining schedules, evaluated by croniter (a kept library, not our own parser).

Accepted: the aliases ``@hourly``, ``@daily`` (``@midnight``), ``@weekly``, ``@monthly``, ``@yearly``
(``@annually``) or five fields ``minute hour day-of-month month day-of-week`` with ``*``, numbers, names
(``JAN``-``DEC``, ``SUN``-``SAT``, e.g. ``MON-FRI``), ranges, steps (``*/15``, ``9-17/2``), lists,
``L`` (last day of the month in day-of-month; ``L5`` = the last Friday in day-of-week) and ``5#2`` (the
second Friday). Day of week 0-7 (0 and 7 are Sunday). As in Vixie cron, when both day fields are
restricted a time matches if either matches.

Times are UTC unless the expression starts with ``CRON_TZ=<IANA zone>`` (cronie's syntax), e.g.
``CRON_TZ=Europe/Berlin 0 3 * * MON-FRI``: the fields are then read as wall-clock time in that zone
(daylight-saving changes included) and every time returned is UTC.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, CroniterError, croniter

TZ_PREFIX = "CRON_TZ="
FIELDS = "minute hour day-of-month month day-of-week"


@dataclass(frozen=True)
class Cron:
    expr: str       # as written (with its CRON_TZ= prefix, if any)
    fields: str     # the cron part croniter evaluates
    tz: tzinfo

    def _iter(self, start: datetime) -> croniter:
        return croniter(self.fields, _utc(start).astimezone(self.tz), ret_type=datetime)

    def matches(self, t: datetime) -> bool:
        """Whether the minute holding ``t`` is a fire time."""
        return croniter.match(self.fields, _utc(t).astimezone(self.tz).replace(second=0, microsecond=0))

    def previous(self, now: datetime) -> datetime | None:
        """The latest fire time at or before ``now`` (UTC), None if there is none."""
        start = _utc(now).replace(second=0, microsecond=0) + timedelta(minutes=1)
        try:
            return _utc(self._iter(start).get_prev(datetime))
        except CroniterBadDateError:
            return None

    def next(self, after: datetime) -> datetime | None:
        """The first fire time strictly after ``after`` (UTC), None if there is none."""
        try:
            return _utc(self._iter(after).get_next(datetime))
        except CroniterBadDateError:
            return None

    def upcoming(self, after: datetime, n: int = 3) -> list[datetime]:
        """The next ``n`` fire times strictly after ``after`` (UTC)."""
        it = self._iter(after)
        return [_utc(it.get_next(datetime)) for _ in range(n)]


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def parse(expr: str) -> Cron:
    """Parse a cron expression; raises ValueError saying what is wrong (and that it never fires)."""
    text = (expr or "").strip()
    tz: tzinfo = timezone.utc
    if text.startswith(TZ_PREFIX):
        zone, _, text = text[len(TZ_PREFIX):].partition(" ")
        try:
            tz = ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"cron expression {expr!r}: unknown time zone {zone!r} (an IANA name such as "
                             "Europe/Berlin)") from None
        text = text.strip()
    if not text.startswith("@") and len(text.split()) != 5:
        raise ValueError(f"cron expression {expr!r}: expected @hourly/@daily/@weekly/@monthly/@yearly or 5 fields "
                         f"({FIELDS}), got {len(text.split())}")
    try:
        cron = Cron(expr=expr, fields=text, tz=tz)
        first = cron._iter(datetime(2000, 1, 1, tzinfo=timezone.utc)).get_next(datetime)
    except CroniterBadDateError:
        raise ValueError(f"cron expression {expr!r}: never fires (no such date)") from None
    except (CroniterError, KeyError, IndexError) as exc:
        raise ValueError(f"cron expression {expr!r}: {exc} ({FIELDS})") from None
    if first is None:
        raise ValueError(f"cron expression {expr!r}: never fires")
    return cron
