"""Following a history as it grows (``handle.follow_history()``, ``rillflow history
--follow``): every event once and in order, live, to the run's close, and on into the
runs it continues as."""

from __future__ import annotations

import asyncio

import pytest

import rillflow as workflows
from rillflow import Client, Worker, WorkflowNotFoundError
from rillflow.history import HistoryEvent
from tests import flows
from tests.conftest import FAST, wait_until
from tests.test_continue_as_new import Chain, ChainWorkflow

pytestmark = pytest.mark.anyio
workflow = workflows.workflow


@workflow.define(name="follow_pokes")
class PokesWorkflow:
    def __init__(self) -> None:
        self.pokes = 0

    @workflow.signal(name="poke")
    def poke(self) -> None:
        self.pokes += 1

    @workflow.entrypoint
    async def run(self) -> int:
        await workflow.wait_condition(lambda: self.pokes >= 2)
        await flows.step(self.pokes)
        return self.pokes


def _worker(client: Client, *wfs: type) -> Worker:
    return Worker(client, workflows=list(wfs), activities=[flows.step], **FAST)  # type: ignore[arg-type]


async def _collect(it: object, into: list[HistoryEvent]) -> None:
    async for e in it:  # type: ignore[attr-defined]
        into.append(e)


def _brief(events: list[HistoryEvent]) -> list[tuple[int, str]]:
    return [(e.event_id, e.type) for e in events]


async def test_a_follower_sees_each_event_while_the_run_is_open_and_stops_at_its_close(
    client: Client,
) -> None:
    async with _worker(client, PokesWorkflow):
        h = await client.start_workflow(PokesWorkflow, execution_id="follow-1")
        seen: list[HistoryEvent] = []
        follower = asyncio.create_task(_collect(h.follow_history(), seen))
        await wait_until(lambda: any(e.type == "WorkflowTaskCompleted" for e in seen), 10)
        await h.signal(PokesWorkflow.poke)
        # the signal reaches the follower while the run still waits for the second one
        await wait_until(lambda: any(e.type == "WorkflowExecutionSignaled" for e in seen), 10)
        assert (await h.describe()).status == "running" and not follower.done()
        await h.signal(PokesWorkflow.poke)
        await asyncio.wait_for(follower, 15)
        assert await h.result(timeout=5) == 2
    assert _brief(seen) == _brief(await h.history())
    assert seen[-1].type == "WorkflowExecutionCompleted"


async def test_a_follower_goes_on_into_the_runs_a_run_continues_as(client: Client) -> None:
    h = await client.start_workflow(ChainWorkflow, Chain(n=0, until=3), execution_id="follow-chain")
    seen: list[HistoryEvent] = []
    follower = asyncio.create_task(_collect(h.follow_history(), seen))  # before any worker runs it
    only_first: list[HistoryEvent] = []
    first_only = asyncio.create_task(_collect(h.follow_history(next_runs=False), only_first))
    async with _worker(client, ChainWorkflow):
        assert await h.result(timeout=30) == 1 + 2 + 3
        await asyncio.wait_for(asyncio.gather(follower, first_only), 15)
    starts = [e for e in seen if e.type == "WorkflowExecutionStarted"]
    assert [s.attributes["input"]["n"] for s in starts] == [0, 1, 2]
    assert [e.type for e in seen].count("WorkflowExecutionContinuedAsNew") == 2
    assert seen[-1].type == "WorkflowExecutionCompleted"
    assert only_first[-1].type == "WorkflowExecutionContinuedAsNew"
    assert _brief(only_first) == _brief(await h.history())  # h names the first run
    # every run read whole: the events of the last one are its history, in order
    last = client.get_workflow_handle("follow-chain")
    assert _brief(seen[-len(await last.history()) :]) == _brief(await last.history())


async def test_a_closed_run_is_printed_whole_and_an_unknown_one_is_not_found(client: Client) -> None:
    async with _worker(client, ChainWorkflow):
        h = await client.start_workflow(ChainWorkflow, Chain(n=0, until=1), execution_id="follow-done")
        await h.result(timeout=15)
    seen: list[HistoryEvent] = []
    await asyncio.wait_for(_collect(client.get_workflow_handle("follow-done").follow_history(), seen), 5)
    assert _brief(seen) == _brief(await h.history())
    with pytest.raises(WorkflowNotFoundError, match="no workflow execution 'follow-nope'"):
        await _collect(client.get_workflow_handle("follow-nope").follow_history(), [])
