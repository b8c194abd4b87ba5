"""The worker: polls a task queue's streams, runs workflow tasks on the deterministic
executor and activities on its event loop (sync ones in threads), and pumps the
shard timers. Any number of workers share a queue through the consumer groups."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio.to_thread
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from rillflow.activity import (
    ActivityContext,
    ActivityDefinition,
    ActivityInfo,
    _current_activity,
)
from rillflow.client import Client, make_blocking_reader, reraise_if_cancelling
from rillflow.errors import (
    InvalidInputError,
    InvalidResultError,
    RillflowError,
    WorkflowError,
    failure_from_exception,
    jsonable,
)
from rillflow.executor import (
    CachedRun,
    Command,
    QueryChangedStateError,
    WorkflowInfo,
    WorkflowInstance,
    replay,
    run_task,
)
from rillflow.history import HistoryEvent
from rillflow.payloads import check_size
from rillflow.registry import workflow_spec
from rillflow.workflow import WorkflowDefinition, get_workflow_definition
from rillflow_runtime.codec import pack, text, unpack
from rillflow_runtime.keyspace import GROUP, NAME_RE

log = structlog.get_logger("rillflow.worker")

MAX_EVENTS_PER_START = 1000
_TRANSIENT = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


@dataclass
class _Running:
    task: asyncio.Task[None]
    ctx: ActivityContext
    shard: int
    run: str
    seq: int
    attempt: int
    throttle: float
    details: Any = None
    dirty: bool = False
    sending: bool = False
    last_sent: float = 0.0
    timer: asyncio.TimerHandle | None = None
    send_task: asyncio.Future[None] | None = None
    gone: bool = False


@dataclass
class WorkerStats:
    workflow_tasks: int = 0
    workflow_task_failures: int = 0
    activities: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    refused: int = 0
    dead_lettered: int = 0


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
        heartbeat_interval: timedelta = timedelta(seconds=10),
        identity: str | None = None,
    ) -> None:
        if not NAME_RE.fullmatch(task_queue):
            raise RillflowError(f"task queue {task_queue!r} is invalid: use letters, digits, '_', '-', '.'")
        if max_concurrent_activities < 1:
            raise RillflowError("max_concurrent_activities must be at least 1")
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
        self.max_concurrent_activities = max_concurrent_activities
        self.max_cached = max_cached_workflows
        self.workflow_pollers = workflow_pollers
        self.batch_size = batch_size
        self.grace = graceful_shutdown_timeout.total_seconds()
        self.reclaim_idle_ms = int(reclaim_idle.total_seconds() * 1000)
        self.pump_interval = pump_interval
        self.max_deliveries = max_deliveries
        self.identity = identity or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        if not NAME_RE.fullmatch(self.identity):
            raise RillflowError(
                f"worker identity {self.identity!r} is invalid: use letters, digits, '_', '-', '.'"
            )
        # a run's next workflow task goes to this worker's own stream while it caches the
        # run; another worker takes it if this one does not start it within the timeout
        self.sticky_ms = int(sticky_schedule_timeout.total_seconds() * 1000) if sticky_schedule_timeout else 0
        # the liveness record lives three intervals: one missed refresh is not death
        self.heartbeat_s = heartbeat_interval.total_seconds()
        if self.heartbeat_s <= 0:
            raise RillflowError("heartbeat_interval must be positive")
        self.ks = client.keyspace
        self.scripts = client.scripts
        self.redis = client.redis
        self._reader = make_blocking_reader(client.url, workflow_pollers + 3)
        self.cache: collections.OrderedDict[str, CachedRun] = collections.OrderedDict()
        self.running: dict[tuple[str, int], _Running] = {}
        self.stats = WorkerStats()
        self._stopping = asyncio.Event()
        self._closing = False
        self._stopped = asyncio.Event()
        self._slots = asyncio.Event()
        self._slots.set()
        self._pump_wake = asyncio.Event()
        self._done: list[tuple[int, list[Any]]] = []
        self._done_event = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._pollers: list[asyncio.Task[None]] = []
        self._main: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started_ms = 0

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
        self._stopping.set()
        if self._main is not None:
            await self._main
        else:
            await self._stopped.wait()

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._ensure_groups()
        self._started_ms = int(time.time() * 1000)
        await self._publish()
        log.info(
            "worker started",
            identity=self.identity,
            task_queue=self.task_queue,
            namespace=self.client.namespace,
            workflows=sorted(self.workflows),
            activities=sorted(self.activities),
        )
        if self.workflows:
            self._pollers += [self._spawn(self._wft_poller) for _ in range(self.workflow_pollers)]
            self._pollers.append(self._spawn(self._query_poller))
        if self.activities:
            self._pollers.append(self._spawn(self._act_poller))
        self._pollers.append(self._spawn(self._liveness_loop))
        self._tasks += [self._spawn(self._pump_loop), self._spawn(self._flusher)]
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            await self._drain()
            self._stopped.set()
            log.info("worker stopped", identity=self.identity)

    def _spawn(self, loop_fn: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Run one of the worker's loops; an unexpected error is logged with its stack
        and the loop restarts, so one bad reply never silently stops a worker."""

        async def guarded() -> None:
            while True:
                try:
                    await loop_fn()
                    return
                except Exception:
                    reraise_if_cancelling()
                    log.exception("worker loop failed; restarting it", loop=loop_fn.__name__)
                    await asyncio.sleep(1.0)

        return asyncio.create_task(guarded(), name=f"rillflow-{loop_fn.__name__}")

    async def _drain(self) -> None:
        for t in self._pollers:
            t.cancel()
        await asyncio.gather(*self._pollers, return_exceptions=True)
        with contextlib.suppress(*_TRANSIENT):
            await self.client.registry.withdraw(self.identity)
        sticky = self._sticky_streams()
        if sticky:  # what is left there is moved to the shared queue by the K timers
            with contextlib.suppress(*_TRANSIENT):
                await self.redis.delete(*sticky)
        tasks = [r.task for r in self.running.values()]
        if tasks:
            log.info("waiting for running activities", count=len(tasks), grace_s=self.grace)
            _, pending = await asyncio.wait(tasks, timeout=self.grace)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        # the flusher reports what is left, then it and the pump end by themselves
        self._closing = True
        self._done_event.set()
        self._pump_wake.set()
        _, stuck = await asyncio.wait(self._tasks, timeout=10)
        for t in stuck:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._reader.aclose()

    # -- registry and liveness --------------------------------------------------------------
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

    async def _liveness_loop(self) -> None:
        while not self._stopping.is_set():
            await asyncio.sleep(self.heartbeat_s)
            try:
                if not await self.client.registry.refresh(self._liveness_record(), self._liveness_ttl_ms):
                    # expired (a long pause, or Redis lost it): say again what this worker serves
                    log.warning("liveness record had expired; registering again", identity=self.identity)
                    await self._publish()
            except _TRANSIENT as e:
                reraise_if_cancelling()
                log.warning("could not refresh the liveness record; retrying", error=str(e))

    def _sticky_streams(self) -> list[str]:
        if not (self.sticky_ms and self.workflows):
            return []
        return [self.ks.queue(s, self.task_queue, f"wft@{self.identity}") for s in self.ks.all_shards()]

    async def _ensure_groups(self) -> None:
        kinds = ("wft", "act", "qry")
        streams = [self.ks.queue(s, self.task_queue, k) for s in self.ks.all_shards() for k in kinds]
        for stream in streams + self._sticky_streams():
            try:
                await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    async def _read(self, streams: dict[str, str], count: int) -> Any:
        try:
            return await self._reader.xreadgroup(GROUP, self.identity, streams, count=count, block=1000)  # type: ignore[arg-type]
        except ResponseError as e:
            if "NOGROUP" in str(e):
                await self._ensure_groups()
                return []
            raise
        except _TRANSIENT as e:
            reraise_if_cancelling()
            log.warning("redis unavailable; retrying", error=str(e))
            await asyncio.sleep(0.5)
            return []

    def _shard_of_stream(self, stream: bytes | str) -> int:
        s = text(stream)
        return int(s[s.index(":") + 1 : s.index("}")].rsplit(":", 1)[1])

    # -- workflow tasks -----------------------------------------------------------------
    async def _wft_poller(self) -> None:
        streams = {self.ks.queue(s, self.task_queue, "wft"): ">" for s in self.ks.all_shards()}
        streams.update({stream: ">" for stream in self._sticky_streams()})
        await self._poll(
            streams, self._process_wfts, "workflow task batch interrupted; tasks will be retried"
        )

    async def _poll(
        self,
        streams: dict[str, str],
        process: Callable[[int, str, Any], Awaitable[None]],
        interrupted: str,
    ) -> None:
        """Read batches from ``streams`` until stopping; a batch cut short by Redis is
        logged and left to its retry path (reclaim, or the caller's timeout)."""
        while not self._stopping.is_set():
            resp = await self._read(streams, self.batch_size)
            for stream, entries in resp or []:
                try:
                    await process(self._shard_of_stream(stream), text(stream), entries)
                except _TRANSIENT as e:
                    reraise_if_cancelling()
                    log.warning(interrupted, error=str(e))
                    await asyncio.sleep(0.5)

    async def _process_wfts(self, shard: int, stream: str, entries: Iterable[Any]) -> None:
        items: list[tuple[str, str, int]] = []
        for msgid, fields in entries:
            run = fields.get(b"run") if fields else None
            if not run:
                await self._malformed(stream, text(msgid), "workflow task without a 'run' field")
                continue
            cached = self.cache.get(text(run))
            items.append((text(msgid), text(run), cached.last_event_id if cached else 0))
        if not items:
            return
        args: list[Any] = [
            self.ks.prefix(shard),
            stream,
            self.client.settings.workflow_task_timeout_ms,
            MAX_EVENTS_PER_START,
            self.identity,
        ]
        for msgid, run, since in items:
            args += [run, msgid, since]
        res = await self.scripts.call("wft_start", self.ks.timers(shard), args)
        done: list[tuple[str, int, list[Command], WorkflowInstance]] = []
        failed: list[tuple[str, int, dict[str, Any]]] = []
        for (_msgid, run, since), r in zip(items, res, strict=True):
            if text(r[0]) != "ok":
                continue
            fence, now = int(r[1]), int(r[2])
            wid, wtype = text(r[3]), text(r[4])
            start_ms, raw, attempt = int(r[6]), r[7], int(r[8])
            self.stats.workflow_tasks += 1
            try:
                events = [HistoryEvent.from_entry(e) for e in raw]
                if len(raw) >= MAX_EVENTS_PER_START:
                    events += await self._history_after(shard, wid, run, events[-1].event_id)
                inst, cmds = await self._activate(
                    shard, run, wid, wtype, since, events, now, start_ms, attempt
                )
                done.append((run, fence, cmds, inst))
            except Exception as e:
                self.cache.pop(run, None)
                self.stats.workflow_task_failures += 1
                log.error(
                    "workflow task failed",
                    workflow_id=wid,
                    run_id=run,
                    workflow_type=wtype,
                    attempt=attempt,
                    error=f"{type(e).__name__}: {e}",
                )
                failed.append((run, fence, failure_from_exception(e)))
        if done:
            args = [
                self.ks.prefix(shard),
                self.task_queue,
                self.client.settings.retention_ms,
                self.identity,
                self.sticky_ms,
            ]
            wake = False
            for run, fence, cmds, _ in done:
                args += [run, fence, len(cmds)]
                for c in cmds:
                    args += [c.kind, c.body, c.aux]
                    wake = wake or c.kind == "T"
            res = await self.scripts.call("wft_complete", self.ks.timers(shard), args)
            for (run, _fence, _cmds, inst), r in zip(done, res, strict=True):
                if text(r[0]) == "ok" and not inst.closed:
                    self.cache[run] = CachedRun(inst, int(r[1]))
                    self.cache.move_to_end(run)
                    while len(self.cache) > self.max_cached:
                        self.cache.popitem(last=False)
                else:
                    self.cache.pop(run, None)
                    if text(r[0]) == "again":  # it replays with the messages it had not seen
                        log.info("workflow task runs again", run_id=run, reason=text(r[1]))
                    elif text(r[0]) != "ok":
                        self.stats.refused += 1
                        log.warning("workflow task completion refused", run_id=run, reason=text(r[1]))
            if wake:
                self._pump_wake.set()
        if failed:
            async with self.redis.pipeline(transaction=False) as pipe:
                for run, fence, failure in failed:
                    await self.scripts.call(
                        "wft_fail",
                        self.ks.timers(shard),
                        [self.ks.prefix(shard), self.task_queue, run, fence, pack({"failure": failure})],
                        client=pipe,
                    )
                await pipe.execute()
            self._pump_wake.set()

    async def _history_after(self, shard: int, wid: str, run: str, after: int) -> list[HistoryEvent]:
        key = self.ks.history(shard, wid, run)
        out: list[HistoryEvent] = []
        while True:
            page: Any = await self.redis.xrange(key, min=f"({after}-0", max="+", count=MAX_EVENTS_PER_START)
            out += [HistoryEvent.from_entry(e) for e in page]
            if len(page) < MAX_EVENTS_PER_START:
                return out
            after = out[-1].event_id

    async def _activate(
        self,
        shard: int,
        run: str,
        wid: str,
        wtype: str,
        since: int,
        events: list[HistoryEvent],
        now: int,
        start_ms: int,
        attempt: int,
    ) -> tuple[WorkflowInstance, list[Command]]:
        cached = self.cache.get(run) if since else None
        if (
            cached is not None
            and cached.last_event_id == since
            and not any(e.type == "WorkflowTaskCompleted" for e in events)
        ):
            self.stats.cache_hits += 1
            return cached.instance, run_task(cached.instance, events, now, fresh=False)
        self.cache.pop(run, None)
        self.stats.cache_misses += 1
        if since:  # the cache was stale: another worker ran a task of this run meanwhile
            events = await self._history_after(shard, wid, run, 0)
        inst = self._new_instance(wid, run, wtype, start_ms, attempt)
        return inst, run_task(inst, events, now, fresh=True)

    def _new_instance(self, wid: str, run: str, wtype: str, start_ms: int, attempt: int) -> WorkflowInstance:
        defn = self.workflows.get(wtype)
        if defn is None:
            raise WorkflowError(
                f"workflow type '{wtype}' is not registered on worker {self.identity} "
                f"(task queue '{self.task_queue}'); it serves: {sorted(self.workflows)}. "
                "Register the workflow class with this task queue's workers.",
                type="WorkflowNotRegistered",
            )
        info = WorkflowInfo(
            wid, run, wtype, self.task_queue, datetime.fromtimestamp(start_ms / 1000, tz=UTC), attempt
        )
        inst = WorkflowInstance(defn, info)
        inst.max_payload_bytes = self.client.max_payload_bytes
        return inst

    # -- queries --------------------------------------------------------------------------
    async def _query_poller(self) -> None:
        """Its own loop, so that a query that replays a long history never holds up
        workflow tasks."""
        streams = {self.ks.queue(s, self.task_queue, "qry"): ">" for s in self.ks.all_shards()}
        await self._poll(streams, self._process_queries, "query batch interrupted; its callers will time out")

    async def _process_queries(self, shard: int, stream: str, entries: list[Any]) -> None:
        """Answer queries at most once: a query is acknowledged as it is read, and its
        caller gives up after its timeout if the answer never comes."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for msgid, _ in entries:
                pipe.xack(stream, GROUP, msgid)
                pipe.xdel(stream, msgid)
            await pipe.execute()
        for _, raw in entries:
            fields = {text(k): v for k, v in (raw or {}).items()}
            reply = text(fields.get("reply") or b"")
            if not reply.startswith(self.ks.prefix(shard)):
                log.warning("query without a reply key in this shard; dropped", stream=stream)
                continue
            try:
                answer: dict[str, Any] = {"result": await self._answer_query(shard, fields)}
            except Exception as e:
                answer = {"failure": failure_from_exception(e)}
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.lpush(reply, pack(answer))
                pipe.pexpire(reply, 60_000)  # a caller that gave up never reads it
                await pipe.execute()

    async def _answer_query(self, shard: int, fields: dict[str, Any]) -> Any:
        run, wid, wtype = text(fields["run"]), text(fields["wid"]), text(fields["wtype"])
        body = unpack(fields["d"])
        name, data = str(body.get("name")), body.get("input")
        cached = self.cache.get(run)
        if cached is not None:
            try:
                return cached.instance.answer_query(cached.instance.defn.handler("query", name), data)
            except QueryChangedStateError:
                self.cache.pop(run, None)
                raise
        # not in cache: rebuild the state the history records, without keeping it
        events = await self._history_after(shard, wid, run, 0)
        start_ms = events[0].time_ms if events else 0  # WorkflowExecutionStarted
        inst = self._new_instance(wid, run, wtype, start_ms, 1)
        replay(inst, events)
        return inst.answer_query(inst.defn.handler("query", name), data)

    # -- activities ---------------------------------------------------------------------
    async def _act_poller(self) -> None:
        streams = {self.ks.queue(s, self.task_queue, "act"): ">" for s in self.ks.all_shards()}
        while not self._stopping.is_set():
            await self._slots.wait()
            free = self.max_concurrent_activities - len(self.running)
            if free <= 0:
                self._slots.clear()
                continue
            resp = await self._read(streams, min(free, self.batch_size))
            for stream, entries in resp or []:
                try:
                    await self._start_activities(self._shard_of_stream(stream), text(stream), entries)
                except _TRANSIENT as e:
                    reraise_if_cancelling()
                    log.warning("activity batch interrupted; tasks will be retried", error=str(e))
                    await asyncio.sleep(0.5)

    async def _start_activities(self, shard: int, stream: str, entries: Iterable[Any]) -> None:
        items: list[tuple[str, str, int, int]] = []
        for msgid, fields in entries:
            try:
                run, seq, att = text(fields[b"run"]), int(fields[b"seq"]), int(fields[b"att"])
            except (KeyError, TypeError, ValueError):
                await self._malformed(stream, text(msgid), "activity task without valid run/seq/att fields")
                continue
            items.append((text(msgid), run, seq, att))
        if not items:
            return
        args: list[Any] = [self.ks.prefix(shard), self.task_queue, self.identity]
        for msgid, run, seq, att in items:
            args += [run, seq, att, msgid]
        res = await self.scripts.call("act_start", self.ks.timers(shard), args)
        for (_msgid, run, seq, att), r in zip(items, res, strict=True):
            if text(r[0]) != "ok" or (run, seq) in self.running:  # ours already, reclaimed
                continue
            self._launch(shard, run, seq, att, r[1], r[2], text(r[3]), text(r[4]), int(r[5]), int(r[6]))
        if len(self.running) >= self.max_concurrent_activities:
            self._slots.clear()

    def _launch(
        self,
        shard: int,
        run: str,
        seq: int,
        att: int,
        body: bytes,
        hb: bytes,
        wid: str,
        wtype: str,
        now: int,
        deadline: int,
    ) -> None:
        sched = unpack(body)
        hbt_ms = int(sched.get("heartbeat_ms") or 0)
        info = ActivityInfo(
            activity_name=sched.get("name", "?"),
            attempt=att,
            workflow_id=wid,
            run_id=run,
            workflow_type=wtype,
            task_queue=self.task_queue,
            seq=seq,
            heartbeat_details=list(unpack(hb)) if hb else [],
            start_to_close_timeout=timedelta(milliseconds=int(sched.get("start_to_close_ms") or 0)),
            heartbeat_timeout=timedelta(milliseconds=hbt_ms) if hbt_ms else None,
        )
        key = (run, seq)
        # `r` is bound below, before the task's first step can call heartbeat
        ctx = ActivityContext(info, lambda details: self._heartbeat(r, details))
        budget = max(0.001, (deadline - now) / 1000)
        task = asyncio.create_task(
            self._run_activity(shard, sched, ctx, budget), name=f"activity:{info.activity_name}:{wid}:{seq}"
        )
        r = _Running(task, ctx, shard, run, seq, att, throttle=(0.8 * hbt_ms / 1000) if hbt_ms else 30.0)
        self.running[key] = r
        self.stats.activities += 1

        def finished(_t: asyncio.Task[None]) -> None:
            if self.running.get(key) is r:
                del self.running[key]
            if r.timer:
                r.timer.cancel()
            self._slots.set()

        task.add_done_callback(finished)

    async def _run_activity(
        self, shard: int, sched: dict[str, Any], ctx: ActivityContext, budget: float
    ) -> None:
        info = ctx.info
        adef = self.activities.get(info.activity_name)
        token = _current_activity.set(ctx)
        non_retryable = False
        deadline: asyncio.Timeout | None = None
        try:
            if adef is None:
                raise WorkflowError(
                    f"activity '{info.activity_name}' is not registered on worker {self.identity} "
                    f"(task queue '{self.task_queue}'); it serves: {sorted(self.activities)}",
                    type="ActivityNotRegistered",
                )
            try:
                args = adef.sig.decode_input(sched.get("input"))
            except InvalidInputError:
                non_retryable = True
                raise
            deadline = asyncio.timeout(budget)
            async with deadline:
                if adef.is_async:
                    result = await adef.fn(*args)
                else:
                    cv = contextvars.copy_context()
                    result = await anyio.to_thread.run_sync(cv.run, adef.fn, *args, abandon_on_cancel=True)
            body = pack({"seq": info.seq, "att": info.attempt, "result": adef.sig.dump_result(result)})
            check_size(body, self.client.max_payload_bytes, f"result of activity '{info.activity_name}'")
            self._complete(shard, ["ok", info.run_id, info.seq, info.attempt, body, "0", b""])
        except asyncio.CancelledError:
            # shutdown past the grace period, or the attempt is gone (timed out or
            # cancelled): nothing to report; the server's deadline decides.
            return
        except BaseException as e:
            if isinstance(e, TimeoutError) and deadline is not None and deadline.expired():
                # the attempt's deadline passed: the server's timer records the timeout
                # (start_to_close, heartbeat or schedule_to_close) and retries; a report
                # from here would only race it.
                log.info(
                    "activity attempt ran out of time",
                    activity=info.activity_name,
                    workflow_id=info.workflow_id,
                    attempt=info.attempt,
                )
                return
            fail = failure_from_exception(e)
            # a result the annotation refuses is a bug in the activity: retrying repeats it
            nr = non_retryable or isinstance(e, InvalidResultError) or bool(fail.get("non_retryable"))
            r = self.running.get((info.run_id, info.seq))
            hb = pack(r.details) if r is not None and r.details is not None else b""
            body = pack({"seq": info.seq, "att": info.attempt, "failure": fail})
            self._complete(shard, ["fail", info.run_id, info.seq, info.attempt, body, "1" if nr else "0", hb])
            log.info(
                "activity attempt failed",
                activity=info.activity_name,
                workflow_id=info.workflow_id,
                attempt=info.attempt,
                error=f"{fail['type']}: {fail['message']}",
            )
        finally:
            _current_activity.reset(token)

    def _complete(self, shard: int, item: list[Any]) -> None:
        self._done.append((shard, item))
        self._done_event.set()

    async def _flusher(self) -> None:
        while not (self._closing and not self._done):
            await self._done_event.wait()
            self._done_event.clear()
            try:
                await self._flush_done()
            except _TRANSIENT as e:
                reraise_if_cancelling()
                log.warning("could not report activity results; retrying", error=str(e))
                await asyncio.sleep(0.5)
                self._done_event.set()

    async def _flush_done(self) -> None:
        if not self._done:
            return
        batch, self._done = self._done, []
        by_shard: dict[int, list[Any]] = collections.defaultdict(list)
        for shard, item in batch:
            by_shard[shard] += item
        try:
            for shard, flat in by_shard.items():
                res = await self.scripts.call(
                    "act_done", self.ks.timers(shard), [self.ks.prefix(shard), *flat]
                )
                for r in res:
                    if text(r) == "refused":
                        self.stats.refused += 1
                        log.warning(
                            "activity result refused: the attempt was timed out, cancelled or taken over"
                        )
        except BaseException:
            self._done = batch + self._done
            raise
        self._pump_wake.set()

    def _heartbeat(self, r: _Running, details: list[Any]) -> None:
        r.details = jsonable(details)
        r.dirty = True
        loop = self._loop
        assert loop is not None
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._maybe_send(r)
        else:
            loop.call_soon_threadsafe(self._maybe_send, r)

    def _maybe_send(self, r: _Running) -> None:
        if r.sending or r.timer is not None or r.gone or not r.dirty:
            return
        wait = r.last_sent + r.throttle - time.monotonic()
        if wait <= 0:
            r.send_task = asyncio.ensure_future(self._send_heartbeat(r))
        else:

            def fire() -> None:
                r.timer = None
                self._maybe_send(r)

            r.timer = asyncio.get_running_loop().call_later(wait, fire)

    async def _send_heartbeat(self, r: _Running) -> None:
        r.sending, r.dirty, r.last_sent = True, False, time.monotonic()
        try:
            res = await self.scripts.call(
                "heartbeat",
                self.ks.timers(r.shard),
                [self.ks.prefix(r.shard), r.run, r.seq, r.attempt, pack(r.details)],
            )
        except _TRANSIENT as e:
            reraise_if_cancelling()
            log.warning("heartbeat not recorded", error=str(e))
            res = b"ok"
        finally:
            r.sending = False
        if text(res) == "gone":
            r.gone = True
            r.task.cancel()
        elif r.dirty:
            self._maybe_send(r)

    # -- timers, reclaim, dead letters --------------------------------------------------
    async def _pump_loop(self) -> None:
        last_reclaim = 0.0
        while not self._closing:
            wait = self.pump_interval
            try:
                for s in self.ks.all_shards():
                    handled, next_due, now = await self.scripts.call(
                        "pump", self.ks.timers(s), [self.ks.prefix(s), 500, self.client.settings.retention_ms]
                    )
                    if handled >= 500:
                        wait = 0
                    elif next_due > 0:
                        wait = min(wait, max(0.002, (next_due - now) / 1000))
                if time.monotonic() - last_reclaim > min(self.reclaim_idle_ms / 2000, 5.0):
                    last_reclaim = time.monotonic()
                    await self._reclaim()
            except _TRANSIENT as e:
                reraise_if_cancelling()
                log.warning("timer pump: redis unavailable", error=str(e))
                wait = 0.5
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._pump_wake.wait(), wait)
            self._pump_wake.clear()

    async def _reclaim(self) -> None:
        """Take over task messages another consumer read and never finished (it died)."""
        if self._stopping.is_set():
            return
        kinds = []
        if self.workflows:
            kinds.append(("wft", self.client.settings.workflow_task_timeout_ms))
        if self.activities:
            kinds.append(("act", self.reclaim_idle_ms))
        for s in self.ks.all_shards():
            for kind, idle in kinds:
                stream = self.ks.queue(s, self.task_queue, kind)
                res = await self.redis.xautoclaim(stream, GROUP, self.identity, idle, "0-0", count=100)
                entries = [e for e in res[1] if e and e[1] is not None]
                if not entries:
                    continue
                log.info("reclaimed task messages", stream=stream, count=len(entries))
                if kind == "wft":
                    await self._process_wfts(s, stream, entries)
                else:
                    await self._start_activities(s, stream, entries)

    async def _malformed(self, stream: str, msgid: str, reason: str) -> None:
        info = await self.redis.xpending_range(stream, GROUP, min=msgid, max=msgid, count=1)
        deliveries = int(info[0]["times_delivered"]) if info else self.max_deliveries
        if deliveries >= self.max_deliveries:
            s = self._shard_of_stream(stream)
            moved = await self.scripts.call(
                "dead_letter",
                self.ks.timers(s),
                [self.ks.prefix(s), stream, msgid, f"{reason} (after {deliveries} deliveries)"],
            )
            if moved:
                self.stats.dead_lettered += 1
                log.error(
                    "task message moved to dead-letter stream",
                    stream=stream,
                    dead_letter_stream=f"{stream}:dlq",
                    message_id=msgid,
                    reason=reason,
                    deliveries=deliveries,
                )
        else:
            log.warning(
                "undecodable task message left for redelivery",
                stream=stream,
                message_id=msgid,
                reason=reason,
                deliveries=deliveries,
            )
