"""Starting workflows and reading their state, from any process that reaches Redis."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from redis.asyncio import Redis

from rillflow import listing
from rillflow.devserver import default_url
from rillflow.durations import duration_problem
from rillflow.errors import (
    InvalidInputError,
    RillflowError,
    WorkflowAlreadyStartedError,
    WorkflowNotRegisteredError,
)
from rillflow.handle import WorkflowHandle
from rillflow.listing import Filter, WorkflowPage
from rillflow.models import ScheduleDefinition
from rillflow.payloads import DEFAULT_MAX_PAYLOAD_BYTES, check_size, to_wire
from rillflow.registry import RegisteredWorkflow, Registry
from rillflow.reset import plan_reset
from rillflow.schedules import ScheduleHandle, ScheduleSummary, create_schedule, list_schedules
from rillflow.watcher import Watcher
from rillflow.workflow import (
    DEFAULT_EXECUTION_TIMEOUT,
    WorkflowDefinition,
    get_workflow_definition,
)
from rillflow_runtime.codec import pack, text
from rillflow_runtime.connections import make_redis
from rillflow_runtime.keyspace import NAME_RE, Keyspace, startable_id
from rillflow_runtime.model import Reply
from rillflow_runtime.protocol import Protocol

DEFAULT_RETENTION = timedelta(days=7)
WATCH_BLOCK_S = 5.0
RESET_TRIES = 20  # reads of the run to reset while it keeps moving (a task in flight, new events)
DEFAULT_URL = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class NamespaceSettings:
    shards: int = 1
    retention_ms: int = int(DEFAULT_RETENTION.total_seconds() * 1000)
    workflow_task_timeout_ms: int = 10_000


async def ensure_namespace(
    redis: Redis,
    namespace: str,
    shards: int | None = None,
    retention: timedelta | None = None,
    workflow_task_timeout: timedelta | None = None,
) -> NamespaceSettings:
    """Create the namespace's meta hash on first use; afterwards its settings are fixed."""
    if not NAME_RE.fullmatch(namespace) or "." in namespace:
        raise RillflowError(f"namespace {namespace!r} is invalid: use letters, digits, '_' and '-'")
    if shards is not None and not 1 <= shards <= 4096:
        raise RillflowError(f"shards must be between 1 and 4096, got {shards}")
    for what, value in (("retention", retention), ("workflow_task_timeout", workflow_task_timeout)):
        if value is not None and not timedelta(milliseconds=1) <= value <= timedelta(days=3650):
            raise RillflowError(f"{what} must be between 1 ms and 10 years, got {value}")
    key = Keyspace.meta_key(namespace)
    defaults = NamespaceSettings()
    await redis.hsetnx(key, "shards", shards or defaults.shards)
    await redis.hsetnx(
        key, "retention_ms", int(retention.total_seconds() * 1000) if retention else defaults.retention_ms
    )
    await redis.hsetnx(
        key,
        "workflow_task_timeout_ms",
        int(workflow_task_timeout.total_seconds() * 1000)
        if workflow_task_timeout
        else defaults.workflow_task_timeout_ms,
    )
    raw = {text(k): int(v) for k, v in (await redis.hgetall(key)).items()}
    settings = NamespaceSettings(
        shards=raw["shards"],
        retention_ms=raw["retention_ms"],
        workflow_task_timeout_ms=raw["workflow_task_timeout_ms"],
    )
    if shards is not None and shards != settings.shards:
        raise RillflowError(
            f"namespace {namespace!r} already has {settings.shards} shards; the shard count "
            f"is fixed when a namespace is created (asked for {shards})"
        )
    return settings


@dataclass(frozen=True)
class _StartRequest:
    defn: WorkflowDefinition | None
    name: str
    workflow_id: str
    task_queue: str
    body: bytes
    timeout_ms: int
    run_id: str


class Client:
    """A connection to one namespace. ``await Client.connect(url)``."""

    def __init__(
        self,
        redis: Redis,
        namespace: str,
        settings: NamespaceSettings,
        *,
        max_payload_bytes: int,
        url: str,
        registry_cache: timedelta = timedelta(seconds=1),
    ) -> None:
        self.url = url
        self.redis = redis
        self.namespace = namespace
        self.settings = settings
        self.keyspace = Keyspace(namespace, settings.shards)
        self.protocol = Protocol(redis, self.keyspace)
        self.registry = Registry(redis, self.keyspace)
        self.max_payload_bytes = max_payload_bytes
        self._watcher: Watcher | None = None
        # name -> (when read, registration): a start by name costs no round trip in the
        # steady state; a registration no older than this is trusted, absence never is
        self._registry_cache_s = registry_cache.total_seconds()
        self._registered: dict[str, tuple[float, RegisteredWorkflow]] = {}
        self._reading: dict[str, asyncio.Future[RegisteredWorkflow | None]] = {}

    @classmethod
    async def connect(
        cls,
        url: str | None = None,
        namespace: str = "default",
        *,
        shards: int | None = None,
        retention: timedelta | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        max_connections: int = 64,
        workflow_task_timeout: timedelta | None = None,
        registry_cache: timedelta = timedelta(seconds=1),
    ) -> Client:
        """Connect to ``namespace``, creating it on first use with ``shards`` (default 1),
        ``retention`` of closed runs (default 7 days) and ``workflow_task_timeout``
        (default 10 s); a namespace's settings are fixed once created. Starts trust a
        workflow's registration (its schema and task queues) read within
        ``registry_cache``. Without ``url``: ``$RILLFLOW_URL``, else the running ``rillflow
        dev`` server (the CLI's order), else ``redis://127.0.0.1:6379/0``, as a Redis
        client library would (the CLI refuses to guess there: pass a URL to be sure
        which server you write to)."""
        found = default_url(url)
        url = found[0] if found else DEFAULT_URL
        redis = make_redis(url, max_connections)
        try:
            settings = await ensure_namespace(redis, namespace, shards, retention, workflow_task_timeout)
        except BaseException:
            await redis.aclose()
            raise
        return cls(
            redis,
            namespace,
            settings,
            max_payload_bytes=max_payload_bytes,
            url=url,
            registry_cache=registry_cache,
        )

    async def close(self) -> None:
        if self._watcher is not None:
            await self._watcher.close()
        await self.redis.aclose()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def watcher(self) -> Watcher:
        if self._watcher is None:
            self._watcher = Watcher(self)
        return self._watcher

    # -- starting -----------------------------------------------------------------------
    async def start_workflow(
        self,
        workflow: type | str,
        params: Any = None,
        *,
        execution_id: str | None = None,
        task_queue: str | None = None,
        execution_timeout: timedelta | None = None,
        allow_unregistered: bool = False,
    ) -> WorkflowHandle:
        """Start a run; returns at once with a handle.

        Given a name, nothing is written unless a worker has registered that workflow
        in the namespace (on ``task_queue``, which defaults to the queue it is
        registered on) and the input validates against the registered input schema;
        ``allow_unregistered=True`` starts a name no worker has registered yet. Given
        the class, the input is validated against its entrypoint and the class itself
        is the proof that the workflow exists, so it may start before any worker has
        deployed. Either way the run goes to ``task_queue``, else to the one queue the
        workflow is registered on, else to ``"default"``, and waits there for a worker.
        """
        req = await self._start_request(
            workflow, params, execution_id, task_queue, execution_timeout, allow_unregistered
        )
        wid, run_id = req.workflow_id, req.run_id
        # waiting for the close before the run exists spares result() a read of its status
        closed = self._watcher.wait_new_run(self.keyspace.shard(wid), run_id) if self._watcher else None
        try:
            res = await self.protocol.start(wid, run_id, req.name, req.task_queue, req.body, req.timeout_ms)
        except BaseException:
            if closed is not None:
                self.watcher.forget(closed)
            raise
        if closed is not None and (res.reply is not Reply.OK or res.run_id != run_id):
            self.watcher.forget(closed)
            closed = None
        if res.reply is Reply.RUNNING:
            raise WorkflowAlreadyStartedError(wid, res.run_id)
        if res.reply is not Reply.OK:
            raise RillflowError(f"workflow execution {wid!r} was not started: {res.why}")
        handle = WorkflowHandle(self, wid, res.run_id, req.defn)
        handle._closed = closed
        handle._follow_chain(res.run_id)  # a new run: the first of its chain
        return handle

    async def signal_with_start(
        self,
        workflow: type | str,
        params: Any = None,
        *,
        execution_id: str,
        signal: str | Callable[..., Any],
        signal_payload: Any = None,
        task_queue: str | None = None,
        execution_timeout: timedelta | None = None,
        allow_unregistered: bool = False,
        request_id: str | None = None,
    ) -> WorkflowHandle:
        """Send ``signal`` to execution ``execution_id``, starting it first (with
        ``params``, as ``start_workflow`` would) if no run of it is running, in one
        atomic call: the signal is never lost between a start and a signal, and callers
        racing on the same id start one run between them. Both inputs are validated
        before anything is written. A retry with the same ``request_id`` delivers once.
        Returns a handle on the run that got the signal (``handle.started`` says whether
        this call started it)."""
        if execution_id is None:
            raise InvalidInputError(
                "signal_with_start needs an execution_id: the execution to signal, or to start"
            )
        req = await self._start_request(
            workflow, params, execution_id, task_queue, execution_timeout, allow_unregistered
        )
        probe = WorkflowHandle(self, req.workflow_id, None, req.defn)
        name, data, _ = await probe._handler_input("signal", signal, signal_payload, req.name)
        sbody = pack({"name": name, "input": data})
        check_size(sbody, self.max_payload_bytes, f"signal '{name}'")
        res = await self.protocol.signal_with_start(
            req.workflow_id,
            req.run_id,
            req.name,
            req.task_queue,
            req.body,
            req.timeout_ms,
            sbody,
            request_id or uuid.uuid4().hex,
        )
        if res.reply is Reply.INVALID:
            raise InvalidInputError(
                f"signal '{name}' to execution {req.workflow_id!r} was not sent: {res.why}"
            )
        handle = WorkflowHandle(self, req.workflow_id, res.run_id, req.defn)
        handle.started = res.started
        origin = res.run_id
        if not res.started:  # a running run, maybe continued from an earlier one
            chain = await self.redis.hget(self.keyspace.run(handle.shard, res.run_id), "chain")
            origin = text(chain) if chain else res.run_id
        handle._follow_chain(origin)
        return handle

    async def _start_request(
        self,
        workflow: type | str,
        params: Any,
        execution_id: str | None,
        task_queue: str | None,
        execution_timeout: timedelta | None,
        allow_unregistered: bool,
    ) -> _StartRequest:
        """A start, checked and encoded (see start_workflow); nothing is written."""
        defn = None if isinstance(workflow, str) else get_workflow_definition(workflow)
        name = defn.name if defn else str(workflow)
        if not NAME_RE.fullmatch(name):
            raise InvalidInputError(f"workflow name {name!r} is invalid")
        if task_queue is not None and not NAME_RE.fullmatch(task_queue):
            raise InvalidInputError(
                f"task queue {task_queue!r} is invalid: use letters, digits, '_', '-', '.'"
            )
        wid = str(uuid.uuid4()) if execution_id is None else execution_id
        if not startable_id(wid):
            raise InvalidInputError(
                f"execution_id {wid!r} is invalid: use 1-256 characters of letters, digits, '_', '-', '.', '@' "
                "(and not the shape of a schedule's run, <schedule id>@<time>Z, which only schedules start)"
            )
        if why := duration_problem(execution_timeout, "execution_timeout", optional=True):
            raise InvalidInputError(why)
        entry: RegisteredWorkflow | None = None
        if defn is None or task_queue is None:  # a class with a queue needs no lookup
            entry = await self._registration(name)
        # the class itself proves the workflow exists: it may start before any worker
        tq = await self._resolve_queue(name, task_queue, entry, allow_unregistered or defn is not None)
        if defn is not None:
            data = defn.sig.encode_input(params)
        else:
            data = entry.check_input(params) if entry else to_wire(params, f"workflow '{name}'")
        timeout = execution_timeout or (
            defn.execution_timeout
            if defn
            else entry.execution_timeout
            if entry
            else DEFAULT_EXECUTION_TIMEOUT
        )
        timeout_ms = int(timeout.total_seconds() * 1000)
        body = pack(
            {
                "workflow_type": name,
                "task_queue": tq,
                "input": data,
                "execution_timeout_ms": timeout_ms,
                # workflow.random() and uuid4() draw from this: 128 bits, recorded so
                # that every replay draws the same values
                "seed": os.urandom(16),
            }
        )
        check_size(body, self.max_payload_bytes, f"input of workflow '{name}'")
        # the run id is also the request's identity: a re-sent start finds its run
        return _StartRequest(defn, name, wid, tq, body, timeout_ms, str(uuid.uuid4()))

    async def _registration(self, name: str) -> RegisteredWorkflow | None:
        now = time.monotonic()
        hit = self._registered.get(name)
        if hit is not None and now - hit[0] < self._registry_cache_s:
            return hit[1]
        if hit is not None:
            # a registration known and due for a refresh: concurrent starts share one read
            # (each reading it again is a burst of identical reads every `registry_cache`)
            reading = self._reading.get(name)
            if reading is None:
                reading = asyncio.ensure_future(self._read_registration(name, now))
                self._reading[name] = reading
                reading.add_done_callback(lambda t: self._read_done(name, t))
            entry = await asyncio.shield(reading)
            if entry is not None:
                return entry
            # absence is never trusted, not even shared: read again below
        return await self._read_registration(name, time.monotonic())

    def _read_done(self, name: str, task: asyncio.Future[RegisteredWorkflow | None]) -> None:
        if self._reading.get(name) is task:
            del self._reading[name]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter got it, or none was left

    async def _read_registration(self, name: str, now: float) -> RegisteredWorkflow | None:
        entry = await self.registry.workflow(name, with_workers=False)
        if entry is None:
            self._registered.pop(name, None)
        else:
            self._registered[name] = (now, entry)
        return entry

    async def _resolve_queue(
        self, name: str, task_queue: str | None, entry: RegisteredWorkflow | None, allow_unregistered: bool
    ) -> str:
        queues = sorted(entry.task_queues) if entry else []
        if task_queue is None and len(queues) > 1:
            # a queue the workflow has moved away from stays registered: the live ones count
            served = sorted({w.task_queue for w in await self.registry.workers() if name in w.workflows})
            if len(served) != 1:
                raise InvalidInputError(
                    f"workflow '{name}' is registered on several task queues ({', '.join(queues)}"
                    f"{'; live workers on ' + ', '.join(served) if served else '; none has a live worker'}"
                    "): pass task_queue= to choose one"
                )
            return served[0]
        if task_queue is None and queues:
            return queues[0]
        if task_queue in queues or allow_unregistered:
            return task_queue or "default"
        if entry is not None:
            raise WorkflowNotRegisteredError(
                f"workflow '{name}' is registered on task queue(s) {', '.join(queues)}, "
                f"not on '{task_queue}'. Start it on one of those, or pass allow_unregistered=True "
                "if its workers for that queue have not been deployed yet"
            )
        known = await self.registry.names()
        raise WorkflowNotRegisteredError(
            f"no worker has registered a workflow named '{name}' in namespace '{self.namespace}' "
            f"(registered: {', '.join(known) if known else 'none yet'}). Check the name and the "
            "namespace, or pass allow_unregistered=True (--allow-unregistered on the command line) to "
            "start it before its workers are deployed"
        )

    async def execute_workflow(self, workflow: type | str, params: Any = None, **kwargs: Any) -> Any:
        """Start a run and wait for its result."""
        timeout = kwargs.pop("result_timeout", None)
        handle = await self.start_workflow(workflow, params, **kwargs)
        return await handle.result(timeout=timeout)

    async def list_workflows(
        self,
        status: str | None = None,
        workflow_type: str | None = None,
        task_queue: str | None = None,
        started_after: datetime | None = None,
        started_before: datetime | None = None,
        page_size: int = 100,
        next_page_token: str | None = None,
        *,
        execution_id: str | None = None,
        schedule_id: str | None = None,
    ) -> WorkflowPage:
        """One page of the namespace's runs (running and retained closed ones), newest
        first by start time, across shards; filters combine (``started_after``
        inclusive, ``started_before`` exclusive; ``execution_id``: the runs of one
        execution). Pass the page's ``next_page_token`` for the next one (None: last)."""
        flt = Filter.of(
            status=status,
            workflow_type=workflow_type,
            task_queue=task_queue,
            execution_id=execution_id,
            schedule_id=schedule_id,
            started_after=started_after,
            started_before=started_before,
        )
        return await listing.list_workflows(self, flt, page_size, next_page_token)

    async def count_workflows(
        self,
        status: str | None = None,
        workflow_type: str | None = None,
        task_queue: str | None = None,
        started_after: datetime | None = None,
        started_before: datetime | None = None,
        *,
        execution_id: str | None = None,
        schedule_id: str | None = None,
    ) -> int:
        """How many runs :meth:`list_workflows` would list with these filters."""
        flt = Filter.of(
            status=status,
            workflow_type=workflow_type,
            task_queue=task_queue,
            execution_id=execution_id,
            schedule_id=schedule_id,
            started_after=started_after,
            started_before=started_before,
        )
        return await listing.count_workflows(self, flt)

    async def reset_workflow(
        self,
        execution_id: str,
        event_id: int,
        reason: str | None = None,
        exclude_signals: bool = False,
        exclude_updates: bool = False,
        *,
        run_id: str | None = None,
    ) -> WorkflowHandle:
        """Start the execution again from workflow task ``event_id`` (a
        WorkflowTaskCompleted of its current run, or of ``run_id``, which must be
        current): a new run with the events before it, which runs that task again with
        the code deployed now, then the signals and updates recorded after it (unless
        excluded). The old run, if still running, ends terminated with the reason, which
        the new run's history records too. Returns a handle on the new run. What was
        pending at that point is pending again: its activities run again."""
        if not isinstance(event_id, int) or isinstance(event_id, bool) or event_id < 1:
            raise InvalidInputError(f"event_id must be a positive event id, got {event_id!r}")
        why = reason or "reset"
        check_size(pack({"reason": why}), self.max_payload_bytes, "reset reason")
        for attempt in range(RESET_TRIES):
            if attempt:
                await asyncio.sleep(min(0.5, 0.01 * 2**attempt))
            old = run_id or await self.get_workflow_handle(execution_id)._resolve_run()
            events = await self.get_workflow_handle(execution_id, run_id=old).history()
            plan = plan_reset(
                events,
                workflow_id=execution_id,
                old_run=old,
                new_run=str(uuid.uuid4()),
                event_id=event_id,
                reason=why,
                exclude_signals=exclude_signals,
                exclude_updates=exclude_updates,
            )
            res = await self.protocol.reset(plan, self.settings.retention_ms)
            if res.reply is Reply.OK:
                return self.get_workflow_handle(execution_id, run_id=res.run_id)
            if res.reply is Reply.INVALID or (run_id and "not the current run" in res.why):
                raise InvalidInputError(f"execution {execution_id!r} was not reset: {res.why}")
        raise RillflowError(
            f"execution {execution_id!r} was not reset: its run kept changing while it was read "
            f"({RESET_TRIES} times); try again"
        )

    def get_workflow_handle(
        self, execution_id: str, *, run_id: str | None = None, workflow: type | None = None
    ) -> WorkflowHandle:
        return WorkflowHandle(
            self, execution_id, run_id, get_workflow_definition(workflow) if workflow else None
        )

    # -- schedules (see rillflow.schedules) ---------------------------------------------
    async def create_schedule(
        self,
        workflow: type | str,
        schedule: ScheduleDefinition,
        *,
        schedule_id: str | None = None,
        task_queue: str | None = None,
        paused: bool = False,
        note: str | None = None,
    ) -> ScheduleHandle:
        """Store a schedule of ``workflow``: its due times from now on run (by any worker
        of the namespace). ``schedule_id`` (else the definition's) names it; the input is
        checked against the workflow as a start's is. An id taken is refused."""
        secs, micros = await self.redis.time()
        return await create_schedule(
            self,
            workflow,
            schedule,
            schedule_id=schedule_id,
            task_queue=task_queue,
            paused=paused,
            note=note,
            now_ms=int(secs) * 1000 + int(micros) // 1000,
        )

    def get_schedule_handle(self, schedule_id: str) -> ScheduleHandle:
        return ScheduleHandle(self, schedule_id)

    async def list_schedules(self) -> list[ScheduleSummary]:
        return await list_schedules(self)
