"""Defining activities, and what activity code may call while it runs.

An ``@activity()`` function called from workflow code schedules an activity task and
returns an awaitable of its result. Called from inside another activity, or outside
any workflow, it is a plain call: the outer activity is the retry boundary.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from rillflow.dependencies import Depends, Scope, filled
from rillflow.durations import duration_problem
from rillflow.errors import WorkflowDefinitionError
from rillflow.executor import current_instance
from rillflow.payloads import Signature
from rillflow_runtime.keyspace import NAME_RE


def _ms(d: timedelta | None) -> int:
    return 0 if d is None else max(1, round(d.total_seconds() * 1000))


@dataclass(frozen=True)
class ActivityOptions:
    start_to_close_timeout: timedelta = timedelta(minutes=5)
    schedule_to_close_timeout: timedelta | None = None
    heartbeat_timeout: timedelta | None = None
    retry_policy_max_attempts: int = 3
    retry_policy_backoff_coefficient: float = 2.0
    retry_policy_initial_interval: timedelta = timedelta(seconds=1)
    retry_policy_max_interval: timedelta = timedelta(seconds=100)
    task_queue: str | None = None

    def __post_init__(self) -> None:
        for name in (
            "start_to_close_timeout",
            "retry_policy_initial_interval",
            "retry_policy_max_interval",
            "schedule_to_close_timeout",
            "heartbeat_timeout",
        ):
            optional = name in ("schedule_to_close_timeout", "heartbeat_timeout")
            if why := duration_problem(getattr(self, name), f"activity option {name}", optional=optional):
                raise WorkflowDefinitionError(why)
        if self.retry_policy_max_attempts < 0:
            raise WorkflowDefinitionError("retry_policy_max_attempts must be >= 0 (0 means unlimited)")
        if self.retry_policy_backoff_coefficient < 1:
            raise WorkflowDefinitionError("retry_policy_backoff_coefficient must be >= 1")

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> ActivityOptions:
        """The options an ActivityTaskScheduled event recorded (see wire()); what it
        leaves out keeps its default."""
        retry = wire.get("retry") or {}
        given: dict[str, Any] = {}
        for field_name, value, as_ms in (
            ("start_to_close_timeout", wire.get("start_to_close_ms"), True),
            ("schedule_to_close_timeout", wire.get("schedule_to_close_ms"), True),
            ("heartbeat_timeout", wire.get("heartbeat_ms"), True),
            ("retry_policy_initial_interval", retry.get("initial_interval_ms"), True),
            ("retry_policy_max_interval", retry.get("max_interval_ms"), True),
            ("retry_policy_max_attempts", retry.get("max_attempts"), False),
            ("retry_policy_backoff_coefficient", retry.get("backoff_coefficient"), False),
        ):
            if value is not None:
                given[field_name] = timedelta(milliseconds=value) if as_ms else value
        return cls(**given)

    @functools.cached_property
    def _aux(self) -> tuple[Any, ...]:
        return (
            _ms(self.start_to_close_timeout),
            _ms(self.schedule_to_close_timeout),
            _ms(self.heartbeat_timeout),
            self.retry_policy_max_attempts,
            _ms(self.retry_policy_initial_interval),
            float(self.retry_policy_backoff_coefficient),
            _ms(self.retry_policy_max_interval),
        )

    def aux(self) -> list[Any]:
        """The numbers the scripts read (ms), in the order wft_complete.lua expects;
        computed once per definition: every scheduled activity sends them."""
        return list(self._aux)

    @functools.cached_property
    def _wire(self) -> dict[str, Any]:
        # a timeout that is not set is left out (readers take 0): every scheduled
        # activity's event carries these, for as long as its run is kept
        optional = {
            k: v
            for k, v in (
                ("schedule_to_close_ms", _ms(self.schedule_to_close_timeout)),
                ("heartbeat_ms", _ms(self.heartbeat_timeout)),
            )
            if v
        }
        return {
            "start_to_close_ms": _ms(self.start_to_close_timeout),
            **optional,
            "retry": {
                "max_attempts": self.retry_policy_max_attempts,
                "backoff_coefficient": self.retry_policy_backoff_coefficient,
                "initial_interval_ms": _ms(self.retry_policy_initial_interval),
                "max_interval_ms": _ms(self.retry_policy_max_interval),
            },
        }

    def wire(self) -> dict[str, Any]:
        return self._wire


class ActivityDefinition:
    """A registered activity: callable like the function it wraps."""

    def __init__(self, fn: Callable[..., Any], name: str, options: ActivityOptions) -> None:
        self.fn = fn
        self.name = name
        self.options = options
        self.is_async = inspect.iscoroutinefunction(fn)
        self.sig = Signature(fn, what="activity", require_annotations=False)
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        inst = current_instance()
        if inst is not None:
            return inst.schedule_activity(self, args, kwargs)
        if not self.sig.depends:
            return self.fn(*args, **kwargs)
        # a direct call: the worker's providers when it runs in one, else its own
        values = filled(self.sig.depends, kwargs)
        if values is not None:
            return self.fn(*args, **kwargs, **values)
        missing = {n: d for n, d in self.sig.depends.items() if n not in kwargs}
        if self.is_async:
            return self._scoped(missing, args, kwargs)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self._scoped(missing, args, kwargs))
        raise WorkflowDefinitionError(
            f"activity '{self.name}' is a plain def with Depends parameters, called directly from async "
            "code: its providers are made in an event loop of their own. Await it from a thread "
            "(asyncio.to_thread), pass its dependencies yourself, or make it async"
        )

    async def _scoped(self, deps: dict[str, Depends], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        scope = Scope()
        try:
            values = await scope.kwargs(deps)
            out = self.fn(*args, **kwargs, **values)
            return await out if self.is_async else out
        finally:
            await scope.aclose()

    def __repr__(self) -> str:
        return f"<activity {self.name!r}>"


@dataclass
class ActivityInfo:
    activity_name: str
    attempt: int
    workflow_id: str
    run_id: str
    workflow_type: str
    task_queue: str
    seq: int
    heartbeat_details: list[Any] = field(default_factory=list)  # the previous attempt's last
    start_to_close_timeout: timedelta | None = None
    heartbeat_timeout: timedelta | None = None
    schedule_to_close_timeout: timedelta | None = None
    started_time: datetime | None = None  # this attempt's start (Redis's clock)
    # when this attempt times out, as it started (each heartbeat moves a heartbeat deadline on)
    deadline: datetime | None = None


class ActivityContext:
    """What the worker gives a running activity: its info, a heartbeat sink, and
    whether the attempt is over for the worker (timed out, cancelled, its run closed)."""

    def __init__(
        self,
        info: ActivityInfo,
        on_heartbeat: Callable[[list[Any]], None],
        is_gone: Callable[[], bool] = lambda: False,
    ) -> None:
        self.info = info
        self.on_heartbeat = on_heartbeat
        self.is_gone = is_gone


_current_activity: contextvars.ContextVar[ActivityContext | None] = contextvars.ContextVar(
    "rillflow_activity", default=None
)


def activity_heartbeat(*details: Any) -> None:
    """Report progress; the latest details reach the next attempt as
    ``activity.info().heartbeat_details``. Once the attempt is over (timed out,
    cancelled, its run closed: a heartbeat's answer says so), it raises
    ``asyncio.CancelledError`` so that a plain ``def`` activity, which nothing can
    interrupt, stops at its next heartbeat (an async one is cancelled where it awaits).
    Outside an activity it does nothing."""
    ctx = _current_activity.get()
    if ctx is not None:
        if ctx.is_gone():
            raise asyncio.CancelledError(
                f"activity '{ctx.info.activity_name}' attempt {ctx.info.attempt} is over"
            )
        ctx.on_heartbeat(list(details))


def activity_is_cancelled() -> bool:
    """Whether this attempt is over for the worker (timed out, cancelled, its run
    closed), as the last heartbeat's answer said: a loop may check it to stop early.
    False outside an activity."""
    ctx = _current_activity.get()
    return ctx is not None and ctx.is_gone()


def _activity_info() -> ActivityInfo:
    ctx = _current_activity.get()
    if ctx is None:
        raise RuntimeError("activity.info() can only be called while an activity runs in a worker")
    return ctx.info


class _ActivityNamespace:
    """``@activity(...)`` defines an activity; ``activity.heartbeat`` and
    ``activity.info`` serve code running inside one."""

    heartbeat = staticmethod(activity_heartbeat)
    info = staticmethod(_activity_info)
    is_cancelled = staticmethod(activity_is_cancelled)

    def __call__(
        self,
        start_to_close_timeout: timedelta = timedelta(minutes=5),
        retry_policy_max_attempts: int | None = None,
        retry_policy_backoff_coefficient: float | None = None,
        name: str | None = None,
        *,
        schedule_to_close_timeout: timedelta | None = None,
        heartbeat_timeout: timedelta | None = None,
        retry_policy_initial_interval: timedelta = timedelta(seconds=1),
        retry_policy_max_interval: timedelta = timedelta(seconds=100),
        task_queue: str | None = None,
    ) -> Callable[[Callable[..., Any]], ActivityDefinition]:
        options = ActivityOptions(
            start_to_close_timeout=start_to_close_timeout,
            schedule_to_close_timeout=schedule_to_close_timeout,
            heartbeat_timeout=heartbeat_timeout,
            retry_policy_max_attempts=3 if retry_policy_max_attempts is None else retry_policy_max_attempts,
            retry_policy_backoff_coefficient=2.0
            if retry_policy_backoff_coefficient is None
            else retry_policy_backoff_coefficient,
            retry_policy_initial_interval=retry_policy_initial_interval,
            retry_policy_max_interval=retry_policy_max_interval,
            task_queue=task_queue,
        )

        def decorate(fn: Callable[..., Any]) -> ActivityDefinition:
            if isinstance(fn, ActivityDefinition):
                raise WorkflowDefinitionError(f"{fn.name!r} is already an activity")
            if not callable(fn) or "<locals>" in getattr(fn, "__qualname__", ""):
                raise WorkflowDefinitionError(
                    f"activity {getattr(fn, '__qualname__', fn)!r} must be a module-level function"
                )
            act_name = name or fn.__name__
            if not NAME_RE.fullmatch(act_name):
                raise WorkflowDefinitionError(
                    f"activity name {act_name!r} is invalid: use 1-128 characters of "
                    "letters, digits, '_', '-' and '.'"
                )
            return ActivityDefinition(fn, act_name, options)

        return decorate


activity = _ActivityNamespace()
