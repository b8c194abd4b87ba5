"""Speculative first tasks: a run's first task message carries its start event, the
worker runs the task at once on its estimate of Redis's clock, and one wft_complete call
records the task's start and completion. Redis records it only as it was run (nothing
happened to the run meanwhile, the time lies between the run's start and Redis's own
clock); otherwise it starts the task the usual way, and the worker runs it from the
history, so that a workflow never sees a history it was not recorded on."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import rillflow as workflows
from rillflow import Client, Worker, workflow
from rillflow.history import HistoryEvent
from rillflow.worker.clock import RedisClock
from rillflow_runtime.codec import pack, unpack
from rillflow_runtime.model import CommandKind, EventType, Reply
from rillflow_runtime.protocol import CompletionReply, TaskCompletion, WftStartItem
from tests import flows
from tests.conftest import FAST
from tests.test_scripts import _activity, _Cmd, read_one, snapshot

pytestmark = pytest.mark.anyio

RETENTION = 60_000
TIMEOUT = 10_000


@workflows.workflow.define(name="spec_clock")
class ClockWorkflow:
    @workflows.workflow.entrypoint
    async def run(self) -> int:
        return int(workflow.now().timestamp() * 1000)


@workflows.workflow.define(name="spec_greeter")
class GreeterWorkflow:
    def __init__(self) -> None:
        self.names: list[str] = []

    @workflows.workflow.signal()
    def greet(self, name: str) -> None:
        self.names.append(name)

    @workflows.workflow.entrypoint
    async def run(self) -> list[str]:
        await workflow.wait_condition(lambda: bool(self.names))
        return self.names


async def redis_ms(client: Client) -> int:
    s, us = await client.redis.time()
    return int(s) * 1000 + int(us) // 1000


async def first_message(client: Client) -> tuple[Any, str, str, dict[bytes, bytes]]:
    """A started run (no worker) and its first task message as a worker reads it."""
    h = await client.start_workflow(flows.HelloWorkflow, {"name": "x"})
    stream = client.keyspace.queue(0, "default", "wft")
    msgid, fields = await read_one(client, stream, "w1")
    return h, stream, msgid, fields


def _complete() -> _Cmd:
    return _Cmd(CommandKind.COMPLETE_WORKFLOW, pack({"result": 1}), [])


async def speculate(
    client: Client,
    stream: str,
    h: Any,
    msgid: str,
    at_ms: int,
    *cmds: _Cmd,
    worker: str = "w1",
    eager: frozenset[int] = frozenset(),
) -> CompletionReply:
    task = TaskCompletion(h.run_id, h.id, "", msgid, list(cmds), eager, at_ms)  # type: ignore[arg-type]
    (reply,) = await client.protocol.wft_complete(
        0, stream, "default", RETENTION, worker, 5_000, [task], timeout_ms=TIMEOUT, max_events=100
    )
    return reply


async def history(client: Client, h: Any) -> list[HistoryEvent]:
    return [HistoryEvent.from_entry(e) for e in await client.protocol.history(0, h.id, h.run_id)]


async def test_the_first_task_message_carries_the_start_event(client: Client) -> None:
    h, _stream, _msgid, fields = await first_message(client)
    (started,) = await history(client, h)
    assert fields[b"wtype"] == b"hello_workflow" and int(fields[b"t"]) == started.time_ms
    assert unpack(fields[b"ev"]) == started.attributes


async def test_a_speculative_task_is_started_and_completed_in_one_call_and_a_repeat_answers_the_same(
    client: Client,
) -> None:
    h, stream, msgid, _ = await first_message(client)
    ks, run = client.keyspace, h.run_id
    at = await redis_ms(client)
    done = await speculate(client, stream, h, msgid, at, _activity(1))
    assert done.reply is Reply.OK and done.fence.startswith("1-") and done.last_event_id == 3
    events = await history(client, h)
    assert [e.type for e in events] == [
        EventType.WORKFLOW_EXECUTION_STARTED,
        EventType.WORKFLOW_TASK_COMPLETED,
        EventType.ACTIVITY_TASK_SCHEDULED,
    ]
    # the task started when the worker said: its workflow saw that time
    assert events[1].attributes["t0"] == at and events[1].attributes["fence"] == done.fence
    r = await client.redis.hmget(ks.run(0, run), ["wft", "wft_msg", "wft_seq"])
    assert r == [b"", b"", b"1"]
    assert await client.redis.xlen(stream) == 0  # its message is gone
    timers = [m.decode() for m in await client.redis.zrange(ks.timers(0), 0, -1)]
    assert not [m for m in timers if m.startswith("wft_timeout|")]  # never timed: never left started
    before = await snapshot(client)
    again = await speculate(client, stream, h, msgid, at, _activity(1))
    assert (again.reply, again.fence, again.last_event_id) == (Reply.OK, done.fence, done.last_event_id)
    assert await snapshot(client) == before


async def test_a_speculative_task_that_closes_the_run_answers_a_repeat_the_same(client: Client) -> None:
    h, stream, msgid, _ = await first_message(client)
    at = await redis_ms(client)
    done = await speculate(client, stream, h, msgid, at, _complete())
    assert done.reply is Reply.OK
    assert await h.result(timeout=5) == 1
    before = await snapshot(client)
    again = await speculate(client, stream, h, msgid, at, _complete())
    assert (again.reply, again.fence, again.last_event_id) == (Reply.OK, done.fence, done.last_event_id)
    assert await snapshot(client) == before


@pytest.mark.parametrize("when", ["future", "before_start", "too_old"])
async def test_a_time_redis_cannot_vouch_for_starts_the_task_the_usual_way(client: Client, when: str) -> None:
    h, stream, msgid, fields = await first_message(client)
    start_ms = int(fields[b"t"])
    # too old: the time is valid, but more than a workflow task timeout (here 5 ms) ago
    at = {"future": await redis_ms(client) + 60_000, "before_start": start_ms - 1, "too_old": start_ms}[when]
    timeout = 5 if when == "too_old" else TIMEOUT
    await asyncio.sleep(0.02)
    task = TaskCompletion(h.run_id, h.id, "", msgid, [_complete()], speculative_ms=at)  # type: ignore[list-item]
    (r,) = await client.protocol.wft_complete(
        0, stream, "default", RETENTION, "w1", 5_000, [task], timeout_ms=timeout, max_events=100
    )
    assert r.reply is Reply.STARTED and r.started is not None
    st = r.started
    # started for w1 as wft_start would, with the whole history, and nothing of the commands
    assert st.fence.startswith("1-") and st.since == 0 and st.now_ms >= start_ms
    assert [HistoryEvent.from_entry(e).type for e in st.events] == [EventType.WORKFLOW_EXECUTION_STARTED]
    assert await client.redis.hmget(client.keyspace.run(0, h.run_id), ["wft", "wft_by", "status"]) == [
        b"started",
        b"w1",
        b"running",
    ]
    # a repeat gets the same start; another worker finds it busy
    again = await client.protocol.wft_complete(
        0, stream, "default", RETENTION, "w1", 5_000, [task], timeout_ms=timeout, max_events=100
    )
    assert again[0].started is not None and again[0].started.fence == st.fence
    other = await speculate(client, stream, h, msgid, await redis_ms(client), _complete(), worker="w2")
    assert other.reply is Reply.BUSY
    # and the task completes as any started one
    normal = TaskCompletion(h.run_id, h.id, st.fence, msgid, [_complete()])  # type: ignore[list-item]
    (closed,) = await client.protocol.wft_complete(0, stream, "default", RETENTION, "w1", 5_000, [normal])
    assert closed.reply is Reply.OK
    assert await h.result(timeout=5) == 1


async def test_an_event_after_the_message_was_written_starts_the_task_with_it(client: Client) -> None:
    """A signal reached the run while its first task waited: a task run on the start
    event alone would not have seen it, so Redis starts the task with both."""
    h = await client.start_workflow(GreeterWorkflow)
    await h.signal("greet", {"name": "ann"})
    stream = client.keyspace.queue(0, "default", "wft")
    msgid, _ = await read_one(client, stream, "w1")
    r = await speculate(client, stream, h, msgid, await redis_ms(client), _complete())
    assert r.reply is Reply.STARTED and r.started is not None
    assert [HistoryEvent.from_entry(e).type for e in r.started.events] == [
        EventType.WORKFLOW_EXECUTION_STARTED,
        EventType.WORKFLOW_EXECUTION_SIGNALED,
    ]
    assert len(await history(client, h)) == 2  # nothing of the speculative task recorded


async def test_bad_commands_from_a_speculative_task_are_not_written(client: Client) -> None:
    h, stream, msgid, _ = await first_message(client)
    bad = _Cmd(CommandKind.START_TIMER, pack({"seq": 1, "duration_ms": 0}), [1, 0])
    r = await speculate(client, stream, h, msgid, await redis_ms(client), _activity(1), bad)
    assert r.reply is Reply.STARTED  # run again the usual way, it is refused there, with a fence
    assert len(await history(client, h)) == 1
    assert await client.redis.xlen(client.keyspace.queue(0, "default", "act")) == 0


async def test_a_message_that_no_longer_stands_for_the_task_is_dropped(client: Client) -> None:
    h, stream, msgid, _ = await first_message(client)
    await h.terminate("gone")
    r = await speculate(client, stream, h, msgid, await redis_ms(client), _complete())
    assert r.reply is Reply.STALE
    assert await client.redis.xlen(stream) == 0


async def test_a_worker_runs_first_tasks_speculatively_on_redis_time(client: Client) -> None:
    async with Worker(client, workflows=[ClockWorkflow], **FAST) as w:
        before = await redis_ms(client)
        h = await client.start_workflow(ClockWorkflow)
        seen = await h.result(timeout=5)
        after = await redis_ms(client)
        assert w.stats.speculation_refused == 0
    events = await history(client, h)
    assert [e.type for e in events] == [
        EventType.WORKFLOW_EXECUTION_STARTED,
        EventType.WORKFLOW_TASK_COMPLETED,
        EventType.WORKFLOW_EXECUTION_COMPLETED,
    ]
    # the workflow's clock is the task's recorded start, between the run's start and its close
    assert seen == events[1].attributes["t0"]
    assert events[0].time_ms <= seen <= events[2].time_ms <= after and before <= events[0].time_ms


async def test_a_worker_whose_speculation_is_refused_runs_the_task_from_the_history(client: Client) -> None:
    h = await client.start_workflow(GreeterWorkflow)
    await h.signal("greet", {"name": "ann"})  # after the message: the speculation is refused
    async with Worker(client, workflows=[GreeterWorkflow], **FAST) as w:
        assert await h.result(timeout=5) == ["ann"]
        # (a starting worker knows Redis's time before its first read: it tried)
        assert (w.stats.speculated, w.stats.speculation_refused) == (0, 1)
    types = [e.type for e in await history(client, h)]
    assert types.count(EventType.WORKFLOW_TASK_COMPLETED) == 1


async def test_a_failing_first_task_is_recorded_once(client: Client) -> None:
    """A speculative task that raises is run again the usual way, which records it."""
    async with Worker(client, workflows=[flows.BuggyWorkflow], **FAST):
        h = await client.start_workflow(flows.BuggyWorkflow)
        for _ in range(200):
            d = await h.describe()
            if d.workflow_task_failures:
                break
            await asyncio.sleep(0.02)
    assert d.workflow_task_failures >= 1 and d.status == "running"
    types = [e.type for e in await history(client, h)]
    assert types == [EventType.WORKFLOW_EXECUTION_STARTED, EventType.WORKFLOW_TASK_FAILED]


async def test_a_large_input_goes_the_usual_way(client: Client) -> None:
    h = await client.start_workflow(flows.HelloWorkflow, {"name": "x" * 2000})
    _msgid, fields = await read_one(client, client.keyspace.queue(0, "default", "wft"), "w1")
    assert set(fields) == {b"run", b"wid"}
    assert h.run_id


async def test_the_clock_estimate_is_never_ahead_of_redis(client: Client) -> None:
    clock = RedisClock()
    assert clock.now_ms() is None
    for _ in range(100):
        clock.observe(await redis_ms(client))
        estimate = clock.now_ms()
        assert estimate is not None and estimate <= await redis_ms(client)
    clock.forget()
    assert clock.now_ms() is None


async def test_a_start_item_for_a_speculated_run_is_refused_as_stale(client: Client) -> None:
    """The message of a task recorded speculatively is gone: a late wft_start of it (a
    read from before) finds nothing to start."""
    h, stream, msgid, _ = await first_message(client)
    assert (await speculate(client, stream, h, msgid, await redis_ms(client), _activity(1))).reply is Reply.OK
    (st,) = await client.protocol.wft_start(0, stream, TIMEOUT, 100, "w2", [WftStartItem(h.run_id, msgid, 0)])
    assert st.reply is Reply.STALE


async def test_only_the_same_call_is_answered_as_a_repeat(client: Client) -> None:
    """Another worker that ran the same first message (a reclaim while the first worker's
    call was on its way), or the same worker running it again, is not told it succeeded:
    its instance ran on another time, and the record is the first call's."""
    h, stream, msgid, _ = await first_message(client)
    at = await redis_ms(client)
    done = await speculate(client, stream, h, msgid, at, _activity(1))
    assert done.reply is Reply.OK
    before = await snapshot(client)
    other = await speculate(client, stream, h, msgid, at, _activity(1), worker="w2")
    later = await speculate(client, stream, h, msgid, at + 1, _activity(1))
    assert (other.reply, later.reply) == (Reply.STALE, Reply.STALE)
    assert await snapshot(client) == before
    again = await speculate(client, stream, h, msgid, at, _activity(1))
    assert (again.reply, again.fence) == (Reply.OK, done.fence)


async def test_a_first_message_that_cannot_be_read_whole_is_started_the_usual_way(client: Client) -> None:
    h = await client.start_workflow(flows.HelloWorkflow, {"name": "x"})
    ks, run = client.keyspace, h.run_id or ""
    stream = ks.queue(0, "default", "wft")
    ((old, fields),) = await client.redis.xrange(stream)
    # (as a message of some other version might be: an 'ev' with a time this one cannot read)
    msg = await client.redis.xadd(stream, {**fields, b"t": b"soon"})
    await client.redis.xdel(stream, old)
    await client.redis.hset(ks.run(0, run), "wft_msg", msg)
    acts = [flows.hello, flows.hello_sync]
    async with Worker(client, workflows=[flows.HelloWorkflow], activities=acts, **FAST) as w:  # type: ignore[list-item]
        assert len(await h.result(timeout=10)) == 2
        assert w.stats.speculated == 0


@pytest.mark.parametrize("shape", ["closes", "one", "ten_handed"])
async def test_a_speculative_task_keeps_the_run_hash_compact(client: Client, shape: str) -> None:
    """Every value of a run hash stays within the server's compact-encoding limit (64
    bytes), the record of a speculative call included (late, with many activities handed
    over): one longer value would double what each run costs for good (the encoding
    never goes back)."""
    h, stream, msgid, _ = await first_message(client)
    n = 10 if shape == "ten_handed" else 1
    cmds = [_complete()] if shape == "closes" else [_activity(i) for i in range(1, n + 1)]
    eager = frozenset(range(1, n + 1)) if shape == "ten_handed" else frozenset()
    worker = "a-rather-long-worker-identity-0123456789"
    await asyncio.sleep(0.05)  # (started a while after the run: a larger offset)
    at = await redis_ms(client) - 1
    done = await speculate(client, stream, h, msgid, at, *cmds, worker=worker, eager=eager)
    assert done.reply is Reply.OK and len(done.eager) == len(eager)
    again = await speculate(client, stream, h, msgid, at, *cmds, worker=worker, eager=eager)
    assert again.eager == done.eager  # (the record reads its ranges back)
    rk = client.keyspace.run(0, h.run_id)
    assert len(await client.redis.hget(rk, "wft_done") or b"") <= 64
    assert await client.redis.object("encoding", rk) == b"listpack"
