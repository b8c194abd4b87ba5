"""The transition scripts, called through the protocol layer: a repeat of a call (the
client retried after a dropped connection) answers the same and changes nothing more; a
call from anyone else is fenced off; a call that cannot apply says why and writes
nothing; and the scripts speak only the protocol's vocabulary."""

from __future__ import annotations

import contextlib
import re
import uuid
from typing import Any

import pytest
from redis.exceptions import ResponseError

from rillflow import Client, Worker
from rillflow_runtime.codec import pack
from rillflow_runtime.keyspace import GROUP
from rillflow_runtime.model import ENUMS, CommandKind, Reply
from rillflow_runtime.protocol import ActivityOutcome, ActStartItem, TaskCompletion, WftStartItem
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
        0, "default", 60_000, "w1", 0, [TaskCompletion(h.run_id or "", first.fence, [])]
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
    _stream, (h, _msgid, st) = await started_task(client)
    run = h.run_id or ""
    task = TaskCompletion(
        run, st.fence, [_Cmd(CommandKind.START_TIMER, pack({"seq": 1, "duration_ms": 50_000}), [1, 50_000])]
    )  # type: ignore[list-item]
    (first,) = await client.protocol.wft_complete(0, "default", 60_000, "w1", 0, [task])
    before = await snapshot(client)
    (again,) = await client.protocol.wft_complete(0, "default", 60_000, "w1", 0, [task])
    assert first.reply is Reply.OK and (again.reply, again.last_event_id) == (
        first.reply,
        first.last_event_id,
    )
    assert await snapshot(client) == before


async def test_a_bad_command_is_refused_before_anything_is_written(client: Client) -> None:
    _stream, (h, _msgid, st) = await started_task(client)
    good = _Cmd(CommandKind.START_TIMER, pack({"seq": 1, "duration_ms": 5}), [1, 5])
    bad = _Cmd("launch_missiles", b"", [])
    before = await snapshot(client)
    replies = await client.protocol.wft_complete(
        0,
        "default",
        60_000,
        "w1",
        0,
        [TaskCompletion(h.run_id or "", st.fence, [good, bad])],  # type: ignore[list-item]
    )
    assert replies[0].reply is Reply.INVALID and "launch_missiles" in replies[0].why
    assert await snapshot(client) == before
    after_close = _Cmd(CommandKind.COMPLETE_WORKFLOW, pack({"result": 1}), [])
    replies = await client.protocol.wft_complete(
        0,
        "default",
        60_000,
        "w1",
        0,
        [TaskCompletion(h.run_id or "", st.fence, [after_close, good])],  # type: ignore[list-item]
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
    done = ActivityOutcome(
        item.run_id, item.seq, item.attempt, pack({"seq": item.seq, "att": 1, "result": "hi"})
    )
    assert await client.protocol.act_done(0, [done]) == [Reply.OK]
    before = await snapshot(client)
    assert await client.protocol.act_done(0, [done]) == [Reply.OK]
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
        for table, member in re.findall(r"\b(EV|RS|WT|AS|CMD|TK|R)\.([A-Z_]+)\b", code):
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
        0, "default", 60_000, "w1", 0, [TaskCompletion(run, st.fence, [timer])]
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
