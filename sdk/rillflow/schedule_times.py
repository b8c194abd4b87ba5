"""When a schedule is due: pure functions of a :class:`ScheduleDefinition` and a time,
with no clock of their own, so that the evaluator (and a test) hands them the time.

Wall-clock times (cron expressions, calendars) are read in the schedule's time zone,
with its daylight-saving changes as cron has them: a time the clocks skip (02:30 on a
spring-forward night) is due at the first instant after the gap; a time they repeat
(fall back) is due once, at its first occurrence, except for a cron expression whose
minute or hour field is a wildcard or a step (``*/30 1 * * *``), which is due in each
occurrence of the repeated hour, as cron runs it. ``skip`` matches the wall-clock time
a run is due at (a skipped 02:30 is due at 03:00, and 03:00 is what skip sees).
Intervals count from the Unix epoch in real time, whatever the zone. Cron text is read
by ``cronsim``. Times stop at the end of year 9999.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from cronsim import CronSim

from rillflow.models import ScheduleCalendar, ScheduleDefinition, ScheduleInterval, cron_fields

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# how far a calendar is searched for a day it names (an impossible one, Feb 30, ends
# there): more than the 28 years after which dates fall on the same days of the week
_CALENDAR_HORIZON_DAYS = 366 * 29


def fire_times(
    schedule: ScheduleDefinition, after: datetime, *, until: datetime | None = None
) -> Iterator[datetime]:
    """The schedule's due times strictly after ``after`` (aware), ascending, each once,
    in UTC: the union of its crons, intervals and calendars, less what ``skip``
    matches, within ``start_at`` and ``end_at`` (and ``until``, if given)."""
    if after.tzinfo is None:
        raise ValueError("after must be timezone-aware")
    zone = schedule.zone
    if schedule.start_at is not None and after < schedule.start_at:
        after = schedule.start_at - timedelta(microseconds=1)  # (start_at itself may be due)
    end = min(t for t in (schedule.end_at, until) if t is not None) if (schedule.end_at or until) else None
    sources = [_cron(expr, after, zone) for expr in schedule.cron_expressions]
    sources += [_interval(i, after) for i in schedule.intervals]
    sources += [_calendar(c, after, zone) for c in schedule.calendars]
    last: datetime | None = None
    for t in heapq.merge(*map(_to_the_end_of_time, sources)):
        if end is not None and t > end:
            return
        if t == last or any(matches(c, t, zone) for c in schedule.skip):
            continue
        last = t
        yield t


def next_fire_times(schedule: ScheduleDefinition, after: datetime, n: int = 10) -> list[datetime]:
    """The next ``n`` due times after ``after`` (what ``describe`` shows)."""
    out: list[datetime] = []
    for t in fire_times(schedule, after):
        out.append(t)
        if len(out) == n:
            break
    return out


def jittered(
    schedule: ScheduleDefinition, due: datetime, schedule_id: str, next_due: datetime | None = None
) -> datetime:
    """When the run of due time ``due`` starts: up to ``jitter`` later, by an amount made
    from the schedule and the due time, so that every worker agrees on it. The jitter is
    capped at the gap to the next due time (``next_due``), as Temporal caps it, so that
    runs start in the order of their due times."""
    if not schedule.jitter:
        return due
    digest = hashlib.sha1(f"{schedule_id}|{due.isoformat()}".encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    span = schedule.jitter if next_due is None else min(schedule.jitter, next_due - due)
    return due + timedelta(microseconds=int(span / timedelta(microseconds=1) * fraction))


def matches(calendar: ScheduleCalendar, t: datetime, zone: ZoneInfo) -> bool:
    """Whether the wall-clock time of ``t`` in ``zone`` is one of ``calendar``'s."""
    local = t.astimezone(zone)
    years = calendar.values("year")
    return (
        (not years or local.year in years)
        and local.month in calendar.values("month")
        and local.day in calendar.values("day_of_month")
        and (local.isoweekday() % 7) in calendar.values("day_of_week")
        and local.hour in calendar.values("hour")
        and local.minute in calendar.values("minute")
        and local.second in calendar.values("second")
        and local.microsecond == 0
    )


def _to_the_end_of_time(source: Iterator[datetime]) -> Iterator[datetime]:
    """A source's times, until what datetime holds ends (year 9999)."""
    try:
        yield from source
    except (OverflowError, ValueError):
        return


def _cron(expr: str, after: datetime, zone: ZoneInfo) -> Iterator[datetime]:
    for t in CronSim(cron_fields(expr), after.astimezone(zone)):
        yield t.astimezone(UTC)


def _interval(interval: ScheduleInterval, after: datetime) -> Iterator[datetime]:
    every = interval.every
    offset = interval.offset or timedelta(0)
    n = (after - _EPOCH - offset) // every + 1
    while True:
        yield _EPOCH + offset + n * every
        n += 1


def _calendar(calendar: ScheduleCalendar, after: datetime, zone: ZoneInfo) -> Iterator[datetime]:
    """Day by day from ``after``'s date in ``zone``: each matching day's times."""
    years, months = calendar.values("year"), calendar.values("month")
    days, weekdays = calendar.values("day_of_month"), calendar.values("day_of_week")
    clock = [
        (h, m, s)
        for h in calendar.values("hour")
        for m in calendar.values("minute")
        for s in calendar.values("second")
    ]
    day = after.astimezone(zone).date()
    idle = 0
    while idle < _CALENDAR_HORIZON_DAYS:
        if years and day.year not in years:  # (straight to the next year it names)
            later = [y for y in years if y > day.year]
            if not later:
                return
            day, idle = date(later[0], 1, 1), 0
        if day.month in months and day.day in days and (day.isoweekday() % 7) in weekdays:
            idle = 0
            for h, m, s in clock:
                t = _wall(day, h, m, s, zone)
                if t > after:
                    yield t
        else:
            idle += 1
        day += timedelta(days=1)


def _wall(day: date, h: int, m: int, s: int, zone: ZoneInfo) -> datetime:
    """The instant (UTC) of wall-clock time ``day h:m:s`` in ``zone``: its first
    occurrence when the clocks repeat it, the end of the gap when they skip it."""
    naive = datetime(day.year, day.month, day.day, h, m, s)
    first = naive.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if first.astimezone(zone).replace(tzinfo=None) == naive:
        return min(first, naive.replace(tzinfo=zone, fold=1).astimezone(UTC))
    # skipped: the first instant whose wall-clock time is past it (the transition)
    lo = naive.replace(tzinfo=zone, fold=1).astimezone(UTC)
    hi = first
    while hi - lo > timedelta(seconds=1):
        mid = lo + (hi - lo) / 2
        if mid.astimezone(zone).replace(tzinfo=None) >= naive:
            hi = mid
        else:
            lo = mid
    return hi.replace(microsecond=0)
