"""Workflows and activities the tests run, in-process and in worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from datetime import timedelta
from pathlib import Path

from pydantic import BaseModel, Field

import rillflow as workflows
from rillflow import activity, workflow

FAST_RETRY = {"retry_policy_initial_interval": timedelta(milliseconds=100)}


@workflows.activity()
async def hello(name: str) -> str:
    return f"hello {name}"


@workflows.activity()
def hello_sync(name: str) -> str:
    return f"hi {name} from a thread"


@workflows.workflow.define(name="hello_workflow")
class HelloWorkflow:
    @workflows.workflow.entrypoint
    async def run(self, name: str, times: int = 1) -> list[str]:
        out = [await hello(name)]
        out += await asyncio.gather(*(hello(f"{name}{i}") for i in range(1, times)))
        out.append(await hello_sync(name))
        return out


class Params(BaseModel):
    report_type: str
    include_details: bool = False


class Report(BaseModel):
    title: str
    lines: int


@workflows.workflow.define(name="model_workflow")
class ModelWorkflow:
    @workflows.workflow.entrypoint
    async def run(self, params: Params) -> Report:
        return Report(title=params.report_type.upper(), lines=10 if params.include_details else 1)


@workflows.activity(retry_policy_max_attempts=5, retry_policy_backoff_coefficient=2.0, **FAST_RETRY)
async def flaky(succeed_on: int) -> int:
    att = activity.info().attempt
    if att < succeed_on:
        raise ConnectionError(f"attempt {att} failed")
    return att


@workflows.workflow.define(name="flaky_workflow")
class FlakyWorkflow:
    @workflows.workflow.entrypoint
    async def run(self, succeed_on: int) -> int:
        return await flaky(succeed_on)


@workflows.activity(retry_policy_max_attempts=5, **FAST_RETRY)
async def refuses(reason: str) -> str:
    raise workflows.WorkflowError(f"refused: {reason}", type="Refused", non_retryable=True)


@workflows.workflow.define(name="catching_workflow")
class CatchingWorkflow:
    """Catches the ActivityError and reports what it carried."""

    @workflows.workflow.entrypoint
    async def run(self, succeed_on: int) -> dict[str, object]:
        try:
            await flaky(succeed_on)
        except workflows.ActivityError as e:
            return {
                "activity": e.activity_name,
                "attempt": e.attempt,
                "type": e.cause.type,
                "message": e.cause.message,
                "remote_stack": "ConnectionError" in e.cause.stack,
            }
        return {}


@workflows.workflow.define(name="refusing_workflow")
class RefusingWorkflow:
    @workflows.workflow.entrypoint
    async def run(self, reason: str) -> str:
        return await refuses(reason)


@workflows.activity(
    start_to_close_timeout=timedelta(milliseconds=500), retry_policy_max_attempts=2, **FAST_RETRY
)
async def sleeps(seconds: float) -> str:
    await asyncio.sleep(seconds if activity.info().attempt == 1 else 0)
    return f"attempt {activity.info().attempt}"


@workflows.activity(
    start_to_close_timeout=timedelta(seconds=5),
    schedule_to_close_timeout=timedelta(milliseconds=800),
    retry_policy_max_attempts=0,
    **FAST_RETRY,
)
async def never_in_time(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "too late"


@workflows.activity(heartbeat_timeout=timedelta(milliseconds=400), retry_policy_max_attempts=3, **FAST_RETRY)
async def beats(items: int) -> dict[str, object]:
    info = activity.info()
    start = info.heartbeat_details[0]["done"] if info.heartbeat_details else 0
    for i in range(start, items):
        activity.heartbeat({"done": i + 1})
        await asyncio.sleep(0.05)
        if info.attempt == 1 and i == 2:
            await asyncio.sleep(5)  # stops heartbeating: the attempt times out
    return {"attempt": info.attempt, "resumed_from": start}


@workflows.activity(retry_policy_max_attempts=2, **FAST_RETRY)
async def beats_then_fails(items: int) -> dict[str, object]:
    info = activity.info()
    if info.attempt == 1:
        activity.heartbeat({"done": items // 2})
        raise RuntimeError("crashed half way")
    return {"attempt": info.attempt, "details": info.heartbeat_details}


@workflows.workflow.define(name="timeouts_workflow")
class TimeoutsWorkflow:
    @workflows.workflow.entrypoint
    async def run(self, which: str) -> object:
        if which == "start_to_close":
            return await sleeps(2.0)
        if which == "start_to_close_exhausted":
            return await sleeps_always(2.0)
        if which == "schedule_to_close":
            return await never_in_time(3.0)
        if which == "heartbeat":
            return await beats(6)
        if which == "heartbeat_details":
            return await beats_then_fails(10)
        raise workflows.WorkflowError(f"unknown {which}")


@workflows.activity(
    start_to_close_timeout=timedelta(milliseconds=300), retry_policy_max_attempts=2, **FAST_RETRY
)
async def sleeps_always(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "never"


@workflows.workflow.define(name="timer_workflow")
class TimerWorkflow:
    @workflows.workflow.entrypoint
    async def run(self, seconds: float) -> float:
        t0 = workflow.now()
        await workflow.sleep(timedelta(seconds=seconds))
        await asyncio.sleep(0.01)
        return (workflow.now() - t0).total_seconds()


@workflows.activity()
async def step(i: int) -> int:
    return i + 1


@workflows.workflow.define(name="sequential_workflow")
class SequentialWorkflow:
    @workflows.workflow.entrypoint
    async def run(self, steps: int) -> int:
        total = 0
        for i in range(steps):
            total += await step(i)
        return total


@workflows.workflow.define(name="deterministic_helpers")
class DeterministicHelpers:
    @workflows.workflow.entrypoint
    async def run(self) -> dict[str, object]:
        r = workflow.random().randint(0, 10**9)
        u = str(workflow.uuid4())
        await step(0)  # a second workflow task: a replay must draw the same values
        assert workflow.in_workflow()
        return {
            "random": r,
            "uuid": u,
            "id": workflows.get_execution_id(),
            "info_type": workflow.info().workflow_type,
            "activity_sees": await whoami(),
        }


@workflows.activity()
async def whoami() -> str | None:
    return workflows.get_execution_id()


@workflows.workflow.define(name="failing_workflow")
class FailingWorkflow:
    @workflows.workflow.entrypoint
    async def run(self, message: str) -> None:
        raise workflows.WorkflowError(message, type="BusinessRule")


@workflows.workflow.define(name="buggy_workflow")
class BuggyWorkflow:
    @workflows.workflow.entrypoint
    async def run(self) -> None:
        {}["missing"]  # a bug: the workflow task fails and is retried, the run stays open


@workflows.workflow.define(name="condition_workflow")
class ConditionWorkflow:
    def __init__(self) -> None:
        self.ready = False

    @workflows.workflow.entrypoint
    async def run(self, timeout: float) -> str:
        await workflow.wait_condition(lambda: self.ready, timeout=timedelta(seconds=timeout))
        return "ready"


@workflows.workflow.define(name="long_sleep", execution_timeout=timedelta(milliseconds=600))
class LongSleep:
    @workflows.workflow.entrypoint
    async def run(self) -> None:
        await workflow.sleep(60)


@workflows.workflow.define(name="wait_for_race")
class WaitForRace:
    """asyncio.wait_for over an activity: the timer wins, the activity is cancelled."""

    @workflows.workflow.entrypoint
    async def run(self) -> str:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sleeps_always(5.0), timeout=0.2)
        return await hello("after")


# -- for crash tests in worker processes ----------------------------------------------------
@workflows.activity(start_to_close_timeout=timedelta(seconds=2), retry_policy_max_attempts=3, **FAST_RETRY)
async def slow_marker(marker: str, seconds: float) -> str:
    Path(f"{marker}.{activity.info().attempt}").write_text(str(os.getpid()))
    await asyncio.sleep(seconds)
    return f"done by {os.getpid()} on attempt {activity.info().attempt}"


@workflows.workflow.define(name="crash_activity_workflow")
class CrashActivityWorkflow:
    @workflows.workflow.entrypoint
    async def run(self, marker: str, seconds: float) -> str:
        return await slow_marker(marker, seconds)


@workflows.workflow.define(name="crash_wft_workflow")
class CrashWftWorkflow:
    @workflows.workflow.entrypoint
    async def run(self, marker: str) -> str:
        first = await hello("one")
        if os.environ.get("RF_SLOW_WORKFLOW_TASK"):
            Path(marker).write_text(str(os.getpid()))
            with workflow.unsafe.skip_determinism_enforcement():
                time.sleep(30)  # wedged inside a workflow task until the worker is killed
        return f"{first}; finished by {os.getpid()}"


@workflows.workflow.define(name="many_workflow")
class ManyWorkflow:
    @workflows.workflow.entrypoint
    async def run(self, n: int) -> int:
        a = await step(n)
        await workflow.sleep(0.05)
        return await step(a)


@workflows.activity(start_to_close_timeout=timedelta(seconds=1), retry_policy_max_attempts=3, **FAST_RETRY)
async def late_reporter(marker: str) -> str:
    att = activity.info().attempt
    Path(f"{marker}.{att}").write_text("started")
    await asyncio.sleep(5 if att == 1 else 0.5)
    return f"attempt {att}"


@workflows.workflow.define(name="late_workflow")
class LateWorkflow:
    @workflows.workflow.entrypoint
    async def run(self, marker: str) -> str:
        return await late_reporter(marker)


@workflows.workflow.define(name="nd_workflow")
class NonDeterministicV1:
    @workflows.workflow.entrypoint
    async def run(self) -> str:
        greeting = await hello("v1")
        await workflow.sleep(0.5)
        return greeting


@workflows.workflow.define(name="nd_workflow")
class NonDeterministicV2:
    """The same workflow name with different code: calls another activity first."""

    @workflows.workflow.entrypoint
    async def run(self) -> str:
        await step(1)
        greeting = await hello("v2")
        await workflow.sleep(0.5)
        return greeting


@workflows.workflow.define(name="blocking_workflow")
class BlockingWorkflow:
    """Makes the mistakes the determinism guard refuses."""

    @workflows.workflow.entrypoint
    async def run(self, mistake: str) -> str:
        if mistake == "sleep":
            time.sleep(0.01)
        elif mistake == "thread":
            import threading

            threading.Thread(target=print).start()
        elif mistake == "network":
            import socket

            socket.create_connection(("127.0.0.1", 9), timeout=0.1)
        return "no mistake"


@workflows.workflow.define(name="unguarded_workflow", enforce_determinism=False)
class UnguardedWorkflow:
    @workflows.workflow.entrypoint
    async def run(self) -> str:
        time.sleep(0.01)  # allowed: the guard is off for this workflow
        return "slept"


@workflows.activity(heartbeat_timeout=timedelta(seconds=1))
async def beats_until_cancelled(marker: str) -> str:
    try:
        for _ in range(100):
            activity.heartbeat("alive")
            await asyncio.sleep(0.05)
    except asyncio.CancelledError:
        Path(marker).write_text("cancelled")
        raise
    return "ran to the end"


@workflows.workflow.define(name="give_up_workflow")
class GiveUpWorkflow:
    @workflows.workflow.entrypoint
    async def run(self, marker: str) -> str:
        try:
            return await asyncio.wait_for(beats_until_cancelled(marker), timeout=0.3)
        except TimeoutError:
            return "gave up"


class Line(BaseModel):
    sku: str
    qty: int = Field(ge=1)


class Order(BaseModel):
    customer: str
    lines: list[Line]


@workflows.workflow.define(name="order_workflow", workflow_description="Totals an order.\nSecond line.")
class OrderWorkflow:
    """Nested input, so that validation errors carry a path (lines.1.qty)."""

    @workflows.workflow.entrypoint
    async def run(self, order: Order) -> int:
        return sum(line.qty for line in order.lines)


@workflows.activity(retry_policy_max_attempts=3, **FAST_RETRY)
async def wrong_result(n: int) -> int:
    return f"{n} items"  # type: ignore[return-value]


@workflows.workflow.define(name="wrong_result_workflow")
class WrongResultWorkflow:
    @workflows.workflow.entrypoint
    async def run(self) -> dict[str, object]:
        try:
            await wrong_result(3)
        except workflows.ActivityError as e:
            return {"attempt": e.attempt, "type": e.cause.type, "message": e.cause.message}
        return {}


@workflows.workflow.define(name="loose_result_workflow")
class LooseResultWorkflow:
    @workflows.workflow.entrypoint
    async def run(self, n: int) -> int:
        return f"{n} items"  # type: ignore[return-value]


class Tag(BaseModel):
    key: str
    weight: int = Field(ge=0)


@workflows.workflow.define(name="inbox_workflow")
class InboxWorkflow:
    """Collects signals until told to finish, running an activity per message."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.done = False

    @workflows.workflow.signal(description="a message, handled while the workflow runs")
    async def message(self, text: str, times: int = 1) -> None:
        self.log.append(f"message {text} x{times}")
        echoed = await hello(text)  # an async handler may call activities
        self.log.append(f"echo {echoed}")

    @workflows.workflow.signal(name="tag")
    def tag_signal(self, tag: Tag) -> None:
        self.log.append(f"tag {tag.key}={tag.weight}")

    @workflows.workflow.signal()
    def meta(self, source: str, **extra: str | int) -> None:
        self.log.append(f"meta {source} {sorted(extra.items())}")

    @workflows.workflow.signal()
    def finish(self) -> None:
        self.done = True

    @workflows.workflow.signal()
    def reject(self, why: str) -> None:
        raise workflows.WorkflowError(f"rejected: {why}", non_retryable=True)

    @workflows.workflow.signal()
    def buggy(self) -> None:
        raise RuntimeError("a bug in a signal handler")

    @workflows.workflow.entrypoint
    async def run(self) -> list[str]:
        self.log.append("started")
        # finish only when no handler is still awaiting its activity
        await workflows.workflow.wait_condition(lambda: self.done and workflow.all_handlers_finished())
        return self.log


@workflows.workflow.define(name="last_word_workflow", enforce_determinism=False)
class LastWordWorkflow:
    def __init__(self) -> None:
        self.words: list[str] = []

    @workflows.workflow.signal()
    def say(self, word: str) -> None:
        self.words.append(word)

    @workflows.workflow.entrypoint
    async def run(self) -> list[str]:
        await workflows.workflow.wait_condition(lambda: len(self.words) > 0)
        time.sleep(1.0)  # a slow last workflow task: a signal arrives while it runs
        return self.words


@workflows.workflow.define(name="queried_workflow")
class QueriedWorkflow:
    def __init__(self) -> None:
        self.value = 10
        self.done = False

    @workflows.workflow.query()
    def ratio(self, of: int) -> int:
        return self.value // of

    @workflows.workflow.query()
    def meddle(self) -> str:
        hello("from a query")  # schedules an activity: not what a query may do
        return "meddled"

    @workflows.workflow.query()
    def wrong_type(self) -> int:
        return "ten"  # type: ignore[return-value]

    @workflows.workflow.query()
    def restart(self) -> str:
        workflows.workflow.continue_as_new()  # only the entrypoint may

    @workflows.workflow.signal()
    def finish(self) -> None:
        self.done = True

    @workflows.workflow.entrypoint
    async def run(self) -> str:
        await workflows.workflow.wait_condition(lambda: self.done)
        return await hello("done")


@workflows.workflow.define(name="ledger_workflow")
class LedgerWorkflow:
    """Updates that run activities, refuse bad requests, and outlive a worker."""

    def __init__(self) -> None:
        self.balance = 0
        self.closed = False

    @workflows.workflow.update(description="adds to the balance; returns the new one")
    async def deposit(self, amount: int, note: str = "") -> int:
        if amount <= 0:
            raise workflows.WorkflowError(f"a deposit must be positive, got {amount}", non_retryable=True)
        if note:  # a marker path: the crash tests kill the worker while this runs
            await slow_marker(note, 1.0)
        else:
            await step(amount)
        self.balance += amount
        return self.balance

    @workflows.workflow.update()
    def balance_as_text(self) -> int:
        return f"balance: {self.balance}"  # type: ignore[return-value]

    @workflows.workflow.update()
    def crash(self) -> int:
        raise RuntimeError("a bug in an update handler")

    @workflows.workflow.signal()
    def close(self) -> None:
        self.closed = True

    @workflows.workflow.query()
    def current(self) -> int:
        return self.balance

    @workflows.workflow.entrypoint
    async def run(self) -> int:
        await workflows.workflow.wait_condition(lambda: self.closed and workflow.all_handlers_finished())
        return self.balance


LEDGER = [LedgerWorkflow, slow_marker, step]

# what `rillflow worker tests.flows:SERVED` serves (the module holds two versions of nd_workflow)
SERVED = [
    HelloWorkflow,
    ManyWorkflow,
    TimerWorkflow,
    CrashActivityWorkflow,
    CrashWftWorkflow,
    SequentialWorkflow,
    hello,
    hello_sync,
    step,
    slow_marker,
]
