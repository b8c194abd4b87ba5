"""What a running activity knows of itself (activity.info()), and how it learns that its
attempt is over: activity.is_cancelled(), and a plain def's next heartbeat raising."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from rillflow import Client, Worker, activity, workflow
from tests.conftest import FAST, wait_until

pytestmark = pytest.mark.anyio

SEEN: dict[str, Any] = {}
STOPPED = threading.Event()


@activity(
    name="ctx_info",
    schedule_to_close_timeout=timedelta(minutes=2),
    start_to_close_timeout=timedelta(seconds=30),
)
async def report_info() -> dict[str, Any]:
    info = activity.info()
    return {
        "attempt": info.attempt,
        "workflow_id": info.workflow_id,
        "workflow_type": info.workflow_type,
        "s2c": info.schedule_to_close_timeout.total_seconds() if info.schedule_to_close_timeout else None,
        "left": (info.deadline - info.started_time).total_seconds()
        if info.deadline and info.started_time
        else None,
        "started": info.started_time.isoformat() if info.started_time else None,
        "cancelled": activity.is_cancelled(),
    }


@activity(
    name="ctx_spin", heartbeat_timeout=timedelta(seconds=1), start_to_close_timeout=timedelta(minutes=1)
)
def spin() -> int:
    """A plain def that nothing can interrupt: it stops at the heartbeat after its attempt ends."""
    i = 0
    try:
        for i in range(2000):
            activity.heartbeat(i)
            time.sleep(0.02)
        return i
    except asyncio.CancelledError:
        SEEN["stopped_at"] = i
        SEEN["is_cancelled"] = activity.is_cancelled()
        STOPPED.set()
        raise


@workflow.define(name="ctx_flow")
class CtxFlow:
    @workflow.entrypoint
    async def run(self, spin_it: bool = False) -> Any:
        if spin_it:
            return await spin()
        return await report_info()


async def test_an_activity_knows_its_attempt_deadlines_and_workflow(client: Client) -> None:
    async with Worker(client, workflows=[CtxFlow], activities=[report_info, spin], **FAST):
        before = datetime.now(UTC) - timedelta(seconds=5)
        out = await client.execute_workflow(CtxFlow, {}, execution_id="ctx-1", result_timeout=20)
    assert out["attempt"] == 1 and out["workflow_id"] == "ctx-1" and out["workflow_type"] == "ctx_flow"
    assert out["s2c"] == 120 and out["cancelled"] is False
    assert 0 < out["left"] <= 30  # this attempt's deadline: start-to-close from its start
    assert datetime.fromisoformat(out["started"]) > before


async def test_a_plain_def_stops_at_its_next_heartbeat_once_its_run_is_cancelled(client: Client) -> None:
    SEEN.clear()
    STOPPED.clear()
    async with Worker(client, workflows=[CtxFlow], activities=[report_info, spin], **FAST) as w:
        h = await client.start_workflow(CtxFlow, {"spin_it": True}, execution_id="ctx-2")
        await wait_until(lambda: bool(w.running), timeout=10)
        await asyncio.sleep(0.3)
        await h.cancel("enough")
        assert await asyncio.to_thread(STOPPED.wait, 10)
        await wait_until(lambda: not w.running, timeout=10)
    assert 0 < SEEN["stopped_at"] < 1999 and SEEN["is_cancelled"] is True
    assert (await h.describe()).status == "canceled"
