"""Child workflows as workflow code sees them: the parent close policy and the handle
``workflow.execute_workflow(..., wait=False)`` returns.

The runs themselves are ordinary runs, started through the parent's outbox on the
child's own shard (see rillflow_runtime.outbox); the parent's history records each
step (StartChildWorkflowExecutionInitiated, ChildWorkflowExecutionStarted, then the
child's close), so a replay resolves the same awaits in the same order.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from rillflow.errors import InvalidInputError
from rillflow_runtime.keyspace import NAME_RE
from rillflow_runtime.model import ParentClosePolicy as WirePolicy

if TYPE_CHECKING:
    from rillflow.executor import WorkflowInstance
    from rillflow.workflow import WorkflowDefinition

T = TypeVar("T")


class ParentClosePolicy(IntEnum):
    """What happens to a child still running when its parent closes (Temporal's values).
    UNSPECIFIED takes the default: TERMINATE for ``wait=True``, ABANDON for ``wait=False``."""

    UNSPECIFIED = 0
    TERMINATE = 1  # the child is terminated
    ABANDON = 2  # the child runs on, on its own
    REQUEST_CANCEL = 3  # the child is asked to cancel (asyncio.CancelledError in its code)

    def wire(self, wait: bool) -> WirePolicy:
        if self is ParentClosePolicy.UNSPECIFIED:
            return WirePolicy.TERMINATE if wait else WirePolicy.ABANDON
        return {
            ParentClosePolicy.TERMINATE: WirePolicy.TERMINATE,
            ParentClosePolicy.ABANDON: WirePolicy.ABANDON,
            ParentClosePolicy.REQUEST_CANCEL: WirePolicy.REQUEST_CANCEL,
        }[self]


def default_child_id(parent_id: str, parent_run: str, seq: int) -> str:
    """The id of a parent's ``seq``-th child when none is given: the parent's id, a
    piece of its run id (the next run of a chain starts counting again) and the number,
    the same on every replay. Within the 256 characters an id may have."""
    tail = f"-{parent_run[:8]}-{seq}"
    return parent_id[: 256 - len(tail)] + tail


def child_run_id(parent_run: str, seq: int) -> str:
    """The child's first run id, made from the parent's run and the child's number: a
    start delivered twice names the same run, which the second delivery finds."""
    return str(uuid.UUID(bytes=hashlib.sha1(f"{parent_run}:child:{seq}".encode()).digest()[:16], version=4))


def _observed(fut: asyncio.Future[Any]) -> None:
    # a child that fails unawaited (wait=False, never awaited) is the parent's choice,
    # not an error of its code: its exception counts as retrieved
    if not fut.cancelled():
        fut.exception()


class ChildWorkflowHandle(Generic[T]):
    """A started child workflow: ``await handle`` (or ``await handle.result()``) for
    its result, ``await handle.signal(...)`` to signal it, or leave it be."""

    def __init__(
        self,
        inst: WorkflowInstance,
        seq: int,
        workflow_type: str,
        workflow_id: str,
        run_id: str,
        defn: WorkflowDefinition | None,
    ) -> None:
        self._inst = inst
        self.seq = seq
        self.workflow_type = workflow_type
        self.workflow_id = workflow_id
        self.run_id = run_id  # the run that reported last: the first, or the one that closed
        self.first_execution_run_id = run_id
        self.defn = defn
        self.started: asyncio.Future[ChildWorkflowHandle[T]] = inst.loop.create_future()
        self.outcome: asyncio.Future[T] = inst.loop.create_future()
        self.started.add_done_callback(_observed)
        self.outcome.add_done_callback(_observed)

    def __await__(self) -> Any:
        return self.result().__await__()

    async def result(self) -> T:
        """The child's result, typed by its entrypoint's return annotation; raises
        ChildWorkflowError if it did not complete. Cancelling the wait leaves the child
        alone (its parent close policy applies when the parent closes)."""
        return await asyncio.shield(self.outcome)

    async def signal(self, signal: Any, payload: Any = None) -> None:
        """Signal the child (its name or the decorated handler method): returns once it
        was delivered; raises WorkflowError if the child is no longer running."""
        from rillflow.workflow import handler_definition

        h = handler_definition(signal)
        if h is not None and h.kind != "signal":
            raise InvalidInputError(f"'{h.method}' is a {h.kind} handler, not a signal")
        if h is None and not (isinstance(signal, str) and NAME_RE.fullmatch(signal)):
            raise InvalidInputError(
                f"{signal!r} is not a signal: pass its name, or the method decorated with @workflow.signal"
            )
        name = h.name if h is not None else str(signal)
        await asyncio.shield(self._inst.signal_external(self.workflow_id, self.defn, name, payload))

    def __repr__(self) -> str:
        return f"ChildWorkflowHandle({self.workflow_type!r}, id={self.workflow_id!r})"
