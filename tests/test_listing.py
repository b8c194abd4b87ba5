"""Finding executions: list_workflows and count_workflows over the shards' indexes,
their filters and paging over 10,000 runs, retention, and the command line."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import pytest

from rillflow import Client, Worker
from rillflow.errors import InvalidInputError
from tests import flows
from tests.conftest import FAST, wait_until
from tests.test_cli import assert_one_line, rf

pytestmark = pytest.mark.anyio


@pytest.fixture
def namespace_shards(shards: int) -> int:
    return shards


async def start_many(client: Client, n: int, offset: int = 0) -> list[Any]:
    """Runs with no worker to run them: they stay running (two types, two queues)."""
    sem = asyncio.Semaphore(200)

    async def one(i: int) -> Any:
        async with sem:
            return await client.start_workflow(
                "type_a" if i % 2 else "type_b",
                {"i": i},
                execution_id=f"run-{i:05d}",
                task_queue="q1" if i % 4 < 2 else "q2",
                allow_unregistered=True,
            )

    return await asyncio.gather(*(one(i) for i in range(offset, offset + n)))


async def all_pages(client: Client, page_size: int, **flt: Any) -> list[Any]:
    rows, token, pages = [], None, 0
    while True:
        page = await client.list_workflows(page_size=page_size, next_page_token=token, **flt)
        assert len(page.executions) <= page_size
        rows += page.executions
        pages += 1
        token = page.next_page_token
        if token is None:
            return rows
        assert pages < 10_000


async def test_listing_and_counting_10000_runs_with_filters_and_pages(client: Client) -> None:
    handles = await start_many(client, 10_000)
    terminated = handles[::10]  # 1,000 of them: every tenth
    sem = asyncio.Semaphore(200)

    async def stop(h: Any) -> None:
        async with sem:
            await h.terminate("listed")

    await asyncio.gather(*(stop(h) for h in terminated))

    rows = await all_pages(client, 1000)
    assert len(rows) == 10_000 and len({r.run_id for r in rows}) == 10_000
    starts = [r.start_time for r in rows]
    assert starts == sorted(starts, reverse=True)  # newest first, across shards
    assert await client.count_workflows() == 10_000
    assert await client.count_workflows(status="running") == 9_000
    assert await client.count_workflows(status="terminated") == 1_000
    assert await client.count_workflows(workflow_type="type_a") == 5_000
    # (every tenth run is even: of type_b)
    assert await client.count_workflows(workflow_type="type_b", status="terminated") == 1_000
    assert await client.count_workflows(workflow_type="type_a", status="terminated") == 0
    assert await client.count_workflows(task_queue="q2", workflow_type="type_a") == 2_500

    done = await all_pages(client, 300, status="terminated")
    assert {r.execution_id for r in done} == {h.id for h in terminated}
    assert all(r.status == "terminated" and r.close_time is not None for r in done)
    running = await all_pages(client, 777, status="running", workflow_type="type_a", task_queue="q1")
    assert len(running) == sum(1 for i in range(10_000) if i % 2 and i % 4 < 2 and i % 10)
    assert all((r.status, r.workflow_type, r.task_queue) == ("running", "type_a", "q1") for r in running)

    # a window of start times: [after, before)
    after, before = rows[6000].start_time, rows[2000].start_time
    inside = [r for r in rows if after <= r.start_time < before]
    window = await all_pages(client, 500, started_after=after, started_before=before)
    assert [r.run_id for r in window] == [r.run_id for r in inside]
    assert await client.count_workflows(started_after=after, started_before=before) == len(inside)

    # the runs of one execution
    (one,) = (await client.list_workflows(execution_id="run-00042")).executions
    assert one.run_id == handles[42].run_id


async def test_a_page_token_holds_its_place_while_runs_start(client: Client) -> None:
    await start_many(client, 300)
    first = await client.list_workflows(page_size=100)
    await start_many(client, 50, offset=300)  # newer than every run listed so far
    rest = await all_pages_from(client, first.next_page_token)
    listed = [r.run_id for r in first.executions + rest]
    assert len(listed) == len(set(listed)) == 300  # nothing repeated, nothing skipped


async def all_pages_from(client: Client, token: str | None) -> list[Any]:
    rows = []
    while token is not None:
        page = await client.list_workflows(page_size=100, next_page_token=token)
        rows += page.executions
        token = page.next_page_token
    return rows


async def test_closed_runs_leave_the_listing_with_their_retention(
    redis_url: str, namespace_shards: int
) -> None:
    client = await Client.connect(
        redis_url, namespace="brief", shards=namespace_shards, retention=timedelta(seconds=1)
    )
    try:
        async with Worker(
            client, workflows=[flows.HelloWorkflow], activities=[flows.hello, flows.hello_sync], **FAST
        ):
            for i in range(5):
                await client.execute_workflow(flows.HelloWorkflow, {"name": str(i)}, result_timeout=10)
            assert await client.count_workflows(status="completed") == 5
            assert len((await client.list_workflows()).executions) == 5

            async def gone() -> bool:  # its keys expired, and the workers' upkeep forgot it
                return not (await client.list_workflows()).executions and await client.count_workflows() == 0

            await wait_until(gone, timeout=20, interval=0.2)
        for s in client.keyspace.all_shards():
            assert await client.redis.zcard(client.keyspace.index(s, "start")) == 0
            assert await client.redis.zcard(client.keyspace.index(s, "exp")) == 0
    finally:
        await client.close()


async def test_bad_filters_are_refused_clearly(client: Client) -> None:
    from datetime import datetime

    with pytest.raises(InvalidInputError, match="status 'finished' is not one of running, completed"):
        await client.list_workflows(status="finished")
    with pytest.raises(InvalidInputError, match="timezone-aware"):
        await client.count_workflows(started_after=datetime(2026, 1, 1))
    with pytest.raises(InvalidInputError, match="page_size must be a whole number from 1 to 1000"):
        await client.list_workflows(page_size=0)
    with pytest.raises(InvalidInputError, match="is not one this listing gave"):
        await client.list_workflows(next_page_token="not-a-token")


def test_the_command_line_lists_and_counts(redis_url: str) -> None:
    asyncio.run(_three_runs(redis_url))
    p = rf("list", "--url", redis_url, "--json", "--limit", "2")
    assert p.returncode == 0, p.stderr
    page = json.loads(p.stdout)
    assert [e["execution_id"] for e in page["executions"]] == ["cli-2", "cli-1"]
    p = rf("list", "--url", redis_url, "--json", "--page-token", page["next_page_token"])
    assert [e["execution_id"] for e in json.loads(p.stdout)["executions"]] == ["cli-0"]
    assert rf("count", "--url", redis_url, "--status", "running").stdout.strip() == "3"
    table = rf("list", "--url", redis_url, "--type", "type_a")
    assert table.returncode == 0 and "cli-1" in table.stdout and "cli-2" not in table.stdout
    assert_one_line(rf("list", "--url", redis_url, "--status", "nope"), 2, "status 'nope' is not one of")
    assert_one_line(rf("count", "--url", redis_url, "--after", "yesterday"), 2, "--after must be an ISO time")


async def _three_runs(url: str) -> None:
    client = await Client.connect(url)
    try:
        for i in range(3):
            await client.start_workflow(
                "type_a" if i % 2 else "type_b", {}, execution_id=f"cli-{i}", allow_unregistered=True
            )
            await asyncio.sleep(0.005)  # distinct start times: the order is theirs
    finally:
        await client.close()


async def _one_shard(redis_url: str, namespace: str) -> Client:
    return await Client.connect(redis_url, namespace=namespace, shards=1)


@pytest.mark.parametrize("which", [0, -1])
async def test_a_run_closing_while_a_page_is_read_never_hides_another(redis_url: str, which: int) -> None:
    """700 running runs that started in one millisecond: the page is read in two pieces,
    and between them one run already given (the first, or the last of the piece) closes."""
    client = await _one_shard(redis_url, f"ties{which + 1}")
    try:
        handles = await start_many(client, 700)
        key = client.keyspace.index(0, "open")
        await client.redis.zadd(key, {h.run_id: 1_700_000_000_000 for h in handles}, xx=True)
        await client.redis.zadd(
            client.keyspace.index(0, "start"), {h.run_id: 1_700_000_000_000 for h in handles}, xx=True
        )
        by_run = {h.run_id: h for h in handles}
        real, closed = client.redis.zrange, []

        async def zrange(*a: Any, **kw: Any) -> Any:
            res = await real(*a, **kw)
            if not closed and a and a[0] == key:
                run = res[which][0].decode()
                await by_run[run].terminate("meanwhile")
                closed.append(run)
            return res

        client.redis.zrange = zrange  # type: ignore[method-assign]
        page = await client.list_workflows(status="running", page_size=1000)
        client.redis.zrange = real  # type: ignore[method-assign]
        assert set(by_run) - set(closed) <= {e.run_id for e in page.executions}
    finally:
        await client.close()


async def test_what_an_earlier_release_left_in_the_indexes_is_swept(redis_url: str) -> None:
    """A worker of an earlier release closes runs without touching the indexes: the
    sweep finds the closed run in the running index, and a run whose keys are gone."""
    client = await _one_shard(redis_url, "sweep")
    try:
        closed, gone, running = await start_many(client, 3)
        await closed.terminate("old worker")
        ks = client.keyspace
        # as the earlier release's close left them
        await client.redis.zadd(ks.index(0, "open"), {closed.run_id: 1})
        await client.redis.zrem(ks.index(0, "exp"), closed.run_id)
        await client.redis.delete(ks.run(0, gone.run_id))
        assert await client.count_workflows(status="running") == 3
        await client.protocol.trim_index(0, client.settings.retention_ms)
        assert await client.count_workflows(status="running") == 1
        assert {e.run_id for e in (await client.list_workflows()).executions} == {
            running.run_id,
            closed.run_id,
        }
        assert (
            await client.redis.zscore(ks.index(0, "exp"), closed.run_id) is not None
        )  # it expires as runs do
    finally:
        await client.close()


async def test_a_token_is_good_only_for_the_listing_that_gave_it(client: Client) -> None:
    await start_many(client, 5)
    page = await client.list_workflows(status="running", page_size=2)
    assert page.next_page_token is not None
    with pytest.raises(InvalidInputError, match="with the same filters"):
        await client.list_workflows(workflow_type="type_a", next_page_token=page.next_page_token)


async def test_a_time_window_counts_to_the_microsecond(client: Client) -> None:
    (h,) = await start_many(client, 1)
    start = (await h.describe()).start_time  # (whole ms, as Redis's clock gave it)
    half = timedelta(microseconds=500)
    assert await client.count_workflows(started_before=start + half) == 1
    assert await client.count_workflows(started_after=start + half) == 0
    assert await client.count_workflows(started_after=start, started_before=start + half) == 1


async def test_a_filter_that_matches_few_runs_answers_in_pages_of_bounded_work(
    client: Client, monkeypatch: Any
) -> None:
    from rillflow import listing

    monkeypatch.setattr(listing, "READ_BUDGET", 50)
    await start_many(client, 300)
    page = await client.list_workflows(workflow_type="nothing_like_it", page_size=10)
    assert page.executions == [] and page.next_page_token is not None  # gave up early, said where
    assert await all_pages(client, 10, workflow_type="nothing_like_it") == []
    assert len(await all_pages(client, 100, workflow_type="type_a")) == 150


async def test_the_last_page_of_a_filtered_listing_says_it_is_the_last(client: Client) -> None:
    await start_many(client, 8)  # four of type_a
    page = await client.list_workflows(workflow_type="type_a", page_size=4)
    assert len(page.executions) == 4 and page.next_page_token is None
    first = await client.list_workflows(workflow_type="type_a", page_size=3)
    assert first.next_page_token is not None
    rest = await client.list_workflows(
        workflow_type="type_a", page_size=3, next_page_token=first.next_page_token
    )
    assert len(rest.executions) == 1 and rest.next_page_token is None
