"""The worker: what it serves, how it starts, stays known as alive, and stops.

It runs the workflow-task pollers, the activity poller, the query poller, the outbox
poller, the results flusher, the timers pump and its liveness refresh as loops on one event loop. A loop
that fails unexpectedly is restarted with a growing backoff, logged with its stack on
the first failure of a streak only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

import structlog

from rillflow.activity import ActivityDefinition
from rillflow.client import Client
from rillflow.dependencies import worker_scope
from rillflow.errors import RillflowError, WorkflowRegistrationConflictError
from rillflow.registry import workflow_spec
from rillflow.schedules import declare_schedules
from rillflow.worker.activities import Activities
from rillflow.worker.context import Context, Streak, WorkerStats
from rillflow.worker.maintenance import Maintenance
from rillflow.worker.outbox import Outbox
from rillflow.worker.queries import Queries
from rillflow.worker.run_cache import RunCache
from rillflow.worker.schedules import Schedules
from rillflow.worker.workflow_tasks import WorkflowTasks
from rillflow.workflow import WorkflowDefinition, get_workflow_definition
from rillflow_runtime.connections import TRANSIENT, reraise_if_cancelling
from rillflow_runtime.keyspace import NAME_RE

log = structlog.get_logger("rillflow.worker")


class Worker:
    """Serves one task queue. Use ``async with Worker(...)`` or ``await worker.run()``."""

    def __init__(
        self,
        client: Client,
        task_queue: str = "default",
        workflows: Sequence[type] = (),
        activities: Sequence[ActivityDefinition] = (),
        *,
        max_concurrent_activities: int = 100,
        max_cached_workflows: int = 1000,
        workflow_pollers: int = 2,
        batch_size: int = 64,
        graceful_shutdown_timeout: timedelta = timedelta(seconds=30),
        reclaim_idle: timedelta = timedelta(seconds=30),
        pump_interval: float = 0.5,
        max_deliveries: int = 3,
        sticky_schedule_timeout: timedelta | None = timedelta(seconds=2),
        max_eager_activities: int = 3,
        heartbeat_interval: timedelta = timedelta(seconds=10),
        identity: str | None = None,
        schedule_clock: Callable[[], datetime] | None = None,
    ) -> None:
        if not isinstance(task_queue, str) or not NAME_RE.fullmatch(task_queue):
            raise RillflowError(f"task queue {task_queue!r} is invalid: use letters, digits, '_', '-', '.'")
        if max_concurrent_activities < 1:
            raise RillflowError("max_concurrent_activities must be at least 1")
        if not isinstance(max_eager_activities, int) or isinstance(max_eager_activities, bool):
            raise RillflowError(
                f"max_eager_activities must be a whole number >= 0 (0: none), got {max_eager_activities!r}"
            )
        if (
            max_cached_workflows < 0
            or max_eager_activities < 0
            or workflow_pollers < 1
            or batch_size < 1
            or max_deliveries < 1
        ):
            raise RillflowError(
                "max_cached_workflows and max_eager_activities must be >= 0; "
                "workflow_pollers, batch_size, max_deliveries >= 1"
            )
        self.client = client
        self.task_queue = task_queue
        self.workflows: dict[str, WorkflowDefinition] = {}
        for cls in workflows:
            d = get_workflow_definition(cls)
            if d.name in self.workflows and self.workflows[d.name].cls is not cls:
                raise RillflowError(f"two workflow classes are named {d.name!r}")
            self.workflows[d.name] = d
        self.activities: dict[str, ActivityDefinition] = {}
        for a in activities:
            if not isinstance(a, ActivityDefinition):
                raise RillflowError(f"{a!r} is not an activity: decorate it with @activity()")
            if a.name in self.activities and self.activities[a.name] is not a:
                raise RillflowError(f"two activities are named {a.name!r}")
            self.activities[a.name] = a
        self.identity = identity or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        if not NAME_RE.fullmatch(self.identity):
            raise RillflowError(
                f"worker identity {self.identity!r} is invalid: use letters, digits, '_', '-', '.'"
            )
        # the liveness record lives three intervals: one missed refresh is not death
        self.heartbeat_s = heartbeat_interval.total_seconds()
        if self.heartbeat_s <= 0:
            raise RillflowError("heartbeat_interval must be positive")
        self.grace = graceful_shutdown_timeout.total_seconds()
        self.workflow_pollers = workflow_pollers
        self.ctx = Context(
            client,
            task_queue,
            self.identity,
            batch_size=batch_size,
            max_deliveries=max_deliveries,
            readers=workflow_pollers + 4,
        )
        self.cache = RunCache(max_cached_workflows)
        # a run's next workflow task goes to this worker's own stream while it caches the
        # run; another worker takes it if this one does not start it within the timeout
        sticky_ms = int(sticky_schedule_timeout.total_seconds() * 1000) if sticky_schedule_timeout else 0
        self.tasks = (
            WorkflowTasks(self.ctx, self.workflows, self.cache, sticky_ms, max_eager_activities)
            if self.workflows
            else None
        )
        self.queries = Queries(self.ctx, self.tasks, self.cache) if self.tasks else None
        self.acts = (
            Activities(self.ctx, self.activities, max_concurrent_activities) if self.activities else None
        )
        # eager dispatch between the two halves of a worker that runs both (see activities)
        if self.tasks is not None and self.acts is not None:
            self.tasks.activities = self.acts
            self.acts.workflow_tasks = self.tasks
        self.outbox = Outbox(self.ctx, int(reclaim_idle.total_seconds() * 1000))
        self.maintenance = Maintenance(
            self.ctx,
            self.tasks,
            self.acts,
            self.outbox,
            pump_interval=pump_interval,
            reclaim_idle_ms=int(reclaim_idle.total_seconds() * 1000),
        )
        # the clock schedules are due by: Redis's, or a test's
        self.schedules = Schedules(self.ctx, schedule_clock)
        self._pollers: list[asyncio.Task[None]] = []
        self._liveness: asyncio.Task[None] | None = None
        self._background: list[asyncio.Task[None]] = []
        self._main: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._stopped = asyncio.Event()
        self._started_ms = 0

    @property
    def stats(self) -> WorkerStats:
        return self.ctx.stats

    @property
    def running(self) -> dict[Any, Any]:
        """The activity attempts running now."""
        return self.acts.running if self.acts else {}

    @property
    def _stopping(self) -> asyncio.Event:
        return self.ctx.stopping

    def stop(self) -> None:
        """Ask the worker to stop: it stops taking tasks and drains (see ``shutdown``)."""
        self.ctx.stopping.set()

    # -- lifecycle ----------------------------------------------------------------------
    async def __aenter__(self) -> Worker:
        self._main = asyncio.create_task(self.run(), name=f"rillflow-worker-{self.identity}")
        ready = asyncio.create_task(self._ready.wait())
        await asyncio.wait({self._main, ready}, return_when=asyncio.FIRST_COMPLETED)
        if self._main.done():
            ready.cancel()
            self._main.result()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop taking tasks, let running activities finish within the grace period."""
        self.ctx.stopping.set()
        if self._main is not None:
            await self._main
        else:
            await self._stopped.wait()

    async def run(self) -> None:
        # first of all: a provider that cannot start stops the worker before it is known
        await self._enter_dependencies()
        try:
            await self._run()
        finally:
            await self.ctx.dependencies.aclose()

    async def _enter_dependencies(self) -> None:
        """Enter every provider the activities' Depends parameters name, once each; the
        activities (and what they call directly) see them through the worker's scope."""
        worker_scope.set(self.ctx.dependencies)
        try:
            await self.ctx.dependencies.enter_all(a.fn for a in self.activities.values())
        except BaseException:
            await self.ctx.dependencies.aclose()
            raise

    async def _run(self) -> None:
        streams = self._streams()
        self._started_ms = int(time.time() * 1000)
        streak = Streak("worker start interrupted: redis unavailable")
        while True:  # (Redis going away while the worker starts is waited out, as later)
            try:
                await self._publish()  # first: a worker refused here leaves nothing behind
                await self.ctx.ensure_groups(streams)
                await self.ctx.learn_clocks()
                await self._declare_schedules()
                break
            except TRANSIENT as e:
                if self.ctx.stopping.is_set():
                    raise
                await streak.failed(e)
        streak.ok()
        log.info(
            "worker started",
            identity=self.identity,
            task_queue=self.task_queue,
            namespace=self.client.namespace,
            workflows=sorted(self.workflows),
            activities=sorted(self.activities),
        )
        if self.tasks is not None:
            self._pollers += [self._supervise(self.tasks.poll) for _ in range(self.workflow_pollers)]
        if self.queries is not None:
            self._pollers.append(self._supervise(self.queries.poll))
        self._pollers.append(self._supervise(self.outbox.poll))
        if self.acts is not None:
            self._pollers.append(self._supervise(self.acts.poll))
            self._background.append(self._supervise(self.acts.flush_loop))
        self._liveness = self._supervise(self._liveness_loop)
        self._background.append(self._supervise(self.maintenance.pump_loop))
        self._background.append(self._supervise(self.schedules.loop))
        self._ready.set()
        try:
            await self.ctx.stopping.wait()
        finally:
            await self._drain(streams)
            self._stopped.set()
            log.info("worker stopped", identity=self.identity)
        if self.ctx.exit_request is not None:
            raise self.ctx.exit_request

    def _streams(self) -> list[str]:
        """Every stream of this queue (its groups are made whichever kinds this worker
        serves, so a message is never read before its group exists)."""
        out = [stream for kind in ("wft", "act", "qry") for stream in self.ctx.streams(kind)]
        return out + list(self.outbox.streams()) + list(self.tasks.sticky_streams() if self.tasks else ())

    def _supervise(self, loop_fn: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Run one of the worker's loops; an unexpected error is logged (with its stack
        on the first failure of a streak) and the loop restarts after a backoff that
        grows to 30 s, so one bad reply never silently stops a worker, and a persistent
        one neither floods the log nor spins."""
        name = getattr(loop_fn, "__qualname__", "loop")

        async def supervised() -> None:
            failures = 0
            while True:
                began = time.monotonic()
                try:
                    await loop_fn()
                    return
                except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
                    raise
                except BaseException:  # (user code's BaseExceptions too: a loop never dies silently)
                    reraise_if_cancelling()
                    if time.monotonic() - began > 60:
                        failures = 0  # it ran fine for a while: a new streak
                    failures += 1
                    if failures == 1:
                        log.exception("worker loop failed; restarting it", loop=name)
                    else:
                        log.error("worker loop failed again; restarting it", loop=name, failures=failures)
                    await asyncio.sleep(min(30.0, 0.5 * 2 ** (failures - 1)))

        return asyncio.create_task(supervised(), name=f"rillflow-{name}")

    async def _drain(self, streams: list[str]) -> None:
        if self._liveness is not None:
            self._liveness.cancel()
        # Pollers are not cancelled but let finish the batch in hand (they see `stopping`):
        # a poller cancelled between a start script and its reply would leave attempts
        # started in Redis that nobody runs until their deadline. Their blocking reads
        # end at once: redis-py lets a cancelled blocking read finish its block first, so
        # the read's connection is closed under it.
        with contextlib.suppress(Exception):
            await self.ctx.reader.connection_pool.disconnect(inuse_connections=True)
        if self.acts is not None:
            self.acts.wake()
        if self._pollers:
            _, late = await asyncio.wait(self._pollers, timeout=max(self.grace, 5.0))
            for t in late:
                t.cancel()
        await asyncio.gather(*self._pollers, *filter(None, [self._liveness]), return_exceptions=True)
        if self.tasks is not None:
            await self.tasks.wait_deferred()
        if self.acts is not None:
            try:
                await self.acts.hand_back_backlog()
            except TRANSIENT as e:
                log.warning(
                    "could not hand back unstarted activity messages; reclaims take them", error=str(e)
                )
        try:
            await self.client.registry.withdraw(self.identity)
        except TRANSIENT as e:
            log.warning("could not withdraw the liveness record; it expires by itself", error=str(e))
        running = [a.task for a in self.running.values()]
        if running:
            log.info("waiting for running activities", count=len(running), grace_s=self.grace)
            _, pending = await asyncio.wait(running, timeout=self.grace)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        # the flusher reports what is left, then it and the pump end by themselves
        if self.acts is not None:
            self.acts.close()
        self.maintenance.closing = True
        self.ctx.pump_wake.set()
        _, stuck = await asyncio.wait(self._background, timeout=10) if self._background else (set(), set())
        for t in stuck:
            t.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.tasks is not None:  # what the last reports woke before the worker stopped
            await self.tasks.wait_deferred()
        try:
            await self.maintenance.leave(streams)
        except TRANSIENT as e:
            log.warning("could not remove this worker's consumers; the janitor will", error=str(e))
        self.cache.clear()
        await self.ctx.reader.aclose()

    # -- registry and liveness ----------------------------------------------------------
    def _liveness_record(self) -> dict[str, Any]:
        return {
            "identity": self.identity,
            "task_queue": self.task_queue,
            "workflows": sorted(self.workflows),
            "activities": sorted(self.activities),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_ms": self._started_ms,
            "heartbeat_ms": int(time.time() * 1000),
        }

    @property
    def _liveness_ttl_ms(self) -> int:
        return int(self.heartbeat_s * 3000)

    async def _publish(self) -> None:
        specs = [workflow_spec(d, self.task_queue, self.identity) for d in self.workflows.values()]
        await self.client.registry.publish(specs, self._liveness_record(), self._liveness_ttl_ms)

    async def _declare_schedules(self) -> None:
        """The schedules this worker's workflows declare, made to exist as declared."""
        if not self.workflows:
            return
        changed = await declare_schedules(
            self.client, list(self.workflows.values()), self.task_queue, self.schedules.now_ms(0)
        )
        if changed:
            log.info("schedules declared", changes=changed)

    async def _liveness_loop(self) -> None:
        failures = 0
        while not self.ctx.stopping.is_set():
            await asyncio.sleep(self.heartbeat_s)
            try:
                if not await self.client.registry.refresh(self._liveness_record(), self._liveness_ttl_ms):
                    # expired (a long pause, or Redis lost it): say again what this worker serves
                    log.warning("liveness record had expired; registering again", identity=self.identity)
                    await self._publish()
                failures = 0
            except WorkflowRegistrationConflictError as e:
                # another worker took the name with other schemas meanwhile: this one
                # must not go on serving it unregistered
                log.error("registering again was refused; the worker stops", error=str(e))
                self.stop()
                return
            except TRANSIENT as e:
                reraise_if_cancelling()
                failures += 1
                if failures == 1:
                    log.warning("could not refresh the liveness record; retrying", error=str(e))
