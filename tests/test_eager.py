"""Eager dispatch: a workflow task's completion hands the activities it schedules to its
own worker, started in that call, and an activity outcome brings back the next workflow
task of a run its worker caches, started in that call. Neither writes a task message;
every guarantee of the stream path holds: a repeat answers the same, a worker that dies
holding them is found out by the deadlines, and a late answer after a takeover is
refused."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import rillflow as workflows
from rillflow import Client, Worker
from rillflow.history import HistoryEvent
from rillflow_runtime.codec import pack, unpack
from rillflow_runtime.model import CommandKind, Reply
from rillflow_runtime.protocol import (
    ActDone,
    ActivityOutcome,
    ActivityRoute,
    ActStartItem,
    EagerStart,
    TaskCompletion,
    WftStartItem,
)
from tests import flows
from tests.conftest import FAST, wait_until
from tests.faultproxy import FaultProxy
from tests.test_scripts import _activity, _Cmd, read_one, snapshot, started_task
from tests.test_worker_faults import script_call

pytestmark = pytest.mark.anyio

RETENTION = 60_000


def _quick_activity(seq: int, stc_ms: int) -> _Cmd:
    """An activity whose attempts time out after ``stc_ms``, retried once, 1 ms apart."""
    body = pack({"seq": seq, "name": "hello", "input": pack(["x"]), "task_queue": "default"})
    return _Cmd(CommandKind.SCHEDULE_ACTIVITY, body, [seq, "default", stc_ms, 0, 0, 2, 1, 1.0, 1])


async def _handed(client: Client, *cmds: _Cmd, eager: frozenset[int]) -> tuple[str, Any, Any, Any]:
    """A run whose first task (worker w1, sticky) scheduled ``cmds``, ``eager`` handed to w1."""
    stream, (h, msgid, st) = await started_task(client)
    task = TaskCompletion(h.run_id or "", h.id, st.fence, msgid, list(cmds), eager)  # type: ignore[arg-type]
    (done,) = await client.protocol.wft_complete(0, stream, "default", RETENTION, "w1", 5_000, [task])
    assert done.reply is Reply.OK
    return stream, h, task, done


async def _close(
    client: Client, stream: str, h: Any, fence: str, worker: str = "w1", msgid: str = ""
) -> Reply:
    """Complete a run's workflow task with the command that closes the run."""
    complete = _Cmd(CommandKind.COMPLETE_WORKFLOW, pack({"result": 1}), [])
    task = TaskCompletion(h.run_id or "", h.id, fence, msgid, [complete])  # type: ignore[list-item]
    (reply,) = await client.protocol.wft_complete(0, stream, "default", RETENTION, worker, 5_000, [task])
    return reply.reply


def _route(h: Any) -> ActivityRoute:
    """Where the outcome of an activity handed to w1 lands: no task stream, no message."""
    return ActivityRoute(h.id, "default", "w1", "", "")


async def test_a_completion_hands_its_worker_the_activities_it_takes_and_a_repeat_gets_them_again(
    client: Client,
) -> None:
    stream, h, task, done = await _handed(client, _activity(1), _activity(2), eager=frozenset({1}))
    ks, run = client.keyspace, h.run_id or ""
    assert done.eager == ((1, done.now_ms + 30_000),)  # started now, its deadline 30 s on
    aq = ks.queue(0, "default", "act")
    assert await client.redis.xlen(aq) == 1  # only the activity it did not take has a message
    state = unpack(await client.redis.hget(ks.acts(0, run), "1"))
    assert (state["st"], state["by"], state["msg"]) == ("started", "w1", "")
    before = await snapshot(client)
    (again,) = await client.protocol.wft_complete(0, stream, "default", RETENTION, "w1", 5_000, [task])
    assert (again.reply, again.last_event_id, again.eager) == (Reply.OK, done.last_event_id, done.eager)
    assert await snapshot(client) == before  # answered, not applied again


async def test_an_outcome_brings_back_the_next_task_of_a_run_its_worker_caches(client: Client) -> None:
    stream, h, task, done = await _handed(client, _activity(1), eager=frozenset({1}))
    ks, run = client.keyspace, h.run_id or ""
    result = pack({"seq": 1, "att": 1, "result": "hi"})
    outcome = ActivityOutcome(run, 1, 1, result, _route(h))
    eager = EagerStart("w1", 10_000, 100, {run: (done.last_event_id, task.fence)})
    (first,) = await client.protocol.act_done(0, [outcome], eager)
    assert first.reply is Reply.OK and first.task is not None
    st = first.task
    # a new fence, and only what the cached instance has not seen: the result
    assert st.fence != task.fence and st.since == done.last_event_id
    assert [HistoryEvent.from_entry(e).type for e in st.events] == ["ActivityTaskCompleted"]
    # the event the call appended is handed back as a read of the history gives it
    as_read = [(i, dict(zip(f[::2], f[1::2], strict=True))) for i, f in st.events]
    assert as_read == await client.redis.xrange(ks.history(0, h.id, run), min=f"{st.since + 1}-0")
    assert await client.redis.hget(ks.run(0, run), "wft") == b"started"
    for q in (stream, ks.sticky(0, "default", "w1")):  # no task message anywhere
        assert await client.redis.xlen(q) == 0
    before = await snapshot(client)
    (again,) = await client.protocol.act_done(0, [outcome], eager)
    assert again.reply is Reply.OK and again.task is not None
    assert (again.task.fence, again.task.now_ms, again.task.events) == (st.fence, st.now_ms, st.events)
    assert await snapshot(client) == before
    # the task completes like any other
    assert await _close(client, stream, h, st.fence) is Reply.OK
    assert (await client.redis.hget(ks.run(0, run), "status")) == b"completed"


async def test_a_repeated_result_after_its_run_closed_gets_the_same_answer(client: Client) -> None:
    """A closed run's act hash is folded into its run hash (acts_d), answers included."""
    stream, h, _task, _done = await _handed(
        client, _activity(1), _activity(2), _activity(3), eager=frozenset({1, 2, 3})
    )
    ks, run = client.keyspace, h.run_id or ""
    eager = EagerStart("w1", 10_000, 100, {run: (0, "")})

    def outcome(seq: int, att: int = 1) -> ActivityOutcome:
        return ActivityOutcome(run, seq, att, pack({"seq": seq, "att": att, "result": "hi"}), _route(h))

    (first,) = await client.protocol.act_done(0, [outcome(1)], eager)
    assert first.reply is Reply.OK and first.task is not None
    # the others land while that task runs: buffered
    assert [d.reply for d in await client.protocol.act_done(0, [outcome(2), outcome(3)], eager)] == [
        Reply.OK
    ] * 2
    assert await _close(client, stream, h, first.task.fence, "w1") is Reply.OK
    assert not await client.redis.exists(ks.acts(0, run))  # folded away
    assert await client.redis.hget(ks.run(0, run), "acts_d") == b"1-3.1.ok"
    for seq in (1, 2, 3):  # the same answer, and no task: the run is closed
        assert await client.protocol.act_done(0, [outcome(seq)], eager) == [ActDone(Reply.OK)]
    assert await client.protocol.act_done(0, [outcome(2, att=2), outcome(4)]) == [ActDone(Reply.REFUSED)] * 2


async def test_an_outcome_reported_by_another_worker_wakes_the_run_through_its_stream(client: Client) -> None:
    """Only the worker that caches the run (ran its last task) is handed the task."""
    _stream, h, _task, _done = await _handed(client, _activity(1), eager=frozenset({1}))
    ks, run = client.keyspace, h.run_id or ""
    outcome = ActivityOutcome(run, 1, 1, pack({"seq": 1, "att": 1, "result": "hi"}), _route(h))
    (res,) = await client.protocol.act_done(0, [outcome], EagerStart("w2", 10_000, 100, {run: (0, "")}))
    assert res.reply is Reply.OK and res.task is None
    assert await client.redis.hget(ks.run(0, run), "wft") == b"scheduled"
    assert await client.redis.xlen(ks.sticky(0, "default", "w1")) == 1  # to the worker caching it


async def test_a_late_completion_of_a_task_started_eagerly_is_refused_after_a_takeover(
    client: Client,
) -> None:
    stream, h, task, done = await _handed(client, _activity(1), eager=frozenset({1}))
    run = h.run_id or ""
    outcome = ActivityOutcome(run, 1, 1, pack({"seq": 1, "att": 1, "result": "hi"}), _route(h))
    # w1's task times out at once (1 ms), as if w1 had hung or died
    eager = EagerStart("w1", 1, 100, {run: (done.last_event_id, task.fence)})
    (res,) = await client.protocol.act_done(0, [outcome], eager)
    assert res.task is not None
    await asyncio.sleep(0.01)

    async def taken_over() -> bool:
        await client.protocol.pump(0, 100, RETENTION, "w2")
        return await client.redis.hget(client.keyspace.run(0, run), "wft") == b"scheduled"

    await wait_until(taken_over, 5)
    msgid, _ = await read_one(client, stream, "w2")
    (st2,) = await client.protocol.wft_start(0, stream, 10_000, 100, "w2", [WftStartItem(run, msgid, 0, "")])
    assert st2.reply is Reply.OK
    assert await _close(client, stream, h, res.task.fence, "w1") is Reply.REFUSED
    assert await _close(client, stream, h, st2.fence, "w2", msgid=msgid) is Reply.OK
    events = [HistoryEvent.from_entry(e).type for e in await client.protocol.history(0, h.id, run)]
    assert events.count("WorkflowTaskTimedOut") == 1 and events.count("WorkflowExecutionCompleted") == 1


async def test_a_late_result_of_a_handed_over_attempt_is_refused_after_its_timeout(client: Client) -> None:
    _stream, h, _task, done = await _handed(client, _quick_activity(1, 20), eager=frozenset({1}))
    assert [seq for seq, _ in done.eager] == [1]
    ks, run = client.keyspace, h.run_id or ""
    aq = ks.queue(0, "default", "act")

    async def retried() -> bool:  # attempt 1 timed out; attempt 2 waits on the stream
        await client.protocol.pump(0, 100, RETENTION, "w2")
        return await client.redis.xlen(aq) == 1

    await wait_until(retried, 5)
    late = ActivityOutcome(run, 1, 1, pack({"seq": 1, "att": 1, "result": "late"}), _route(h))
    (res,) = await client.protocol.act_done(0, [late], EagerStart("w1", 10_000, 100, {run: (0, "")}))
    assert res.reply is Reply.REFUSED and res.task is None
    msgid, _ = await read_one(client, aq, "w2")
    (second,) = await client.protocol.act_start(0, aq, "w2", [ActStartItem(run, 1, 2, msgid)])
    assert second.reply is Reply.OK
    events = [HistoryEvent.from_entry(e).type for e in await client.protocol.history(0, h.id, run)]
    assert "ActivityTaskCompleted" not in events and events.count("ActivityTaskRetrying") == 1


async def _entries_added(client: Client, stream: str) -> int:
    if not await client.redis.exists(stream):
        return 0
    return int((await client.redis.xinfo_stream(stream))["entries-added"])


@pytest.mark.parametrize(
    "eager",
    [{}, {"max_eager_activities": 0}, {"max_eager_activities": 0, "sticky_schedule_timeout": None}],
    ids=["eager", "no-eager-activities", "streams-only"],
)
async def test_a_worker_that_runs_both_halves_steps_a_workflow_without_task_messages(
    client: Client, eager: dict[str, Any]
) -> None:
    ks = client.keyspace
    async with Worker(
        client, workflows=[flows.SequentialWorkflow], activities=[flows.step], **FAST, **eager
    ) as w:  # type: ignore[arg-type]
        h = await client.start_workflow(flows.SequentialWorkflow, {"steps": 10})
        assert await h.result(timeout=20) == sum(range(1, 11))
        sticky = ks.sticky(0, "default", w.identity)
        wfts = [await _entries_added(client, q) for q in (ks.queue(0, "default", "wft"), sticky)]
        acts = await _entries_added(client, ks.queue(0, "default", "act"))
    events = [e.type for e in await h.history()]
    assert events.count("ActivityTaskCompleted") == 10 and events.count("WorkflowExecutionCompleted") == 1
    if "sticky_schedule_timeout" in eager:  # no worker caches a run: every task is a message
        assert (wfts, acts) == ([11, 0], 10)
        return
    # the start's message only: every later task was started by the result that woke it
    assert wfts == [1, 0]
    assert acts == (10 if "max_eager_activities" in eager else 0)
    assert w.stats.cache_misses == 1 and w.stats.cache_hits == 10


async def test_a_fan_out_hands_over_only_a_few_and_leaves_the_rest_to_any_worker(client: Client) -> None:
    ks = client.keyspace
    hellos = [flows.hello, flows.hello_sync]
    async with Worker(client, workflows=[flows.HelloWorkflow], activities=hellos, **FAST):  # type: ignore[arg-type]
        # one hello, then 20 at once, then one more
        h = await client.start_workflow(flows.HelloWorkflow, {"name": "x", "times": 21})
        assert len(await h.result(timeout=20)) == 22
        acts = await _entries_added(client, ks.queue(0, "default", "act"))
    assert acts == 17  # of the 20: 3 taken by the completing worker, 17 for any worker to take


async def test_a_worker_killed_holding_a_handed_over_activity_loses_nothing(
    client: Client, redis_url: str, worker_procs: Any, tmp_path: Path
) -> None:
    marker = str(tmp_path / "m")
    a = worker_procs(redis_url)
    h = await client.start_workflow(flows.CrashActivityWorkflow, {"marker": marker, "seconds": 1.0})
    await wait_until(lambda: Path(f"{marker}.1").exists(), 15)
    ks, run = client.keyspace, h.run_id or ""
    state = unpack(await client.redis.hget(ks.acts(0, run), "1"))
    assert (state["by"], state["msg"]) == (a.identity, "")  # handed over, not read from a stream
    a.kill()
    b = worker_procs(redis_url)
    assert await h.result(timeout=20) == f"done by {b.proc.pid} on attempt 2"
    events = [e.type for e in await h.history()]
    assert events.count("ActivityTaskRetrying") == 1 and events.count("WorkflowExecutionCompleted") == 1


# -- answers lost on the way back, stops, capacity -------------------------------------------
def _client_attempts(c: Client) -> int:
    retry = c.redis.connection_pool.connection_kwargs.get("retry")
    return 1 + int(getattr(retry, "_retries", 0))


async def _stepped(redis_url: str, proxy_url: str) -> tuple[Client, Client]:
    """A client for the test, and one for the worker through the proxy; a long workflow
    task timeout, so that only the answer's return can explain a quick finish."""
    c = await Client.connect(redis_url, workflow_task_timeout=timedelta(seconds=60))
    wc = await Client.connect(proxy_url, workflow_task_timeout=timedelta(seconds=60))
    return c, wc


@pytest.mark.parametrize("script", ["wft_complete", "act_done"])
async def test_a_stopping_worker_whose_answer_was_lost_still_gets_what_redis_handed_it(
    redis_url: str, script: str
) -> None:
    """The call landed, every answer to it (the client's retries too) was cut, and the
    worker was told to stop meanwhile: it sends the call again, gets the activity (or the
    workflow task) Redis started in its name, and runs it; nothing waits for a deadline."""
    async with FaultProxy(redis_url) as proxy:
        c, wc = await _stepped(redis_url, proxy.url)
        try:
            w = Worker(wc, workflows=[flows.SequentialWorkflow], activities=[flows.step], **FAST)
            async with w:
                # the first task hands over step 0; its result starts the second task
                fault = proxy.drop_reply_on(script_call(script), times=_client_attempts(wc))
                h = await c.start_workflow(flows.SequentialWorkflow, {"steps": 2})
                await fault.wait_hits(1, timeout=15)
                w.stop()
            async with Worker(c, workflows=[flows.SequentialWorkflow], activities=[flows.step], **FAST):
                assert await h.result(timeout=20) == 3
        finally:
            await wc.close()
            await c.close()
    events = [e.type for e in await h.history()]
    # no attempt timed out, no workflow task timed out: what was handed over ran
    assert "ActivityTaskRetrying" not in events and "WorkflowTaskTimedOut" not in events
    assert events.count("ActivityTaskCompleted") == 2


PEAK: dict[str, int] = {"now": 0, "peak": 0}


@workflows.activity()
async def counted(i: int) -> int:
    PEAK["now"] += 1
    PEAK["peak"] = max(PEAK["peak"], PEAK["now"])
    try:
        await asyncio.sleep(0.2)
    finally:
        PEAK["now"] -= 1
    return i


@workflows.workflow.define(name="eager_fan")
class Fan:
    @workflows.workflow.entrypoint
    async def run(self, n: int) -> int:
        total = 0
        for _ in range(3):
            total += sum(await asyncio.gather(*(counted(i) for i in range(n))))
        return total


async def test_handed_over_activities_never_run_past_the_workers_slots(client: Client) -> None:
    """A completion is handed only slots nobody holds: not those of an act_start in
    flight, nor those of a read that came back with more than there is room for."""
    PEAK.update(now=0, peak=0)
    async with Worker(
        client, workflows=[Fan], activities=[counted], max_concurrent_activities=2, **FAST
    ) as w:  # type: ignore[arg-type]
        hs = [await client.start_workflow(Fan, {"n": 3}) for _ in range(6)]
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, len(w.running))
                await asyncio.sleep(0.001)

        watcher = asyncio.create_task(watch())
        try:
            assert [await h.result(timeout=60) for h in hs] == [9] * 6
        finally:
            watcher.cancel()
    assert peak <= 2 and PEAK["peak"] <= 2, (peak, PEAK)


async def test_a_stopping_worker_hands_back_the_messages_it_read_and_could_not_start(client: Client) -> None:
    """One slot: the first of three activities is handed over, the read waiting for the
    slot brings a second message it has no room for. A graceful stop marks that message
    idle, so the next worker takes it at once, not after its reclaim_idle."""
    PEAK.update(now=0, peak=0)
    aq = client.keyspace.queue(0, "default", "act")
    async with Worker(
        client, workflows=[Fan], activities=[counted], max_concurrent_activities=1, **FAST
    ) as w:  # type: ignore[arg-type]
        h = await client.start_workflow(Fan, {"n": 3})
        assert w.acts is not None
        await wait_until(lambda: len(w.acts._backlog) > 0, 10)  # type: ignore[union-attr]
    pending: Any = await client.redis.xpending_range(aq, "rf", "-", "+", 10)
    assert pending and all(p["time_since_delivered"] >= 3_600_000 for p in pending), pending
    started = time.monotonic()
    async with Worker(client, workflows=[Fan], activities=[counted]):  # reclaim_idle 30 s
        assert await h.result(timeout=25) == 9
    assert time.monotonic() - started < 20
