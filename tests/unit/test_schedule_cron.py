"""Cron through croniter: aliases, fields, names, L, steps, time zones, previous/next fire times."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from domain.adapters import cron


def at(*args):
    return datetime(*args, tzinfo=timezone.utc)


@pytest.mark.parametrize("expr, when, expected", [
    ("@hourly", at(2026, 11, 23, 9, 0), True),
    ("@hourly", at(2026, 11, 23, 9, 1), False),
    ("@daily", at(2026, 11, 23, 0, 0), True),
    ("@daily", at(2026, 11, 23, 1, 0), False),
    ("@weekly", at(2026, 11, 22, 0, 0), True),      # a Sunday
    ("@weekly", at(2026, 11, 23, 0, 0), False),     # a Monday
    ("*/15 * * * *", at(2026, 1, 1, 3, 45), True),
    ("*/15 * * * *", at(2026, 1, 1, 3, 46), False),
    ("30 2 * * 1-5", at(2026, 11, 23, 2, 30), True),  # Monday
    ("30 2 * * 1-5", at(2026, 11, 22, 2, 30), False),  # Sunday
    ("0 0 * * 7", at(2026, 11, 22, 0, 0), True),     # 7 = Sunday too
    ("0 0 1,15 * *", at(2026, 3, 15, 0, 0), True),
    ("0 0 13 * 5", at(2026, 11, 13, 0, 0), True),    # both day fields restricted: either matches (a Friday the 13th)
    ("0 0 13 * 5", at(2026, 11, 20, 0, 0), True),    # a Friday
    ("0 0 13 * 5", at(2026, 11, 19, 0, 0), False),
    ("0 9-17/4 * * *", at(2026, 1, 1, 13, 0), True),
    ("0 9-17/4 * * *", at(2026, 1, 1, 11, 0), False),
    ("30 2 * * MON-FRI", at(2026, 11, 23, 2, 30), True),   # names: Monday
    ("30 2 * * MON-FRI", at(2026, 11, 28, 2, 30), False),  # Saturday
    ("0 0 1 JAN,JUL *", at(2026, 7, 1, 0, 0), True),
    ("0 0 L * *", at(2026, 2, 28, 0, 0), True),            # L: the last day of the month
    ("0 0 L * *", at(2028, 2, 28, 0, 0), False),           # 2028 is a leap year
    ("0 0 L * *", at(2028, 2, 29, 0, 0), True),
    ("0 0 * * L5", at(2026, 11, 27, 0, 0), True),          # the last Friday of November 2026
    ("0 0 * * L5", at(2026, 11, 20, 0, 0), False),
    ("0 0 * * 5#2", at(2026, 12, 11, 0, 0), True),         # the second Friday
    ("CRON_TZ=Europe/Berlin 0 3 * * *", at(2026, 11, 23, 2, 0), True),   # 03:00 CET = 02:00 UTC
    ("CRON_TZ=Europe/Berlin 0 3 * * *", at(2026, 7, 23, 1, 0), True),    # 03:00 CEST = 01:00 UTC
    ("CRON_TZ=Europe/Berlin 0 3 * * *", at(2026, 7, 23, 3, 0), False),
])
def test_matches(expr, when, expected):
    assert cron.parse(expr).matches(when) is expected


def test_previous_and_next():
    c = cron.parse("@daily")
    now = at(2026, 11, 23, 13, 45, 12)
    assert c.previous(now) == at(2026, 11, 23, 0, 0)
    assert c.next(now) == at(2026, 11, 24, 0, 0)
    w = cron.parse("@weekly")
    assert w.previous(now) == at(2026, 11, 22, 0, 0) and w.next(now) == at(2026, 11, 29, 0, 0)
    q = cron.parse("*/15 * * * *")
    assert q.previous(at(2026, 1, 1, 0, 14)) == at(2026, 1, 1, 0, 0)
    assert q.previous(at(2026, 1, 1, 0, 15)) == at(2026, 1, 1, 0, 15)  # at or before
    assert cron.parse("0 0 29 2 *").next(at(2026, 3, 1, 0, 0)) == at(2028, 2, 29, 0, 0)


def test_upcoming_fire_times_in_a_time_zone_across_daylight_saving():
    """New York leaves daylight saving on 2026-11-01: 09:00 local is 13:00 UTC before, 14:00 after."""
    c = cron.parse("CRON_TZ=America/New_York 0 9 * * MON-FRI")
    assert c.upcoming(at(2026, 10, 29, 12, 0)) == [at(2026, 10, 29, 13, 0), at(2026, 10, 30, 13, 0),
                                                   at(2026, 11, 2, 14, 0)]
    assert c.previous(at(2026, 11, 2, 14, 0)) == at(2026, 11, 2, 14, 0)
    assert cron.parse("*/20 9-10 * * *").upcoming(at(2026, 1, 1, 10, 30)) == [
        at(2026, 1, 1, 10, 40), at(2026, 1, 2, 9, 0), at(2026, 1, 2, 9, 20)]


@pytest.mark.parametrize("bad", ["", "@sometimes", "* * * *", "60 * * * *", "* 24 * * *", "* * 0 * *",
                                 "*/0 * * * *", "a * * * *", "* * * * MON-FUN",
                                 "0 0 30 2 *", "* * * * * *", "CRON_TZ=Mars/Olympus 0 3 * * *"])
def test_bad_expressions_are_refused(bad):
    with pytest.raises(ValueError, match="cron"):
        cron.parse(bad)
