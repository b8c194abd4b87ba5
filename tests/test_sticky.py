"""Sticky workflow task queues: a run's next task goes to the worker that caches it."""

from __future__ import annotations

from datetime import timedelta

import pytest

from rillflow import Client, Worker
from tests import flows
from tests.conftest import FAST, wait_until

pytestmark = pytest.mark.anyio
SEQ = {"workflows": [flows.SequentialWorkflow], "activities": [flows.step]}


@pytest.mark.parametrize("namespace_shards", [1, 4], ids=["shards1", "shards4"])
async def test_many_workers_do_not_replay_at_every_step(client: Client, namespace_shards: int) -> None:
    workers = [Worker(client, **SEQ, **FAST) for _ in range(3)]  # type: ignore[arg-type]
    for w in workers:
        await w.__aenter__()
    try:
        handles = [await client.start_workflow(flows.SequentialWorkflow, {"steps": 30}) for _ in range(6)]
        for h in handles:
            assert await h.result(timeout=30) == sum(range(1, 31))
    finally:
        for w in workers:
            await w.__aexit__(None, None, None)
    misses = sum(w.stats.cache_misses for w in workers)
    hits = sum(w.stats.cache_hits for w in workers)
    # one cold start per run; every later task found its instance in the worker's cache
    assert misses == len(handles), (misses, hits)
    assert hits == 30 * len(handles)


async def test_sticky_task_falls_back_to_the_shared_queue(client: Client) -> None:
    fast_fallback = {"sticky_schedule_timeout": timedelta(milliseconds=300), **FAST}
    h = await client.start_workflow(flows.TimerWorkflow, {"seconds": 1.0})
    run_key = client.keyspace.run(client.keyspace.shard(h.id), h.run_id or "")
    async with Worker(client, workflows=[flows.TimerWorkflow], identity="worker-b", **fast_fallback) as b:  # type: ignore[arg-type]

        async def sticky_to_b() -> bool:
            return await client.redis.hget(run_key, "sticky") == b"worker-b"

        await wait_until(sticky_to_b, 10)
    sticky_stream = client.keyspace.queue(0, "default", "wft@worker-b")
    assert not await client.redis.exists(sticky_stream)  # deleted when b stopped
    # b is gone; when the timer fires the task goes to b's stream first, then to c
    async with Worker(client, workflows=[flows.TimerWorkflow], identity="worker-c", **fast_fallback) as c:  # type: ignore[arg-type]
        assert await h.result(timeout=15) >= 1.0
    assert b.stats.workflow_tasks == 1
    assert c.stats.cache_misses == 1
    assert not await client.redis.exists(sticky_stream)  # the orphaned stream was removed
