"""A schedule due every second, looked after by three worker processes for a minute
while they are SIGKILLed and replaced: every due time runs once, none is lost."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest

from rillflow import Client
from rillflow.models import ScheduleDefinition, ScheduleInterval, ScheduleOverlapPolicy, SchedulePolicy
from rillflow.schedules import at_ms, execution_id
from tests import schedule_flows as sf
from tests.conftest import wait_until

pytestmark = pytest.mark.anyio

TARGET = "tests.schedule_flows:WORKFLOWS"


async def test_every_second_for_a_minute_across_three_killed_workers_runs_each_due_time_once(
    redis_url: str, worker_procs: Any
) -> None:
    client = await Client.connect(redis_url, shards=4, workflow_task_timeout=timedelta(seconds=2))
    try:
        procs = [worker_procs(redis_url, TARGET) for _ in range(3)]
        schedule = ScheduleDefinition(
            input={"n": 1},
            intervals=[ScheduleInterval(every=timedelta(seconds=1))],
            policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.ALLOW_ALL),
        )
        h = await client.create_schedule(sf.Tick, schedule, schedule_id="second")
        created = (await h.describe()).created_at
        assert created is not None
        rng = random.Random(7)
        began = time.monotonic()
        kills = 0
        while time.monotonic() - began < 60:
            await asyncio.sleep(rng.uniform(4, 9))
            victim = rng.randrange(len(procs))
            procs[victim].kill()  # SIGKILL: whatever it was doing, mid-call or not
            kills += 1
            procs[victim] = worker_procs(redis_url, TARGET)
        await h.pause("the test is over")
        d = await h.describe()
        # what the schedule acted on: every second after its creation up to its cursor
        cursor = int(
            await client.redis.hget(
                client.keyspace.schedule(client.keyspace.shard("second"), "second"), "cursor"
            )
        )

        async def all_closed() -> bool:
            page = await client.list_workflows(schedule_id="second", page_size=1000)
            return len(page.executions) > 0 and all(e.status == "completed" for e in page.executions)

        await wait_until(all_closed, timeout=60, interval=0.5)
        page = await client.list_workflows(schedule_id="second", page_size=1000)
        ids = Counter(e.execution_id for e in page.executions)
        first = int(created.timestamp()) + 1
        expected = [execution_id("second", at_ms(s * 1000)) for s in range(first, cursor // 1000 + 1)]
        assert kills >= 6
        assert len(expected) >= 55
        assert [i for i, n in ids.items() if n > 1] == []  # none twice
        assert sorted(ids) == expected  # none lost, none extra
        assert d.times_skipped == 0
        # each run was told the due time its id names
        some = client.get_workflow_handle(expected[len(expected) // 2])
        assert (await some.result(timeout=10))["scheduled"] == at_ms(
            (first + len(expected) // 2) * 1000
        ).isoformat()
    finally:
        await client.close()
