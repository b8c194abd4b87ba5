"""What ``describe`` tells about a running run beyond its status: the timers it waits
on (and when they fire) and, for an activity in backoff, when its next attempt goes."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

import rillflow as workflows
from rillflow import Client, Worker
from tests.conftest import FAST, wait_until
from tests.test_cli import rf

pytestmark = pytest.mark.anyio
workflow = workflows.workflow


@workflows.activity(
    name="describe_flaky",
    retry_policy_max_attempts=5,
    retry_policy_initial_interval=timedelta(seconds=40),
)
async def flaky() -> None:
    raise RuntimeError("not yet")


@workflow.define(name="describe_waits")
class WaitsWorkflow:
    @workflow.entrypoint
    async def run(self) -> None:
        await asyncio.gather(workflow.sleep(timedelta(seconds=60)), flaky())


async def test_describe_shows_pending_timers_and_the_next_attempt_time(client: Client) -> None:
    async with Worker(client, workflows=[WaitsWorkflow], activities=[flaky], **FAST):  # type: ignore[arg-type]
        t0 = datetime.now(UTC)
        h = await client.start_workflow(WaitsWorkflow, execution_id="describe-1")

        async def in_backoff() -> bool:
            d = await h.describe()
            return bool(d.pending_activities) and d.pending_activities[0].state == "backoff"

        await wait_until(in_backoff, 15)
        d = await h.describe()
        [timer] = d.pending_timers
        assert t0 + timedelta(seconds=59) <= timer.fire_time <= datetime.now(UTC) + timedelta(seconds=61)
        [act] = d.pending_activities
        assert act.attempt == 2 and act.last_failure is not None and "not yet" in act.last_failure.message
        assert act.next_attempt_time is not None
        assert (
            t0 + timedelta(seconds=39) <= act.next_attempt_time <= datetime.now(UTC) + timedelta(seconds=41)
        )
        p = await asyncio.to_thread(rf, "describe", "describe-1", "--url", client.url)
        assert p.returncode == 0, p.stderr
        assert "pending timers" in p.stdout and timer.fire_time.isoformat() in p.stdout, p.stdout
        assert "next attempt" in p.stdout and act.next_attempt_time.isoformat() in p.stdout, p.stdout
        await h.terminate(reason="done looking")
        d = await h.describe()
        assert d.pending_timers == [] and d.pending_activities == []
        assert d.failure is not None and "done looking" in d.failure.message
