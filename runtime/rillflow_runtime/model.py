"""The protocol's vocabulary: every status, event type, command kind and timer kind the
scripts and the Python side exchange, each with one value and one meaning.

The Lua scripts do not spell these values: they read them from tables generated from
these enums (``scripts.lua_constants``), and a test refuses a script that names a member
that does not exist or writes a value as a bare string.
"""

from __future__ import annotations

from enum import StrEnum


class EventType(StrEnum):
    """The ``type`` field of a history entry."""

    WORKFLOW_EXECUTION_STARTED = "WorkflowExecutionStarted"
    WORKFLOW_TASK_COMPLETED = "WorkflowTaskCompleted"
    WORKFLOW_TASK_FAILED = "WorkflowTaskFailed"
    WORKFLOW_TASK_TIMED_OUT = "WorkflowTaskTimedOut"
    ACTIVITY_TASK_SCHEDULED = "ActivityTaskScheduled"
    ACTIVITY_TASK_COMPLETED = "ActivityTaskCompleted"
    ACTIVITY_TASK_FAILED = "ActivityTaskFailed"
    ACTIVITY_TASK_TIMED_OUT = "ActivityTaskTimedOut"
    ACTIVITY_TASK_RETRYING = "ActivityTaskRetrying"
    ACTIVITY_TASK_CANCEL_REQUESTED = "ActivityTaskCancelRequested"
    TIMER_STARTED = "TimerStarted"
    TIMER_FIRED = "TimerFired"
    TIMER_CANCELED = "TimerCanceled"
    WORKFLOW_EXECUTION_SIGNALED = "WorkflowExecutionSignaled"
    WORKFLOW_EXECUTION_UPDATE_ACCEPTED = "WorkflowExecutionUpdateAccepted"
    WORKFLOW_EXECUTION_UPDATE_COMPLETED = "WorkflowExecutionUpdateCompleted"
    WORKFLOW_EXECUTION_COMPLETED = "WorkflowExecutionCompleted"
    WORKFLOW_EXECUTION_FAILED = "WorkflowExecutionFailed"
    WORKFLOW_EXECUTION_TIMED_OUT = "WorkflowExecutionTimedOut"
    WORKFLOW_EXECUTION_TERMINATED = "WorkflowExecutionTerminated"
    WORKFLOW_EXECUTION_CONTINUED_AS_NEW = "WorkflowExecutionContinuedAsNew"
    MARKER_RECORDED = "MarkerRecorded"  # a patch the code took (workflow.patched())
    WORKFLOW_EXECUTION_CANCEL_REQUESTED = "WorkflowExecutionCancelRequested"
    WORKFLOW_EXECUTION_CANCELED = "WorkflowExecutionCanceled"
    # child workflows (a parent's history) and signals to other executions
    START_CHILD_WORKFLOW_EXECUTION_INITIATED = "StartChildWorkflowExecutionInitiated"
    START_CHILD_WORKFLOW_EXECUTION_FAILED = "StartChildWorkflowExecutionFailed"  # its id was running
    CHILD_WORKFLOW_EXECUTION_STARTED = "ChildWorkflowExecutionStarted"
    CHILD_WORKFLOW_EXECUTION_COMPLETED = "ChildWorkflowExecutionCompleted"
    CHILD_WORKFLOW_EXECUTION_FAILED = "ChildWorkflowExecutionFailed"
    CHILD_WORKFLOW_EXECUTION_CANCELED = "ChildWorkflowExecutionCanceled"
    CHILD_WORKFLOW_EXECUTION_TIMED_OUT = "ChildWorkflowExecutionTimedOut"
    CHILD_WORKFLOW_EXECUTION_TERMINATED = "ChildWorkflowExecutionTerminated"
    SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED = "SignalExternalWorkflowExecutionInitiated"
    EXTERNAL_WORKFLOW_EXECUTION_SIGNALED = "ExternalWorkflowExecutionSignaled"
    SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_FAILED = "SignalExternalWorkflowExecutionFailed"


class RunStatus(StrEnum):
    """A run hash's ``status``."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    TERMINATED = "terminated"
    CONTINUED_AS_NEW = "continued_as_new"  # closed; the execution goes on in its next run
    CANCELED = "canceled"  # closed: the workflow ended on a cancellation it was asked for


class TaskState(StrEnum):
    """A run hash's ``wft``: where its workflow task is."""

    NONE = ""
    SCHEDULED = "scheduled"
    STARTED = "started"
    BACKOFF = "backoff"  # failed or timed out; a task_retry timer schedules it again


class ActivityState(StrEnum):
    """``st`` in an activity's state record."""

    SCHEDULED = "scheduled"
    STARTED = "started"
    BACKOFF = "backoff"


class CommandKind(StrEnum):
    """What a workflow task asks for; each becomes one history event."""

    SCHEDULE_ACTIVITY = "schedule_activity"
    START_TIMER = "start_timer"
    CANCEL_TIMER = "cancel_timer"
    CANCEL_ACTIVITY = "cancel_activity"
    COMPLETE_UPDATE = "complete_update"
    COMPLETE_WORKFLOW = "complete_workflow"
    FAIL_WORKFLOW = "fail_workflow"
    CONTINUE_AS_NEW = "continue_as_new"
    RECORD_MARKER = "record_marker"
    CANCEL_WORKFLOW = "cancel_workflow"
    START_CHILD = "start_child"
    SIGNAL_EXTERNAL = "signal_external"


class ParentClosePolicy(StrEnum):
    """What a parent's close does to a child still running (``pol`` of its record)."""

    TERMINATE = "terminate"
    ABANDON = "abandon"
    REQUEST_CANCEL = "request_cancel"


class OutboxKind(StrEnum):
    """The ``kind`` of an entry of a shard's outbox: an effect on another execution,
    which may live on another shard (see outbox_apply.lua)."""

    START_CHILD = "start_child"  # start a parent's child; the answer goes back to the parent
    CHILD_CLOSED = "child_closed"  # a child's outcome, for its parent
    TERMINATE = "terminate"  # a parent closed: its child (policy TERMINATE)
    CANCEL = "cancel"  # a parent closed: its child (policy REQUEST_CANCEL)
    SIGNAL = "signal"  # a workflow signals another execution; the answer goes back to it


class TimerKind(StrEnum):
    """The first part of a member of a shard's timers zset: ``<kind>|<run>|...``."""

    USER_TIMER = "timer"  # timer|run|seq: a workflow timer comes due
    ACTIVITY_DEADLINE = "act_deadline"  # act_deadline|run|seq|attempt: start-to-close or heartbeat
    SCHEDULE_TO_CLOSE = "act_s2c"  # act_s2c|run|seq: the activity's overall deadline
    ACTIVITY_RETRY = "act_retry"  # act_retry|run|seq|attempt: a backoff ends
    EXECUTION_TIMEOUT = "run_timeout"  # run_timeout|run: the execution timeout
    TASK_TIMEOUT = "wft_timeout"  # wft_timeout|run|fence: a started workflow task ran too long
    TASK_RETRY = "wft_retry"  # wft_retry|run: a failed or timed-out workflow task's backoff ends
    STICKY_FALLBACK = "wft_sticky"  # wft_sticky|run|message: its worker did not start it in time
    # msg_drop|run|message|stream (the stream's name after the shard's prefix): a task message
    # that stands for nothing any more, on a stream the script that found it could not touch
    MESSAGE_DROP = "msg_drop"


class Reply(StrEnum):
    """The first element of a script's reply (or of each item of a batch reply)."""

    OK = "ok"
    REFUSED = "refused"  # a fence or attempt that is no longer current; nothing was written
    AGAIN = "again"  # the task would close the run over a message it has not seen
    STALE = "stale"  # the task message no longer stands for anything; it was dropped
    BUSY = "busy"  # started by another worker, in flight
    RUNNING = "running"  # start: the execution id is taken by a running run
    INVALID = "invalid"  # an argument the script cannot use; nothing was written
    DUPLICATE = "duplicate"  # a request id seen before: delivered once already
    NOT_RUNNING = "not_running"
    NOT_FOUND = "not_found"
    ACCEPTED = "accepted"
    DONE = "done"
    RETRY = "retry"  # a failed attempt that will be retried
    GONE = "gone"  # the attempt is no longer current (timed out, cancelled, run closed)
    STARTED = "started"  # a speculative task could not be recorded as run: it was started instead
    REROUTE = "reroute"  # the keys declared are not the ones the state needs now; nothing was written
    MOVED = "moved"  # an update record: the update went on in another run (a reset), named in its outcome


class Overlap(StrEnum):
    """A schedule's ``overlap`` field: what a due time does while an earlier run of the
    schedule is open (the SDK's ScheduleOverlapPolicy, by name)."""

    SKIP = "skip"
    BUFFER_ONE = "buffer_one"
    BUFFER_ALL = "buffer_all"
    CANCEL_OTHER = "cancel_other"
    TERMINATE_OTHER = "terminate_other"
    ALLOW_ALL = "allow_all"


class ScheduleAction(StrEnum):
    """The ``k`` of an entry of a schedule's log (newest first; see sched_fire.lua)."""

    CREATED = "created"
    UPDATED = "updated"
    STARTED = "started"  # a due time's run started (`due`, `wid`, `run`, `how`)
    BUFFERED = "buffered"  # a due time waits for the open run to close
    SKIPPED = "skipped"  # a due time did not run (`why`; a range: `due` to `to`, `n` times)
    RUN_CLOSED = "run_closed"  # a run of the schedule ended (`wid`, `status`)
    CANCEL_REQUESTED = "cancel_requested"  # CANCEL_OTHER asked an open run to cancel
    TERMINATED_OTHER = "terminated_other"  # TERMINATE_OTHER ended an open run
    PAUSED = "paused"
    UNPAUSED = "unpaused"


ENUMS: dict[str, type[StrEnum]] = {
    "EV": EventType,
    "RS": RunStatus,
    "WT": TaskState,
    "AS": ActivityState,
    "CMD": CommandKind,
    "TK": TimerKind,
    "R": Reply,
    "PCP": ParentClosePolicy,
    "OB": OutboxKind,
    "OV": Overlap,
    "SA": ScheduleAction,
}
"""The Lua table name each enum is generated under."""

# A closed run's packed history names each event's type by its position here (from 1):
# stored, so members are only ever added at the end, never reordered or removed.
EVENT_CODES: tuple[EventType, ...] = tuple(EventType)

# Events written right after a WorkflowTaskCompleted, one per command of that task.
COMMAND_EVENTS = frozenset(
    {
        EventType.ACTIVITY_TASK_SCHEDULED,
        EventType.ACTIVITY_TASK_CANCEL_REQUESTED,
        EventType.TIMER_STARTED,
        EventType.TIMER_CANCELED,
        EventType.WORKFLOW_EXECUTION_COMPLETED,
        EventType.WORKFLOW_EXECUTION_FAILED,
        EventType.WORKFLOW_EXECUTION_UPDATE_COMPLETED,
        EventType.WORKFLOW_EXECUTION_CONTINUED_AS_NEW,
        EventType.MARKER_RECORDED,
        EventType.WORKFLOW_EXECUTION_CANCELED,
        EventType.START_CHILD_WORKFLOW_EXECUTION_INITIATED,
        EventType.SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED,
    }
)
# Events that close a run: the last of its history.
CLOSING_EVENTS = frozenset(
    {
        EventType.WORKFLOW_EXECUTION_COMPLETED,
        EventType.WORKFLOW_EXECUTION_FAILED,
        EventType.WORKFLOW_EXECUTION_TIMED_OUT,
        EventType.WORKFLOW_EXECUTION_TERMINATED,
        EventType.WORKFLOW_EXECUTION_CONTINUED_AS_NEW,
        EventType.WORKFLOW_EXECUTION_CANCELED,
    }
)
# Events that wake the workflow: the inputs of its next workflow task.
INPUT_EVENTS = frozenset(
    {
        EventType.WORKFLOW_EXECUTION_STARTED,
        EventType.WORKFLOW_EXECUTION_SIGNALED,
        EventType.WORKFLOW_EXECUTION_UPDATE_ACCEPTED,
        EventType.ACTIVITY_TASK_COMPLETED,
        EventType.ACTIVITY_TASK_FAILED,
        EventType.ACTIVITY_TASK_TIMED_OUT,
        EventType.TIMER_FIRED,
        EventType.WORKFLOW_EXECUTION_CANCEL_REQUESTED,
        EventType.START_CHILD_WORKFLOW_EXECUTION_FAILED,
        EventType.CHILD_WORKFLOW_EXECUTION_STARTED,
        EventType.CHILD_WORKFLOW_EXECUTION_COMPLETED,
        EventType.CHILD_WORKFLOW_EXECUTION_FAILED,
        EventType.CHILD_WORKFLOW_EXECUTION_CANCELED,
        EventType.CHILD_WORKFLOW_EXECUTION_TIMED_OUT,
        EventType.CHILD_WORKFLOW_EXECUTION_TERMINATED,
        EventType.EXTERNAL_WORKFLOW_EXECUTION_SIGNALED,
        EventType.SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_FAILED,
    }
)

# The event a parent's history gets when its child's execution closes with a status.
CHILD_CLOSED_EVENTS = {
    RunStatus.COMPLETED: EventType.CHILD_WORKFLOW_EXECUTION_COMPLETED,
    RunStatus.FAILED: EventType.CHILD_WORKFLOW_EXECUTION_FAILED,
    RunStatus.CANCELED: EventType.CHILD_WORKFLOW_EXECUTION_CANCELED,
    RunStatus.TIMED_OUT: EventType.CHILD_WORKFLOW_EXECUTION_TIMED_OUT,
    RunStatus.TERMINATED: EventType.CHILD_WORKFLOW_EXECUTION_TERMINATED,
}

# The longest timeout or interval anyone may give (ten years, in ms): longer is a
# mistake, and past the clock's range once added to now. The scripts get it as
# MAX_DURATION_MS (scripts.lua_constants), the SDK as rillflow.durations.MAX_DURATION.
MAX_DURATION_MS = 10 * 365 * 86_400_000

# How the workflow tasks completed now applied their events (sdk executor's
# _activation_order), recorded in each WorkflowTaskCompleted as `ord` so that a replay
# applies each task's events as that task did: 1, messages first; 2, messages and
# cancel requests first. Raised, never reused, when the order changes.
ACTIVATION_ORDER = 2
