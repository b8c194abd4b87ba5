"""Workflows the schedule tests run: one that reports what it was scheduled for, one
that stays open until told (overlap policies), one that fails (pause_on_failure)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from rillflow import workflow
from rillflow.errors import WorkflowError


@workflow.define(name="sched_tick")
class Tick:
    @workflow.entrypoint
    async def run(self, n: int = 0) -> dict[str, Any]:
        info = workflow.info()
        return {
            "n": n,
            "schedule_id": info.schedule_id,
            "scheduled": info.scheduled_time.isoformat() if info.scheduled_time else None,
            "id": info.workflow_id,
        }


@workflow.define(name="sched_slow", execution_timeout=timedelta(minutes=5))
class Slow:
    def __init__(self) -> None:
        self.done = False

    @workflow.signal(name="finish")
    async def finish(self) -> None:
        self.done = True

    @workflow.entrypoint
    async def run(self, n: int = 0) -> str:
        try:
            await workflow.wait_condition(lambda: self.done)
        except asyncio.CancelledError:
            raise
        return "finished"


@workflow.define(name="sched_fails")
class Fails:
    @workflow.entrypoint
    async def run(self, n: int = 0) -> None:
        raise WorkflowError("this run fails", non_retryable=True)


WORKFLOWS = [Tick, Slow, Fails]


@workflow.define(name="sched_hop")
class Hop:
    """Continues as new once, then says what its schedule info is."""

    @workflow.entrypoint
    async def run(self, n: int = 0) -> dict[str, Any]:
        if n == 0:
            workflow.continue_as_new({"n": 1})
        info = workflow.info()
        return {
            "schedule_id": info.schedule_id,
            "scheduled": info.scheduled_time.isoformat() if info.scheduled_time else None,
        }


WORKFLOWS.append(Hop)
