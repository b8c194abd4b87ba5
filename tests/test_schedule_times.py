"""The schedule model and its due times: pure functions of a definition and a time, so
nothing here waits for a clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

import rillflow as workflows
from rillflow.errors import WorkflowDefinitionError
from rillflow.models import (
    Schedule,
    ScheduleCalendar,
    ScheduleDefinition,
    ScheduleInterval,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleRange,
)
from rillflow.schedule_times import fire_times, jittered, next_fire_times
from tests import seed_examples as ex

PARIS, NEW_YORK = ZoneInfo("Europe/Paris"), ZoneInfo("America/New_York")


def at(*a: int, tz: ZoneInfo | None = None) -> datetime:
    return datetime(*a, tzinfo=tz or UTC)  # type: ignore[misc]


def test_the_pages_daily_midnight_schedule_is_due_each_midnight() -> None:
    (schedule,) = workflows.get_workflow_definition(ex.ScheduledReportWorkflow).schedules
    assert schedule.input == {"report_type": "daily", "include_details": False}
    times = next_fire_times(schedule, at(2026, 12, 7, 9, 30), 3)
    assert times == [at(2026, 12, 8), at(2026, 12, 9), at(2026, 12, 10)]
    assert Schedule is ScheduleDefinition


def test_a_due_time_is_strictly_after_the_time_given() -> None:
    s = ScheduleDefinition(input=None, cron_expressions=["0 0 * * *"])
    assert next_fire_times(s, at(2026, 12, 8), 1) == [at(2026, 12, 9)]


@pytest.mark.parametrize(
    ("zone", "spring", "fall"),
    [(PARIS, (2026, 3, 29), (2026, 10, 25)), (NEW_YORK, (2026, 3, 8), (2026, 11, 1))],
    ids=["paris", "new_york"],
)
def test_daylight_saving_changes_as_cron_has_them(
    zone: ZoneInfo, spring: tuple[int, int, int], fall: tuple[int, int, int]
) -> None:
    """02:30 every day: on the night the clocks skip it, due when they jump (03:00); on
    the night they repeat it, due once; 09:00 stays 09:00 on the wall either side."""
    for s in (
        ScheduleDefinition(input=None, cron_expressions=["30 2 * * *"], time_zone_name=zone.key),
        ScheduleDefinition(
            input=None,
            calendars=[ScheduleCalendar(hour=[ScheduleRange(start=2)], minute=[ScheduleRange(start=30)])],
            time_zone_name=zone.key,
        ),
    ):
        day_before = at(*spring, tz=zone) - timedelta(days=1)
        local = [t.astimezone(zone) for t in next_fire_times(s, day_before, 3)]
        assert [(t.day, t.hour, t.minute) for t in local] == [
            (spring[2] - 1, 2, 30),
            (spring[2], 3, 0),
            (spring[2] + 1, 2, 30),
        ]
        fall_day = at(*fall, tz=zone)
        times = next_fire_times(s, fall_day - timedelta(days=1), 3)
        days = [(fall_day + timedelta(days=k)).date() for k in (-1, 0, 1)]
        assert [t.astimezone(zone).date() for t in times] == days  # once a day, the repeated hour too
        assert {t.astimezone(zone).strftime("%H:%M") for t in times} == {"02:30"}
        assert times[2] - times[0] == timedelta(hours=49)  # the night with an hour more
    nine = ScheduleDefinition(input=None, cron_expressions=["0 9 * * *"], time_zone_name=zone.key)
    times = next_fire_times(nine, at(*spring, tz=zone) - timedelta(days=1), 2)
    assert [t.astimezone(zone).hour for t in times] == [9, 9] and times[1] - times[0] == timedelta(hours=23)


def test_sources_make_one_ascending_union_less_what_skip_matches() -> None:
    s = ScheduleDefinition(
        input=None,
        cron_expressions=["0 12 * * *", "0 12 * * 1"],  # Mondays twice over: once
        intervals=[ScheduleInterval(every=timedelta(hours=8), offset=timedelta(hours=2))],
        skip=[ScheduleCalendar(hour=[ScheduleRange(start=10)], minute=[ScheduleRange(start=0)])],
    )
    times = next_fire_times(s, at(2026, 12, 7), 6)  # 2026-12-07 is a Monday
    assert times == [
        at(2026, 12, 7, 2),
        # (10:00 is skipped)
        at(2026, 12, 7, 12),
        at(2026, 12, 7, 18),
        at(2026, 12, 8, 2),
        at(2026, 12, 8, 12),
        at(2026, 12, 8, 18),
    ]


def test_a_calendar_with_ranges_steps_and_days_of_the_week() -> None:
    c = ScheduleCalendar(
        hour=[ScheduleRange(start=9, end=17, step=4)],  # 9, 13, 17
        day_of_week=[ScheduleRange(start=1, end=5)],  # weekdays
        comment="office hours",
    )
    s = ScheduleDefinition(input=None, calendars=[c], time_zone_name="Europe/Paris")
    local = [t.astimezone(PARIS) for t in next_fire_times(s, at(2026, 12, 11, 17, tz=PARIS), 4)]  # a Friday
    assert [(t.weekday(), t.hour) for t in local] == [(0, 9), (0, 13), (0, 17), (1, 9)]


def test_start_at_end_at_and_an_impossible_calendar_bound_the_times() -> None:
    s = ScheduleDefinition(
        input=None,
        intervals=[ScheduleInterval(every=timedelta(days=1))],
        start_at=at(2026, 12, 10),
        end_at=at(2026, 12, 12),
    )
    assert list(fire_times(s, at(2026, 12, 1))) == [at(2026, 12, 10), at(2026, 12, 11), at(2026, 12, 12)]
    never = ScheduleDefinition(
        input=None,
        calendars=[ScheduleCalendar(month=[ScheduleRange(start=2)], day_of_month=[ScheduleRange(start=30)])],
    )
    assert next_fire_times(never, at(2026, 1, 1), 1) == []


def test_jitter_is_the_same_for_every_worker_and_within_bounds() -> None:
    s = ScheduleDefinition(input=None, cron_expressions=["* * * * *"], jitter=timedelta(seconds=30))
    due = at(2026, 12, 8, 10, 1)
    late = jittered(s, due, "report")
    assert late == jittered(s, due, "report") and due <= late < due + timedelta(seconds=30)
    assert jittered(s, due, "other") != late


@pytest.mark.parametrize(
    ("kw", "field", "says"),
    [
        ({"cron_expressions": ["0 0 * *"]}, "cron_expressions", "is not a cron expression"),
        ({"cron_expressions": ["61 * * * *"]}, "cron_expressions", "is not a cron expression"),
        ({"time_zone_name": "Mars/Olympus"}, "time_zone_name", "is not an IANA time zone"),
        ({"start_at": at(2026, 2, 1), "end_at": at(2026, 1, 1)}, "", "is not after start_at"),
        ({"start_at": datetime(2026, 1, 1)}, "start_at", "timezone-aware"),
        ({"intervals": [{"every": timedelta(0)}]}, "intervals.0", "every must be from 1 second"),
        (
            {"intervals": [{"every": timedelta(hours=1), "offset": timedelta(hours=2)}]},
            "intervals.0",
            "offset",
        ),
        ({"calendars": [{"hour": [{"start": 24}]}]}, "calendars.0", "a hour is 0 to 23"),
        ({"max_executions": 0}, "max_executions", "from 1 to"),
        ({"schedule_id": "has space"}, "schedule_id", "is invalid"),
        ({"policy": {"catchup_window_seconds": 0}}, "policy.catchup_window_seconds", "from 1"),
    ],
)
def test_an_invalid_definition_is_refused_naming_the_field(kw: dict, field: str, says: str) -> None:
    with pytest.raises(ValidationError) as err:
        ScheduleDefinition(input=None, **kw)
    text = str(err.value)
    assert says in text and field in text


def test_a_schedule_whose_input_does_not_fit_the_workflow_is_refused_at_declaration() -> None:
    bad = ScheduleDefinition(input={"report_type": 3}, cron_expressions=["0 0 * * *"])
    with pytest.raises(WorkflowDefinitionError, match=r"schedules\[0\]\.input does not fit its entrypoint"):

        @workflows.workflow.define(name="badly_scheduled", schedules=[bad])
        class Bad:
            @workflows.workflow.entrypoint
            async def run(self, report_type: str) -> None: ...

    with pytest.raises(WorkflowDefinitionError, match=r"schedules\[0\] is a dict, not a ScheduleDefinition"):

        @workflows.workflow.define(name="badly_scheduled2", schedules=[{"cron_expressions": ["0 0 * * *"]}])
        class Bad2:
            @workflows.workflow.entrypoint
            async def run(self) -> None: ...


def test_the_policy_defaults_are_the_anchors() -> None:
    p = SchedulePolicy()
    assert (p.catchup_window, p.overlap, p.pause_on_failure) == (
        timedelta(days=365),
        ScheduleOverlapPolicy.SKIP,
        False,
    )
    assert [m.value for m in ScheduleOverlapPolicy] == [1, 2, 3, 4, 5, 6]


def test_a_calendar_years_ahead_and_one_that_recurs_every_28_years_are_found() -> None:
    far = ScheduleDefinition(input=None, calendars=[ScheduleCalendar(year=[ScheduleRange(start=2040)])])
    assert next_fire_times(far, at(2026, 1, 1), 1) == [at(2040, 1, 1)]
    leap_monday = ScheduleCalendar(
        month=[ScheduleRange(start=2)],
        day_of_month=[ScheduleRange(start=29)],
        day_of_week=[ScheduleRange(start=1)],
    )
    s = ScheduleDefinition(input=None, calendars=[leap_monday])
    assert next_fire_times(s, at(2026, 1, 1), 1) == [at(2044, 2, 29)]


def test_times_end_with_the_calendar_not_with_a_traceback() -> None:
    last_year = ScheduleDefinition(input=None, calendars=[ScheduleCalendar(year=[ScheduleRange(start=9999)])])
    assert next_fire_times(last_year, at(9999, 12, 30), 5) == [at(9999, 12, 31)]
    cron = ScheduleDefinition(input=None, cron_expressions=["0 0 * * *"])
    assert next_fire_times(cron, at(9999, 12, 30), 5) == [at(9999, 12, 31)]


def test_a_wildcard_cron_is_due_in_each_occurrence_of_a_repeated_hour_as_cron_runs_it() -> None:
    wild = ScheduleDefinition(
        input=None, cron_expressions=["*/30 1 * * *"], time_zone_name="America/New_York"
    )
    fixed = ScheduleDefinition(
        input=None, cron_expressions=["0,30 1 * * *"], time_zone_name="America/New_York"
    )
    night = at(2026, 11, 1, 4)  # 00:00 in New York, the night 01:00-02:00 comes twice
    assert len(list(fire_times(wild, night, until=at(2026, 11, 1, 8)))) == 4
    assert len(list(fire_times(fixed, night, until=at(2026, 11, 1, 8)))) == 2


def test_more_invalid_definitions_are_refused() -> None:
    with pytest.raises(ValidationError, match="hour is empty"):
        ScheduleCalendar(hour=[])
    with pytest.raises(ValidationError, match="offset must be whole seconds"):
        ScheduleInterval(every=timedelta(hours=1), offset=timedelta(minutes=5, milliseconds=500))
    with pytest.raises(ValidationError, match="6 fields"):
        ScheduleDefinition(input=None, cron_expressions=["*/10 * * * * *"])
    with pytest.raises(ValidationError, match="not a bool"):
        ScheduleDefinition(input=None, max_executions=True)
    s = ScheduleDefinition(input=None, cron_expressions=["0 0 * * *"])
    with pytest.raises(ValidationError, match="timezone-aware"):
        s.start_at = datetime(2026, 1, 1)
    one = ScheduleDefinition(input=None, cron_expressions=["0 0 * * *"], schedule_id="nightly")
    with pytest.raises(WorkflowDefinitionError, match="two schedules with schedule_id 'nightly'"):

        @workflows.workflow.define(name="twice_scheduled", schedules=[one, one])
        class Twice:
            @workflows.workflow.entrypoint
            async def run(self) -> None: ...
