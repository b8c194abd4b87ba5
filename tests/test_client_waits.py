"""What a client's callers wait on: results, query answers and update outcomes.

A waiter never waits forever: not when its watcher falls behind the capped closed-runs
stream, nor when the watcher's connection is killed. Waiting never stalls after the
client sat idle, and any number of waiters share a small connection pool.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
from typing import Any

import pytest
import structlog

import rillflow as workflows
from rillflow import Client, Worker
from tests.conftest import FAST, wait_until
from tests.faultproxy import FaultProxy, command

pytestmark = pytest.mark.anyio


@workflows.workflow.define(name="waits_gate")
class Gate:
    """Waits for ``open``; answers ``peek`` and ``add`` meanwhile."""

    def __init__(self) -> None:
        self.opened = False
        self.value = 0

    @workflows.workflow.signal()
    def open(self) -> None:
        self.opened = True

    @workflows.workflow.query()
    def peek(self) -> int:
        return self.value

    @workflows.workflow.update()
    def add(self, n: int) -> int:
        self.value += n
        return self.value

    @workflows.workflow.entrypoint
    async def run(self) -> int:
        await workflows.workflow.wait_condition(lambda: self.opened)
        return self.value


@workflows.workflow.define(name="waits_instant")
class Instant:
    @workflows.workflow.entrypoint
    async def run(self, n: int) -> int:
        return n


async def blocked_readers(client: Client, cmd: str) -> list[dict[str, Any]]:
    return [c for c in await client.redis.client_list() if c.get("cmd") == cmd]


# -- 10. result() never waits forever -------------------------------------------------------
@pytest.mark.parametrize("trim", ["cap", "maxlen0"])
@pytest.mark.parametrize("started_here", [False, True])
async def test_a_waiter_whose_watcher_fell_behind_the_capped_stream_gets_its_result(
    client: Client, redis_url: str, trim: str, started_here: bool
) -> None:
    """The watcher's read is held at the proxy while the run closes and its entry in the
    closed-runs stream is trimmed away: by the stream's cap (10,000 later closes), or by
    an XTRIM to nothing. Released, the watcher reads on from before the gap. The waiter
    is another client's handle, or (started_here) the handle of the start itself, which
    waits without reading the run's status first."""
    closed = client.keyspace.closed(0)
    async with FaultProxy(redis_url) as proxy, Worker(client, workflows=[Gate], **FAST):  # type: ignore[arg-type]
        waiting = await Client.connect(proxy.url)
        try:
            if started_here:
                await waiting.watcher.ensure_started()
                h = await waiting.start_workflow(Gate)
                handle = h
            else:
                h = await client.start_workflow(Gate)
                handle = waiting.get_workflow_handle(h.id)
            fault = proxy.hold_on(command(b"XREAD"), times=1)  # the watcher's next read
            waiter = asyncio.create_task(handle.result())
            await fault.wait_hits(1, timeout=15)
            await h.signal(Gate.open)

            async def entry_written() -> bool:
                return any(
                    f.get(b"run") == (h.run_id or "").encode() for _, f in await client.redis.xrange(closed)
                )

            await wait_until(entry_written, 10)
            if trim == "cap":  # as many other runs close: the stream keeps ~10,000
                async with client.redis.pipeline(transaction=False) as pipe:
                    for i in range(10_500):
                        pipe.xadd(
                            closed, {"run": f"other-{i}", "wid": "x", "status": "completed"}, maxlen=10_000
                        )
                    await pipe.execute()
            else:
                await client.redis.xtrim(closed, maxlen=0)
            assert not await entry_written()
            assert not waiter.done()
            fault.release()
            try:
                assert await asyncio.wait_for(waiter, 15) == 0
            except TimeoutError:
                info = await client.redis.xinfo_stream(closed)
                pytest.fail(
                    f"result() still waits 15 s after the run closed: the watcher (cursor "
                    f"{waiting.watcher.cursors[closed]}) did not notice that the entries after its "
                    f"cursor were trimmed (stream first-entry {info['first-entry'] and info['first-entry'][0]!r}, "
                    f"max-deleted-entry-id {info['max-deleted-entry-id']!r}: trimming does not set it)"
                )
        finally:
            await waiting.close()


@workflows.workflow.define(name="waits_echo")
class Echo:
    @workflows.workflow.entrypoint
    async def run(self, text: str) -> str:
        await workflows.workflow.wait_condition(lambda: self.go)
        return text

    def __init__(self) -> None:
        self.go = False

    @workflows.workflow.signal()
    def release(self) -> None:
        self.go = True


@pytest.mark.parametrize("size", [10, 5_000])
async def test_a_small_result_travels_in_the_closed_entry(client: Client, redis_url: str, size: int) -> None:
    """The closed-runs entry carries an outcome of up to 1 KiB: the waiter that started
    the run returns it without reading the run (here the run's hash is gone by then);
    a larger one is read from the run."""
    closed = client.keyspace.closed(0)
    async with FaultProxy(redis_url) as proxy, Worker(client, workflows=[Echo], **FAST):  # type: ignore[arg-type]
        waiting = await Client.connect(proxy.url)
        try:
            await waiting.watcher.ensure_started()
            h = await waiting.start_workflow(Echo, {"text": "x" * size})
            fault = proxy.hold_on(command(b"XREAD"), times=1)  # the watcher's next read
            waiter = asyncio.create_task(h.result())
            await fault.wait_hits(1, timeout=15)
            await client.get_workflow_handle(h.id).signal(Echo.release)

            async def entry() -> Any:
                entries: Any = await client.redis.xrange(closed)
                return next((f for _, f in entries if f.get(b"run") == (h.run_id or "").encode()), None)

            await wait_until(entry, 10)
            fields = await entry()
            if size < 1024:
                assert fields[b"status"] == b"completed" and b"outcome" in fields
                await client.redis.delete(client.keyspace.run(0, h.run_id or ""))
            else:
                assert b"outcome" not in fields
            fault.release()
            assert await asyncio.wait_for(waiter, 15) == "x" * size
        finally:
            await waiting.close()


async def test_a_recheck_before_the_start_never_reports_a_running_run_closed(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """start_workflow registers the run's close with the watcher before the start script
    runs; a re-check of what the watcher waits for (after a reconnect or a gap) in that
    instant finds no such run yet and wakes the waiter. result() must look again, not
    report the run (which no worker runs here) as failed or lost."""
    await client.watcher.ensure_started()
    start = client.protocol.start

    async def start_after_a_recheck(*args: Any, **kwargs: Any) -> Any:
        await client.watcher._recheck()
        return await start(*args, **kwargs)

    monkeypatch.setattr(client.protocol, "start", start_after_a_recheck)
    h = await client.start_workflow("nobody_runs_this", {}, allow_unregistered=True)
    with pytest.raises(TimeoutError):
        await h.result(timeout=1.0)


async def test_handles_dropped_without_waiting_leave_nothing_in_the_watcher(client: Client) -> None:
    """A start registers its run's close with a watcher that is reading (so that result()
    needs no status read); a handle dropped unawaited takes that registration back."""
    await client.watcher.ensure_started()
    kept = await client.start_workflow(Gate)
    for _ in range(50):
        await client.start_workflow(Gate)  # fire and forget
    gc.collect()
    await asyncio.sleep(0)  # what the dropped handles left to the loop
    assert list(client.watcher.runs) == [kept.run_id]


async def test_a_watcher_whose_connection_is_killed_warns_and_carries_on(client: Client) -> None:
    async with Worker(client, workflows=[Gate], **FAST):  # type: ignore[arg-type]
        first, second = await client.start_workflow(Gate), await client.start_workflow(Gate)
        with structlog.testing.capture_logs() as logs:
            waiter = asyncio.create_task(first.result())

            async def watching() -> bool:
                return bool(await blocked_readers(client, "xread"))

            await wait_until(watching, 10)
            await client.redis.client_kill_filter(_type="normal", skipme=True)
            await first.signal(Gate.open)  # closes while the watcher reconnects, or after
            assert await asyncio.wait_for(waiter, 15) == 0
            await wait_until(watching, 10)  # reading again
            waiter = asyncio.create_task(second.result())
            await second.signal(Gate.open)
            assert await asyncio.wait_for(waiter, 15) == 0
    warnings = [e for e in logs if e["log_level"] == "warning" and "watcher" in e["event"]]
    assert warnings, logs


# -- 11. no stall after idleness ------------------------------------------------------------
async def test_no_stall_after_the_client_sat_idle(client: Client) -> None:
    """Idle for 5.1 s after the watcher began a read: past redis-py 8's default socket
    timeout (5 s), before the server ends the 5 s blocking read. A read that timed out on
    the socket and then slept would notice the run closing only some 400 ms late."""

    async def latency(n: int) -> float:
        began = time.perf_counter()
        assert await client.execute_workflow(Instant, n) == n
        return time.perf_counter() - began

    async with Worker(client, workflows=[Instant], **FAST):  # type: ignore[arg-type]
        before = [await latency(i) for i in range(3)]
        after = []
        for i in range(3):
            await asyncio.sleep(5.1)
            after.append(await latency(i))
    ms = [round(x * 1000) for x in before], [round(x * 1000) for x in after]
    print(f"start->result before idling: {ms[0]} ms; each after 5.1 s idle: {ms[1]} ms")
    assert statistics.median(before) < 0.25, ms
    assert statistics.median(after) < 0.25, ms  # a few ms expected; the old client: ~400


# -- 12. many waiters, few connections ------------------------------------------------------
async def test_a_hundred_waiting_queries_and_updates_share_eight_connections(redis_url: str) -> None:
    # the worker shares the callers' client (an app that runs both): were a waiting call
    # to hold a connection, the worker could not answer them
    c = await Client.connect(redis_url, max_connections=8)
    try:
        async with Worker(c, workflows=[Gate], **FAST):  # type: ignore[arg-type]
            h = await c.start_workflow(Gate)
            answers = await asyncio.wait_for(asyncio.gather(*(h.query(Gate.peek) for _ in range(100))), 30)
            assert answers == [0] * 100
            outcomes = await asyncio.wait_for(
                asyncio.gather(*(h.execute_update(Gate.add, 1) for _ in range(100))), 30
            )
            assert sorted(outcomes) == list(range(1, 101))
            await h.signal(Gate.open)
            assert await h.result(timeout=15) == 100
    finally:
        await c.close()
