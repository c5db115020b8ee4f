"""The cron matcher: aliases, fields, day-of-month/day-of-week rules, previous/next fire times."""

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
    assert cron.parse("0 0 29 2 *").next(at(2026, 3, 1, 0, 0), horizon_days=1500) == at(2028, 2, 29, 0, 0)


@pytest.mark.parametrize("bad", ["", "@sometimes", "* * * *", "60 * * * *", "* 24 * * *", "* * 0 * *",
                                 "*/0 * * * *", "a * * * *", "5-2 * * * *"])
def test_bad_expressions_are_refused(bad):
    with pytest.raises(ValueError, match="cron"):
        cron.parse(bad)
