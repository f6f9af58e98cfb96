"""Digest windows: when daily and weekly bundles are due, in local time.

Pure functions. A window is (previous due time, this due time]. A `send_at` that does not
exist on a daylight-saving day (the clock jumps over it) moves to the first valid instant
after the gap; one that occurs twice (the clock falls back) uses the first occurrence.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo


@dataclass(frozen=True)
class Window:
    start: datetime  # exclusive
    end: datetime  # inclusive: the due time


def parse_hhmm(value: str) -> time:
    hours, minutes = value.split(":")
    return time(int(hours), int(minutes))


def local_instant(day: date, at: time, tz: ZoneInfo) -> datetime:
    """The UTC instant of `at` on `day` in `tz`, with the rules for gaps and folds."""
    naive = datetime.combine(day, at)
    first = naive.replace(tzinfo=tz, fold=0)
    # A wall time in a gap does not survive a round trip through UTC.
    roundtrip = first.astimezone(UTC).astimezone(tz)
    if roundtrip.replace(tzinfo=None) != naive:
        return _gap_end(day, tz)  # in the gap: the first valid instant is where it ends
    return first.astimezone(UTC)


def _gap_end(day: date, tz: ZoneInfo) -> datetime:
    """The instant the clock jumped forward on `day` (the first valid local time)."""
    start = datetime.combine(day, time(0)).replace(tzinfo=tz).astimezone(UTC)
    previous_offset = start.astimezone(tz).utcoffset()
    for minutes in range(0, 26 * 60, 15):
        instant = start + timedelta(minutes=minutes)
        if instant.astimezone(tz).utcoffset() != previous_offset:
            return instant
    raise ValueError(f"no daylight-saving gap on {day}")


def due_times(cadence: str, send_at: str, weekday: int | None, tz: ZoneInfo,
              after: datetime, until: datetime) -> Iterator[datetime]:
    """Every due instant in (after, until], oldest first."""
    at = parse_hhmm(send_at)
    day = after.astimezone(tz).date() - timedelta(days=1)
    last_day = until.astimezone(tz).date() + timedelta(days=1)
    while day <= last_day:
        if cadence == "daily" or (cadence == "weekly" and day.isoweekday() == weekday):
            instant = local_instant(day, at, tz)
            if after < instant <= until:
                yield instant
        day += timedelta(days=1)


def previous_due(cadence: str, send_at: str, weekday: int | None, tz: ZoneInfo,
                 before: datetime) -> datetime:
    """The last due instant strictly before `before`."""
    span = timedelta(days=8 if cadence == "weekly" else 2)
    candidates = list(due_times(cadence, send_at, weekday, tz, before - span,
                                before - timedelta(microseconds=1)))
    return candidates[-1]


def windows(cadence: str, send_at: str, weekday: int | None, tz: ZoneInfo,
            last_end: datetime | None, now: datetime, created_at: datetime) -> list[Window]:
    """The windows due by `now` that have not been built: every one since `last_end` (or
    since the subscription began), so each missed window is built once."""
    start = last_end or created_at
    result: list[Window] = []
    for due in due_times(cadence, send_at, weekday, tz, start, now):
        window_start = (last_end if last_end is not None and not result
                        else previous_due(cadence, send_at, weekday, tz, due))
        result.append(Window(start=window_start, end=due))
    return result
