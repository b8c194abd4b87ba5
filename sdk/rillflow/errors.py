"""Errors users see, and the failure record that carries an exception across processes."""

from __future__ import annotations

import traceback
from typing import Any

from pydantic_core import to_jsonable_python

from rillflow_runtime.codec import pack


class RillflowError(Exception):
    """Base of the errors rillflow itself raises (usage, configuration, state)."""


class WorkflowError(Exception):
    """A failure meant for the workflow: raised in an activity it is retried unless
    ``non_retryable``; raised in a workflow it fails the run.

    Once it has crossed a process boundary, ``type`` is the original exception's class
    name and ``stack`` the original traceback text.
    """

    def __init__(
        self,
        message: str = "",
        *details: Any,
        type: str | None = None,
        non_retryable: bool = False,
        next_retry_delay: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = list(details)
        self.type = type or self.__class__.__name__
        self.non_retryable = non_retryable
        self.next_retry_delay = next_retry_delay
        self.stack = ""

    def __str__(self) -> str:
        return self.message


class ActivityError(WorkflowError):
    """What a workflow sees when an activity has failed for good (retries exhausted,
    a non-retryable error, or a timeout). ``cause`` holds the last attempt's failure."""

    def __init__(
        self,
        message: str,
        *,
        activity_name: str,
        attempt: int,
        cause: WorkflowError,
        timeout_type: str | None = None,
    ) -> None:
        super().__init__(message, type="ActivityError", non_retryable=True)
        self.activity_name = activity_name
        self.attempt = attempt
        self.cause = cause
        self.timeout_type = timeout_type
        self.__cause__ = cause


class ChildWorkflowError(WorkflowError):
    """What a parent sees when its child workflow did not complete (it failed, timed
    out, was terminated or canceled) or could not start (its id was running). ``cause``
    holds why: the child's own failure, with its cause chain."""

    def __init__(
        self,
        message: str,
        *,
        workflow_type: str,
        execution_id: str,
        run_id: str,
        status: str,
        cause: WorkflowError,
    ) -> None:
        super().__init__(message, type="ChildWorkflowError", non_retryable=True)
        self.workflow_type = workflow_type
        self.execution_id = execution_id
        self.run_id = run_id
        self.status = status
        self.cause = cause
        self.__cause__ = cause


def closed_run_failure(status: str, body: dict[str, Any]) -> WorkflowError:
    """Why a run closed without completing: its failure, or the reason it was ended."""
    if "failure" in body:
        return exception_from_failure(body["failure"])
    reason = body.get("reason") or status
    kind = {
        "timed_out": "WORKFLOW_EXECUTION_TIMED_OUT",
        "terminated": "WorkflowTerminated",
        "canceled": "WorkflowCanceled",
    }.get(status, status)
    return WorkflowError(str(reason), type=kind)


class WorkflowFailureError(RillflowError):
    """The run ended without a result: failed, timed out or terminated."""

    def __init__(self, execution_id: str, run_id: str, status: str, cause: WorkflowError) -> None:
        super().__init__(
            f"workflow execution {execution_id!r} (run {run_id}) {status}: {cause.type}: {cause.message}"
        )
        self.execution_id = execution_id
        self.run_id = run_id
        self.status = status
        self.cause = cause
        self.__cause__ = cause


class WorkflowAlreadyStartedError(RillflowError):
    def __init__(self, execution_id: str, run_id: str) -> None:
        super().__init__(
            f"workflow execution {execution_id!r} is already running (run {run_id}); "
            "wait for it, terminate it, or start with another execution_id (--id on the command line)"
        )
        self.execution_id = execution_id
        self.run_id = run_id


class WorkflowNotFoundError(RillflowError):
    pass


class InvalidInputError(RillflowError, ValueError):
    """Input that does not validate; nothing was written."""


class InvalidResultError(RillflowError, ValueError):
    """A workflow or activity returned a value its return annotation does not allow."""


class WorkflowNotRegisteredError(RillflowError, LookupError):
    """No worker has ever registered this workflow name (on this task queue) in the
    namespace; nothing was written."""


class WorkflowRegistrationConflictError(RillflowError):
    """A worker would serve a workflow on a task queue where another live worker serves
    it with other schemas; nothing was registered. Two versions on one queue would take
    each other's tasks."""

    def __init__(
        self, workflow: str, task_queue: str, worker: str, live_workers: list[str], differences: list[str]
    ) -> None:
        super().__init__(
            f"worker {worker} cannot register workflow '{workflow}' on task queue '{task_queue}': "
            f"live worker{'s' if len(live_workers) > 1 else ''} {', '.join(live_workers)} "
            f"serve{'' if len(live_workers) > 1 else 's'} it there with other schemas; differing: "
            f"{'; '.join(differences)}. Stop the old worker{'s' if len(live_workers) > 1 else ''} first "
            "(a worker withdraws on SIGTERM, and drops out three heartbeats after it dies), or serve "
            "this version on another task queue or under another name"
        )
        self.workflow = workflow
        self.task_queue = task_queue
        self.worker = worker
        self.live_workers = live_workers
        self.differences = differences


class WorkflowQueryFailedError(RillflowError):
    """The query handler raised; ``cause`` is what it raised."""

    def __init__(self, message: str, cause: WorkflowError) -> None:
        super().__init__(message)
        self.cause = cause


class WorkflowQueryTimeoutError(RillflowError, TimeoutError):
    """No worker answered a query in time (none running for the task queue, or busy)."""


class WorkflowUpdateFailedError(RillflowError):
    """The update handler failed (or the run closed first); ``cause`` says how."""

    def __init__(self, message: str, cause: WorkflowError) -> None:
        super().__init__(message)
        self.cause = cause


class WorkflowUpdateRejectedError(WorkflowUpdateFailedError):
    """The update's validator refused it: it was never accepted and left no trace in the
    history; ``cause`` is what the validator raised."""


class WorkflowUpdateTimeoutError(RillflowError, TimeoutError):
    """An accepted update had not finished in time; it still runs, and a call with the
    same update id waits for it again."""


class PayloadTooLargeError(RillflowError, ValueError):
    pass


class NonDeterminismError(RillflowError):
    """Workflow code no longer produces the commands its history records."""


class RestrictedWorkflowAccessError(RillflowError):
    """Workflow code did something that would break replay (blocking I/O, threads)."""


class WorkflowDefinitionError(RillflowError, TypeError):
    """A workflow or activity definition breaks a rule, found when it is decorated."""


def failure_from_exception(exc: BaseException) -> dict[str, Any]:
    """The portable record of an exception (type, message, stack, non_retryable)."""
    stack = safe_text("".join(traceback.format_exception(exc)))
    if isinstance(exc, WorkflowError):
        rec: dict[str, Any] = {
            "type": exc.type,
            "message": safe_text(exc.message),
            "non_retryable": exc.non_retryable,
            "stack": safe_text(exc.stack) or stack,
        }
        if exc.details:
            rec["details"] = jsonable(exc.details)
        if isinstance(exc, ActivityError):
            rec["activity_name"] = exc.activity_name
            rec["attempt"] = exc.attempt
            rec["cause"] = failure_from_exception(exc.cause)
        elif isinstance(exc, ChildWorkflowError):
            rec["child"] = {
                "workflow_type": exc.workflow_type,
                "execution_id": exc.execution_id,
                "run_id": exc.run_id,
                "status": exc.status,
            }
            rec["cause"] = failure_from_exception(exc.cause)
        return rec
    return {
        "type": type(exc).__name__,
        "message": safe_text(str(exc)),
        "non_retryable": False,
        "stack": stack,
    }


def exception_from_failure(rec: dict[str, Any]) -> WorkflowError:
    """Rebuild a failure record as an exception the receiving side can catch."""
    if rec.get("type") == "ActivityError" and "cause" in rec:
        cause = exception_from_failure(rec["cause"])
        err: WorkflowError = ActivityError(
            rec.get("message", ""),
            activity_name=rec.get("activity_name", ""),
            attempt=int(rec.get("attempt", 0)),
            cause=cause,
        )
    elif rec.get("type") == "ChildWorkflowError" and "cause" in rec and isinstance(rec.get("child"), dict):
        child = rec["child"]
        err = ChildWorkflowError(
            rec.get("message", ""),
            workflow_type=str(child.get("workflow_type", "")),
            execution_id=str(child.get("execution_id", "")),
            run_id=str(child.get("run_id", "")),
            status=str(child.get("status", "")),
            cause=exception_from_failure(rec["cause"]),
        )
    else:
        err = WorkflowError(
            rec.get("message", ""),
            *rec.get("details", []),
            type=rec.get("type"),
            non_retryable=bool(rec.get("non_retryable", False)),
        )
    err.stack = rec.get("stack", "")
    return err


def jsonable(value: Any) -> Any:
    """Any value as JSON-like data, for details that cross processes (``repr`` as a
    last resort, so reporting a failure never fails: what the wire cannot carry, such
    as an integer beyond 64 bits or a lone surrogate, becomes text)."""
    try:
        data = to_jsonable_python(value, fallback=repr)
        pack(data)
        return data
    except (ValueError, TypeError, OverflowError):
        return _carriable(value)


def _carriable(value: Any) -> Any:
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else str(value)
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, dict):
        return {safe_text(str(k)): _carriable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_carriable(v) for v in value]
    try:
        data = to_jsonable_python(value, fallback=repr)
    except (ValueError, TypeError):
        return safe_text(repr(value))
    return data if data is value else _carriable(data)


def safe_text(s: str) -> str:
    """``s`` with what UTF-8 cannot encode (lone surrogates) escaped, so that a message
    about bad text can itself be printed and stored."""
    return s.encode("utf-8", "backslashreplace").decode()


class ContinueAsNewError(BaseException):
    """Raised by ``workflow.continue_as_new()``: it ends the run, which its execution
    continues in a new run. A BaseException, so that ``except Exception`` in workflow
    code does not swallow it; let it through."""

    def __init__(self, params: object) -> None:
        super().__init__("continue as new")
        self.params = params
