"""The deterministic executor: each workflow instance runs on its own event loop.

The loop never runs by itself: a workflow task feeds it the new events, steps every
ready callback until all coroutines are blocked, and collects the commands they issued.
``call_later``/``call_at`` become durable timers, so ``asyncio.sleep``, ``wait_for``,
``gather`` and task groups behave in workflow code as users expect. Replaying a history
feeds the same events in the same groups and checks that the code issues the same
commands; any difference is a :class:`NonDeterminismError`, never silent divergence.
"""

from __future__ import annotations

import asyncio
import asyncio.events as _events
import collections
import contextlib
import functools
import inspect
import random
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from rillflow.errors import (
    ActivityError,
    InvalidInputError,
    InvalidResultError,
    NonDeterminismError,
    PayloadTooLargeError,
    RestrictedWorkflowAccessError,
    WorkflowError,
    exception_from_failure,
    failure_from_exception,
)
from rillflow.history import COMMAND_EVENTS, INPUT_EVENTS, HistoryEvent
from rillflow.payloads import check_size
from rillflow_runtime.codec import pack
from rillflow_runtime.model import CommandKind

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


@dataclass
class Command:
    kind: CommandKind
    body: bytes
    aux: list[Any]  # what the script reads (see wft_complete.lua)
    ident: tuple[Any, ...]  # what replay compares against the recorded event


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
    return (ev.type,)


class DurableTimer(asyncio.TimerHandle):
    """A timer recorded in the history (TimerStarted) and fired by the timer pump."""

    seq = 0


class QueryChangedStateError(WorkflowError):
    """A query handler did more than read: the instance it ran on must be dropped."""


class WorkflowTaskError(Exception):
    """Workflow code raised something that is not a workflow failure (a bug): the
    workflow task fails and is retried; the run stays open."""


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
        return asyncio.Task(coro, loop=self, name=name, context=context)

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
# While a workflow task steps workflow code, these audit events (on that thread only) are
# refused with a message saying what to use instead. Activities, worker threads and the
# rest of the process are untouched.
_REFUSED = {
    "time.sleep": "time.sleep() blocks the worker; use `await workflow.sleep(...)`, a durable timer",
    "socket.connect": "network I/O belongs in an activity",
    "socket.getaddrinfo": "network I/O belongs in an activity",
    "subprocess.Popen": "subprocesses belong in an activity",
    "os.system": "subprocesses belong in an activity",
    "os.posix_spawn": "subprocesses belong in an activity",
    "_thread.start_new_thread": "threads are not allowed in workflow code; use asyncio tasks or activities",
}


class _Guard:
    thread: int | None = None  # the thread stepping workflow code, while it does
    suspended = 0  # inside workflow.unsafe.skip_determinism_enforcement()


def _audit(event: str, _args: tuple[Any, ...]) -> None:
    if event in _REFUSED and _Guard.thread == threading.get_ident() and not _Guard.suspended:
        raise RestrictedWorkflowAccessError(
            f"{event}: {_REFUSED[event]}. (Refused while a workflow task runs; "
            "`workflow.unsafe.skip_determinism_enforcement()` lifts this for a block.)"
        )


def _guarded(event: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """For calls Python 3.11 raises no audit event for."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if _Guard.thread is not None:
            _audit(event, args)
        return fn(*args, **kwargs)

    return call


sys.addaudithook(_audit)
time.sleep = _guarded("time.sleep", time.sleep)
threading.Thread.start = _guarded("_thread.start_new_thread", threading.Thread.start)  # type: ignore[method-assign]


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


class WorkflowInstance:
    """One run's live state: the user's object, its loop, its pending commands."""

    def __init__(self, defn: WorkflowDefinition, info: WorkflowInfo) -> None:
        self.defn = defn
        self.info = info
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
        self.random = random.Random(zlib.crc32(info.run_id.encode()))
        self.max_payload_bytes = 2 * 1024 * 1024

    # -- driving ---------------------------------------------------------------------------
    def activate(self, events: list[HistoryEvent], now_ms: int, replaying: bool) -> list[Command]:
        self.now_ms = now_ms
        self.loop._now = now_ms / 1000
        self.replaying = replaying
        self.commands = []
        for ev in events:
            self._apply(ev)
        self._run_until_blocked()
        if self.task_error is not None:
            err, self.task_error = self.task_error, None
            raise WorkflowTaskError(f"{type(err).__name__}: {err}") from err
        return self.commands

    @contextlib.contextmanager
    def _inside(self) -> Iterator[None]:
        """Workflow code runs with this instance's loop current and the guard on."""
        prev = _events._get_running_loop()
        _events._set_running_loop(self.loop)
        prev_guard = _Guard.thread
        if self.defn.enforce_determinism:
            _Guard.thread = threading.get_ident()
        try:
            yield
        finally:
            _Guard.thread = prev_guard
            _events._set_running_loop(prev)

    def _run_until_blocked(self) -> None:
        with self._inside():
            while True:
                while self.loop.ready and self.task_error is None:
                    h = self.loop.ready.popleft()
                    if not h._cancelled:
                        h._run()
                if self.task_error is not None or not self._check_conditions():
                    return

    def answer_query(self, h: HandlerDefinition, data: Any) -> Any:
        """Run a query handler on the current state; its result as wire data. A handler
        that tried to change the run (schedule anything) raises QueryChangedStateError:
        the instance is no longer the history's and must be dropped."""
        args, kwargs = h.sig.decode_call(data)
        commands, ready = len(self.commands), len(self.loop.ready)
        with self._inside():
            value = getattr(self.obj, h.method)(*args, **kwargs)
        if inspect.isawaitable(value):
            with contextlib.suppress(Exception):
                value.close()  # type: ignore[attr-defined]
            raise QueryChangedStateError(
                f"query '{h.name}' returned an awaitable: a query handler is a plain def"
            )
        if len(self.commands) != commands or len(self.loop.ready) != ready:
            raise QueryChangedStateError(
                f"query '{h.name}' tried to change the workflow (it scheduled work): "
                "a query only reads state; use a signal to change it"
            )
        return h.sig.dump_result(value)

    def _check_conditions(self) -> bool:
        fired = False
        for pair in list(self.conditions):
            fn, fut = pair
            if fut.done():
                self.conditions.remove(pair)
                continue
            try:
                ok = fn()
            except BaseException as e:
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
            self.loop.create_task(self._main(a.get("input")), name=f"workflow:{self.info.workflow_id}")
        elif ev.type == "WorkflowExecutionSignaled":
            self._signal(str(a.get("name")), a.get("input"))
        elif ev.type == "WorkflowExecutionUpdateAccepted":
            self._update(str(a.get("update_id")), str(a.get("name")), a.get("input"))
        elif ev.type == "TimerFired":
            h = self.timers.pop(int(a["seq"]), None)
            if h is not None and not h.cancelled():
                h._scheduled = False  # type: ignore[attr-defined]
                self.loop.ready.append(h)
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

    async def _main(self, data: Any) -> None:
        sig = self.defn.sig
        try:
            args = sig.decode_input(data)
            result = await getattr(self.obj, self.defn.entry_name)(*args)
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
            self._close(CommandKind.FAIL_WORKFLOW, pack({"failure": failure_from_exception(e)}), ("FailWorkflow",))
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            self.task_error = e
        else:
            check_size(encoded, self.max_payload_bytes, f"result of workflow '{self.defn.name}'")
            self._close(CommandKind.COMPLETE_WORKFLOW, encoded, ("CompleteWorkflow",))

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
        the run; anything else is a bug and fails the workflow task."""
        try:
            outcome = {"result": h.sig.dump_result(await self._call(h, args, kwargs))}
        except (WorkflowError, InvalidResultError, TimeoutError) as e:
            outcome = {"failure": failure_from_exception(e)}
        except asyncio.CancelledError:
            raise
        except BaseException as e:
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
        self.commands.append(Command(CommandKind.COMPLETE_UPDATE, body, [update_id], ("CompleteUpdate", update_id)))

    async def _handle(self, h: HandlerDefinition, args: list[Any], kwargs: dict[str, Any]) -> None:
        """A signal handler's errors count as the entrypoint's would: a WorkflowError
        fails the run, anything else (a bug) fails the workflow task."""
        try:
            await self._call(h, args, kwargs)
        except (WorkflowError, TimeoutError) as e:
            if not self.closed:
                self._close(CommandKind.FAIL_WORKFLOW, pack({"failure": failure_from_exception(e)}), ("FailWorkflow",))
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            self.note_background_error(e)
        finally:
            self.handlers_running -= 1

    def _close(self, kind: CommandKind, body: bytes, ident: tuple[Any, ...]) -> None:
        self.closed = True
        self.commands.append(Command(kind, body, [], ident))

    # -- commands -------------------------------------------------------------------------
    def schedule_activity(
        self, adef: ActivityDefinition, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> asyncio.Future[Any]:
        data = adef.sig.encode_call(args, kwargs)
        self.activity_seq += 1
        seq = self.activity_seq
        o = adef.options
        tq = o.task_queue or self.info.task_queue
        body = pack({"seq": seq, "name": adef.name, "input": data, "task_queue": tq, **o.wire()})
        check_size(body, self.max_payload_bytes, f"input of activity '{adef.name}'")
        aux = [seq, tq, *o.aux()]
        fut: asyncio.Future[Any] = self.loop.create_future()
        self.activities[seq] = (fut, adef)
        self.commands.append(Command(CommandKind.SCHEDULE_ACTIVITY, body, aux, ("ScheduleActivity", seq, adef.name)))

        def on_done(f: asyncio.Future[Any]) -> None:
            if f.cancelled() and self.activities.pop(seq, None) is not None:
                self.commands.append(Command(CommandKind.CANCEL_ACTIVITY, pack({"seq": seq}), [seq], ("CancelActivity", seq)))

        fut.add_done_callback(on_done)
        return fut

    def start_timer(
        self, delay: float, callback: Callable[..., Any], args: tuple[Any, ...], context: Any
    ) -> asyncio.TimerHandle:
        when = self.loop._now + max(delay, 0.0)
        h = DurableTimer(when, callback, args, self.loop, context)
        if delay <= 0:
            self.loop.ready.append(h)
            return h
        self.timer_seq += 1
        seq = self.timer_seq
        ms = max(1, round(delay * 1000))
        h._scheduled = True  # type: ignore[attr-defined]
        h.seq = seq
        self.timers[seq] = h
        self.commands.append(
            Command(CommandKind.START_TIMER, pack({"seq": seq, "duration_ms": ms}), [seq, ms], ("StartTimer", seq))
        )
        return h

    def cancel_timer(self, h: asyncio.TimerHandle) -> None:
        seq = h.seq if isinstance(h, DurableTimer) else 0
        if seq and self.timers.pop(seq, None) is not None:
            self.commands.append(Command(CommandKind.CANCEL_TIMER, pack({"seq": seq}), [seq], ("CancelTimer", seq)))

    def wait_condition(self, fn: Callable[[], bool]) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = self.loop.create_future()
        self.conditions.append((fn, fut))
        return fut

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.now_ms / 1000, tz=UTC)

    def uuid4(self) -> uuid.UUID:
        return uuid.UUID(int=self.random.getrandbits(128), version=4)


def run_task(
    instance: WorkflowInstance,
    events: list[HistoryEvent],
    now_ms: int,
    *,
    fresh: bool,
) -> list[Command]:
    """Apply a workflow task's events and return the new commands.

    ``fresh``: ``events`` is the whole history, replayed activation by activation (each
    WorkflowTaskCompleted closes one; the command events after it must match what the
    code issues) before the live activation. Otherwise the instance is cached and
    ``events`` are just the new inputs.
    """
    if not fresh:
        return instance.activate([e for e in events if e.type in INPUT_EVENTS], now_ms, False)
    return instance.activate(replay(instance, events), now_ms, False)


def replay(instance: WorkflowInstance, events: list[HistoryEvent]) -> list[HistoryEvent]:
    """Replay every activation the history records (each ends at a WorkflowTaskCompleted
    and the command events after it must match what the code issues); returns the input
    events no workflow task has seen yet."""
    pending: list[HistoryEvent] = []
    i, n = 0, len(events)
    while i < n:
        ev = events[i]
        if ev.type == "WorkflowTaskCompleted":
            cmds = instance.activate(pending, int(ev.attributes.get("t0") or ev.time_ms), True)
            pending = []
            j = i + 1
            recorded: list[HistoryEvent] = []
            while j < n and events[j].type in COMMAND_EVENTS:
                recorded.append(events[j])
                j += 1
            _check_replay(instance, cmds, recorded)
            i = j
            continue
        if ev.type in INPUT_EVENTS:
            pending.append(ev)
        i += 1
    return pending


def _check_replay(inst: WorkflowInstance, cmds: list[Command], recorded: list[HistoryEvent]) -> None:
    for k in range(max(len(cmds), len(recorded))):
        want = _ident_of_event(recorded[k]) if k < len(recorded) else None
        got = cmds[k].ident if k < len(cmds) else None
        if want != got:
            at = recorded[k].event_id if k < len(recorded) else (recorded[-1].event_id if recorded else 0)
            raise NonDeterminismError(
                f"workflow '{inst.defn.name}' execution '{inst.info.workflow_id}' "
                f"(run {inst.info.run_id}) is not deterministic: at event {at} the history "
                f"has {_show(want)} but the code now issues {_show(got)}. Deploy the code "
                "the run started with, or terminate or reset the execution."
            )


def _show(ident: tuple[Any, ...] | None) -> str:
    if ident is None:
        return "nothing"
    name, *rest = ident
    return f"{name}({', '.join(repr(r) for r in rest)})" if rest else name


@dataclass
class CachedRun:
    instance: WorkflowInstance
    last_event_id: int
