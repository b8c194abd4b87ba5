"""Queries: a worker reads a run's state, from its cache or a replay, and records nothing."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest

import rillflow as workflows
from rillflow import Client, Worker
from tests import flows
from tests import seed_examples as ex
from tests.conftest import FAST, wait_until
from tests.test_cli import rf

pytestmark = pytest.mark.anyio

SEEDS = {"workflows": ex.WORKFLOWS, "activities": ex.ACTIVITIES, **FAST}


async def paused(h: Any) -> bool:
    s = await h.query("get_status")
    return (s["status"] if isinstance(s, dict) else s.status) == "paused"


@pytest.mark.parametrize("namespace_shards", [1, 4], ids=["shards1", "shards4"])
async def test_the_pages_status_query(client: Client, namespace_shards: int) -> None:
    async with Worker(client, **SEEDS) as w:  # type: ignore[arg-type]
        h = await client.start_workflow(ex.BatchWorkflow, {"items": [1, 2]})
        await wait_until(lambda: paused(h), 10)
        # by method, the result is the model
        status = await h.query(ex.BatchWorkflow.get_status)
        assert status == ex.WorkflowStatus(progress=0.5, status="paused")
        assert await h.query("progress_at_least", {"fraction": 0.5}) is True
        assert await h.query("progress_at_least", 0.9) is False  # a bare value for one parameter
        # by name only, plain data
        by_name = client.get_workflow_handle(h.id)
        assert await by_name.query("get_status") == {"progress": 0.5, "status": "paused"}
        before = len(await h.history())
        assert len(await h.history()) == before  # queries record nothing
        assert w.stats.cache_hits >= 1  # answered from the cached instance
        await h.signal("resume")
        assert await h.result(timeout=10) == 30
    # a closed run is answered from its history, by a worker that never ran it
    async with Worker(client, **SEEDS) as w2:  # type: ignore[arg-type]
        assert await by_name.query("get_status") == {"progress": 1.0, "status": "done"}
    assert w2.stats.workflow_tasks == 0


async def test_a_worker_without_the_run_in_cache_replays_it(client: Client) -> None:
    async with Worker(client, **SEEDS):  # type: ignore[arg-type]
        h = await client.start_workflow(ex.BatchWorkflow, {"items": [4, 5, 6]})
        await wait_until(lambda: paused(h), 10)
    async with Worker(client, **SEEDS) as w2:  # type: ignore[arg-type]
        assert await h.query("get_status") == ex.WorkflowStatus(progress=1 / 3, status="paused")
        assert w2.stats.workflow_tasks == 0  # no task ran: the query replayed the history
        await h.signal("resume")
        assert await h.result(timeout=10) == 150


async def test_bad_queries(client: Client) -> None:
    async with Worker(client, **SEEDS):  # type: ignore[arg-type]
        h = await client.start_workflow(ex.BatchWorkflow, {"items": [1, 2]})
        await wait_until(lambda: paused(h), 10)
        by_name = client.get_workflow_handle(h.id)
        for handle in (h, by_name):
            with pytest.raises(
                workflows.InvalidInputError, match=r"no query 'status' \(its queries: get_status, "
            ):
                await handle.query("status")
        with pytest.raises(workflows.InvalidInputError, match="fraction: Input should be a valid number"):
            await h.query("progress_at_least", {"fraction": "half"})
        with pytest.raises(workflows.InvalidInputError, match="fraction: 'half' is not of type 'number'"):
            await by_name.query("progress_at_least", {"fraction": "half"})
        with pytest.raises(workflows.InvalidInputError, match="'resume' is a signal handler, not a query"):
            await h.query(ex.BatchWorkflow.resume)
        await h.terminate()
    with pytest.raises(workflows.WorkflowNotFoundError, match="no workflow execution 'nobody'"):
        await client.get_workflow_handle("nobody").query("get_status")


async def test_query_handler_failures_reach_the_caller(client: Client) -> None:
    async with Worker(client, workflows=[flows.QueriedWorkflow], activities=[flows.hello], **FAST):  # type: ignore[arg-type]
        h = await client.start_workflow(flows.QueriedWorkflow)
        await wait_until(lambda: _ready(h), 10)
        with pytest.raises(workflows.WorkflowQueryFailedError, match="ZeroDivisionError") as e:
            await h.query("ratio", {"of": 0})
        assert e.value.cause.type == "ZeroDivisionError"
        with pytest.raises(workflows.WorkflowQueryFailedError, match="a query only reads state"):
            await h.query("meddle")
        with pytest.raises(
            workflows.WorkflowQueryFailedError, match="does not match its return annotation int"
        ):
            await h.query("wrong_type")
        # continue_as_new() in a query: its caller is told why; the poller goes on answering
        for _ in range(2):
            with pytest.raises(workflows.WorkflowQueryFailedError, match="only the entrypoint may"):
                await h.query("restart", timeout=timedelta(seconds=5))
        # the run is unharmed, and answers again (from a replay: the meddled instance was dropped)
        assert await h.query("ratio", {"of": 2}) == 5
        await h.signal("finish")
        assert await h.result(timeout=10) == "hello done"


async def _ready(h: Any) -> bool:
    return "WorkflowTaskCompleted" in [e.type for e in await h.history()]


async def test_a_query_nobody_answers_times_out_and_is_withdrawn(client: Client) -> None:
    h = await client.start_workflow(ex.BatchWorkflow, {"items": [1]})
    with pytest.raises(workflows.WorkflowQueryTimeoutError, match="are workers serving task queue 'default'"):
        await h.query("get_status", timeout=timedelta(milliseconds=300))
    stream = client.keyspace.queue(client.keyspace.shard(h.id), "default", "qry")
    assert await client.redis.xlen(stream) == 0  # a worker that starts later does not answer it


def test_query_definitions_are_checked_when_decorated() -> None:
    with pytest.raises(
        workflows.WorkflowDefinitionError,
        match=r"Query 'q' must be a synchronous function \(def\), not async def\.",
    ):

        @workflows.workflow.query()
        async def q(self) -> int: ...

    with pytest.raises(
        workflows.WorkflowDefinitionError,
        match=r"Query 'q' must have a return type annotation other than None\.",
    ):

        @workflows.workflow.query()
        def q(self) -> None: ...

    with pytest.raises(workflows.WorkflowDefinitionError, match="'q' has \\*\\*kw which is not supported"):

        @workflows.workflow.query()
        def q(self, **kw: int) -> int: ...

    with pytest.raises(workflows.WorkflowDefinitionError, match="query name '__pending' is reserved"):
        workflows.workflow.query(name="__pending")(lambda self: 1)


async def test_query_schemas_are_registered_and_the_cli_queries(redis_url: str, worker_procs: Any) -> None:
    worker_procs(redis_url, target="tests.seed_examples")
    url = ["--url", redis_url]
    doc = json.loads(rf("schema", "batch_workflow", *url).stdout)
    queries = {q["name"]: q for q in doc["queries"]}
    assert list(queries) == ["get_status", "progress_at_least"]
    assert queries["get_status"]["description"] == "Get current status"
    assert queries["get_status"]["output_schema"]["title"] == "WorkflowStatus"
    assert queries["progress_at_least"]["output_schema"] == {"type": "boolean"}
    assert [s["name"] for s in doc["signals"]] == ["resume"]

    assert rf("start", "batch_workflow", "-i", '{"items": [1, 2]}', "--id", "cli-batch", *url).returncode == 0
    async with await Client.connect(redis_url) as c:
        await wait_until(lambda: paused(c.get_workflow_handle("cli-batch")), 10)
    p = rf("query", "cli-batch", "get_status", *url)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"progress": 0.5, "status": "paused"}
    p = rf("query", "cli-batch", "progress_at_least", "-i", '{"fraction": 0.25}', *url)
    assert p.returncode == 0 and json.loads(p.stdout) is True
    p = rf("query", "cli-batch", "get_stats", *url)
    assert p.returncode == 2 and "no query 'get_stats'" in p.stderr
    p = rf("query", "nobody", "get_status", *url)
    assert p.returncode == 3
