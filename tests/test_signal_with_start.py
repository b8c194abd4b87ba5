"""Signal-with-start: one atomic call signals an execution's running run, or starts a
run and signals it. Callers racing on one id start one run between them, no signal is
lost between a start and a signal, and a retry delivers once. Also: many concurrent
signallers, each signal applied once and in each sender's order."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

import rillflow as workflows
from rillflow import Client, Worker
from tests import flows
from tests.conftest import FAST
from tests.test_cli import assert_one_line, rf
from tests.test_scripts import snapshot

pytestmark = pytest.mark.anyio

# what the CLI test's worker process serves
INBOX = [flows.InboxWorkflow, flows.hello]


def _tag(key: str, weight: int = 1) -> dict[str, Any]:
    return {"key": key, "weight": weight}


async def _types(h: Any) -> list[str]:
    return [e.type for e in await h.history()]


async def test_it_starts_the_execution_and_its_first_task_sees_the_signal(client: Client) -> None:
    h = await client.signal_with_start(
        flows.InboxWorkflow, execution_id="sws-1", signal="tag", signal_payload=_tag("first")
    )
    assert h.started is True and h.run_id
    assert (await _types(h))[:2] == ["WorkflowExecutionStarted", "WorkflowExecutionSignaled"]
    async with Worker(client, workflows=[flows.InboxWorkflow], activities=[flows.hello], **FAST):
        await h.signal("finish")
        log = await h.result(timeout=20)
    assert "tag first=1" in log and "started" in log
    types = await _types(h)
    # the first task ran once: its message carried no start event to run ahead on
    assert types.count("WorkflowTaskCompleted") >= 1 and "WorkflowTaskFailed" not in types


async def test_it_signals_a_running_run_and_starts_nothing(client: Client) -> None:
    first = await client.start_workflow(flows.InboxWorkflow, execution_id="sws-2")
    h = await client.signal_with_start(
        flows.InboxWorkflow, execution_id="sws-2", signal="tag", signal_payload=_tag("later")
    )
    assert h.started is False and h.run_id == first.run_id
    assert (await _types(h)).count("WorkflowExecutionStarted") == 1
    assert (await _types(h)).count("WorkflowExecutionSignaled") == 1


async def test_callers_racing_on_one_id_start_one_run_and_every_signal_lands_once(client: Client) -> None:
    hs = await asyncio.gather(
        *(
            client.signal_with_start(
                flows.InboxWorkflow, execution_id="sws-race", signal="tag", signal_payload=_tag(f"k{i}", i)
            )
            for i in range(20)
        )
    )
    assert sum(1 for h in hs if h.started) == 1
    assert len({h.run_id for h in hs}) == 1
    async with Worker(client, workflows=[flows.InboxWorkflow], activities=[flows.hello], **FAST):
        await hs[0].signal("finish")
        log = await hs[0].result(timeout=20)
    assert sorted(x for x in log if x.startswith("tag")) == sorted(f"tag k{i}={i}" for i in range(20))


async def test_a_retry_with_the_same_request_id_delivers_once(client: Client) -> None:
    kw: dict[str, Any] = {"execution_id": "sws-3", "signal": "tag", "request_id": "req-7"}
    a = await client.signal_with_start(flows.InboxWorkflow, signal_payload=_tag("x"), **kw)
    b = await client.signal_with_start(flows.InboxWorkflow, signal_payload=_tag("x"), **kw)
    assert (a.started, b.started, a.run_id) == (True, False, b.run_id)
    assert (await _types(a)).count("WorkflowExecutionSignaled") == 1
    # to a running run too: a second id is delivered, its retry is not
    for _ in range(2):
        await client.signal_with_start(
            flows.InboxWorkflow, signal_payload=_tag("y"), **{**kw, "request_id": "req-8"}
        )
    assert (await _types(a)).count("WorkflowExecutionSignaled") == 2
    # and after the run that got it closed: a retry starts nothing and delivers nothing
    await a.terminate("closed before the caller's retry")
    before = await snapshot(client)
    c = await client.signal_with_start(
        flows.InboxWorkflow, signal_payload=_tag("y"), **{**kw, "request_id": "req-8"}
    )
    assert c.started is False and c.run_id == a.run_id
    assert await snapshot(client) == before


async def test_it_refuses_a_running_run_of_another_workflow(client: Client) -> None:
    other = await client.start_workflow(flows.HelloWorkflow, {"name": "x"}, execution_id="sws-6")
    before = await snapshot(client)
    with pytest.raises(
        workflows.InvalidInputError, match="is running workflow hello_workflow, not inbox_workflow"
    ):
        await client.signal_with_start(flows.InboxWorkflow, execution_id="sws-6", signal="finish")
    assert await snapshot(client) == before
    assert (await other.describe()).status == "running"


async def test_bad_input_for_either_half_writes_nothing(client: Client) -> None:
    before = await snapshot(client)
    with pytest.raises(workflows.InvalidInputError, match="weight"):
        await client.signal_with_start(
            flows.InboxWorkflow, execution_id="sws-4", signal="tag", signal_payload={"key": "k", "weight": -1}
        )
    with pytest.raises(workflows.InvalidInputError, match="signal"):
        await client.signal_with_start(flows.InboxWorkflow, execution_id="sws-4", signal="no_such_signal")
    with pytest.raises(workflows.InvalidInputError, match="execution_id"):
        await client.signal_with_start(flows.InboxWorkflow, execution_id=None, signal="finish")  # type: ignore[arg-type]
    assert await snapshot(client) == before


async def test_after_the_run_closed_it_starts_a_new_run(client: Client) -> None:
    async with Worker(client, workflows=[flows.InboxWorkflow], activities=[flows.hello], **FAST):
        first = await client.signal_with_start(flows.InboxWorkflow, execution_id="sws-5", signal="finish")
        assert await first.result(timeout=20) == ["started"]
        second = await client.signal_with_start(flows.InboxWorkflow, execution_id="sws-5", signal="finish")
        assert second.started is True and second.run_id != first.run_id
        assert await second.result(timeout=20) == ["started"]


async def test_concurrent_signallers_each_signal_applied_once_and_in_sender_order(client: Client) -> None:
    """10 signallers send 100 signals each, each waiting for the previous one's answer:
    the workflow applies all 1,000 once, and every sender's in the order it sent them."""
    h = await client.start_workflow(flows.InboxWorkflow, execution_id="sws-many")

    async def sender(s: int) -> None:
        for i in range(100):
            await h.signal("tag", _tag(f"s{s}", i))

    async with Worker(client, workflows=[flows.InboxWorkflow], activities=[flows.hello], **FAST):
        await asyncio.gather(*(sender(s) for s in range(10)))
        await h.signal("finish")
        log = await h.result(timeout=60)
    tags = [x for x in log if x.startswith("tag ")]
    assert len(tags) == 1000 and len(set(tags)) == 1000
    for s in range(10):
        mine = [int(x.rsplit("=", 1)[1]) for x in tags if x.startswith(f"tag s{s}=")]
        assert mine == list(range(100))


def test_the_cli_signals_with_start(redis_url: str, worker_procs: Any) -> None:
    worker_procs(redis_url, target="tests.test_signal_with_start:INBOX")
    args = ["start", "inbox_workflow", "--id", "sws-cli", "--url", redis_url]
    p = rf(*args, "--signal", "tag", "--signal-input", json.dumps(_tag("cli", 3)))
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "sws-cli" and "started sws-cli: tag" in p.stderr
    p = rf(*args, "--signal", "finish", "--wait")
    assert p.returncode == 0, p.stderr
    assert "signalled running sws-cli: finish" in p.stderr
    assert "tag cli=3" in json.loads(p.stdout)
    assert_one_line(
        rf("start", "inbox_workflow", "--signal", "finish", "--url", redis_url), 2, "--signal needs --id"
    )
    assert_one_line(rf(*args, "--signal-input", "{}"), 2, "--signal-input needs --signal NAME")
    assert_one_line(
        rf(*args, "--signal", "tag", "--signal-input", "{bad"), 2, "--signal-input is not valid JSON"
    )
    # checked against the schema the worker registered for the workflow named: nothing sent
    bad = json.dumps({"key": "k", "weight": -1})
    p = rf(
        "start",
        "inbox_workflow",
        "--id",
        "sws-cli-2",
        "--url",
        redis_url,
        "--signal",
        "tag",
        "--signal-input",
        bad,
    )
    assert p.returncode == 2 and "weight" in p.stderr and "Traceback" not in p.stderr, p.stderr
    p = rf("describe", "sws-cli-2", "--url", redis_url)
    assert p.returncode != 0 and "no workflow execution 'sws-cli-2'" in p.stderr
