"""The deterministic executor: what a dropped instance may still do (nothing), what a run
issues once it closed (nothing), where workflow.random() and uuid4() draw from (the run's
seed), and what the determinism guard refuses (and where it is installed)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any

import pytest
import structlog

import rillflow as workflows
from rillflow import Client, Worker
from rillflow.executor import WorkflowInfo, WorkflowInstance, run_task
from rillflow.history import HistoryEvent
from rillflow.workflow import get_workflow_definition
from rillflow_runtime.codec import unpack
from rillflow_runtime.model import ACTIVATION_ORDER
from tests.conftest import FAST, ROOT, wait_until

pytestmark = pytest.mark.anyio
workflow = workflows.workflow

T0 = 1_700_000_000_000
RAN: list[str] = []  # the steps activities ran, in this process
STEPS: list[str] = []  # the steps workflow code ran


@pytest.fixture(autouse=True)
def _fresh_records() -> None:
    RAN.clear()
    STEPS.clear()


@workflows.activity()
async def record(step: str) -> str:
    RAN.append(step)
    return step


@workflows.activity()
async def wall_clock() -> str:
    """Activities may read the clock and draw random numbers, even on the thread that
    steps workflow code: the guard acts only while it does."""
    return f"{datetime.now()} {date.today()} {time.time()} {uuid.uuid4()} {random.random()} {os.urandom(2)!r}"


def _instance(cls: type, run_id: str = "run-1") -> WorkflowInstance:
    defn = get_workflow_definition(cls)
    return WorkflowInstance(defn, WorkflowInfo("wf-1", run_id, defn.name, "default", datetime.now(UTC)))


def _started(seed: bytes | None = None, **inputs: Any) -> HistoryEvent:
    attrs: dict[str, Any] = {"input": inputs}
    if seed is not None:
        attrs["seed"] = seed  # as the client will record it: 16 random bytes
    return HistoryEvent(1, "WorkflowExecutionStarted", T0, attrs)


def _idents(inst: WorkflowInstance) -> list[tuple[Any, ...]]:
    return [c.ident for c in inst.commands]


# -- teardown ---------------------------------------------------------------------------------
@workflows.workflow.define(name="exec_cleans_up")
class CleansUpWorkflow:
    @workflows.workflow.entrypoint
    async def run(self) -> str:
        try:
            return str(await record("body"))
        finally:
            STEPS.append("finally")
            try:
                await record("cleanup")
            except asyncio.CancelledError as e:
                STEPS.append(str(e))
                await workflow.sleep(60)  # a timer: refused as well


def test_teardown_runs_no_activity_and_records_nothing() -> None:
    inst = _instance(CleansUpWorkflow)
    run_task(inst, [_started()], T0, fresh=True)
    assert _idents(inst) == [("ScheduleActivity", 1, "record")]

    inst.teardown()
    # the finally block ran once, inside the loop: its activity and timer were refused
    assert STEPS[0] == "finally"
    assert "activity 'record' refused" in STEPS[1] and "torn down" in STEPS[1]
    assert len(STEPS) == 2
    assert RAN == []
    assert inst.commands == []
    with pytest.raises(RuntimeError, match="torn down"):
        inst.activate([], T0, False)

    del inst
    gc.collect()
    assert len(STEPS) == 2 and RAN == []  # the collector runs no workflow code


@workflows.workflow.define(name="exec_waits_then_cleans_up")
class WaitsThenCleansUpWorkflow:
    def __init__(self) -> None:
        self.go = False

    @workflows.workflow.signal()
    def proceed(self) -> None:
        self.go = True

    @workflows.workflow.entrypoint
    async def run(self, name: str) -> str:
        try:
            await workflow.wait_condition(lambda: self.go)
        finally:
            await record(f"cleanup {name}")  # an activity, as the run goes on; never inline
        return name


async def test_an_evicted_instance_runs_nothing_and_its_run_goes_on(client: Client) -> None:
    async def task_completed(h: Any) -> bool:
        return any(e.type == "WorkflowTaskCompleted" for e in await h.history())

    async with Worker(
        client,
        workflows=[WaitsThenCleansUpWorkflow],
        activities=[record],
        max_cached_workflows=1,
        **FAST,
    ):
        a = await client.start_workflow(WaitsThenCleansUpWorkflow, {"name": "a"})
        await wait_until(lambda: task_completed(a))
        b = await client.start_workflow(WaitsThenCleansUpWorkflow, {"name": "b"})
        await wait_until(lambda: task_completed(b))  # a's instance left the cache for b's
        gc.collect()
        assert RAN == []  # its finally block scheduled nothing, and ran nothing inline
        assert "ActivityTaskScheduled" not in [e.type for e in await a.history()]

        await a.signal(WaitsThenCleansUpWorkflow.proceed)  # replayed from its history
        assert await a.result(timeout=10) == "a"
        assert RAN == ["cleanup a"]  # once, as the activity of the run
        await b.signal(WaitsThenCleansUpWorkflow.proceed)
        assert await b.result(timeout=10) == "b"


@workflows.workflow.define(name="exec_swallows_cancel")
class SwallowsCancelWorkflow:
    @workflows.workflow.entrypoint
    async def run(self) -> str:
        try:
            await record("body")
        except asyncio.CancelledError:
            STEPS.append("swallowed")
        try:
            await asyncio.Event().wait()  # waits again, on what nothing will ever set
        finally:
            STEPS.append("finally")
            await record("cleanup")
        return "never"


def test_teardown_abandons_code_that_swallows_its_cancellation() -> None:
    inst = _instance(SwallowsCancelWorkflow)
    run_task(inst, [_started()], T0, fresh=True)
    with structlog.testing.capture_logs() as logs:
        inst.teardown()
    assert [(e["log_level"], e["workflow"]) for e in logs] == [("warning", "exec_swallows_cancel")]
    assert STEPS == ["swallowed"] and RAN == [] and inst.commands == []

    del inst
    gc.collect()
    assert STEPS == ["swallowed"] and RAN == []  # never resumed: its finally block never runs


@workflows.workflow.define(name="exec_exits")
class ExitsWorkflow:
    @workflows.workflow.entrypoint
    async def run(self) -> str:
        raise SystemExit(3)


def test_system_exit_in_workflow_code_is_not_recorded_as_a_failure() -> None:
    inst = _instance(ExitsWorkflow)
    with pytest.raises(SystemExit):
        run_task(inst, [_started()], T0, fresh=True)
    assert inst.commands == [] and not inst.closed  # neither the run nor its task failed
    inst.teardown()


# -- commands after the closing one -----------------------------------------------------------
@workflows.workflow.define(name="exec_closes_then_schedules")
class ClosesThenSchedulesWorkflow:
    def __init__(self) -> None:
        self.go = False
        self.returning = False

    @workflows.workflow.signal()
    async def go_on(self) -> None:
        self.go = True
        await workflow.wait_condition(lambda: self.returning)
        # The entrypoint returned in this same activation: too late to schedule anything.
        pending = record("after close")
        await workflow.sleep(60)
        await pending

    @workflows.workflow.query()
    def state(self) -> str:
        return "returned" if self.returning else "waiting"

    @workflows.workflow.entrypoint
    async def run(self) -> str:
        await workflow.wait_condition(lambda: self.go)
        self.returning = True
        return "done"


def test_nothing_is_issued_after_the_closing_command() -> None:
    inst = _instance(ClosesThenSchedulesWorkflow)
    assert run_task(inst, [_started()], T0, fresh=True) == []
    cmds = inst.activate(
        [HistoryEvent(3, "WorkflowExecutionSignaled", T0, {"name": "go_on", "input": {}})], T0, False
    )
    assert [c.ident for c in cmds] == [("CompleteWorkflow",)]
    inst.teardown()


async def test_a_closed_run_whose_handler_scheduled_late_replays(client: Client) -> None:
    async with Worker(
        client,
        workflows=[ClosesThenSchedulesWorkflow],
        activities=[record],
        **FAST,
    ):
        h = await client.start_workflow(ClosesThenSchedulesWorkflow)
        await h.signal(ClosesThenSchedulesWorkflow.go_on)
        assert await h.result(timeout=10) == "done"
        # a closed run is answered from a replay of its history, which must match the code
        assert await h.query(ClosesThenSchedulesWorkflow.state) == "returned"
    types = [e.type for e in await h.history()]
    assert "ActivityTaskScheduled" not in types and "TimerStarted" not in types
    assert RAN == []


# -- the order of one activation ---------------------------------------------------------------
@workflows.workflow.define(name="exec_counts_pokes")
class CountsPokesWorkflow:
    def __init__(self) -> None:
        self.pokes = 0

    @workflows.workflow.signal(name="poke")
    def poke(self) -> None:
        self.pokes += 1

    @workflows.workflow.entrypoint
    async def run(self) -> int:
        await record("a")
        return self.pokes


def test_a_signal_beside_the_result_the_code_resumes_on_is_handled_first() -> None:
    """The activity's result and a signal reach the run in one workflow task (the signal
    came while the activity completed): the code returns only after the signal's
    handler ran, live and on replay, whatever their order in the history."""
    done = HistoryEvent(3, "ActivityTaskCompleted", T0, {"seq": 1, "result": "a"})
    poke = HistoryEvent(4, "WorkflowExecutionSignaled", T0, {"name": "poke", "input": None})
    live = _instance(CountsPokesWorkflow)
    assert [c.ident[0] for c in run_task(live, [_started()], T0, fresh=True)] == ["ScheduleActivity"]
    cmds = run_task(live, [done, poke], T0, fresh=False)
    assert unpack(cmds[-1].body)["result"] == 1
    # a worker without the run cached replays the same history to the same end
    wtc = HistoryEvent(2, "WorkflowTaskCompleted", T0, {})
    scheduled = HistoryEvent(3, "ActivityTaskScheduled", T0, {"seq": 1, "name": "record", "input": ["a"]})
    done = HistoryEvent(4, done.type, T0, done.attributes)
    poke = HistoryEvent(5, poke.type, T0, poke.attributes)
    replayed = run_task(
        _instance(CountsPokesWorkflow), [_started(), wtc, scheduled, done, poke], T0, fresh=True
    )
    assert unpack(replayed[-1].body)["result"] == 1


@workflows.workflow.define(name="exec_branches_on_pokes")
class BranchesOnPokesWorkflow:
    def __init__(self) -> None:
        self.pokes = 0

    @workflows.workflow.signal(name="poke")
    def poke(self) -> None:
        self.pokes += 1

    @workflows.workflow.entrypoint
    async def run(self) -> int:
        await record("a")
        if self.pokes:
            await record("poked")
        return self.pokes


def _branch_history(wtc2: dict[str, Any], *, messages_first: bool = False) -> list[HistoryEvent]:
    """An activity's result and a signal in one task, completed (with ``wtc2``) by a
    worker that resumed the code first (it returned 0 without the second activity) or,
    ``messages_first``, that ran the signal's handler first (it called the second)."""
    start = HistoryEvent(
        1, "WorkflowExecutionStarted", T0, {"workflow_type": "exec_branches_on_pokes", "input": {}}
    )
    then = (
        [
            HistoryEvent(7, "ActivityTaskScheduled", T0, {"seq": 2, "name": "record", "input": ["poked"]}),
            HistoryEvent(8, "ActivityTaskCompleted", T0, {"seq": 2, "result": "poked"}),
            HistoryEvent(9, "WorkflowTaskCompleted", T0, wtc2),
            HistoryEvent(10, "WorkflowExecutionCompleted", T0, {"result": 1}),
        ]
        if messages_first
        else [HistoryEvent(7, "WorkflowExecutionCompleted", T0, {"result": 0})]
    )
    return [
        start,
        HistoryEvent(2, "WorkflowTaskCompleted", T0, {}),
        HistoryEvent(3, "ActivityTaskScheduled", T0, {"seq": 1, "name": "record", "input": ["a"]}),
        HistoryEvent(4, "ActivityTaskCompleted", T0, {"seq": 1, "result": "a"}),
        HistoryEvent(5, "WorkflowExecutionSignaled", T0, {"name": "poke", "input": None}),
        HistoryEvent(6, "WorkflowTaskCompleted", T0, wtc2),
        *then,
    ]


def test_tasks_completed_before_orders_were_recorded_replay_in_the_order_they_ran() -> None:
    """A task's completion records how it ordered its events (``ord``); one recorded
    without it ran in history order or, in the releases just before ``ord``, messages
    first. Histories of both kinds still replay, and a recorded order is followed."""
    replayer = workflows.Replayer([BranchesOnPokesWorkflow])
    assert replayer.replay(_branch_history({})).ok
    assert replayer.replay(_branch_history({}, messages_first=True)).ok
    assert replayer.replay(_branch_history({"ord": 1}, messages_first=True)).ok
    # a task that says it ran messages first, recorded as history order ran it: the code
    # takes the other branch, which that history does not record
    flagged = replayer.replay(_branch_history({"ord": 1}))
    assert isinstance(flagged.failure, workflows.NonDeterminismError)
    assert "ScheduleActivity" in str(flagged.failure)


@workflows.workflow.define(name="exec_branches_then_steps")
class BranchesThenStepsWorkflow(BranchesOnPokesWorkflow):
    """As BranchesOnPokesWorkflow (its `poke` signal), then two steps: "d" is new in this
    version."""

    @workflows.workflow.entrypoint
    async def run(self) -> int:
        await record("a")
        if self.pokes:
            await record("poked")
        await record("c")
        await record("d")
        return self.pokes


def test_a_history_without_orders_that_changed_is_reported_where_it_changed() -> None:
    """Recorded in history order by the code before "d" was added: the history order
    replay gets past the signal and stops at "d", the change, which is what it names
    (the messages-first attempt stops earlier, at a branch that did not change)."""
    start = {"workflow_type": "exec_branches_then_steps", "input": {}}
    history = [
        HistoryEvent(1, "WorkflowExecutionStarted", T0, start),
        HistoryEvent(2, "WorkflowTaskCompleted", T0, {}),
        HistoryEvent(3, "ActivityTaskScheduled", T0, {"seq": 1, "name": "record", "input": ["a"]}),
        HistoryEvent(4, "ActivityTaskCompleted", T0, {"seq": 1, "result": "a"}),
        HistoryEvent(5, "WorkflowExecutionSignaled", T0, {"name": "poke", "input": None}),
        HistoryEvent(6, "WorkflowTaskCompleted", T0, {}),
        HistoryEvent(7, "ActivityTaskScheduled", T0, {"seq": 2, "name": "record", "input": ["c"]}),
        HistoryEvent(8, "ActivityTaskCompleted", T0, {"seq": 2, "result": "c"}),
        HistoryEvent(9, "WorkflowTaskCompleted", T0, {}),
        HistoryEvent(10, "WorkflowExecutionCompleted", T0, {"result": 0}),
    ]
    failure = workflows.Replayer([BranchesThenStepsWorkflow]).replay(history).failure
    assert isinstance(failure, workflows.NonDeterminismError)
    assert "at event 10" in str(failure) and "ScheduleActivity(3, 'record')" in str(failure)


@workflows.workflow.define(name="exec_continues_after_a_step")
class ContinuesAfterAStepWorkflow:
    @workflows.workflow.entrypoint
    async def run(self, n: int) -> None:
        await record(str(n))
        workflow.continue_as_new({"n": n + 1})


@pytest.mark.parametrize("cancel_first", [False, True], ids=["result-first", "cancel-first"])
def test_a_cancel_beside_the_result_the_code_resumes_on_reaches_the_code(cancel_first: bool) -> None:
    """A cancel request in the same task as the result the code waits on: the code gets
    CancelledError at that await (it would otherwise continue as new, and the next run
    would never hear of the cancel), whatever their order in the history."""
    inst = _instance(ContinuesAfterAStepWorkflow)
    start = HistoryEvent(1, "WorkflowExecutionStarted", T0, {"input": {"n": 1}})
    assert _first_idents(run_task(inst, [start], T0, fresh=True)) == ["ScheduleActivity"]
    done = {"seq": 1, "result": "1"}
    cancel = {"reason": "stop"}
    kinds = [("WorkflowExecutionCancelRequested", cancel), ("ActivityTaskCompleted", done)]
    events = [
        HistoryEvent(4 + i, t, T0, a) for i, (t, a) in enumerate(kinds if cancel_first else kinds[::-1])
    ]
    assert _first_idents(run_task(inst, events, T0, fresh=False)) == ["CancelWorkflow"]


def _first_idents(cmds: list[Any]) -> list[str]:
    return [c.ident[0] for c in cmds]


async def test_every_completed_task_records_its_message_order(client: Client) -> None:
    async with Worker(client, workflows=[CountsPokesWorkflow], activities=[record], **FAST):
        h = await client.start_workflow(CountsPokesWorkflow)
        assert await h.result(timeout=10) == 0
    wtcs = [e for e in await h.history() if e.type == "WorkflowTaskCompleted"]
    assert wtcs and all(e.attributes.get("ord") == ACTIVATION_ORDER for e in wtcs)


# -- seeds -------------------------------------------------------------------------------------
@workflows.workflow.define(name="exec_draws")
class DrawsWorkflow:
    @workflows.workflow.entrypoint
    async def run(self) -> str:
        return f"{workflow.uuid4()} {workflow.random().random()}"


def _draws(run_id: str, seed: bytes | None) -> str:
    inst = _instance(DrawsWorkflow, run_id)
    cmds = run_task(inst, [_started(seed)], T0, fresh=True)
    return str(unpack(cmds[-1].body)["result"])


def test_random_and_uuid4_are_seeded_from_the_start_events_seed() -> None:
    seed, other = bytes(range(16)), bytes(range(1, 17))
    first = _draws("run-1", seed)
    assert _draws("run-1", seed) == first  # a replay draws the same
    assert _draws("run-1", other) != first  # another seed, other draws, whatever the run id
    assert _draws("run-2", other) == _draws("run-3", other)  # the seed alone decides


def test_a_history_without_a_seed_keeps_drawing_from_the_run_id() -> None:
    gen = random.Random(zlib.crc32(b"run-1"))
    expected_uuid = uuid.UUID(int=gen.getrandbits(128), version=4)
    assert _draws("run-1", None) == f"{expected_uuid} {gen.random()}"


# -- the determinism guard ---------------------------------------------------------------------
MISTAKES: dict[str, Callable[[], object]] = {
    "datetime.now()": lambda: datetime.now(),  # the class was imported before the guard was armed
    "datetime.utcnow()": lambda: datetime.utcnow(),
    "date.today()": lambda: date.today(),
    "time.time()": time.time,
    "time.time_ns()": time.time_ns,
    "random.random()": random.random,
    "random.randint()": lambda: random.randint(1, 6),
    "uuid.uuid4()": uuid.uuid4,
    "os.urandom()": lambda: os.urandom(8),
}
ADVICE = {
    "datetime.now()": "workflow.now()",
    "datetime.utcnow()": "workflow.now()",
    "date.today()": "workflow.now()",
    "time.time()": "workflow.now()",
    "time.time_ns()": "workflow.now()",
    "random.random()": "workflow.random()",
    "random.randint()": "workflow.random()",
    "uuid.uuid4()": "workflow.uuid4()",
    "os.urandom()": "workflow.random()",
}


@workflows.workflow.define(name="exec_nondeterministic")
class NondeterministicWorkflow:
    @workflows.workflow.entrypoint
    async def run(self, mistake: str) -> str:
        with contextlib.suppress(Exception):  # swallowing the refusal does not hide it
            MISTAKES[mistake]()
        return "no mistake"


@workflows.workflow.define(name="exec_deterministic")
class DeterministicWorkflow:
    @workflows.workflow.entrypoint
    async def run(self) -> list[str]:
        logging.getLogger("tests.exec").info("a log record's timestamp decides nothing")
        with workflow.unsafe.skip_determinism_enforcement():
            datetime.now()
        drawn = f"{workflow.random().randint(1, 6)} {workflow.random().random()} {workflow.uuid4()}"
        return [drawn, str(workflow.now()), await wall_clock()]


@workflows.workflow.define(name="exec_unguarded_clock", enforce_determinism=False)
class UnguardedClockWorkflow:
    @workflows.workflow.entrypoint
    async def run(self) -> float:
        return datetime.now().timestamp() + time.time() + random.random()


async def test_guard_refuses_the_clock_and_randomness_naming_what_to_use(client: Client) -> None:
    async with Worker(
        client,
        workflows=[NondeterministicWorkflow, DeterministicWorkflow, UnguardedClockWorkflow],
        activities=[wall_clock],
        **FAST,
    ):
        handles = {m: await client.start_workflow(NondeterministicWorkflow, {"mistake": m}) for m in MISTAKES}
        drawn, _, stamped = await client.execute_workflow(DeterministicWorkflow, result_timeout=10)
        assert len(stamped) > 20 and drawn.count("-") == 4
        assert await client.execute_workflow(UnguardedClockWorkflow, result_timeout=10) > 0

        async def all_failed() -> bool:
            return all([(await h.describe()).workflow_task_failures for h in handles.values()])

        await wait_until(all_failed, 15)
    for mistake, h in handles.items():
        d = await h.describe()
        assert d.status == "running"  # a bug in the code: the task fails and is retried
        assert d.last_workflow_task_failure is not None
        msg = d.last_workflow_task_failure.message
        assert "RestrictedWorkflowAccessError" in msg
        assert f"{mistake}: " in msg, msg
        assert f"use `{ADVICE[mistake]}`" in msg, msg


GUARD_INSTALL = """
import sys, threading, time

hooks = []
add = sys.addaudithook
sys.addaudithook = lambda hook: (hooks.append(hook), add(hook))[1]
sleep, start = time.sleep, threading.Thread.start

import rillflow
from rillflow.executor import WorkflowInfo, WorkflowInstance
from rillflow.workflow import get_workflow_definition
from tests.test_executor import DrawsWorkflow

assert not hooks, "an audit hook at import"
assert time.sleep is sleep and threading.Thread.start is start, "patched at import"
defn = get_workflow_definition(DrawsWorkflow)
for run in ("a", "b"):
    WorkflowInstance(defn, WorkflowInfo("w", run, defn.name, "q", None))
assert len(hooks) == 1, hooks
print("ok")
"""


def test_guard_is_installed_by_the_first_workflow_instance_not_by_import() -> None:
    out = subprocess.run(
        [sys.executable, "-c", GUARD_INSTALL], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "ok", out.stderr


@workflows.workflow.define(name="exec_refuses_to_die")
class RefusesToDieWorkflow:
    def __init__(self) -> None:
        self.never = False

    @workflows.workflow.entrypoint
    async def run(self) -> str:
        while True:  # swallows every cancellation and asks again, without ever yielding
            try:
                await workflow.wait_condition(lambda: self.never)
            except asyncio.CancelledError:
                continue


@workflows.workflow.define(name="exec_spins")
class SpinsWorkflow:
    def __init__(self) -> None:
        self.never = False

    @workflows.workflow.entrypoint
    async def run(self) -> str:
        try:
            await workflow.wait_condition(lambda: self.never)
        finally:
            while True:  # once cancelled, keeps yielding forever
                try:
                    await asyncio.sleep(0)
                except asyncio.CancelledError:
                    continue


@pytest.mark.parametrize("cls", [RefusesToDieWorkflow, SpinsWorkflow])
def test_teardown_of_code_that_will_not_stop_returns(cls: type) -> None:
    """Teardown runs on the worker's thread: workflow code that swallows its cancellation
    and asks again must not freeze the worker; it is parked and abandoned."""
    inst = _instance(cls)
    run_task(inst, [_started()], T0, fresh=True)
    t = time.monotonic()
    inst.teardown()
    assert time.monotonic() - t < 30  # returns at all (it looped forever before)
    assert inst.commands == []
