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


@workflow.define(name="bad_continue_workflow")
class BadContinueWorkflow:
    @workflow.entrypoint
    async def run(self, p: Chain) -> int:
        workflow.continue_as_new({"n": "not a number", "until": 1})


class Mailbox(BaseModel):
    generation: int = 0
    seen: list[str] = []


@workflow.define(name="mailbox_workflow")
class MailboxWorkflow:
    """Continues as new after each of its first two signals, then waits to be ended."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    @workflow.signal()
    def note(self, word: str) -> None:
        self.seen.append(word)

    @workflow.query()
    def words(self) -> list[str]:
        return self.seen

    @workflow.update()
    def count(self) -> int:
        return len(self.seen)

    @workflow.entrypoint
    async def run(self, p: Mailbox) -> list[str]:
        self.seen = p.seen + self.seen
        await workflow.wait_condition(lambda: len(self.seen) > p.generation)
        if p.generation < 2:
            workflow.continue_as_new(Mailbox(generation=p.generation + 1, seen=self.seen))
        await workflow.wait_condition(lambda: False)
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


async def test_a_started_handle_reaches_its_chains_current_run(client: Client) -> None:
    async def runs(n: int) -> bool:
        return len(await _runs_of(client, h)) >= n

    async with _worker(client, MailboxWorkflow):
        h = await client.start_workflow(MailboxWorkflow, Mailbox(), execution_id="mail-1")
        first = h.run_id
        await h.signal("note", "a")  # its run continues as new
        await wait_until(lambda: runs(2), 15)
        await h.signal("note", "b")  # reaches the second run, which continues again
        await wait_until(lambda: runs(3), 15)
        chain = await _runs_of(client, h)
        assert len(chain) == 3
        # the middle run the handle reached last, gone past its retention: the handle
        # still knows its chain and reaches the current run
        await client.redis.delete(client.keyspace.run(h.shard, chain[1]))
        assert await h.query("words") == ["a", "b"]
        assert await h.execute_update("count") == 2
        described = await h.describe()
        assert (described.run_id, described.status) == (chain[2], "running")
        assert h.run_id == first  # (still the run it started: history() reads that one)
        # a handle on one run reaches only that run
        exact = client.get_workflow_handle("mail-1", run_id=first)
        with pytest.raises(workflows.WorkflowNotFoundError, match="not running"):
            await exact.signal("note", "c")
        # the first run gone past its retention: result() still follows the chain
        await client.redis.delete(client.keyspace.run(h.shard, first))
        with pytest.raises(TimeoutError):
            await exact.result(timeout=0.5)
        await h.terminate("done")
        with pytest.raises(workflows.WorkflowFailureError) as ei:
            await exact.result(timeout=5)
        assert (ei.value.run_id, ei.value.status) == (chain[2], "terminated")
        # the id started again is another chain: the old handle does not reach it
        again = await client.start_workflow(MailboxWorkflow, Mailbox(), execution_id="mail-1")
        with pytest.raises(workflows.WorkflowNotFoundError, match="not running"):
            await h.signal("note", "x")
        assert (await again.describe()).status == "running" and await again.query("words") == []
        await again.terminate("done")


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


async def test_a_run_at_the_hard_limit_fails_even_with_a_signal_waiting(client: Client) -> None:
    # a signal that arrives while the task runs would normally get another task at once:
    # at the limit it must not, or a steady stream of signals keeps the run growing
    stream, (h, msgid, st) = await started_task(client)
    run, ks = h.run_id or "", client.keyspace
    await client.redis.hset(ks.run(0, run), "last_eid", 51_200)
    signal = pack({"name": "more", "input": pack(None)})
    assert (await client.protocol.signal(h.id, run, signal, "")).reply is Reply.OK
    task = TaskCompletion(run, h.id, st.fence, msgid, [])
    (done,) = await client.protocol.wft_complete(0, stream, "default", 60_000, "w1", 0, [task])
    assert done.reply is Reply.OK
    assert await client.redis.hget(ks.run(0, run), "status") == b"failed"
    with pytest.raises(workflows.WorkflowFailureError) as ei:
        await h.result(timeout=5)
    assert ei.value.cause.type == "HistoryLimitExceeded"


def test_outside_a_workflow_continue_as_new_raises_and_should_continue_is_false() -> None:
    with pytest.raises(RuntimeError, match="can only be called from workflow code"):
        workflow.continue_as_new(1)
    assert workflow.should_continue_as_new() is False


def test_the_long_history_warning_comes_once_per_step_not_with_every_replay() -> None:
    from structlog.testing import capture_logs

    from rillflow.worker.workflow_tasks import _warn_if_long
    from rillflow_runtime.protocol import WftStarted

    def task(since: int, last: int, completed_at: int) -> tuple[WftStarted, str, list[HistoryEvent]]:
        st = WftStarted(Reply.OK, workflow_id="w", last_event_id=last, since=since)
        events = [HistoryEvent(completed_at, "WorkflowTaskCompleted", 0, {})] if completed_at else []
        return st, "r", events

    with capture_logs() as logs:
        _warn_if_long(*task(4090, 4100, 0))  # crosses 4,096 on a cached instance: said
        _warn_if_long(*task(0, 4110, 4100))  # a replay of the whole history: not again
        _warn_if_long(*task(0, 4110, 4000))  # its events cross it, replayed: said
        _warn_if_long(*task(8000, 8100, 0))  # 8,192 is not crossed yet: not said
    assert [e["events"] for e in logs if "history is long" in e["event"]] == [4100, 4110]


async def test_params_that_do_not_fit_fail_the_task_naming_continue_as_new(client: Client) -> None:
    async with _worker(client, BadContinueWorkflow):
        h = await client.start_workflow(BadContinueWorkflow, Chain(n=0, until=1))

        async def failed() -> bool:
            return (await h.describe()).workflow_task_failures >= 1

        await wait_until(failed, 15)
        d = await h.describe()
    assert d.status == "running" and d.last_workflow_task_failure is not None
    assert "continue_as_new() in workflow 'bad_continue_workflow'" in d.last_workflow_task_failure.message
    assert "n: Input should be a valid integer" in d.last_workflow_task_failure.message
    await h.terminate("done")
