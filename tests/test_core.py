"""Workflows and activities end to end, in-process workers over a real server."""

from __future__ import annotations

import asyncio
import itertools
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import rillflow as workflows
from rillflow import Client, Worker
from tests import flows
from tests.conftest import FAST, wait_until

pytestmark = pytest.mark.anyio

ALL_WF = [
    flows.HelloWorkflow,
    flows.ModelWorkflow,
    flows.FlakyWorkflow,
    flows.CatchingWorkflow,
    flows.RefusingWorkflow,
    flows.TimeoutsWorkflow,
    flows.TimerWorkflow,
    flows.SequentialWorkflow,
    flows.DeterministicHelpers,
    flows.FailingWorkflow,
    flows.BuggyWorkflow,
    flows.ConditionWorkflow,
    flows.LongSleep,
    flows.WaitForRace,
    flows.ManyWorkflow,
]
ALL_ACT = [
    flows.hello,
    flows.hello_sync,
    flows.flaky,
    flows.refuses,
    flows.sleeps,
    flows.never_in_time,
    flows.beats,
    flows.beats_then_fails,
    flows.sleeps_always,
    flows.step,
    flows.whoami,
]


def worker(client: Client, **kw: object) -> Worker:
    return Worker(client, workflows=ALL_WF, activities=ALL_ACT, **{**FAST, **kw})  # type: ignore[arg-type]


def types(events: list[workflows.HistoryEvent]) -> list[str]:
    return [e.type for e in events]


@pytest.mark.parametrize("namespace_shards", [1, 4], ids=["shards1", "shards4"])
async def test_happy_path(client: Client, namespace_shards: int) -> None:
    async with worker(client):
        handles = [
            await client.start_workflow(flows.HelloWorkflow, {"name": f"w{i}", "times": 3}) for i in range(8)
        ]
        results = [await h.result(timeout=10) for h in handles]
    assert results[0] == ["hello w0", "hello w01", "hello w02", "hi w0 from a thread"]
    assert {len(r) for r in results} == {4}
    assert client.keyspace.shards == namespace_shards
    h = handles[0]
    events = await h.history()
    assert [e.event_id for e in events] == list(range(1, len(events) + 1))
    assert types(events)[0] == "WorkflowExecutionStarted"
    assert types(events)[-1] == "WorkflowExecutionCompleted"
    assert types(events).count("ActivityTaskScheduled") == 4
    d = await h.describe()
    assert (d.status, d.workflow_type, d.task_queue, d.pending_activities) == (
        "completed",
        "hello_workflow",
        "default",
        [],
    )
    assert d.close_time is not None and d.close_time >= d.start_time


async def test_model_in_model_out_and_execute_workflow(client: Client) -> None:
    async with worker(client):
        res = await client.execute_workflow(
            flows.ModelWorkflow, flows.Params(report_type="daily", include_details=True)
        )
        assert res == flows.Report(title="DAILY", lines=10)
        # the same run by name: plain data back, the model's fields at the top level
        assert await client.execute_workflow("model_workflow", {"report_type": "weekly"}) == {
            "title": "WEEKLY",
            "lines": 1,
        }


async def test_retries_back_off_exponentially(client: Client) -> None:
    async with worker(client):
        h = await client.start_workflow(flows.FlakyWorkflow, {"succeed_on": 4})
        assert await h.result(timeout=10) == 4
    events = await h.history()
    retrying = [e for e in events if e.type == "ActivityTaskRetrying"]
    assert [e.attributes["att"] for e in retrying] == [1, 2, 3]
    assert all(e.attributes["failure"]["type"] == "ConnectionError" for e in retrying)
    done = next(e for e in events if e.type == "ActivityTaskCompleted")
    # initial 100 ms, coefficient 2: attempt k+1 starts 100·2^(k-1) ms after attempt k fails
    stamps = [e.time_ms for e in retrying] + [done.time_ms]
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    for gap, want in zip(gaps, [100, 200, 400], strict=True):
        assert want <= gap < want + 250, gaps


async def test_retries_exhausted_raise_activity_error_with_cause(client: Client) -> None:
    async with worker(client):
        res = await client.execute_workflow(flows.CatchingWorkflow, {"succeed_on": 99})
    assert res == {
        "activity": "flaky",
        "attempt": 5,
        "type": "ConnectionError",
        "message": "attempt 5 failed",
        "remote_stack": True,
    }


async def test_non_retryable_error_stops_retrying_and_fails_the_run(client: Client) -> None:
    async with worker(client):
        h = await client.start_workflow(flows.RefusingWorkflow, {"reason": "no"})
        with pytest.raises(workflows.WorkflowFailureError) as ei:
            await h.result(timeout=10)
    assert ei.value.status == "failed"
    assert ei.value.cause.type == "ActivityError"
    assert "refused: no" in str(ei.value)
    events = await h.history()
    assert "ActivityTaskRetrying" not in types(events)
    failed = next(e for e in events if e.type == "ActivityTaskFailed")
    assert failed.attributes["att"] == 1 and failed.attributes["failure"]["type"] == "Refused"
    assert types(events)[-1] == "WorkflowExecutionFailed"


async def test_start_to_close_timeout_retries_then_succeeds(client: Client) -> None:
    async with worker(client):
        res = await client.execute_workflow(flows.TimeoutsWorkflow, {"which": "start_to_close"})
        assert res == "attempt 2"
        h = await client.start_workflow(flows.TimeoutsWorkflow, {"which": "start_to_close_exhausted"})
        with pytest.raises(workflows.WorkflowFailureError) as ei:
            await h.result(timeout=10)
    assert "timed out after 2 attempt(s)" in str(ei.value) or "start_to_close" in str(ei.value)
    ev = await h.history()
    assert types(ev).count("ActivityTaskRetrying") == 1


async def test_schedule_to_close_timeout_is_final(client: Client) -> None:
    async with worker(client):
        h = await client.start_workflow(flows.TimeoutsWorkflow, {"which": "schedule_to_close"})
        with pytest.raises(workflows.WorkflowFailureError) as ei:
            await h.result(timeout=10)
    assert "schedule_to_close" in str(ei.value.cause)
    ev = await h.history()
    timed_out = next(e for e in ev if e.type == "ActivityTaskTimedOut")
    assert timed_out.attributes["failure"]["timeout_type"] == "schedule_to_close"
    sched = next(e for e in ev if e.type == "ActivityTaskScheduled")
    assert 800 <= timed_out.time_ms - sched.time_ms < 1500


async def test_heartbeat_timeout_and_details_reach_next_attempt(client: Client) -> None:
    async with worker(client):
        res = await client.execute_workflow(flows.TimeoutsWorkflow, {"which": "heartbeat"})
        assert res == {"attempt": 2, "resumed_from": 3}
        h = await client.start_workflow(flows.TimeoutsWorkflow, {"which": "heartbeat_details"})
        assert await h.result(timeout=10) == {"attempt": 2, "details": [{"done": 5}]}
    ev = await client.get_workflow_handle(h.id).history()
    assert (
        "crashed half way"
        in next(e for e in ev if e.type == "ActivityTaskRetrying").attributes["failure"]["message"]
    )


async def test_timer_and_deterministic_helpers(client: Client) -> None:
    async with worker(client):
        th = await client.start_workflow(flows.TimerWorkflow, {"seconds": 0.3})
        elapsed = await th.result(timeout=10)
        assert 0.3 <= elapsed < 1.5
        timer_events = [t for t in types(await th.history()) if t.startswith("Timer")]
        assert timer_events == ["TimerStarted", "TimerFired"] * 2  # workflow.sleep and asyncio.sleep
        h = await client.start_workflow(flows.DeterministicHelpers, execution_id="helpers-1")
        res = await h.result(timeout=10)
    assert res["id"] == "helpers-1" and res["activity_sees"] == "helpers-1"
    assert res["info_type"] == "deterministic_helpers"
    ev = await h.history()
    # a fresh worker replays the same history and draws the same random values
    from rillflow.executor import WorkflowInfo, WorkflowInstance, run_task
    from rillflow.workflow import get_workflow_definition

    info = WorkflowInfo("helpers-1", h.run_id or "", "deterministic_helpers", "default", ev[0].time)
    inst = WorkflowInstance(get_workflow_definition(flows.DeterministicHelpers), info)
    last_wtc = max(i for i, e in enumerate(ev) if e.type == "WorkflowTaskCompleted")
    cmds = run_task(inst, ev[:last_wtc], ev[last_wtc].attributes["t0"], fresh=True)
    from rillflow_runtime.codec import unpack

    assert unpack(cmds[-1].body)["result"] == res


async def test_workflow_error_fails_the_run(client: Client) -> None:
    async with worker(client):
        h = await client.start_workflow(flows.FailingWorkflow, {"message": "credit limit exceeded"})
        with pytest.raises(workflows.WorkflowFailureError) as ei:
            await h.result(timeout=10)
    assert ei.value.cause.type == "BusinessRule"
    assert ei.value.cause.message == "credit limit exceeded"
    assert (await h.describe()).status == "failed"


async def test_wait_condition_timeout_fails_the_run(client: Client) -> None:
    async with worker(client):
        h = await client.start_workflow(flows.ConditionWorkflow, {"timeout": 0.2})
        with pytest.raises(workflows.WorkflowFailureError) as ei:
            await h.result(timeout=10)
    assert ei.value.cause.type == "TimeoutError"


async def test_bug_fails_the_workflow_task_and_is_retried(client: Client) -> None:
    async with worker(client) as w:
        h = await client.start_workflow(flows.BuggyWorkflow)
        for _ in range(100):
            d = await h.describe()
            if d.workflow_task_failures >= 2:
                break
            await asyncio.sleep(0.1)
        assert w.stats.workflow_task_failures >= 2
    assert d.status == "running"
    assert d.last_workflow_task_failure is not None
    assert "KeyError" in d.last_workflow_task_failure.message
    assert "flows.py" in d.last_workflow_task_failure.stack  # the remote stack points at the bug
    ev = await h.history()
    assert types(ev).count("WorkflowTaskFailed") == 1  # recorded once per failure streak
    await h.terminate("giving up")
    with pytest.raises(workflows.WorkflowFailureError) as ei:
        await h.result(timeout=5)
    assert ei.value.status == "terminated" and "giving up" in str(ei.value)
    assert types(await h.history())[-1] == "WorkflowExecutionTerminated"


async def test_execution_timeout_closes_the_run(client: Client) -> None:
    async with worker(client):
        h = await client.start_workflow(flows.LongSleep)
        with pytest.raises(workflows.WorkflowFailureError) as ei:
            await h.result(timeout=10)
    assert ei.value.status == "timed_out"
    assert ei.value.cause.type == "WORKFLOW_EXECUTION_TIMED_OUT"
    assert types(await h.history())[-1] == "WorkflowExecutionTimedOut"


async def test_wait_for_cancels_the_activity(client: Client) -> None:
    async with worker(client):
        h = await client.start_workflow(flows.WaitForRace)
        assert await h.result(timeout=10) == "hello after"
    t = types(await h.history())
    assert t.index("ActivityTaskCancelRequested") > t.index("TimerFired")


async def test_already_running_id_is_refused(client: Client) -> None:
    h = await client.start_workflow(flows.TimerWorkflow, {"seconds": 5}, execution_id="only-once")
    with pytest.raises(workflows.WorkflowAlreadyStartedError, match="only-once"):
        await client.start_workflow(flows.TimerWorkflow, {"seconds": 5}, execution_id="only-once")
    await h.terminate("done")
    h2 = await client.start_workflow(flows.TimerWorkflow, {"seconds": 5}, execution_id="only-once")
    assert h2.run_id != h.run_id


async def test_result_waits_without_polling_for_many_runs(client: Client) -> None:
    async with worker(client):
        hs = [await client.start_workflow(flows.ManyWorkflow, {"n": i}) for i in range(50)]
        results = await asyncio.gather(*(h.result(timeout=20) for h in hs))
    assert results == [i + 2 for i in range(50)]


async def test_nested_and_direct_activity_calls_are_plain_calls() -> None:
    assert await flows.hello("x") == "hello x"
    assert flows.hello_sync("y") == "hi y from a thread"
    assert workflows.get_execution_id() is None
    assert not workflows.workflow.in_workflow()


async def test_cancelled_activity_learns_it_at_its_next_heartbeat(client: Client, tmp_path: Path) -> None:
    marker = tmp_path / "cancelled"
    acts = [flows.beats_until_cancelled]
    async with Worker(client, workflows=[flows.GiveUpWorkflow], activities=acts, **FAST) as w:  # type: ignore[arg-type]
        h = await client.start_workflow(flows.GiveUpWorkflow, {"marker": str(marker)})
        assert await h.result(timeout=10) == "gave up"
        await wait_until(marker.exists, 5)  # the heartbeat answered "gone": the attempt was cancelled
        await wait_until(lambda: not w.running, 5)
    assert "ActivityTaskCancelRequested" in types(await h.history())


async def test_message_read_by_a_dead_worker_is_reclaimed(client: Client) -> None:
    ks = client.keyspace
    async with Worker(client, workflows=[flows.ManyWorkflow], **FAST):  # type: ignore[arg-type]
        h = await client.start_workflow(flows.ManyWorkflow, {"n": 1})
        act = ks.queue(0, "default", "act")
        await wait_until(lambda: client.redis.xlen(act), 10)
        # a worker reads the activity task and dies before starting it
        got: Any = await client.redis.xreadgroup("rf", "ghost", {act: ">"}, count=1)
        assert got
        async with Worker(
            client, activities=[flows.step], pump_interval=0.05, reclaim_idle=timedelta(milliseconds=300)
        ):
            assert await h.result(timeout=10) == 3
    assert [e.attributes["att"] for e in await h.history() if e.type == "ActivityTaskCompleted"] == [1, 1]


async def test_describe_says_why_a_closed_run_did_not_complete(client: Client) -> None:
    h = await client.start_workflow(flows.HelloWorkflow, {"name": "x"})
    assert (await h.describe()).failure is None  # still running
    await h.terminate("customer cancelled")
    d = await h.describe()
    assert d.status == "terminated"
    assert d.failure is not None and (d.failure.type, d.failure.message) == (
        "WorkflowTerminated",
        "customer cancelled",
    )
