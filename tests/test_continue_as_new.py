"""Continue-as-new: a run closes as CONTINUED_AS_NEW and its execution's next run starts
in the same call, with the input it was given; signals that arrived meanwhile go on to
the next run, the execution timeout covers the chain, handle.result() follows it. And
the history's size: workflow.info(), should_continue_as_new(), the hard limit."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import rillflow as workflows
from rillflow import Client, Worker
from rillflow.history import HistoryEvent
from rillflow_runtime.codec import pack, unpack
from rillflow_runtime.model import CommandKind, Reply
from rillflow_runtime.protocol import TaskCompletion, WftStartItem
from tests import flows
from tests.conftest import FAST, wait_until
from tests.test_scripts import _Cmd, read_one, snapshot, started_task

pytestmark = pytest.mark.anyio
workflow = workflows.workflow


class Chain(BaseModel):
    n: int
    until: int
    total: int = 0


@workflow.define(name="chain_workflow")
class ChainWorkflow:
    @workflow.entrypoint
    async def run(self, p: Chain) -> int:
        total = p.total + await flows.step(p.n)
        if p.n + 1 < p.until:
            workflow.continue_as_new(Chain(n=p.n + 1, until=p.until, total=total))
        return total


class Carry(BaseModel):
    generation: int = 0
    seen: list[str] = []
    marker: str = ""


@workflow.define(name="carry_workflow", enforce_determinism=False)
class CarryWorkflow:
    def __init__(self) -> None:
        self.seen: list[str] = []

    @workflow.signal()
    def note(self, word: str) -> None:
        self.seen.append(word)

    @workflow.entrypoint
    async def run(self, p: Carry) -> list[str]:
        self.seen = p.seen + self.seen
        if p.generation == 0:
            await workflow.wait_condition(lambda: len(self.seen) > 0)
            Path(p.marker).write_text("closing")
            time.sleep(1.0)  # the closing task runs long: a signal arrives meanwhile
            workflow.continue_as_new(Carry(generation=1, seen=self.seen))
        await workflow.wait_condition(lambda: len(self.seen) >= 2)
        return self.seen


@workflow.define(name="forever_workflow", execution_timeout=timedelta(seconds=2))
class ForeverWorkflow:
    @workflow.entrypoint
    async def run(self, n: int) -> int:
        await workflow.sleep(0.2)
        workflow.continue_as_new(n + 1)


@workflow.define(name="history_info_workflow")
class HistoryInfoWorkflow:
    def __init__(self) -> None:
        self.go = False

    @workflow.signal()
    def proceed(self) -> None:
        self.go = True

    @workflow.entrypoint
    async def run(self) -> list[list[int]]:
        seen = []
        for _ in range(2):
            info = workflow.info()
            seen.append([info.history_length, info.history_size, int(workflow.should_continue_as_new())])
            await workflow.wait_condition(lambda: self.go)
            self.go = False
        return seen


def _worker(client: Client, *wfs: type) -> Worker:
    return Worker(client, workflows=list(wfs), activities=[flows.step], **FAST)  # type: ignore[arg-type]


async def _runs_of(client: Client, h: Any) -> list[str]:
    """The execution's runs, first to last, by following each close to the next run."""
    ks, runs = client.keyspace, [h.run_id]
    while True:
        fields = await client.redis.hmget(ks.run(h.shard, runs[-1]), ["status", "outcome"])
        if fields[0] != b"continued_as_new":
            return runs
        runs.append(unpack(fields[1])["next_run_id"])


async def test_a_chain_of_runs_carries_its_state_and_result_follows_it_to_the_end(client: Client) -> None:
    async with _worker(client, ChainWorkflow):
        h = await client.start_workflow(ChainWorkflow, Chain(n=0, until=5), execution_id="chain-1")
        assert await h.result(timeout=30) == 1 + 2 + 3 + 4 + 5
    runs = await _runs_of(client, h)
    assert len(runs) == 5 and len(set(runs)) == 5
    current = await client.get_workflow_handle("chain-1").describe()
    assert current.run_id == runs[-1] and current.status == "completed"
    for run in runs[:-1]:
        types = [e.type for e in await client.get_workflow_handle("chain-1", run_id=run).history()]
        assert types[0] == "WorkflowExecutionStarted" and types[-1] == "WorkflowExecutionContinuedAsNew"
    # each run started with the input its predecessor gave
    last = await client.get_workflow_handle("chain-1", run_id=runs[-1]).history()
    assert last[0].attributes["continued_from"] == runs[-2]
    assert await client.get_workflow_handle("chain-1").result(timeout=5) == 15


# what the worker process of the carry test serves (its closing task blocks its loop)
CARRY = [CarryWorkflow, flows.step]
CHAIN = [ChainWorkflow, flows.step]


async def test_signals_that_arrive_while_the_run_continues_go_to_the_next_run(
    client: Client, tmp_path: Path, redis_url: str, worker_procs: Any
) -> None:
    marker = tmp_path / "closing"
    worker_procs(redis_url, target="tests.test_continue_as_new:CARRY")
    h = await client.start_workflow(CarryWorkflow, Carry(marker=str(marker)), execution_id="carry-1")
    await h.signal("note", "first")
    await wait_until(marker.exists, 15)
    await h.signal("note", "late")  # buffered while the closing task runs
    assert await h.result(timeout=30) == ["first", "late"]
    runs = await _runs_of(client, h)
    assert len(runs) == 2
    first = [e.type for e in await client.get_workflow_handle("carry-1", run_id=runs[0]).history()]
    second = [e.type for e in await client.get_workflow_handle("carry-1", run_id=runs[1]).history()]
    assert first.count("WorkflowExecutionSignaled") == 1 and "WorkflowTaskFailed" not in first
    assert second[:2] == ["WorkflowExecutionStarted", "WorkflowExecutionSignaled"]


async def test_the_execution_timeout_covers_the_whole_chain(client: Client) -> None:
    async with _worker(client, ForeverWorkflow):
        h = await client.start_workflow(ForeverWorkflow, 0, execution_id="forever-1")
        with pytest.raises(workflows.WorkflowFailureError) as ei:
            await h.result(timeout=30)
    assert ei.value.status == "timed_out"
    runs = await _runs_of(client, h)
    assert len(runs) >= 2
    ks = client.keyspace
    deadlines = {await client.redis.hget(ks.run(h.shard, r), "deadline_ms") for r in runs[-1:]}
    first_start = await client.redis.hget(ks.run(h.shard, runs[0]), "start_ms")
    last_closed = await client.redis.hget(ks.run(h.shard, runs[-1]), "closed_ms")
    assert deadlines == {None}  # (closed runs keep no deadline)
    assert int(last_closed) - int(first_start) < 10_000  # timed out near 2 s, not 2 s per run


async def test_a_repeated_completion_that_continues_starts_one_next_run(client: Client) -> None:
    stream, (h, msgid, st) = await started_task(client)
    run, ks = h.run_id or "", client.keyspace
    deadline = await client.redis.hget(ks.run(0, run), "deadline_ms")
    start = pack({"workflow_type": "hello_workflow", "task_queue": "default", "input": pack({"name": "y"})})
    cmd = _Cmd(CommandKind.CONTINUE_AS_NEW, start, ["next-1"])
    task = TaskCompletion(run, h.id, st.fence, msgid, [cmd])  # type: ignore[list-item]
    (first,) = await client.protocol.wft_complete(0, stream, "default", 60_000, "w1", 0, [task])
    assert first.reply is Reply.OK
    assert await client.redis.hget(ks.run(0, run), "status") == b"continued_as_new"
    assert await client.redis.hmget(ks.wf(0, h.id), ["run", "status"]) == [b"next-1", b"running"]
    assert await client.redis.pttl(ks.wf(0, h.id)) == -1  # the execution goes on: it does not expire
    assert await client.redis.hget(ks.run(0, "next-1"), "deadline_ms") == deadline
    nxt = [HistoryEvent.from_entry(e) for e in await client.protocol.history(0, h.id, "next-1")]
    assert [e.type for e in nxt] == ["WorkflowExecutionStarted"] and nxt[0].attributes["input"]
    before = await snapshot(client)
    (again,) = await client.protocol.wft_complete(0, stream, "default", 60_000, "w1", 0, [task])
    assert (again.reply, again.last_event_id) == (Reply.OK, first.last_event_id)
    assert await snapshot(client) == before
    # the next run's first task, naming a next run whose id is taken: refused, nothing written
    msg2, _ = await read_one(client, stream, "w1")
    (st2,) = await client.protocol.wft_start(0, stream, 10_000, 100, "w1", [WftStartItem("next-1", msg2, 0)])
    taken = _Cmd(CommandKind.CONTINUE_AS_NEW, start, [run])
    t2 = TaskCompletion("next-1", h.id, st2.fence, msg2, [taken])  # type: ignore[list-item]
    before = await snapshot(client)
    (bad,) = await client.protocol.wft_complete(0, stream, "default", 60_000, "w1", 0, [t2])
    assert bad.reply is Reply.INVALID and f"{run} is taken" in bad.why
    assert await snapshot(client) == before


async def test_info_tells_the_history_size_and_should_continue_as_new_turns_true(client: Client) -> None:
    async with _worker(client, HistoryInfoWorkflow):
        # as if the run had grown long: the next task starts at event 5,001
        h = await _grown(client, "hist-info", 5000)
        await wait_until(lambda: _tasks_done(h, 2), 15)
        await h.signal("proceed")
        seen = await h.result(timeout=20)
    events = await h.history()
    start_size = events[0].size
    assert seen[0] == [1, start_size, 0]
    assert seen[1][0] == 5001 and seen[1][2] == 1
    # a replay sees what each task saw when it ran
    from rillflow.executor import WorkflowInfo, WorkflowInstance, run_task
    from rillflow.workflow import get_workflow_definition

    info = WorkflowInfo(h.id, h.run_id or "", "history_info_workflow", "default", events[0].time)
    inst = WorkflowInstance(get_workflow_definition(HistoryInfoWorkflow), info)
    last = max(i for i, e in enumerate(events) if e.type == "WorkflowTaskCompleted")
    cmds = run_task(inst, events[:last], events[last].attributes["t0"], fresh=True)
    assert unpack(cmds[-1].body)["result"] == seen


async def _tasks_done(h: Any, n: int) -> bool:
    return [e.type for e in await h.history()].count("WorkflowTaskCompleted") >= n


async def _grown(client: Client, execution_id: str, last_eid: int) -> Any:
    """A HistoryInfoWorkflow run whose first task is done, its history's event count then
    set to ``last_eid`` (as if it had grown that long), and woken for its next task."""
    h = await client.start_workflow(HistoryInfoWorkflow, execution_id=execution_id)
    await wait_until(lambda: _tasks_done(h, 1), 15)
    await client.redis.hset(client.keyspace.run(h.shard, h.run_id or ""), "last_eid", last_eid)
    await h.signal("proceed")
    return h


async def test_a_history_at_the_hard_limit_fails_the_run_with_a_clear_reason(client: Client) -> None:
    async with _worker(client, HistoryInfoWorkflow):
        h = await _grown(client, "hist-limit", 51_199)
        with pytest.raises(workflows.WorkflowFailureError) as ei:
            await h.result(timeout=20)
    assert ei.value.cause.type == "HistoryLimitExceeded"
    assert "51200 events" in ei.value.cause.message and "continue as new" in ei.value.cause.message


def test_outside_a_workflow_continue_as_new_raises_and_should_continue_is_false() -> None:
    with pytest.raises(RuntimeError, match="can only be called from workflow code"):
        workflow.continue_as_new(1)
    assert workflow.should_continue_as_new() is False
