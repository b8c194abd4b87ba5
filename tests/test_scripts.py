"""The transition scripts, called through the protocol layer: a repeat of a call (the
client retried after a dropped connection) answers the same and changes nothing more; a
call from anyone else is fenced off; a call that cannot apply says why and writes
nothing; and the scripts speak only the protocol's vocabulary."""

from __future__ import annotations

import contextlib
import re
import time
import uuid
from typing import Any

import msgpack
import pytest
from redis.exceptions import ResponseError

from rillflow import Client, Worker
from rillflow.history import HistoryEvent
from rillflow_runtime.codec import pack
from rillflow_runtime.keyspace import GROUP
from rillflow_runtime.model import ENUMS, EVENT_CODES, MAX_DURATION_MS, CommandKind, Reply
from rillflow_runtime.protocol import ActivityOutcome, ActStartItem, RunReply, TaskCompletion, WftStartItem
from rillflow_runtime.scripts import NAMES, lua_source
from tests import flows
from tests.conftest import FAST, wait_until

pytestmark = pytest.mark.anyio


async def read_one(client: Client, stream: str, consumer: str) -> tuple[str, dict[bytes, bytes]]:
    with contextlib.suppress(ResponseError):  # BUSYGROUP: a worker made it already
        await client.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    resp: Any = await client.redis.xreadgroup(GROUP, consumer, {stream: ">"}, count=1)
    msgid, fields = resp[0][1][0]
    return msgid.decode(), fields


async def snapshot(client: Client) -> dict[str, Any]:
    """Every rf: key with its type and size: what a call that must change nothing keeps."""
    out = {}
    async for k in client.redis.scan_iter("rf:*"):
        t = (await client.redis.type(k)).decode()
        size = {"hash": client.redis.hlen, "stream": client.redis.xlen, "zset": client.redis.zcard}.get(t)
        out[k.decode()] = (t, await size(k) if size else None)
    return out


async def started_task(client: Client, worker: str = "w1") -> tuple[str, Any]:
    h = await client.start_workflow(flows.HelloWorkflow, {"name": "x"})
    stream = client.keyspace.queue(0, "default", "wft")
    msgid, _fields = await read_one(client, stream, worker)
    (st,) = await client.protocol.wft_start(
        0, stream, 10_000, 100, worker, [WftStartItem(h.run_id or "", msgid, 0)]
    )
    return stream, (h, msgid, st)


async def test_repeated_workflow_task_start_gets_the_same_fence(client: Client) -> None:
    stream, (h, msgid, first) = await started_task(client)
    item = [WftStartItem(h.run_id or "", msgid, 0)]
    again = (await client.protocol.wft_start(0, stream, 10_000, 100, "w1", item))[0]
    other = (await client.protocol.wft_start(0, stream, 10_000, 100, "w2", item))[0]
    assert first.reply is Reply.OK and again.reply is Reply.OK
    assert (first.fence, first.now_ms) == (again.fence, again.now_ms)  # same fence, same workflow time
    assert other.reply is Reply.BUSY
    assert await client.redis.hget(client.keyspace.run(0, h.run_id or ""), "wft_seq") == b"1"


async def test_a_fence_from_before_a_rollback_is_never_current_again(client: Client) -> None:
    stream, (h, msgid, first) = await started_task(client)
    rk = client.keyspace.run(0, h.run_id or "")
    # Redis lost the last second: the task is back to scheduled and the attempt count too
    await client.redis.hset(rk, mapping={"wft": "scheduled", "wft_seq": 0})
    (second,) = await client.protocol.wft_start(
        0, stream, 10_000, 100, "w2", [WftStartItem(h.run_id or "", msgid, 0)]
    )
    assert second.reply is Reply.OK and second.fence.split("-")[0] == first.fence.split("-")[0] == "1"
    assert second.fence != first.fence
    # the worker that held the task before the rollback is refused
    (late,) = await client.protocol.wft_complete(
        0, stream, "default", 60_000, "w1", 0, [TaskCompletion(h.run_id or "", h.id, first.fence, msgid, [])]
    )
    assert late.reply is Reply.REFUSED


async def test_a_cache_ahead_of_the_history_gets_the_whole_history(client: Client) -> None:
    stream, (h, msgid, _) = await started_task(client)
    await client.redis.hset(client.keyspace.run(0, h.run_id or ""), mapping={"wft": "scheduled"})
    # the worker says its instance has applied event 40: Redis has 1 (it went back in time)
    (st,) = await client.protocol.wft_start(
        0, stream, 10_000, 100, "w1", [WftStartItem(h.run_id or "", msgid, 40)]
    )
    assert st.reply is Reply.OK and st.since == 0 and st.last_event_id == 1
    assert [e[0] for e in st.events] == [b"1-0"]


class _Cmd:
    def __init__(self, kind: str, body: bytes, aux: list[Any]) -> None:
        self.kind, self.body, self.aux = kind, body, aux  # type: ignore[assignment]


async def test_a_repeated_completion_answers_the_same_and_records_once(client: Client) -> None:
    stream, (h, msgid, st) = await started_task(client)
    run = h.run_id or ""
    timer = _Cmd(CommandKind.START_TIMER, pack({"seq": 1, "duration_ms": 50_000}), [1, 50_000])
    task = TaskCompletion(run, h.id, st.fence, msgid, [timer])  # type: ignore[list-item]
    (first,) = await client.protocol.wft_complete(0, stream, "default", 60_000, "w1", 0, [task])
    before = await snapshot(client)
    (again,) = await client.protocol.wft_complete(0, stream, "default", 60_000, "w1", 0, [task])
    assert first.reply is Reply.OK and (again.reply, again.last_event_id) == (
        first.reply,
        first.last_event_id,
    )
    assert await snapshot(client) == before


async def test_completing_an_update_the_run_never_accepted_is_refused(client: Client) -> None:
    """(Else its outcome would land in an update hash that nothing expires.)"""
    stream, (h, msgid, st) = await started_task(client)
    good = _Cmd(CommandKind.START_TIMER, pack({"seq": 1, "duration_ms": 5}), [1, 5])
    stray = _Cmd(CommandKind.COMPLETE_UPDATE, pack({"update_id": "u9", "result": 1}), ["u9"])
    before = await snapshot(client)
    task = TaskCompletion(h.run_id or "", h.id, st.fence, msgid, [good, stray])  # type: ignore[list-item]
    (r,) = await client.protocol.wft_complete(0, stream, "default", 60_000, "w1", 0, [task])
    assert r.reply is Reply.INVALID and "u9" in r.why
    assert await snapshot(client) == before


async def test_a_bad_command_is_refused_before_anything_is_written(client: Client) -> None:
    stream, (h, msgid, st) = await started_task(client)
    good = _Cmd(CommandKind.START_TIMER, pack({"seq": 1, "duration_ms": 5}), [1, 5])
    bad = _Cmd("launch_missiles", b"", [])
    before = await snapshot(client)
    replies = await client.protocol.wft_complete(
        0,
        stream,
        "default",
        60_000,
        "w1",
        0,
        [TaskCompletion(h.run_id or "", h.id, st.fence, msgid, [good, bad])],  # type: ignore[list-item]
    )
    assert replies[0].reply is Reply.INVALID and "launch_missiles" in replies[0].why
    assert await snapshot(client) == before
    after_close = _Cmd(CommandKind.COMPLETE_WORKFLOW, pack({"result": 1}), [])
    replies = await client.protocol.wft_complete(
        0,
        stream,
        "default",
        60_000,
        "w1",
        0,
        [TaskCompletion(h.run_id or "", h.id, st.fence, msgid, [after_close, good])],  # type: ignore[list-item]
    )
    assert replies[0].reply is Reply.INVALID and "after the closing command" in replies[0].why
    assert await snapshot(client) == before


async def test_a_retried_start_never_wedges_the_execution_id(client: Client) -> None:
    p = client.protocol
    run = str(uuid.uuid4())
    assert (
        await p.start("wedge", run, "hello_workflow", "default", pack({"input": {}}), 60_000)
    ).reply is Reply.OK
    await client.get_workflow_handle("wedge").terminate("done quickly")
    before = await snapshot(client)
    # the client's automatic retry re-sends the first start after the run closed
    again = await p.start("wedge", run, "hello_workflow", "default", pack({"input": {}}), 60_000)
    assert (again.reply, again.run_id) == (Reply.OK, run)
    assert await snapshot(client) == before
    # an argument the script cannot use: refused, nothing written
    bad = await p.start("wedge", str(uuid.uuid4()), "hello_workflow", "default", b"", 0)
    assert bad.reply is Reply.INVALID and await snapshot(client) == before
    # no comparison rejects NaN: it is named; past ten years the clock would overflow
    for timeout in (float("nan"), float("inf"), MAX_DURATION_MS + 1):
        bad = await p.start("wedge", str(uuid.uuid4()), "hello_workflow", "default", b"", timeout)  # type: ignore[arg-type]
        assert bad.reply is Reply.INVALID and await snapshot(client) == before
        bad2 = await p.signal_with_start(
            "wedge",
            str(uuid.uuid4()),
            "hello_workflow",
            "default",
            b"",
            timeout,
            b"",
            "r1",  # type: ignore[arg-type]
        )
        assert bad2.reply is Reply.INVALID and await snapshot(client) == before
    # and the id starts again
    h = await client.start_workflow(flows.HelloWorkflow, {"name": "x"}, execution_id="wedge")
    assert h.run_id != run


async def test_repeated_terminate_and_activity_calls_answer_the_same(client: Client) -> None:
    ks = client.keyspace
    async with Worker(client, workflows=[flows.HelloWorkflow], **FAST):  # type: ignore[arg-type]
        h = await client.start_workflow(flows.HelloWorkflow, {"name": "x"})
        stream = ks.queue(0, "default", "act")
        await wait_until(lambda: client.redis.xlen(stream), 10)
    msgid, f = await read_one(client, stream, "w1")
    item = ActStartItem(f[b"run"].decode(), int(f[b"seq"]), int(f[b"att"]), msgid)
    first = (await client.protocol.act_start(0, stream, "w1", [item]))[0]
    again = (await client.protocol.act_start(0, stream, "w1", [item]))[0]
    other = (await client.protocol.act_start(0, stream, "w2", [item]))[0]
    assert (
        first.reply is Reply.OK
        and first.deadline_ms == again.deadline_ms
        and first.scheduled == again.scheduled
    )
    assert other.reply is Reply.RUNNING
    assert first.route is not None
    done = ActivityOutcome(
        item.run_id, item.seq, item.attempt, pack({"seq": item.seq, "att": 1, "result": "hi"}), first.route
    )
    assert [d.reply for d in await client.protocol.act_done(0, [done])] == [Reply.OK]
    before = await snapshot(client)
    assert [d.reply for d in await client.protocol.act_done(0, [done])] == [Reply.OK]
    assert await snapshot(client) == before
    rid = uuid.uuid4().hex
    first_t = await client.protocol.terminate(h.id, None, pack({"reason": "x"}), 60_000, rid)
    again_t = await client.protocol.terminate(h.id, None, pack({"reason": "x"}), 60_000, rid)
    other_t = await client.protocol.terminate(h.id, None, pack({"reason": "x"}), 60_000, uuid.uuid4().hex)
    assert first_t.reply is Reply.OK and again_t.reply is Reply.OK and other_t.reply is Reply.NOT_RUNNING


def test_scripts_speak_only_the_protocols_vocabulary() -> None:
    """A misspelt constant would be a nil that compares false without a word; a bare
    string would drift from the Python side. Neither may appear in a script."""
    values = {m.value for enum in ENUMS.values() for m in enum if m.value}
    for name in (*NAMES, "lib"):
        src = lua_source(name)
        code = "\n".join(line.split("--", 1)[0] for line in src.splitlines())
        for table, member in re.findall(r"\b(EV|RS|WT|AS|CMD|TK|R|PCP|OB|OV|SA)\.([A-Z_]+)\b", code):
            assert member in ENUMS[table].__members__, f"{name}.lua: {table}.{member} does not exist"
        for literal in re.findall(r"'([^']*)'", code):
            assert literal not in values, f"{name}.lua writes {literal!r}: use the generated constant"


async def test_a_cache_is_good_only_for_the_completion_redis_last_recorded(client: Client) -> None:
    """After a rollback the history may grow back past the cache's last event id with
    other events; only the fence of the last recorded completion tells them apart."""
    stream, (h, msgid, st) = await started_task(client)
    run = h.run_id or ""
    timer = _Cmd(CommandKind.START_TIMER, pack({"seq": 1, "duration_ms": 50_000}), [1, 50_000])
    (done,) = await client.protocol.wft_complete(
        0, stream, "default", 60_000, "w1", 0, [TaskCompletion(run, h.id, st.fence, msgid, [timer])]
    )  # type: ignore[list-item]
    rk = client.keyspace.run(0, run)

    async def next_start(fence: str) -> Any:
        await client.redis.hset(rk, mapping={"wft": "scheduled", "wft_msg": msgid})
        (again,) = await client.protocol.wft_start(
            0, stream, 10_000, 100, "w1", [WftStartItem(run, msgid, done.last_event_id, fence)]
        )
        await client.redis.hset(rk, "wft", "")
        return again

    assert (await next_start(st.fence)).since == done.last_event_id  # Redis has what the cache saw
    # Redis lost that completion, and another worker's took its place (same event ids)
    await client.redis.hset(rk, "wft_done", f"9-1|ok|{done.last_event_id}")
    stale = await next_start(st.fence)
    assert stale.since == 0 and next(e[0] for e in stale.events) == b"1-0"


# -- every key declared: what a call does when the state moved past its declaration ------


def _activity(seq: int = 1) -> _Cmd:
    body = pack({"seq": seq, "name": "hello", "input": pack(["x"]), "task_queue": "default"})
    return _Cmd(CommandKind.SCHEDULE_ACTIVITY, body, [seq, "default", 30_000, 0, 0, 1, 1000, 2.0, 10_000])


async def _with_activity(client: Client, sticky_ms: int = 0) -> tuple[str, str, Any, Any]:
    """A run whose first task scheduled one activity, started by worker w1."""
    stream, (h, msgid, st) = await started_task(client)
    run = h.run_id or ""
    task = TaskCompletion(run, h.id, st.fence, msgid, [_activity()])  # type: ignore[list-item]
    (done,) = await client.protocol.wft_complete(0, stream, "default", 60_000, "w1", sticky_ms, [task])
    assert done.reply is Reply.OK
    aq = client.keyspace.queue(0, "default", "act")
    amsg, _ = await read_one(client, aq, "w1")
    (ast,) = await client.protocol.act_start(0, aq, "w1", [ActStartItem(run, 1, 1, amsg)])
    return stream, aq, h, ast


@pytest.mark.parametrize("moved", [False, True])
async def test_an_activity_result_wakes_the_sticky_worker_it_was_told_of_or_the_shared_queue(
    client: Client, moved: bool
) -> None:
    """act_done declares the sticky stream act_start named; if another worker caches the
    run by then, the next task goes to the shared queue (a replay there), never to a
    stream the call did not declare, and is not lost."""
    ks = client.keyspace
    stream, _aq, h, ast = await _with_activity(client, sticky_ms=5_000)
    assert ast.route is not None and ast.route.sticky == "w1"
    rk = ks.run(0, h.run_id or "")
    if moved:
        await client.redis.hset(rk, "sticky", "w2")
    result = pack({"seq": 1, "att": 1, "result": "hi"})
    done = await client.protocol.act_done(0, [ActivityOutcome(h.run_id or "", 1, 1, result, ast.route)])
    assert [d.reply for d in done] == [Reply.OK]
    wft_q = (await client.redis.hget(rk, "wft_q") or b"").decode()
    if moved:
        assert wft_q == stream and await client.redis.hget(rk, "sticky") == b""
        assert not await client.redis.exists(ks.sticky(0, "default", "w2"))
    else:
        assert wft_q == ks.sticky(0, "default", "w1")
    assert await client.redis.xlen(wft_q) == 1  # the next workflow task, once


async def test_a_client_call_declared_for_a_run_no_longer_current_writes_nothing(client: Client) -> None:
    ks, p = client.keyspace, client.protocol
    wid = "reroute-me"
    shard = ks.shard(wid)
    first = await client.start_workflow(flows.HelloWorkflow, {"name": "x"}, execution_id=wid)
    stale = [
        ks.wf(shard, wid),
        *ks.run_keys(shard, wid, first.run_id or ""),
        ks.queue(shard, "default", "wft"),
    ]
    await first.terminate("make way")
    second = await client.start_workflow(flows.HelloWorkflow, {"name": "x"}, execution_id=wid)
    before = await snapshot(client)
    body = pack({"name": "approve", "input": pack([True])})
    declared = [ks.timers(shard), ks.closed(shard), *stale]
    res = await p.scripts.call("signal", declared, [ks.prefix(shard), wid, "", body, "rq-1"])
    assert res == [Reply.REROUTE.value.encode()]
    assert await snapshot(client) == before
    # through the protocol, which reads the current run again
    assert await p.signal(wid, None, body, "rq-1") == RunReply(Reply.OK, second.run_id or "")


async def test_a_run_of_another_execution_is_not_reached_through_this_ones_id(client: Client) -> None:
    h = await client.start_workflow(flows.HelloWorkflow, {"name": "x"})
    before = await snapshot(client)
    body = pack({"name": "approve", "input": pack([True])})
    reply = await client.protocol.signal("someone-else", h.run_id, body, "rq-1")
    assert reply == RunReply(Reply.NOT_RUNNING, "")
    assert await snapshot(client) == before


@pytest.mark.parametrize("how", ["terminate", "cancel"])
async def test_a_message_on_a_stream_a_call_did_not_declare_is_dropped_by_the_next_pump(
    client: Client, how: str
) -> None:
    """terminate does not declare the activity streams, nor does a task that cancels an
    activity scheduled earlier: the pending activity's task message is named in a member
    of the timers zset, due at once, and the next pump drops it, even on a queue no
    worker serves."""
    ks, p = client.keyspace, client.protocol
    stream, (h, msgid, st) = await started_task(client)
    run = h.run_id or ""
    nobody = _Cmd(
        CommandKind.SCHEDULE_ACTIVITY, _activity().body, [1, "nobody", 30_000, 0, 0, 1, 1000, 2.0, 10_000]
    )
    task = TaskCompletion(run, h.id, st.fence, msgid, [nobody])  # type: ignore[list-item]
    assert (await p.wft_complete(0, stream, "default", 60_000, "w1", 0, [task]))[0].reply is Reply.OK
    aq = ks.queue(0, "nobody", "act")
    assert await client.redis.xlen(aq) == 1
    if how == "terminate":
        await h.terminate("stop")
    else:  # the next task cancels it (a signal brings one)
        await p.signal(h.id, None, pack({"name": "ping", "input": pack([])}), "rq-1")
        msg2, _ = await read_one(client, stream, "w1")
        (st2,) = await p.wft_start(
            0, stream, 10_000, 100, "w1", [WftStartItem(run, msg2, 0, workflow_id=h.id)]
        )
        cancel = _Cmd(CommandKind.CANCEL_ACTIVITY, pack({"seq": 1}), [1])
        task2 = TaskCompletion(run, h.id, st2.fence, msg2, [cancel])  # type: ignore[list-item]
        assert (await p.wft_complete(0, stream, "default", 60_000, "w1", 0, [task2]))[0].reply is Reply.OK
    assert await client.redis.xlen(aq) == 1  # not declared: not touched
    members = await _members(client)
    assert any(m.startswith(f"msg_drop|{run}|") and m.endswith("|q:nobody:act") for m in members), members
    await p.pump(0, 100, 60_000, "w1")
    assert await client.redis.xlen(aq) == 0
    assert not any(m.startswith("msg_drop|") for m in await _members(client))


async def _members(client: Client) -> list[str]:
    return [m.decode() for m in await client.redis.zrange(client.keyspace.timers(0), 0, -1)]


async def test_one_worker_at_a_time_pumps_a_shard(client: Client) -> None:
    """While one worker's pump holds the shard's lease, another's finds the lease taken
    and is told to look again when it runs out; the pump gives it back when done."""
    ks, p = client.keyspace, client.protocol
    await _with_a_due_timer(client)
    await client.redis.set(ks.pump_lease(0), "w2", px=5_000)  # w2 is pumping
    held = await p.pump(0, 100, 60_000, "w1")
    assert held.handled == 0 and 4_000 < held.next_due_ms - held.now_ms <= 5_000
    await client.redis.delete(ks.pump_lease(0))  # w2 is done
    assert (await p.pump(0, 100, 60_000, "w1")).handled == 1
    assert not await client.redis.exists(ks.pump_lease(0))


async def test_a_refused_completion_drops_its_message_unless_the_run_still_needs_it(client: Client) -> None:
    ks, p = client.keyspace, client.protocol
    stream, (h, msgid, _st) = await started_task(client)
    rk = ks.run(0, h.run_id or "")
    task = TaskCompletion(h.run_id or "", h.id, "0-0", msgid, [])
    # another attempt of the same message holds the task: its message stays
    assert (await p.wft_complete(0, stream, "default", 60_000, "w1", 0, [task]))[0].reply is Reply.REFUSED
    assert await client.redis.xlen(stream) == 1
    # the run's task is another message now (this one timed out): this one goes
    await client.redis.hset(rk, "wft_msg", "1-1")
    assert (await p.wft_complete(0, stream, "default", 60_000, "w1", 0, [task]))[0].reply is Reply.REFUSED
    assert (
        await client.redis.xlen(stream) == 0 and (await client.redis.xpending(stream, GROUP))["pending"] == 0
    )


async def test_a_due_member_whose_keys_were_not_declared_waits_for_the_next_round(client: Client) -> None:
    ks, p = client.keyspace, client.protocol
    h, member = await _with_a_due_timer(client)
    run = h.run_id or ""
    declared = [ks.timers(0), ks.closed(0), ks.pump_lease(0), ks.run(0, run)]  # not the history, the queue
    res = await p.scripts.call("pump", declared, [ks.prefix(0), 60_000, "w1", member])
    assert res[0] == 0 and await client.redis.zscore(ks.timers(0), member) is not None
    assert (await p.pump(0, 100, 60_000, "w1")).handled == 1
    assert [e.type for e in await h.history()][-1] == "TimerFired"


async def _with_a_due_timer(client: Client) -> tuple[Any, str]:
    """A run whose first task started a 1 ms timer, once that timer is due: the handle
    and its member of the timers zset."""
    stream, (h, msgid, st) = await started_task(client)
    timer = _Cmd(CommandKind.START_TIMER, pack({"seq": 1, "duration_ms": 1}), [1, 1])
    task = TaskCompletion(h.run_id or "", h.id, st.fence, msgid, [timer])  # type: ignore[list-item]
    assert (await client.protocol.wft_complete(0, stream, "default", 60_000, "w1", 0, [task]))[
        0
    ].reply is Reply.OK
    member = f"timer|{h.run_id}|1"
    await wait_until(lambda: _due(client, member), 10)
    return h, member


async def _due(client: Client, member: str) -> bool:
    ks = client.keyspace
    return member.encode() in await client.redis.zrangebyscore(ks.timers(0), "-inf", int(time.time() * 1000))


async def test_the_scripts_load_themselves_where_they_are_missing(client: Client) -> None:
    """A new, flushed or restarted server has no library: the first call loads it, and
    a library of another version (a rolling upgrade) stays beside it."""
    await client.redis.function_flush()
    await client.redis.function_load(
        "#!lua name=rillflow_0ld\nredis.register_function('rf_0ld_start', function() return 1 end)"
    )
    h = await client.start_workflow(flows.HelloWorkflow, {"name": "x"})
    assert h.run_id
    listed: Any = await client.redis.function_list()
    libraries = {dict(zip(lib[::2], lib[1::2], strict=True))[b"library_name"].decode() for lib in listed}
    assert libraries == {"rillflow_0ld", client.protocol.scripts.library.name}


async def test_commands_are_packed_as_redis_py_packs_them(redis_url: str) -> None:
    """The clients pack commands with hiredis (C); what goes on the wire is what
    redis-py's own packer makes, and what it refuses is refused the same way."""
    from redis.asyncio.connection import Connection
    from redis.exceptions import DataError

    from rillflow_runtime.connections import make_redis

    r = make_redis(redis_url)
    try:
        conn = r.connection_pool.make_connection()
        plain = Connection()
        args = ("FUNCTION LOAD", "x", 3, -7, b"\xff\x00", "é", "rf:{ns:0}:run:r1", 2.5)
        assert b"".join(conn.pack_command(*args)) == b"".join(plain.pack_command(*args))
        with pytest.raises(DataError):
            conn.pack_command("SET", "k", None)
        assert await r.set("rf:packed", "é" * 10_000) and await r.get("rf:packed") == ("é" * 10_000).encode()
    finally:
        await r.aclose()


async def test_a_call_loads_the_library_again_when_it_vanishes_under_it(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator's FUNCTION FLUSH may land between a call's load of the library and
    its retry: the call loads it again."""
    scripts = client.protocol.scripts
    load = scripts.load
    flushes = 0

    async def load_then_lose_it() -> None:
        nonlocal flushes
        await load()
        if flushes < 2:
            flushes += 1
            await client.redis.function_flush()

    monkeypatch.setattr(scripts, "load", load_then_lose_it)
    await client.redis.function_flush()
    h = await client.start_workflow(flows.HelloWorkflow, {"name": "x"})
    assert h.run_id and flushes == 2


async def test_a_closed_runs_history_is_packed_into_one_value_and_reads_the_same(client: Client) -> None:
    ks, p = client.keyspace, client.protocol
    stream, (h, msgid, st) = await started_task(client)
    run = h.run_id or ""
    while_open = await h.history()
    done = _Cmd(CommandKind.COMPLETE_WORKFLOW, pack({"result": pack("ok")}), [])
    task = TaskCompletion(run, h.id, st.fence, msgid, [done])  # type: ignore[list-item]
    assert (await p.wft_complete(0, stream, "default", 60_000, "w1", 0, [task]))[0].reply is Reply.OK
    closed = await h.history()
    assert closed[: len(while_open)] == while_open
    assert [e.type for e in closed[len(while_open) :]] == [
        "WorkflowTaskCompleted",
        "WorkflowExecutionCompleted",
    ]
    assert [e.event_id for e in await h.history()] == list(range(1, len(closed) + 1))
    assert not await client.redis.exists(ks.history(0, h.id, run))  # the stream is gone
    assert 0 < await client.redis.pttl(ks.history_packed(0, run)) <= 60_000
    assert [e.event_id for e in map(HistoryEvent.from_entry, await p.history(0, h.id, run, after=2))] == list(
        range(3, len(closed) + 1)
    )
    # what routed its tasks is gone with it
    assert await client.redis.hmget(ks.run(0, run), ["wft_q", "wft_msg", "sticky"]) == [None] * 3
    # the packed value is keyed by the run alone: another execution's id does not read it
    assert await p.history(0, "another-execution", run) == []


async def test_a_history_packed_in_the_first_form_is_read_as_well(client: Client) -> None:
    """Runs closed by earlier versions (before the packed form had type codes, under the
    key named by execution and run) keep their history readable."""
    ks, p = client.keyspace, client.protocol
    old = [
        [1, b"WorkflowExecutionStarted", 1_000, pack({"input": {"a": 1}})],
        [2, b"WorkflowTaskCompleted", 1_005, pack({"t0": 1_004})],
        [3, b"WorkflowExecutionCompleted", 1_005, pack({"result": 1})],
    ]
    await client.redis.set(ks.history_packed_before(0, "wid", "run"), msgpack.packb(old))
    events = [HistoryEvent.from_entry(e) for e in await p.history(0, "wid", "run")]
    assert [(e.event_id, e.type, e.time_ms) for e in events] == [
        (1, "WorkflowExecutionStarted", 1_000),
        (2, "WorkflowTaskCompleted", 1_005),
        (3, "WorkflowExecutionCompleted", 1_005),
    ]
    assert events[0].attributes == {"input": {"a": 1}}


def test_the_packed_type_codes_never_move() -> None:
    """A packed history stores each type as its position in EVENT_CODES: new members go
    at the end, or histories already packed would read as other events."""
    assert [e.value for e in EVENT_CODES][:20] == [
        "WorkflowExecutionStarted",
        "WorkflowTaskCompleted",
        "WorkflowTaskFailed",
        "WorkflowTaskTimedOut",
        "ActivityTaskScheduled",
        "ActivityTaskCompleted",
        "ActivityTaskFailed",
        "ActivityTaskTimedOut",
        "ActivityTaskRetrying",
        "ActivityTaskCancelRequested",
        "TimerStarted",
        "TimerFired",
        "TimerCanceled",
        "WorkflowExecutionSignaled",
        "WorkflowExecutionUpdateAccepted",
        "WorkflowExecutionUpdateCompleted",
        "WorkflowExecutionCompleted",
        "WorkflowExecutionFailed",
        "WorkflowExecutionTimedOut",
        "WorkflowExecutionTerminated",
    ]


async def test_a_large_history_stays_a_stream_when_the_run_closes(client: Client) -> None:
    """Packing copies the whole history inside the closing script: one of many or large
    events is left as it is (it would hold Redis up, to save about 4 KB)."""
    ks, p = client.keyspace, client.protocol
    h = await client.start_workflow(flows.HelloWorkflow, {"name": "x"})
    big = pack({"name": "note", "input": pack(["x" * 20_000])})
    for i in range(5):  # 100 KB of signals
        assert (await p.signal(h.id, None, big, f"rq-{i}")).reply is Reply.OK
    await h.terminate("done")
    assert await client.redis.exists(ks.history(0, h.id, h.run_id or ""))
    assert not await client.redis.exists(ks.history_packed(0, h.run_id or ""))
    assert [e.type for e in await h.history()][-1] == "WorkflowExecutionTerminated"
    assert 0 < await client.redis.pttl(ks.history(0, h.id, h.run_id or "")) <= client.settings.retention_ms


async def _body_bytes(client: Client, wid: str, run: str) -> int:
    return sum(
        len(fields[b"d"]) for _id, fields in await client.redis.xrange(client.keyspace.history(0, wid, run))
    )


async def test_a_runs_history_bytes_are_counted_as_its_events_are_written(client: Client) -> None:
    """`hbytes` (what packing at close and the history limits go by) is the sum of the
    event bodies, buffered ones included once they join the history."""
    ks, p = client.keyspace, client.protocol
    stream, (h, msgid, st) = await started_task(client)
    run = h.run_id or ""
    for i in range(3):  # buffered: the task is started
        assert (
            await p.signal(h.id, None, pack({"name": "note", "input": pack([i])}), f"rq-{i}")
        ).reply is Reply.OK
    assert await client.redis.llen(ks.buffer(0, run)) == 9  # (type, time, body) each
    assert int(await client.redis.hget(ks.run(0, run), "hbytes") or -1) == await _body_bytes(
        client, h.id, run
    )
    timer = _Cmd(CommandKind.START_TIMER, pack({"seq": 1, "duration_ms": 60_000}), [1, 60_000])
    task = TaskCompletion(run, h.id, st.fence, msgid, [timer])  # type: ignore[list-item]
    assert (await p.wft_complete(0, stream, "default", 60_000, "w1", 0, [task]))[0].reply is Reply.OK
    assert int(await client.redis.hget(ks.run(0, run), "hbytes") or -1) == await _body_bytes(
        client, h.id, run
    )
    await h.terminate("done")
    assert await client.redis.hget(ks.run(0, run), "hbytes") is None  # a closed run keeps no count


async def test_a_run_from_before_history_bytes_were_counted_is_packed_by_its_memory(client: Client) -> None:
    """A run whose hash has no `hbytes` (started by an earlier version) is not given a
    wrong count: packing at close measures its stream instead."""
    ks, p = client.keyspace, client.protocol
    h = await client.start_workflow(flows.HelloWorkflow, {"name": "x"})
    run = h.run_id or ""
    await client.redis.hdel(ks.run(0, run), "hbytes")
    big = pack({"name": "note", "input": pack(["x" * 20_000])})
    for i in range(5):  # 100 KB of signals
        assert (await p.signal(h.id, None, big, f"rq-{i}")).reply is Reply.OK
    assert await client.redis.hget(ks.run(0, run), "hbytes") is None
    await h.terminate("done")
    assert await client.redis.exists(ks.history(0, h.id, run))  # measured: too large to pack
    assert not await client.redis.exists(ks.history_packed(0, run))


@pytest.mark.parametrize("how", ["start", "signal_with_start"])
async def test_a_start_never_keeps_the_expiry_of_an_execution_record_left_half(
    client: Client, how: str
) -> None:
    """An execution hash lost while its run ran (an eviction, an operator's DEL) leaves,
    after the close, one holding only a status, with the retention's expiry. A new run of
    the id must not inherit that expiry: its record would vanish while it runs, and a
    second start of the id would then run beside it."""
    ks = client.keyspace
    wk = ks.wf(ks.shard("half-wf"), "half-wf")
    await client.redis.hset(wk, "status", "terminated")
    await client.redis.pexpire(wk, 60_000)
    if how == "start":
        h = await client.start_workflow(flows.InboxWorkflow, execution_id="half-wf")
    else:
        h = await client.signal_with_start(flows.InboxWorkflow, execution_id="half-wf", signal="finish")
    assert await client.redis.hget(wk, "run") == (h.run_id or "").encode()
    assert await client.redis.pttl(wk) == -1
