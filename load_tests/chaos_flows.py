"""The workflow and activities of the chaos run (``python -m load_tests.chaos``).

One workflow type mixes every kind of step the chaos must not break: async activities
(some in parallel), a plain ``def`` activity (run in a thread), a durable timer, an
activity that heartbeats and resumes from its details, signals it counts and waits
for, continue-as-new (a plan with ``hops`` runs its steps again in the next run of
the same execution, carrying its value and the signals it has counted), child
workflows (a plan with ``children`` runs that many in parallel and adds their results;
its execution and theirs usually live on different shards), and cancellation (a run
asked to cancel runs one clean-up activity and ends canceled; its children are
terminated by the default parent close policy). What each step
returns is plain arithmetic, so :func:`expected_value` can say what a run must return
without running it.

Each activity execution adds one to ``chaos:exec:<execution id>:<activity>:<n>`` in the
tally server named by ``RILLFLOW_CHAOS_TALLY_URL``: a Redis of the harness's own that
is never killed nor rolled back, so the counts survive what the run does to the
engine's Redis. ``n`` numbers the activity calls of an execution (``HOP_STRIDE`` apart
from one run of the chain to the next), so a count above one is a re-execution.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from datetime import timedelta

import redis
from pydantic import BaseModel

import rillflow as workflows
from rillflow import activity, workflow

TALLY_ENV = "RILLFLOW_CHAOS_TALLY_URL"
TALLY_PREFIX = "chaos:exec:"
WORKFLOW_NAME = "chaos_mix"
CHILD_NAME = "chaos_child"
SIGNAL_NAME = "poke"
HOP_STRIDE = 100  # activity numbers of run k of a chain start at k * HOP_STRIDE
CLEANUP_N = 99  # the clean-up activity of a cancelled run: number hop * HOP_STRIDE + 99

# unlimited attempts: under chaos an attempt may time out any number of times, and a run
# that fails because its worker kept dying would hide what the harness is looking for
RETRY = {
    "retry_policy_max_attempts": 0,
    "retry_policy_initial_interval": timedelta(milliseconds=200),
    "retry_policy_max_interval": timedelta(seconds=2),
}

_tally: redis.Redis | None = None
_tally_lock = threading.Lock()


def tally_key(execution_id: str, activity_name: str, n: int) -> str:
    return f"{TALLY_PREFIX}{execution_id}:{activity_name}:{n}"


def _count(n: int) -> None:
    """Record one execution of the running activity (sync: async and thread activities alike)."""
    global _tally
    with _tally_lock:
        if _tally is None:
            url = os.environ.get(TALLY_ENV)
            if not url:
                raise RuntimeError(f"{TALLY_ENV} is not set: these activities run under load_tests.chaos")
            _tally = redis.Redis.from_url(url)
    info = activity.info()
    _tally.incr(tally_key(info.workflow_id, info.activity_name, n))


@workflows.activity(name="chaos_add", start_to_close_timeout=timedelta(seconds=5), **RETRY)
async def add(n: int, value: int, plus: int) -> int:
    _count(n)
    await asyncio.sleep(0.02)  # a window for a kill to land mid-activity
    return value + plus


@workflows.activity(name="chaos_double_sync", start_to_close_timeout=timedelta(seconds=5), **RETRY)
def double_sync(n: int, value: int) -> int:
    _count(n)
    time.sleep(0.02)
    return value * 2


@workflows.activity(
    name="chaos_beat",
    start_to_close_timeout=timedelta(seconds=60),
    heartbeat_timeout=timedelta(seconds=2),
    **RETRY,
)
async def beat(n: int, value: int, steps: int) -> int:
    """Works ``steps`` x 0.1 s, heartbeating progress; a retry resumes where it stopped."""
    _count(n)
    details = activity.info().heartbeat_details
    done = int(details[0]["done"]) if details else 0
    for i in range(done, steps):
        await asyncio.sleep(0.1)
        activity.heartbeat({"done": i + 1})
    return value + steps


@workflows.workflow.define(name=CHILD_NAME)
class ChaosChild:
    """One activity, numbered 0 in the child's own execution."""

    @workflows.workflow.entrypoint
    async def run(self, value: int, k: int) -> int:
        return await add(0, value, k)


class Plan(BaseModel):
    """What one run does: chosen by the harness from its seed."""

    i: int
    fan: int = 0  # parallel async activities beside the sync one
    sleep_ms: int = 0  # a durable timer
    beats: int = 0  # steps of the heartbeating activity (0: not called)
    signals: int = 0  # signals the execution waits for (its last run does, counting those carried)
    hops: int = 0  # runs still to come by continue-as-new
    children: int = 0  # child workflows each run of the chain starts, in parallel
    hop: int = 0  # this run's place in the chain
    value: int | None = None  # where this run starts: the previous run's value
    carried: int = 0  # signals the earlier runs of the chain applied
    carried_sum: int = 0


@workflows.workflow.define(name=WORKFLOW_NAME)
class ChaosMix:
    def __init__(self) -> None:
        self.signals = 0
        self.signal_sum = 0
        self.carried = False

    @workflows.workflow.signal(name=SIGNAL_NAME)
    def poke(self, k: int) -> None:
        self.signals += 1
        self.signal_sum += k

    @workflows.workflow.entrypoint
    async def run(self, plan: Plan) -> dict[str, int]:
        try:
            return await self._steps(plan)
        except asyncio.CancelledError:  # asked to cancel: one clean-up activity, then canceled
            await add(plan.hop * HOP_STRIDE + CLEANUP_N, 0, 0)
            raise

    async def _steps(self, plan: Plan) -> dict[str, int]:
        if not self.carried:  # a signal may run before the entrypoint: add to it, never reset it
            self.carried = True
            self.signals += plan.carried
            self.signal_sum += plan.carried_sum
        n = plan.hop * HOP_STRIDE
        value = await add(n, plan.i if plan.value is None else plan.value, 1)
        n += 1
        if plan.children:
            kids = await asyncio.gather(
                *(
                    workflow.execute_workflow(ChaosChild, {"value": value, "k": k})
                    for k in range(plan.children)
                )
            )
            value += sum(kids)
        if plan.fan:
            parts = await asyncio.gather(
                *(add(n + k, value, k) for k in range(plan.fan)), double_sync(n + plan.fan, value)
            )
            value = sum(parts)
            n += plan.fan + 1
        else:
            value = await double_sync(n, value)
            n += 1
        if plan.sleep_ms:
            await workflow.sleep(timedelta(milliseconds=plan.sleep_ms))
        if plan.beats:
            value = await beat(n, value, plan.beats)
            n += 1
        if not plan.hops:
            await workflow.wait_condition(lambda: self.signals >= plan.signals)
        value = await add(n, value, 1)  # a step after the signals: the run does not end on them
        if plan.hops:
            workflow.continue_as_new(
                plan.model_copy(
                    update={
                        "hops": plan.hops - 1,
                        "hop": plan.hop + 1,
                        "value": value,
                        "carried": self.signals,
                        "carried_sum": self.signal_sum,
                    }
                )
            )
        return {"value": value, "signals": self.signals, "signal_sum": self.signal_sum}


def expected_value(plan: Plan) -> int:
    """What the last run of ``plan``'s chain returns as ``value``, computed without running it."""
    value = plan.i if plan.value is None else plan.value
    for _ in range(plan.hops + 1):
        value += 1
        value += sum(value + k for k in range(plan.children))
        value = sum(value + k for k in range(plan.fan)) + 2 * value if plan.fan else 2 * value
        value += plan.beats + 1
    return value


def activity_count(plan: Plan) -> int:
    """How many activities one run of ``plan`` schedules (each run of a chain: the same)."""
    return 1 + plan.fan + 1 + (1 if plan.beats else 0) + 1


# the schedule the harness runs beside the load: due every second, each due time checked
TICK_SCHEDULE = "chaos-tick"


@workflow.define(name="chaos_tick", execution_timeout=timedelta(minutes=30))
class ChaosTick:
    """A schedule's run: a timer (a run open across a task boundary), then the due time it
    was started for, which the harness compares with its execution id."""

    @workflow.entrypoint
    async def run(self, n: int = 0) -> str:
        await workflow.sleep(timedelta(milliseconds=200))
        when = workflow.info().scheduled_time
        return when.isoformat() if when else ""
