"""Digest window arithmetic in Europe/Brussels, across daylight-saving changes."""

from __future__ import annotations

from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import pytest

from domain.schedule import due_times, local_instant, parse_hhmm, windows

BRUSSELS = ZoneInfo("Europe/Brussels")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize("day,send_at,expected", [
    (date(2026, 1, 15), "08:00", utc(2026, 1, 15, 7, 0)),        # winter, UTC+1
    (date(2026, 7, 15), "08:00", utc(2026, 7, 15, 6, 0)),        # summer, UTC+2
    (date(2026, 3, 29), "08:00", utc(2026, 3, 29, 6, 0)),        # spring change day
    (date(2026, 10, 25), "08:00", utc(2026, 10, 25, 7, 0)),      # autumn change day
    (date(2026, 3, 29), "02:30", utc(2026, 3, 29, 1, 0)),        # does not exist -> 03:00 CEST
    (date(2026, 3, 29), "02:00", utc(2026, 3, 29, 1, 0)),        # gap start -> 03:00 CEST
    (date(2026, 3, 29), "03:00", utc(2026, 3, 29, 1, 0)),        # first valid instant
    (date(2026, 10, 25), "02:30", utc(2026, 10, 25, 0, 30)),     # twice: the first (CEST)
    (date(2026, 10, 25), "03:00", utc(2026, 10, 25, 2, 0)),      # after the fold, CET
    (date(2026, 12, 31), "23:59", utc(2026, 12, 31, 22, 59)),    # year end
])
def test_local_instant(day, send_at, expected):
    assert local_instant(day, parse_hhmm(send_at), BRUSSELS) == expected


def test_a_daily_0800_bundle_is_due_once_a_day_across_both_changes():
    spring = list(due_times("daily", "08:00", None, BRUSSELS, utc(2026, 3, 27, 12),
                            utc(2026, 3, 31, 12)))
    assert [d.astimezone(BRUSSELS).strftime("%m-%d %H:%M") for d in spring] == [
        "03-28 08:00", "03-29 08:00", "03-30 08:00", "03-31 08:00"]
    autumn = list(due_times("daily", "08:00", None, BRUSSELS, utc(2026, 10, 23, 12),
                            utc(2026, 10, 26, 12)))
    assert [d.astimezone(BRUSSELS).strftime("%m-%d %H:%M") for d in autumn] == [
        "10-24 08:00", "10-25 08:00", "10-26 08:00"]
    # The change-day windows are 23 h and 25 h long: still exactly one bundle per day.
    assert (spring[1] - spring[0]).total_seconds() == 23 * 3600
    assert (autumn[1] - autumn[0]).total_seconds() == 25 * 3600


def test_the_window_that_repeats_an_hour_is_built_once():
    due = list(due_times("daily", "02:30", None, BRUSSELS, utc(2026, 10, 24, 12),
                         utc(2026, 10, 25, 12)))
    assert due == [utc(2026, 10, 25, 0, 30)]


@pytest.mark.parametrize("weekday,expected_local", [
    (1, "2026-11-30 09:00"),  # Monday after the Sunday start
    (7, "2026-12-06 09:00"),  # that Sunday's 09:00 has passed: the next Sunday
])
def test_weekly_due_times_fall_on_their_weekday(weekday, expected_local):
    after = utc(2026, 11, 29, 12)  # Sunday 13:00 in Brussels: today's 09:00 has passed
    first = next(iter(due_times("weekly", "09:00", weekday, BRUSSELS, after,
                                utc(2026, 12, 31))))
    assert first.astimezone(BRUSSELS).strftime("%Y-%m-%d %H:%M") == expected_local
    assert first.astimezone(BRUSSELS).isoweekday() == weekday


def test_weekly_window_spans_the_week_across_the_year_boundary():
    found = windows("weekly", "08:00", 5, BRUSSELS, last_end=None, now=utc(2027, 1, 9),
                    created_at=utc(2026, 12, 28))
    ends = [w.end.astimezone(BRUSSELS).strftime("%Y-%m-%d") for w in found]
    assert ends == ["2027-01-01", "2027-01-08"]
    assert found[1].start == found[0].end
    assert (found[1].end - found[1].start).days == 7


def test_missed_windows_are_each_built_once_and_contiguous():
    last = utc(2026, 11, 20, 7)  # Friday 08:00 CET was the last bundle
    found = windows("daily", "08:00", None, BRUSSELS, last_end=last,
                    now=utc(2026, 11, 24, 7, 30), created_at=utc(2026, 1, 1))
    assert [w.end for w in found] == [utc(2026, 11, d, 7) for d in (21, 22, 23, 24)]
    assert found[0].start == last
    assert all(a.end == b.start for a, b in zip(found, found[1:], strict=False))
    # Nothing is due twice: asking again after the last one answers nothing.
    assert windows("daily", "08:00", None, BRUSSELS, last_end=found[-1].end,
                   now=utc(2026, 11, 24, 7, 30), created_at=utc(2026, 1, 1)) == []


def test_a_new_send_at_does_not_overlap_the_last_window():
    last = utc(2026, 11, 24, 7)  # 08:00 today; the subscriber moves to 17:00
    found = windows("daily", "17:00", None, BRUSSELS, last_end=last,
                    now=utc(2026, 11, 24, 16, 1), created_at=utc(2026, 1, 1))
    assert [(w.start, w.end) for w in found] == [(last, utc(2026, 11, 24, 16))]
