"""The deterministic executor: each workflow instance runs on its own event loop.

The loop never runs by itself: a workflow task feeds it the new events, steps every
ready callback until all coroutines are blocked, and collects the commands they issued.
``call_later``/``call_at`` become durable timers, so ``asyncio.sleep``, ``wait_for``,
``gather`` and task groups behave in workflow code as users expect. Replaying a history
feeds the same events in the same groups and checks that the code issues the same
commands; any difference is a :class:`NonDeterminismError`, never silent divergence.
"""

from __future__ import annotations

import _thread
import asyncio
import asyncio.events as _events
import collections
import contextlib
import ctypes
import dataclasses
import datetime as _datetime
import functools
import inspect
import os
import random
import sys
import threading
import time
import types
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from rillflow.children import ChildWorkflowHandle, child_run_id, default_child_id
from rillflow.durations import MAX_DURATION, time_of_ms
from rillflow.errors import (
    ActivityError,
    ChildWorkflowError,
    ContinueAsNewError,
    InvalidInputError,
    InvalidResultError,
    NonDeterminismError,
    PayloadTooLargeError,
    RestrictedWorkflowAccessError,
    WorkflowError,
    closed_run_failure,
    exception_from_failure,
    failure_from_exception,
)
from rillflow.history import COMMAND_EVENTS, INPUT_EVENTS, HistoryEvent
from rillflow.payloads import check_size, to_wire
from rillflow_runtime.codec import pack
from rillflow_runtime.keyspace import startable_id
from rillflow_runtime.model import ACTIVATION_ORDER, CommandKind, EventType
from rillflow_runtime.model import ParentClosePolicy as WirePolicy

log = structlog.get_logger("rillflow.workflow")

if TYPE_CHECKING:
    from rillflow.activity import ActivityDefinition
    from rillflow.workflow import HandlerDefinition, WorkflowDefinition


@dataclass(frozen=True)
class WorkflowInfo:
    workflow_id: str
    run_id: str
    workflow_type: str
    task_queue: str
    start_time: datetime
    attempt: int = 1
    # the run's history as of the current workflow task: events, and bytes of their bodies
    history_length: int = 0
    history_size: int = 0
    # a schedule's run: the schedule, and the due time it runs for
    schedule_id: str | None = None
    scheduled_time: datetime | None = None


# When workflow.should_continue_as_new() turns true (Temporal's suggestion), and the
# hard limit, at which a task fails the run instead (enforced by lib.lua's HISTORY_MAX_*,
# which must say the same).
SUGGEST_CONTINUE_EVENTS = 4096
SUGGEST_CONTINUE_BYTES = 4 * 1024 * 1024
HISTORY_MAX_EVENTS = 51_200


@dataclass
class Command:
    kind: CommandKind
    body: bytes
    aux: list[Any]  # what the script reads (see wft_complete.lua)
    ident: tuple[Any, ...]  # what replay compares against the recorded event

    def scheduled_activity(self) -> tuple[int, str, str] | None:
        """(seq, name, task queue) of the activity this command schedules, if it does."""
        if self.kind is CommandKind.SCHEDULE_ACTIVITY:
            return int(self.aux[0]), str(self.ident[2]), str(self.aux[1])
        return None


def _handler_continued(h: HandlerDefinition) -> WorkflowError:
    return WorkflowError(
        f"{h.kind} handler '{h.name}' called workflow.continue_as_new(): only the entrypoint may. "
        "Set state in the handler and continue as new from the entrypoint"
    )


def _ident_of_event(ev: HistoryEvent) -> tuple[Any, ...]:
    a = ev.attributes
    match ev.type:
        case "ActivityTaskScheduled":
            return ("ScheduleActivity", a.get("seq"), a.get("name"))
        case "ActivityTaskCancelRequested":
            return ("CancelActivity", a.get("seq"))
        case "TimerStarted":
            return ("StartTimer", a.get("seq"))
        case "TimerCanceled":
            return ("CancelTimer", a.get("seq"))
        case "WorkflowExecutionCompleted":
            return ("CompleteWorkflow",)
        case "WorkflowExecutionFailed":
            return ("FailWorkflow",)
        case "WorkflowExecutionUpdateCompleted":
            return ("CompleteUpdate", a.get("update_id"))
        case "WorkflowExecutionContinuedAsNew":
            return ("ContinueAsNew",)
        case "WorkflowExecutionCanceled":
            return ("CancelWorkflow",)
        case "MarkerRecorded":
            return ("RecordMarker", a.get("marker"), a.get("id"))
        case "StartChildWorkflowExecutionInitiated":
            return ("StartChild", a.get("seq"), a.get("workflow_type"))
        case "SignalExternalWorkflowExecutionInitiated":
            return ("SignalExternal", a.get("seq"), a.get("name"))
    return (ev.type,)


class DurableTimer(asyncio.TimerHandle):
    """A timer recorded in the history (TimerStarted) and fired by the timer pump."""

    seq = 0


class QueryChangedStateError(WorkflowError):
    """A query handler did more than read: the instance it ran on must be dropped."""


class WorkflowTaskError(Exception):
    """Workflow code raised something that is not a workflow failure (a bug): the
    workflow task fails and is retried; the run stays open."""


_TEARDOWN_STEPS = 10_000


class InstanceTornDownError(asyncio.CancelledError):
    """Raised in workflow code that tries to schedule work (an activity, a timer, a
    condition) while its instance is torn down: the worker dropped the instance, so
    nothing may run or be recorded for it. A ``CancelledError``, as the teardown is a
    cancellation: ``except Exception`` in workflow code does not swallow it."""


class WorkflowLoop(asyncio.AbstractEventLoop):
    """An event loop that only runs when its instance steps it.

    It implements what coroutines, futures, tasks and timers use; I/O, subprocesses
    and signals stay abstract on purpose: workflow code must not use them."""

    def __init__(self, instance: WorkflowInstance) -> None:
        self.instance = instance
        self.ready: collections.deque[asyncio.Handle] = collections.deque()
        self._now = 0.0

    # the clock is the workflow task's time, the same on every replay
    def time(self) -> float:
        return self._now

    def call_soon(self, callback: Callable[..., Any], *args: Any, context: Any = None) -> asyncio.Handle:  # type: ignore[override]
        h = asyncio.Handle(callback, args, self, context)
        self.ready.append(h)
        return h

    def call_soon_threadsafe(  # type: ignore[override]
        self, callback: Callable[..., Any], *args: Any, context: Any = None
    ) -> asyncio.Handle:
        raise RuntimeError("threads are not allowed in workflow code; use an activity")

    def call_later(  # type: ignore[override]
        self, delay: float, callback: Callable[..., Any], *args: Any, context: Any = None
    ) -> asyncio.TimerHandle:
        return self.instance.start_timer(delay, callback, args, context)

    def call_at(  # type: ignore[override]
        self, when: float, callback: Callable[..., Any], *args: Any, context: Any = None
    ) -> asyncio.TimerHandle:
        return self.instance.start_timer(when - self._now, callback, args, context)

    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None:
        self.instance.cancel_timer(handle)

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.Future(loop=self)

    def create_task(self, coro: Any, *, name: str | None = None, context: Any = None) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=self, name=name, context=context)
        # Held until done: a pending task the GC collected (one waiting on a future nothing
        # else references) would have its coroutine closed outside the loop, running user
        # code (finally blocks) there, where an activity call is a plain inline call.
        self.instance._tasks[task] = None
        task.add_done_callback(self.instance._forget)
        return task

    def get_debug(self) -> bool:
        return False

    def is_running(self) -> bool:
        return True

    def is_closed(self) -> bool:
        return False

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if exc is not None and not isinstance(exc, asyncio.CancelledError):
            self.instance.note_background_error(exc)

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        self.call_exception_handler(context)

    def run_in_executor(self, executor: Any, func: Any, *args: Any) -> Any:  # type: ignore[override]
        raise RuntimeError("run_in_executor is not allowed in workflow code; use an activity")


# -- the determinism guard -----------------------------------------------------------------
# While a workflow task steps workflow code, the thread stepping it refuses what would make
# a replay differ (the wall clock, unseeded randomness) or block the worker (time.sleep,
# network, subprocesses, threads), with a message saying what to use instead. Activities,
# worker threads and the rest of the process are untouched, and nothing is installed until
# the process creates its first workflow instance (a client never pays for it).
#
# Two mechanisms, both armed only on the stepping thread and only while it steps:
# - audit events (sockets, subprocesses), raised by C code whatever Python called it;
# - a profile function (sys.setprofile, per thread) set while a workflow task runs
#   (see _arming) and removed after. It returns at once for every event but ``c_call``,
#   then looks the C function called up in _C_REFUSED. That catches ``datetime.now()`` however it was
#   imported (``datetime`` is an immutable C type: nothing can be patched on it),
#   ``time.time()``, the ``random`` module's functions (they all end in two C methods of
#   its hidden generator, never in those of ``workflow.random()``'s own), ``uuid.uuid4()``
#   and ``secrets`` (both end in ``os.urandom``), ``time.sleep`` and starting a thread.
_AUDIT_REFUSED = {
    "socket.connect": "network I/O belongs in an activity",
    "socket.getaddrinfo": "network I/O belongs in an activity",
    "subprocess.Popen": "subprocesses belong in an activity",
    "os.system": "subprocesses belong in an activity",
    "os.posix_spawn": "subprocesses belong in an activity",
    # Also caught by the profile function, first; these stay for when it is not set (a
    # profiler or debugger holds the hook) on the versions that raise them.
    "time.sleep": "time.sleep() blocks the worker; use `await workflow.sleep(...)`, a durable timer",
    "_thread.start_new_thread": "threads are not allowed in workflow code; use asyncio tasks or activities",
    "_thread.start_joinable_thread": "threads are not allowed in workflow code; use asyncio tasks or activities",
}
_CLOCK = "the wall clock differs on replay; use `workflow.now()`, the time of the workflow task"
_RANDOM = (
    "the `random` module's generator is not seeded from the run, so a replay draws other "
    "numbers; use `workflow.random()` (a `random.Random` seeded from the run)"
)
_URANDOM = "random bytes differ on replay; use `workflow.random()`, or `workflow.uuid4()` for ids"
_UUID = "a random uuid differs on replay; use `workflow.uuid4()`"
_SLEEP = "time.sleep() blocks the worker; use `await workflow.sleep(...)`, a durable timer"
_THREADS = "threads are not allowed in workflow code; use asyncio tasks or activities"
# C function -> (what the user called, why it is refused, whether log records may call it)
_C_REFUSED: dict[Any, tuple[str, str, bool]] = {}
# A log record's timestamp decides nothing: `logging` and `structlog` may read the clock.
_LOGGING = ("logging", "structlog")
# the modules whose functions end in a refused C call: name the function the user called
_WRAPPERS = frozenset({"random", "uuid", "secrets"})


class _Guard:
    thread: int | None = None  # the thread stepping workflow code, while it does
    suspended = 0  # inside workflow.unsafe.skip_determinism_enforcement()
    installed = False
    lock = threading.Lock()


def _refusal(what: str, why: str) -> RestrictedWorkflowAccessError:
    return RestrictedWorkflowAccessError(
        f"{what}: {why}. (Refused while a workflow task runs; "
        "`workflow.unsafe.skip_determinism_enforcement()` lifts this for a block.)"
    )


def _refuse(err: RestrictedWorkflowAccessError) -> None:
    """Raise ``err`` in workflow code, and fail the workflow task even if that code
    catches it: a swallowed refusal would still let the run diverge."""
    loop = _events._get_running_loop()
    if isinstance(loop, WorkflowLoop):
        loop.instance.note_background_error(err)
    raise err


def _audit(event: str, _args: tuple[Any, ...]) -> None:
    if event in _AUDIT_REFUSED and _Guard.thread == threading.get_ident() and not _Guard.suspended:
        _refuse(_refusal(event, _AUDIT_REFUSED[event]))


def _profile(frame: types.FrameType, event: str, arg: Any) -> None:
    # Called for every call and return on the stepping thread: keep the common path to
    # one comparison (and one dict lookup for C calls).
    if event != "c_call":
        return
    hit = _C_REFUSED.get(arg)
    if hit is not None and not _Guard.suspended:
        _refuse_c_call(frame, *hit)


def _refuse_c_call(frame: types.FrameType, what: str, why: str, logging_may: bool) -> None:
    """Refuse a C call the profile caught (rare: the cost of walking frames is paid only here)."""
    f: types.FrameType | None = frame
    outermost = None  # random.randint, uuid.uuid4, ...: the function workflow code called
    while f is not None and _module_of(f) in _WRAPPERS:
        outermost, f = f, f.f_back
    if logging_may:
        g: types.FrameType | None = frame
        while g is not None:
            if _module_of(g).split(".", 1)[0] in _LOGGING:
                return
            g = g.f_back
    if outermost is not None:
        module = _module_of(outermost)
        what = f"{module}.{outermost.f_code.co_name}()"
        if module == "uuid":
            why = _UUID
    _refuse(_refusal(what, why))


def _module_of(frame: types.FrameType) -> str:
    return str(frame.f_globals.get("__name__", ""))


def _install_guard() -> None:
    """Arm the process for the guard, once: the audit hook (which cannot be removed, so
    it waits for the first workflow instance) and the table of refused C functions."""
    if _Guard.installed:
        return
    with _Guard.lock:
        if _Guard.installed:
            return
        module_random: Any = random.random  # a method of the generator behind the module's functions
        hidden = module_random.__self__
        dt, date = _datetime.datetime, _datetime.date
        table: dict[Any, tuple[str, str, bool]] = {
            time.time: ("time.time()", _CLOCK, True),
            time.time_ns: ("time.time_ns()", _CLOCK, True),
            dt.now: ("datetime.now()", _CLOCK, True),
            dt.utcnow: ("datetime.utcnow()", _CLOCK, True),
            dt.today: ("datetime.today()", _CLOCK, True),
            date.today: ("date.today()", _CLOCK, True),
            hidden.random: ("random.random()", _RANDOM, True),
            hidden.getrandbits: ("random.getrandbits()", _RANDOM, True),
            os.urandom: ("os.urandom()", _URANDOM, True),
            time.sleep: ("time.sleep", _SLEEP, False),
        }
        # the other clocks: durations measured in workflow code differ on replay too
        for name in (
            "monotonic",
            "monotonic_ns",
            "perf_counter",
            "perf_counter_ns",
            "clock_gettime",
            "clock_gettime_ns",
        ):
            fn = getattr(time, name, None)
            if fn is not None:
                table[fn] = (f"time.{name}()", _CLOCK, True)
        if hasattr(os, "getrandom"):
            table[os.getrandom] = ("os.getrandom()", _URANDOM, True)
        for name in ("start_new_thread", "start_joinable_thread"):  # the latter from 3.13 on
            fn = getattr(_thread, name, None)
            if fn is not None:
                table[fn] = ("threading.Thread.start", _THREADS, False)
        _C_REFUSED.update(table)
        sys.addaudithook(_audit)
        _Guard.installed = True


@contextlib.contextmanager
def _arming(enforce: bool) -> Iterator[bool]:
    """Set the guard's profile function on this thread for the block (yields whether it
    did): not when the workflow opted out, nor when an enclosing block set it already,
    nor when a profiler or debugger holds the hook (the audit events still guard then).

    A workflow task sets it once for all the activations it replays and runs (run_task,
    replay): from Python 3.12 on, each change of the profile function makes the
    interpreter re-instrument every code object that runs next, the worker's own too."""
    if not enforce or sys.getprofile() is not None:
        yield False
        return
    sys.setprofile(_profile)
    try:
        yield True
    finally:
        sys.setprofile(None)


class _Unguarded:
    """The executor's own work inside a workflow task (encoding input, results and
    commands) runs with the guard's profile function off: it is not workflow code, and
    every call it makes would otherwise pay the profile's price (most of a small
    activation's cost). A class, not a generator: it is entered on the hot path."""

    __slots__ = ("armed",)

    def __enter__(self) -> None:
        self.armed = sys.getprofile() is _profile
        if self.armed:
            sys.setprofile(None)

    def __exit__(self, *exc: object) -> None:
        if self.armed:
            sys.setprofile(_profile)


class _Inside:
    """What :meth:`WorkflowInstance._inside` enters: a class, not a generator, as it is
    entered for every activation (the same steps as :func:`_arming`, inline)."""

    __slots__ = ("inst", "prev", "prev_armed", "prev_guard", "set_profile")

    def __init__(self, inst: WorkflowInstance) -> None:
        self.inst = inst

    def __enter__(self) -> None:
        inst = self.inst
        self.prev = _events._get_running_loop()
        _events._set_running_loop(inst.loop)
        self.prev_guard, self.prev_armed = _Guard.thread, inst._armed
        enforce = inst.defn.enforce_determinism
        if enforce:
            _Guard.thread = threading.get_ident()
        self.set_profile = enforce and sys.getprofile() is None
        inst._armed = self.set_profile
        if self.set_profile:
            sys.setprofile(_profile)

    def __exit__(self, *exc: object) -> None:
        try:
            if self.set_profile:
                sys.setprofile(None)
        finally:
            self.inst._armed = self.prev_armed
            _Guard.thread = self.prev_guard
            _events._set_running_loop(self.prev)


@contextlib.contextmanager
def skip_determinism_enforcement() -> Iterator[None]:
    _Guard.suspended += 1
    try:
        yield
    finally:
        _Guard.suspended -= 1


def current_instance() -> WorkflowInstance | None:
    loop = _events._get_running_loop()
    return loop.instance if isinstance(loop, WorkflowLoop) else None


def require_instance(what: str) -> WorkflowInstance:
    inst = current_instance()
    if inst is None:
        raise RuntimeError(f"{what} can only be called from workflow code")
    return inst


# Tasks that ignored their cancellation at teardown (see WorkflowInstance._abandon).
_ABANDONED: list[asyncio.Task[Any]] = []


class WorkflowInstance:
    """One run's live state: the user's object, its loop, its pending commands.

    The worker steps it with :func:`run_task` (or :func:`replay`, to answer a query) and
    calls :meth:`teardown` whenever it lets it go."""

    def __init__(self, defn: WorkflowDefinition, info: WorkflowInfo) -> None:
        _install_guard()
        self.defn = defn
        self.info = info
        self._tasks: dict[asyncio.Task[Any], None] = {}  # the loop's unfinished tasks, in order
        self.loop = WorkflowLoop(self)  # type: ignore[abstract]
        self.obj = defn.cls()
        self.commands: list[Command] = []
        self.activity_seq = 0
        self.timer_seq = 0
        self.activities: dict[int, tuple[asyncio.Future[Any], ActivityDefinition]] = {}
        self.timers: dict[int, DurableTimer] = {}
        self.conditions: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self.handlers_running = 0
        self.now_ms = 0
        self.replaying = False
        self.closed = False
        self.task_error: BaseException | None = None
        # Replaced by the run's own seed when WorkflowExecutionStarted is applied (see
        # _seed); this crc32 of the run id is only for histories recorded without one.
        self._seed_value = zlib.crc32(info.run_id.encode())
        self._random: random.Random | None = None  # made on first use: most runs never draw
        self.max_payload_bytes = 2 * 1024 * 1024
        self.torn_down = False
        self._tearing_down = False
        self._refused: set[asyncio.Task[Any]] = set()  # tasks refused once during teardown
        self._armed = False  # the guard's profile function is set by _inside
        self._issued = 0  # command-producing calls, issued or dropped (a query must make none)
        self._started: dict[str, Any] = {}  # the WorkflowExecutionStarted attributes
        # the history as the current task's start told it (see WorkflowInfo)
        self.history_length = 0
        self.history_size = 0
        self._main_task: asyncio.Task[None] | None = None
        self.cancel_requested: dict[str, Any] | None = None  # the cancel request's attributes
        self._patches: dict[str, bool] = {}  # each patch id's answer, fixed for the run
        self._markers_ahead: frozenset[str] = frozenset()  # the replayed task's recorded patches
        self.child_seq = 0
        self.children: dict[int, ChildWorkflowHandle[Any]] = {}  # started, not closed yet
        self.signal_seq = 0
        self.external_signals: dict[int, asyncio.Future[None]] = {}  # sent, not answered yet

    def restart(self) -> None:
        """Drop everything the instance ran and start over, as newly made for the same
        run (a replay that must be tried again: see replay)."""
        limit = self.max_payload_bytes
        self.teardown()
        self.__init__(self.defn, self.info)  # type: ignore[misc]
        self.max_payload_bytes = limit

    # -- driving ---------------------------------------------------------------------------
    def activate(
        self,
        events: list[HistoryEvent],
        now_ms: int,
        replaying: bool,
        markers: frozenset[str] = frozenset(),
        order: int = ACTIVATION_ORDER,
    ) -> list[Command]:
        """Apply one activation's events, step the workflow code until every coroutine
        waits, and return the commands it issued (none after the one that closes the run).

        Workflow code that raises a bug (an ``Exception`` that is not a workflow failure)
        makes this raise :class:`WorkflowTaskError`: the workflow task fails and is retried.

        ``KeyboardInterrupt`` and ``SystemExit`` raised while workflow code runs (Ctrl-C
        reaching the worker then, or ``sys.exit()`` in workflow code) are neither the
        run's outcome nor a bug of its code: they are never recorded, not as a failure of
        the run and not as a failure of its workflow task. They propagate from here as
        they would from anywhere else in the worker, which stops (or at least drops the
        instance, whose state is then undefined, and must :meth:`teardown` it); the
        workflow task, never completed, times out and a worker runs it again.

        ``markers``: on replay, the patch ids the task being replayed recorded (see
        :meth:`patched`). ``order``: how the events are applied (see
        :func:`_activation_order`): every live activation's is ACTIVATION_ORDER, a
        replayed one's the order its task recorded it ran in."""
        if self.torn_down:
            raise RuntimeError(f"workflow instance of run {self.info.run_id} was torn down")
        self.now_ms = now_ms
        self.loop._now = now_ms / 1000
        self.replaying = replaying
        self._markers_ahead = markers
        self.commands = []
        for ev in sorted(events, key=functools.partial(_activation_order, order)) if order else events:
            self._apply(ev)
        self._run_until_blocked()
        if self.task_error is not None:
            err, self.task_error = self.task_error, None
            raise WorkflowTaskError(f"{type(err).__name__}: {err}") from err
        return self.commands

    def _inside(self) -> _Inside:
        """Workflow code runs with this instance's loop current and, unless the workflow
        opted out, the determinism guard armed on this thread (see _profile)."""
        return _Inside(self)

    def _run_until_blocked(self) -> None:
        with self._inside():
            while True:
                while self.loop.ready and self.task_error is None:
                    h = self.loop.ready.popleft()
                    if not h._cancelled:
                        h._run()
                if self.task_error is not None or not self._check_conditions():
                    return

    def teardown(self) -> None:
        """Let the instance go without running anything for it. The worker calls this
        whenever it drops an instance: evicted from its cache, a completion refused or to
        be run again, a failed workflow task, a query's replay, shutdown.

        Every task of the instance's loop is cancelled inside that loop (the loop current,
        the guard armed, as when a workflow task steps it) with commands refused: the
        ``finally`` blocks and ``except CancelledError`` clauses run as workflow code, and
        anything in them that would schedule work (call an activity, start a timer, wait
        for a condition) raises :class:`InstanceTornDownError` there, so that nothing runs
        and nothing is recorded. The loop is stepped until nothing is ready. A task that
        swallows its cancellation and waits again is logged (a warning naming the
        workflow) and abandoned: never resumed, and referenced for good, so that the
        garbage collector never finalizes it into user code outside its loop.
        Idempotent; the instance is unusable afterwards.
        Call it on the thread that steps the instance, never from workflow code."""
        if self.torn_down or self._tearing_down:
            return
        if not any(not t.done() for t in self._tasks) and not self.loop.ready:
            self._release()  # nothing of it runs any more (a closed run): nothing to cancel
            return
        self._tearing_down = True
        self.commands = []
        try:
            with self._inside():
                cancelled: dict[asyncio.Task[Any], None] = {}
                while True:  # again for the tasks that finally blocks created
                    live = [
                        t
                        # every task of the loop: WorkflowLoop.create_task registers each
                        for t in list(self._tasks)
                        if not t.done() and t not in cancelled
                    ]
                    if not live:
                        break
                    for t in live:
                        cancelled[t] = None
                        t.cancel("the workflow instance is torn down")
                    self._drain()
                for t in cancelled:
                    if not t.done():
                        self._abandon(t)
        finally:
            self._release()

    def _release(self) -> None:
        self.torn_down = True
        self.task_error = None
        self.commands = []
        self.loop.ready.clear()
        self._tasks.clear()
        self.activities.clear()
        self.timers.clear()
        self.conditions.clear()
        self._refused.clear()

    def _drain(self) -> None:
        """Step every ready callback (teardown: errors of workflow code are not recorded).
        Bounded: code that keeps yielding (``while True: await asyncio.sleep(0)``) is left
        pending after that many steps, and abandoned."""
        steps = 0
        while self.loop.ready and steps < _TEARDOWN_STEPS:
            steps += 1
            h = self.loop.ready.popleft()
            if not h._cancelled:
                h._run()
            if self._armed and sys.getprofile() is None:
                sys.setprofile(_profile)  # a refusal unsets the profile function: set it again

    def _abandon(self, task: asyncio.Task[Any]) -> None:
        """A task that swallowed its cancellation and waits again is never resumed: not
        closed (GeneratorExit would run its code again, and a coroutine it awaits that
        ignored that would be finalized, running it once more, when its frame let go of
        it), but referenced for good, with one reference more than anything holds so that
        not even the interpreter's exit releases it. No collection ever finalizes it into
        user code outside its loop, where an activity call would be a plain inline call."""
        log.warning(
            "workflow code ignored its cancellation while its instance was torn down; "
            "abandoned (kept in memory for the life of the worker)",
            workflow=self.defn.name,
            execution_id=self.info.workflow_id,
            run_id=self.info.run_id,
            task=task.get_name(),
        )
        task._log_destroy_pending = False  # type: ignore[attr-defined]
        _ABANDONED.append(task)
        with contextlib.suppress(Exception):
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(task))

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._tasks.pop(task, None)

    def answer_query(self, h: HandlerDefinition, data: Any) -> Any:
        """Run a query handler on the current state; its result as wire data. A handler
        that tried to change the run (schedule anything) raises QueryChangedStateError:
        the instance is no longer the history's and must be dropped."""
        return h.sig.dump_result(self._read_only(h, h.method, f"query '{h.name}'", data))

    def validate_update(self, h: HandlerDefinition, data: Any) -> None:
        """Run update ``h``'s validator on the current state: whatever it raises rejects
        the update. Read-only, as a query is (QueryChangedStateError otherwise)."""
        if h.validator is not None:
            self._read_only(h, h.validator, f"the validator of update '{h.name}'", data)

    def _read_only(self, h: HandlerDefinition, method: str, what: str, data: Any) -> Any:
        if self.torn_down:
            raise RuntimeError(f"workflow instance of run {self.info.run_id} was torn down")
        args, kwargs = h.sig.decode_call(data)
        issued, ready, task_error = self._issued, len(self.loop.ready), self.task_error
        try:
            with self._inside():
                value = getattr(self.obj, method)(*args, **kwargs)
        except ContinueAsNewError:
            raise _handler_continued(h) from None
        finally:
            self.task_error = task_error  # a refusal of the guard fails the call, not the next task
        if inspect.isawaitable(value):
            with contextlib.suppress(Exception):
                value.close()  # type: ignore[attr-defined]
            raise QueryChangedStateError(f"{what} returned an awaitable: it must be a plain def")
        if self._issued != issued or len(self.loop.ready) != ready:
            raise QueryChangedStateError(
                f"{what} tried to change the workflow (it scheduled work): "
                f"{'a query' if method == h.method else 'a validator'} only reads state; use a "
                "signal to change it"
            )
        return value

    def _check_conditions(self) -> bool:
        fired = False
        for pair in list(self.conditions):
            fn, fut = pair
            if fut.done():
                self.conditions.remove(pair)
                continue
            try:
                ok = fn()
            except Exception as e:  # a bug; KeyboardInterrupt and the like leave activate()
                self.task_error = e
                return False
            if ok:
                self.conditions.remove(pair)
                fut.set_result(None)
                fired = True
        return fired

    def note_background_error(self, exc: BaseException) -> None:
        if self.task_error is None:
            self.task_error = exc

    # -- events ---------------------------------------------------------------------------
    def _apply(self, ev: HistoryEvent) -> None:
        a = ev.attributes
        if ev.type == "WorkflowExecutionStarted":
            self._started = a
            self._seed(a.get("seed"))
            if isinstance(a.get("schedule_id"), str):
                self.info = dataclasses.replace(
                    self.info, schedule_id=a["schedule_id"], scheduled_time=time_of_ms(a.get("scheduled_ms"))
                )
            self._main_task = self.loop.create_task(
                self._main(a.get("input")), name=f"workflow:{self.info.workflow_id}"
            )
            # held (for cancel), so never collected: its error is noted when it ends
            self._main_task.add_done_callback(self._main_ended)
        elif ev.type == "WorkflowExecutionCancelRequested":
            if self.cancel_requested is None:
                self.cancel_requested = dict(a)
                # after what is ready now (the entrypoint's first step among it), so that
                # the code is inside its entrypoint when CancelledError reaches it
                self.loop.call_soon(self._deliver_cancel)
        elif ev.type == "WorkflowExecutionSignaled":
            self._signal(str(a.get("name")), a.get("input"))
        elif ev.type == "WorkflowExecutionUpdateAccepted":
            self._update(str(a.get("update_id")), str(a.get("name")), a.get("input"))
        elif ev.type == "TimerFired":
            h = self.timers.pop(int(a["seq"]), None)
            if h is not None and not h.cancelled():
                h._scheduled = False  # type: ignore[attr-defined]
                self.loop.ready.append(h)
        elif ev.type in _CHILD_EVENTS:
            self._child_event(ev)
        elif ev.type in ("ActivityTaskCompleted", "ActivityTaskFailed", "ActivityTaskTimedOut"):
            pending = self.activities.pop(int(a["seq"]), None)
            if pending is None:
                return
            fut, adef = pending
            if fut.done():
                return
            if ev.type == "ActivityTaskCompleted":
                try:
                    fut.set_result(adef.sig.load_result(a.get("result")))
                except Exception as e:  # the result no longer fits the declared type
                    fut.set_exception(e)
            else:
                cause = exception_from_failure(a.get("failure") or {})
                att = int(a.get("att", 0))
                what = "timed out" if ev.type == "ActivityTaskTimedOut" else "failed"
                fut.set_exception(
                    ActivityError(
                        f"activity '{adef.name}' {what} after {att} attempt(s): "
                        f"{cause.type}: {cause.message}",
                        activity_name=adef.name,
                        attempt=att,
                        cause=cause,
                        timeout_type=(a.get("failure") or {}).get("timeout_type"),
                    )
                )

    def _child_event(self, ev: HistoryEvent) -> None:
        """A child's start or close, or the answer to a signal sent to another execution."""
        a = ev.attributes
        seq = int(a.get("seq", 0))
        if ev.type in ("ExternalWorkflowExecutionSignaled", "SignalExternalWorkflowExecutionFailed"):
            fut = self.external_signals.pop(seq, None)
            if fut is None or fut.done():
                return
            if ev.type == "ExternalWorkflowExecutionSignaled":
                fut.set_result(None)
            else:
                fut.set_exception(
                    WorkflowError(
                        f"signal not delivered: {a.get('why') or 'the execution is not running'}",
                        type="ExternalWorkflowNotRunning",
                    )
                )
            return
        h = self.children.get(seq)
        if h is None:
            return
        h.workflow_id = str(a.get("workflow_id") or h.workflow_id)
        if ev.type == "ChildWorkflowExecutionStarted":
            h.run_id = h.first_execution_run_id = str(a.get("run_id") or h.run_id)
            if not h.started.done():
                h.started.set_result(h)
            return
        del self.children[seq]
        if ev.type == "StartChildWorkflowExecutionFailed":
            why = str(a.get("why") or "it could not start")
            err = ChildWorkflowError(
                f"child workflow '{h.workflow_type}' did not start: {why}",
                workflow_type=h.workflow_type,
                execution_id=h.workflow_id,
                run_id=str(a.get("run_id") or ""),
                status="not_started",
                cause=WorkflowError(
                    why, type=_START_FAILURES.get(str(a.get("cause")), "ChildStartFailed"), non_retryable=True
                ),
            )
            h.started.set_exception(err)
            h.outcome.set_exception(err)
            return
        h.run_id = str(a.get("run_id") or h.run_id)
        if not h.started.done():
            h.started.set_result(h)
        if ev.type == "ChildWorkflowExecutionCompleted":
            try:
                value = h.defn.sig.load_result(a.get("result")) if h.defn else a.get("result")
            except Exception as e:  # the result no longer fits the declared type
                h.outcome.set_exception(e)
            else:
                h.outcome.set_result(value)
            return
        status = str(a.get("status") or "failed")
        cause = closed_run_failure(status, a)
        h.outcome.set_exception(
            ChildWorkflowError(
                f"child workflow '{h.workflow_type}' execution '{h.workflow_id}' {status.replace('_', ' ')}: "
                f"{cause.type}: {cause.message}",
                workflow_type=h.workflow_type,
                execution_id=h.workflow_id,
                run_id=h.run_id,
                status=status,
                cause=cause,
            )
        )

    def _seed(self, seed: Any) -> None:
        """``workflow.random()`` and ``workflow.uuid4()`` draw from the run's own seed: the
        random bytes (16, as msgpack bin) the client records under ``seed`` in
        WorkflowExecutionStarted, set before the entrypoint runs. Histories recorded
        before the client did so have none: they keep the generator ``__init__`` seeded
        from a crc32 of the run id, which their replays depend on (only 32 bits, so the
        sequences of two runs among ~100k collide)."""
        if isinstance(seed, bytes | bytearray) and seed:
            # as an int, every one of its 128 bits counts, without hashing the bytes
            self._seed_value = int.from_bytes(seed, "big")
            if self._random is not None:
                self._random.seed(self._seed_value)

    @property
    def random(self) -> random.Random:
        """The run's generator, seeded as :meth:`_seed` says; made when first drawn from
        (seeding one costs more than a small activation's workflow code)."""
        if self._random is None:
            self._random = random.Random(self._seed_value)
        return self._random

    def _main_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.loop.call_exception_handler({"exception": exc, "task": task})

    def _deliver_cancel(self) -> None:
        main = self._main_task
        if main is not None and not main.done() and not self._tearing_down:
            main.cancel("the workflow was asked to cancel")

    async def _main(self, data: Any) -> None:
        """The entrypoint. A WorkflowError or TimeoutError fails the run; any other
        ``Exception`` is a bug and fails the workflow task. Other BaseExceptions are not
        the workflow's outcome and pass: CancelledError (a cancelled workflow, or its
        teardown), GeneratorExit (its coroutine closed), KeyboardInterrupt and SystemExit
        (they leave :meth:`activate`, see there, and are never recorded)."""
        sig = self.defn.sig
        try:
            with _Unguarded():
                args = sig.decode_input(data)
            result = await getattr(self.obj, self.defn.entry_name)(*args)
            with _Unguarded():  # one block: each entry and exit costs the guard events
                try:
                    data = sig.dump_result(result)
                except InvalidResultError as e:
                    # Failing here would leave the run open until the code changes; the
                    # result is recorded as returned and the mismatch is said out loud.
                    if not self.replaying:
                        log.warning(
                            "workflow result does not match its return annotation; recorded as returned",
                            workflow=self.defn.name,
                            execution_id=self.info.workflow_id,
                            error=str(e),
                        )
                    data = sig.dump_unchecked(result)
                encoded = pack({"result": data})
        except (WorkflowError, TimeoutError) as e:
            self._close(
                CommandKind.FAIL_WORKFLOW, pack({"failure": failure_from_exception(e)}), ("FailWorkflow",)
            )
        except asyncio.CancelledError:
            # the cancellation a client asked for, let through by the code: the run ends
            # canceled (any other, the instance's teardown, is not the run's outcome)
            if self.cancel_requested is None or self._tearing_down:
                raise
            reason = str(self.cancel_requested.get("reason") or "canceled")
            self._close(CommandKind.CANCEL_WORKFLOW, pack({"reason": reason}), ("CancelWorkflow",))
            return
        except ContinueAsNewError as e:
            try:
                self._continue_as_new(e.params)
            except InvalidInputError as bad:  # (input that does not fit the entrypoint: a bug)
                # the task fails and is retried, as for any bug, until a deploy fixes it
                self.task_error = InvalidInputError(
                    f"workflow.continue_as_new() in workflow '{self.defn.name}' was given params that "
                    f"do not fit its entrypoint: {bad}"
                )
            except Exception as bad:
                self.task_error = bad
        except Exception as e:
            self.task_error = e
        else:
            check_size(encoded, self.max_payload_bytes, f"result of workflow '{self.defn.name}'")
            self._close(CommandKind.COMPLETE_WORKFLOW, encoded, ("CompleteWorkflow",))

    def _continue_as_new(self, params: Any) -> None:
        """Close the run with the command that starts the execution's next run: the same
        workflow on the same task queue, with ``params`` checked against the entrypoint
        as a start's input is, and a seed of its own. Its id is made here, so that a
        re-sent completion names the same run."""
        with _Unguarded():
            data = self.defn.sig.encode_input(params)
            body: dict[str, Any] = {
                "workflow_type": self.defn.name,
                "task_queue": self.info.task_queue,
                "input": data,
                "execution_timeout_ms": self._started.get("execution_timeout_ms"),
                "seed": os.urandom(16),
                "continued_from": self.info.run_id,
            }
            # (a schedule's execution stays its schedule's, for the same due time)
            for key in ("schedule_id", "scheduled_ms"):
                if self._started.get(key) is not None:
                    body[key] = self._started[key]
            start = pack(body)
            next_run = str(uuid.uuid4())
        check_size(start, self.max_payload_bytes, f"input of workflow '{self.defn.name}' (continue_as_new)")
        # (the script writes the closing event, which names the next run)
        self._close(CommandKind.CONTINUE_AS_NEW, start, ("ContinueAsNew",), [next_run])

    def _decode(self, kind: str, name: str, data: Any) -> tuple[HandlerDefinition, list[Any], dict[str, Any]]:
        """The handler and its arguments; InvalidInputError if there is no such handler
        or the input does not fit it (possible only for a sender that skipped the checks)."""
        h = self.defn.handler(kind, name)
        args, kwargs = h.sig.decode_call(data)
        return h, args, kwargs

    async def _call(self, h: HandlerDefinition, args: list[Any], kwargs: dict[str, Any]) -> Any:
        res = getattr(self.obj, h.method)(*args, **kwargs)
        return await res if inspect.isawaitable(res) else res

    def _signal(self, name: str, data: Any) -> None:
        """Run a signal's handler in history order. One that cannot run is dropped with
        a warning, as a client that knows the workflow never sends it."""
        try:
            h, args, kwargs = self._decode("signal", name, data)
        except InvalidInputError as e:
            if not self.replaying:
                log.warning("signal dropped", execution_id=self.info.workflow_id, signal=name, reason=str(e))
            return
        self.handlers_running += 1
        self.loop.create_task(self._handle(h, args, kwargs), name=f"signal:{name}")

    def _update(self, update_id: str, name: str, data: Any) -> None:
        """Run an update's handler in history order; its outcome becomes a command, so
        that the caller's answer is recorded and a replay reaches the same one."""
        try:
            h, args, kwargs = self._decode("update", name, data)
        except InvalidInputError as e:
            failure = {"failure": failure_from_exception(e)}
            self.loop.call_soon(self._complete_update, update_id, name, failure)
            return
        self.handlers_running += 1
        self.loop.create_task(self._run_update(h, update_id, args, kwargs), name=f"update:{name}")

    async def _run_update(
        self, h: HandlerDefinition, update_id: str, args: list[Any], kwargs: dict[str, Any]
    ) -> None:
        """A WorkflowError (or a result the annotation refuses) fails the update, not
        the run; any other Exception is a bug and fails the workflow task. Other
        BaseExceptions pass, as in :meth:`_main`."""
        try:
            outcome = {"result": h.sig.dump_result(await self._call(h, args, kwargs))}
        except (WorkflowError, InvalidResultError, TimeoutError) as e:
            outcome = {"failure": failure_from_exception(e)}
        except ContinueAsNewError:
            self.note_background_error(_handler_continued(h))
            return
        except Exception as e:
            self.note_background_error(e)
            return
        finally:
            self.handlers_running -= 1
        self._complete_update(update_id, h.name, outcome)

    def _complete_update(self, update_id: str, name: str, outcome: dict[str, Any]) -> None:
        if self.closed:  # the run closed first: the script tells the caller so
            return
        body = pack({"update_id": update_id, "name": name, **outcome})
        try:
            check_size(body, self.max_payload_bytes, f"result of update '{name}'")
        except PayloadTooLargeError as e:
            body = pack({"update_id": update_id, "name": name, "failure": failure_from_exception(e)})
        self._emit(Command(CommandKind.COMPLETE_UPDATE, body, [update_id], ("CompleteUpdate", update_id)))

    async def _handle(self, h: HandlerDefinition, args: list[Any], kwargs: dict[str, Any]) -> None:
        """A signal handler's errors count as the entrypoint's would: a WorkflowError
        fails the run, any other Exception (a bug) fails the workflow task. Other
        BaseExceptions pass, as in :meth:`_main`."""
        try:
            await self._call(h, args, kwargs)
        except (WorkflowError, TimeoutError) as e:
            self._close(
                CommandKind.FAIL_WORKFLOW, pack({"failure": failure_from_exception(e)}), ("FailWorkflow",)
            )
        except ContinueAsNewError:
            self.note_background_error(_handler_continued(h))
        except Exception as e:
            self.note_background_error(e)
        finally:
            self.handlers_running -= 1

    def _close(
        self, kind: CommandKind, body: bytes, ident: tuple[Any, ...], aux: list[Any] | None = None
    ) -> None:
        if self.closed or self._tearing_down:  # the run closes once
            return
        self._emit(Command(kind, body, aux or [], ident))
        self.closed = True

    # -- commands -------------------------------------------------------------------------
    def patched(self, patch_id: str, deprecated: bool) -> bool:
        """Whether the run takes the code path of patch ``patch_id`` (Temporal's model).
        Run for the first time, it does, and a marker recording that goes in the history;
        on replay, it does only if the task being replayed recorded that marker, so a run
        started before the patch keeps its old path. The answer is fixed for the run at
        its first call. A deprecated patch always takes the new path: its marker is
        recorded when run for the first time and matched on replay when there is one."""
        if not isinstance(patch_id, str) or not 0 < len(patch_id) <= 256:
            raise InvalidInputError(f"a patch id is a string of 1-256 characters, got {patch_id!r}")
        known = self._patches.get(patch_id)
        if known is not None:
            return known
        recorded = patch_id in self._markers_ahead
        taken = deprecated or not self.replaying or recorded
        if not self.replaying or recorded:
            body = pack({"marker": "patch", "id": patch_id, "deprecated": deprecated})
            self._emit(
                Command(CommandKind.RECORD_MARKER, body, [patch_id], ("RecordMarker", "patch", patch_id))
            )
        self._patches[patch_id] = taken
        return taken

    def _emit(self, cmd: Command) -> None:
        """Issue a command. None once the run closed: wft_complete.lua records nothing
        after the closing command, so what a signal or update handler still issues in the
        same activation (live, or on replay alike) is dropped here, and the run must not
        count on it. None while torn down either."""
        self._issued += 1
        if not self.closed and not self._tearing_down:
            self.commands.append(cmd)

    def _park(self) -> bool:
        """During teardown: whether the asking task was refused once already. A task
        that caught the refusal and asks again (``except CancelledError: continue``)
        would spin without ever yielding, freezing the worker: it gets something that
        never completes instead, parks, and is abandoned."""
        task = asyncio.current_task()
        if task is None:
            return False
        if task in self._refused:
            return True
        self._refused.add(task)
        return False

    def _torn_down(self, what: str) -> InstanceTornDownError:
        return InstanceTornDownError(
            f"{what} refused: workflow '{self.defn.name}' execution '{self.info.workflow_id}' "
            f"(run {self.info.run_id}) is being torn down (its worker dropped this instance), "
            "so nothing runs or is recorded for it"
        )

    def schedule_activity(
        self, adef: ActivityDefinition, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> asyncio.Future[Any]:
        if self._tearing_down:
            if self._park():
                return self.loop.create_future()
            raise self._torn_down(f"activity '{adef.name}'")
        if self.closed:  # never issued, so never resolved: the run is over
            self._issued += 1
            return self.loop.create_future()
        o = adef.options
        tq = o.task_queue or self.info.task_queue
        with _Unguarded():
            data = adef.sig.encode_call(args, kwargs)
            body = pack(
                {"seq": self.activity_seq + 1, "name": adef.name, "input": data, "task_queue": tq, **o.wire()}
            )
            check_size(body, self.max_payload_bytes, f"input of activity '{adef.name}'")
        self.activity_seq += 1
        seq = self.activity_seq
        aux = [seq, tq, *o.aux()]
        fut: asyncio.Future[Any] = self.loop.create_future()
        self.activities[seq] = (fut, adef)
        self._emit(Command(CommandKind.SCHEDULE_ACTIVITY, body, aux, ("ScheduleActivity", seq, adef.name)))

        def on_done(f: asyncio.Future[Any]) -> None:
            if f.cancelled() and self.activities.pop(seq, None) is not None:
                self._emit(
                    Command(CommandKind.CANCEL_ACTIVITY, pack({"seq": seq}), [seq], ("CancelActivity", seq))
                )

        fut.add_done_callback(on_done)
        return fut

    def start_child(
        self,
        defn: WorkflowDefinition | None,
        workflow_type: str,
        params: Any,
        timeout_ms: int,
        execution_id: str | None,
        policy: WirePolicy,
    ) -> ChildWorkflowHandle[Any]:
        """Issue a child's start (see rillflow.children); its handle resolves as the
        parent's history records the child's start and close."""
        seq = self.child_seq + 1
        wid = (
            default_child_id(self.info.workflow_id, self.info.run_id, seq)
            if execution_id is None
            else execution_id
        )
        if not startable_id(wid):
            raise InvalidInputError(
                f"child execution id {wid!r} is invalid: use 1-256 letters, digits, '_', '-', '.', '@' "
                "(and not the shape of a schedule's run, <schedule id>@<time>Z, which only schedules start)"
            )
        handle: ChildWorkflowHandle[Any] = ChildWorkflowHandle(
            self, seq, workflow_type, wid, child_run_id(self.info.run_id, seq), defn
        )
        if self._tearing_down:
            if self._park():
                return handle
            raise self._torn_down(f"child workflow '{workflow_type}'")
        if self.closed:  # never issued, so never resolved: the run is over
            self._issued += 1
            return handle
        with _Unguarded():
            try:
                data = (
                    defn.sig.encode_input(params)
                    if defn
                    else to_wire(params, f"input of workflow '{workflow_type}'")
                )
            except InvalidInputError as e:  # (a bug in the parent's code: its task fails until fixed)
                raise InvalidInputError(f"child workflow '{workflow_type}': {e}") from None
            body = pack(
                {
                    "seq": seq,
                    "workflow_id": wid,
                    "run_id": handle.run_id,
                    "workflow_type": workflow_type,
                    "task_queue": self.info.task_queue,
                    "input": data,
                    "execution_timeout_ms": timeout_ms,
                    "parent_close_policy": policy.value,
                    "seed": os.urandom(16),
                }
            )
        check_size(body, self.max_payload_bytes, f"input of child workflow '{workflow_type}'")
        self.child_seq = seq
        self.children[seq] = handle
        self._emit(
            Command(
                CommandKind.START_CHILD,
                body,
                [seq, wid, handle.run_id, policy.value],
                ("StartChild", seq, workflow_type),
            )
        )
        return handle

    def signal_external(
        self, workflow_id: str, defn: WorkflowDefinition | None, name: str, payload: Any
    ) -> asyncio.Future[None]:
        """Signal another execution (a child) through the outbox; resolved when the
        parent's history records that it was delivered, or why not."""
        fut: asyncio.Future[None] = self.loop.create_future()
        if self._tearing_down:
            if self._park():
                return fut
            raise self._torn_down(f"signal '{name}'")
        if self.closed:
            self._issued += 1
            return fut
        with _Unguarded():
            h = defn.handler("signal", name) if defn else None
            data = h.sig.encode_input(payload) if h else to_wire(payload, f"signal '{name}'")
            # (seq and target in the initiating event too: a replay matches the command by them)
            seq = self.signal_seq + 1
            body = pack({"name": name, "input": data, "seq": seq, "workflow_id": workflow_id})
        check_size(body, self.max_payload_bytes, f"signal '{name}'")
        self.signal_seq = seq
        self.external_signals[seq] = fut
        self._emit(
            Command(CommandKind.SIGNAL_EXTERNAL, body, [seq, workflow_id, ""], ("SignalExternal", seq, name))
        )
        return fut

    def start_timer(
        self, delay: float, callback: Callable[..., Any], args: tuple[Any, ...], context: Any
    ) -> asyncio.TimerHandle:
        when = self.loop._now + max(delay, 0.0)
        h = DurableTimer(when, callback, args, self.loop, context)
        if delay > 0 and self._tearing_down:
            if self._park():
                return h  # never scheduled: never fires
            raise self._torn_down("a timer")
        if delay <= 0:
            self.loop.ready.append(h)
            return h
        if self.closed:  # never issued, so never fired: the run is over
            self._issued += 1
            return h
        if not delay <= MAX_DURATION.total_seconds():  # NaN too (raised at the code's await: a bug)
            raise InvalidInputError(
                f"a timer of {delay:g} s in workflow '{self.defn.name}' is longer than the "
                f"{MAX_DURATION.days} days a timer may wait"
            )
        self.timer_seq += 1
        seq = self.timer_seq
        ms = max(1, round(delay * 1000))
        h._scheduled = True  # type: ignore[attr-defined]
        h.seq = seq
        self.timers[seq] = h
        self._emit(
            Command(
                CommandKind.START_TIMER, pack({"seq": seq, "duration_ms": ms}), [seq, ms], ("StartTimer", seq)
            )
        )
        return h

    def cancel_timer(self, h: asyncio.TimerHandle) -> None:
        seq = h.seq if isinstance(h, DurableTimer) else 0
        if seq and self.timers.pop(seq, None) is not None:
            self._emit(Command(CommandKind.CANCEL_TIMER, pack({"seq": seq}), [seq], ("CancelTimer", seq)))

    def wait_condition(self, fn: Callable[[], bool]) -> asyncio.Future[None]:
        if self._tearing_down:
            if self._park():
                return self.loop.create_future()
            raise self._torn_down("workflow.wait_condition()")
        fut: asyncio.Future[None] = self.loop.create_future()
        self.conditions.append((fn, fut))
        return fut

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.now_ms / 1000, tz=UTC)

    def uuid4(self) -> uuid.UUID:
        return uuid.UUID(int=self.random.getrandbits(128), version=4)


# why a child did not start (StartChildWorkflowExecutionFailed's cause), as the type of
# the ChildWorkflowError's cause
_START_FAILURES = {"already_running": "WorkflowAlreadyStarted", "not_registered": "WorkflowNotRegistered"}
_MESSAGES = frozenset({"WorkflowExecutionSignaled", "WorkflowExecutionUpdateAccepted"})
_CHILD_EVENTS = frozenset(
    {
        "ChildWorkflowExecutionStarted",
        "StartChildWorkflowExecutionFailed",
        "ChildWorkflowExecutionCompleted",
        "ChildWorkflowExecutionFailed",
        "ChildWorkflowExecutionCanceled",
        "ChildWorkflowExecutionTimedOut",
        "ChildWorkflowExecutionTerminated",
        "ExternalWorkflowExecutionSignaled",
        "SignalExternalWorkflowExecutionFailed",
    }
)
_CANCEL = "WorkflowExecutionCancelRequested"


def _activation_order(order: int, ev: HistoryEvent) -> int:
    """Within one activation: the start, then signals and updates (each kind in history
    order), then what resolves the code's awaits. A handler's task is created before the
    code resumes, so the code sees every message its task delivered before it goes on;
    otherwise a run resuming on an activity's result could return (or continue as new)
    without the signal recorded beside that result, as Temporal's activations order
    their jobs too. From order 2 on, a cancel request comes with the messages: the code
    gets CancelledError at the await it is at, instead of resuming on a result beside the
    request and closing (or continuing as new) without seeing it. Order 0 is history
    order, as tasks ran before orders existed. Each WorkflowTaskCompleted records its
    task's order as ``ord`` (see record_task in lib.lua), and a replay applies that one."""
    if ev.type == "WorkflowExecutionStarted":
        return 0
    return 1 if ev.type in _MESSAGES or (order >= 2 and ev.type == _CANCEL) else 2


def run_task(
    instance: WorkflowInstance,
    events: list[HistoryEvent],
    now_ms: int,
    *,
    fresh: bool,
    history: tuple[int, int] = (0, 0),
) -> list[Command]:
    """Apply a workflow task's events and return the new commands.

    ``fresh``: ``events`` is the whole history, replayed activation by activation (each
    WorkflowTaskCompleted closes one; the command events after it must match what the
    code issues) before the live activation. Otherwise the instance is cached and
    ``events`` are just the new inputs. ``history``: the history's length and size as
    the task's start tells them (workflow.info()); a replayed activation sees them as
    they were then.
    """
    if not fresh:
        instance.history_length, instance.history_size = history
        return instance.activate([e for e in events if e.type in INPUT_EVENTS], now_ms, False)
    if not any(e.type == EventType.WORKFLOW_TASK_COMPLETED for e in events):
        # nothing to replay: the guard is armed only while workflow code is stepped
        instance.history_length, instance.history_size = history
        return instance.activate([e for e in events if e.type in INPUT_EVENTS], now_ms, False)
    with _arming(instance.defn.enforce_determinism):  # once for all the activations it replays
        pending = replay(instance, events)
        instance.history_length, instance.history_size = history
        return instance.activate(pending, now_ms, False)


def replay(instance: WorkflowInstance, events: list[HistoryEvent]) -> list[HistoryEvent]:
    """Replay every activation the history records (each ends at a WorkflowTaskCompleted
    and the command events after it must match what the code issues); returns the input
    events no workflow task has seen yet.

    A task recorded without ``ord`` ran in one of two orders: messages first (order 1,
    the releases just before ``ord``), or history order (0, the ones before those). Such
    a history is replayed in order 1 and, should that not reproduce it, once more from
    the start in order 0 (the instance restarted); if neither does, the error of the
    attempt that got further is raised."""
    if not any(e.type == EventType.WORKFLOW_TASK_COMPLETED and not e.attributes.get("ord") for e in events):
        return _replay(instance, events, 1)
    try:
        return _replay(instance, events, 1)
    except (NonDeterminismError, WorkflowTaskError) as first:
        instance.restart()
        try:
            return _replay(instance, events, 0)
        except (NonDeterminismError, WorkflowTaskError) as second:
            # the attempt that replayed further is the one whose error names the change
            reached = [getattr(e, "replayed_to", 0) for e in (first, second)]
            raise (second if reached[1] > reached[0] else first) from None


def _replay(instance: WorkflowInstance, events: list[HistoryEvent], unordered: int) -> list[HistoryEvent]:
    """``unordered``: the order of the tasks that recorded none (see replay)."""
    pending: list[HistoryEvent] = []
    i, n = 0, len(events)
    size = 0  # the bytes of the events' bodies before events[i]
    with _arming(instance.defn.enforce_determinism):  # once for all its activations
        while i < n:
            ev = events[i]
            if ev.type == "WorkflowTaskCompleted":
                # the task started when its WorkflowTaskCompleted was the next event to come
                instance.history_length, instance.history_size = ev.event_id - 1, size
                size += ev.size
                j = i + 1
                recorded: list[HistoryEvent] = []
                while j < n and events[j].type in COMMAND_EVENTS:
                    recorded.append(events[j])
                    size += events[j].size
                    j += 1
                # the patches this task took: known before its code runs (see patched())
                markers = frozenset(
                    str(e.attributes.get("id"))
                    for e in recorded
                    if e.type == EventType.MARKER_RECORDED and e.attributes.get("marker") == "patch"
                )
                t0 = int(ev.attributes.get("t0") or ev.time_ms)
                order = int(ev.attributes.get("ord") or unordered)
                try:
                    cmds = instance.activate(pending, t0, True, markers, order)
                    pending = []
                    _check_replay(instance, cmds, recorded)
                except (NonDeterminismError, WorkflowTaskError) as e:
                    setattr(e, "replayed_to", ev.event_id)  # noqa: B010  # (see replay)
                    raise
                i = j
                continue
            if ev.type in INPUT_EVENTS:
                pending.append(ev)
            size += ev.size
            i += 1
    return pending


def _check_replay(inst: WorkflowInstance, cmds: list[Command], recorded: list[HistoryEvent]) -> None:
    # a patch marker the code no longer asks about is passed over: the patch's call was
    # removed once every run that needed its old path had closed (deprecate_patch, then
    # nothing); the commands around it are compared as usual
    issued = {c.ident for c in cmds}
    recorded = [e for e in recorded if e.type != EventType.MARKER_RECORDED or _ident_of_event(e) in issued]
    for k in range(max(len(cmds), len(recorded))):
        want = _ident_of_event(recorded[k]) if k < len(recorded) else None
        got = cmds[k].ident if k < len(cmds) else None
        if want != got:
            at = recorded[k].event_id if k < len(recorded) else (recorded[-1].event_id if recorded else 0)
            raise NonDeterminismError(
                f"workflow '{inst.defn.name}' execution '{inst.info.workflow_id}' "
                f"(run {inst.info.run_id}) is not deterministic: at event {at} the history "
                f"has {_show(want)} but the code now issues {_show(got)}. Deploy the code "
                "the run started with, guard the change with workflow.patched(), or reset the "
                "execution to a workflow task before that event (rillflow reset)."
            )


def _show(ident: tuple[Any, ...] | None) -> str:
    if ident is None:
        return "nothing"
    name, *rest = ident
    return f"{name}({', '.join(repr(r) for r in rest)})" if rest else name
