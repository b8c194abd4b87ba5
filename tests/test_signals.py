"""Signals: fire-and-forget messages a running workflow handles in history order."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import redis

import rillflow as workflows
from rillflow import Client, Worker
from tests import flows
from tests import seed_examples as ex
from tests.conftest import FAST, wait_until
from tests.test_cli import rf

pytestmark = pytest.mark.anyio

INBOX = {"workflows": [flows.InboxWorkflow], "activities": [flows.hello], **FAST}


def types(events: list[workflows.HistoryEvent]) -> list[str]:
    return [e.type for e in events]


async def test_the_pages_approval_signal(client: Client) -> None:
    async with Worker(client, workflows=ex.WORKFLOWS, activities=ex.ACTIVITIES, **FAST):  # type: ignore[arg-type]
        h = await client.start_workflow(ex.InvoiceWorkflow)
        await asyncio.sleep(0.2)
        assert (await h.describe()).status == "running"  # waiting for approval
        await h.signal(ex.InvoiceWorkflow.approve_signal, ex.ApprovalData(approver="ana"))
        assert await h.result(timeout=10) == "approved by ana"
        # by name, with the input as plain data
        h = await client.start_workflow("invoice_workflow")
        await client.get_workflow_handle(h.id).signal("approve", {"approver": "bo"})
        assert await h.result(timeout=10) == "approved by bo"
    events = await h.history()
    sig = next(e for e in events if e.type == "WorkflowExecutionSignaled")
    assert sig.attributes == {"name": "approve", "input": {"approver": "bo"}}


@pytest.mark.parametrize("namespace_shards", [1, 4], ids=["shards1", "shards4"])
async def test_handlers_run_in_history_order_sync_async_and_kwargs(
    client: Client, namespace_shards: int
) -> None:
    async with Worker(client, **INBOX):  # type: ignore[arg-type]
        h = await client.start_workflow(flows.InboxWorkflow, execution_id=f"inbox-{namespace_shards}")
        # sent before the first workflow task has run: handled all the same
        await h.signal("message", {"text": "a"})
        await h.signal(flows.InboxWorkflow.tag_signal, flows.Tag(key="k", weight=2))
        await h.signal("meta", {"source": "crm", "region": "eu", "tier": 1})
        await h.signal("message", {"text": "b"})
        await wait_until(lambda: _signaled(h, 4), 10)
        await h.signal("finish")
        log = await h.result(timeout=10)
    assert log[0] == "started"
    assert "tag k=2" in log and "meta crm [('region', 'eu'), ('tier', 1)]" in log
    # each async handler awaited its own activity; messages kept their order
    assert [x for x in log if x.startswith("message")] == ["message a x1", "message b x1"]
    assert log.index("echo hello a") > log.index("message a x1")
    events = await h.history()
    assert types(events).count("WorkflowExecutionSignaled") == 5


async def _signaled(h: Any, n: int) -> bool:
    return types(await h.history()).count("WorkflowExecutionSignaled") >= n


async def test_a_burst_of_signals_is_each_handled_once(client: Client) -> None:
    async with Worker(client, **INBOX):  # type: ignore[arg-type]
        h = await client.start_workflow(flows.InboxWorkflow)
        await asyncio.gather(*(h.signal("tag", {"key": f"t{i}", "weight": i}) for i in range(60)))
        await h.signal("finish")
        log = await h.result(timeout=20)
    tags = [x for x in log if x.startswith("tag ")]
    recorded = [e.attributes["input"]["key"] for e in await h.history() if e.attributes.get("name") == "tag"]
    assert len(recorded) == 60 and sorted(recorded) == sorted(f"t{i}" for i in range(60))
    assert tags == [f"tag {k}={k[1:]}" for k in recorded]  # handled in the order recorded


async def test_a_fresh_worker_replays_signals_to_the_same_state(client: Client) -> None:
    async with Worker(client, **INBOX) as w1:  # type: ignore[arg-type]
        h = await client.start_workflow(flows.InboxWorkflow)
        await h.signal("message", {"text": "x", "times": 2})
        await h.signal("tag", {"key": "z", "weight": 0})
        await wait_until(lambda: _echoed(h), 10)
    async with Worker(client, **INBOX) as w2:  # type: ignore[arg-type]
        await h.signal("finish")
        log = await h.result(timeout=10)
    assert w1.stats.cache_misses >= 1 and w2.stats.cache_misses >= 1  # w2 rebuilt it from history
    assert log[0] == "started" and sorted(log) == sorted(
        ["started", "message x x2", "tag z=0", "echo hello x"]
    )
    assert log.index("message x x2") < log.index("echo hello x")


async def _echoed(h: Any) -> bool:
    return "ActivityTaskCompleted" in types(await h.history())


async def test_a_signal_sent_twice_with_one_request_id_is_delivered_once(client: Client) -> None:
    async with Worker(client, **INBOX):  # type: ignore[arg-type]
        h = await client.start_workflow(flows.InboxWorkflow)
        for _ in range(3):
            await h.signal("tag", {"key": "once", "weight": 1}, request_id="req-1")
        await h.signal("tag", {"key": "twice", "weight": 1}, request_id="req-2")
        await h.signal("finish")
        log = await h.result(timeout=10)
    assert log.count("tag once=1") == 1 and log.count("tag twice=1") == 1


async def test_a_request_id_an_earlier_release_recorded_on_the_run_is_not_delivered_again(
    client: Client,
) -> None:
    """Releases before per-execution request ids kept them per run (``sig:<run>``): a
    retry through this release is still a duplicate, and that record expires with the
    run instead of staying for good."""
    async with Worker(client, **INBOX):  # type: ignore[arg-type]
        h = await client.start_workflow(flows.InboxWorkflow)
        ks, shard, run = client.keyspace, client.keyspace.shard(h.id), h.run_id or ""
        legacy = ks.run_signals(shard, run)
        # what such a release wrote for request "old-1" (beside its event)
        await client.redis.zadd(legacy, {"old-1": 1})
        await client.redis.hset(ks.run(shard, run), "msgs", 1)
        await h.signal("tag", {"key": "retried", "weight": 1}, request_id="old-1")
        await h.signal("tag", {"key": "new", "weight": 1}, request_id="new-1")
        await h.signal("finish")
        log = await h.result(timeout=10)
    assert "tag retried=1" not in log and log.count("tag new=1") == 1
    assert 0 < await client.redis.pttl(legacy) <= client.settings.retention_ms


async def test_bad_signals_are_refused_before_anything_is_sent(client: Client) -> None:
    async with Worker(client, **INBOX):  # type: ignore[arg-type]
        h = await client.start_workflow(flows.InboxWorkflow)
        await wait_until(lambda: _started(h), 10)
        before = len(await h.history())
        by_name = client.get_workflow_handle(h.id)  # knows no class: checks the registry
        for handle in (h, by_name):
            with pytest.raises(workflows.InvalidInputError, match="has no signal 'aprove'") as e:
                await handle.signal("aprove", {})
            assert "(its signals: buggy, finish, message, meta, reject, tag)" in str(e.value)
        with pytest.raises(
            workflows.InvalidInputError, match="weight: Input should be greater than or equal to 0"
        ):
            await h.signal("tag", {"key": "k", "weight": -1})
        with pytest.raises(workflows.InvalidInputError) as e:
            await by_name.signal("tag", {"key": 5, "weight": -1})
        assert str(e.value) == (
            "invalid input for signal 'tag' of workflow 'inbox_workflow' (its registered input schema): "
            "key: 5 is not of type 'string'; weight: -1 is less than the minimum of 0"
        )
        with pytest.raises(workflows.InvalidInputError, match="text: Field required"):
            await h.signal("message", {"times": 2})
        with pytest.raises(
            workflows.InvalidInputError, match=r"meta'.*tags\.str: Input should be a valid string"
        ):
            await h.signal("meta", {"source": "crm", "tags": ["a"]})
        with pytest.raises(
            workflows.InvalidInputError,
            match=r"tags: matches none of the accepted shapes \(string: tags: \['a'\] is not of type 'string'",
        ):
            await by_name.signal("meta", {"source": "crm", "tags": ["a"]})
        assert len(await h.history()) == before
        await h.signal("finish")
        await h.result(timeout=10)
        with pytest.raises(workflows.WorkflowNotFoundError, match="is not running"):
            await h.signal("finish")
    with pytest.raises(workflows.WorkflowNotFoundError, match="no workflow execution 'nobody'"):
        await client.get_workflow_handle("nobody").signal("finish")


async def _started(h: Any) -> bool:
    return "WorkflowTaskCompleted" in types(await h.history())


async def test_a_signal_no_handler_takes_is_recorded_and_dropped(client: Client) -> None:
    # a workflow started before its workers registered: the client cannot check the name
    h = await client.start_workflow("inbox_workflow", allow_unregistered=True)
    await h.signal("no_such_signal", {"x": 1})
    await h.signal("tag", {"wrong": "shape"})
    async with Worker(client, **INBOX):  # type: ignore[arg-type]
        await h.signal("finish")
        assert await h.result(timeout=10) == ["started"]
    assert types(await h.history()).count("WorkflowExecutionSignaled") == 3


async def test_handler_errors_fail_the_run_or_the_task(client: Client) -> None:
    async with Worker(client, **INBOX):  # type: ignore[arg-type]
        h = await client.start_workflow(flows.InboxWorkflow)
        await h.signal("reject", {"why": "over budget"})
        with pytest.raises(workflows.WorkflowFailureError, match="rejected: over budget"):
            await h.result(timeout=10)
        h = await client.start_workflow(flows.InboxWorkflow)
        await h.signal("buggy")
        await wait_until(lambda: _task_failed(h), 10)
        d = await h.describe()
        assert d.status == "running" and d.last_workflow_task_failure is not None
        assert "a bug in a signal handler" in d.last_workflow_task_failure.message
        await h.terminate("done")


async def _task_failed(h: Any) -> bool:
    return (await h.describe()).workflow_task_failures > 0


async def test_a_run_does_not_close_over_a_signal_that_arrived_meanwhile(
    redis_url: str, worker_procs: Any
) -> None:
    worker_procs(redis_url, target="tests.flows:LastWordWorkflow")
    async with await Client.connect(redis_url) as c:
        h = await c.start_workflow(flows.LastWordWorkflow)
        await h.signal("say", {"word": "first"})
        r = redis.Redis.from_url(redis_url)
        run_key = c.keyspace.run(c.keyspace.shard(h.id), h.run_id or "")

        def last_task_running() -> bool:
            return r.hget(run_key, "wft") == b"started" and r.hget(run_key, "last_eid") != b"1"

        await wait_until(last_task_running, 10, interval=0.005)
        await h.signal("say", {"word": "second"})  # while the task that returns is running
        assert await h.result(timeout=20) == ["first", "second"]
    events = await h.history()
    assert types(events)[-1] == "WorkflowExecutionCompleted"
    assert types(events).count("WorkflowExecutionSignaled") == 2


async def test_signal_schemas_are_registered_and_the_cli_sends_signals(
    redis_url: str, worker_procs: Any
) -> None:
    worker_procs(redis_url, target="tests.flows:InboxWorkflow")
    url = ["--url", redis_url]
    doc = json.loads(rf("schema", "inbox_workflow", *url).stdout)
    sigs = {s["name"]: s for s in doc["signals"]}
    assert list(sigs) == ["buggy", "finish", "message", "meta", "reject", "tag"]
    assert sigs["message"]["description"] == "a message, handled while the workflow runs"
    assert sigs["tag"]["input_schema"]["title"] == "Tag"
    # keys beyond the parameters go to **extra, each checked against its annotation
    assert sigs["meta"]["input_schema"]["additionalProperties"] == {
        "anyOf": [{"type": "string"}, {"type": "integer"}]
    }
    assert json.loads(rf("schema", "inbox_workflow", "--part", "signals", *url).stdout) == doc["signals"]

    p = rf("start", "inbox_workflow", "--id", "cli-inbox", *url)
    assert p.returncode == 0, p.stderr
    p = rf("signal", "cli-inbox", "tag", "-i", '{"key": "k", "weight": -1}', *url)
    assert p.returncode == 2 and "weight: -1 is less than the minimum of 0" in p.stderr
    p = rf("signal", "cli-inbox", "tagg", *url)
    assert p.returncode == 2 and "has no signal 'tagg'" in p.stderr
    p = rf("signal", "cli-inbox", "tag", "-i", '{"key": "k", "weight": 3}', *url)
    assert p.returncode == 0 and "signalled cli-inbox: tag" in p.stdout
    assert rf("signal", "cli-inbox", "finish", *url).returncode == 0
    p = rf("result", "cli-inbox", *url)
    assert p.returncode == 0 and json.loads(p.stdout) == ["started", "tag k=3"]
    p = rf("signal", "cli-inbox", "finish", *url)
    assert p.returncode == 3 and "is not running" in p.stderr


def test_signal_definitions_are_checked_when_decorated() -> None:
    with pytest.raises(workflows.WorkflowDefinitionError, match="'s' must have a return type annotation"):

        @workflows.workflow.signal()
        def s(self, x: int):  # type: ignore[no-untyped-def]
            pass

    with pytest.raises(
        workflows.WorkflowDefinitionError, match="Parameter 'x' in 's' must have a type annotation"
    ):

        @workflows.workflow.signal()
        def s(self, x) -> None:  # type: ignore[no-untyped-def]
            pass

    with pytest.raises(workflows.WorkflowDefinitionError, match="signal name 'a b' is invalid"):
        workflows.workflow.signal(name="a b")(lambda self: None)

    with pytest.raises(workflows.WorkflowDefinitionError, match="two signal handlers named 'go'"):

        @workflows.workflow.define(name="twice")
        class Twice:
            @workflows.workflow.signal(name="go")
            def a(self) -> None: ...

            @workflows.workflow.signal(name="go")
            def b(self) -> None: ...

            @workflows.workflow.entrypoint
            async def run(self) -> None: ...

    # **kwargs: allowed on a signal (extra keys arrive there), not on an entrypoint
    with pytest.raises(
        workflows.WorkflowDefinitionError,
        match=r"'run' has \*\*kw which is not supported for this handler type.",
    ):

        @workflows.workflow.entrypoint
        async def run(self, **kw: int) -> None: ...
