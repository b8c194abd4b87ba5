"""Schedules that fire: created by the workers that declare them, each due time run
exactly once whatever the number of evaluators, every overlap policy, catch-up after
downtime, pause / unpause / trigger / delete / backfill, max_executions and
pause_on_failure, and mistakes refused whole. The evaluator takes a clock: these tests
move it, and never wait for wall-clock minutes."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from rillflow import Client, Worker
from rillflow.errors import InvalidInputError, WorkflowNotRegisteredError
from rillflow.models import (
    PartialScheduleDefinition,
    ScheduleCalendar,
    ScheduleDefinition,
    ScheduleInterval,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleRange,
)
from rillflow.schedules import (
    ScheduleAlreadyExistsError,
    ScheduleHandle,
    ScheduleNotFoundError,
    declare_schedules,
    evaluate,
    execution_id,
    ms,
    plan,
)
from tests import schedule_flows as sf
from tests import seed_examples
from tests.conftest import FAST, wait_until

pytestmark = pytest.mark.anyio

MINUTE = timedelta(minutes=1)


@pytest.fixture
def namespace_shards(shards: int) -> int:
    return shards


class Clock:
    """A clock the test moves. It starts at real time (Redis's clock, which a schedule's
    creation reads, is the same), so that a schedule created next has its first
    whole-minute due time at ``due(1)``, which one ``advance(MINUTE)`` crosses."""

    def __init__(self) -> None:
        if datetime.now(UTC).second >= 57:  # (a creation must not fall past the next minute)
            time.sleep(4)
        now = datetime.now(UTC)
        self.t = self.t0 = now.replace(microsecond=now.microsecond // 1000 * 1000)  # (what Redis keeps: ms)

    def __call__(self) -> datetime:
        return self.t

    def due(self, i: int) -> datetime:
        """The i-th whole minute (from 1) after the clock's start."""
        return self.t0.replace(second=0, microsecond=0) + MINUTE * i

    def advance(self, by: timedelta) -> None:
        self.t += by


def every(minutes: int = 1, **kw: Any) -> ScheduleDefinition:
    return ScheduleDefinition(
        input={"n": 1}, intervals=[ScheduleInterval(every=timedelta(minutes=minutes))], **kw
    )


def worker(client: Client, clock: Clock, **kw: Any) -> Worker:
    return Worker(client, workflows=sf.WORKFLOWS, schedule_clock=clock, **{**FAST, **kw})


async def handle(
    client: Client, clock: Clock, workflow: Any, schedule: ScheduleDefinition, sid: str
) -> ScheduleHandle:
    h = await client.create_schedule(workflow, schedule, schedule_id=sid)
    return ScheduleHandle(client, h.id, clock)


async def runs_of(client: Client, sid: str) -> list[Any]:
    page = await client.list_workflows(schedule_id=sid, page_size=1000)
    return sorted(page.executions, key=lambda e: e.execution_id)


async def count_runs(client: Client, sid: str, n: int, timeout: float = 15) -> list[Any]:
    async def enough() -> bool:
        return len(await runs_of(client, sid)) >= n

    await wait_until(enough, timeout=timeout)
    return await runs_of(client, sid)


async def settle(client: Client, sid: str, status: str = "completed", timeout: float = 15) -> None:
    async def all_closed() -> bool:
        return all(e.status == status for e in await runs_of(client, sid))

    await wait_until(all_closed, timeout=timeout)


async def test_the_pages_daily_midnight_schedule_is_created_by_its_worker_and_runs_at_midnight(
    client: Client,
) -> None:
    clock = Clock()
    midnight = (clock.t + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    clock.t = midnight - timedelta(seconds=30)
    wf = seed_examples.ScheduledReportWorkflow
    async with Worker(client, workflows=[wf], schedule_clock=clock, **FAST):
        sid = "scheduled_report_workflow-0"  # no schedule_id: the workflow's name and its place
        d = await ScheduleHandle(client, sid, clock).describe()
        assert (
            d.workflow_type == "scheduled_report_workflow"
            and d.origin == "declared:scheduled_report_workflow"
        )
        assert d.future_executions[:2] == [midnight, midnight + timedelta(days=1)]
        await asyncio.sleep(1.0)
        assert await runs_of(client, sid) == []  # not yet midnight by its clock
        clock.advance(timedelta(seconds=31))
        (run,) = await count_runs(client, sid, 1)
        assert run.execution_id == f"{sid}@{midnight:%Y%m%d}T000000Z"
        await settle(client, sid)
        events = await client.get_workflow_handle(run.execution_id).history()
        started = events[0].attributes
        assert started["input"] == {"report_type": "daily", "include_details": False}
        assert started["schedule_id"] == sid and started["scheduled_ms"] == ms(midnight)
    # a second worker start finds it as declared: not created twice, nothing changed
    async with Worker(client, workflows=[wf], schedule_clock=clock, **FAST):
        assert [s.schedule_id for s in await client.list_schedules()] == [sid]
        assert (await ScheduleHandle(client, sid, clock).describe()).runs_started == 1


async def test_runs_know_their_schedule_and_due_time_and_are_listed_by_schedule(client: Client) -> None:
    clock = Clock()
    async with worker(client, clock):
        await handle(client, clock, sf.Tick, every(), "ticks")
        due = clock.due(1)
        clock.advance(MINUTE)
        (run,) = await count_runs(client, "ticks", 1)
        out = await client.get_workflow_handle(run.execution_id).result(timeout=10)
        assert out == {
            "n": 1,
            "schedule_id": "ticks",
            "scheduled": due.isoformat(),
            "id": execution_id("ticks", due),
        }
        assert run.schedule_id == "ticks"
        assert await client.count_workflows(schedule_id="ticks") == 1
        assert await client.count_workflows(schedule_id="other") == 0


async def test_each_due_time_runs_once_with_three_workers_evaluating_at_once(client: Client) -> None:
    clock = Clock()
    workers = [worker(client, clock) for _ in range(3)]
    for w in workers:
        await w.__aenter__()
    try:
        await handle(
            client,
            clock,
            sf.Tick,
            every(policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.ALLOW_ALL)),
            "thrice",
        )
        for _ in range(10):
            clock.advance(MINUTE)
            await asyncio.sleep(0.2)
        runs = await count_runs(client, "thrice", 10)
        await asyncio.sleep(1.0)  # (time for a duplicate to show, if there were one)
        runs = await runs_of(client, "thrice")
        ids = [r.execution_id for r in runs]
        assert len(ids) == 10 and len(set(ids)) == 10
        assert ids == [execution_id("thrice", clock.due(i)) for i in range(1, 11)]
    finally:
        for w in workers:
            await w.__aexit__(None, None, None)


async def test_evaluators_racing_on_one_due_time_start_one_run(client: Client) -> None:
    clock = Clock()
    h = await handle(
        client, clock, sf.Tick, every(policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.ALLOW_ALL)), "race"
    )
    now = ms(clock.t + 5 * MINUTE)
    results = await asyncio.gather(*(evaluate(client, "race", now, 60_000) for _ in range(8)))
    assert sum(r.started for r in results) == 5  # five due times, each started by one of them
    d = await h.describe()
    assert d.runs_started == 5 and len({r.execution_id for r in d.recent_executions}) == 5


def _slow_policy(p: ScheduleOverlapPolicy) -> ScheduleDefinition:
    return every(policy=SchedulePolicy(overlap=p))


async def _finish(client: Client, wid: str) -> None:
    await client.get_workflow_handle(wid).signal("finish")


async def _statuses(client: Client, sid: str) -> dict[str, str]:
    return {r.execution_id: r.status for r in await runs_of(client, sid)}


async def test_overlap_skip_records_why(client: Client) -> None:
    clock = Clock()
    async with worker(client, clock):
        h = await handle(client, clock, sf.Slow, _slow_policy(ScheduleOverlapPolicy.SKIP), "skip")
        first = execution_id("skip", clock.due(1))
        clock.advance(MINUTE)
        await count_runs(client, "skip", 1)
        clock.advance(2 * MINUTE)
        await wait_until(lambda: _skipped(h, 2))
        d = await h.describe()
        assert [s.why for s in d.skipped] == [f"overlap: {first} is still running (SKIP)"] * 2
        assert list(await _statuses(client, "skip")) == [first]
        await _finish(client, first)
        clock.advance(MINUTE)
        runs = await count_runs(client, "skip", 2)
        assert runs[1].execution_id == execution_id("skip", clock.due(4))


async def _skipped(h: ScheduleHandle, n: int) -> bool:
    return (await h.describe()).times_skipped >= n


async def test_overlap_buffer_one_keeps_one_waiting(client: Client) -> None:
    clock = Clock()
    async with worker(client, clock):
        h = await handle(client, clock, sf.Slow, _slow_policy(ScheduleOverlapPolicy.BUFFER_ONE), "b1")
        t1, t2 = clock.due(1), clock.due(2)
        clock.advance(MINUTE)
        await count_runs(client, "b1", 1)
        clock.advance(MINUTE)
        await wait_until(lambda: _waiting(h, [t2]))
        clock.advance(MINUTE)
        await wait_until(lambda: _skipped(h, 1))
        assert (await h.describe()).skipped[0].why == "overlap: a due time already waits (BUFFER_ONE)"
        await _finish(client, execution_id("b1", t1))
        runs = await count_runs(client, "b1", 2)
        assert [r.execution_id for r in runs] == [execution_id("b1", t1), execution_id("b1", t2)]
        assert (await h.describe()).waiting == []


async def _waiting(h: ScheduleHandle, times: list[datetime]) -> bool:
    return (await h.describe()).waiting == times


async def test_overlap_buffer_all_runs_each_in_turn(client: Client) -> None:
    clock = Clock()
    async with worker(client, clock):
        h = await handle(client, clock, sf.Slow, _slow_policy(ScheduleOverlapPolicy.BUFFER_ALL), "ball")
        times = [clock.due(i) for i in range(1, 4)]
        clock.advance(MINUTE)
        await count_runs(client, "ball", 1)
        clock.advance(2 * MINUTE)
        await wait_until(lambda: _waiting(h, times[1:]))
        for i, t in enumerate(times):
            await wait_until(lambda i=i: _open_is(h, [execution_id("ball", times[i])]))
            await _finish(client, execution_id("ball", t))
        await count_runs(client, "ball", 3)
        await settle(client, "ball")
        assert (await h.describe()).times_skipped == 0


async def _open_is(h: ScheduleHandle, wids: list[str]) -> bool:
    return (await h.describe()).open_executions == wids


async def test_overlap_cancel_other_cancels_then_starts(client: Client) -> None:
    clock = Clock()
    async with worker(client, clock):
        h = await handle(client, clock, sf.Slow, _slow_policy(ScheduleOverlapPolicy.CANCEL_OTHER), "cancel")
        t1, t2 = clock.due(1), clock.due(2)
        clock.advance(MINUTE)
        await count_runs(client, "cancel", 1)
        clock.advance(MINUTE)
        runs = await count_runs(client, "cancel", 2)
        assert [r.execution_id for r in runs] == [execution_id("cancel", t1), execution_id("cancel", t2)]
        assert (await _statuses(client, "cancel"))[execution_id("cancel", t1)] == "canceled"
        kinds = [e["k"] for e in (await h.describe()).log]
        assert kinds.index("started") < kinds.index("cancel_requested")  # newest first
        await _finish(client, execution_id("cancel", t2))


async def test_overlap_terminate_other_terminates_and_starts_at_once(client: Client) -> None:
    clock = Clock()
    async with worker(client, clock):
        await handle(client, clock, sf.Slow, _slow_policy(ScheduleOverlapPolicy.TERMINATE_OTHER), "term")
        t1, t2 = clock.due(1), clock.due(2)
        clock.advance(MINUTE)
        await count_runs(client, "term", 1)
        clock.advance(MINUTE)
        await count_runs(client, "term", 2)
        st = await _statuses(client, "term")
        assert st == {execution_id("term", t1): "terminated", execution_id("term", t2): "running"}
        await _finish(client, execution_id("term", t2))


async def test_overlap_allow_all_runs_side_by_side(client: Client) -> None:
    clock = Clock()
    async with worker(client, clock):
        h = await handle(client, clock, sf.Slow, _slow_policy(ScheduleOverlapPolicy.ALLOW_ALL), "all")
        clock.advance(3 * MINUTE)
        runs = await count_runs(client, "all", 3)
        assert {r.status for r in runs} == {"running"}
        assert len((await h.describe()).open_executions) == 3
        for r in runs:
            await _finish(client, r.execution_id)
        await settle(client, "all")
        await wait_until(lambda: _open_is(h, []))


async def test_catch_up_after_workers_were_stopped_runs_the_window_and_skips_the_rest(client: Client) -> None:
    clock = Clock()
    policy = SchedulePolicy(overlap=ScheduleOverlapPolicy.ALLOW_ALL, catchup_window_seconds=3 * 60)
    h = await handle(client, clock, sf.Tick, every(policy=policy), "catchup")
    clock.advance(10 * MINUTE)  # no worker was running meanwhile: ten due times passed
    async with worker(client, clock):
        await count_runs(client, "catchup", 3)
        await settle(client, "catchup")
        ids = [r.execution_id for r in await runs_of(client, "catchup")]
        assert ids == [execution_id("catchup", clock.due(i)) for i in (8, 9, 10)]
        d = await h.describe()
        (missed,) = [s for s in d.skipped if s.until is not None]
        assert missed.why == "missed: outside the catch-up window" and missed.count == 7
        assert missed.until == clock.t - 3 * MINUTE
        clock.advance(MINUTE)  # and on it goes
        assert (await count_runs(client, "catchup", 4))[-1].execution_id == execution_id(
            "catchup", clock.due(11)
        )


async def test_pause_unpause_trigger_backfill_delete(client: Client) -> None:
    clock = Clock()
    async with worker(client, clock):
        policy = SchedulePolicy(overlap=ScheduleOverlapPolicy.ALLOW_ALL)
        h = await handle(client, clock, sf.Tick, every(policy=policy), "ops")
        await h.pause("maintenance")
        d = await h.describe()
        assert d.paused and d.note == "maintenance" and d.future_executions == []
        clock.advance(3 * MINUTE)
        await asyncio.sleep(1.0)
        assert await runs_of(client, "ops") == []  # paused: nothing ran
        # a trigger runs now, paused or not
        run = await h.trigger()
        assert run is not None and run.id == execution_id("ops", clock.t)
        assert (await run.result(timeout=10))["scheduled"] == clock.t.isoformat()
        await h.unpause()
        d = await h.describe()
        assert not d.paused and d.skipped[0].why == "while paused" and d.skipped[0].until == clock.t
        clock.advance(MINUTE)
        await count_runs(client, "ops", 2)
        # a backfill runs the past due times that have not run, once (again: none)
        start = clock.due(1) - 10 * MINUTE
        res = await h.backfill(start, start + 2 * MINUTE)
        assert (res.started, res.skipped) == (3, 0)
        again = await h.backfill(start, start + 2 * MINUTE)
        assert (again.started, again.skipped) == (0, 3)
        assert "already ran" in (await h.describe()).skipped[0].why
        runs = await count_runs(client, "ops", 5)
        assert Counter(r.execution_id for r in runs).most_common(1)[0][1] == 1
        await settle(client, "ops")
        await h.delete()
        with pytest.raises(ScheduleNotFoundError, match="no schedule 'ops'"):
            await h.describe()
        clock.advance(MINUTE)
        await asyncio.sleep(1.0)
        assert len(await runs_of(client, "ops")) == 5  # deleted: no more; its runs stay


async def test_max_executions_stops_the_schedule(client: Client) -> None:
    clock = Clock()
    async with worker(client, clock):
        h = await handle(client, clock, sf.Tick, every(max_executions=2), "twice")
        for _ in range(4):
            clock.advance(MINUTE)
            await asyncio.sleep(0.4)
        await settle(client, "twice")
        await asyncio.sleep(0.5)
        assert len(await runs_of(client, "twice")) == 2
        d = await h.describe()
        assert d.remaining_executions == 0 and d.future_executions == []


async def test_pause_on_failure_pauses_after_a_failed_run(client: Client) -> None:
    clock = Clock()
    async with worker(client, clock):
        h = await handle(
            client, clock, sf.Fails, every(policy=SchedulePolicy(pause_on_failure=True)), "fragile"
        )
        clock.advance(MINUTE)
        await count_runs(client, "fragile", 1)
        await wait_until(lambda: _paused(h))
        (run,) = await runs_of(client, "fragile")
        assert run.status == "failed"
        assert (await h.describe()).note == f"paused: {run.execution_id} failed (pause_on_failure)"
        clock.advance(3 * MINUTE)
        await asyncio.sleep(1.0)
        assert len(await runs_of(client, "fragile")) == 1


async def _paused(h: ScheduleHandle) -> bool:
    return (await h.describe()).paused


async def test_update_keeps_what_the_schedule_did_and_changes_when_it_runs(client: Client) -> None:
    clock = Clock()
    async with worker(client, clock):
        h = await handle(client, clock, sf.Tick, every(), "upd")
        clock.advance(MINUTE)
        await count_runs(client, "upd", 1)
        await h.update(intervals=[ScheduleInterval(every=timedelta(minutes=10))])
        d = await h.describe()
        assert d.runs_started == 1 and d.future_executions[0].minute % 10 == 0
        await h.update(every(5))
        assert (await h.describe()).definition.intervals[0].every == timedelta(minutes=5)
        await h.update(PartialScheduleDefinition(max_executions=3, jitter=timedelta(seconds=5)))
        d = await h.describe()
        assert (d.definition.max_executions, d.definition.jitter, d.remaining_executions) == (
            3,
            timedelta(seconds=5),
            3,
        )
        assert d.definition.intervals[0].every == timedelta(minutes=5)  # (not given: kept)
        with pytest.raises(InvalidInputError, match="no field cron_expresions"):
            await h.update(cron_expresions=["* * * * *"])
        with pytest.raises(InvalidInputError, match="id does not change"):
            await h.update(schedule_id="other")


async def test_a_changed_declaration_updates_its_schedule_and_a_removed_one_goes(client: Client) -> None:
    from rillflow import workflow

    def declared(*schedules: ScheduleDefinition) -> type:
        @workflow.define(name="sched_declared", schedules=list(schedules))
        class Declared:
            @workflow.entrypoint
            async def run(self, n: int = 0) -> None:
                pass

        return Declared

    clock = Clock()
    async with Worker(
        client, workflows=[declared(every(), every(5, schedule_id="five"))], schedule_clock=clock, **FAST
    ):
        assert [s.schedule_id for s in await client.list_schedules()] == ["five", "sched_declared-0"]
    async with Worker(client, workflows=[declared(every(2))], schedule_clock=clock, **FAST):
        (only,) = await client.list_schedules()
        assert only.schedule_id == "sched_declared-0"
        d = await ScheduleHandle(client, only.schedule_id, clock).describe()
        assert d.definition.intervals[0].every == timedelta(minutes=2)


async def test_mistakes_are_refused_naming_what_is_wrong(client: Client) -> None:
    with pytest.raises(InvalidInputError, match="n"):
        await client.create_schedule(
            sf.Tick,
            ScheduleDefinition(input={"n": "many"}, cron_expressions=["* * * * *"]),
            schedule_id="bad",
        )
    with pytest.raises(WorkflowNotRegisteredError, match="no_such_workflow"):
        await client.create_schedule("no_such_workflow", every(), schedule_id="bad")
    with pytest.raises(InvalidInputError, match="schedule_id"):
        await client.create_schedule(sf.Tick, every())  # no id: none to derive from
    with pytest.raises(InvalidInputError, match="ScheduleDefinition"):
        await client.create_schedule(sf.Tick, {"cron_expressions": ["* * * * *"]}, schedule_id="bad")  # type: ignore[arg-type]
    await client.create_schedule(sf.Tick, every(), schedule_id="taken")
    with pytest.raises(ScheduleAlreadyExistsError, match="taken"):
        await client.create_schedule(sf.Tick, every(), schedule_id="taken")
    with pytest.raises(InvalidInputError, match="schedule taken runs workflow sched_tick, not sched_slow"):
        await declare_schedules(client, [_declaring("sched_slow", "taken")], "default", 0)
    h = client.get_schedule_handle("taken")
    with pytest.raises(InvalidInputError, match="time_zone_name"):
        await h.update(time_zone_name="Mars/Olympus")
    with pytest.raises(InvalidInputError, match="end_at"):
        await h.update(start_at=datetime(2030, 1, 2, tzinfo=UTC), end_at=datetime(2030, 1, 1, tzinfo=UTC))
    with pytest.raises(InvalidInputError, match="overlap"):
        await h.trigger(overlap=9)  # type: ignore[arg-type]
    with pytest.raises(ScheduleNotFoundError):
        await client.get_schedule_handle("missing").pause()
    with pytest.raises(InvalidInputError, match="schedule_id"):
        client.get_schedule_handle("has space")
    # nothing above changed what is stored
    (s,) = await client.list_schedules()
    d = await h.describe()
    assert s.schedule_id == "taken" and d.definition == every().model_copy(update={"schedule_id": "taken"})


def _declaring(name: str, sid: str) -> Any:
    from rillflow import workflow
    from rillflow.workflow import get_workflow_definition

    @workflow.define(name=name, schedules=[every(schedule_id=sid)])
    class Declaring:
        @workflow.entrypoint
        async def run(self, n: int = 0) -> None:
            pass

    return get_workflow_definition(Declaring)


def test_plan_counts_what_the_catch_up_window_leaves_and_caps_a_round() -> None:
    d = every()
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    p = plan(d, "p", ms(t0), ms(t0 + timedelta(days=1)), 3600_000, None)
    assert p.skip_to_ms == ms(t0 + timedelta(hours=23)) and p.skip_count == 23 * 60
    assert len(p.fires) == 60 and p.fires[0][:2] == (ms(t0 + timedelta(hours=23, minutes=1)),) * 2
    assert p.next_score == ms(t0 + timedelta(days=1, minutes=1))
    big = plan(d, "p", ms(t0), ms(t0 + timedelta(days=1)), 86400_000, None)
    assert len(big.fires) == 100 and big.next_score == 0  # more due: looked at again at once
    assert len(plan(d, "p", ms(t0), ms(t0 + timedelta(days=1)), 86400_000, 2).fires) == 2
    cal = ScheduleDefinition(input=None, calendars=[ScheduleCalendar(hour=[ScheduleRange(start=9)])])
    (fire,) = plan(cal, "p", ms(t0), ms(t0 + timedelta(hours=9)), 3600_000, None).fires
    assert fire == (ms(t0.replace(hour=9)), ms(t0.replace(hour=9)), "p@20300101T090000Z")
    assert execution_id("p", t0 + timedelta(milliseconds=250)) == "p@20300101T000000.250Z"


def test_an_id_shares_the_shard_of_its_part_before_the_first_at() -> None:
    from rillflow_runtime.keyspace import shard_of

    for sid in ("report", "daily-sales", "x.1"):
        runs = [execution_id(sid, datetime(2030, 1, 1, h, tzinfo=UTC)) for h in range(24)]
        assert {shard_of(r, 16) for r in runs} == {shard_of(sid, 16)}
    assert shard_of("a@b@c", 16) == shard_of("a", 16)
    assert len({shard_of(f"order-{i}", 16) for i in range(200)}) == 16  # (ids without one: as before)


async def test_a_close_the_evaluator_did_not_see_is_not_a_lost_wake_up(client: Client) -> None:
    """An evaluation that read the schedule just before one of its runs closed must not
    push the schedule's next look past the due time waiting for that close."""
    clock = Clock()
    policy = SchedulePolicy(overlap=ScheduleOverlapPolicy.BUFFER_ONE)
    h = await handle(client, clock, sf.Slow, every(policy=policy), "wake")
    ks, shard = client.keyspace, client.keyspace.shard("wake")
    await evaluate(client, "wake", ms(clock.due(2)), 60_000)  # the first runs, the second waits
    d = await h.describe()
    assert len(d.open_executions) == 1 and d.waiting == [clock.due(2)]
    await client.get_workflow_handle(d.open_executions[0]).terminate("done")  # wakes it: score 0
    assert await client.redis.zscore(ks.schedules(shard, "due"), "wake") == 0
    # a stale evaluation: it read neither the close nor the waiting one, and would look next in a day
    digest, ver = (
        v.decode() for v in await client.redis.hmget(ks.schedule(shard, "wake"), ["digest", "ver"])
    )
    res = await client.protocol.schedule_fire(
        "wake", digest, ms(clock.due(2)), "tick", version=ver, task_queue="default", retention_ms=60_000,
        next_score=ms(clock.due(2) + timedelta(days=1)),
    )  # fmt: skip
    assert res.started == 0
    assert await client.redis.zscore(ks.schedules(shard, "due"), "wake") == 0  # still looked at now
    await evaluate(client, "wake", ms(clock.due(2)), 60_000)
    assert (await h.describe()).open_executions == [execution_id("wake", clock.due(2))]


# -- what a review found ----------------------------------------------------------------------
async def test_an_evaluation_made_while_paused_does_not_park_the_schedule_after_an_unpause(
    client: Client,
) -> None:
    from rillflow.schedules import Plan, _fire, _read

    clock = Clock()
    h = await handle(client, clock, sf.Tick, every(), "parked")
    await h.pause()
    st = await _read(client, "parked")  # an evaluator reads it paused ...
    assert st is not None and st.paused
    await h.unpause()  # ... a client unpauses ...
    res = await _fire(client, st, "parked", ms(clock.t), "tick", [], 60_000, Plan([], -1), None)
    assert res.reply.value == "stale"  # ... and its call, made on the paused state, is refused
    await evaluate(client, "parked", ms(clock.t), 60_000)
    (s,) = await client.list_schedules()
    assert s.next_due == clock.due(1)  # looked at again at the next due time, not never


async def test_jitter_longer_than_the_catch_up_window_drops_nothing(client: Client) -> None:
    clock = Clock()
    policy = SchedulePolicy(overlap=ScheduleOverlapPolicy.ALLOW_ALL, catchup_window_seconds=60)
    h = await handle(client, clock, sf.Tick, every(jitter=timedelta(minutes=5), policy=policy), "jit")
    for _ in range(60):  # an evaluator that is always on time, every 10 s for 10 minutes
        clock.advance(timedelta(seconds=10))
        await evaluate(client, "jit", ms(clock.t), 60_000)
    d = await h.describe()
    assert d.times_skipped == 0 and d.runs_started >= 1


async def test_a_change_applies_from_now_not_to_the_past(client: Client) -> None:
    clock = Clock()
    h = await handle(
        client,
        clock,
        sf.Tick,
        every(60 * 24, policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.ALLOW_ALL)),
        "daily",
    )
    clock.advance(timedelta(hours=15))
    await h.update(every(60))  # daily -> hourly, 15 hours in: none of the 15 past hours runs
    await evaluate(client, "daily", ms(clock.t), 60_000)
    d = await h.describe()
    assert d.runs_started == 0 and d.future_executions[0] > clock.t
    # a limit reached and raised later does not run what came due meanwhile either
    two = await handle(
        client,
        clock,
        sf.Tick,
        every(max_executions=2, policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.ALLOW_ALL)),
        "two",
    )
    clock.advance(3 * MINUTE)
    await evaluate(client, "two", ms(clock.t), 60_000)
    clock.advance(timedelta(hours=2))
    await two.update(max_executions=5)
    await evaluate(client, "two", ms(clock.t), 60_000)
    assert (await two.describe()).runs_started == 2


async def test_what_describe_returns_is_the_callers_to_change(client: Client) -> None:
    clock = Clock()
    h = await handle(
        client,
        clock,
        sf.Tick,
        every(60, policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.ALLOW_ALL)),
        "hourly",
    )
    d = await h.describe()
    d.definition.intervals.append(ScheduleInterval(every=MINUTE))  # (a caller's own copy)
    clock.advance(10 * MINUTE)
    await evaluate(client, "hourly", ms(clock.t), 60_000)
    assert (await h.describe()).definition.intervals == [ScheduleInterval(every=timedelta(hours=1))]
    assert (await h.describe()).runs_started <= 1


async def test_a_start_may_not_take_a_schedules_due_time_but_may_use_an_at(client: Client) -> None:
    with pytest.raises(InvalidInputError, match="not the shape of a schedule's run"):
        await client.start_workflow(sf.Tick, {"n": 1}, execution_id="ticks@20300101T000000Z")
    with pytest.raises(InvalidInputError, match="not the shape of a schedule's run"):
        await client.start_workflow(sf.Tick, {"n": 1}, execution_id="ticks@20300101T000000.250Z")
    # an '@' elsewhere is an id like any other (its part before the '@' picks the shard)
    h = await client.start_workflow(sf.Tick, {"n": 1}, execution_id="onboard-alice@example.com")
    assert h.id == "onboard-alice@example.com"
    h2 = await client.start_workflow(sf.Tick, {"n": 1}, execution_id="ticks@20300101T000000Z-leaf")
    assert h2.id.endswith("-leaf")


async def test_a_trigger_answers_for_its_own_due_time(client: Client) -> None:
    clock = Clock()
    h = await handle(client, clock, sf.Slow, _slow_policy(ScheduleOverlapPolicy.BUFFER_ONE), "own")
    await evaluate(client, "own", ms(clock.due(2)), 60_000)  # due(1) runs, due(2) waits
    first = execution_id("own", clock.due(1))
    await client.get_workflow_handle(first).terminate("done")  # (unseen by the trigger's read)
    clock.t = clock.due(2) + timedelta(seconds=5)
    run = await h.trigger()  # due(2) starts first in the same call; the trigger's own time waits
    d = await h.describe()
    assert run is None and d.open_executions == [execution_id("own", clock.due(2))]
    assert d.waiting == [clock.t]


async def test_a_catch_up_window_shorter_than_the_interval_logs_no_empty_skips(client: Client) -> None:
    clock = Clock()
    policy = SchedulePolicy(catchup_window_seconds=60, overlap=ScheduleOverlapPolicy.ALLOW_ALL)
    h = await handle(client, clock, sf.Tick, every(60, policy=policy), "sparse")
    first = clock.t.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    for k in range(3):  # an evaluator on time at each hour: its cursor is always over a minute old
        clock.t = first + timedelta(hours=k, seconds=5)
        await evaluate(client, "sparse", ms(clock.t), 60_000)
    d = await h.describe()
    assert d.skipped == [] and d.runs_started == 3


async def test_a_schedule_made_from_the_class_changes_before_any_worker_registered_it(client: Client) -> None:
    clock = Clock()
    h = await handle(client, clock, sf.Tick, every(), "early")
    await h.update(input={"n": 7})
    assert (await h.describe()).definition.input == {"n": 7}


async def test_a_run_that_continues_as_new_stays_its_schedules(client: Client) -> None:
    clock = Clock()
    async with worker(client, clock):
        await handle(client, clock, sf.Hop, every(), "hop")
        clock.advance(MINUTE)
        (run,) = await count_runs(client, "hop", 1)
        out = await client.get_workflow_handle(run.execution_id).result(timeout=10)
        assert out == {"schedule_id": "hop", "scheduled": clock.due(1).isoformat()}


def test_crons_named_like_daily_are_their_five_fields() -> None:
    from rillflow.schedule_times import next_fire_times

    t0 = datetime(2030, 1, 1, 12, 30, tzinfo=UTC)
    for name, first in (
        ("@daily", datetime(2030, 1, 2, tzinfo=UTC)),
        ("@hourly", datetime(2030, 1, 1, 13, tzinfo=UTC)),
        ("@weekly", datetime(2030, 1, 6, tzinfo=UTC)),  # a Sunday
        ("@monthly", datetime(2030, 2, 1, tzinfo=UTC)),
        ("@yearly", datetime(2031, 1, 1, tzinfo=UTC)),
    ):
        assert next_fire_times(ScheduleDefinition(input=None, cron_expressions=[name]), t0, 1) == [first]
    with pytest.raises(ValueError, match="one of @yearly"):
        ScheduleDefinition(input=None, cron_expressions=["@sometimes"])


async def test_a_change_after_more_than_one_rounds_worth_of_due_times_loses_none(client: Client) -> None:
    clock = Clock()
    policy = SchedulePolicy(overlap=ScheduleOverlapPolicy.ALLOW_ALL, catchup_window_seconds=86_400)
    h = await handle(client, clock, sf.Tick, every(policy=policy), "many")
    clock.advance(timedelta(minutes=250))  # 250 due times, over two rounds' worth
    await h.update(input={"n": 2})
    d = await h.describe()
    assert d.runs_started == 250 and d.times_skipped == 0


async def test_a_change_before_a_jittered_start_records_what_it_replaced(client: Client) -> None:
    clock = Clock()
    h = await handle(client, clock, sf.Tick, every(60, jitter=timedelta(minutes=59)), "jittery")
    first = clock.t.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    from rillflow.schedule_times import jittered

    start = jittered((await h.describe()).definition, first, "jittery", first + timedelta(hours=1))
    if start - first < timedelta(seconds=2):
        pytest.skip("(this schedule's first start falls too close to its due time to change between them)")
    clock.t = first + (start - first) / 2  # due, not yet started
    await h.update(input={"n": 3})
    d = await h.describe()
    assert d.runs_started == 0 and d.times_skipped == 1
    assert d.skipped[0].why.startswith("replaced: the definition changed before their start")


async def test_two_concurrent_changes_do_not_overwrite_each_other_unseen(client: Client) -> None:
    from rillflow.schedules import _read, record_for

    clock = Clock()
    h = await handle(client, clock, sf.Tick, every(), "both")
    st = await _read(client, "both")
    assert st is not None
    await h.update(max_executions=9)  # another change lands first
    rec = await record_for(client, sf.Tick, every(5), schedule_id="both", task_queue=None, origin="client")
    res = await client.protocol.schedule_put(rec, "update", ms(clock.t), expected_version=st.version)
    assert res.reply.value == "stale"  # made on the state before it: refused, not applied over it
    assert (await h.describe()).definition.max_executions == 9


async def test_an_update_while_paused_keeps_the_paused_count(client: Client) -> None:
    clock = Clock()
    h = await handle(client, clock, sf.Tick, every(), "pz")
    await h.pause()
    clock.advance(30 * MINUTE)
    await h.update(input={"n": 4})
    clock.advance(30 * MINUTE)
    await h.unpause()
    assert (await h.describe()).times_skipped == 60


def test_limits_and_misspelt_fields_are_refused() -> None:
    from rillflow.models import MAX_EXECUTIONS

    with pytest.raises(ValueError, match="max_executions must be from 1"):
        every(max_executions=MAX_EXECUTIONS + 1)
    with pytest.raises(ValueError, match="catchup_window"):
        SchedulePolicy(catchup_window=60)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="cron_expression"):
        ScheduleDefinition(input=None, cron_expression=["* * * * *"])  # type: ignore[call-arg]


async def test_a_large_max_executions_stays_a_whole_number(client: Client) -> None:
    clock = Clock()
    policy = SchedulePolicy(overlap=ScheduleOverlapPolicy.ALLOW_ALL)
    h = await handle(client, clock, sf.Tick, every(max_executions=10**15, policy=policy), "big")
    clock.advance(MINUTE)
    await evaluate(client, "big", ms(clock.t), 60_000)
    assert (await h.describe()).remaining_executions == 10**15 - 1
