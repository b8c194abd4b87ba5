"""The instances of the runs this worker ran last, and the rules that keep them true.

An instance is *taken* out of the cache for the length of a workflow task and put back
only when Redis accepted that task's completion: a task that fails, is refused, or
whose completion cannot be sent leaves nothing behind that could apply its events a
second time. A cache entry is good only for a history that ends exactly where the
entry does; anything else (another worker ran a task meanwhile, Redis lost recent
writes) is a miss, and the run is rebuilt from its history. Every instance that leaves
the cache is torn down explicitly, so no user code runs outside a workflow task.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import structlog

from rillflow.executor import WorkflowInstance

log = structlog.get_logger("rillflow.worker")


@dataclass
class CachedRun:
    instance: WorkflowInstance
    last_event_id: int  # the last history event the instance has applied
    fence: str  # the completion that brought it there: Redis must still have it


def discard(instance: WorkflowInstance) -> None:
    """Tear an instance down; a failure here is logged, never raised into the worker."""
    try:
        instance.teardown()
    except Exception:
        log.exception("tearing down a workflow instance failed", run_id=instance.info.run_id)


class RunCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._runs: collections.OrderedDict[str, CachedRun] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._runs)

    def position(self, run_id: str) -> tuple[int, str]:
        """Where the cached instance is: its last event id and the fence of the
        completion it got there by ((0, '') if none)."""
        cached = self._runs.get(run_id)
        return (cached.last_event_id, cached.fence) if cached else (0, "")

    def peek(self, run_id: str) -> CachedRun | None:
        """The cached instance, left in place (for a query: it must not change it)."""
        return self._runs.get(run_id)

    def take(self, run_id: str) -> CachedRun | None:
        """Remove and return the run's entry: the caller owns the instance now, and must
        ``commit`` it or ``discard`` it."""
        return self._runs.pop(run_id, None)

    def commit(self, run_id: str, instance: WorkflowInstance, last_event_id: int, fence: str) -> None:
        """Keep an instance whose task Redis accepted, evicting the least recently used."""
        old = self._runs.pop(run_id, None)
        if old is not None and old.instance is not instance:
            discard(old.instance)
        self._runs[run_id] = CachedRun(instance, last_event_id, fence)
        while len(self._runs) > self.capacity:
            _, evicted = self._runs.popitem(last=False)
            discard(evicted.instance)

    def evict(self, run_id: str) -> None:
        cached = self._runs.pop(run_id, None)
        if cached is not None:
            discard(cached.instance)

    def clear(self) -> None:
        while self._runs:
            _, cached = self._runs.popitem()
            discard(cached.instance)
