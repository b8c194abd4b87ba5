"""Update validators: `@my_update.validator` runs on a worker against the run's state
before the update is accepted; a rejection leaves no trace in the history and reaches
the caller as WorkflowUpdateRejectedError."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

import rillflow as workflows
from rillflow import Client, Worker
from rillflow.executor import Command
from rillflow.workflow import get_workflow_definition
from rillflow_runtime.codec import pack
from rillflow_runtime.model import CommandKind, Reply
from rillflow_runtime.protocol import TaskCompletion, WftStartItem
from tests import flows
from tests.conftest import FAST, wait_until
from tests.test_cli import assert_one_line, rf
from tests.test_scripts import read_one, snapshot

pytestmark = pytest.mark.anyio
workflow = workflows.workflow

LIMIT = 10


@workflow.define(name="capped_account")
class CappedAccountWorkflow:
    def __init__(self) -> None:
        self.balance = 0
        self.closed = False

    @workflow.update()
    def deposit(self, amount: int) -> int:
        self.balance += amount
        return self.balance

    @deposit.validator
    def validate_deposit(self, amount: int) -> None:
        if amount <= 0:
            raise ValueError(f"a deposit must be positive, got {amount}")
        if self.balance + amount > LIMIT:  # reads the run's state
            raise ValueError(f"the balance would pass {LIMIT}: it is {self.balance}")

    @workflow.update()
    async def schedule_in_validator(self) -> int:
        return 0

    @schedule_in_validator.validator
    def validate_schedule_in_validator(self) -> None:
        flows.step(1)  # type: ignore[unused-coroutine]  # (an activity call: refused)

    @workflow.signal()
    def close(self) -> None:
        self.closed = True

    @workflow.entrypoint
    async def run(self) -> int:
        await workflow.wait_condition(lambda: self.closed)
        return self.balance


def _worker(client: Client) -> Worker:
    return Worker(client, workflows=[CappedAccountWorkflow], activities=[flows.step], **FAST)  # type: ignore[arg-type]


def _types(events: list[workflows.HistoryEvent]) -> list[str]:
    return [e.type for e in events]


async def test_a_validator_rejects_on_the_runs_state_and_leaves_no_trace(client: Client) -> None:
    async with _worker(client):
        h = await client.start_workflow(CappedAccountWorkflow)
        assert await h.execute_update(CappedAccountWorkflow.deposit, 8) == 8
        before = await h.history()
        with pytest.raises(workflows.WorkflowUpdateRejectedError) as ei:
            await h.execute_update(CappedAccountWorkflow.deposit, 5)
        assert "rejected by its validator: ValueError: the balance would pass 10: it is 8" in str(ei.value)
        assert ei.value.cause.type == "ValueError"
        by_name = client.get_workflow_handle(h.id)  # what the workers registered says so too
        with pytest.raises(workflows.WorkflowUpdateRejectedError, match="must be positive, got -1"):
            await by_name.execute_update("deposit", {"amount": -1})
        assert isinstance(ei.value, workflows.WorkflowUpdateFailedError)  # caught as before, too
        p = await asyncio.to_thread(rf, "update", h.id, "deposit", "--input", "3", "--url", client.url)
        assert_one_line(p, 1, "rejected by its validator: ValueError: the balance would pass 10")
        assert await h.history() == before  # nothing recorded of any
        assert await by_name.execute_update("deposit", {"amount": 2}) == 10
        await h.signal(CappedAccountWorkflow.close)
        assert await h.result(timeout=10) == 10
    assert _types(await h.history()).count("WorkflowExecutionUpdateAccepted") == 2


async def test_concurrent_updates_are_each_validated_on_a_state_that_holds_the_ones_before(
    client: Client,
) -> None:
    """Twenty callers deposit 1 at once against a cap of 10: a validator never runs on a
    state that lacks an update accepted before it, so exactly ten are accepted."""
    async with _worker(client):
        h = await client.start_workflow(CappedAccountWorkflow)
        outcomes = await asyncio.gather(
            *(h.execute_update(CappedAccountWorkflow.deposit, 1) for _ in range(20)), return_exceptions=True
        )
        accepted = sorted(o for o in outcomes if isinstance(o, int))
        rejected = [o for o in outcomes if isinstance(o, workflows.WorkflowUpdateRejectedError)]
        assert accepted == list(range(1, 11)) and len(rejected) == 10, outcomes
        await h.signal(CappedAccountWorkflow.close)
        assert await h.result(timeout=10) == 10
    assert _types(await h.history()).count("WorkflowExecutionUpdateAccepted") == 10


async def test_a_retry_of_an_accepted_update_gets_its_outcome_whatever_the_validator_says_now(
    client: Client,
) -> None:
    async with _worker(client):
        h = await client.start_workflow(CappedAccountWorkflow)
        assert await h.execute_update(CappedAccountWorkflow.deposit, 8, update_id="dep-1") == 8
        # the validator would refuse 8 more now; the retry is the update already applied
        assert await h.execute_update(CappedAccountWorkflow.deposit, 8, update_id="dep-1") == 8
        await h.signal(CappedAccountWorkflow.close)
        assert await h.result(timeout=10) == 8


async def test_a_validator_that_schedules_work_rejects_the_update(client: Client) -> None:
    async with _worker(client):
        h = await client.start_workflow(CappedAccountWorkflow)
        with pytest.raises(workflows.WorkflowUpdateRejectedError, match="a validator only reads state"):
            await h.execute_update(CappedAccountWorkflow.schedule_in_validator)
        assert await h.execute_update(CappedAccountWorkflow.deposit, 1) == 1  # the run goes on
        await h.terminate("done")


async def test_without_a_worker_the_validation_times_out_naming_it(client: Client) -> None:
    h = await client.start_workflow(CappedAccountWorkflow)
    with pytest.raises(workflows.WorkflowQueryTimeoutError, match="the validation of update 'deposit'"):
        await h.execute_update(CappedAccountWorkflow.deposit, 1, timeout=timedelta(seconds=0.5))
    assert "WorkflowExecutionUpdateAccepted" not in _types(await h.history())
    await h.terminate("done")


async def test_an_acceptance_for_a_state_the_run_has_left_writes_nothing(client: Client) -> None:
    async with _worker(client):
        h = await client.start_workflow(CappedAccountWorkflow)
        assert await h.execute_update(CappedAccountWorkflow.deposit, 1) == 1  # a task completed
        p = client.protocol
        body = pack({"update_id": "u-stale", "name": "deposit", "input": pack([1])})
        before = await snapshot(client)
        for expect in ("=", "=1-0", "!"):  # before any task / an older task / a known id only
            res = await p.update(h.id, None, "u-stale", body, expect)
            assert (res.reply, res.run_id) == (Reply.STALE, h.run_id)
        assert await snapshot(client) == before
        await h.terminate("done")


def test_validator_mistakes_are_refused_when_the_class_is_defined() -> None:
    def define(body: Any) -> None:
        workflow.define(name="bad_validator")(type("Bad", (), body))

    async def entry(self: Any) -> int:
        return 0

    def upd(self: Any, n: int) -> int:
        return n

    run = workflow.entrypoint(entry)
    u = workflow.update(name="u")(upd)
    with pytest.raises(workflows.WorkflowDefinitionError, match="must be a plain def"):

        @u.validator  # type: ignore[attr-defined]
        async def check(self: Any, n: int) -> None: ...

    with pytest.raises(workflows.WorkflowDefinitionError, match="give it a name of its own"):

        @u.validator  # type: ignore[attr-defined]
        def upd(self: Any, n: int) -> None: ...

    def wrong(self: Any, amount: int) -> None: ...

    with pytest.raises(workflows.WorkflowDefinitionError, match=r"takes \(self, amount\) but update 'u'"):
        define({"run": run, "upd": u, "wrong": u.validator(wrong)})  # type: ignore[attr-defined]

    def orphan(self: Any, n: int) -> None: ...

    with pytest.raises(workflows.WorkflowDefinitionError, match="which the class does not define"):
        define({"run": run, "orphan": u.validator(orphan)})  # type: ignore[attr-defined]
    # what workers publish: a caller that knows only the names asks for a validation
    specs = get_workflow_definition(CappedAccountWorkflow).handler_specs()["updates"]
    assert {u["name"]: u.get("validated", False) for u in specs} == {
        "deposit": True,
        "schedule_in_validator": True,
    }
    ledger = get_workflow_definition(flows.LedgerWorkflow).handler_specs()["updates"]
    assert not any("validated" in u for u in ledger)


async def test_an_update_is_accepted_only_on_the_state_its_validator_saw(client: Client) -> None:
    """Driven by hand, without a worker: a validation is good only for the state of the
    run's last completed task, and only while no task runs (a running one changes the
    state before the update would apply) and some task has completed (before that, the
    entrypoint's first step has not run)."""
    p, ks = client.protocol, client.keyspace
    h = await client.start_workflow(CappedAccountWorkflow)
    run, stream = h.run_id or "", ks.queue(0, "default", "wft")
    body = pack({"update_id": "u1", "name": "deposit", "input": pack([1])})

    async def accept(expect: str) -> Reply:
        return (await p.update(h.id, None, "u1", body, expect)).reply

    async def start_task() -> tuple[str, str]:
        msg, _ = await read_one(client, stream, "w1")
        (st,) = await p.wft_start(0, stream, 10_000, 100, "w1", [WftStartItem(run, msg, 0)])
        assert st.reply is Reply.OK
        return msg, st.fence

    msg, first = await start_task()
    assert await accept("=") is Reply.STALE  # no task has completed
    timer = Command(CommandKind.START_TIMER, pack({"seq": 1, "duration_ms": 20}), [1, 20], ("StartTimer", 1))
    (done,) = await p.wft_complete(
        0, stream, "default", 60_000, "w1", 0, [TaskCompletion(run, h.id, first, msg, [timer])]
    )
    assert done.reply is Reply.OK

    async def fired() -> bool:
        return bool((await p.pump(0, 100, 60_000, "w1")).handled)

    await wait_until(fired, 10)  # the timer schedules the next task
    msg, second = await start_task()
    assert await accept("=" + first) is Reply.STALE  # a task runs on that state
    (done,) = await p.wft_complete(
        0, stream, "default", 60_000, "w1", 0, [TaskCompletion(run, h.id, second, msg, [])]
    )
    assert done.reply is Reply.OK
    assert await accept("=" + first) is Reply.STALE  # another task completed since
    assert "WorkflowExecutionUpdateAccepted" not in _types(await h.history())
    assert await accept("=" + second) is Reply.ACCEPTED
    assert _types(await h.history())[-1] == "WorkflowExecutionUpdateAccepted"
    await h.terminate("done")


async def test_a_caller_with_only_names_and_no_registration_asks_a_worker_all_the_same(
    client: Client,
) -> None:
    h = await client.start_workflow(CappedAccountWorkflow)  # no worker has registered it
    by_name = client.get_workflow_handle(h.id)
    with pytest.raises(workflows.WorkflowQueryTimeoutError, match="the validation of update 'deposit'"):
        await by_name.execute_update("deposit", {"amount": -50}, timeout=timedelta(seconds=0.5))
    assert "WorkflowExecutionUpdateAccepted" not in _types(await h.history())
    async with _worker(client):
        with pytest.raises(workflows.WorkflowUpdateRejectedError, match="must be positive, got -50"):
            await by_name.execute_update("deposit", {"amount": -50})
        await h.terminate("done")


async def test_a_worker_that_cannot_validate_is_not_a_rejection(client: Client) -> None:
    h = await client.start_workflow(CappedAccountWorkflow)
    async with Worker(client, workflows=[flows.TimerWorkflow], activities=[], **FAST):  # type: ignore[arg-type]
        with pytest.raises(workflows.WorkflowUpdateFailedError) as ei:
            await h.execute_update(CappedAccountWorkflow.deposit, 1)
    assert not isinstance(ei.value, workflows.WorkflowUpdateRejectedError)
    assert "could not be validated, so it was not sent: WorkflowNotRegistered" in str(ei.value)
    assert "WorkflowExecutionUpdateAccepted" not in _types(await h.history())
    await h.terminate("done")
