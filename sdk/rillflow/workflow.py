"""Defining workflows, and what workflow code may call while it runs."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import random as _random
import uuid as _uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NoReturn, TypeVar

from rillflow.children import ParentClosePolicy
from rillflow.durations import duration_problem
from rillflow.errors import ContinueAsNewError, InvalidInputError, RillflowError, WorkflowDefinitionError
from rillflow.executor import (
    SUGGEST_CONTINUE_BYTES,
    SUGGEST_CONTINUE_EVENTS,
    WorkflowInfo,
    current_instance,
    require_instance,
    skip_determinism_enforcement,
)
from rillflow.models import ScheduleDefinition
from rillflow.payloads import Signature
from rillflow_runtime.keyspace import NAME_RE

T = TypeVar("T")
_ENTRY_MARK = "__rillflow_entrypoint__"
_HANDLER_MARK = "__rillflow_handler__"
_VALIDATES_MARK = "__rillflow_validates__"
DEFAULT_EXECUTION_TIMEOUT = timedelta(hours=1)


HANDLER_KINDS = {"signal": "signals", "query": "queries", "update": "updates"}


@dataclass(frozen=True)
class HandlerDefinition:
    """A message a workflow accepts: a signal (fire-and-forget, recorded in its history),
    a query (a read of its state, recorded nowhere) or an update (recorded, and its
    caller waits for the handler's result)."""

    kind: str  # a key of HANDLER_KINDS
    name: str
    method: str
    sig: Signature
    is_async: bool
    description: str | None = None
    validator: str | None = None  # an update's: the method that may reject it (see update())

    def spec(self) -> dict[str, Any]:
        """What the registry publishes about it, as a console renders a form."""
        spec: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "input_schema": self.sig.input_schema(),
            "input_shape": self.sig.shape.to_json(),
        }
        if self.kind != "signal":
            spec["output_schema"] = self.sig.output_schema()
        if self.validator:
            spec["validated"] = True  # a caller asks a worker to validate it first
        return spec


@dataclass(frozen=True)
class WorkflowDefinition:
    name: str
    cls: type
    entry_name: str
    sig: Signature
    execution_timeout: timedelta
    description: str | None = None
    display_name: str | None = None
    schedules: tuple[Any, ...] = ()
    enforce_determinism: bool = True
    handlers: dict[str, dict[str, HandlerDefinition]] = field(default_factory=dict)  # kind -> name ->

    def handler_specs(self) -> dict[str, list[dict[str, Any]]]:
        """Each kind's handlers sorted by name, so the published spec is deterministic."""
        specs: dict[str, list[dict[str, Any]]] = {}
        for kind, plural in HANDLER_KINDS.items():
            hs = self.handlers.get(kind, {})
            specs[plural] = [hs[n].spec() for n in sorted(hs)]
        return specs

    def handler(self, kind: str, name: str) -> HandlerDefinition:
        """The handler of that kind and name; an unknown one is refused, naming the rest."""
        hs = self.handlers.get(kind, {})
        h = hs.get(name)
        if h is None:
            raise InvalidInputError(
                f"workflow '{self.name}' has no {kind} '{name}' "
                f"(its {HANDLER_KINDS[kind]}: {', '.join(sorted(hs)) or 'none'})"
            )
        return h


def handler_definition(fn: Any) -> HandlerDefinition | None:
    """The handler a method decorated with ``@workflow.signal``, ``.query`` or ``.update``
    defines, if it is one."""
    h = getattr(fn, _HANDLER_MARK, None)
    return h if isinstance(h, HandlerDefinition) else None


def _method(fn: Any, kind: str, name: str | None) -> Callable[..., Any]:
    """The decorated method, once it and the handler's name pass the checks."""
    if not callable(fn) or not hasattr(fn, "__name__"):
        raise WorkflowDefinitionError(f"@workflow.{kind}(...) decorates a method of a workflow class")
    h_name = name or fn.__name__
    if not isinstance(h_name, str) or not NAME_RE.fullmatch(h_name) or "." in h_name:
        raise WorkflowDefinitionError(
            f"{kind} name {h_name!r} is invalid: use 1-128 characters of letters, digits, '_' and '-'"
        )
    if h_name.startswith("__"):
        raise WorkflowDefinitionError(
            f"{kind} name {h_name!r} is reserved: names starting with '__' are rillflow's"
        )
    return fn  # type: ignore[no-any-return]


def _answering(fn: Callable[..., Any], kind: str) -> Signature:
    """The signature of a handler whose caller gets an answer: it must return something."""
    sig = Signature(fn, what=kind, require_annotations=True)
    if sig.return_type is None or sig.return_type is type(None):
        raise WorkflowDefinitionError(
            f"{kind.capitalize()} '{fn.__name__}' must have a return type annotation other than None."
        )
    return sig


def _mark(
    fn: Callable[..., Any], kind: str, name: str | None, description: str | None, sig: Signature
) -> Callable[..., Any]:
    h_name = name or fn.__name__
    h = HandlerDefinition(kind, h_name, fn.__name__, sig, inspect.iscoroutinefunction(fn), description)
    setattr(fn, _HANDLER_MARK, h)
    return fn


def _validator_of(method: str, update: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``@my_update.validator``: a plain ``def`` taking the update's parameters, run by a
    worker on the run's state before the update is accepted. It rejects the update by
    raising (anything); a rejected update leaves no trace in the history and its caller
    gets WorkflowUpdateRejectedError. Like a query, it reads and never changes state."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(fn) or not hasattr(fn, "__name__"):
            raise WorkflowDefinitionError(f"@{method}.validator decorates a method of the workflow class")
        if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
            raise WorkflowDefinitionError(
                f"the validator of update '{update}' ({fn.__name__}) must be a plain def: it runs "
                "before the update is accepted and may not wait"
            )
        if fn.__name__ == method:
            raise WorkflowDefinitionError(
                f"the validator of update '{update}' is named {method!r} like the update's method, "
                f"which it would replace: give it a name of its own (validate_{method})"
            )
        setattr(fn, _VALIDATES_MARK, (update, method))
        return fn

    return decorate


def _attach_validators(workflow: str, cls: type, updates: dict[str, HandlerDefinition]) -> None:
    """Each ``@my_update.validator`` of ``cls`` onto its update's definition; its
    parameters must be the update's, so that the caller's input fits both."""
    for attr, m in inspect.getmembers(cls):
        mark = getattr(m, _VALIDATES_MARK, None)
        if not isinstance(mark, tuple):
            continue
        update, method = mark
        h = next((u for u in updates.values() if u.method == method), None)
        if h is None:
            raise WorkflowDefinitionError(
                f"workflow '{workflow}': {attr} validates update '{update}', which the class does not "
                "define (the validator must be defined after it, under another name)"
            )
        if h.validator is not None and h.validator != attr:
            raise WorkflowDefinitionError(
                f"workflow '{workflow}': update '{update}' has two validators ({h.validator} and {attr})"
            )
        want = list(inspect.signature(getattr(cls, method)).parameters)
        got = list(inspect.signature(m).parameters)
        if want != got:
            raise WorkflowDefinitionError(
                f"workflow '{workflow}': validator {attr} takes ({', '.join(got)}) but update "
                f"'{update}' takes ({', '.join(want)}): give it the update's parameters"
            )
        updates[h.name] = dataclasses.replace(h, validator=attr)


def get_workflow_definition(cls: Any) -> WorkflowDefinition:
    defn = getattr(cls, "__rillflow_workflow__", None)
    if not isinstance(defn, WorkflowDefinition):
        raise WorkflowDefinitionError(
            f"{cls!r} is not a workflow: decorate the class with @workflow.define(name=...)"
        )
    return defn


def _seconds(d: timedelta | float | int) -> float:
    return d.total_seconds() if isinstance(d, timedelta) else float(d)


class workflow:
    """Decorators for workflow classes and the calls workflow code may make."""

    @staticmethod
    def define(
        name: str,
        workflow_description: str | None = None,
        schedules: list[Any] | None = None,
        workflow_display_name: str | None = None,
        execution_timeout: timedelta = DEFAULT_EXECUTION_TIMEOUT,
        enforce_determinism: bool | None = None,
    ) -> Callable[[type[T]], type[T]]:
        if not isinstance(name, str) or not NAME_RE.fullmatch(name) or "." in name:
            raise WorkflowDefinitionError(
                f"workflow name {name!r} is invalid: use 1-128 characters of letters, digits, '_' and '-'"
            )
        if why := duration_problem(execution_timeout, "execution_timeout"):
            raise WorkflowDefinitionError(why)

        def decorate(cls: type[T]) -> type[T]:
            if not isinstance(cls, type):
                raise WorkflowDefinitionError("@workflow.define decorates a class")
            entries = [(n, m) for n, m in inspect.getmembers(cls) if getattr(m, _ENTRY_MARK, None)]
            if not entries:
                raise WorkflowDefinitionError(
                    f"workflow '{name}' ({cls.__qualname__}) has no entrypoint: "
                    "mark one async method with @workflow.entrypoint"
                )
            if len(entries) > 1:
                names = ", ".join(n for n, _ in entries)
                raise WorkflowDefinitionError(
                    f"workflow '{name}' has {len(entries)} entrypoints ({names}); keep exactly one"
                )
            entry_name, fn = entries[0]
            handlers: dict[str, dict[str, HandlerDefinition]] = {k: {} for k in HANDLER_KINDS}
            for _, m in inspect.getmembers(cls):
                h = handler_definition(m)
                if h is None:
                    continue
                same = handlers[h.kind]
                if h.name in same:
                    raise WorkflowDefinitionError(
                        f"workflow '{name}' has two {h.kind} handlers named '{h.name}' "
                        f"({same[h.name].method} and {h.method}); give each its own name"
                    )
                same[h.name] = h
            _attach_validators(name, cls, handlers["update"])
            entry_sig: Signature = getattr(fn, _ENTRY_MARK)
            ids = [
                s.schedule_id for s in schedules or () if isinstance(s, ScheduleDefinition) and s.schedule_id
            ]
            if len(ids) != len(set(ids)):
                twice = sorted({i for i in ids if ids.count(i) > 1})
                raise WorkflowDefinitionError(
                    f"workflow '{name}' has two schedules with schedule_id {twice[0]!r}"
                )
            for i, sched in enumerate(schedules or ()):
                if not isinstance(sched, ScheduleDefinition):
                    raise WorkflowDefinitionError(
                        f"workflow '{name}': schedules[{i}] is a {type(sched).__name__}, not a "
                        "ScheduleDefinition (from rillflow.models import ScheduleDefinition)"
                    )
                try:
                    entry_sig.encode_input(sched.input)
                except InvalidInputError as e:
                    raise WorkflowDefinitionError(
                        f"workflow '{name}': schedules[{i}].input does not fit its entrypoint: {e}"
                    ) from None
            cls.__rillflow_workflow__ = WorkflowDefinition(  # type: ignore[attr-defined]
                name=name,
                cls=cls,
                entry_name=entry_name,
                sig=getattr(fn, _ENTRY_MARK),
                execution_timeout=execution_timeout,
                description=workflow_description or inspect.getdoc(cls),
                display_name=workflow_display_name,
                schedules=tuple(schedules or ()),
                enforce_determinism=enforce_determinism is not False,
                handlers=handlers,
            )
            return cls

        return decorate

    @staticmethod
    def entrypoint(fn: Callable[..., Any]) -> Callable[..., Any]:
        if not inspect.iscoroutinefunction(fn):
            raise WorkflowDefinitionError(f"'{fn.__name__}' must be async function. Use `async def`.")
        setattr(fn, _ENTRY_MARK, Signature(fn, what="workflow entrypoint", require_annotations=True))
        return fn

    @staticmethod
    def signal(
        name: str | None = None, description: str | None = None
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """A fire-and-forget message to a running workflow: the handler (sync or async)
        runs in the workflow, in history order, and usually changes its state."""

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            sig = Signature(
                _method(fn, "signal", name), what="signal", require_annotations=True, allow_kwargs=True
            )
            return _mark(fn, "signal", name, description, sig)

        return decorate

    @staticmethod
    def query(
        name: str | None = None, description: str | None = None
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """A read of a workflow's state, answered by a worker from the run's cached
        instance or a replay of its history; it records nothing and must change nothing."""

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            fn = _method(fn, "query", name)
            if inspect.iscoroutinefunction(fn):
                raise WorkflowDefinitionError(
                    f"Query '{fn.__name__}' must be a synchronous function (def), not async def."
                )
            return _mark(fn, "query", name, description, _answering(fn, "query"))

        return decorate

    @staticmethod
    def update(
        name: str | None = None, description: str | None = None
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """A message whose caller waits for the handler's result: recorded in the history
        when accepted and when done, so a replay runs it again to the same result."""

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            fn = _method(fn, "update", name)
            fn = _mark(fn, "update", name, description, _answering(fn, "update"))
            fn.validator = _validator_of(fn.__name__, name or fn.__name__)  # type: ignore[attr-defined]
            return fn

        return decorate

    class unsafe:
        """Escape hatches from the determinism guard, for code you know replays the same."""

        skip_determinism_enforcement = staticmethod(skip_determinism_enforcement)

        @staticmethod
        @contextlib.contextmanager
        def imports_passed_through() -> Iterator[None]:
            """Accepted for compatibility: imports are never restricted here."""
            yield

    # -- inside workflow code ---------------------------------------------------------------
    @staticmethod
    def in_workflow() -> bool:
        return current_instance() is not None

    @staticmethod
    def info() -> WorkflowInfo:
        """The run's identity, and its history's length and size as of the current task."""
        inst = require_instance("workflow.info()")
        return dataclasses.replace(
            inst.info, history_length=inst.history_length, history_size=inst.history_size
        )

    @staticmethod
    def patched(patch_id: str) -> bool:
        """Whether to take the new code path of a change to this workflow, so that runs
        started before the change replay as they ran: ``if workflow.patched("v2-fee"):
        new code else: old code``. True for a run that reaches this point on code that
        has the call (a marker goes in its history), False on replay for a run that passed
        this point before (its history has no marker); the answer is fixed for the run.
        Once no run that took the old path is open, replace the call by
        :meth:`deprecate_patch` and keep only the new code; later, remove it."""
        return require_instance("workflow.patched()").patched(patch_id, deprecated=False)

    @staticmethod
    def deprecate_patch(patch_id: str) -> None:
        """The second step of retiring a patch (see :meth:`patched`): the new path is the
        only one; runs recorded with the patch's marker, and runs without it, both replay."""
        require_instance("workflow.deprecate_patch()").patched(patch_id, deprecated=True)

    @staticmethod
    async def execute_workflow(
        workflow: type | str,
        params: Any = None,
        execution_timeout: timedelta | None = None,
        execution_id: str | None = None,
        wait: bool = True,
        parent_close_policy: ParentClosePolicy | None = None,
    ) -> Any:
        """Run ``workflow`` (its class, or its name: then the result is plain data) as a
        child of this one, on this task queue: with ``wait=True`` return its result (typed
        by its entrypoint's return annotation), with ``wait=False`` a
        :class:`ChildWorkflowHandle` once it started, to ``await`` later, signal, or leave.
        ``execution_timeout`` defaults to the child's declared one; ``execution_id`` to an
        id made from this execution's (the same on every replay); ``parent_close_policy``
        to TERMINATE with ``wait=True`` and ABANDON with ``wait=False``. A child that
        fails, times out, is terminated or canceled, or whose id is already running,
        raises :class:`ChildWorkflowError` (uncaught, it fails this run). Outside workflow
        code, use ``await client.execute_workflow(...)``."""
        inst = current_instance()
        if inst is None:
            raise RillflowError(
                "workflow.execute_workflow() starts a child workflow: call it in workflow code. "
                "To run a workflow from anywhere else, use `await client.execute_workflow(...)` "
                "(rillflow.Client), which runs it durably on the workers"
            )
        if isinstance(workflow, str):
            if not NAME_RE.fullmatch(workflow):
                raise InvalidInputError(f"workflow name {workflow!r} is invalid")
            defn, wtype, declared = None, workflow, DEFAULT_EXECUTION_TIMEOUT
        else:
            defn = get_workflow_definition(workflow)
            wtype, declared = defn.name, defn.execution_timeout
        timeout = declared if execution_timeout is None else execution_timeout
        if why := duration_problem(timeout, "execution_timeout"):
            raise InvalidInputError(f"child workflow '{wtype}': {why}")
        try:
            policy = ParentClosePolicy(parent_close_policy or 0)
        except ValueError:
            raise InvalidInputError(
                f"parent_close_policy must be a ParentClosePolicy, got {parent_close_policy!r}"
            ) from None
        handle = inst.start_child(
            defn,
            wtype,
            params,
            -(-timeout // timedelta(milliseconds=1)),  # (whole ms, rounded up: never 0)
            execution_id,
            policy.wire(bool(wait)),
        )
        if wait:
            return await handle.result()
        return await asyncio.shield(handle.started)

    @staticmethod
    def continue_as_new(params: Any = None) -> NoReturn:
        """End this run and go on in a new run of the same execution (same id, same
        workflow and task queue, an empty history), started with ``params`` as the
        entrypoint's input: how a workflow that runs for ever, or for long, keeps its
        history small. It raises (never returns); signals that arrive while the task that
        calls it runs are delivered to the new run; the execution timeout covers the whole
        chain; ``handle.result()`` follows it to its last run. Only the entrypoint may call it."""
        require_instance("workflow.continue_as_new()")
        raise ContinueAsNewError(params)

    @staticmethod
    def should_continue_as_new() -> bool:
        """Whether the history has grown to the suggested size for continuing as new
        (4,096 events or 4 MB; at 51,200 events or 50 MB a task fails the run instead).
        False outside a workflow."""
        inst = current_instance()
        if inst is None:
            return False
        return inst.history_length >= SUGGEST_CONTINUE_EVENTS or inst.history_size >= SUGGEST_CONTINUE_BYTES

    @staticmethod
    def all_handlers_finished() -> bool:
        """No signal or update handler is still running: wait for this before returning,
        so that the run does not close while a handler awaits an activity."""
        return require_instance("workflow.all_handlers_finished()").handlers_running == 0

    @staticmethod
    def now() -> datetime:
        """The time of the current workflow task: the same on every replay. Use it, not
        ``datetime.now()`` or ``time.time()``, which the determinism guard refuses."""
        return require_instance("workflow.now()").now()

    @staticmethod
    def random() -> _random.Random:
        """A random generator seeded from the run, so replays draw the same numbers. Use
        it, not the ``random`` module's functions, which the determinism guard refuses."""
        return require_instance("workflow.random()").random

    @staticmethod
    def uuid4() -> _uuid.UUID:
        """A random UUID drawn from :meth:`random`: the same on every replay. Use it, not
        ``uuid.uuid4()``, which the determinism guard refuses."""
        return require_instance("workflow.uuid4()").uuid4()

    @staticmethod
    async def sleep(duration: timedelta | float, *, summary: str | None = None) -> None:
        """A durable timer: the run sleeps in Redis, not in a worker."""
        require_instance("workflow.sleep()")
        await asyncio.sleep(_seconds(duration))

    @staticmethod
    async def wait_condition(
        predicate: Callable[[], bool],
        timeout: timedelta | float | None = None,
        timeout_summary: str | None = None,
    ) -> None:
        """Wait until ``predicate()`` is true, re-checked after every event; raises
        ``TimeoutError`` (``asyncio.TimeoutError``) if ``timeout`` passes first."""
        inst = require_instance("workflow.wait_condition()")
        if predicate():
            return
        fut = inst.wait_condition(predicate)
        if timeout is None:
            await fut
        else:
            await asyncio.wait_for(fut, _seconds(timeout))


def get_execution_id() -> str | None:
    """The execution id of the workflow this code runs for: in workflow code, and in
    activities it schedules; None elsewhere."""
    inst = current_instance()
    if inst is not None:
        return inst.info.workflow_id
    from rillflow.activity import _current_activity

    ctx = _current_activity.get()
    return ctx.info.workflow_id if ctx is not None else None
