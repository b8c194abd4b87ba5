"""The registry: what workers publish, what clients check before they write anything."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field

import rillflow as workflows
from rillflow import Client, Worker
from rillflow.registry import Registry, workflow_spec
from tests import flows
from tests import seed_examples as ex
from tests.conftest import FAST, wait_until

pytestmark = pytest.mark.anyio

HELLO = [flows.HelloWorkflow, flows.hello, flows.hello_sync]


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Client]:
    """A client that reads the registry on every start, so that each change is seen."""
    async with await Client.connect(redis_url, registry_cache=timedelta(0)) as c:
        yield c


async def keys(c: Client) -> list[bytes]:
    return sorted([k async for k in c.redis.scan_iter("rf:*")])


def worker(c: Client, items: list[Any], queue: str = "default", **kw: Any) -> Worker:
    wfs = [i for i in items if isinstance(i, type)]
    acts = [i for i in items if not isinstance(i, type)]
    return Worker(
        c, task_queue=queue, workflows=wfs, activities=acts, identity=f"w-{queue}", **{**FAST, **kw}
    )


async def test_two_workers_on_two_task_queues(client: Client) -> None:
    async with (
        worker(client, HELLO, "alpha") as a,
        worker(client, [flows.ModelWorkflow, flows.OrderWorkflow], "beta") as b,
    ):
        reg = client.registry
        assert await reg.names() == ["hello_workflow", "model_workflow", "order_workflow"]
        live = {w.identity: w for w in await reg.workers()}
        assert set(live) == {a.identity, b.identity}
        assert live[a.identity].task_queue == "alpha"
        assert live[a.identity].workflows == ["hello_workflow"]
        assert live[a.identity].activities == ["hello", "hello_sync"]
        assert live[b.identity].workflows == ["model_workflow", "order_workflow"]
        hello = await reg.workflow("hello_workflow")
        assert hello is not None
        assert list(hello.task_queues) == ["alpha"] and hello.live_workers == {"alpha": [a.identity]}
        order = await reg.workflow("order_workflow")
        assert order is not None and order.description == "Totals an order.\nSecond line."
        defn = workflows.get_workflow_definition(flows.OrderWorkflow)
        assert order.execution_timeout == defn.execution_timeout
        assert order.input_schema == defn.sig.input_schema()
        assert order.output_schema == {"type": "integer"}

        # by name, each start goes to the queue its workflow is registered on
        h = await client.start_workflow("hello_workflow", {"name": "n", "times": 2})
        assert await h.result(timeout=10) == ["hello n", "hello n1", "hi n from a thread"]
        assert (await h.describe()).task_queue == "alpha"
        h = await client.start_workflow("model_workflow", {"report_type": "daily"})
        assert await h.result(timeout=10) == {"title": "DAILY", "lines": 1}  # a name gives plain data
        assert (await h.describe()).task_queue == "beta"
        # by class, the result is the model; the route comes from the registry too
        r = await client.execute_workflow(
            flows.ModelWorkflow, flows.Params(report_type="x"), result_timeout=10
        )
        assert r == flows.Report(title="X", lines=1)

        # a queue the workflow is not registered on is refused, naming the one it is on
        before = await keys(client)
        with pytest.raises(
            workflows.WorkflowNotRegisteredError, match=r"registered on task queue\(s\) alpha"
        ):
            await client.start_workflow("hello_workflow", {"name": "n"}, task_queue="beta")
        assert await keys(client) == before

        # a second queue for hello_workflow: while both have live workers a name alone is ambiguous
        async with worker(client, HELLO, "gamma") as g:
            with pytest.raises(workflows.InvalidInputError, match=r"several task queues \(alpha, gamma"):
                await client.start_workflow("hello_workflow", {"name": "n"})
            h = await client.start_workflow("hello_workflow", {"name": "g"}, task_queue="gamma")
            assert await h.result(timeout=10) == ["hello g", "hi g from a thread"]
            assert (await h.describe()).task_queue == "gamma"
            hello = await reg.workflow("hello_workflow")
            assert hello is not None and hello.live_workers == {"alpha": [a.identity], "gamma": [g.identity]}
        # gamma's worker stopped: its liveness record is withdrawn, the only live queue wins
        assert g.identity not in {w.identity for w in await reg.workers()}
        h = await client.start_workflow("hello_workflow", {"name": "n"})
        assert (await h.describe()).task_queue == "alpha"
        assert await h.result(timeout=10) == ["hello n", "hi n from a thread"]
        # an operator forgets the abandoned queue; the one with a live worker cannot be forgotten
        with pytest.raises(workflows.RillflowError, match=rf"still has live workers \(alpha: {a.identity}\)"):
            await reg.forget("hello_workflow", "alpha")
        assert await reg.forget("hello_workflow", "gamma") == ["gamma"]
        hello = await reg.workflow("hello_workflow")
        assert hello is not None and list(hello.task_queues) == ["alpha"]
    # stopped workers leave their registrations: the names stay known, no worker is live
    assert await reg.names() == ["hello_workflow", "model_workflow", "order_workflow"]
    assert await reg.workers() == []
    assert await reg.forget("model_workflow") == ["beta"]
    assert await reg.names() == ["hello_workflow", "order_workflow"]
    assert not await client.redis.exists(client.keyspace.registry_entry("model_workflow"))
    with pytest.raises(workflows.WorkflowNotRegisteredError):
        await reg.forget("model_workflow")


async def test_a_name_no_worker_registered_is_refused_before_anything_is_written(client: Client) -> None:
    with pytest.raises(workflows.WorkflowNotRegisteredError, match=r"\(registered: none yet\)"):
        await client.start_workflow("hello_workflow", {"name": "n"})
    async with worker(client, [flows.ModelWorkflow, flows.OrderWorkflow]):
        before = await keys(client)
        with pytest.raises(workflows.WorkflowNotRegisteredError) as e:
            await client.start_workflow("helo_workflow", {"name": "n"}, execution_id="typo")
        assert str(e.value) == (
            "no worker has registered a workflow named 'helo_workflow' in namespace 'default' "
            "(registered: model_workflow, order_workflow). Check the name and the namespace, or pass "
            "allow_unregistered=True (--allow-unregistered on the command line) to start it before its "
            "workers are deployed"
        )
        assert await keys(client) == before
        with pytest.raises(workflows.WorkflowNotFoundError):
            await client.get_workflow_handle("typo").describe()


async def test_a_start_before_any_worker_deployed_waits_for_one(client: Client) -> None:
    # by name with the opt-out, and by class (the class is the definition): both wait
    h1 = await client.start_workflow("hello_workflow", {"name": "early"}, allow_unregistered=True)
    h2 = await client.start_workflow(flows.HelloWorkflow, {"name": "class"})
    assert (await h1.describe()).task_queue == (await h2.describe()).task_queue == "default"
    assert await client.registry.names() == []
    async with worker(client, HELLO):
        assert await h1.result(timeout=10) == ["hello early", "hi early from a thread"]
        assert await h2.result(timeout=10) == ["hello class", "hi class from a thread"]


async def test_a_name_whose_workers_are_all_down_is_accepted_and_waits(client: Client) -> None:
    async with worker(client, HELLO, "alpha"):
        pass
    assert await client.registry.workers() == []
    h = await client.start_workflow("hello_workflow", {"name": "later"})
    await asyncio.sleep(0.3)
    assert (await h.describe()).status == "running"
    async with worker(client, HELLO, "alpha"):
        assert await h.result(timeout=10) == ["hello later", "hi later from a thread"]


async def test_by_name_input_is_checked_against_the_registered_schema(client: Client) -> None:
    async def refused(name: str, data: Any) -> str:
        before = await keys(client)
        with pytest.raises(workflows.InvalidInputError) as e:
            await client.start_workflow(name, data)
        assert await keys(client) == before  # nothing written
        return str(e.value)

    async def run(name: str, data: Any = None) -> Any:
        return await (await client.start_workflow(name, data)).result(timeout=10)

    seeds = [ex.ReportWorkflow, ex.FlexibleWorkflow, ex.OptionalWorkflow, ex.MyWorkflow]
    async with worker(client, [*seeds, flows.OrderWorkflow]):
        # every error, each with its path
        msg = await refused("order_workflow", {"customer": 7, "lines": [{"sku": "a", "qty": 1}, {"qty": 0}]})
        assert msg.startswith("invalid input for workflow 'order_workflow' (its registered input schema): ")
        assert "customer: 7 is not of type 'string'" in msg
        assert "lines.1: 'sku' is a required property" in msg
        assert "lines.1.qty: 0 is less than the minimum of 1" in msg
        assert await run("order_workflow", {"customer": "c", "lines": [{"sku": "a", "qty": 2}]}) == 2

        # primitive parameters: defaults applied, unknown keys and wrong types refused
        assert await run("report_workflow", {"report_type": "daily"}) is None
        assert "(input): Additional properties are not allowed ('bogus' was unexpected)" in await refused(
            "report_workflow", {"report_type": "daily", "bogus": 1}
        )
        assert "(input): 'report_type' is a required property" in await refused("report_workflow", {})
        assert "include_details: 'yes' is not of type 'boolean'" in await refused(
            "report_workflow", {"report_type": "d", "include_details": "yes"}
        )

        # the page's three inputs to a union of extra="forbid" models, left to right
        assert await run("flexible_workflow", {"prompt": "Hello"}) == "prompt: Hello"
        assert await run("flexible_workflow", {"count": 5}) == "count: 5"
        msg = await refused("flexible_workflow", {"prompt": "Hello", "count": 5})
        assert "(input): matches none of the accepted shapes (" in msg
        assert "PromptInput: (input): Additional properties are not allowed ('count' was unexpected)" in msg
        assert "CountInput: (input): Additional properties are not allowed ('prompt' was unexpected)" in msg

        # | None: no input, or null, is None
        assert await run("optional_workflow") == "no input"
        assert await run("optional_workflow", {"count": 1}) == "count: 1"

        # a named RootModel takes its value as it is
        assert await run("my_workflow", "just text") == "raw: just text"
        assert await run("my_workflow", {"prompt": "p"}) == "structured: p"
        assert "matches none of the accepted shapes" in await refused("my_workflow", 5)

        # a model instance given with a name is its data
        assert await run("flexible_workflow", ex.CountInput(count=2)) == "count: 2"


async def test_a_worker_registers_again_when_its_record_is_lost(client: Client) -> None:
    async with worker(client, HELLO, heartbeat_interval=timedelta(milliseconds=100)) as w:
        key = client.keyspace.worker(w.identity)
        assert 0 < await client.redis.pttl(key) <= 300
        # Redis lost everything the worker published (a flush, a failover without persistence)
        await client.redis.delete(
            key, client.keyspace.registry, client.keyspace.registry_entry("hello_workflow")
        )
        await wait_until(lambda: client.registry.names(), 5)
        assert await client.registry.names() == ["hello_workflow"]
        assert [x.identity for x in await client.registry.workers()] == [w.identity]
    assert not await client.redis.exists(key)  # a graceful stop withdraws it


async def test_a_killed_worker_drops_out_when_its_record_expires(redis_url: str, worker_procs: Any) -> None:
    p = worker_procs(redis_url, task_queue="q1", heartbeat=0.2)
    async with await Client.connect(redis_url) as c:
        assert [w.identity for w in await c.registry.workers()] == [p.identity]
        p.kill()
        await wait_until(lambda: _no_workers(c), 5)
        entry = await c.registry.workflow("hello_workflow")
        assert entry is not None and entry.live_workers == {"q1": []}  # still registered, nobody live
        assert await c.redis.zcard(c.keyspace.workers) == 0  # the index forgot it too


async def _no_workers(c: Client) -> bool:
    return await c.registry.workers() == []


async def test_a_client_trusts_a_registration_it_read_within_registry_cache(redis_url: str) -> None:
    async with (
        await Client.connect(redis_url, registry_cache=timedelta(minutes=1)) as cached,
        await Client.connect(redis_url, registry_cache=timedelta(0)) as fresh,
    ):
        async with worker(fresh, HELLO):
            pass
        await cached.start_workflow("hello_workflow", {"name": "a"})  # read and remembered
        await fresh.registry.forget("hello_workflow")
        await cached.start_workflow("hello_workflow", {"name": "b"})  # within the minute: trusted
        with pytest.raises(workflows.WorkflowNotRegisteredError):
            await fresh.start_workflow("hello_workflow", {"name": "c"})


def test_registry_records_are_plain_json(redis_url: str, worker_procs: Any) -> None:
    """What an operator sees with redis-cli."""
    import redis

    p = worker_procs(redis_url)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    assert "hello_workflow" in r.smembers("rf:{default}:registry")
    entry = r.hgetall("rf:{default}:registry:hello_workflow")
    assert set(entry) == {"spec", "spec:default", "q:default"}
    assert entry["spec:default"] == entry["spec"]  # the latest registration, and the latest on that queue
    spec = json.loads(entry["spec"])
    assert spec["input_schema"]["properties"]["name"] == {"title": "Name", "type": "string"}
    assert spec["task_queue"] == "default" and spec["registered_by"] == p.identity
    rec = json.loads(r.get(f"rf:{{default}}:worker:{p.identity}") or "null")
    assert rec["task_queue"] == "default" and "hello_workflow" in rec["workflows"]
    assert 0 < r.pttl(f"rf:{{default}}:worker:{p.identity}") <= 30_000


@workflows.workflow.define(name="versioned_workflow")
class VersionOne:
    @workflows.workflow.signal()
    def approve(self, by: str) -> None: ...

    @workflows.workflow.entrypoint
    async def run(self, order_id: str) -> str:
        return order_id


@workflows.workflow.define(name="versioned_workflow", execution_timeout=timedelta(minutes=5))
class VersionOneAgain:
    """The same schemas, with new words and a new timeout: not a conflict."""

    @workflows.workflow.signal()
    def approve(self, by: str) -> None: ...

    @workflows.workflow.entrypoint
    async def run(self, order_id: str) -> str:
        return order_id.upper()


@workflows.workflow.define(name="versioned_workflow")
class VersionTwo:
    @workflows.workflow.query()
    def status(self) -> str:
        return "new"

    @workflows.workflow.entrypoint
    async def run(self, order_id: int) -> str:
        return str(order_id)


def _versioned(c: Client, cls: type, identity: str, queue: str = "default") -> Worker:
    return Worker(c, task_queue=queue, workflows=[cls], identity=identity, **FAST)  # type: ignore[arg-type]


async def test_a_live_worker_with_other_schemas_refuses_the_second(client: Client) -> None:
    async with _versioned(client, VersionOne, "old-worker"):
        entry = await client.registry.workflow("versioned_workflow")
        before = await keys(client)
        with pytest.raises(workflows.RillflowError) as ei:
            async with _versioned(client, VersionTwo, "new-worker"):
                pass
        e = ei.value
        assert type(e).__name__ == "WorkflowRegistrationConflictError"
        msg = str(e)
        assert (
            "worker new-worker cannot register workflow 'versioned_workflow' on task queue 'default'" in msg
        )
        assert "live worker old-worker serves it there with other schemas" in msg
        assert "input schema (at properties.order_id.type)" in msg
        assert "signal 'approve' (only on the live worker)" in msg
        assert "query 'status' (only on the new worker)" in msg
        assert "output schema" not in msg  # the same on both
        # nothing of the second worker was registered (its own sticky streams aside)
        assert [k for k in await keys(client) if b"@new-worker" not in k] == before
        assert await client.registry.workflow("versioned_workflow") == entry
        assert [w.identity for w in await client.registry.workers()] == ["old-worker"]
        # the same schemas from another worker are fine, and so are other schemas on another queue
        async with (
            _versioned(client, VersionOneAgain, "twin-worker"),
            _versioned(client, VersionTwo, "other-queue-worker", "elsewhere"),
        ):
            live = await client.registry.workflow("versioned_workflow")
            assert live is not None and live.live_workers == {
                "default": ["old-worker", "twin-worker"],
                "elsewhere": ["other-queue-worker"],
            }
    # once the old workers have stopped, the new version takes the queue
    async with _versioned(client, VersionTwo, "new-worker"):
        assert await client.execute_workflow(VersionTwo, 7, result_timeout=10) == "7"


async def test_a_worker_whose_record_expired_does_not_count(client: Client) -> None:
    spec = workflow_spec(workflows.get_workflow_definition(VersionOne), "default", "gone-worker")
    record = {"identity": "gone-worker", "task_queue": "default", "workflows": ["versioned_workflow"]}
    record |= {"activities": [], "host": "h", "pid": 1, "started_ms": 1, "heartbeat_ms": 1}
    await client.registry.publish([spec], record, ttl_ms=50)
    await asyncio.sleep(0.2)  # its liveness record expires: a SIGKILLed worker, three heartbeats later
    async with _versioned(client, VersionTwo, "new-worker"):
        entry = await client.registry.workflow("versioned_workflow")
        assert entry is not None and entry.registered_by == "new-worker"


async def test_two_workers_publishing_at_once_cannot_both_pass_the_check(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both read the registry before either writes; the transaction makes the second one
    read again, and see the first."""
    reads = 0
    both_read = asyncio.Event()
    read_workers = Registry.workers

    async def workers_then_wait(self: Registry) -> list[Any]:
        nonlocal reads
        live = await read_workers(self)
        reads += 1
        if reads == 2:
            both_read.set()
        await asyncio.wait_for(both_read.wait(), 5)
        return live

    monkeypatch.setattr(Registry, "workers", workers_then_wait)

    async def publish(c: Client, cls: type, identity: str) -> None:
        spec = workflow_spec(workflows.get_workflow_definition(cls), "default", identity)
        record = {"identity": identity, "task_queue": "default", "workflows": ["versioned_workflow"]}
        record |= {"activities": [], "host": "h", "pid": 1, "started_ms": 1, "heartbeat_ms": 1}
        await c.registry.publish([spec], record, ttl_ms=30_000)

    async with (
        await Client.connect(redis_url) as c1,
        await Client.connect(redis_url) as c2,
    ):
        outcomes = await asyncio.gather(
            publish(c1, VersionOne, "first"), publish(c2, VersionTwo, "second"), return_exceptions=True
        )
        assert reads == 3  # the loser read again after its transaction was aborted
        failed = [o for o in outcomes if isinstance(o, Exception)]
        assert len(failed) == 1 and type(failed[0]).__name__ == "WorkflowRegistrationConflictError"
        assert [w.identity for w in await c1.registry.workers()] in (["first"], ["second"])


class Code(BaseModel):
    model_config = ConfigDict(regex_engine="python-re")
    code: str = Field(pattern=r"^[A-Z]{3}\Z")  # Python's regex: \Z, which Rust's lacks


@workflows.workflow.define(name="code_workflow")
class CodeWorkflow:
    @workflows.workflow.entrypoint
    async def run(self, c: Code) -> str:
        return c.code


async def test_a_schema_the_fast_checker_cannot_compile_is_still_checked(client: Client) -> None:
    """jsonschema-rs refuses some schemas pydantic writes (a Python-only pattern): the
    full check alone serves them, so the workflow still starts by name."""
    async with worker(client, [CodeWorkflow]):
        h = await client.start_workflow("code_workflow", {"code": "ABC"})
        assert await h.result(timeout=10) == "ABC"
        before = await keys(client)
        with pytest.raises(workflows.InvalidInputError, match="does not match"):
            await client.start_workflow("code_workflow", {"code": "abc"})
        assert await keys(client) == before
