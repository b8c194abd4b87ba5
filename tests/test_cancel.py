"""Graceful cancellation: handle.cancel() / `rillflow cancel` raise asyncio.CancelledError
at the workflow's current await point; it may clean up and end as canceled, or complete.
Its pending activities are cancelled (a heartbeating one learns at its next heartbeat, one
not started never starts), its timers too."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import rillflow as workflows
from rillflow import Client, Worker
from tests import flows
from tests.conftest import FAST, wait_until
from tests.test_cli import assert_one_line, rf

pytestmark = pytest.mark.anyio
workflow = workflows.workflow


@workflows.activity(start_to_close_timeout=timedelta(seconds=60), heartbeat_timeout=timedelta(seconds=1))
async def beat_until_cancelled(marker: str) -> str:
    Path(marker + ".started").write_text("1")
    try:
        for _ in range(1200):
            workflows.activity.heartbeat("beat")
            await asyncio.sleep(0.05)
    except asyncio.CancelledError:
        Path(marker + ".cancelled").write_text("1")
        raise
    return "finished"


@workflows.activity(task_queue="nobody-serves-this")
async def never_started(x: int) -> int:
    return x


@workflow.define(name="cleanup_workflow")
class CleanupWorkflow:
    """Blocked on a heartbeating activity; cleans up with another activity when cancelled."""

    def __init__(self) -> None:
        self.cleaned = ""

    @workflow.query()
    def cleaned_up(self) -> str:
        return self.cleaned

    @workflow.entrypoint
    async def run(self, marker: str) -> str:
        try:
            return await beat_until_cancelled(marker)
        except asyncio.CancelledError:
            self.cleaned = await flows.hello("cleanup")
            raise


@workflow.define(name="sleepy_workflow")
class SleepyWorkflow:
    @workflow.entrypoint
    async def run(self) -> str:
        await workflow.sleep(3600)
        return "woke"


@workflow.define(name="patient_workflow")
class PatientWorkflow:
    """Waits on a condition that never holds; completes when cancelled."""

    @workflow.entrypoint
    async def run(self) -> str:
        try:
            await workflow.wait_condition(lambda: False)
        except asyncio.CancelledError:
            return "stopped cleanly"
        return "never"


@workflow.define(name="unserved_workflow")
class UnservedWorkflow:
    @workflow.entrypoint
    async def run(self) -> int:
        return await never_started(1)


def _worker(client: Client) -> Worker:
    return Worker(
        client,
        workflows=[CleanupWorkflow, SleepyWorkflow, PatientWorkflow, UnservedWorkflow],  # type: ignore[arg-type]
        activities=[beat_until_cancelled, flows.hello],  # type: ignore[arg-type]
        **FAST,
    )


async def _types(h: Any) -> list[str]:
    return [e.type for e in await h.history()]


async def _has(h: Any, event: str) -> bool:
    return event in await _types(h)


async def test_a_cancelled_activity_learns_it_and_the_workflow_cleans_up(
    client: Client, tmp_path: Path
) -> None:
    marker = str(tmp_path / "beat")
    async with _worker(client):
        h = await client.start_workflow(CleanupWorkflow, marker)
        await wait_until(lambda: Path(marker + ".started").exists(), 15)
        await h.cancel("customer left")
        with pytest.raises(workflows.WorkflowFailureError) as ei:
            await h.result(timeout=20)
        # the heartbeating activity learned at its next heartbeat
        await wait_until(lambda: Path(marker + ".cancelled").exists(), 10)
        assert await h.query("cleaned_up") == "hello cleanup"
    assert ei.value.status == "canceled" and ei.value.cause.type == "WorkflowCanceled"
    assert "customer left" in ei.value.cause.message
    events = await h.history()
    types = [e.type for e in events]
    assert types.count("WorkflowExecutionCancelRequested") == 1
    assert types[-1] == "WorkflowExecutionCanceled"
    assert "ActivityTaskCancelRequested" in types and "ActivityTaskCompleted" in types
    cleanup = [e.attributes["name"] for e in events if e.type == "ActivityTaskScheduled"]
    assert cleanup == ["beat_until_cancelled", "hello"]
    d = await h.describe()
    assert d.status == "canceled" and d.pending_activities == []
    assert d.failure is not None and d.failure.type == "WorkflowCanceled"


async def test_a_timer_is_cancelled_with_the_run(client: Client) -> None:
    async with _worker(client):
        h = await client.start_workflow(SleepyWorkflow)
        await wait_until(lambda: _has(h, "TimerStarted"), 15)
        await h.cancel()
        with pytest.raises(workflows.WorkflowFailureError) as ei:
            await h.result(timeout=20)
    assert ei.value.status == "canceled"
    types = await _types(h)
    assert types[-2:] == ["TimerCanceled", "WorkflowExecutionCanceled"]
    ks = client.keyspace
    assert await client.redis.zcard(ks.timers(h.shard)) == 0  # nothing due for it any more


async def test_code_that_catches_the_cancellation_may_complete(client: Client) -> None:
    async with _worker(client):
        h = await client.start_workflow(PatientWorkflow)
        await wait_until(lambda: _has(h, "WorkflowTaskCompleted"), 15)
        await h.cancel()
        assert await h.result(timeout=20) == "stopped cleanly"
    assert (await h.describe()).status == "completed"


async def test_an_activity_not_started_never_starts(client: Client) -> None:
    async with _worker(client):
        h = await client.start_workflow(UnservedWorkflow)
        await wait_until(lambda: _has(h, "ActivityTaskScheduled"), 15)
        stream = client.keyspace.queue(h.shard, "nobody-serves-this", "act")
        assert await client.redis.xlen(stream) == 1
        await h.cancel()
        with pytest.raises(workflows.WorkflowFailureError):
            await h.result(timeout=20)

        async def dropped() -> bool:  # (by the timer pump: the stream is not the run's queue)
            return await client.redis.xlen(stream) == 0

        await wait_until(dropped, 10)  # its task message is gone: no worker will run it
    assert (await _types(h))[-2:] == ["ActivityTaskCancelRequested", "WorkflowExecutionCanceled"]


async def test_a_cancel_before_the_first_task_and_repeated_cancels(client: Client) -> None:
    h = await client.start_workflow(SleepyWorkflow)
    await h.cancel("early")
    await h.cancel("again")  # asked once: changes nothing
    assert (await _types(h)).count("WorkflowExecutionCancelRequested") == 1
    async with _worker(client):
        with pytest.raises(workflows.WorkflowFailureError) as ei:
            await h.result(timeout=20)
    assert ei.value.status == "canceled" and "early" in ei.value.cause.message
    # the entrypoint ran up to its first await, where the cancellation reached it
    assert (await _types(h))[-3:] == ["TimerStarted", "TimerCanceled", "WorkflowExecutionCanceled"]
    with pytest.raises(
        workflows.WorkflowNotFoundError,
        match=r"is not running \(closed, or never started\): nothing to cancel",
    ):
        await h.cancel()
    with pytest.raises(workflows.WorkflowNotFoundError):
        await client.get_workflow_handle("no-such-execution").cancel()


async def test_rillflow_cancel(client: Client, redis_url: str) -> None:
    async with _worker(client):
        h = await client.start_workflow(SleepyWorkflow, execution_id="cli-cancel")
        await wait_until(lambda: _has(h, "TimerStarted"), 15)
        p = rf("cancel", "cli-cancel", "--reason", "from the shell", "--url", redis_url)
        assert p.returncode == 0 and "cancel requested for cli-cancel" in p.stdout, p.stderr
        with pytest.raises(workflows.WorkflowFailureError):
            await h.result(timeout=20)
    res = rf("result", "cli-cancel", "--url", redis_url)
    assert res.returncode == 1 and "canceled" in res.stderr and "from the shell" in res.stderr
    hist = rf("history", "cli-cancel", "--url", redis_url)
    assert "WorkflowExecutionCancelRequested" in hist.stdout and "from the shell" in hist.stdout
    assert_one_line(rf("cancel", "cli-cancel", "--url", redis_url), 3, "nothing to cancel")


@workflow.define(name="slow_continue", enforce_determinism=False)
class SlowContinueWorkflow:
    """Continues as new after a step; its first closing task runs long (a marker file
    says when it started), so that a cancel arrives while it is in flight."""

    @workflow.entrypoint
    async def run(self, marker: str) -> None:
        await flows.step(1)
        if marker:
            Path(marker).write_text("closing")
            time.sleep(1.0)
        workflow.continue_as_new({"marker": ""})


SLOW_CONTINUE = [SlowContinueWorkflow, flows.step]  # (a worker process: the task blocks its loop)


async def test_a_cancel_that_arrives_while_the_run_continues_as_new_is_not_lost(
    client: Client, redis_url: str, worker_procs: Any, tmp_path: Path
) -> None:
    """The task that would continue as new is run again for the cancel that came while it
    ran, and the code gets CancelledError at its await: the run ends canceled, and no
    next run starts without the cancel."""
    marker = tmp_path / "closing"
    worker_procs(redis_url, target="tests.test_cancel:SLOW_CONTINUE")
    h = await client.start_workflow(SlowContinueWorkflow, {"marker": str(marker)}, execution_id="slow-can")
    await wait_until(marker.exists, 15)
    await h.cancel("stop")  # buffered: the closing task is in flight
    with pytest.raises(workflows.WorkflowFailureError) as ei:
        await h.result(timeout=30)
    assert (ei.value.status, ei.value.run_id) == ("canceled", h.run_id)
    d = await client.get_workflow_handle("slow-can").describe()
    assert (d.status, d.run_id) == ("canceled", h.run_id)  # no run after it
