"""Starting workflows and reading their state, from any process that reaches Redis."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from rillflow.errors import (
    InvalidInputError,
    RillflowError,
    WorkflowAlreadyStartedError,
    WorkflowError,
    WorkflowFailureError,
    WorkflowNotFoundError,
    WorkflowNotRegisteredError,
    WorkflowQueryFailedError,
    WorkflowQueryTimeoutError,
    WorkflowUpdateFailedError,
    WorkflowUpdateTimeoutError,
    exception_from_failure,
)
from rillflow.history import HistoryEvent
from rillflow.payloads import DEFAULT_MAX_PAYLOAD_BYTES, check_size
from rillflow.registry import RegisteredWorkflow, Registry
from rillflow.workflow import (
    DEFAULT_EXECUTION_TIMEOUT,
    HANDLER_KINDS,
    HandlerDefinition,
    WorkflowDefinition,
    get_workflow_definition,
    handler_definition,
)
from rillflow_runtime.codec import pack, text, unpack
from rillflow_runtime.keyspace import ID_RE, NAME_RE, Keyspace
from rillflow_runtime.scripts import Scripts

DEFAULT_RETENTION = timedelta(days=7)


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


@dataclass
class PendingActivity:
    seq: int
    name: str
    state: str
    attempt: int
    last_failure: WorkflowError | None
    heartbeat_details: list[Any] | None


@dataclass
class WorkflowDescription:
    execution_id: str
    run_id: str
    workflow_type: str
    task_queue: str
    status: str
    start_time: datetime
    close_time: datetime | None
    execution_deadline: datetime | None
    history_length: int
    pending_activities: list[PendingActivity] = field(default_factory=list)
    workflow_task_failures: int = 0
    last_workflow_task_failure: WorkflowError | None = None


def _dt(ms: Any) -> datetime | None:
    return datetime.fromtimestamp(int(ms) / 1000, tz=UTC) if ms else None


def make_redis(url: str, max_connections: int = 64) -> Redis:
    """A client that waits for a free connection rather than failing, and rides out a
    dropped connection or a restarting server by retrying with backoff (a few seconds). Every
    script is safe to run twice: a repeated transition is refused by its fence."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=None,
        retry=Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.02), retries=12),
        retry_on_error=[RedisConnectionError, RedisTimeoutError, ConnectionError, OSError],
        health_check_interval=30,
    )
    return Redis(connection_pool=pool)


def make_blocking_reader(url: str, max_connections: int = 2) -> Redis:
    """Connections for blocking reads (XREAD/XREADGROUP BLOCK), without automatic retry:
    redis-py would re-issue a cancelled blocking read, so a stopping loop would keep
    reading. The loops that use it retry by themselves."""
    return Redis.from_url(url, max_connections=max_connections)


def reraise_if_cancelling() -> None:
    """redis-py may turn a cancellation into a connection error: call this in an
    ``except`` that retries, so a cancelled loop still ends."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class _ClosedWatcher:
    """Waits for runs to close with one blocking XREAD for all shards and all waiters,
    on one dedicated connection: no polling, no connection per waiting call."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.redis = make_blocking_reader(client.url)
        self.closing = False
        self.waiters: dict[str, list[asyncio.Future[None]]] = {}
        self.cursors: dict[str, str] = {}
        self.task: asyncio.Task[None] | None = None
        self.started = asyncio.Lock()

    async def ensure_started(self) -> None:
        async with self.started:
            if self.task is not None and not self.task.done():
                return
            ks = self.client.keyspace
            for s in ks.all_shards():
                last = await self.client.redis.xrevrange(ks.closed(s), count=1)
                self.cursors[ks.closed(s)] = text(last[0][0]) if last else "0-0"
            self.task = asyncio.create_task(self._loop(), name="rillflow-closed-watcher")

    async def _loop(self) -> None:
        while not self.closing:
            try:
                resp: Any = await self.redis.xread(self.cursors, block=5000, count=1000)  # type: ignore[arg-type]
            except Exception:
                reraise_if_cancelling()
                await asyncio.sleep(0.5)
                continue
            for stream, entries in resp or []:
                for sid, fields in entries:
                    self.cursors[text(stream)] = text(sid)
                    run = text(fields.get(b"run"))
                    for fut in self.waiters.pop(run, []):
                        if not fut.done():
                            fut.set_result(None)

    def register(self, run_id: str) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(run_id, []).append(fut)
        return fut

    def unregister(self, run_id: str, fut: asyncio.Future[None]) -> None:
        lst = self.waiters.get(run_id)
        if lst and fut in lst:
            lst.remove(fut)
            if not lst:
                del self.waiters[run_id]

    async def close(self) -> None:
        self.closing = True
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        await self.redis.aclose()


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
        self.scripts = Scripts(redis)
        self.registry = Registry(redis, self.keyspace)
        self.max_payload_bytes = max_payload_bytes
        self._watcher: _ClosedWatcher | None = None
        # name -> (when read, registration): a start by name costs no round trip in the
        # steady state; a registration no older than this is trusted, absence never is
        self._registry_cache_s = registry_cache.total_seconds()
        self._registered: dict[str, tuple[float, RegisteredWorkflow]] = {}

    @classmethod
    async def connect(
        cls,
        url: str = "redis://127.0.0.1:6379/0",
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
        ``registry_cache``."""
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
    def watcher(self) -> _ClosedWatcher:
        if self._watcher is None:
            self._watcher = _ClosedWatcher(self)
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
        defn = None if isinstance(workflow, str) else get_workflow_definition(workflow)
        name = defn.name if defn else str(workflow)
        if not NAME_RE.fullmatch(name):
            raise InvalidInputError(f"workflow name {name!r} is invalid")
        if task_queue is not None and not NAME_RE.fullmatch(task_queue):
            raise InvalidInputError(
                f"task queue {task_queue!r} is invalid: use letters, digits, '_', '-', '.'"
            )
        wid = execution_id or str(uuid.uuid4())
        if not ID_RE.fullmatch(wid):
            raise InvalidInputError(
                f"execution_id {wid!r} is invalid: use 1-256 characters of letters, digits, '_', '-', '.'"
            )
        if execution_timeout is not None and execution_timeout.total_seconds() <= 0:
            raise InvalidInputError("execution_timeout must be positive")
        entry: RegisteredWorkflow | None = None
        if defn is None or task_queue is None:  # a class with a queue needs no lookup
            entry = await self._registration(name)
        # the class itself proves the workflow exists: it may start before any worker
        tq = await self._resolve_queue(name, task_queue, entry, allow_unregistered or defn is not None)
        if defn is not None:
            data = defn.sig.encode_input(params)
        else:
            if isinstance(params, BaseModel):
                params = params.model_dump(mode="json")
            data = entry.check_input(params) if entry else params
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
            }
        )
        check_size(body, self.max_payload_bytes, f"input of workflow '{name}'")
        run_id = str(uuid.uuid4())
        shard = self.keyspace.shard(wid)
        res = await self.scripts.call(
            "start",
            self.keyspace.timers(shard),
            [self.keyspace.prefix(shard), wid, run_id, name, tq, body, timeout_ms],
        )
        status, rid = text(res[0]), text(res[1])
        if status == "running" and rid != run_id:  # rid == run_id: our own start, retried
            raise WorkflowAlreadyStartedError(wid, rid)
        return WorkflowHandle(self, wid, rid, defn)

    async def _registration(self, name: str) -> RegisteredWorkflow | None:
        now = time.monotonic()
        hit = self._registered.get(name)
        if hit is not None and now - hit[0] < self._registry_cache_s:
            return hit[1]
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
            "namespace, or pass allow_unregistered=True to start it before its workers are deployed"
        )

    async def execute_workflow(self, workflow: type | str, params: Any = None, **kwargs: Any) -> Any:
        """Start a run and wait for its result."""
        timeout = kwargs.pop("result_timeout", None)
        handle = await self.start_workflow(workflow, params, **kwargs)
        return await handle.result(timeout=timeout)

    def get_workflow_handle(
        self, execution_id: str, *, run_id: str | None = None, workflow: type | None = None
    ) -> WorkflowHandle:
        return WorkflowHandle(
            self, execution_id, run_id, get_workflow_definition(workflow) if workflow else None
        )


class WorkflowHandle:
    """One execution: its result, state, history; ``run_id=None`` means the current run."""

    def __init__(
        self, client: Client, execution_id: str, run_id: str | None, defn: WorkflowDefinition | None = None
    ) -> None:
        self.client = client
        self.id = execution_id
        self.run_id = run_id
        self.defn = defn
        self.shard = client.keyspace.shard(execution_id)

    @property
    def execution_id(self) -> str:
        return self.id

    async def _resolve_run(self) -> str:
        if self.run_id:
            return self.run_id
        run = await self.client.redis.hget(self.client.keyspace.wf(self.shard, self.id), "run")
        if not run:
            raise self._not_found()
        return text(run)

    async def _run_fields(self, run: str, *names: str) -> list[Any]:
        vals = await self.client.redis.hmget(self.client.keyspace.run(self.shard, run), list(names))
        return list(vals)

    async def result(self, timeout: float | timedelta | None = None) -> Any:
        """Wait for the run to close; return its result or raise
        :class:`WorkflowFailureError`. ``TimeoutError`` if ``timeout`` passes first."""
        run = await self._resolve_run()
        watcher = self.client.watcher
        await watcher.ensure_started()
        fut = watcher.register(run)
        try:
            (status,) = await self._run_fields(run, "status")
            if status is None:
                raise WorkflowNotFoundError(f"run {run} of execution {self.id!r} not found")
            if text(status) == "running":
                secs = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
                await asyncio.wait_for(asyncio.shield(fut), secs)
        finally:
            watcher.unregister(run, fut)
        return await self._outcome(run)

    async def _outcome(self, run: str) -> Any:
        status, otype, outcome = await self._run_fields(run, "status", "outcome_type", "outcome")
        st = text(status)
        body = unpack(outcome) if outcome else {}
        if text(otype) == "WorkflowExecutionCompleted":
            value = body.get("result")
            return self.defn.sig.load_result_leniently(value) if self.defn else value
        if "failure" in body:
            cause = exception_from_failure(body["failure"])
        else:
            reason = body.get("reason") or st
            cause = WorkflowError(
                str(reason),
                type={"timed_out": "WORKFLOW_EXECUTION_TIMED_OUT", "terminated": "WorkflowTerminated"}.get(
                    st, st
                ),
            )
        raise WorkflowFailureError(self.id, run, st, cause)

    async def describe(self) -> WorkflowDescription:
        run = await self._resolve_run()
        ks, r = self.client.keyspace, self.client.redis
        fields: dict[str, Any] = {text(k): v for k, v in (await r.hgetall(ks.run(self.shard, run))).items()}
        if not fields:
            raise WorkflowNotFoundError(f"run {run} of execution {self.id!r} not found")
        acts_raw: dict[str, Any] = {
            text(k): v for k, v in (await r.hgetall(ks.acts(self.shard, run))).items()
        }
        pending = []
        for key, val in acts_raw.items():
            if ":" in key:
                continue
            s = unpack(val)
            sched = unpack(acts_raw[f"{key}:b"]) if f"{key}:b" in acts_raw else {}
            fail = acts_raw.get(f"{key}:f")
            hb = acts_raw.get(f"{key}:hb")
            pending.append(
                PendingActivity(
                    seq=int(key),
                    name=sched.get("name", "?"),
                    state=text(s.get("st")),
                    attempt=int(s.get("att", 1)),
                    last_failure=exception_from_failure(unpack(fail).get("failure", {})) if fail else None,
                    heartbeat_details=unpack(hb) if hb else None,
                )
            )
        pending.sort(key=lambda p: p.seq)
        wft_fail = fields.get("wft_failure")
        return WorkflowDescription(
            execution_id=self.id,
            run_id=run,
            workflow_type=text(fields.get("wtype")),
            task_queue=text(fields.get("tq")),
            status=text(fields.get("status")),
            start_time=_dt(fields.get("start_ms")) or datetime.fromtimestamp(0, UTC),
            close_time=_dt(fields.get("closed_ms")),
            execution_deadline=_dt(fields.get("deadline_ms")),
            history_length=int(fields.get("last_eid") or 0),
            pending_activities=pending,
            workflow_task_failures=int(fields.get("wft_failures") or 0),
            last_workflow_task_failure=exception_from_failure(unpack(wft_fail).get("failure", {}))
            if wft_fail
            else None,
        )

    async def history(self) -> list[HistoryEvent]:
        run = await self._resolve_run()
        entries: Any = await self.client.redis.xrange(self.client.keyspace.history(self.shard, self.id, run))
        return [HistoryEvent.from_entry(e) for e in entries]

    async def signal(
        self, signal: str | Callable[..., Any], payload: Any = None, *, request_id: str | None = None
    ) -> None:
        """Send a signal: ``signal`` is its name or the decorated handler method. Returns
        once it is recorded (buffered, if a workflow task is running); the workflow
        handles it in history order. The payload is validated first, against the handler
        (known from the class) or the registered schema (given only names), and nothing
        is sent if it fails. A retry with the same ``request_id`` is delivered once."""
        name, data, _ = await self._handler_input("signal", signal, payload)
        body = pack({"name": name, "input": data})
        check_size(body, self.client.max_payload_bytes, f"signal '{name}'")
        ks = self.client.keyspace
        res = await self.client.scripts.call(
            "signal",
            ks.timers(self.shard),
            [ks.prefix(self.shard), self.id, self.run_id or "", body, request_id or uuid.uuid4().hex],
        )
        if text(res[0]) == "not_running":
            raise self._not_running(f"signal '{name}' was not delivered")

    async def query(
        self,
        query: str | Callable[..., Any],
        payload: Any = None,
        *,
        timeout: timedelta = timedelta(seconds=10),
    ) -> Any:
        """Ask a worker of the run's task queue to run a query handler against the run's
        state (running or closed) and return its result: the annotated type given the
        handler or the class, plain data given only names. Nothing is recorded."""
        name, data, h = await self._handler_input("query", query, payload)
        ks = self.client.keyspace
        reply = ks.query_reply(self.shard, uuid.uuid4().hex)
        body = pack({"name": name, "input": data})
        check_size(body, self.client.max_payload_bytes, f"query '{name}'")
        res = await self.client.scripts.call(
            "query", ks.timers(self.shard), [ks.prefix(self.shard), self.id, self.run_id or "", body, reply]
        )
        if text(res[0]) != "ok":
            raise self._not_found()
        tq, stream, msgid = text(res[2]), text(res[3]), text(res[4])
        got = await self.client.redis.blpop([reply], timeout=timeout.total_seconds())
        if got is None:
            await self.client.redis.xdel(stream, msgid)  # nobody took it: no one should later
            raise WorkflowQueryTimeoutError(
                f"no worker answered query '{name}' of execution {self.id!r} within "
                f"{timeout.total_seconds():g} s: are workers serving task queue '{tq}' running? "
                "(see `rillflow workers`)"
            )
        answer = unpack(got[1])  # type: ignore[arg-type]  # bytes: responses are not decoded
        return self._handler_result("query", name, h, answer)

    async def execute_update(
        self,
        update: str | Callable[..., Any],
        payload: Any = None,
        *,
        update_id: str | None = None,
        timeout: timedelta | None = None,
    ) -> Any:
        """Send an update and wait for the handler's result: the annotated type given the
        handler or the class, plain data given only names. The update is recorded when
        accepted and when done, so it survives worker crashes; a call with the same
        ``update_id`` is not applied twice and returns the same outcome. ``timeout``
        (default: none) bounds the wait, not the update."""
        name, data, h = await self._handler_input("update", update, payload)
        uid = update_id or uuid.uuid4().hex
        if not ID_RE.fullmatch(uid):
            raise InvalidInputError(
                f"update_id {uid!r} is invalid: use 1-256 characters of letters, digits, '_', '-', '.'"
            )
        body = pack({"update_id": uid, "name": name, "input": data})
        check_size(body, self.client.max_payload_bytes, f"update '{name}'")
        ks = self.client.keyspace
        res = await self.client.scripts.call(
            "update", ks.timers(self.shard), [ks.prefix(self.shard), self.id, self.run_id or "", uid, body]
        )
        status, run = text(res[0]), text(res[1])
        if status == "not_running":
            raise self._not_running(f"update '{name}' was not accepted")
        outcome = unpack(res[2]) if status == "done" else await self._await_update(run, uid, name, timeout)
        return self._handler_result("update", name, h, outcome)

    def _handler_result(
        self, kind: str, name: str, h: HandlerDefinition | None, outcome: dict[str, Any]
    ) -> Any:
        """A query's or update's outcome as the caller gets it: its failure raised, its
        result as the annotated type when the handler is known, else plain data."""
        if "failure" in outcome:
            cause = exception_from_failure(outcome["failure"])
            error = WorkflowQueryFailedError if kind == "query" else WorkflowUpdateFailedError
            raise error(
                f"{kind} '{name}' of execution {self.id!r} failed: {cause.type}: {cause.message}", cause
            )
        h = h or (self.defn.handler(kind, name) if self.defn else None)
        return h.sig.load_result_leniently(outcome.get("result")) if h else outcome.get("result")

    async def _await_update(self, run: str, uid: str, name: str, timeout: timedelta | None) -> dict[str, Any]:
        """Block on the update's reply list; look at the run's update hash each second
        too, for a caller that is not the first to wait (the list is popped once)."""
        ks, r = self.client.keyspace, self.client.redis
        deadline = None if timeout is None else time.monotonic() + timeout.total_seconds()
        while True:
            wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if wait <= 0:
                raise WorkflowUpdateTimeoutError(
                    f"update '{name}' ({uid}) of execution {self.id!r} had not finished within "
                    f"{timeout.total_seconds() if timeout else 0:g} s; it is accepted and still runs: "
                    "call again with the same update_id to wait for it"
                )
            got = await r.blpop([ks.update_reply(self.shard, run, uid)], timeout=max(wait, 0.01))
            if got is not None:
                return unpack(got[1])  # type: ignore[arg-type,no-any-return]  # bytes: not decoded
            st, body = await r.hmget(ks.updates(self.shard, run), [uid, f"{uid}:o"])
            if st == b"done" and body:
                return unpack(body)  # type: ignore[arg-type,no-any-return]

    async def _handler_input(
        self, kind: str, handler: str | Callable[..., Any], payload: Any
    ) -> tuple[str, Any, HandlerDefinition | None]:
        """The handler's name and the payload as validated wire data: against the handler
        when the class is known, else against the schema its workers registered."""
        h = handler_definition(handler)
        if h is not None and h.kind != kind:
            article = "an" if kind[0] in "aeiou" else "a"
            raise InvalidInputError(f"'{h.method}' is a {h.kind} handler, not {article} {kind}")
        name = h.name if h else str(handler)
        if not NAME_RE.fullmatch(name):
            raise InvalidInputError(f"{kind} name {name!r} is invalid")
        if self.defn is not None:
            h = self.defn.handler(kind, name)
        if h is not None:
            return name, h.sig.encode_input(payload), h
        if isinstance(payload, BaseModel):
            payload = payload.model_dump(mode="json")
        entry = await self.client._registration(await self._workflow_type())
        return name, entry.check_handler_input(HANDLER_KINDS[kind], name, payload) if entry else payload, None

    def _not_found(self) -> WorkflowNotFoundError:
        return WorkflowNotFoundError(
            f"no workflow execution {self.id!r} in namespace {self.client.namespace!r} "
            "(never started, or past its retention period)"
        )

    def _not_running(self, consequence: str) -> WorkflowNotFoundError:
        return WorkflowNotFoundError(
            f"workflow execution {self.id!r} is not running (closed, or never started): {consequence}"
        )

    async def _workflow_type(self) -> str:
        run = await self._resolve_run()
        wtype = await self.client.redis.hget(self.client.keyspace.run(self.shard, run), "wtype")
        if wtype is None:
            raise WorkflowNotFoundError(f"run {run} of execution {self.id!r} not found")
        return text(wtype)

    async def terminate(self, reason: str = "") -> None:
        ks = self.client.keyspace
        res = await self.client.scripts.call(
            "terminate",
            ks.timers(self.shard),
            [
                ks.prefix(self.shard),
                self.id,
                self.run_id or "",
                pack({"reason": reason or "terminated"}),
                self.client.settings.retention_ms,
            ],
        )
        if text(res[0]) != "ok":
            raise RillflowError(f"workflow execution {self.id!r} is not running; nothing to terminate")
