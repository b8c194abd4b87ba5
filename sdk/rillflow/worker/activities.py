"""Running activity attempts: their local deadline, their heartbeats, their results.

An attempt's deadline is Redis's (start-to-close, the next heartbeat, schedule-to-close:
whichever is first); every heartbeat Redis records moves it, here as there. A plain
``def`` activity runs in a thread; a thread that outlives its attempt (it ignored the
timeout) keeps its slot until it ends, so the worker never runs more threads than
``max_concurrent_activities``. Results are reported in batches, one script call per
shard.

Eager dispatch: a workflow task this worker completes hands it up to a few of the
activities it schedules, started in its name in the same call (``reserve`` holds their
slots while the call is out, ``run_handed`` runs them), and an outcome that wakes a
run this worker caches comes back with the run's next workflow task, started for it
(``workflow_tasks.take_started`` runs it). Neither goes through a task stream.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import structlog
from redis.exceptions import ResponseError

from rillflow.activity import ActivityContext, ActivityDefinition, ActivityInfo, _current_activity
from rillflow.durations import time_of_ms
from rillflow.errors import (
    InvalidInputError,
    InvalidResultError,
    WorkflowError,
    failure_from_exception,
    jsonable,
)
from rillflow.payloads import check_size
from rillflow.worker.context import BadMessage, Context, Streak, field, int_field
from rillflow_runtime.codec import pack, text, unpack
from rillflow_runtime.connections import TRANSIENT, reraise_if_cancelling
from rillflow_runtime.keyspace import GROUP
from rillflow_runtime.model import Reply
from rillflow_runtime.protocol import (
    ActivityOutcome,
    ActivityRoute,
    ActStarted,
    ActStartItem,
    EagerStart,
    WftStarted,
)

if TYPE_CHECKING:
    from rillflow.worker.workflow_tasks import WorkflowTasks

log = structlog.get_logger("rillflow.worker")

BACKLOG_HANDBACK_IDLE_MS = 86_400_000
ENDED_MEMORY_S = 600.0  # well past the pump recording the timeout of an attempt that ended here


@dataclass
class _Attempt:
    task: asyncio.Task[None]
    shard: int
    run: str
    seq: int
    attempt: int
    throttle: float  # seconds between heartbeats sent to Redis
    deadline: asyncio.Timeout | None = None
    details: Any = None
    dirty: bool = False
    sending: bool = False
    last_sent: float = 0.0
    timer: asyncio.TimerHandle | None = None
    gone: bool = False


class _Thread:
    """A sync activity's thread, as the event loop sees it."""

    def __init__(self) -> None:
        self.started = False  # set by the thread: the function began (anyio may never start it)
        self.finished = False  # set by the thread
        self.abandoned = False  # set by the loop when the attempt ended first


class Activities:
    def __init__(self, ctx: Context, activities: dict[str, ActivityDefinition], max_concurrent: int) -> None:
        self.ctx = ctx
        self.activities = activities
        self.max_concurrent = max_concurrent
        self.running: dict[tuple[str, int], _Attempt] = {}
        # attempts that ended here and whose end Redis has not recorded yet (no report,
        # or a report not yet flushed): Redis still says this worker runs them, so a
        # reclaim of their message gets "yours" and must not run them again
        # (run, seq, attempt -> when it ended)
        self._ended: dict[tuple[str, int, int], float] = {}
        self.abandoned_threads = 0
        self._slots = asyncio.Event()
        self._slots.set()
        self._done: list[tuple[int, ActivityOutcome]] = []
        self._done_event = asyncio.Event()
        self._closing = False
        self._limiter: anyio.CapacityLimiter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reserved = 0  # slots held for activities a completion in flight may hand over
        self._starting = 0  # attempts in an act_start call that has not answered yet
        # outcomes sent with an offer to take the workflow task they wake, not answered yet
        # (run, seq, attempt)
        self._offered: set[tuple[str, int, int]] = set()
        # messages a read brought beyond the free slots (a completion took some while the
        # read was blocked): started, in order, as slots free up, before anything is read
        self._backlog: collections.deque[tuple[int, str, Any]] = collections.deque()
        # this worker's workflow tasks, when it runs them too: they take the tasks that
        # activity outcomes wake (set by the Worker)
        self.workflow_tasks: WorkflowTasks | None = None

    def free(self) -> int:
        return (
            self.max_concurrent - len(self.running) - self.abandoned_threads - self._reserved - self._starting
        )

    def serves(self, name: str) -> bool:
        return name in self.activities

    def reserve(self, wanted: int) -> int:
        """Hold up to ``wanted`` slots for activities handed over by a completion; the
        caller ``release``s them all when its reply is in (or it failed)."""
        if self._closing or self.ctx.stopping.is_set() or self._limiter is None:
            return 0
        n = max(0, min(wanted, self.free()))
        self._reserved += n
        return n

    def release(self, n: int) -> None:
        self._reserved -= n
        if n:
            self._slots.set()

    def run_handed(
        self,
        shard: int,
        run: str,
        seq: int,
        scheduled: bytes,
        started: WftStarted,
        now_ms: int,
        deadline_ms: int,
    ) -> None:
        """Run the first attempt of an activity that the completion of ``started`` (a
        workflow task of this worker) handed over, started in this worker's name."""
        ctx = self.ctx
        sticky = ctx.identity if self.workflow_tasks is not None and self.workflow_tasks.sticky_ms else ""
        route = ActivityRoute(started.workflow_id, ctx.task_queue, sticky, "", "")
        item = ActStartItem(run, seq, 1, "")
        st = ActStarted(
            Reply.OK, scheduled, b"", started.workflow_id, started.workflow_type, now_ms, deadline_ms, route
        )
        self._launch_or_fail(shard, item, st, route)

    async def poll(self) -> None:
        self._loop = asyncio.get_running_loop()
        # its own limiter: anyio's default one is shared by every to_thread call in the
        # process and holds 40 threads, fewer than the activities this worker may run
        self._limiter = anyio.CapacityLimiter(self.max_concurrent)
        streams = self.ctx.streams("act")
        streak = Streak("activity poller: redis unavailable")
        batch = Streak("activity batch interrupted; its tasks will be retried")
        while not self.ctx.stopping.is_set():
            await self._slots.wait()
            if self.ctx.stopping.is_set():  # woken by the drain: a stopping worker starts nothing
                break
            free = self.free()
            if free <= 0:
                self._slots.clear()
                continue
            if self._backlog:
                batches = self._from_backlog(free)
            else:
                batches = await self.ctx.read(streams, min(free, self.ctx.batch_size), streak)
            for shard, stream, entries in batches:
                try:
                    await self.start(shard, stream, entries)
                    batch.ok()
                except TRANSIENT as e:
                    await batch.failed(e)

    async def hand_back_backlog(self) -> None:
        """On a graceful stop: the messages read beyond free slots and never started are
        marked idle for a day (XCLAIM IDLE, JUSTID: their delivery count is kept), so the
        next reclaim of any live worker takes them, instead of ``reclaim_idle`` on."""
        by_stream: dict[str, list[Any]] = {}
        while self._backlog:
            _shard, stream, (msgid, _fields) = self._backlog.popleft()
            by_stream.setdefault(stream, []).append(text(msgid))
        for stream, ids in by_stream.items():
            await self.ctx.redis.xclaim(
                stream, GROUP, self.ctx.identity, 0, ids, idle=BACKLOG_HANDBACK_IDLE_MS, justid=True
            )
        if by_stream:
            log.info(
                "handed back activity messages it read and never started",
                count=sum(map(len, by_stream.values())),
            )

    def wake(self) -> None:
        """Let a poller waiting for a slot see that the worker stops."""
        self._slots.set()

    def _from_backlog(self, n: int) -> list[tuple[int, str, Any]]:
        """Up to ``n`` messages of the backlog, as reads return them: per stream."""
        out: dict[tuple[int, str], list[Any]] = {}
        for _ in range(min(n, len(self._backlog))):
            shard, stream, entry = self._backlog.popleft()
            out.setdefault((shard, stream), []).append(entry)
        return [(shard, stream, entries) for (shard, stream), entries in out.items()]

    async def start(self, shard: int, stream: str, entries: Any) -> None:
        entries = list(entries)
        room = max(0, self.free())
        if len(entries) > room:  # they stay pending here (claimable by others if it lasts)
            self._backlog.extend((shard, stream, e) for e in entries[room:])
            entries = entries[:room]
        # their slots are taken from here on: a completion that would hand this worker
        # activities meanwhile must not count them as free
        self._starting += len(entries)
        try:
            await self._start(shard, stream, entries)
        finally:
            self._starting -= len(entries)
        if self.free() <= 0:
            self._slots.clear()

    async def _start(self, shard: int, stream: str, entries: list[Any]) -> None:
        items: list[ActStartItem] = []
        for msgid, fields in entries:
            mid = text(msgid)
            try:
                items.append(
                    ActStartItem(
                        field(fields, "run"), int_field(fields, "seq"), int_field(fields, "att"), mid
                    )
                )
            except BadMessage as e:
                await self.ctx.bad_message(shard, stream, mid, f"activity task {e}")
        if not items:
            return
        started = await self.ctx.protocol.act_start(shard, stream, self.ctx.identity, items)
        now = time.monotonic()
        for k in [k for k, t in self._ended.items() if now - t > ENDED_MEMORY_S]:
            del self._ended[k]
        for it, st in zip(items, started, strict=True):
            if st.reply is not Reply.OK or st.route is None or (it.run_id, it.seq) in self.running:
                continue  # not ours to run, or ours already (reclaimed)
            if (it.run_id, it.seq, it.attempt) in self._ended:  # reclaimed from ourselves
                continue
            self._launch_or_fail(shard, it, st, st.route)

    def _launch_or_fail(self, shard: int, it: ActStartItem, st: ActStarted, route: ActivityRoute) -> None:
        try:
            self._launch(shard, it, st, route)
        except Exception as e:  # an unreadable scheduled body: fail the attempt, visibly
            log.error("activity task cannot be run", run_id=it.run_id, seq=it.seq, error=str(e))
            body = pack({"seq": it.seq, "att": it.attempt, "failure": failure_from_exception(e)})
            self.report(shard, ActivityOutcome(it.run_id, it.seq, it.attempt, body, route, failed=True))

    def _launch(self, shard: int, it: ActStartItem, st: ActStarted, route: ActivityRoute) -> None:
        sched = unpack(st.scheduled)
        if not isinstance(sched, dict):
            raise BadMessage("the scheduled activity's body is not a map")
        hbt_ms = int(sched.get("heartbeat_ms") or 0)
        s2c_ms = int(sched.get("schedule_to_close_ms") or 0)
        info = ActivityInfo(
            activity_name=str(sched.get("name", "?")),
            attempt=it.attempt,
            workflow_id=st.workflow_id,
            run_id=it.run_id,
            workflow_type=st.workflow_type,
            task_queue=self.ctx.task_queue,
            seq=it.seq,
            heartbeat_details=list(unpack(st.heartbeat_details)) if st.heartbeat_details else [],
            start_to_close_timeout=timedelta(milliseconds=int(sched.get("start_to_close_ms") or 0)),
            heartbeat_timeout=timedelta(milliseconds=hbt_ms) if hbt_ms else None,
            schedule_to_close_timeout=timedelta(milliseconds=s2c_ms) if s2c_ms else None,
            started_time=time_of_ms(st.now_ms),
            deadline=time_of_ms(st.deadline_ms),
        )
        key = (it.run_id, it.seq)
        # `a` is bound below, before the task's first step can heartbeat
        ctx = ActivityContext(info, lambda details: self._heartbeat(a, details), lambda: a.gone)
        budget = max(0.001, (st.deadline_ms - st.now_ms) / 1000)
        task = asyncio.create_task(
            self._run(shard, sched, ctx, budget, route),
            name=f"activity:{info.activity_name}:{info.workflow_id}:{it.seq}",
        )
        a = _Attempt(
            task, shard, it.run_id, it.seq, it.attempt, throttle=(0.8 * hbt_ms / 1000) if hbt_ms else 30.0
        )
        self.running[key] = a
        self.ctx.stats.activities += 1

        def finished(_t: asyncio.Task[None]) -> None:
            if self.running.get(key) is a:
                del self.running[key]
            self._ended[(it.run_id, it.seq, it.attempt)] = time.monotonic()
            if a.timer:
                a.timer.cancel()
            self._slots.set()

        task.add_done_callback(finished)

    async def _run(
        self, shard: int, sched: dict[str, Any], ctx: ActivityContext, budget: float, route: ActivityRoute
    ) -> None:
        info = ctx.info
        adef = self.activities.get(info.activity_name)
        token = _current_activity.set(ctx)
        non_retryable = False
        deadline = asyncio.timeout(budget)
        a = self.running.get((info.run_id, info.seq))
        if a is not None:
            a.deadline = deadline
        try:
            if adef is None:
                raise WorkflowError(
                    f"activity '{info.activity_name}' is not registered on worker {self.ctx.identity} "
                    f"(task queue '{self.ctx.task_queue}'); it serves: {sorted(self.activities)}",
                    type="ActivityNotRegistered",
                )
            try:
                args = adef.sig.decode_input(sched.get("input"))
            except InvalidInputError:
                non_retryable = True
                raise
            kwargs = self._dependencies(adef, args)
            async with deadline:
                if adef.is_async:
                    result = await (adef.fn(**kwargs) if kwargs is not None else adef.fn(*args))
                else:
                    result = await self._in_thread(adef, args, kwargs)
            body = pack({"seq": info.seq, "att": info.attempt, "result": adef.sig.dump_result(result)})
            check_size(body, self.ctx.client.max_payload_bytes, f"result of activity '{info.activity_name}'")
            self.report(shard, ActivityOutcome(info.run_id, info.seq, info.attempt, body, route))
        except asyncio.CancelledError:
            # shutdown past the grace period, or the attempt is gone (timed out or
            # cancelled): nothing to report; Redis's deadline decides
            return
        except TimeoutError as e:
            if not deadline.expired():  # the activity's own timeout, not the attempt's
                self._report_failure(shard, ctx, e, non_retryable, route)
                return
            # the attempt's deadline passed: Redis's timer records the timeout and
            # retries; a report from here would only race it
            log.info(
                "activity attempt ran out of time",
                activity=info.activity_name,
                workflow_id=info.workflow_id,
                attempt=info.attempt,
            )
        except Exception as e:
            self._report_failure(shard, ctx, e, non_retryable, route)
        except BaseException as e:  # SystemExit, KeyboardInterrupt: a request to stop
            self.ctx.request_exit(e, f"activity '{info.activity_name}'")
        finally:
            _current_activity.reset(token)

    def _dependencies(self, adef: ActivityDefinition, args: list[Any]) -> dict[str, Any] | None:
        """The call's arguments by name, with the worker's values for its Depends
        parameters (None: it has none, and is called by position)."""
        if not adef.sig.depends:
            return None
        scope = self.ctx.dependencies
        kwargs = dict(zip(adef.sig.param_names, args, strict=False))
        for name, dep in adef.sig.depends.items():
            kwargs[name] = scope.value(dep)
        return kwargs

    async def _in_thread(
        self, adef: ActivityDefinition, args: list[Any], kwargs: dict[str, Any] | None = None
    ) -> Any:
        loop = asyncio.get_running_loop()
        cv = contextvars.copy_context()
        th = _Thread()

        def ended() -> None:
            if th.abandoned:
                self.abandoned_threads -= 1
                self._slots.set()
                log.info("an abandoned activity thread ended", still_running=self.abandoned_threads)

        def call() -> Any:
            th.started = True
            try:
                return cv.run(adef.fn, **kwargs) if kwargs is not None else cv.run(adef.fn, *args)
            finally:
                th.finished = True
                loop.call_soon_threadsafe(ended)

        try:
            return await anyio.to_thread.run_sync(call, abandon_on_cancel=True, limiter=self._limiter)
        except asyncio.CancelledError:
            if th.started and not th.finished:
                th.abandoned = True
                self.abandoned_threads += 1
                log.warning(
                    "a sync activity's thread outlived its attempt (it cannot be interrupted); "
                    "its slot stays taken until it ends",
                    activity=adef.name,
                    threads=self.abandoned_threads,
                    thread=threading.get_ident(),
                )
            raise

    def _report_failure(
        self, shard: int, ctx: ActivityContext, e: BaseException, non_retryable: bool, route: ActivityRoute
    ) -> None:
        info = ctx.info
        fail = failure_from_exception(e)
        # a result the annotation refuses is a bug in the activity: retrying repeats it
        nr = non_retryable or isinstance(e, InvalidResultError) or bool(fail.get("non_retryable"))
        a = self.running.get((info.run_id, info.seq))
        hb = pack(a.details) if a is not None and a.details is not None else b""
        body = pack({"seq": info.seq, "att": info.attempt, "failure": fail})
        self.report(shard, ActivityOutcome(info.run_id, info.seq, info.attempt, body, route, True, nr, hb))
        log.info(
            "activity attempt failed",
            activity=info.activity_name,
            workflow_id=info.workflow_id,
            attempt=info.attempt,
            error=f"{fail['type']}: {fail['message']}",
        )

    # -- results ----------------------------------------------------------------------------
    def report(self, shard: int, outcome: ActivityOutcome) -> None:
        self._done.append((shard, outcome))
        self._done_event.set()

    def close(self) -> None:
        """The flusher reports what is left, then ends."""
        self._closing = True
        self._done_event.set()

    async def flush_loop(self) -> None:
        streak = Streak("could not report activity results")
        while not (self._closing and not self._done):
            if not self._done:  # (re)started with results waiting: no wake-up is lost
                await self._done_event.wait()
            self._done_event.clear()
            try:
                await self._flush()
                streak.ok()
            except (*TRANSIENT, ResponseError) as e:  # a refusal too (OOM, READONLY, BUSY)
                await streak.failed(e)

    async def _flush(self) -> None:
        if not self._done:
            return
        batch, self._done = self._done, []
        by_shard: dict[int, list[ActivityOutcome]] = collections.defaultdict(list)
        for shard, outcome in batch:
            by_shard[shard].append(outcome)
        pending = dict(by_shard)
        retrying = False
        try:
            for shard, outcomes in by_shard.items():
                replies = await self.ctx.protocol.act_done(shard, outcomes, self._eager(outcomes))
                del pending[shard]
                woken: list[tuple[str, WftStarted]] = []
                for o, r in zip(outcomes, replies, strict=True):
                    self._ended.pop((o.run_id, o.seq, o.attempt), None)  # recorded: Redis knows
                    retrying = retrying or r.reply is Reply.RETRY
                    if r.task is not None and self.workflow_tasks is not None:
                        woken.append((o.run_id, r.task))
                    if r.reply is Reply.REFUSED:
                        self.ctx.stats.refused += 1
                        log.warning(
                            "activity result refused: the attempt was timed out, cancelled or taken over",
                            run_id=o.run_id,
                            seq=o.seq,
                            attempt=o.attempt,
                        )
                    self._offered.discard((o.run_id, o.seq, o.attempt))  # answered
                if woken and self.workflow_tasks is not None:
                    self.workflow_tasks.take_started(shard, woken)
        finally:
            # what was not sent goes out with the next flush; what was sent is not repeated
            self._done = [(s, o) for s, outs in pending.items() for o in outs] + self._done
        if retrying:  # a retry's due time may come before the pump's next look
            self.ctx.pump_wake.set()

    def _eager(self, outcomes: list[ActivityOutcome]) -> EagerStart | None:
        """Offer to take the workflow tasks these outcomes wake, for the runs of this
        worker's queue (Redis starts one only for a run whose last task this worker ran).
        Not while stopping, but for an outcome sent with the offer before (its answer was
        lost): Redis may have started the task for this worker then, and only a repeat with
        the offer hands it back (the drain waits for it to run)."""
        tasks = self.workflow_tasks
        if tasks is None:
            return None
        stopping = self.ctx.stopping.is_set()
        offer = [
            o
            for o in outcomes
            if o.route.task_queue == self.ctx.task_queue
            and not (stopping and (o.run_id, o.seq, o.attempt) not in self._offered)
        ]
        if not offer:
            return None
        self._offered.update((o.run_id, o.seq, o.attempt) for o in offer)
        return tasks.eager_start({o.run_id: tasks.cache.position(o.run_id) for o in offer})

    # -- heartbeats -------------------------------------------------------------------------
    def _heartbeat(self, a: _Attempt, details: list[Any]) -> None:
        a.details = jsonable(details)
        a.dirty = True
        loop = self._loop
        assert loop is not None
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._maybe_send(a)
        else:  # from a sync activity's thread
            loop.call_soon_threadsafe(self._maybe_send, a)

    def _maybe_send(self, a: _Attempt) -> None:
        if a.sending or a.timer is not None or a.gone or not a.dirty or a.task.done():
            return
        wait = a.last_sent + a.throttle - time.monotonic()
        if wait <= 0:
            t = asyncio.ensure_future(self._send_heartbeat(a))
            t.add_done_callback(_ignore_result)
        else:

            def fire() -> None:
                a.timer = None
                self._maybe_send(a)

            a.timer = asyncio.get_running_loop().call_later(wait, fire)

    async def _send_heartbeat(self, a: _Attempt) -> None:
        a.sending, a.dirty, a.last_sent = True, False, time.monotonic()
        try:
            res = await self.ctx.protocol.heartbeat(a.shard, a.run, a.seq, a.attempt, pack(a.details))
        except TRANSIENT as e:
            reraise_if_cancelling()
            log.warning("heartbeat not recorded", error=str(e))
            return
        finally:
            a.sending = False
        if res.reply is not Reply.OK:
            a.gone = True
            a.task.cancel()
            return
        # Redis moved the attempt's deadline: move the local one with it
        if a.deadline is not None and not a.deadline.expired():
            loop = asyncio.get_running_loop()
            a.deadline.reschedule(loop.time() + max(0.0, (res.deadline_ms - res.now_ms) / 1000))
        if a.dirty:
            self._maybe_send(a)


def _ignore_result(t: asyncio.Future[None]) -> None:
    if not t.cancelled():
        t.exception()
