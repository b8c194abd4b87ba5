"""Bad input gets a clear error that names what was wrong, and changes nothing."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

import rillflow as workflows
from rillflow import Client, Worker
from rillflow.errors import WorkflowQueryFailedError, WorkflowUpdateFailedError
from tests import flows
from tests.conftest import FAST, wait_until

pytestmark = pytest.mark.anyio


async def keys(client: Client) -> list[bytes]:
    return sorted([k async for k in client.redis.scan_iter("rf:*")])


@workflows.activity()
async def echo_anything(value: Any) -> Any:
    return value


@workflows.activity(retry_policy_initial_interval=timedelta(milliseconds=50))
async def too_big() -> int:
    return 2**70


@workflows.workflow.define(name="anything_workflow")
class AnythingWorkflow:
    """Takes anything and passes it on: where values the wire cannot carry turn up."""

    def __init__(self) -> None:
        self.notes: list[Any] = []
        self.done = False

    @workflows.workflow.signal()
    def note(self, value: Any) -> None:
        self.notes.append(value)

    @workflows.workflow.signal()
    def finish(self) -> None:
        self.done = True

    @workflows.workflow.query()
    def peek(self, value: Any = None) -> Any:
        return value

    @workflows.workflow.query()
    def huge(self) -> int:
        return 2**70

    @workflows.workflow.update()
    def add(self, value: Any) -> Any:
        self.notes.append(value)
        return value

    @workflows.workflow.update()
    def surrogate(self) -> str:
        return "bad \udcff"

    @workflows.workflow.entrypoint
    async def run(self, payload: Any = None, mode: str = "") -> Any:
        if mode == "activity_input":
            return await echo_anything({"deep": [2**64]})
        if mode == "activity_result":
            return await too_big()
        if mode == "result":
            return {"n": 2**70}
        await workflows.workflow.wait_condition(lambda: self.done)
        return {"payload": payload, "notes": self.notes}


ANYTHING: dict[str, Any] = {
    "workflows": [AnythingWorkflow],
    "activities": [echo_anything, too_big],
    **FAST,
}

# a value the wire (msgpack) cannot carry, and what the error says about it
UNENCODABLE = [
    (2**70, "the integer 1180591620717411303424 does not fit in 64 bits"),
    (-(2**63) - 1, "the integer -9223372036854775809 does not fit in 64 bits"),
    ("ok \ud800", "the string has a lone surrogate '\\ud800' at position 3"),
    (b"\xff\xfe", "bytes that are not UTF-8 text (b'\\xff\\xfe')"),
    (object(), "a object is not JSON data"),
]


@pytest.mark.parametrize(
    ("value", "why"), UNENCODABLE, ids=["int", "negative", "surrogate", "bytes", "object"]
)
async def test_unencodable_start_input_is_refused_by_class_and_by_name(
    client: Client, value: Any, why: str
) -> None:
    async with Worker(client, **ANYTHING):
        before = await keys(client)
        for workflow in (AnythingWorkflow, "anything_workflow"):
            with pytest.raises(workflows.InvalidInputError) as ei:
                await client.start_workflow(workflow, {"payload": {"items": ["fine", value]}})
            assert "payload.items.1: " + why in str(ei.value), str(ei.value)
            assert "Traceback" not in str(ei.value)
        assert await keys(client) == before


async def test_bytes_and_decimal_travel_as_strings_by_class_and_by_name(client: Client) -> None:
    """pydantic's JSON mode decides, for an undeclared field as for a declared one."""
    payload = {"raw": b"bytes", "price": Decimal("1.50"), "pair": (1, 2), "big": 2**64 - 1}
    async with Worker(client, **ANYTHING):
        for workflow in (AnythingWorkflow, "anything_workflow"):
            h = await client.start_workflow(workflow, {"payload": payload})
            await h.signal("finish")
            result = await h.result(timeout=10)
            assert result["payload"] == {"raw": "bytes", "price": "1.50", "pair": [1, 2], "big": 2**64 - 1}


async def test_unencodable_signal_query_and_update_payloads_are_refused(client: Client) -> None:
    async with Worker(client, **ANYTHING):
        h = await client.start_workflow(AnythingWorkflow)
        by_name = client.get_workflow_handle(h.id)  # validated against the registered schema
        await wait_until(lambda: _started(h), 10)
        before = await keys(client), len(await h.history())
        for handle in (h, by_name):
            with pytest.raises(workflows.InvalidInputError) as ei:
                await handle.signal("note", {"value": {"k": 2**70}})
            assert "invalid input for signal 'note" in str(ei.value)
            assert "value.k: the integer 1180591620717411303424" in str(ei.value)
            with pytest.raises(workflows.InvalidInputError, match=r"value: the string has a lone surrogate"):
                await handle.execute_update("add", "\udcff")
            with pytest.raises(workflows.InvalidInputError, match=r"value\.0: bytes that are not UTF-8 text"):
                await handle.query("peek", [b"\x80"])
        assert (await keys(client), len(await h.history())) == before
        assert await h.execute_update("add", Decimal("2.5")) == "2.5"
        await h.signal("finish")
        assert (await h.result(timeout=10))["notes"] == ["2.5"]


async def _started(h: Any) -> bool:
    return any(e.type == "WorkflowTaskCompleted" for e in await h.history())


async def test_unencodable_values_from_workflow_code_fail_visibly(client: Client) -> None:
    async with Worker(client, **ANYTHING):
        # an activity's input: the workflow task fails (a bug), naming the activity and the path
        h = await client.start_workflow(AnythingWorkflow, {"mode": "activity_input"})
        await wait_until(lambda: _wft_failed(h), 10)
        f = (await h.describe()).last_workflow_task_failure
        assert f is not None
        assert (
            "invalid input for activity 'echo_anything': value.deep.0: the integer 18446744073709551616"
            in (f.message)
        )
        # the workflow's result: the same, naming the path
        h = await client.start_workflow(AnythingWorkflow, {"mode": "result"})
        await wait_until(lambda: _wft_failed(h), 10)
        f = (await h.describe()).last_workflow_task_failure
        assert f is not None and "InvalidResultError" in f.message, f.message
        assert "cannot be stored: n: the integer 1180591620717411303424 does not fit in 64 bits" in f.message
        # an activity's result: that attempt fails with InvalidResultError, not retried
        h = await client.start_workflow(AnythingWorkflow, {"mode": "activity_result"})
        with pytest.raises(workflows.WorkflowFailureError) as ei:
            await h.result(timeout=10)
        act = ei.value.cause
        assert isinstance(act, workflows.ActivityError) and act.attempt == 1
        assert act.cause.type == "InvalidResultError"
        assert "the result of activity 'too_big' cannot be stored: (result): the integer" in act.cause.message
        # a query's and an update's results: their callers get the failure
        h = await client.start_workflow(AnythingWorkflow)
        with pytest.raises(WorkflowQueryFailedError) as qi:
            await h.query("huge")
        assert qi.value.cause.type == "InvalidResultError"
        with pytest.raises(WorkflowUpdateFailedError) as ui:
            await h.execute_update("surrogate")
        assert ui.value.cause.type == "InvalidResultError"
        assert "(result): the string has a lone surrogate '\\udcff'" in ui.value.cause.message
        await h.signal("finish")
        assert (await h.result(timeout=10))["notes"] == []


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
    # seconds as a bare number is a mistake, named; so is a timeout past ten years (the
    # run's deadline would be past the clock's range)
    for timeout in (30, timedelta(0), timedelta(days=3651)):
        with pytest.raises(
            workflows.InvalidInputError, match="execution_timeout must be a positive timedelta"
        ):
            await client.start_workflow(flows.HelloWorkflow, {"name": "x"}, execution_timeout=timeout)  # type: ignore[arg-type]
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


async def test_a_timer_past_ten_years_fails_the_task_naming_it(client: Client) -> None:
    async with Worker(client, workflows=[flows.TimerWorkflow], activities=[], **FAST):  # type: ignore[arg-type]
        h = await client.start_workflow(flows.TimerWorkflow, {"seconds": 86400 * 365 * 20})
        await wait_until(lambda: _wft_failed(h), 10)
    d = await h.describe()
    assert d.last_workflow_task_failure is not None
    assert "is longer than the 3650 days a timer may wait" in d.last_workflow_task_failure.message
    assert d.status == "running" and d.pending_timers == []  # nothing was recorded of it
    # a time stored before the cap existed, past what datetime holds, still describes
    await client.redis.hset(client.keyspace.run(h.shard, h.run_id or ""), "deadline_ms", 10**17)
    assert (await h.describe()).execution_deadline == datetime.max.replace(tzinfo=UTC)
    await h.terminate("done")


async def test_an_oversized_cancel_or_termination_reason_is_refused(redis_url: str) -> None:
    c = await Client.connect(redis_url, max_payload_bytes=1000)
    h = await c.start_workflow(flows.TimerWorkflow, {"seconds": 60})
    before = len(await h.history())
    with pytest.raises(workflows.PayloadTooLargeError, match="cancel reason"):
        await h.cancel("x" * 2000)
    with pytest.raises(workflows.PayloadTooLargeError, match="termination reason"):
        await h.terminate("x" * 2000)
    assert len(await h.history()) == before and (await h.describe()).status == "running"
    await h.terminate("done")
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
    with pytest.raises(
        workflows.WorkflowDefinitionError, match="execution_timeout must be a positive timedelta"
    ):
        workflows.workflow.define(name="x", execution_timeout=60)  # type: ignore[arg-type]
    with pytest.raises(workflows.WorkflowDefinitionError, match="at most 3650 days"):
        workflows.workflow.define(name="x", execution_timeout=timedelta(days=10_000))
    with pytest.raises(workflows.WorkflowDefinitionError, match="heartbeat_timeout must be a positive"):
        workflows.activity(heartbeat_timeout=timedelta(days=10_000))
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
