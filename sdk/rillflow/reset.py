"""Resetting an execution to one of its workflow tasks: what the new run holds, worked out
from the old run's history (reset.lua writes it in one call).

The new run's history is the old one's events before the chosen WorkflowTaskCompleted,
then a WorkflowTaskFailed naming the reset (so the task that completed there runs again,
with the code deployed now), then the signals and updates recorded after that point,
unless excluded. What those copied events leave pending is pending again: an activity
scheduled and not yet finished is scheduled anew (attempt 1), a timer not yet fired is
due when it was."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rillflow.activity import ActivityOptions
from rillflow.errors import InvalidInputError
from rillflow.history import HistoryEvent
from rillflow_runtime.codec import pack
from rillflow_runtime.model import EventType
from rillflow_runtime.protocol import ResetPlan

# what ends an activity for its workflow (a retried attempt does not)
_ACTIVITY_ENDS = frozenset(
    {
        EventType.ACTIVITY_TASK_COMPLETED,
        EventType.ACTIVITY_TASK_FAILED,
        EventType.ACTIVITY_TASK_TIMED_OUT,
        EventType.ACTIVITY_TASK_CANCEL_REQUESTED,
    }
)
_TIMER_ENDS = frozenset({EventType.TIMER_FIRED, EventType.TIMER_CANCELED})
_SHOWN = 12  # how many valid event ids a refusal names
RESET_FAILURE = "ResetWorkflow"  # the type of the failure a reset records


def task_ids(events: Sequence[HistoryEvent]) -> list[int]:
    """The events a reset may go to: the history's WorkflowTaskCompleted events."""
    return [e.event_id for e in events if e.type == EventType.WORKFLOW_TASK_COMPLETED]


def last_good(events: Sequence[HistoryEvent]) -> int:
    """``--to last-good``: the last WorkflowTaskCompleted before the failure the run is
    at now, its latest (a failed or timed-out workflow task, or the run failing or timing
    out): earlier failures that a later task got past are no reason to go back."""
    failures = (
        EventType.WORKFLOW_TASK_FAILED,
        EventType.WORKFLOW_TASK_TIMED_OUT,
        EventType.WORKFLOW_EXECUTION_FAILED,
        EventType.WORKFLOW_EXECUTION_TIMED_OUT,
    )
    latest = [e.event_id for e in events if e.type in failures and not _reset_marker(e)]
    first = latest[-1] if latest else None
    if first is None:
        raise InvalidInputError("the run has no failure to reset past: give --event-id")
    good = [i for i in task_ids(events) if i < first]
    if not good:
        raise InvalidInputError(
            f"the run failed (event {first}) before any workflow task completed: nothing to go back to"
        )
    return good[-1]


def _reset_marker(e: HistoryEvent) -> bool:
    """The WorkflowTaskFailed a reset writes into the run it starts (no failure of it)."""
    failure = e.attributes.get("failure")
    return isinstance(failure, dict) and failure.get("type") == RESET_FAILURE


def plan_reset(
    events: Sequence[HistoryEvent],
    *,
    workflow_id: str,
    old_run: str,
    new_run: str,
    event_id: int,
    reason: str,
    exclude_signals: bool,
    exclude_updates: bool,
) -> ResetPlan:
    """The new run, or InvalidInputError naming why ``event_id`` cannot be reset to."""
    ids = task_ids(events)
    if event_id not in ids:
        at = next((e for e in events if e.event_id == event_id), None)
        what = f"is a {at.type}" if at else f"is not in the history (events 1-{len(events)})"
        shown = ", ".join(str(i) for i in ids[-_SHOWN:]) or "none yet"
        more = f" (the last {_SHOWN} of {len(ids)})" if len(ids) > _SHOWN else ""
        raise InvalidInputError(
            f"event {event_id} of run {old_run} {what}: a reset goes to a WorkflowTaskCompleted, "
            f"one of {shown}{more}"
        )
    start = events[0]
    before = [e for e in events[1:] if e.event_id < event_id]
    if why := _open_at(before):
        raise InvalidInputError(f"event {event_id} of run {old_run} cannot be reset to: {why}")
    after = [e for e in events if e.event_id > event_id]
    timeout_ms = int(start.attributes.get("execution_timeout_ms") or 0)
    copied: list[tuple[str, int, bytes]] = [(e.type, e.time_ms, pack(e.attributes)) for e in before]
    marker = {
        "failure": {
            "type": RESET_FAILURE,
            "message": reason,
            "non_retryable": True,
            "stack": "",
        },
        "reset_from_run": old_run,
        "reset_to_event": event_id,
    }
    copied.append((EventType.WORKFLOW_TASK_FAILED, 0, pack(marker)))
    # the new run's update records: an update of the copied events is done (its outcome
    # kept, so that a retry of its id is not applied twice) or still open, as one
    # re-applied from after the point is
    done = {
        str(e.attributes.get("update_id")): pack(e.attributes)
        for e in before
        if e.type == EventType.WORKFLOW_EXECUTION_UPDATE_COMPLETED
    }
    updates = [
        (str(e.attributes.get("update_id")), done.get(str(e.attributes.get("update_id")), b""))
        for e in before
        if e.type == EventType.WORKFLOW_EXECUTION_UPDATE_ACCEPTED
    ]
    for e in after:
        if e.type == EventType.WORKFLOW_EXECUTION_SIGNALED and not exclude_signals:
            copied.append((e.type, 0, pack(e.attributes)))
        elif e.type == EventType.WORKFLOW_EXECUTION_UPDATE_ACCEPTED and not exclude_updates:
            copied.append((e.type, 0, pack(e.attributes)))
            updates.append((str(e.attributes.get("update_id")), b""))
    return ResetPlan(
        workflow_id=workflow_id,
        old_run=old_run,
        new_run=new_run,
        last_event_id=events[-1].event_id,
        workflow_type=str(start.attributes.get("workflow_type")),
        task_queue=str(start.attributes.get("task_queue")),
        timeout_ms=timeout_ms,
        start_body=pack({**start.attributes, "reset_from_run": old_run, "reset_to_event": event_id}),
        # (reset_run_id: where the old run's waiters go on, see handle._next_run)
        terminate_body=pack(
            {"reason": f"reset to event {event_id} as run {new_run}: {reason}", "reset_run_id": new_run}
        ),
        events=copied,
        activities=_pending_activities(before),
        timers=_pending_timers(before),
        updates=updates,
    )


_CHILD_ENDS = frozenset(
    {
        EventType.START_CHILD_WORKFLOW_EXECUTION_FAILED,
        EventType.CHILD_WORKFLOW_EXECUTION_COMPLETED,
        EventType.CHILD_WORKFLOW_EXECUTION_FAILED,
        EventType.CHILD_WORKFLOW_EXECUTION_CANCELED,
        EventType.CHILD_WORKFLOW_EXECUTION_TIMED_OUT,
        EventType.CHILD_WORKFLOW_EXECUTION_TERMINATED,
    }
)


def _open_at(before: Sequence[HistoryEvent]) -> str | None:
    """Why the point after ``before`` cannot be a reset's: a child workflow or a signal
    to another execution still open there (the new run could not be told how it ends:
    the answer goes to the run that started it)."""
    children = {
        e.attributes.get("seq"): e
        for e in before
        if e.type == EventType.START_CHILD_WORKFLOW_EXECUTION_INITIATED
    }
    signals = {
        e.attributes.get("seq"): e
        for e in before
        if e.type == EventType.SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED
    }
    for e in before:
        if e.type in _CHILD_ENDS:
            children.pop(e.attributes.get("seq"), None)
        elif e.type in (
            EventType.EXTERNAL_WORKFLOW_EXECUTION_SIGNALED,
            EventType.SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_FAILED,
        ):
            signals.pop(e.attributes.get("seq"), None)
    if children:
        e = next(iter(children.values()))
        return (
            f"child workflow '{e.attributes.get('workflow_id')}' (started at event {e.event_id}) is still open "
            "there; reset to a WorkflowTaskCompleted before it started or after it closed"
        )
    if signals:
        e = next(iter(signals.values()))
        return (
            f"the signal sent at event {e.event_id} is not answered yet there; reset to a "
            "WorkflowTaskCompleted before it or after its answer"
        )
    return None


def _pending_activities(events: Sequence[HistoryEvent]) -> list[tuple[list[Any], bytes]]:
    ended = {e.attributes.get("seq") for e in events if e.type in _ACTIVITY_ENDS}
    out = []
    for e in events:
        a = e.attributes
        if e.type != EventType.ACTIVITY_TASK_SCHEDULED or a.get("seq") in ended:
            continue
        # as the workflow task that scheduled it sent them (WorkflowInstance.schedule_activity)
        aux = [int(a["seq"]), str(a.get("task_queue")), *ActivityOptions.from_wire(a).aux()]
        out.append((aux, pack(a)))
    return out


def _pending_timers(events: Sequence[HistoryEvent]) -> list[tuple[int, int]]:
    ended = {e.attributes.get("seq") for e in events if e.type in _TIMER_ENDS}
    return [
        (int(e.attributes["seq"]), e.time_ms + int(e.attributes.get("duration_ms") or 0))
        for e in events
        if e.type == EventType.TIMER_STARTED and e.attributes.get("seq") not in ended
    ]
