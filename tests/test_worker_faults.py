"""What a worker does when things go wrong around it: heartbeats, a completion that never
reaches Redis, Redis rolled back, unreadable task messages, workflow tasks that always
time out, sync activities in threads, an activity that asks the process to exit, a
connection dropped while reading a long history, and what killed workers leave behind.

Every test runs against a real server; faults come from real parts: killed processes,
a TCP proxy that drops a connection when it carries a given command (tests/faultproxy),
a server killed and its AOF cut.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

import rillflow as workflows
from rillflow import Client, Worker, activity, workflow
from rillflow_runtime.embedded import EmbeddedRedis
from rillflow_runtime.scripts import Library
from tests import flows
from tests.conftest import FAST, wait_until
from tests.faultproxy import FaultProxy, command

pytestmark = pytest.mark.anyio

FAST_RETRY = {"retry_policy_initial_interval": timedelta(milliseconds=100)}
CLOSING = {
    "WorkflowExecutionCompleted",
    "WorkflowExecutionFailed",
    "WorkflowExecutionTimedOut",
    "WorkflowExecutionTerminated",
}


def types(events: list[Any]) -> list[str]:
    return [e.type for e in events]


async def all_results(handles: list[Any], timeout: float) -> list[Any]:
    """Every run's result; on timeout, a failure that says where each open run stands."""
    try:
        return list(await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), timeout))
    except TimeoutError:
        stuck = []
        for h in handles:
            d = await h.describe()
            if d.status == "running":
                pending = [(p.name, p.state, p.attempt) for p in d.pending_activities]
                stuck.append(
                    f"{h.id}: {d.history_length} events, last {types(await h.history())[-3:]}, "
                    f"pending {pending}, task failures {d.workflow_task_failures}"
                )
        pytest.fail(
            f"{len(stuck)} of {len(handles)} runs still open after {timeout} s:\n" + "\n".join(stuck[:10])
        )


def script_call(name: str) -> bytes:
    """The first bytes a client sends to call one of the engine's scripts."""
    return command(b"FCALL", Library().functions[name].encode())


def client_attempts(c: Client) -> int:
    """How many times the client sends a command before it gives up: 1 + its retries."""
    retry = c.redis.connection_pool.connection_kwargs.get("retry")
    return 1 + int(getattr(retry, "_retries", 0))


# -- 1. heartbeats ------------------------------------------------------------------------
HEARTBEAT = {
    "start_to_close_timeout": timedelta(seconds=4),
    "heartbeat_timeout": timedelta(milliseconds=500),
    "retry_policy_max_attempts": 2,
    **FAST_RETRY,
}


@workflows.activity(**HEARTBEAT)
async def beats_async(seconds: float, stop_after: float) -> int:
    """Heartbeats every 0.1 s for ``seconds``; on attempt 1 it goes silent after
    ``stop_after`` s (if that is shorter), without ending."""
    info = activity.info()
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        if info.attempt == 1 and time.monotonic() - began > stop_after:
            await asyncio.sleep(1.2)  # silent: no heartbeat
            return info.attempt
        activity.heartbeat({"t": time.monotonic() - began})
        await asyncio.sleep(0.1)
    return info.attempt


@workflows.activity(**HEARTBEAT)
def beats_sync(seconds: float, stop_after: float) -> int:
    """The same as ``beats_async``, in a thread."""
    info = activity.info()
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        if info.attempt == 1 and time.monotonic() - began > stop_after:
            time.sleep(1.2)  # silent: no heartbeat
            return info.attempt
        activity.heartbeat({"t": time.monotonic() - began})
        time.sleep(0.1)
    return info.attempt


@workflows.workflow.define(name="faults_heartbeat")
class HeartbeatWorkflow:
    @workflows.workflow.entrypoint
    async def run(self, sync: bool, seconds: float, stop_after: float) -> int:
        fn = beats_sync if sync else beats_async
        return await fn(seconds, stop_after)


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_a_heartbeating_activity_outlives_its_heartbeat_timeout(client: Client, sync: bool) -> None:
    async with Worker(client, workflows=[HeartbeatWorkflow], activities=[beats_async, beats_sync], **FAST):  # type: ignore[arg-type]
        h = await client.start_workflow(HeartbeatWorkflow, {"sync": sync, "seconds": 2.0, "stop_after": 99})
        assert await h.result(timeout=20) == 1
    events = await h.history()
    assert "ActivityTaskRetrying" not in types(events), [e.attributes for e in events]
    done = next(e for e in events if e.type == "ActivityTaskCompleted")
    sched = next(e for e in events if e.type == "ActivityTaskScheduled")
    assert done.attributes["att"] == 1
    # it really ran four heartbeat timeouts long, on one attempt
    assert done.time_ms - sched.time_ms >= 2000


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_an_activity_that_stops_heartbeating_times_out_as_heartbeat(client: Client, sync: bool) -> None:
    async with Worker(client, workflows=[HeartbeatWorkflow], activities=[beats_async, beats_sync], **FAST):  # type: ignore[arg-type]
        h = await client.start_workflow(HeartbeatWorkflow, {"sync": sync, "seconds": 1.0, "stop_after": 0.3})
        assert await h.result(timeout=20) == 2
    events = await h.history()
    retrying = [e for e in events if e.type == "ActivityTaskRetrying"]
    assert len(retrying) == 1
    assert retrying[0].attributes["failure"]["timeout_type"] == "heartbeat"
    sched = next(e for e in events if e.type == "ActivityTaskScheduled")
    # well before start-to-close (4 s): the silence was noticed at the heartbeat timeout
    assert retrying[0].time_ms - sched.time_ms < 3000


# -- 2. the instance cache and a completion that never reached Redis ------------------------
@workflows.workflow.define(name="faults_signal_counter")
class SignalCounter:
    def __init__(self) -> None:
        self.count = 0
        self.done = False

    @workflows.workflow.signal()
    def add(self) -> None:
        self.count += 1

    @workflows.workflow.signal()
    def finish(self) -> None:
        self.done = True

    @workflows.workflow.entrypoint
    async def run(self) -> int:
        await workflows.workflow.wait_condition(lambda: self.done)
        return self.count


async def test_a_completion_lost_on_the_way_never_applies_a_signal_twice(
    client: Client, redis_url: str
) -> None:
    signals = 5
    async with FaultProxy(redis_url) as proxy:
        wc = await Client.connect(proxy.url)
        try:
            async with Worker(wc, workflows=[SignalCounter], **FAST):  # type: ignore[arg-type]
                h = await client.start_workflow(SignalCounter, execution_id="counter-1")

                async def waiting() -> bool:
                    return "WorkflowTaskCompleted" in types(await h.history())

                await wait_until(waiting, 15)
                # every send of the next completion (the one that applies the signals),
                # retries included, is cut off before it reaches Redis: the worker gives up
                attempts = client_attempts(wc)
                fault = proxy.drop_on(script_call("wft_complete"), times=attempts)
                for _ in range(signals):
                    await h.signal(SignalCounter.add)
                await fault.wait_hits(attempts, timeout=40)

                async def carried_on() -> bool:
                    ev = types(await h.history())
                    return "WorkflowTaskTimedOut" in ev and ev[-1] == "WorkflowTaskCompleted"

                await wait_until(carried_on, 20)
                await h.signal(SignalCounter.finish)
                assert await h.result(timeout=20) == signals
        finally:
            await wc.close()
    events = await h.history()
    assert types(events).count("WorkflowExecutionSignaled") == signals + 1
    assert types(events).count("WorkflowExecutionCompleted") == 1


# -- 3. Redis goes back in time -------------------------------------------------------------
@workflows.activity(start_to_close_timeout=timedelta(seconds=5), **FAST_RETRY)
async def slow_step(i: int) -> int:
    await asyncio.sleep(0.04)
    return i + 1


@workflows.workflow.define(name="faults_sequence")
class Sequence:
    @workflows.workflow.entrypoint
    async def run(self, steps: int) -> int:
        total = 0
        for i in range(steps):
            total += await slow_step(i)
        return total


def cached_last_event(w: Worker, run_id: str | None) -> int:
    """The last event the worker's cached instance of a run has applied (0: not cached)."""
    return w.cache.position(run_id or "")[0]


def growing_aof(data_dir: Path) -> Path:
    """The file the server appends to now: the last incr file of its AOF manifest."""
    mp = data_dir / "appendonlydir"
    manifest = next(mp.glob("*.manifest"))
    incr = [
        line.split()[1]
        for line in manifest.read_text().splitlines()
        if line.startswith("file ") and line.split()[-1] == "i"
    ]
    return mp / incr[-1]


async def test_runs_carry_on_after_redis_loses_its_last_transitions(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = EmbeddedRedis(data, appendonly=True, appendfsync="always").start()
    steps, runs = 60, 6
    try:
        client = await Client.connect(server.url, workflow_task_timeout=timedelta(seconds=2))
        try:
            async with Worker(client, workflows=[Sequence], activities=[slow_step], **FAST) as w:  # type: ignore[arg-type]
                handles = [
                    await client.start_workflow(Sequence, {"steps": steps}, execution_id=f"seq-{i}")
                    for i in range(runs)
                ]
                aof = growing_aof(data)
                noted = aof.stat().st_size  # every start is acknowledged, so in the file

                async def some_steps_in() -> bool:  # and far from done
                    return all([(await h.describe()).history_length >= 30 for h in handles])

                await wait_until(some_steps_in, 30)
                server.crash()
                assert growing_aof(data) == aof
                size = aof.stat().st_size
                assert size > noted
                os.truncate(aof, noted + (size - noted) // 2)
                server.start()
                # (no await since the crash: the worker has not run, its cache is as it was)
                with redis.Redis.from_url(server.url) as r:
                    last = [
                        int(r.hget(client.keyspace.run(0, h.run_id or ""), "last_eid") or 0) for h in handles
                    ]
                ahead = [
                    h.id for h, eid in zip(handles, last, strict=True) if cached_last_event(w, h.run_id) > eid
                ]
                assert ahead, "the cut lost nothing the worker's cache had applied"
                results = await all_results(handles, 60)
            assert results == [sum(range(1, steps + 1))] * runs
            closed = Counter(
                f[b"wid"].decode() for _, f in await client.redis.xrange(client.keyspace.closed(0))
            )
            assert closed == Counter({h.id: 1 for h in handles})
            for h in handles:
                ev = types(await h.history())
                assert sum(t in CLOSING for t in ev) == 1 and ev[-1] == "WorkflowExecutionCompleted"
                assert ev.count("ActivityTaskCompleted") == steps
        finally:
            await client.close()
    finally:
        server.cleanup()


# -- 4. malformed task messages -------------------------------------------------------------
@workflows.workflow.define(name="faults_greeter")
class Greeter:
    @workflows.workflow.entrypoint
    async def run(self, name: str) -> str:
        return await flows.hello(name)


async def test_malformed_task_messages_go_to_the_dead_letter_streams(client: Client) -> None:
    ks, r = client.keyspace, client.redis
    wft, act = ks.queue(0, "default", "wft"), ks.queue(0, "default", "act")
    for stream in (wft, act):
        await r.xgroup_create(stream, "rf", id="0", mkstream=True)
    bad_wft: list[dict[Any, Any]] = [{"run": b"\xff\xfe"}, {"no_run": "x"}]
    bad_act: list[dict[Any, Any]] = [
        {"run": b"\xff\xfe", "seq": "1", "att": "1"},
        {"run": "r", "att": "1"},
        {"run": "r", "seq": "one", "att": "1"},
    ]
    ids: dict[str, set[str]] = {wft: set(), act: set()}

    async def add(stream: str, fields: dict[Any, Any]) -> None:
        ids[stream].add((await r.xadd(stream, fields)).decode())

    # activity tasks of good runs, and bad ones, read by a consumer that then dies
    for f in bad_act[:1]:
        await add(act, f)
    async with Worker(client, workflows=[Greeter], sticky_schedule_timeout=None, **FAST):  # type: ignore[arg-type]
        first = [await client.start_workflow(Greeter, {"name": f"a{i}"}) for i in range(3)]

        async def scheduled() -> bool:
            return bool(await r.xlen(act) >= 1 + len(first))

        await wait_until(scheduled, 15)
    for f in bad_act[1:]:
        await add(act, f)
    # workflow tasks of good runs and bad ones, read by that dead consumer too
    await add(wft, bad_wft[0])
    second = [await client.start_workflow(Greeter, {"name": f"b{i}"}) for i in range(3)]
    await add(wft, bad_wft[1])
    got = await r.xreadgroup("rf", "ghost", {wft: ">", act: ">"}, count=100)
    assert sum(len(entries) for _, entries in got) == 2 + len(second) + len(bad_act) + len(first)
    # and bad ones among good ones that no one has read yet: one batch
    await add(wft, bad_wft[0])
    third = [await client.start_workflow(Greeter, {"name": f"c{i}"}) for i in range(3)]
    await add(wft, bad_wft[1])
    async with Worker(client, workflows=[Greeter], activities=[flows.hello], max_deliveries=3, **FAST) as w:  # type: ignore[arg-type]
        results = await all_results(first + second + third, 30)
        assert results == [f"hello {p}{i}" for p in "abc" for i in range(3)]

        async def all_set_aside() -> bool:
            return bool(await r.xlen(f"{wft}:dlq") == 4 and await r.xlen(f"{act}:dlq") == 3)

        await wait_until(all_set_aside, 20)
    assert w.stats.dead_lettered == 7
    for stream in (wft, act):
        dead = await r.xrange(f"{stream}:dlq")
        assert {f[b"dlq_source"].decode().rsplit("/", 1)[1] for _, f in dead} == ids[stream]
        for _, f in dead:
            assert b"after 3 deliveries" in f[b"dlq_reason"], f
        assert await r.xlen(stream) == 0  # nothing left behind, nothing pending
        assert (await r.xpending(stream, "rf"))["pending"] == 0


# -- 5. workflow tasks that always time out ------------------------------------------------
@workflows.workflow.define(name="faults_too_slow")
class TooSlow:
    @workflows.workflow.entrypoint
    async def run(self) -> str:
        with workflow.unsafe.skip_determinism_enforcement():
            time.sleep(1.5)  # longer than the namespace's workflow-task timeout, every time
        return "never"


SLOW_SERVED = [TooSlow]


async def test_workflow_task_timeouts_back_off(redis_url: str, worker_procs: Any) -> None:
    c = await Client.connect(redis_url, namespace="slowtasks", workflow_task_timeout=timedelta(seconds=1))
    try:
        worker_procs(redis_url, "tests.test_worker_faults:SLOW_SERVED", namespace="slowtasks")
        # the slow worker's own pump is stuck in the task with it: this one times the tasks out
        async with Worker(c, activities=[flows.hello], **FAST):  # type: ignore[arg-type]
            h = await c.start_workflow(TooSlow)
            began = time.monotonic()
            await asyncio.sleep(5)
            early = (await h.describe()).workflow_task_failures
            await asyncio.sleep(max(0.0, 10 - (time.monotonic() - began)))
            d = await h.describe()
            events = await h.history()
        assert d.status == "running"
        assert types(events).count("WorkflowTaskTimedOut") == 1, types(events)
        assert len(events) <= 3, types(events)
        # 1 s timeouts, retried at once then after 1, 2, 4 s: about 4 in 10 s, not one per 1.5 s
        assert 2 <= d.workflow_task_failures <= 5, (early, d.workflow_task_failures)
        assert d.workflow_task_failures - early <= 2, (early, d.workflow_task_failures)
        assert d.last_workflow_task_failure is not None
        assert d.last_workflow_task_failure.type == "WorkflowTaskTimedOut"
    finally:
        await c.close()


# -- 6. sync activities ---------------------------------------------------------------------
RECORD: list[tuple[str, int, int, str, float]] = []  # activity, arg, attempt, "start"/"end", when


def record(name: str, arg: int, what: str) -> None:
    RECORD.append((name, arg, activity.info().attempt, what, time.monotonic()))


def recorded(name: str, attempt: int, what: str) -> list[float]:
    return [t for n, _, att, w, t in RECORD if (n, att, w) == (name, attempt, what)]


@workflows.activity(start_to_close_timeout=timedelta(seconds=2), retry_policy_max_attempts=3, **FAST_RETRY)
def sleepy(i: int, seconds: float) -> int:
    record("sleepy", i, "start")
    time.sleep(seconds)
    return activity.info().attempt


@workflows.activity(start_to_close_timeout=timedelta(seconds=1), retry_policy_max_attempts=2, **FAST_RETRY)
def stubborn(seconds: float) -> int:
    """Ignores its timeout on attempt 1: a thread cannot be interrupted."""
    record("stubborn", 0, "start")
    if activity.info().attempt == 1:
        time.sleep(seconds)
    record("stubborn", 0, "end")
    return activity.info().attempt


@workflows.activity()
def quick(i: int) -> int:
    record("quick", i, "start")
    return i


async def result_or_report(h: Any, w: Worker, timeout: float) -> Any:
    """The run's result; on timeout, a failure that says what the worker's slots hold."""
    try:
        return await h.result(timeout=timeout)
    except TimeoutError:
        abandoned = getattr(getattr(w, "acts", None), "abandoned_threads", "?")
        pytest.fail(
            f"no result in {timeout} s: {len(w.running)} attempts running, {abandoned} threads "
            f"counted as abandoned (holding slots); activity executions: {RECORD}"
        )


@workflows.workflow.define(name="faults_threads")
class Threads:
    @workflows.workflow.entrypoint
    async def run(self, n: int, seconds: float) -> list[int]:
        return list(await asyncio.gather(*(sleepy(i, seconds) for i in range(n))))


@workflows.workflow.define(name="faults_stubborn")
class Stubborn:
    @workflows.workflow.entrypoint
    async def run(self, seconds: float) -> list[int]:
        first = stubborn(seconds)  # scheduled first: the worker's one slot takes it first
        return list(await asyncio.gather(first, quick(7)))


async def test_sixty_sync_activities_run_at_once(client: Client) -> None:
    RECORD.clear()
    n = 60
    async with Worker(client, workflows=[Threads], activities=[sleepy], max_concurrent_activities=n, **FAST):  # type: ignore[arg-type]
        h = await client.start_workflow(Threads, {"n": n, "seconds": 1.2})
        assert await h.result(timeout=30) == [1] * n
    events = await h.history()
    assert "ActivityTaskRetrying" not in types(events)
    starts = recorded("sleepy", 1, "start")
    assert len(starts) == n
    # all at once: none waited for another's thread (a 40-thread pool would make 20 wait 1.2 s)
    assert max(starts) - min(starts) < 0.9, max(starts) - min(starts)


async def test_a_sync_activity_past_its_timeout_keeps_its_slot(client: Client) -> None:
    RECORD.clear()
    async with Worker(
        client, workflows=[Stubborn], activities=[stubborn, quick], max_concurrent_activities=1, **FAST
    ) as w:  # type: ignore[arg-type]
        h = await client.start_workflow(Stubborn, {"seconds": 2.5})
        assert await result_or_report(h, w, 15) == [2, 7]
        # the timed-out attempt's thread sleeps on; it records when it ends
        await wait_until(lambda: recorded("stubborn", 1, "end"), 10)
    events = await h.history()
    retry = next(e for e in events if e.type == "ActivityTaskRetrying")
    assert retry.attributes["failure"]["timeout_type"] == "start_to_close"
    # each ran once (a second start of attempt 1 would be a second thread: two slots)
    assert [len(recorded("stubborn", 1, "start")), len(recorded("quick", 1, "start"))] == [1, 1], RECORD
    (thread_end,) = recorded("stubborn", 1, "end")
    (quick_start,) = recorded("quick", 1, "start")
    (retry_start,) = recorded("stubborn", 2, "start")
    # one slot: nothing else started while the timed-out attempt's thread still ran
    assert quick_start >= thread_end - 0.01, (quick_start, thread_end)
    assert retry_start >= thread_end - 0.01, (retry_start, thread_end)


async def test_a_worker_never_runs_an_attempt_it_gave_up_on_again(client: Client, redis_url: str) -> None:
    """The attempt's local deadline passed (its thread runs on, abandoned) and Redis has
    not yet recorded the timeout (the pump is late): the worker's reclaim of task
    messages idle for ``reclaim_idle`` must not start that same attempt again."""
    RECORD.clear()
    async with FaultProxy(redis_url) as proxy:
        wc = await Client.connect(proxy.url)
        try:
            async with Worker(
                wc, workflows=[Stubborn], activities=[stubborn, quick], max_concurrent_activities=1, **FAST
            ) as w:  # type: ignore[arg-type]
                assert w.acts is not None
                h = await client.start_workflow(Stubborn, {"seconds": 2.5})
                await wait_until(lambda: recorded("stubborn", 1, "start"), 10)
                pump = proxy.hold_on(script_call("pump_due"))  # the pump is late
                await wait_until(lambda: w.acts is not None and w.acts.abandoned_threads == 1, 10)
                await w.maintenance.reclaim()  # what the pump loop does every reclaim_idle / 2
                pump.release()
                assert await result_or_report(h, w, 15) == [2, 7]
                await wait_until(lambda: recorded("stubborn", 1, "end"), 10)
        finally:
            await wc.close()
    assert len(recorded("stubborn", 1, "start")) == 1, f"attempt 1 ran {RECORD}"


# -- 7. SystemExit in an activity -----------------------------------------------------------
EXIT_ENV = "RF_TEST_ACTIVITY_EXIT"


@workflows.activity(start_to_close_timeout=timedelta(seconds=2), retry_policy_max_attempts=3, **FAST_RETRY)
async def exits_where_told() -> str:
    code = os.environ.get(EXIT_ENV)
    if code:
        raise SystemExit(int(code))
    return f"attempt {activity.info().attempt} by {os.getpid()}"


@workflows.workflow.define(name="faults_exit")
class ExitWorkflow:
    @workflows.workflow.entrypoint
    async def run(self) -> str:
        return await exits_where_told()


EXIT_SERVED = [ExitWorkflow, exits_where_told]


async def test_system_exit_in_an_activity_stops_the_worker_and_the_attempt_is_retried(
    client: Client, redis_url: str, worker_procs: Any
) -> None:
    a = worker_procs(redis_url, "tests.test_worker_faults:EXIT_SERVED", env={EXIT_ENV: "3"})
    h = await client.start_workflow(ExitWorkflow)
    # the worker drains and exits with the activity's exit code
    assert await asyncio.to_thread(a.proc.wait, 20) == 3, a.output()[-3000:]
    assert not await client.redis.exists(client.keyspace.worker(a.identity))  # withdrawn
    async with Worker(client, workflows=[ExitWorkflow], activities=[exits_where_told], **FAST):  # type: ignore[arg-type]
        assert await h.result(timeout=20) == f"attempt 2 by {os.getpid()}"
    events = await h.history()
    retrying = [e for e in events if e.type == "ActivityTaskRetrying"]
    assert len(retrying) == 1
    # not recorded as the activity's failure: the attempt timed out on the server
    assert retrying[0].attributes["failure"]["type"] == "ActivityTimeoutError"
    assert "SystemExit" not in repr([e.attributes for e in events])


# -- 8. a dropped connection while reading a long history ------------------------------------
@workflows.workflow.define(name="faults_wide")
class Wide:
    def __init__(self) -> None:
        self.go = False

    @workflows.workflow.signal()
    def proceed(self) -> None:
        self.go = True

    @workflows.workflow.entrypoint
    async def run(self, n: int) -> int:
        values = await asyncio.gather(*(flows.step(i) for i in range(n)))
        await workflows.workflow.wait_condition(lambda: self.go)
        return sum(values)


async def test_a_dropped_connection_while_reading_a_long_history_is_not_a_task_failure(
    redis_url: str,
) -> None:
    # a workflow-task timeout (20 s) that outlasts the client's retries by far, even on a
    # loaded machine, so the worker gives up on the history while its task is still its own
    client = await Client.connect(
        redis_url, namespace="longhistory", workflow_task_timeout=timedelta(seconds=20)
    )
    n = 600  # 1,200 events and more: more than the first page the start script returns
    try:
        async with Worker(
            client, workflows=[Wide], activities=[flows.step], sticky_schedule_timeout=None, **FAST
        ):  # type: ignore[arg-type]
            h = await client.start_workflow(Wide, {"n": n})

            async def waiting() -> bool:
                ev = types(await h.history())
                return ev.count("ActivityTaskCompleted") == n and ev[-1] == "WorkflowTaskCompleted"

            await wait_until(waiting, 30)
        assert len(await h.history()) > 1200
        async with FaultProxy(redis_url) as proxy:
            wc = await Client.connect(proxy.url, namespace="longhistory")
            try:
                async with Worker(wc, workflows=[Wide], activities=[flows.step], **FAST):  # type: ignore[arg-type]
                    attempts = client_attempts(wc)
                    # a cache miss reads the rest of the history with XRANGE: cut every try
                    fault = proxy.drop_on(command(b"XRANGE"), times=attempts)
                    await h.signal(Wide.proceed)
                    await fault.wait_hits(attempts, timeout=40)
                    await asyncio.sleep(0.2)
                    # the worker gave up on Redis before the task timed out
                    assert "WorkflowTaskTimedOut" not in types(await h.history())
                    assert await h.result(timeout=60) == sum(range(1, n + 1))
            finally:
                await wc.close()
        events = types(await h.history())
        assert "WorkflowTaskFailed" not in events
        assert "WorkflowTaskTimedOut" in events  # the interrupted task ran again after its timeout
        assert events.count("WorkflowExecutionCompleted") == 1
    finally:
        await client.close()


# -- 9. what workers leave behind ----------------------------------------------------------
LEAK_OPTS: dict[str, Any] = {
    "start_to_close_timeout": timedelta(seconds=2),
    "retry_policy_max_attempts": 0,
    **FAST_RETRY,
}


@workflows.activity(**LEAK_OPTS)
async def leak_async(i: int) -> int:
    await asyncio.sleep(0.02)
    return i


@workflows.activity(**LEAK_OPTS)
def leak_sync(i: int) -> int:
    time.sleep(0.02)
    return i


@workflows.workflow.define(name="faults_leaky")
class Leaky:
    def __init__(self) -> None:
        self.pokes = 0

    @workflows.workflow.signal()
    def poke(self) -> None:
        self.pokes += 1

    @workflows.workflow.query()
    def seen(self) -> int:
        return self.pokes

    @workflows.workflow.entrypoint
    async def run(self, i: int) -> int:
        a = await leak_async(i)
        await workflows.workflow.wait_condition(lambda: self.pokes >= 2)
        return a + await leak_sync(i) + self.pokes


LEAK_SERVED = [Leaky, leak_async, leak_sync]
PER_RUN_KINDS = {"wf", "run", "h", "hc", "act", "wsig", "upd"}  # each expires with its run (or execution)


def key_kind(key: str) -> str:
    """``rf:{ns:S}:run:<id>`` -> ``run``; ``rf:{ns:S}:q:<queue>:wft@<w>`` -> ``q:wft@``."""
    rest = key.split("}:", 1)[1]
    if rest.startswith("q:"):
        kind = rest.split(":", 2)[2]
        return "q:" + (kind.split("@")[0] + "@" if "@" in kind else kind)
    return rest.split(":", 1)[0]


async def test_killed_and_stopped_workers_leave_nothing_behind(
    client: Client, redis_url: str, worker_procs: Any
) -> None:
    n = 200
    r, ks = client.redis, client.keyspace

    async def spawn(count: int) -> list[Any]:
        procs = [
            worker_procs(redis_url, "tests.test_worker_faults:LEAK_SERVED", heartbeat=1.0, wait=False)
            for _ in range(count)
        ]
        await asyncio.gather(*(asyncio.to_thread(p.wait_registered) for p in procs))
        return procs

    procs = await spawn(3)
    handles = [await client.start_workflow(Leaky, {"i": i}, execution_id=f"leak-{i}") for i in range(n)]
    for h in handles:
        await h.signal(Leaky.poke)
    killed = procs[:2]
    for p in killed:  # mid-load: tasks, activities and cached runs die with them
        p.kill()
    procs = procs[2:] + await spawn(2)
    for h in handles:
        await h.signal(Leaky.poke)
    results = await all_results(handles, 60)
    assert results == [2 * i + 2 for i in range(n)]
    other = await Client.connect(redis_url)  # a client that queries, then goes away
    assert [await other.get_workflow_handle(f"leak-{i}").query("seen") for i in range(5)] == [2] * 5
    await other.close()
    for p in procs:
        assert await asyncio.to_thread(p.terminate) == 0, p.output()[-2000:]

    async def records_expired() -> bool:  # the killed workers' (three heartbeats)
        return not [k async for k in r.scan_iter(match=ks.worker("*"))]

    await wait_until(records_expired, 15)
    dead = {p.identity for p in killed}

    async def left_by_the_dead() -> set[str]:
        consumers = set()
        for stream in [ks.queue(0, "default", kind) for kind in ("wft", "act", "qry")] + [ks.outbox(0)]:
            consumers |= {c["name"].decode() for c in await r.xinfo_consumers(stream, "rf")}
        sticky = {k.decode().rsplit("@", 1)[1] async for k in r.scan_iter(match=ks.sticky(0, "default", "*"))}
        return (consumers | sticky) & dead

    # (the live workers' janitors may have cleared some of it already: they start early)
    async with Worker(client, workflows=[Leaky], activities=[leak_async, leak_sync], **FAST) as w:  # type: ignore[arg-type]
        await r.delete(ks.ns_key("janitor:default"))  # the lease the dead workers' janitor took
        await w.maintenance.janitor()
    assert await left_by_the_dead() == set()

    keys = [k.decode() async for k in r.scan_iter(match="rf:*", count=1000)]
    kinds = Counter(key_kind(k) for k in keys)
    fixed = {k: c for k, c in kinds.items() if k not in PER_RUN_KINDS}
    # what is not a run's own grows with nothing: not with runs, restarts or signals
    allowed = {
        "meta",
        "registry",
        "workers",
        "timers",
        "closed",
        "q:wft",
        "q:act",
        "q:qry",
        "janitor",
        "pump",
        "outbox",
        "idx",
    }
    assert set(fixed) <= allowed, kinds
    assert sum(fixed.values()) <= 12, kinds
    assert await r.pttl(ks.ns_key("janitor:default")) != -1  # the janitor's lease expires
    assert "workers" not in fixed, await r.zrange(ks.workers, 0, -1)  # no dead members
    assert await r.zcard(ks.timers(0)) == 0, await r.zrange(ks.timers(0), 0, 20)  # all runs closed
    for kind in PER_RUN_KINDS:
        assert kinds[kind] <= n, kinds
    for k in keys:
        if key_kind(k) in PER_RUN_KINDS:
            assert await r.pttl(k) > 0, k  # expires with its closed run
        if key_kind(k) == "wsig":
            assert await r.zcard(k) <= 2, k
    for kind in ("wft", "act", "qry"):
        stream = ks.queue(0, "default", kind)
        assert await r.xlen(stream) == 0, stream
        groups = await r.xinfo_groups(stream)
        assert [g["pending"] for g in groups] == [0], (stream, groups)
        assert await r.xinfo_consumers(stream, "rf") == [], stream  # dead or gone, all removed


@pytest.mark.parametrize("namespace_shards", [2], ids=["shards2"])
async def test_a_failed_shard_does_not_resend_the_results_of_the_others(
    client: Client, namespace_shards: int
) -> None:
    """The results of one flush go out one script call per shard; when a later shard's
    call fails, only its results are sent again, not those an earlier call recorded."""
    from rillflow_runtime.keyspace import GROUP, shard_of
    from rillflow_runtime.protocol import ActivityOutcome, ActivityRoute, ActStartItem

    ks = client.keyspace
    wid = {s: next(f"flush-{i}" for i in range(1000) if shard_of(f"flush-{i}", 2) == s) for s in (0, 1)}
    async with Worker(client, workflows=[flows.ManyWorkflow], **FAST):  # type: ignore[arg-type]
        h = await client.start_workflow(flows.ManyWorkflow, {"n": 1}, execution_id=wid[0])
        stream = ks.queue(0, "default", "act")
        await wait_until(lambda: client.redis.xlen(stream), 10)
    resp: Any = await client.redis.xreadgroup(GROUP, "w1", {stream: ">"}, count=1)
    msgid, f = resp[0][1][0]
    item = ActStartItem(f[b"run"].decode(), int(f[b"seq"]), int(f[b"att"]), msgid.decode())
    (st,) = await client.protocol.act_start(0, stream, "w1", [item])
    assert st.reply.value == "ok"
    worker = Worker(client, activities=[flows.step])
    assert worker.acts is not None
    assert st.route is not None
    good = ActivityOutcome(item.run_id, item.seq, item.attempt, flows_result(item.seq, 2), st.route)
    # shard 1's call fails inside Redis: its run hash is not a hash
    await client.redis.set(ks.run(1, "broken-run"), "not a hash")
    route = ActivityRoute(wid[1], "default", "", ks.queue(1, "default", "act"), "0-1")
    bad = ActivityOutcome("broken-run", 1, 1, flows_result(1, 0), route)
    worker.acts.report(0, good)
    worker.acts.report(1, bad)
    with pytest.raises(redis.exceptions.ResponseError):
        await worker.acts._flush()
    assert [o for _, o in worker.acts._done] == [bad]  # shard 0's result is not sent again
    events = await h.history()
    assert [e.type for e in events].count("ActivityTaskCompleted") == 1
    assert worker.stats.refused == 0


def flows_result(seq: int, value: int) -> bytes:
    from rillflow_runtime.codec import pack

    return pack({"seq": seq, "att": 1, "result": value})
