"""Updates: recorded messages whose callers wait for the handler's result."""

from __future__ import annotations

import asyncio
import itertools
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import rillflow as workflows
from rillflow import Client, Worker
from tests import flows
from tests import seed_examples as ex
from tests.conftest import FAST, wait_until
from tests.test_cli import rf

pytestmark = pytest.mark.anyio

LEDGER = {"workflows": [flows.LedgerWorkflow], "activities": [flows.step, flows.slow_marker], **FAST}


def types(events: list[workflows.HistoryEvent]) -> list[str]:
    return [e.type for e in events]


async def test_the_pages_config_update(client: Client) -> None:
    async with Worker(client, workflows=ex.WORKFLOWS, activities=ex.ACTIVITIES, **FAST):  # type: ignore[arg-type]
        h = await client.start_workflow(ex.ConfigurableWorkflow)
        res = await h.execute_update(ex.ConfigurableWorkflow.update_config, ex.UpdateConfig(threshold=7))
        assert res == ex.UpdateResult(success=True)
        by_name = client.get_workflow_handle(h.id)
        assert await by_name.execute_update("update_config", {"threshold": 9}) == {"success": True}
        await h.signal("stop")
        assert await h.result(timeout=10) == 9
    events = await h.history()
    accepted = [e.attributes for e in events if e.type == "WorkflowExecutionUpdateAccepted"]
    done = [e.attributes for e in events if e.type == "WorkflowExecutionUpdateCompleted"]
    assert [a["input"] for a in accepted] == [{"threshold": 7}, {"threshold": 9}]
    assert [d["result"] for d in done] == [{"success": True}, {"success": True}]
    assert [a["update_id"] for a in accepted] == [d["update_id"] for d in done]


@pytest.mark.parametrize("namespace_shards", [1, 4], ids=["shards1", "shards4"])
async def test_updates_run_activities_and_fail_without_failing_the_run(
    client: Client, namespace_shards: int
) -> None:
    async with Worker(client, **LEDGER):  # type: ignore[arg-type]
        h = await client.start_workflow(flows.LedgerWorkflow)
        results = await asyncio.gather(*(h.execute_update("deposit", {"amount": a}) for a in (1, 2, 3)))
        # each result is the balance after that deposit, in the order the handlers finished
        orders = [[sum(p[: i + 1]) for i in range(3)] for p in itertools.permutations((1, 2, 3))]
        assert sorted(results) in [sorted(o) for o in orders] and max(results) == 6
        assert await h.query("current") == 6
        with pytest.raises(
            workflows.WorkflowUpdateFailedError, match="a deposit must be positive, got -4"
        ) as e:
            await h.execute_update("deposit", {"amount": -4})
        assert e.value.cause.non_retryable
        with pytest.raises(
            workflows.WorkflowUpdateFailedError, match="does not match its return annotation int"
        ):
            await h.execute_update("balance_as_text")
        assert (await h.describe()).status == "running"  # a failed update leaves the run alone
        await h.signal("close")
        assert await h.result(timeout=10) == 6


async def test_an_update_id_is_applied_once(client: Client) -> None:
    async with Worker(client, **LEDGER):  # type: ignore[arg-type]
        h = await client.start_workflow(flows.LedgerWorkflow)
        first = await h.execute_update("deposit", {"amount": 5}, update_id="dep-1")
        again = await h.execute_update("deposit", {"amount": 5}, update_id="dep-1")
        both = await asyncio.gather(
            *(h.execute_update("deposit", {"amount": 1}, update_id="dep-2") for _ in range(3))
        )
        assert (first, again, both) == (5, 5, [6, 6, 6])
        await h.signal("close")
        assert await h.result(timeout=10) == 6
        # after the run closed, the outcome of a known id is still there
        assert await h.execute_update("deposit", {"amount": 5}, update_id="dep-1") == 5
        with pytest.raises(workflows.WorkflowNotFoundError, match="update 'deposit' was not accepted"):
            await h.execute_update("deposit", {"amount": 5}, update_id="dep-3")
    assert types(await h.history()).count("WorkflowExecutionUpdateAccepted") == 2
    # the run's update and signal records expire with it, after the retention period
    ks, shard = client.keyspace, client.keyspace.shard(h.id)
    for key in (ks.updates(shard, h.run_id or ""), ks.signals(shard, h.id)):
        assert 0 < await client.redis.pttl(key) <= client.settings.retention_ms


async def test_bad_updates_are_refused_before_anything_is_written(client: Client) -> None:
    async with Worker(client, **LEDGER):  # type: ignore[arg-type]
        h = await client.start_workflow(flows.LedgerWorkflow)
        await wait_until(lambda: _started(h), 10)
        before = len(await h.history())
        by_name = client.get_workflow_handle(h.id)
        for handle in (h, by_name):
            with pytest.raises(workflows.InvalidInputError, match=r"no update 'withdraw' \(its updates: "):
                await handle.execute_update("withdraw", {"amount": 1})
        with pytest.raises(workflows.InvalidInputError, match="amount: Input should be a valid integer"):
            await h.execute_update("deposit", {"amount": "lots"})
        with pytest.raises(workflows.InvalidInputError, match="amount: 'lots' is not of type 'integer'"):
            await by_name.execute_update("deposit", {"amount": "lots"})
        with pytest.raises(workflows.InvalidInputError, match="'current' is a query handler, not an update"):
            await h.execute_update(flows.LedgerWorkflow.current)
        with pytest.raises(workflows.InvalidInputError, match="update_id 'a b' is invalid"):
            await h.execute_update("deposit", {"amount": 1}, update_id="a b")
        assert len(await h.history()) == before
        await h.terminate()


async def _started(h: Any) -> bool:
    return "WorkflowTaskCompleted" in types(await h.history())


async def test_a_bug_in_a_handler_fails_the_task_and_the_caller_can_stop_waiting(client: Client) -> None:
    async with Worker(client, **LEDGER):  # type: ignore[arg-type]
        h = await client.start_workflow(flows.LedgerWorkflow)
        with pytest.raises(workflows.WorkflowUpdateTimeoutError, match="call again with the same update_id"):
            await h.execute_update("crash", update_id="c-1", timeout=timedelta(seconds=1))
        d = await h.describe()
        assert d.workflow_task_failures > 0 and "a bug in an update handler" in str(
            d.last_workflow_task_failure
        )
        # the run closes (terminated): the update's callers are told it never finished
        await h.terminate("giving up")
        with pytest.raises(
            workflows.WorkflowUpdateFailedError, match=r"the run closed \(terminated\) before the update"
        ):
            await h.execute_update("crash", update_id="c-1")


async def test_an_update_outlives_a_killed_worker(
    client: Client, redis_url: str, worker_procs: Any, tmp_path: Path
) -> None:
    marker = tmp_path / "deposit"
    a = worker_procs(redis_url, target="tests.flows:LEDGER")
    h = await client.start_workflow(flows.LedgerWorkflow)
    pending = asyncio.ensure_future(h.execute_update("deposit", {"amount": 10, "note": str(marker)}))
    await wait_until(lambda: Path(f"{marker}.1").exists(), 15)
    a.kill()  # mid-activity, inside the update handler
    b = worker_procs(redis_url, target="tests.flows:LEDGER")
    assert await asyncio.wait_for(pending, 30) == 10
    assert Path(f"{marker}.2").read_text() == str(b.proc.pid)  # the retry ran on the new worker
    await h.signal("close")
    assert await h.result(timeout=20) == 10
    events = await h.history()
    assert types(events).count("WorkflowExecutionUpdateCompleted") == 1


def test_update_definitions_are_checked_when_decorated() -> None:
    with pytest.raises(
        workflows.WorkflowDefinitionError,
        match=r"Update 'u' must have a return type annotation other than None\.",
    ):

        @workflows.workflow.update()
        async def u(self) -> None: ...

    with pytest.raises(workflows.WorkflowDefinitionError, match=r"'u' has \*\*kw which is not supported"):

        @workflows.workflow.update()
        def u(self, **kw: int) -> int: ...


async def test_update_schemas_are_registered_and_the_cli_updates(redis_url: str, worker_procs: Any) -> None:
    worker_procs(redis_url, target="tests.flows:LEDGER")
    url = ["--url", redis_url]
    doc = json.loads(rf("schema", "ledger_workflow", *url).stdout)
    updates = {u["name"]: u for u in doc["updates"]}
    assert list(updates) == ["balance_as_text", "crash", "deposit"]
    assert updates["deposit"]["description"] == "adds to the balance; returns the new one"
    assert updates["deposit"]["output_schema"] == {"type": "integer"}
    assert updates["deposit"]["input_schema"]["required"] == ["amount"]

    assert rf("start", "ledger_workflow", "--id", "cli-ledger", *url).returncode == 0
    p = rf("update", "cli-ledger", "deposit", "-i", '{"amount": 4}', *url)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == 4
    p = rf("update", "cli-ledger", "deposit", "-i", '{"amount": 0}', *url)
    assert p.returncode == 1 and "a deposit must be positive, got 0" in p.stderr
    p = rf("update", "cli-ledger", "deposit", "-i", '{"amount": "x"}', *url)
    assert p.returncode == 2 and "amount: 'x' is not of type 'integer'" in p.stderr
    p = rf("update", "cli-ledger", "crash", "--timeout", "0.5", *url)
    assert p.returncode == 5 and "still runs" in p.stderr
