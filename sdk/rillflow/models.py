"""The schedule model of the workflows page (``from rillflow.models import
ScheduleDefinition``): when a workflow's scheduled runs are due. Every field is checked
when the definition is made, and a mistake names the field; when the due times fall is
computed by :mod:`rillflow.schedule_times`.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import IntEnum
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rillflow.durations import MAX_DURATION
from rillflow_runtime.keyspace import SCHEDULE_ID_RE

__all__ = [
    "PartialScheduleDefinition",
    "Schedule",
    "ScheduleCalendar",
    "ScheduleDefinition",
    "ScheduleInterval",
    "ScheduleOverlapPolicy",
    "SchedulePolicy",
    "ScheduleRange",
]


# cron's named schedules, as the five fields they stand for
CRON_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


def cron_fields(expr: str) -> str:
    """A cron expression as its five fields (a named one, ``@daily``, spelt out)."""
    return CRON_MACROS.get(expr.strip().lower(), expr)


# the most max_executions may be: what a script's number holds exactly
MAX_EXECUTIONS = 2**53 - 1


class ScheduleOverlapPolicy(IntEnum):
    """What a due time does while the schedule's previous run is still open (Temporal's)."""

    SKIP = 1  # nothing: the due time is recorded as skipped
    BUFFER_ONE = 2  # one run waits for the open one to close; later ones are skipped
    BUFFER_ALL = 3  # every one waits, in order
    CANCEL_OTHER = 4  # the open run is asked to cancel, then this one starts
    TERMINATE_OTHER = 5  # the open run is terminated, then this one starts
    ALLOW_ALL = 6  # this one starts beside it


class ScheduleRange(BaseModel):
    """``start`` to ``end`` (inclusive) every ``step``: an ``end`` below ``start`` means
    ``start`` alone, a ``step`` of 0 means 1."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    start: int
    end: int = 0
    step: int = 0

    def values(self) -> range:
        return range(self.start, max(self.end, self.start) + 1, self.step or 1)

    @field_validator("step")
    @classmethod
    def _step(cls, v: int) -> int:
        if v < 0:
            raise ValueError("step must be 0 (meaning 1) or more")
        return v


def _ranges(*bounds: int) -> list[ScheduleRange]:
    return [ScheduleRange(start=bounds[0], end=bounds[-1])]


# each calendar field: what it may hold (day_of_week: 0 = Sunday)
_CALENDAR_BOUNDS = {
    "second": (0, 59),
    "minute": (0, 59),
    "hour": (0, 23),
    "day_of_month": (1, 31),
    "month": (1, 12),
    "year": (1970, 9999),
    "day_of_week": (0, 6),
}


class ScheduleCalendar(BaseModel):
    """Wall-clock times in the schedule's time zone: every combination of the fields'
    values (an empty ``year`` is every year). Defaults: at 00:00:00, every day."""

    model_config = ConfigDict(extra="forbid")  # (a misspelt field is an error, not ignored)

    second: list[ScheduleRange] = Field(default_factory=lambda: _ranges(0))
    minute: list[ScheduleRange] = Field(default_factory=lambda: _ranges(0))
    hour: list[ScheduleRange] = Field(default_factory=lambda: _ranges(0))
    day_of_month: list[ScheduleRange] = Field(default_factory=lambda: _ranges(1, 31))
    month: list[ScheduleRange] = Field(default_factory=lambda: _ranges(1, 12))
    year: list[ScheduleRange] = Field(default_factory=list)
    day_of_week: list[ScheduleRange] = Field(default_factory=lambda: _ranges(0, 6))
    comment: str | None = None

    @model_validator(mode="after")
    def _bounds(self) -> ScheduleCalendar:
        for name, (lo, hi) in _CALENDAR_BOUNDS.items():
            if name != "year" and not getattr(self, name):
                raise ValueError(f"{name} is empty: it would match no time (leave it out for its default)")
            for r in getattr(self, name):
                if not (lo <= r.start <= hi and r.end <= hi):
                    raise ValueError(f"{name} holds {r.start}-{r.end}: a {name} is {lo} to {hi}")
        return self

    def values(self, name: str) -> list[int]:
        """The sorted values of a field (``year``: empty for every year)."""
        return sorted({v for r in getattr(self, name) for v in r.values()})


class ScheduleInterval(BaseModel):
    """Every ``every`` since the Unix epoch, shifted by ``offset`` (under ``every``):
    ``every=timedelta(hours=1), offset=timedelta(minutes=5)`` is 00:05, 01:05, ... UTC."""

    model_config = ConfigDict(extra="forbid")

    every: timedelta
    offset: timedelta | None = None

    @model_validator(mode="after")
    def _check(self) -> ScheduleInterval:
        if not timedelta(seconds=1) <= self.every <= MAX_DURATION:
            raise ValueError(f"every must be from 1 second to {MAX_DURATION.days} days, got {self.every}")
        for name in ("every", "offset"):
            v = getattr(self, name)
            if v is not None and v.microseconds:
                raise ValueError(f"{name} must be whole seconds, got {v}")
        if self.offset is not None and not timedelta(0) <= self.offset < self.every:
            raise ValueError(
                f"offset must be at least 0 and less than every ({self.every}), got {self.offset}"
            )
        return self


class SchedulePolicy(BaseModel):
    """How due times are run: ``overlap`` while an earlier run is open; due times missed
    (workers down) within ``catchup_window_seconds`` still run, older ones are skipped;
    ``pause_on_failure`` pauses the schedule when a run of it fails."""

    catchup_window_seconds: int = 31_536_000  # a year
    overlap: ScheduleOverlapPolicy = ScheduleOverlapPolicy.SKIP
    pause_on_failure: bool = False

    model_config = ConfigDict(extra="forbid")

    @field_validator("overlap", mode="before")
    @classmethod
    def _overlap_by_name(cls, v: Any) -> Any:
        if isinstance(v, str) and not v.isdigit():
            try:
                return ScheduleOverlapPolicy[v.strip().upper()]
            except KeyError:
                names = ", ".join(p.name for p in ScheduleOverlapPolicy)
                raise ValueError(f"overlap {v!r} is not one of {names}") from None
        return v

    @property
    def catchup_window(self) -> timedelta:
        return timedelta(seconds=self.catchup_window_seconds)

    @field_validator("catchup_window_seconds")
    @classmethod
    def _window(cls, v: int) -> int:
        if not 1 <= v <= MAX_DURATION.total_seconds():
            raise ValueError(f"catchup_window_seconds must be from 1 to {int(MAX_DURATION.total_seconds())}")
        return v


class ScheduleDefinition(BaseModel):
    """When a workflow runs by itself, with ``input``: the union of the due times of
    ``cron_expressions``, ``intervals`` and ``calendars``, less those ``skip`` matches,
    from ``start_at`` to ``end_at``, in ``time_zone_name`` (IANA; UTC by default), each
    started up to ``jitter`` late, at most ``max_executions`` times."""

    input: Any
    calendars: list[ScheduleCalendar] = Field(default_factory=list)
    intervals: list[ScheduleInterval] = Field(default_factory=list)
    cron_expressions: list[str] = Field(default_factory=list)
    skip: list[ScheduleCalendar] = Field(default_factory=list)
    start_at: datetime | None = None
    end_at: datetime | None = None
    jitter: timedelta | None = None
    time_zone_name: str | None = None
    policy: SchedulePolicy = Field(default_factory=SchedulePolicy)
    max_executions: int | None = None
    schedule_id: str | None = None

    # (a field set later is checked too; a misspelt one is an error, not ignored)
    model_config = ConfigDict(validate_assignment=True, extra="forbid")

    @field_validator("cron_expressions")
    @classmethod
    def _crons(cls, v: list[str]) -> list[str]:
        for i, expr in enumerate(v):
            try:
                if not isinstance(expr, str) or len(cron_fields(expr).split()) != 5:
                    raise CronSimError(f"{len(str(expr).split())} fields")
                CronSim(cron_fields(expr), datetime(2000, 1, 1))
            except (CronSimError, TypeError) as e:
                raise ValueError(
                    f"cron_expressions[{i}] {expr!r} is not a cron expression ({e}): five fields, "
                    "minute hour day-of-month month day-of-week, like '0 0 * * *', or one of "
                    + ", ".join(CRON_MACROS)
                ) from None
        return v

    @field_validator("time_zone_name")
    @classmethod
    def _zone(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                ZoneInfo(v)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(
                    f"time_zone_name {v!r} is not an IANA time zone, like 'Europe/Paris'"
                ) from None
        return v

    @field_validator("start_at", "end_at")
    @classmethod
    def _aware(cls, v: datetime | None) -> datetime | None:
        if v is not None and v.tzinfo is None:
            raise ValueError("must be timezone-aware (datetime(..., tzinfo=UTC))")
        return v

    @field_validator("jitter")
    @classmethod
    def _jitter(cls, v: timedelta | None) -> timedelta | None:
        if v is not None and not timedelta(0) <= v <= MAX_DURATION:
            raise ValueError(f"jitter must be from 0 to {MAX_DURATION.days} days")
        return v

    @field_validator("max_executions", mode="before")
    @classmethod
    def _not_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("max_executions must be a whole number (None: unlimited), not a bool")
        return v

    @field_validator("max_executions")
    @classmethod
    def _max(cls, v: int | None) -> int | None:
        if v is not None and not 1 <= v <= MAX_EXECUTIONS:
            raise ValueError(f"max_executions must be from 1 to {MAX_EXECUTIONS} (None: unlimited)")
        return v

    @field_validator("schedule_id")
    @classmethod
    def _id(cls, v: str | None) -> str | None:
        if v is not None and not SCHEDULE_ID_RE.fullmatch(v):
            raise ValueError(f"schedule_id {v!r} is invalid: use 1-200 letters, digits, '_', '-', '.'")
        return v

    @model_validator(mode="after")
    def _window(self) -> ScheduleDefinition:
        if self.start_at and self.end_at and self.end_at <= self.start_at:
            raise ValueError(
                f"end_at ({self.end_at.isoformat()}) is not after start_at ({self.start_at.isoformat()})"
            )
        return self

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.time_zone_name or "UTC")


Schedule = ScheduleDefinition


class PartialScheduleDefinition(BaseModel):
    """A change to a stored schedule (``ScheduleHandle.update``): the fields given
    replace the stored ones, the rest keep their values; the result is checked whole,
    as a ScheduleDefinition is."""

    model_config = ConfigDict(extra="forbid")

    input: Any = None
    calendars: list[ScheduleCalendar] | None = None
    intervals: list[ScheduleInterval] | None = None
    cron_expressions: list[str] | None = None
    skip: list[ScheduleCalendar] | None = None
    start_at: datetime | None = None
    end_at: datetime | None = None
    jitter: timedelta | None = None
    time_zone_name: str | None = None
    policy: SchedulePolicy | None = None
    max_executions: int | None = None

    def changes(self) -> dict[str, Any]:
        """The fields given (a field given as None clears it: no end, no limit)."""
        return {name: getattr(self, name) for name in self.model_fields_set}
