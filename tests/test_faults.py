"""Crashes and restarts with real processes: workers killed with SIGKILL mid-activity and
mid-workflow-task, SIGTERM, a Redis crash with AOF, many workflows over several workers."""

from __future__ import annotations

import asyncio
import signal
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from rillflow import Client, Worker
from rillflow_runtime.codec import pack
from rillflow_runtime.embedded import EmbeddedRedis
from rillflow_runtime.protocol import ActivityOutcome, ActivityRoute
from tests import flows
from tests.conftest import FAST, wait_until

pytestmark = pytest.mark.anyio


def types(events: list[Any]) -> list[str]:
    return [e.type for e in events]


async def assert_completed_once(client: Client, execution_id: str) -> list[Any]:
    events = await client.get_workflow_handle(execution_id).history()
    assert types(events).count("WorkflowExecutionCompleted") == 1
    assert types(events)[-1] == "WorkflowExecutionCompleted"
    return events


@pytest.mark.parametrize("namespace_shards", [1, 4], ids=["shards1", "shards4"])
async def test_500_workflows_over_3_worker_processes_complete_exactly_once(
    client: Client, namespace_shards: int, redis_url: str, worker_procs: Any
) -> None:
    procs = [worker_procs(redis_url) for _ in range(3)]

    async def all_listening() -> bool:  # 3 processes x (2 workflow + 1 activity) pollers blocked
        clients = await client.redis.client_list()
        return sum(c.get("cmd") == "xreadgroup" for c in clients) >= 9

    await wait_until(all_listening, 30)
    handles = [
        await client.start_workflow(flows.ManyWorkflow, {"n": i}, execution_id=f"many-{i}")
        for i in range(500)
    ]
    results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 120)
    assert results == [i + 2 for i in range(500)]
    # every run closed exactly once: one entry each in the closed-runs streams
    closed: list[str] = []
    for s in client.keyspace.all_shards():
        closed += [f[b"wid"].decode() for _, f in await client.redis.xrange(client.keyspace.closed(s))]
    assert sorted(closed) == sorted(h.id for h in handles)
    for h in handles[::25]:
        events = await assert_completed_once(client, h.id)
        assert types(events).count("ActivityTaskCompleted") == 2
    # the work was shared: workflow tasks were completed by more than one worker process
    deciders = set()
    for h in handles[::10]:
        for e in await h.history():
            if e.type == "WorkflowTaskCompleted":
                deciders.add(e.attributes["worker"])
    assert len(deciders) >= 2, deciders
    for p in procs:
        assert p.proc.poll() is None, p.output()[-2000:]


async def test_sigkill_mid_activity_is_retried_on_another_worker(
    client: Client, redis_url: str, worker_procs: Any, tmp_path: Path
) -> None:
    marker = str(tmp_path / "m")
    a = worker_procs(redis_url)
    h = await client.start_workflow(flows.CrashActivityWorkflow, {"marker": marker, "seconds": 1.0})
    await wait_until(lambda: Path(f"{marker}.1").exists(), 15)
    a.kill()
    b = worker_procs(redis_url)
    res = await h.result(timeout=20)
    assert res == f"done by {b.proc.pid} on attempt 2"
    events = await assert_completed_once(client, h.id)
    retry = next(e for e in events if e.type == "ActivityTaskRetrying")
    assert retry.attributes["failure"]["timeout_type"] == "start_to_close"
    assert [e.attributes["att"] for e in events if e.type == "ActivityTaskCompleted"] == [2]


async def test_sigkill_mid_workflow_task_is_taken_over(
    client: Client, redis_url: str, worker_procs: Any, tmp_path: Path
) -> None:
    marker = tmp_path / "wft"
    a = worker_procs(redis_url, env={"RF_SLOW_WORKFLOW_TASK": "1"})
    h = await client.start_workflow(flows.CrashWftWorkflow, {"marker": str(marker)})
    await wait_until(marker.exists, 15)
    a.kill()
    b = worker_procs(redis_url)
    assert await h.result(timeout=20) == f"hello one; finished by {b.proc.pid}"
    events = await assert_completed_once(client, h.id)
    assert "WorkflowTaskTimedOut" in types(events)
    assert types(events).count("ActivityTaskScheduled") == 1  # the replay re-issued nothing


@pytest.mark.parametrize("namespace_shards", [1, 4], ids=["shards1", "shards4"])
async def test_durable_timer_fires_across_a_worker_restart(
    client: Client, namespace_shards: int, redis_url: str, worker_procs: Any
) -> None:
    a = worker_procs(redis_url)
    h = await client.start_workflow(flows.TimerWorkflow, {"seconds": 1.0})

    async def timer_started() -> bool:
        return "TimerStarted" in types(await h.history())

    await wait_until(timer_started, 15)
    a.kill()
    await asyncio.sleep(1.5)  # the timer comes due while no worker runs
    worker_procs(redis_url)
    assert await h.result(timeout=20) >= 1.0
    events = await assert_completed_once(client, h.id)
    started = next(e for e in events if e.type == "TimerStarted")
    fired = next(e for e in events if e.type == "TimerFired")
    # never early; late by however long no worker ran (no tight bound: CI machines are busy)
    assert 1000 <= fired.time_ms - started.time_ms < 30_000


async def test_sigterm_lets_the_running_activity_finish(
    client: Client, redis_url: str, worker_procs: Any, tmp_path: Path
) -> None:
    marker = str(tmp_path / "m")
    a = worker_procs(redis_url, grace=10)
    h = await client.start_workflow(flows.CrashActivityWorkflow, {"marker": marker, "seconds": 1.0})
    await wait_until(lambda: Path(f"{marker}.1").exists(), 15)
    a.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(a.proc.wait, 15) == 0
    worker_procs(redis_url)  # takes the workflow task the first worker no longer takes
    assert await h.result(timeout=20) == f"done by {a.proc.pid} on attempt 1"
    events = await assert_completed_once(client, h.id)
    assert "ActivityTaskRetrying" not in types(events)


async def test_redis_crash_and_restart_with_aof_loses_nothing(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "data", appendonly=True, appendfsync="always").start()
    try:
        client = await Client.connect(server.url)
        async with Worker(
            client, workflows=[flows.TimerWorkflow, flows.ManyWorkflow], activities=[flows.step], **FAST
        ):  # type: ignore[arg-type]
            handles = [await client.start_workflow(flows.TimerWorkflow, {"seconds": 1.0}) for _ in range(20)]
            handles += [await client.start_workflow(flows.ManyWorkflow, {"n": i}) for i in range(20)]
            await asyncio.sleep(0.3)
            server.crash()
            await asyncio.sleep(0.5)
            server = EmbeddedRedis(
                tmp_path / "data", port=server.port, appendonly=True, appendfsync="always"
            ).start()
            results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 30)
        assert all(r >= 1.0 for r in results[:20])
        assert results[20:] == [i + 2 for i in range(20)]
        for h in handles[::7]:
            await assert_completed_once(client, h.id)
        await client.close()
    finally:
        server.cleanup()


async def test_fresh_worker_replays_a_long_history(client: Client) -> None:
    steps = 400  # ~1,200 events: more than one page of history
    async with Worker(client, workflows=[flows.SequentialWorkflow], activities=[flows.step], **FAST) as w1:  # type: ignore[arg-type]
        h = await client.start_workflow(flows.SequentialWorkflow, {"steps": steps})

        async def halfway() -> bool:
            return (await h.describe()).history_length > 700

        await wait_until(halfway, 30)
    async with Worker(client, workflows=[flows.SequentialWorkflow], activities=[flows.step], **FAST) as w2:  # type: ignore[arg-type]
        assert await h.result(timeout=60) == sum(i + 1 for i in range(steps))
    assert w1.stats.cache_hits > 100
    assert w2.stats.cache_misses >= 1
    events = await assert_completed_once(client, h.id)
    assert types(events).count("ActivityTaskScheduled") == steps
    assert len(events) > 1000


async def test_changed_workflow_code_is_detected_as_non_determinism(client: Client) -> None:
    acts = [flows.hello, flows.step]
    async with Worker(client, workflows=[flows.NonDeterministicV1], activities=acts, **FAST):  # type: ignore[arg-type]
        h = await client.start_workflow("nd_workflow")

        async def sleeping() -> bool:
            return "TimerStarted" in types(await h.history())

        await wait_until(sleeping, 10)
    async with Worker(client, workflows=[flows.NonDeterministicV2], activities=acts, **FAST):  # type: ignore[arg-type]

        async def failing() -> bool:
            return (await h.describe()).workflow_task_failures >= 1

        await wait_until(failing, 10)
    d = await h.describe()
    assert d.status == "running"
    assert d.last_workflow_task_failure is not None
    assert d.last_workflow_task_failure.type == "NonDeterminismError"
    assert "ScheduleActivity(1, 'hello')" in d.last_workflow_task_failure.message
    assert "ScheduleActivity(1, 'step')" in d.last_workflow_task_failure.message
    events = await h.history()
    assert "WorkflowTaskFailed" in types(events)
    assert "step" not in [e.attributes.get("name") for e in events]  # nothing diverged
    # deploying the code the run started with lets it finish
    async with Worker(client, workflows=[flows.NonDeterministicV1], activities=acts, **FAST):  # type: ignore[arg-type]
        assert await h.result(timeout=15) == "hello v1"


async def test_late_completion_of_a_timed_out_attempt_is_refused(client: Client, tmp_path: Path) -> None:
    marker = str(tmp_path / "late")
    async with Worker(client, workflows=[flows.LateWorkflow], activities=[flows.late_reporter], **FAST) as w:  # type: ignore[arg-type]
        h = await client.start_workflow(flows.LateWorkflow, {"marker": marker})
        await wait_until(lambda: Path(f"{marker}.2").exists(), 10)
        # attempt 1 timed out and attempt 2 runs: attempt 1's result arrives now
        shard = client.keyspace.shard(h.id)
        assert w.acts is not None and h.run_id is not None
        route = ActivityRoute(h.id, "default", "", client.keyspace.queue(shard, "default", "act"), "0-1")
        late = ActivityOutcome(h.run_id, 1, 1, pack({"seq": 1, "att": 1, "result": "late"}), route)
        w.acts.report(shard, late)
        await wait_until(lambda: w.stats.refused == 1, 5)
        assert await h.result(timeout=10) == "attempt 2"
    events = await assert_completed_once(client, h.id)
    completed = [e.attributes for e in events if e.type == "ActivityTaskCompleted"]
    assert completed == [{"seq": 1, "att": 2, "result": "attempt 2"}]


async def test_worker_rides_out_a_dropped_connection(client: Client) -> None:
    async with Worker(client, workflows=[flows.ManyWorkflow], activities=[flows.step], **FAST):  # type: ignore[arg-type]
        hs = [await client.start_workflow(flows.ManyWorkflow, {"n": i}) for i in range(10)]
        r = aioredis.Redis.from_url(client.url)
        await r.client_kill_filter(_type="normal", skipme=True)
        await r.aclose()
        assert await asyncio.wait_for(asyncio.gather(*(h.result() for h in hs)), 20) == [
            i + 2 for i in range(10)
        ]


async def test_workflow_task_timeout_setting(redis_url: str) -> None:
    c = await Client.connect(redis_url, namespace="slow", workflow_task_timeout=timedelta(seconds=7))
    assert c.settings.workflow_task_timeout_ms == 7000
    await c.close()
