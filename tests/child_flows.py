"""Workflows with children, for tests/test_children.py and the worker processes it starts
(``rillflow worker tests.child_flows:SERVED``)."""

from __future__ import annotations

import asyncio
import os
import signal
from datetime import timedelta
from typing import Any

from pydantic import BaseModel

import rillflow as workflows
from rillflow import ChildWorkflowError, ParentClosePolicy, WorkflowError, workflow
from rillflow.children import child_run_id
from rillflow_runtime.model import OutboxKind
from rillflow_runtime.protocol import Protocol

FAST_RETRY: dict[str, Any] = {"retry_policy_initial_interval": timedelta(milliseconds=50)}


class ChildParams(BaseModel):
    x: int


class ChildResult(BaseModel):
    doubled: int


# (a short start-to-close: an attempt held by a worker the kill tests SIGKILL is retried soon)
@workflows.activity(start_to_close_timeout=timedelta(seconds=2), **FAST_RETRY)
async def double(x: int) -> int:
    return 2 * x


@workflows.activity()
async def clean_up(what: str) -> str:
    return f"cleaned {what}"


@workflows.activity(retry_policy_max_attempts=1)
async def explodes(why: str) -> str:
    raise WorkflowError(why, type="Explosion", non_retryable=True)


@workflow.define(name="child_workflow")
class ChildWorkflow:
    @workflow.entrypoint
    async def run(self, params: ChildParams) -> ChildResult:
        return ChildResult(doubled=await double(params.x))


@workflow.define(name="waiting_child")
class WaitingChild:
    """Waits for its `release` signal; asked to cancel, it cleans up and ends canceled."""

    def __init__(self) -> None:
        self.released = ""

    @workflow.signal()
    def release(self, value: str) -> None:
        self.released = value

    @workflow.entrypoint
    async def run(self) -> str:
        try:
            await workflow.wait_condition(lambda: bool(self.released))
        except asyncio.CancelledError:
            await clean_up(workflow.info().workflow_id)
            raise
        return f"released with {self.released}"


@workflow.define(name="failing_child")
class FailingChild:
    @workflow.entrypoint
    async def run(self, how: str) -> str:
        if how == "activity":
            return await explodes("the activity blew up")
        if how == "sleep":
            await workflow.sleep(60)
        raise WorkflowError("the child gave up", type="ChildGaveUp")


@workflow.define(name="continuing_child")
class ContinuingChild:
    @workflow.entrypoint
    async def run(self, left: int, total: int = 0) -> int:
        if left > 0:
            workflow.continue_as_new({"left": left - 1, "total": total + left})
        return total


# -- the page's examples (workflows page, "Child workflows"), with only the import changed --
from rillflow import ParentClosePolicy as PageParentClosePolicy  # noqa: E402  (the page's import)


@workflow.define(name="page_parent")  # added around the page's three calls
class PageParent:
    @workflow.entrypoint
    async def run(self, x: int) -> dict[str, Any]:
        child_params = ChildParams(x=x)  # added
        result = await workflow.execute_workflow(
            ChildWorkflow, params=child_params, execution_timeout=timedelta(hours=1)
        )
        handle = await workflow.execute_workflow(
            ChildWorkflow,
            params=child_params,
            execution_timeout=timedelta(hours=1),
            wait=False,
        )
        # Parent continues immediately; child runs independently
        later = await handle  # added: the page's "Optionally await later"
        handle = await workflow.execute_workflow(
            ChildWorkflow,
            params=child_params,
            execution_timeout=timedelta(hours=1),
            wait=False,
            parent_close_policy=PageParentClosePolicy.TERMINATE,
        )
        return {"result": result.doubled, "later": later.doubled, "third_id": handle.workflow_id}


@workflow.define(name="leaving_parent")
class LeavingParent:
    """Starts a waiting child with the given policy and closes at once."""

    @workflow.entrypoint
    async def run(self, child_id: str, policy: int) -> str:
        h = await workflow.execute_workflow(
            WaitingChild, execution_id=child_id, wait=False, parent_close_policy=ParentClosePolicy(policy)
        )
        return h.workflow_id


@workflow.define(name="catching_parent")
class CatchingParent:
    @workflow.entrypoint
    async def run(self, how: str) -> dict[str, Any]:
        try:
            await workflow.execute_workflow(
                FailingChild, {"how": how}, execution_timeout=timedelta(seconds=1)
            )
        except ChildWorkflowError as e:
            chain = []
            cause: BaseException | None = e
            while cause is not None:
                chain.append(
                    [type(cause).__name__, getattr(cause, "type", None), getattr(cause, "message", "")]
                )
                cause = getattr(cause, "cause", None)
            return {"status": e.status, "id": e.execution_id, "chain": chain}
        return {}


@workflow.define(name="uncaught_parent")
class UncaughtParent:
    @workflow.entrypoint
    async def run(self) -> str:
        return await workflow.execute_workflow(FailingChild, {"how": "raise"})


@workflow.define(name="twin_parent")
class TwinParent:
    """Two children with one id: the second cannot start while the first runs."""

    @workflow.entrypoint
    async def run(self, child_id: str) -> dict[str, str]:
        first = await workflow.execute_workflow(WaitingChild, execution_id=child_id, wait=False)
        try:
            await workflow.execute_workflow(WaitingChild, execution_id=child_id, wait=False)
            second = "started"
        except ChildWorkflowError as e:
            second = str(e)
        await first.signal(WaitingChild.release, "twin")
        return {"first": await first, "second": second}


@workflow.define(name="fanout_parent")
class FanoutParent:
    @workflow.entrypoint
    async def run(self, n: int) -> list[int]:
        results = await asyncio.gather(
            *(workflow.execute_workflow(ChildWorkflow, ChildParams(x=i)) for i in range(n))
        )
        return [r.doubled for r in results]


@workflow.define(name="awaiting_parent")
class AwaitingParent:
    """Waits on a child (default policy TERMINATE): cancelled, it cleans up and ends canceled."""

    @workflow.entrypoint
    async def run(self, child_id: str) -> str:
        try:
            return await workflow.execute_workflow(WaitingChild, execution_id=child_id)
        except asyncio.CancelledError:
            await clean_up("parent")
            raise


@workflow.define(name="chain_parent")
class ChainParent:
    @workflow.entrypoint
    async def run(self, left: int) -> int:
        return await workflow.execute_workflow(ContinuingChild, {"left": left})


@workflow.define(name="untyped_parent")
class UntypedParent:
    """Names its child instead of importing its class: the result is plain data."""

    @workflow.entrypoint
    async def run(self, x: int) -> Any:
        return await workflow.execute_workflow("child_workflow", {"x": x})


@workflow.define(name="missing_parent")
class MissingParent:
    """Names a child type no worker serves."""

    @workflow.entrypoint
    async def run(self) -> list[str]:
        try:
            await workflow.execute_workflow("no_such_child", {})
        except ChildWorkflowError as e:
            return [e.status, str(e.cause.type), e.cause.message]
        return []


@workflow.define(name="hasty_parent")
class HastyParent:
    """Gives its child a timeout under a millisecond: it still starts, and times out."""

    @workflow.entrypoint
    async def run(self) -> str:
        try:
            await workflow.execute_workflow(
                FailingChild, {"how": "sleep"}, execution_timeout=timedelta(microseconds=500)
            )
        except ChildWorkflowError as e:
            return e.status
        return "completed"


WORKFLOWS = [
    ChildWorkflow,
    WaitingChild,
    FailingChild,
    ContinuingChild,
    PageParent,
    LeavingParent,
    CatchingParent,
    UncaughtParent,
    TwinParent,
    FanoutParent,
    AwaitingParent,
    ChainParent,
    UntypedParent,
    MissingParent,
    HastyParent,
]
ACTIVITIES = [double, clean_up, explodes]
SERVED = [*WORKFLOWS, *ACTIVITIES]
__all__ = ["child_run_id"]

# A worker process started with RF_DIE_BEFORE_OUTBOX_DONE=<kind>,... kills itself (SIGKILL)
# between the two steps of applying an outbox entry of those kinds: its effect is applied
# where it takes effect, the entry is neither answered nor removed (tests/test_children.py).
# With RF_STOP_BEFORE_OUTBOX_DONE=<kind>,... it stops itself (SIGSTOP) there instead, the
# first time: a worker that stalls, to be continued (SIGCONT) by the test.
_die_kinds = {k for k in os.environ.get("RF_DIE_BEFORE_OUTBOX_DONE", "").split(",") if k}
_stop_kinds = {k for k in os.environ.get("RF_STOP_BEFORE_OUTBOX_DONE", "").split(",") if k}
if _die_kinds or _stop_kinds:
    _outbox_done = Protocol.outbox_done

    async def _dying_outbox_done(
        self: Protocol, shard: int, entry_id: str, consumer: str, kind: OutboxKind, *a: Any
    ) -> Any:
        if kind.value in _die_kinds:
            os.kill(os.getpid(), signal.SIGKILL)
        if kind.value in _stop_kinds:
            _stop_kinds.discard(kind.value)
            os.kill(os.getpid(), signal.SIGSTOP)
        return await _outbox_done(self, shard, entry_id, consumer, kind, *a)

    Protocol.outbox_done = _dying_outbox_done  # type: ignore[method-assign]
