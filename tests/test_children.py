"""Child workflows: the page's forms, results and failures, parent close policies, ids,
signals to a child, and the outbox that carries all of it across shards, exactly once
in effect when a worker dies between the two steps of an entry."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest

from rillflow import Client, ParentClosePolicy, Worker, WorkflowFailureError, workflow
from rillflow.errors import RillflowError
from rillflow_runtime.keyspace import Keyspace
from tests import child_flows as cf
from tests.conftest import FAST, wait_until

pytestmark = pytest.mark.anyio


@pytest.fixture
def namespace_shards(shards: int) -> int:
    return shards


def worker(client: Client, **kw: Any) -> Worker:
    return Worker(client, workflows=cf.WORKFLOWS, activities=cf.ACTIVITIES, **{**FAST, **kw})


def types(events: list[Any]) -> list[str]:
    return [e.type for e in events]


async def test_the_pages_child_workflow_examples_run_unchanged(client: Client) -> None:
    async with worker(client):
        h = await client.start_workflow(cf.PageParent, {"x": 21}, execution_id="page")
        res = await h.result(timeout=20)
        assert res["result"] == 42 and res["later"] == 42
        # the third child (wait=False, TERMINATE) is terminated when the parent closes, or
        # finished first: either way it closed, and its id is derived from the parent's
        third = client.get_workflow_handle(res["third_id"])
        await wait_until(lambda: _closed(third), timeout=10)
    assert res["third_id"].startswith("page-") and res["third_id"].endswith("-3")
    events = await h.history()
    assert Counter(types(events))["StartChildWorkflowExecutionInitiated"] == 3
    started = [e.attributes for e in events if e.type == "StartChildWorkflowExecutionInitiated"]
    assert [a["parent_close_policy"] for a in started] == ["terminate", "abandon", "terminate"]
    # a child is a run of its own, with its parent named in its start
    first = client.get_workflow_handle(started[0]["workflow_id"])
    assert (await first.result(timeout=5)) == cf.ChildResult(doubled=42).model_dump()
    assert (await first.history())[0].attributes["parent"]["workflow_id"] == "page"


async def _closed(h: Any) -> bool:
    return (await h.describe()).status != "running"


@pytest.mark.parametrize(
    ("policy", "status"),
    [(ParentClosePolicy.ABANDON, "running"), (ParentClosePolicy.TERMINATE, "terminated")],
)
async def test_a_parent_close_policy_applies_when_the_parent_closes(
    client: Client, policy: ParentClosePolicy, status: str
) -> None:
    async with worker(client):
        h = await client.start_workflow(
            cf.LeavingParent, {"child_id": f"kid-{policy.name}", "policy": policy}
        )
        assert await h.result(timeout=10) == f"kid-{policy.name}"
        kid = client.get_workflow_handle(f"kid-{policy.name}")
        if status == "running":
            await workflow_settles()
            assert (await kid.describe()).status == "running"  # abandoned: it runs on
            await kid.signal("release", "later")
            assert await kid.result(timeout=10) == "released with later"
        else:
            await wait_until(lambda: _closed(kid), timeout=10)
            d = await kid.describe()
            assert d.status == "terminated"
            assert "parent close policy is terminate" in str(d.failure)


async def workflow_settles() -> None:
    import asyncio

    await asyncio.sleep(0.5)


async def test_request_cancel_lets_the_child_clean_up_and_end_canceled(client: Client) -> None:
    async with worker(client):
        h = await client.start_workflow(
            cf.LeavingParent, {"child_id": "kid-cancel", "policy": ParentClosePolicy.REQUEST_CANCEL}
        )
        await h.result(timeout=10)
        kid = client.get_workflow_handle("kid-cancel")
        await wait_until(lambda: _closed(kid), timeout=10)
        assert (await kid.describe()).status == "canceled"
        assert "ActivityTaskCompleted" in types(await kid.history())  # its clean-up ran


async def test_a_childs_failure_reaches_the_parent_with_its_cause_chain(client: Client) -> None:
    async with worker(client):
        raised = await client.execute_workflow(cf.CatchingParent, {"how": "raise"}, result_timeout=10)
        assert raised["status"] == "failed"
        assert raised["chain"][0][:2] == ["ChildWorkflowError", "ChildWorkflowError"]
        assert raised["chain"][1] == ["WorkflowError", "ChildGaveUp", "the child gave up"]
        activity = await client.execute_workflow(cf.CatchingParent, {"how": "activity"}, result_timeout=10)
        assert [c[0] for c in activity["chain"]] == ["ChildWorkflowError", "ActivityError", "WorkflowError"]
        assert activity["chain"][2][1:] == ["Explosion", "the activity blew up"]
        timed_out = await client.execute_workflow(cf.CatchingParent, {"how": "sleep"}, result_timeout=10)
        assert timed_out["status"] == "timed_out"
        # uncaught, it fails the parent, which says which child and why
        h = await client.start_workflow(cf.UncaughtParent)
        with pytest.raises(WorkflowFailureError) as err:
            await h.result(timeout=10)
    assert err.value.cause.type == "ChildWorkflowError"
    assert "failing_child" in err.value.cause.message and "the child gave up" in err.value.cause.message


async def test_a_terminated_child_is_a_child_workflow_error(client: Client) -> None:
    async with worker(client):
        h = await client.start_workflow(cf.AwaitingParent, {"child_id": "kid-t"})
        kid = client.get_workflow_handle("kid-t")
        await wait_until(lambda: _is_running(kid), timeout=10)
        await kid.terminate("operator says no")
        with pytest.raises(WorkflowFailureError) as err:
            await h.result(timeout=10)
    assert "terminated" in err.value.cause.message and "operator says no" in err.value.cause.message


async def _is_running(h: Any) -> bool:
    try:
        return (await h.describe()).status == "running"
    except RillflowError:
        return False


async def test_an_id_already_running_is_a_clear_error_in_the_parents_history(client: Client) -> None:
    async with worker(client):
        h = await client.start_workflow(cf.TwinParent, {"child_id": "twin"})
        res = await h.result(timeout=10)
    assert res["first"] == "released with twin"
    assert res["second"] == (
        "child workflow 'waiting_child' did not start: execution id 'twin' is already running "
        f"(run {cf.child_run_id(h.run_id or '', 1)})"
    )
    failed = [e.attributes for e in await h.history() if e.type == "StartChildWorkflowExecutionFailed"]
    assert len(failed) == 1 and failed[0]["workflow_id"] == "twin"


async def test_a_child_that_continues_as_new_reports_its_chains_end(client: Client) -> None:
    async with worker(client):
        assert await client.execute_workflow(cf.ChainParent, {"left": 3}, result_timeout=10) == 6


async def test_a_child_named_by_its_type_gives_plain_data(client: Client) -> None:
    async with worker(client):
        assert await client.execute_workflow(cf.UntypedParent, {"x": 4}, result_timeout=10) == {"doubled": 8}


async def test_cancelling_a_parent_blocked_on_a_child_terminates_the_child(client: Client) -> None:
    async with worker(client):
        h = await client.start_workflow(cf.AwaitingParent, {"child_id": "kid-c"})
        kid = client.get_workflow_handle("kid-c")
        await wait_until(lambda: _is_running(kid), timeout=10)
        await h.cancel("stop")
        await wait_until(lambda: _closed(h), timeout=10)
        assert (await h.describe()).status == "canceled"
        await wait_until(lambda: _closed(kid), timeout=10)
        assert (await kid.describe()).status == "terminated"


async def test_a_fan_out_of_children_survives_a_worker_restart(client: Client) -> None:
    """The children's ids and runs are the parent's: replayed by a new worker, the same."""
    async with worker(client, max_cached_workflows=0):
        res = await client.execute_workflow(cf.FanoutParent, {"n": 10}, execution_id="fan", result_timeout=20)
    assert res == [2 * i for i in range(10)]
    h = client.get_workflow_handle("fan")
    ids = [
        e.attributes["workflow_id"] for e in await h.history() if e.type == "ChildWorkflowExecutionStarted"
    ]
    assert len(ids) == len(set(ids)) == 10


def test_execute_workflow_outside_a_workflow_points_to_the_client() -> None:
    import asyncio

    with pytest.raises(RillflowError, match=r"client\.execute_workflow"):
        asyncio.run(workflow.execute_workflow(cf.ChildWorkflow, {"x": 1}))


@pytest.mark.parametrize("die", ["start_child", "child_closed"])
async def test_a_worker_killed_between_the_two_steps_of_an_outbox_entry_changes_nothing(
    redis_url: str, worker_procs: Any, die: str
) -> None:
    """shards=4: the child's start (or its outcome) is applied on the child's (the
    parent's) shard, then the worker dies (SIGKILL) before it answers and removes the
    entry; another worker takes the entry over and applies it again, to no effect."""
    client = await Client.connect(redis_url, shards=4, workflow_task_timeout=timedelta(seconds=2))
    try:
        dying = worker_procs(redis_url, "tests.child_flows:SERVED", env={"RF_DIE_BEFORE_OUTBOX_DONE": die})
        h = await client.start_workflow(cf.FanoutParent, {"n": 3}, execution_id=f"killed-{die}")
        dying.proc.wait(timeout=20)  # it killed itself at the first such entry
        async with worker(client):
            assert await h.result(timeout=30) == [0, 2, 4]
        events = await h.history()
        counts = Counter(types(events))
        assert counts["StartChildWorkflowExecutionInitiated"] == 3
        assert counts["ChildWorkflowExecutionStarted"] == 3
        assert counts["ChildWorkflowExecutionCompleted"] == 3
        for e in events:
            if e.type == "StartChildWorkflowExecutionInitiated":
                kid = client.get_workflow_handle(e.attributes["workflow_id"])
                runs = [x for x in await kid.history() if x.type == "WorkflowExecutionStarted"]
                assert len(runs) == 1  # started once
                assert (await kid.describe()).run_id == e.attributes["run_id"]
        # nothing is left in any outbox
        for s in range(4):
            assert await client.redis.xlen(client.keyspace.outbox(s)) == 0
    finally:
        await client.close()


async def test_a_parent_is_reset_only_to_a_point_where_no_child_is_open(client: Client) -> None:
    async with worker(client):
        h = await client.start_workflow(cf.FanoutParent, {"n": 2}, execution_id="fan-reset")
        assert await h.result(timeout=10) == [0, 2]
        events = await h.history()
        tasks = [e.event_id for e in events if e.type == "WorkflowTaskCompleted"]
        opened = next(e.event_id for e in events if e.type == "StartChildWorkflowExecutionInitiated")
        closed = max(e.event_id for e in events if e.type == "ChildWorkflowExecutionCompleted")
        inside = next(t for t in tasks if opened < t < closed)
        with pytest.raises(RillflowError, match="still open there"):
            await client.reset_workflow("fan-reset", inside, reason="try")
        assert len(await h.history()) == len(events)  # nothing written
        again = await client.reset_workflow("fan-reset", tasks[-1], reason="after the children")
        assert await again.result(timeout=10) == [0, 2]


async def test_a_child_reset_stays_its_parents_child(client: Client) -> None:
    async with worker(client):
        h = await client.start_workflow(cf.AwaitingParent, {"child_id": "kid-r"})
        kid = client.get_workflow_handle("kid-r")
        await wait_until(lambda: _is_running(kid), timeout=10)
        await wait_until(lambda: _has_task(kid), timeout=10)
        first = next(e.event_id for e in await kid.history() if e.type == "WorkflowTaskCompleted")
        reset = await client.reset_workflow("kid-r", first, reason="again")
        await reset.signal("release", "after reset")
        assert await h.result(timeout=10) == "released with after reset"
    events = await h.history()
    assert Counter(types(events))["ChildWorkflowExecutionCompleted"] == 1
    assert "ChildWorkflowExecutionTerminated" not in types(events)  # the reset's end of the old run is no end


async def _has_task(h: Any) -> bool:
    return "WorkflowTaskCompleted" in types(await h.history())


async def test_describe_names_a_childs_parent_and_a_parents_open_children(client: Client) -> None:
    async with worker(client):
        h = await client.start_workflow(cf.AwaitingParent, {"child_id": "kid-d"}, execution_id="parent-d")
        kid = client.get_workflow_handle("kid-d")
        await wait_until(lambda: _is_running(kid), timeout=10)
        d = await kid.describe()
        assert (d.parent_execution_id, d.parent_run_id) == ("parent-d", h.run_id)
        (child,) = (await h.describe()).pending_children
        assert (child.seq, child.execution_id, child.parent_close_policy) == (1, "kid-d", "terminate")
        await kid.signal("release", "x")
        assert await h.result(timeout=10) == "released with x"
        assert (await h.describe()).pending_children == []


async def test_a_parent_that_signals_its_child_replays_from_its_history(client: Client) -> None:
    async with worker(client, max_cached_workflows=0):  # every task a replay
        res = await client.execute_workflow(cf.TwinParent, {"child_id": "twin-replay"}, result_timeout=15)
    assert res["first"] == "released with twin"


async def test_a_signal_applied_again_after_its_target_closed_still_counts_as_delivered(
    client: Client, redis_url: str, worker_procs: Any
) -> None:
    """The worker dies after the signal reached the child, before the parent heard; the
    child closes (the signal released it); the entry, applied again, is a repeat."""
    dying = worker_procs(redis_url, "tests.child_flows:SERVED", env={"RF_DIE_BEFORE_OUTBOX_DONE": "signal"})
    h = await client.start_workflow(cf.TwinParent, {"child_id": "twin-kill"})
    dying.proc.wait(timeout=20)
    async with worker(client):
        res = await h.result(timeout=20)
    assert res["first"] == "released with twin"
    assert Counter(types(await h.history()))["ExternalWorkflowExecutionSignaled"] == 1
    kid = client.get_workflow_handle("twin-kill")
    assert Counter(types(await kid.history()))["WorkflowExecutionSignaled"] == 1


async def test_a_stalled_worker_cannot_overrule_the_answer_of_the_one_that_took_over(
    client: Client, redis_url: str, worker_procs: Any
) -> None:
    """A worker applies a child's start (its id is taken: refused) and stalls (SIGSTOP)
    before it answers the parent; the id frees up; another worker takes the entry over
    and starts the child. The parent hears that answer, and the stalled worker's, once it
    goes on, is refused."""
    stalled = worker_procs(
        redis_url, "tests.child_flows:SERVED", env={"RF_STOP_BEFORE_OUTBOX_DONE": "start_child"}
    )
    busy = await client.start_workflow(cf.WaitingChild, execution_id="busy")
    await wait_until(lambda: _has_task(busy), timeout=10)
    h = await client.start_workflow(
        cf.LeavingParent, {"child_id": "busy", "policy": ParentClosePolicy.ABANDON}
    )
    await wait_until(lambda: _stopped(stalled.proc.pid), timeout=10)
    await busy.terminate("free the id")
    async with worker(client):
        assert await h.result(timeout=20) == "busy"
        stalled.proc.send_signal(signal.SIGCONT)
        await asyncio.sleep(1)  # (its answer, refused, would have landed by now)
    events = types(await h.history())
    assert (
        "StartChildWorkflowExecutionFailed" not in events
        and events.count("ChildWorkflowExecutionStarted") == 1
    )
    d = await client.get_workflow_handle("busy").describe()
    assert (d.status, d.parent_run_id) == ("running", h.run_id)


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


async def _outbox_pending(client: Client) -> bool:
    for s in client.keyspace.all_shards():
        try:
            if (await client.redis.xpending(client.keyspace.outbox(s), "rf"))["pending"]:
                return True
        except Exception:
            continue
    return False


async def test_an_unreadable_outbox_entry_is_set_aside_and_stops_nothing(client: Client) -> None:
    from rillflow_runtime.codec import pack

    box = client.keyspace.outbox(0)
    async with worker(client, max_deliveries=2):
        await client.redis.xadd(
            box,
            {
                "kind": "start_child", "wid": "p", "run": "r", "seq": "1", "cwid": "c", "crun": "cr",
                "pol": "abandon",
                "d": pack({"workflow_type": "child_workflow", "task_queue": "default", "execution_timeout_ms": "soon"}),
            },
        )  # fmt: skip
        # the timers pump and the outbox go on: a child workflow with a durable timer completes
        assert await client.execute_workflow(cf.CatchingParent, {"how": "sleep"}, result_timeout=20)
        await wait_until(lambda: _dead_lettered(client, box), timeout=20)
    (entry,) = [f for _, f in await client.redis.xrange(box + ":dlq")]
    assert b"unreadable child start" in entry[b"dlq_reason"]


async def _dead_lettered(client: Client, box: str) -> bool:
    return bool(await client.redis.xlen(box + ":dlq"))


async def test_a_child_of_a_type_no_worker_registered_does_not_start(client: Client) -> None:
    async with worker(client):
        status, cause, why = await client.execute_workflow(cf.MissingParent, result_timeout=10)
    assert (status, cause) == ("not_started", "WorkflowNotRegistered")
    assert "no worker has registered a workflow named 'no_such_child'" in why


async def test_a_childs_timeout_under_a_millisecond_is_rounded_up_not_refused(client: Client) -> None:
    async with worker(client):
        assert await client.execute_workflow(cf.HastyParent, result_timeout=10) == "timed_out"


async def test_entries_of_two_shards_with_one_id_are_both_applied(client: Client, monkeypatch: Any) -> None:
    """Entry ids are per stream: two shards' outboxes written in the same millisecond
    share one. Applying one must not make the poller skip the other."""
    from rillflow.worker import outbox as worker_outbox

    applied: list[int] = []
    gate = asyncio.Event()

    async def apply(protocol: Any, shard: int, entry_id: str, *a: Any) -> Any:
        applied.append(shard)
        if shard == 0:
            await gate.wait()  # shard 0's entry still being applied (by the reclaim, say)

    monkeypatch.setattr(worker_outbox.outbox, "apply", apply)
    w = worker(client)
    box = w.outbox
    same = b"1796690543213-0"
    first = asyncio.ensure_future(box._apply(0, client.keyspace.outbox(0), same, {}))
    await asyncio.sleep(0)
    await box._apply(1, Keyspace(client.namespace, 2).outbox(1), same, {})
    gate.set()
    await first
    assert sorted(applied) == [0, 1]
