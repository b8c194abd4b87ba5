"""``Depends(provider)``: what an activity needs that is costly to make (a client, a
pool, a loaded model), made once per worker and shared by its activities.

A provider is a sync or async function, a generator or async generator (what follows
its ``yield`` runs at shutdown), or a context manager (sync or async), or a function or
class returning one. Its own parameters may be ``Depends(...)`` too. A worker enters
every provider its activities name before it takes any task, once each (one value per
provider), and closes them in reverse order when it stops; a provider that fails to
start stops the worker with an error naming it. An activity called directly (outside a
worker's task: a test, a script) gets its providers made for that call and closed after
it; inside a worker's task, the worker's.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Callable, Iterable
from typing import Any

from rillflow.errors import RillflowError, WorkflowDefinitionError


class Depends:
    """A parameter default: ``def charge(order: Order, gateway: Gateway = Depends(open_gateway))``.
    The parameter is not part of the activity's input (callers do not pass it)."""

    __slots__ = ("dependency",)

    def __init__(self, dependency: Any) -> None:
        if not (callable(dependency) or _is_context_manager(dependency)):
            raise WorkflowDefinitionError(
                f"Depends({dependency!r}): a provider is a function, a generator, a class or a context manager"
            )
        self.dependency = dependency

    def __repr__(self) -> str:
        return f"Depends({_name(self.dependency)})"


class DependencyError(RillflowError):
    """A provider that could not be entered (the worker does not start)."""


def depends_of(fn: Callable[..., Any]) -> dict[str, Depends]:
    """The parameters of ``fn`` whose default is a ``Depends``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params if isinstance(p.default, Depends)}


def _is_context_manager(obj: Any) -> bool:
    return hasattr(obj, "__aenter__") or hasattr(obj, "__enter__")


def _name(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__qualname__


class Scope:
    """Providers entered and the values they gave, closed together (a worker's, for its
    life; a direct call's, for that call)."""

    def __init__(self) -> None:
        self._stack = contextlib.AsyncExitStack()
        self._values: dict[int, Any] = {}
        self._keep: list[Any] = []  # (the providers keyed by id stay alive while their value does)

    async def resolve(self, dep: Depends) -> Any:
        key = id(dep.dependency)
        if key not in self._values:
            try:
                self._values[key] = await self._enter(dep.dependency)
            except DependencyError:
                raise
            except Exception as e:
                raise DependencyError(
                    f"dependency {_name(dep.dependency)} could not be started: {type(e).__name__}: {e}"
                ) from e
            self._keep.append(dep.dependency)
        return self._values[key]

    def value(self, dep: Depends) -> Any:
        """A provider's value, if entered here (KeyError if not)."""
        return self._values[id(dep.dependency)]

    async def kwargs(self, deps: dict[str, Depends]) -> dict[str, Any]:
        return {name: await self.resolve(d) for name, d in deps.items()}

    async def enter_all(self, fns: Iterable[Callable[..., Any]]) -> None:
        for fn in fns:
            await self.kwargs(depends_of(fn))

    async def _enter(self, provider: Any) -> Any:
        if _is_context_manager(provider) and not isinstance(provider, type):
            return await self._enter_cm(provider)
        kwargs = await self.kwargs(depends_of(provider))
        if inspect.isasyncgenfunction(provider):
            return await self._stack.enter_async_context(contextlib.asynccontextmanager(provider)(**kwargs))
        if inspect.isgeneratorfunction(provider):
            return self._stack.enter_context(contextlib.contextmanager(provider)(**kwargs))
        obj = provider(**kwargs)
        if inspect.isawaitable(obj):
            obj = await obj
        return await self._enter_cm(obj) if _is_context_manager(obj) else obj

    async def _enter_cm(self, cm: Any) -> Any:
        if hasattr(cm, "__aenter__"):
            return await self._stack.enter_async_context(cm)
        return self._stack.enter_context(cm)

    async def aclose(self) -> None:
        """Close what was entered, last first."""
        self._values.clear()
        await self._stack.aclose()


# the worker's scope, seen by the activities it runs (and what they call directly)
worker_scope: contextvars.ContextVar[Scope | None] = contextvars.ContextVar(
    "rillflow_dependencies", default=None
)


def filled(deps: dict[str, Depends], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The worker's values for the ``deps`` a direct call did not pass, if it runs in a
    worker that entered them all (else None: the call makes its own)."""
    scope = worker_scope.get()
    missing = {n: d for n, d in deps.items() if n not in kwargs}
    if scope is None:
        return None if missing else {}
    try:
        return {n: scope.value(d) for n, d in missing.items()}
    except KeyError:
        return None
