"""Bad input gets a clear error that names what was wrong, and changes nothing."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

import rillflow as workflows
from rillflow import Client, Worker
from tests import flows
from tests.conftest import FAST, wait_until

pytestmark = pytest.mark.anyio


async def keys(client: Client) -> list[bytes]:
    return sorted([k async for k in client.redis.scan_iter("rf:*")])


async def test_invalid_start_input_is_refused_before_anything_is_written(client: Client) -> None:
    before = await keys(client)
    with pytest.raises(workflows.InvalidInputError) as ei:
        await client.start_workflow(flows.HelloWorkflow, {"name": ["not", "a", "string"], "bogus": 1})
    msg = str(ei.value)
    assert "name: Input should be a valid string" in msg
    assert "bogus: Extra inputs are not permitted" in msg
    with pytest.raises(workflows.InvalidInputError, match="report_type: Field required"):
        await client.start_workflow(flows.ModelWorkflow, {"include_details": True})
    with pytest.raises(workflows.InvalidInputError, match="execution_id"):
        await client.start_workflow(flows.HelloWorkflow, {"name": "x"}, execution_id="has spaces/and slashes")
    with pytest.raises(workflows.InvalidInputError, match="task queue"):
        await client.start_workflow(flows.HelloWorkflow, {"name": "x"}, task_queue="bad queue")
    assert await keys(client) == before


async def test_oversized_payload_is_refused(redis_url: str) -> None:
    c = await Client.connect(redis_url, max_payload_bytes=1000)
    before = sorted([k async for k in c.redis.scan_iter("rf:*")])
    with pytest.raises(workflows.PayloadTooLargeError, match="over the limit of 1000 bytes"):
        await c.start_workflow(flows.HelloWorkflow, {"name": "x" * 2000})
    assert sorted([k async for k in c.redis.scan_iter("rf:*")]) == before
    await c.close()


async def test_oversized_result_fails_the_workflow_task_visibly(redis_url: str) -> None:
    c = await Client.connect(redis_url, max_payload_bytes=1500, workflow_task_timeout=timedelta(seconds=2))
    async with Worker(c, workflows=[flows.HelloWorkflow], activities=[flows.hello, flows.hello_sync], **FAST):  # type: ignore[arg-type]
        h = await c.start_workflow(flows.HelloWorkflow, {"name": "y" * 1000, "times": 1})
        await wait_until(lambda: _wft_failed(h), 10)
    d = await h.describe()
    assert d.last_workflow_task_failure is not None
    assert "PayloadTooLargeError" in d.last_workflow_task_failure.message
    assert "result of workflow 'hello_workflow'" in d.last_workflow_task_failure.message
    assert d.status == "running"  # a bug to fix in the code, not a failed run
    await c.close()


async def _wft_failed(h: Any) -> bool:
    return bool((await h.describe()).workflow_task_failures)


async def test_unknown_workflow_name_fails_the_task_naming_it(client: Client) -> None:
    async with Worker(client, workflows=[flows.HelloWorkflow], activities=[flows.hello], **FAST):  # type: ignore[arg-type]
        # a caller who opts out of the registry check gets the worker's verdict instead
        h = await client.start_workflow("no_such_workflow", {}, allow_unregistered=True)
        await wait_until(lambda: _wft_failed(h), 10)
    d = await h.describe()
    assert d.status == "running"
    assert d.last_workflow_task_failure is not None
    assert d.last_workflow_task_failure.type == "WorkflowNotRegistered"
    assert "'no_such_workflow' is not registered" in d.last_workflow_task_failure.message
    assert "hello_workflow" in d.last_workflow_task_failure.message  # what it does serve


async def test_unknown_activity_fails_visibly_naming_it(client: Client) -> None:
    async with Worker(client, workflows=[flows.HelloWorkflow], activities=[flows.hello], **FAST):  # type: ignore[arg-type]
        h = await client.start_workflow(flows.HelloWorkflow, {"name": "z"})
        with pytest.raises(workflows.WorkflowFailureError) as ei:
            await h.result(timeout=15)
    assert ei.value.cause.type == "ActivityError"
    cause = ei.value.cause.__cause__
    assert isinstance(cause, workflows.WorkflowError) and cause.type == "ActivityNotRegistered"
    assert "activity 'hello_sync' is not registered" in cause.message


async def test_malformed_task_messages_go_to_the_dead_letter_stream(client: Client) -> None:
    ks = client.keyspace
    wft, act = ks.queue(0, "default", "wft"), ks.queue(0, "default", "act")
    async with Worker(
        client,
        workflows=[flows.ManyWorkflow],
        activities=[flows.step],
        max_deliveries=3,
        pump_interval=0.05,
        reclaim_idle=timedelta(milliseconds=200),
    ):
        bad_wft = await client.redis.xadd(wft, {"garbage": "1"})
        bad_act = await client.redis.xadd(act, {"run": "r", "seq": "not-a-number", "att": "1"})
        # good work still flows past the bad messages
        assert await client.execute_workflow(flows.ManyWorkflow, {"n": 1}, result_timeout=10) == 3

        async def dead_lettered() -> bool:
            return await client.redis.xlen(wft + ":dlq") == 1 and await client.redis.xlen(act + ":dlq") == 1

        await wait_until(dead_lettered, 15)
    ((_, fields),) = await client.redis.xrange(wft + ":dlq")
    assert fields[b"garbage"] == b"1"
    assert b"without a 'run' field (after 3 deliveries)" in fields[b"dlq_reason"]
    assert fields[b"dlq_source"] == f"{wft}/{bad_wft.decode()}".encode()
    ((_, afields),) = await client.redis.xrange(act + ":dlq")
    assert afields[b"seq"] == b"not-a-number"
    assert await client.redis.xlen(wft) == 0 and await client.redis.xlen(act) == 0
    assert bad_act


async def test_namespace_settings_are_fixed(redis_url: str) -> None:
    c = await Client.connect(redis_url, namespace="fixed", shards=4)
    with pytest.raises(workflows.RillflowError, match="already has 4 shards"):
        await Client.connect(redis_url, namespace="fixed", shards=8)
    with pytest.raises(workflows.RillflowError, match="namespace"):
        await Client.connect(redis_url, namespace="bad name")
    await c.close()


async def test_result_of_unknown_execution(client: Client) -> None:
    with pytest.raises(workflows.WorkflowNotFoundError, match="no workflow execution 'nope'"):
        await client.get_workflow_handle("nope").result(timeout=1)
    with pytest.raises(TimeoutError):
        h = await client.start_workflow(flows.TimerWorkflow, {"seconds": 30})
        await asyncio.wait_for(h.result(), 0.2)


# -- definition-time checks -----------------------------------------------------------------
def test_definition_errors_are_clear() -> None:
    with pytest.raises(workflows.WorkflowDefinitionError, match="must be async function"):

        @workflows.workflow.define(name="x")
        class A:
            @workflows.workflow.entrypoint
            def run(self) -> None: ...

    with pytest.raises(workflows.WorkflowDefinitionError, match="must have a return type annotation"):

        class B:
            @workflows.workflow.entrypoint
            async def run(self, a: int):  # type: ignore[no-untyped-def]
                ...

    with pytest.raises(
        workflows.WorkflowDefinitionError, match="Parameter 'a' in 'run' must have a type annotation"
    ):

        class C:
            @workflows.workflow.entrypoint
            async def run(self, a) -> None:  # type: ignore[no-untyped-def]
                ...

    with pytest.raises(workflows.WorkflowDefinitionError, match="has no entrypoint"):

        @workflows.workflow.define(name="no_entry")
        class D:
            async def run(self) -> None: ...

    with pytest.raises(workflows.WorkflowDefinitionError, match="2 entrypoints"):

        @workflows.workflow.define(name="two_entries")
        class E:
            @workflows.workflow.entrypoint
            async def run(self) -> None: ...

            @workflows.workflow.entrypoint
            async def other(self) -> None: ...

    with pytest.raises(workflows.WorkflowDefinitionError, match="workflow name 'bad name!' is invalid"):
        workflows.workflow.define(name="bad name!")
    with pytest.raises(workflows.WorkflowDefinitionError, match="is invalid"):
        workflows.workflow.define(name="x" * 129)
    with pytest.raises(workflows.WorkflowDefinitionError, match="module-level"):

        @workflows.activity()
        async def local(x: int) -> int:
            return x

    with pytest.raises(workflows.WorkflowDefinitionError, match="retry_policy_backoff_coefficient"):
        workflows.activity(retry_policy_backoff_coefficient=0.5)
    with pytest.raises(workflows.WorkflowDefinitionError, match="start_to_close_timeout"):
        workflows.activity(start_to_close_timeout=timedelta(0))


def test_workflow_calls_outside_a_workflow_are_refused() -> None:
    with pytest.raises(RuntimeError, match=r"workflow\.now\(\) can only be called from workflow code"):
        workflows.workflow.now()
    with pytest.raises(RuntimeError, match=r"activity\.info\(\) can only be called while an activity runs"):
        workflows.activity.info()


@pytest.mark.parametrize(
    ("mistake", "message"),
    [
        ("sleep", "time.sleep: time.sleep() blocks the worker; use `await workflow.sleep(...)`"),
        ("thread", "threads are not allowed in workflow code"),
        ("network", "network I/O belongs in an activity"),
    ],
)
async def test_determinism_guard_refuses_blocking_calls(client: Client, mistake: str, message: str) -> None:
    async with Worker(client, workflows=[flows.BlockingWorkflow, flows.UnguardedWorkflow], **FAST):  # type: ignore[arg-type]
        h = await client.start_workflow(flows.BlockingWorkflow, {"mistake": mistake})
        await wait_until(lambda: _wft_failed(h), 10)
        assert await client.execute_workflow(flows.UnguardedWorkflow, result_timeout=10) == "slept"
    d = await h.describe()
    assert d.status == "running"  # a bug in the code: the task fails and is retried
    assert d.last_workflow_task_failure is not None
    assert message in d.last_workflow_task_failure.message
    assert "RestrictedWorkflowAccessError" in d.last_workflow_task_failure.message


async def test_guard_does_not_touch_activities_or_other_code() -> None:
    import time

    time.sleep(0.001)  # outside workflow code: allowed
    assert await flows.hello("x") == "hello x"
