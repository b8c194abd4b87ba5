"""Reset: an execution runs again from one of its workflow tasks, with the code deployed
now. The new run holds the events before that task, a WorkflowTaskFailed naming the
reset, and the signals and updates recorded after it unless excluded; the old run, if
running, ends terminated; what was pending at that point is pending again."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

import rillflow as workflows
from rillflow import Client, Worker
from tests import flows
from tests.conftest import FAST, wait_until
from tests.test_cli import assert_one_line, rf

pytestmark = pytest.mark.anyio
workflow = workflows.workflow
RAN: list[str] = []


@workflows.activity(name="reset_record")
async def record(word: str) -> str:
    RAN.append(word)
    return word


@workflows.activity(name="reset_slow")
async def slow(word: str) -> str:
    await asyncio.sleep(0.5)
    RAN.append(word)
    return word


@pytest.fixture(autouse=True)
def _fresh() -> None:
    RAN.clear()


@workflow.define(name="reset_words")
class WordsWorkflow:
    def __init__(self) -> None:
        self.words: list[str] = []

    @workflow.signal()
    def add(self, word: str) -> None:
        self.words.append(word)

    @workflow.update()
    def add_now(self, word: str) -> int:
        self.words.append(word)
        return len(self.words)

    @workflow.query()
    def seen(self) -> list[str]:
        return self.words

    @workflow.entrypoint
    async def run(self, first: str) -> list[str]:
        await record(first)
        await workflow.wait_condition(lambda: "done" in self.words)
        return [first, *self.words]


class Proceeds:
    """A workflow that waits for its `proceed` signal (self.go)."""

    def __init__(self) -> None:
        self.go = False

    @workflow.signal()
    def proceed(self) -> None:
        self.go = True


@workflow.define(name="reset_deploy")
class BeforeTheDeploy(Proceeds):
    @workflow.entrypoint
    async def run(self) -> str:
        a = await record("old-first")
        await workflow.wait_condition(lambda: self.go)
        return a


@workflow.define(name="reset_deploy")
class AfterTheDeploy(Proceeds):
    """The same workflow changed: its first step is another activity (a non-determinism
    for the runs the old code started)."""

    @workflow.entrypoint
    async def run(self) -> str:
        a = await flows.hello("new")
        await workflow.wait_condition(lambda: self.go)
        return a


@workflow.define(name="reset_buggy")
class BuggyWorkflow(Proceeds):
    @workflow.entrypoint
    async def run(self) -> str:
        await record("step")
        await workflow.wait_condition(lambda: self.go)
        raise RuntimeError("a bug after the signal")  # fails the workflow task, for ever


@workflow.define(name="reset_buggy")
class FixedWorkflow(Proceeds):
    @workflow.entrypoint
    async def run(self) -> str:
        a = await record("step")
        await workflow.wait_condition(lambda: self.go)
        return f"fixed after {a}"


FLAKY: list[str] = []  # set once the flaky step has failed


@workflow.define(name="reset_flaky", enforce_determinism=False)
class FlakyThenBuggyWorkflow(Proceeds):
    """Its second task fails once (then gets past it); after the signal it fails for good."""

    @workflow.update()
    async def wait_go(self) -> str:
        await workflow.wait_condition(lambda: self.go)
        return "went"

    @workflow.entrypoint
    async def run(self) -> str:
        await record("step")
        if not FLAKY:
            FLAKY.append("failed")
            raise RuntimeError("transient: once")
        await workflow.wait_condition(lambda: self.go)
        if len(FLAKY) < 2:
            raise RuntimeError("a bug after the signal")
        return "fixed"


@workflow.define(name="reset_pending")
class PendingWorkflow:
    @workflow.entrypoint
    async def run(self) -> list[str]:
        fast = record("fast")
        late = slow("slow")
        out = list(await asyncio.gather(fast, late))
        await workflow.sleep(timedelta(milliseconds=300))
        return out


def _worker(client: Client, *wfs: type) -> Worker:
    return Worker(client, workflows=list(wfs), activities=[record, slow, flows.hello], **FAST)  # type: ignore[arg-type]


def _types(events: list[workflows.HistoryEvent]) -> list[str]:
    return [e.type for e in events]


def _tasks(events: list[workflows.HistoryEvent]) -> list[int]:
    return [e.event_id for e in events if e.type == "WorkflowTaskCompleted"]


async def _has(h: Any, etype: str) -> bool:
    return etype in _types(await h.history())


async def test_deploy_and_reset_fixes_a_run_stuck_on_non_determinism(client: Client, redis_url: str) -> None:
    async with _worker(client, BeforeTheDeploy):
        old = await client.start_workflow(BeforeTheDeploy, execution_id="deploy-1")
        await wait_until(lambda: _has(old, "ActivityTaskCompleted"), 10)
        await wait_until(lambda: _tasks_done(old, 2), 10)
    async with _worker(client, AfterTheDeploy):
        await old.signal(AfterTheDeploy.proceed)  # its next task replays the old history: refused
        await wait_until(lambda: _task_failed(old), 10)
        failure = (await old.describe()).last_workflow_task_failure
        assert failure is not None and failure.type == "NonDeterminismError"
        first = _tasks(await old.history())[0]  # before the change: its first task
        p = await asyncio.to_thread(
            rf,
            "reset",
            "deploy-1",
            "--event-id",
            str(first),
            "--reason",
            "deployed the fix",
            "--url",
            redis_url,
        )
        assert p.returncode == 0 and f"reset deploy-1 to event {first}: new run" in p.stdout, p.stderr
        new = client.get_workflow_handle("deploy-1")
        assert await new.result(timeout=15) == "hello new"  # the signal came along
    d = await client.get_workflow_handle("deploy-1", run_id=old.run_id).describe()
    assert d.status == "terminated" and "deployed the fix" in str(d.failure)
    events = await new.history()
    assert events[0].attributes["reset_from_run"] == old.run_id
    marker = next(e for e in events if e.type == "WorkflowTaskFailed")
    assert marker.attributes["failure"]["type"] == "ResetWorkflow"
    assert marker.attributes["failure"]["message"] == "deployed the fix"
    assert _types(events).count("WorkflowExecutionSignaled") == 1


async def _tasks_done(h: Any, n: int) -> bool:
    return len(_tasks(await h.history())) >= n


async def _task_failed(h: Any) -> bool:
    return bool((await h.describe()).workflow_task_failures)


async def _words_run(client: Client, execution_id: str) -> Any:
    """A run that got a signal, an update and its "done" signal after its first task."""
    h = await client.start_workflow(WordsWorkflow, "a", execution_id=execution_id)
    await wait_until(lambda: _tasks_done(h, 2), 10)  # the activity done, waiting
    await h.signal(WordsWorkflow.add, "x")
    assert await h.execute_update(WordsWorkflow.add_now, "y") == 2
    await h.signal(WordsWorkflow.add, "done")
    assert await h.result(timeout=10) == ["a", "x", "y", "done"]
    return h


async def test_signals_and_updates_after_the_point_are_applied_again_unless_excluded(
    client: Client,
) -> None:
    async with _worker(client, WordsWorkflow):
        # a closed run, reset to its first task: all of it runs again, its activity too
        h = await _words_run(client, "words-all")
        again = await client.reset_workflow("words-all", await _first_task(h), "again")
        assert await again.result(timeout=10) == ["a", "x", "y", "done"]
        assert RAN == ["a", "a"]
        assert (
            await client.get_workflow_handle("words-all", run_id=h.run_id).describe()
        ).status == "completed"
        # without the updates: the signals alone come back, and the run completes
        h = await _words_run(client, "words-no-updates")
        new = await client.reset_workflow("words-no-updates", await _first_task(h), exclude_updates=True)
        assert await new.result(timeout=10) == ["a", "x", "done"]
        assert "WorkflowExecutionUpdateAccepted" not in _types(await new.history())
        # without the signals: the update alone comes back, and the run waits for "done"
        h = await _words_run(client, "words-no-signals")
        new = await client.reset_workflow("words-no-signals", await _first_task(h), exclude_signals=True)
        await wait_until(lambda: _seen(new, ["y"]), 10)
        # a running run reset: it is terminated, with the reason
        last = await client.reset_workflow("words-no-signals", await _first_task(new), "once more")
        d = await new.describe()
        assert d.status == "terminated" and "once more" in str(d.failure)
        await wait_until(lambda: _seen(last, ["y"]), 10)  # (the update is among its copied events)
        await last.terminate("done")


async def _first_task(h: Any) -> int:
    return _tasks(await h.history())[0]


async def _seen(h: Any, words: list[str]) -> bool:
    return bool(await h.query(WordsWorkflow.seen) == words)


async def test_what_was_pending_at_the_point_is_pending_again(client: Client) -> None:
    async with _worker(client, PendingWorkflow):
        h = await client.start_workflow(PendingWorkflow, execution_id="pending-1")
        assert await h.result(timeout=15) == ["fast", "slow"]
        events = await h.history()
        # the task that saw the fast result: the slow activity and no timer yet
        point = next(
            t
            for t in _tasks(events)
            if any(e.type == "ActivityTaskCompleted" and e.event_id < t for e in events)
        )
        RAN.clear()
        new = await client.reset_workflow("pending-1", point)
        assert await new.result(timeout=15) == ["fast", "slow"]
        assert RAN == ["slow"]  # run again; the fast one's result was kept
    assert _types(await new.history()).count("TimerFired") == 1


async def test_last_good_is_the_last_task_before_the_first_failure(client: Client, redis_url: str) -> None:
    async with _worker(client, BuggyWorkflow):
        h = await client.start_workflow(BuggyWorkflow, execution_id="buggy-1")
        await wait_until(lambda: _tasks_done(h, 2), 10)
        await h.signal(BuggyWorkflow.proceed)
        await wait_until(lambda: _task_failed(h), 10)
    tasks = _tasks(await h.history())  # (no worker now: the failing task waits)
    p = await asyncio.to_thread(rf, "reset", "buggy-1", "--to", "last-good", "--url", redis_url)
    assert p.returncode == 0 and f"to event {tasks[-1]}:" in p.stdout, p.stderr
    async with _worker(client, FixedWorkflow):
        assert await client.get_workflow_handle("buggy-1").result(timeout=10) == "fixed after step"
    # the new run's reset marker is no failure of its own
    new = await client.get_workflow_handle("buggy-1").history()
    assert _types(new).count("WorkflowTaskFailed") == 1


async def test_a_reset_to_anything_but_a_completed_task_is_refused(client: Client, redis_url: str) -> None:
    async with _worker(client, WordsWorkflow):
        h = await client.start_workflow(WordsWorkflow, "a", execution_id="refused-1")
        await wait_until(lambda: _tasks_done(h, 2), 10)
        before = await h.history()
        with pytest.raises(workflows.InvalidInputError) as ei:
            await client.reset_workflow("refused-1", 3, "no")
        tasks = ", ".join(str(t) for t in _tasks(before))
        assert f"event 3 of run {h.run_id} is a ActivityTaskScheduled" in str(ei.value)
        assert f"a reset goes to a WorkflowTaskCompleted, one of {tasks}" in str(ei.value)
        with pytest.raises(workflows.InvalidInputError, match="is not in the history"):
            await client.reset_workflow("refused-1", 999)
        with pytest.raises(workflows.InvalidInputError, match="event_id must be a positive event id"):
            await client.reset_workflow("refused-1", "2")  # type: ignore[arg-type]
        with pytest.raises(workflows.WorkflowNotFoundError):
            await client.reset_workflow("no-such-execution", 2)
        assert await h.history() == before and (await h.describe()).status == "running"
        new = await client.reset_workflow("refused-1", 2)
        with pytest.raises(workflows.InvalidInputError, match="is not the current run"):
            await client.reset_workflow("refused-1", 2, run_id=h.run_id)  # no longer current
        await new.terminate("done")
    both = rf("reset", "refused-1", "--event-id", "2", "--to", "last-good", "--url", redis_url)
    assert_one_line(both, 2, "give --event-id N or --to last-good")
    bad = rf("reset", "refused-1", "--to", "yesterday", "--url", redis_url)
    assert_one_line(bad, 2, "--to takes last-good")
    no_failure = rf("reset", "refused-1", "--to", "last-good", "--url", redis_url)
    assert_one_line(no_failure, 2, "the run has no failure to reset past")


async def test_last_good_goes_back_past_the_failure_the_run_is_stuck_on_only(
    client: Client, redis_url: str
) -> None:
    FLAKY.clear()
    async with _worker(client, FlakyThenBuggyWorkflow):
        h = await client.start_workflow(FlakyThenBuggyWorkflow, execution_id="flaky-1")
        await wait_until(lambda: _tasks_done(h, 2), 15)  # past the transient failure
        await h.signal(FlakyThenBuggyWorkflow.proceed)
        await wait_until(lambda: _failures_after_the_signal(h), 15)
    events = await h.history()
    signal_at = next(e.event_id for e in events if e.type == "WorkflowExecutionSignaled")
    want = max(t for t in _tasks(events) if t < signal_at)
    p = await asyncio.to_thread(rf, "reset", "flaky-1", "--to", "last-good", "--url", redis_url)
    assert p.returncode == 0 and f"to event {want}:" in p.stdout, (p.stdout, p.stderr)
    FLAKY.append("fixed")
    RAN.clear()
    async with _worker(client, FlakyThenBuggyWorkflow):
        assert await h.result(timeout=15) == "fixed"  # (a start handle follows the reset)
    assert RAN == []  # the step before that point is not run again


async def _failures_after_the_signal(h: Any) -> bool:
    types = _types(await h.history())
    return "WorkflowExecutionSignaled" in types and types[-1] == "WorkflowTaskFailed"


async def test_handles_and_waiting_update_callers_follow_the_reset(client: Client) -> None:
    FLAKY[:] = ["failed", "fixed"]  # (no failure in this one)
    async with _worker(client, FlakyThenBuggyWorkflow):
        h = await client.start_workflow(FlakyThenBuggyWorkflow, execution_id="follow-1")
        await wait_until(lambda: _tasks_done(h, 2), 15)
        waiting = asyncio.ensure_future(h.execute_update(FlakyThenBuggyWorkflow.wait_go, update_id="u1"))
        await wait_until(lambda: _has(h, "WorkflowExecutionUpdateAccepted"), 10)
        new = await client.reset_workflow("follow-1", _tasks(await h.history())[0])
        await h.signal(FlakyThenBuggyWorkflow.proceed)  # the handle reaches the new run
        assert await waiting == "went"  # the update went on in the new run, and its caller with it
        assert await h.result(timeout=10) == "fixed"
    assert "WorkflowExecutionUpdateCompleted" in _types(await new.history())
    assert "WorkflowExecutionUpdateCompleted" not in _types(
        await client.get_workflow_handle("follow-1", run_id=h.run_id).history()
    )


async def test_a_plan_the_script_cannot_use_writes_nothing(client: Client) -> None:
    from rillflow_runtime.codec import pack
    from rillflow_runtime.model import Reply
    from rillflow_runtime.protocol import ResetPlan
    from tests.test_scripts import snapshot

    h = await client.start_workflow(WordsWorkflow, "a", execution_id="bad-plan")
    before = await snapshot(client)
    events = await h.history()
    good = dict(
        workflow_id="bad-plan",
        old_run=h.run_id or "",
        new_run="new-run",
        last_event_id=events[-1].event_id,
        workflow_type="reset_words",
        task_queue="default",
        timeout_ms=60_000,
        start_body=pack(events[0].attributes),
        terminate_body=pack({"reason": "x"}),
        events=[],
        activities=[],
        timers=[],
        updates=[],
    )
    for bad in (
        {"events": [("NoSuchEvent", 0, b"x")]},
        {"events": [("WorkflowExecutionSignaled", 0, b"")]},
        {"updates": [("", b"")]},
        {"last_event_id": 99},
    ):
        res = await client.protocol.reset(ResetPlan(**{**good, **bad}), 60_000)  # type: ignore[arg-type]
        assert res.reply in (Reply.INVALID, Reply.STALE), (bad, res)
        assert await snapshot(client) == before, bad
    await h.terminate("done")
