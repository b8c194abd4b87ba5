"""The workflow-task pipeline: poll, start, activate, then complete or fail.

One script call starts every task a read returned and one completes them all. A task
runs on the run's cached instance when the cache is exactly as far as the history,
else on a fresh instance that replays the history first. At most one task per run is
in flight in this worker: a second task of the same run (the first timed out and was
scheduled again) waits for the first to finish.

Eager dispatch: a completion hands this worker's activity poller a few of the
activities it schedules, started in the same call; and a task that an activity outcome
of this worker woke arrives started already (``take_started``), with no task message.

Speculative first tasks: a run's first task message carries its start event, so the
task runs at once, on Redis's time as ``RedisClock`` tells it, and one call records its
start and completion together (see wft_complete.lua). When Redis cannot (something
happened to the run meanwhile), it starts the task the usual way instead and the task
runs again from the history; nothing of the speculative run is kept.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from rillflow.errors import WorkflowError, failure_from_exception
from rillflow.executor import (
    HISTORY_MAX_EVENTS,
    SUGGEST_CONTINUE_EVENTS,
    Command,
    WorkflowInfo,
    WorkflowInstance,
    run_task,
)
from rillflow.history import HistoryEvent
from rillflow.worker.context import BadMessage, Context, Streak, field, int_field
from rillflow.worker.run_cache import RunCache, discard
from rillflow.workflow import WorkflowDefinition
from rillflow_runtime.codec import pack, text
from rillflow_runtime.connections import TRANSIENT, reraise_if_cancelling
from rillflow_runtime.model import CommandKind, EventType, Reply
from rillflow_runtime.protocol import (
    CompletionReply,
    EagerStart,
    TaskCompletion,
    WftFailure,
    WftStarted,
    WftStartItem,
)

if TYPE_CHECKING:
    from rillflow.worker.activities import Activities

log = structlog.get_logger("rillflow.worker")

MAX_EVENTS_PER_START = 1000


@dataclass(frozen=True)
class _Task:
    """A workflow task to run: read from a stream (``started`` None: start it first), or
    started already for this worker by an activity outcome it reported, or a run's first
    task to run speculatively (``started`` made of its message, with no fence)."""

    message_id: str
    run: str
    workflow_id: str
    started: WftStarted | None = None

    @property
    def speculative(self) -> bool:
        return self.started is not None and not self.started.fence


@dataclass
class _Activated:
    run: str
    message_id: str
    started: WftStarted
    instance: WorkflowInstance
    commands: list[Command]

    @property
    def speculative(self) -> bool:
        """Run from its message, not started in Redis: it has no fence yet."""
        return not self.started.fence


def _warn_if_long(st: WftStarted, run: str, events: list[HistoryEvent]) -> None:
    """Said at every 4,096th event past the suggested size, well before the limit at
    which a task fails the run (lib.lua's HISTORY_MAX_*): by the task whose events cross
    it, not again by every task that replays the history (where the task's events start:
    after ``since``, or, with the whole history, after the last completed task)."""
    n = st.last_event_id
    prev = st.since or max(
        (e.event_id for e in events if e.type == EventType.WORKFLOW_TASK_COMPLETED), default=0
    )
    if n >= SUGGEST_CONTINUE_EVENTS and (n // SUGGEST_CONTINUE_EVENTS) != (prev // SUGGEST_CONTINUE_EVENTS):
        log.warning(
            "workflow history is long: continue as new (workflow.should_continue_as_new())",
            workflow_id=st.workflow_id,
            run_id=run,
            workflow_type=st.workflow_type,
            events=n,
            bytes=st.history_bytes,
            fails_at_events=HISTORY_MAX_EVENTS,
        )


class WorkflowTasks:
    def __init__(
        self,
        ctx: Context,
        workflows: dict[str, WorkflowDefinition],
        cache: RunCache,
        sticky_ms: int,
        max_eager_activities: int = 0,
    ) -> None:
        self.ctx = ctx
        self.workflows = workflows
        self.cache = cache
        self.sticky_ms = sticky_ms
        self.max_eager_activities = max_eager_activities
        # this worker's activities, when it runs them too: they take the activities a
        # completion schedules on this queue, while they have free slots (set by the Worker)
        self.activities: Activities | None = None
        self._in_flight: dict[str, asyncio.Event] = {}  # run id -> set when its task ends
        self._deferred: set[asyncio.Task[None]] = set()

    def sticky_streams(self) -> dict[str, int]:
        if not self.sticky_ms:
            return {}
        ks = self.ctx.ks
        return {ks.sticky(s, self.ctx.task_queue, self.ctx.identity): s for s in ks.all_shards()}

    def streams(self) -> dict[str, int]:
        return {**self.ctx.streams("wft"), **self.sticky_streams()}

    async def poll(self) -> None:
        await self.ctx.poll(
            "workflow task",
            self.streams(),
            self.process,
            "workflow task batch interrupted; its tasks will be retried",
        )

    async def wait_deferred(self) -> None:
        while self._deferred:
            await asyncio.gather(*self._deferred, return_exceptions=True)

    def eager_start(self, positions: Mapping[str, tuple[int, str]]) -> EagerStart:
        """What an activity outcome's report needs to bring back the workflow task it
        wakes, started for this worker, for these runs' cached positions."""
        ctx = self.ctx
        return EagerStart(
            ctx.identity, ctx.settings.workflow_task_timeout_ms, MAX_EVENTS_PER_START, positions
        )

    def take_started(self, shard: int, started: list[tuple[str, WftStarted]]) -> None:
        """Run workflow tasks Redis started for this worker when it reported the activity
        outcomes that woke them; they have no task message (their stream, for the
        completion's declarations, is the queue's shared one)."""
        stream = self.ctx.ks.queue(shard, self.ctx.task_queue, "wft")
        tasks = [_Task("", run, st.workflow_id, st) for run, st in started]
        self._spawn(f"rillflow-woken-wft-{shard}", self._admit(shard, stream, tasks))

    # -- one batch ----------------------------------------------------------------------
    async def process(self, shard: int, stream: str, entries: Iterable[Any]) -> None:
        """Start, run and complete the tasks of one read."""
        tasks: list[_Task] = []
        for msgid, fields in entries:
            mid = text(msgid)  # stream ids are ASCII: Redis makes them
            try:
                run = field(fields, "run")
                wid = field(fields, "wid", default="")  # '' in a message of an older version
                first = self._first_task(shard, run, wid, fields)
            except BadMessage as e:
                await self.ctx.bad_message(shard, stream, mid, f"workflow task {e}")
                continue
            tasks.append(_Task(mid, run, wid, first))
        await self._admit(shard, stream, tasks)

    def _first_task(self, shard: int, run: str, wid: str, fields: Any) -> WftStarted | None:
        """The first task of a new run as its message carries it (its start event, see
        start.lua), to run speculatively; None when it does not (or not readably: the
        task is started the usual way then), or when this worker cannot yet tell Redis's
        time."""
        body = fields.get(b"ev")
        if (
            body is None
            or not wid
            or self.ctx.clock(shard).now_ms() is None
            or self.cache.peek(run) is not None
        ):
            return None
        try:
            start_ms, wtype = int_field(fields, "t"), field(fields, "wtype")
        except BadMessage:
            return None
        entry = (
            b"1-0",
            {
                b"type": EventType.WORKFLOW_EXECUTION_STARTED.value.encode(),
                b"t": b"%d" % start_ms,
                b"d": body,
            },
        )
        return WftStarted(
            Reply.OK,
            workflow_id=wid,
            workflow_type=wtype,
            last_event_id=1,
            start_ms=start_ms,
            events=[entry],
            history_bytes=len(body),
        )

    async def _admit(self, shard: int, stream: str, tasks: list[_Task]) -> None:
        """Run ``tasks`` as one batch; those of runs already in flight here are deferred
        until those finish."""
        now: list[_Task] = []
        runs: set[str] = set()
        for t in tasks:
            if t.run in self._in_flight or t.run in runs:
                self._defer(shard, stream, t)
            else:
                now.append(t)
                runs.add(t.run)
        if not now:
            return
        done = {t.run: asyncio.Event() for t in now}
        self._in_flight.update(done)
        try:
            await self._run_batch(shard, stream, now)
        finally:
            for run, ev in done.items():
                if self._in_flight.get(run) is ev:
                    del self._in_flight[run]
                ev.set()

    def _defer(self, shard: int, stream: str, task: _Task) -> None:
        async def after() -> None:
            while (ev := self._in_flight.get(task.run)) is not None:
                await ev.wait()
            await self._admit(shard, stream, [task])

        self._spawn(f"rillflow-deferred-wft-{task.run}", after())

    def _spawn(self, name: str, work: Any) -> None:
        """Run ``work`` (a batch's admission) on its own; Redis failing under it leaves its
        tasks to their retry paths (the workflow task timeout)."""

        async def guarded() -> None:
            try:
                await work
            except TRANSIENT as e:
                reraise_if_cancelling()
                log.warning("workflow task interrupted; it will be retried", error=str(e))

        t = asyncio.create_task(guarded(), name=name)
        self._deferred.add(t)
        t.add_done_callback(self._deferred.discard)

    async def _run_batch(self, shard: int, stream: str, tasks: list[_Task]) -> None:
        ctx = self.ctx
        to_start = [t for t in tasks if t.started is None]
        fresh = iter(
            await ctx.protocol.wft_start(
                shard,
                stream,
                ctx.settings.workflow_task_timeout_ms,
                MAX_EVENTS_PER_START,
                ctx.identity,
                [
                    WftStartItem(t.run, t.message_id, *self.cache.position(t.run), workflow_id=t.workflow_id)
                    for t in to_start
                ],
            )
            if to_start
            else []
        )
        started = [t.started or next(fresh) for t in tasks]
        for t, st in zip(tasks, started, strict=True):
            if not t.speculative and st.reply is Reply.OK:
                ctx.clock(shard).observe(st.now_ms)
        activated: list[_Activated] = []
        failures: list[WftFailure] = []
        try:
            for t, st in zip(tasks, started, strict=True):
                msgid, run = t.message_id, t.run
                if st.reply is not Reply.OK:
                    continue
                if t.speculative:
                    now = ctx.clock(shard).now_ms()
                    if now is None:  # (forgotten since the read)
                        self._defer(shard, stream, _Task(msgid, run, t.workflow_id))
                        continue
                    st = replace(st, now_ms=max(now, st.start_ms))
                try:
                    act = await self._activate(shard, run, msgid, st)
                except TRANSIENT:
                    # Redis, not the workflow, failed: the task times out and runs again
                    raise
                except (KeyboardInterrupt, SystemExit) as e:
                    # not a workflow failure: the worker stops, the task times out and
                    # runs again elsewhere
                    ctx.request_exit(e, f"workflow '{st.workflow_type}' ({st.workflow_id})")
                    continue
                except Exception as e:
                    if t.speculative:
                        # started the usual way, it runs again and records the failure
                        self._defer(shard, stream, _Task(msgid, run, t.workflow_id))
                        continue
                    ctx.stats.workflow_tasks += 1
                    ctx.stats.workflow_task_failures += 1
                    log.error(
                        "workflow task failed",
                        workflow_id=st.workflow_id,
                        run_id=run,
                        workflow_type=st.workflow_type,
                        attempt=st.attempt,
                        error=f"{type(e).__name__}: {e}",
                    )
                    body = pack({"failure": failure_from_exception(e)})
                    failures.append(WftFailure(run, st.workflow_id, st.fence, msgid, body))
                    continue
                ctx.stats.workflow_tasks += 1
                activated.append(act)
            if activated:
                await self._complete(shard, stream, activated, failures)
                activated = []
        finally:
            for a in activated:  # not completed (Redis failed): nothing of it is kept
                discard(a.instance)
        if failures:
            await ctx.protocol.wft_fail(shard, stream, failures)
            ctx.pump_wake.set()

    async def _activate(self, shard: int, run: str, msgid: str, st: WftStarted) -> _Activated:
        """Run the task on the cached instance if it is exactly as far as the history,
        else on a fresh one that replays the history first."""
        events = [HistoryEvent.from_entry(e) for e in st.events]
        if len(st.events) >= MAX_EVENTS_PER_START:
            events += await self.history_after(shard, st.workflow_id, run, events[-1].event_id)
        # taken only now, with no await until it is committed or discarded: an instance
        # dropped on the way would be finalized by the garbage collector, running its code
        cached = self.cache.take(run)
        hit = (
            cached is not None
            and st.since == cached.last_event_id  # Redis is not behind the instance
            and not any(e.type == EventType.WORKFLOW_TASK_COMPLETED for e in events)
        )
        history = (st.last_event_id, max(st.history_bytes, 0))
        _warn_if_long(st, run, events)
        if cached is not None and hit:
            self.ctx.stats.cache_hits += 1
            inst = cached.instance
            try:
                cmds = run_task(inst, events, st.now_ms, fresh=False, history=history)
                return _Activated(run, msgid, st, inst, cmds)
            except BaseException:
                discard(inst)
                raise
        if cached is not None:
            discard(cached.instance)
        self.ctx.stats.cache_misses += 1
        if st.since:  # the events start after the stale cache's position: read them all
            events = await self.history_after(shard, st.workflow_id, run, 0)
        inst = self.new_instance(st.workflow_id, run, st.workflow_type, st.start_ms, st.attempt)
        try:
            return _Activated(
                run, msgid, st, inst, run_task(inst, events, st.now_ms, fresh=True, history=history)
            )
        except BaseException:
            discard(inst)
            raise

    async def _complete(
        self, shard: int, stream: str, activated: list[_Activated], failures: list[WftFailure]
    ) -> None:
        """Complete the batch in one call; commit to the cache only what Redis accepted,
        and run the activities it handed to this worker."""
        ctx = self.ctx
        offers = self._offers(activated)
        reserved = sum(len(o) for o in offers)
        try:
            replies = await self._send_completions(
                shard,
                stream,
                [
                    TaskCompletion(
                        a.run,
                        a.started.workflow_id,
                        a.started.fence,
                        a.message_id,
                        a.commands,
                        o,
                        a.started.now_ms if a.speculative else None,
                    )
                    for a, o in zip(activated, offers, strict=True)
                ],
            )
        finally:
            if self.activities is not None:
                self.activities.release(reserved)
        wake = False
        for a, r in zip(activated, replies, strict=True):
            if r.reply is Reply.OK:
                ctx.stats.speculated += a.speculative
                wake = self._accepted(shard, a, r) or wake
                continue
            discard(a.instance)
            if r.started is not None:
                # (a speculative task Redis could not record as it ran: it runs again, from
                # the history, once this batch is done)
                ctx.stats.speculation_refused += 1
                if r.started.now_ms < a.started.now_ms:  # the estimate was ahead of Redis
                    ctx.clock(shard).forget()
                self._defer(shard, stream, _Task(a.message_id, a.run, a.started.workflow_id, r.started))
            elif a.speculative:
                ctx.stats.speculation_refused += 1  # (started elsewhere, or no longer the run's task)
            elif r.reply is Reply.AGAIN:
                log.info("workflow task runs again", run_id=a.run, reason=r.why)
            elif r.reply is Reply.INVALID:
                failures.append(
                    WftFailure(
                        a.run,
                        a.started.workflow_id,
                        a.started.fence,
                        a.message_id,
                        pack(
                            {"failure": failure_from_exception(WorkflowError(f"commands refused: {r.why}"))}
                        ),
                    )
                )
            else:
                ctx.stats.refused += 1
                log.warning("workflow task completion refused", run_id=a.run, reason=r.why)
        if wake:
            ctx.pump_wake.set()

    def _accepted(self, shard: int, a: _Activated, r: CompletionReply) -> bool:
        """A completion Redis recorded: run the activities it handed this worker, keep the
        instance unless its run closed. Returns whether it started a timer."""
        self.ctx.clock(shard).observe(r.now_ms)
        if r.eager and self.activities is not None:
            bodies = {c.aux[0]: c.body for c in a.commands if c.kind is CommandKind.SCHEDULE_ACTIVITY}
            for seq, deadline_ms in r.eager:
                self.activities.run_handed(shard, a.run, seq, bodies[seq], a.started, r.now_ms, deadline_ms)
        if a.instance.closed:
            discard(a.instance)
            return False
        self.cache.commit(a.run, a.instance, r.last_event_id, r.fence)
        return any(c.kind is CommandKind.START_TIMER for c in a.commands)

    def _offers(self, activated: list[_Activated]) -> list[frozenset[int]]:
        """Per task, the activities this worker takes itself (eager dispatch): at most
        ``max_eager_activities`` of those scheduled on its own queue that it runs, while it
        has free slots, and none for a task that closes its run. The rest go through the
        activity stream, where any worker takes them (a fan-out spreads)."""
        acts = self.activities
        out: list[frozenset[int]] = []
        for a in activated:
            wanted: list[int] = []
            if acts is not None and self.max_eager_activities and not a.instance.closed:
                for c in a.commands:
                    act = c.scheduled_activity()
                    if act and act[2] == self.ctx.task_queue and acts.serves(act[1]):
                        wanted.append(act[0])
                        if len(wanted) == self.max_eager_activities:
                            break
            n = acts.reserve(len(wanted)) if acts is not None and wanted else 0
            out.append(frozenset(wanted[:n]))
        return out

    async def _send_completions(
        self, shard: int, stream: str, tasks: list[TaskCompletion]
    ) -> list[CompletionReply]:
        """wft_complete, sent again while Redis is away: a repeat gets the first call's
        answer. Without activities to take, it gives up after the workflow task timeout
        (or at once when stopping): the fences are taken over then anyway. With them, it
        does not give up (a stopping worker's drain cancels it past the grace period): a
        call Redis applied and whose answer was lost has them started in this worker's
        name, and only its answer lets them run before their deadline."""
        ctx = self.ctx
        handing = any(t.eager for t in tasks)
        give_up = asyncio.get_running_loop().time() + ctx.settings.workflow_task_timeout_ms / 1000
        streak = Streak("workflow task completion: redis unavailable")
        while True:
            try:
                replies = await ctx.protocol.wft_complete(
                    shard,
                    stream,
                    ctx.task_queue,
                    ctx.settings.retention_ms,
                    ctx.identity,
                    self.sticky_ms,
                    tasks,
                    timeout_ms=ctx.settings.workflow_task_timeout_ms,
                    max_events=MAX_EVENTS_PER_START,
                )
                streak.ok()
                return replies
            except TRANSIENT as e:
                if not handing and (asyncio.get_running_loop().time() >= give_up or ctx.stopping.is_set()):
                    raise
                await streak.failed(e)

    async def history_after(self, shard: int, wid: str, run: str, after: int) -> list[HistoryEvent]:
        return [HistoryEvent.from_entry(e) for e in await self.ctx.protocol.history(shard, wid, run, after)]

    def new_instance(self, wid: str, run: str, wtype: str, start_ms: int, attempt: int) -> WorkflowInstance:
        defn = self.workflows.get(wtype)
        if defn is None:
            raise WorkflowError(
                f"workflow type '{wtype}' is not registered on worker {self.ctx.identity} "
                f"(task queue '{self.ctx.task_queue}'); it serves: {sorted(self.workflows)}. "
                "Register the workflow class with this task queue's workers.",
                type="WorkflowNotRegistered",
            )
        info = WorkflowInfo(
            wid, run, wtype, self.ctx.task_queue, datetime.fromtimestamp(start_ms / 1000, tz=UTC), attempt
        )
        inst = WorkflowInstance(defn, info)
        inst.max_payload_bytes = self.ctx.client.max_payload_bytes
        return inst
