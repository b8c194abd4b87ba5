"""The transition scripts, called directly: a repeat of a call (the client retried after a
dropped connection) answers the same; a call from anyone else is fenced off."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from redis.exceptions import ResponseError

from rillflow import Client, Worker
from rillflow_runtime.keyspace import GROUP
from tests import flows
from tests.conftest import FAST, wait_until

pytestmark = pytest.mark.anyio


async def read_one(client: Client, stream: str, consumer: str) -> tuple[str, dict[bytes, bytes]]:
    with contextlib.suppress(ResponseError):  # BUSYGROUP: a worker made it already
        await client.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    resp: Any = await client.redis.xreadgroup(GROUP, consumer, {stream: ">"}, count=1)
    msgid, fields = resp[0][1][0]
    return msgid.decode(), fields


async def test_repeated_workflow_task_start_gets_the_same_fence(client: Client) -> None:
    ks = client.keyspace
    h = await client.start_workflow(flows.HelloWorkflow, {"name": "x"})
    stream = ks.queue(0, "default", "wft")
    msgid, fields = await read_one(client, stream, "w1")

    async def start(worker: str) -> Any:
        return (
            await client.scripts.call(
                "wft_start",
                ks.timers(0),
                [ks.prefix(0), stream, 10_000, 100, worker, fields[b"run"], msgid, 0],
            )
        )[0]

    first, again, other = await start("w1"), await start("w1"), await start("w2")
    assert first[0] == b"ok" and again[0] == b"ok"
    assert (first[1], first[2]) == (again[1], again[2])  # same fence, same workflow time
    assert other == [b"busy"]
    assert await client.redis.hget(ks.run(0, h.run_id or ""), "wft_seq") == b"1"


async def test_repeated_activity_start_answers_the_same(client: Client) -> None:
    ks = client.keyspace
    async with Worker(client, workflows=[flows.HelloWorkflow], **FAST):  # type: ignore[arg-type]
        await client.start_workflow(flows.HelloWorkflow, {"name": "x"})
        stream = ks.queue(0, "default", "act")
        await wait_until(lambda: client.redis.xlen(stream), 10)
    msgid, f = await read_one(client, stream, "w1")

    async def start(worker: str) -> Any:
        args = [ks.prefix(0), "default", worker, f[b"run"], f[b"seq"], f[b"att"], msgid]
        return (await client.scripts.call("act_start", ks.timers(0), args))[0]

    first, again, other = await start("w1"), await start("w1"), await start("w2")
    assert first[0] == b"ok"
    # same body, heartbeat details and deadline; only "now" (index 5) moves on
    assert first[:5] == again[:5] and first[6] == again[6]
    assert other == [b"running"]
    assert await client.redis.zcard(ks.timers(0)) >= 1
