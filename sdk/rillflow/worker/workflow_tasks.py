"""The workflow-task pipeline: poll, start, activate, then complete or fail.

One script call starts every task a read returned and one completes them all. A task
runs on the run's cached instance when the cache is exactly as far as the history,
else on a fresh instance that replays the history first. At most one task per run is
in flight in this worker: a second task of the same run (the first timed out and was
scheduled again) waits for the first to finish.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from rillflow.errors import WorkflowError, failure_from_exception
from rillflow.executor import Command, WorkflowInfo, WorkflowInstance, run_task
from rillflow.history import HistoryEvent
from rillflow.worker.context import BadMessage, Context, field
from rillflow.worker.run_cache import RunCache, discard
from rillflow.workflow import WorkflowDefinition
from rillflow_runtime.codec import pack, text
from rillflow_runtime.connections import TRANSIENT, reraise_if_cancelling
from rillflow_runtime.model import CommandKind, EventType, Reply
from rillflow_runtime.protocol import TaskCompletion, WftFailure, WftStarted, WftStartItem

log = structlog.get_logger("rillflow.worker")

MAX_EVENTS_PER_START = 1000


@dataclass
class _Activated:
    run: str
    message_id: str
    started: WftStarted
    instance: WorkflowInstance
    commands: list[Command]


class WorkflowTasks:
    def __init__(
        self,
        ctx: Context,
        workflows: dict[str, WorkflowDefinition],
        cache: RunCache,
        sticky_ms: int,
    ) -> None:
        self.ctx = ctx
        self.workflows = workflows
        self.cache = cache
        self.sticky_ms = sticky_ms
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
        if self._deferred:
            await asyncio.gather(*self._deferred, return_exceptions=True)

    # -- one batch ----------------------------------------------------------------------
    async def process(self, shard: int, stream: str, entries: Iterable[Any]) -> None:
        """Start, run and complete the tasks of one read. Tasks of runs already in flight
        here are deferred until those finish."""
        now: list[tuple[str, str, str]] = []
        later: list[tuple[str, Any]] = []
        for msgid, fields in entries:
            mid = text(msgid)  # stream ids are ASCII: Redis makes them
            try:
                run = field(fields, "run")
                wid = field(fields, "wid", default="")  # '' in a message of an older version
            except BadMessage as e:
                await self.ctx.bad_message(shard, stream, mid, f"workflow task {e}")
                continue
            if run in self._in_flight or any(r == run for _, r, _ in now):
                later.append((run, (msgid, fields)))
            else:
                now.append((mid, run, wid))
        for run, entry in later:
            self._defer(run, shard, stream, entry)
        if not now:
            return
        done = {run: asyncio.Event() for _, run, _ in now}
        self._in_flight.update(done)
        try:
            await self._run_batch(shard, stream, now)
        finally:
            for run, ev in done.items():
                if self._in_flight.get(run) is ev:
                    del self._in_flight[run]
                ev.set()

    def _defer(self, run: str, shard: int, stream: str, entry: Any) -> None:
        async def after() -> None:
            while (ev := self._in_flight.get(run)) is not None:
                await ev.wait()
            try:
                await self.process(shard, stream, [entry])
            except TRANSIENT as e:
                reraise_if_cancelling()
                log.warning("deferred workflow task interrupted; it will be retried", error=str(e))

        t = asyncio.create_task(after(), name=f"rillflow-deferred-wft-{run}")
        self._deferred.add(t)
        t.add_done_callback(self._deferred.discard)

    async def _run_batch(self, shard: int, stream: str, items: list[tuple[str, str, str]]) -> None:
        ctx = self.ctx
        started = await ctx.protocol.wft_start(
            shard,
            stream,
            ctx.settings.workflow_task_timeout_ms,
            MAX_EVENTS_PER_START,
            ctx.identity,
            [
                WftStartItem(run, msgid, *self.cache.position(run), workflow_id=wid)
                for msgid, run, wid in items
            ],
        )
        activated: list[_Activated] = []
        failures: list[WftFailure] = []
        try:
            for (msgid, run, _wid), st in zip(items, started, strict=True):
                if st.reply is not Reply.OK:
                    continue
                ctx.stats.workflow_tasks += 1
                try:
                    activated.append(await self._activate(shard, run, msgid, st))
                except TRANSIENT:
                    # Redis, not the workflow, failed: the task times out and runs again
                    raise
                except (KeyboardInterrupt, SystemExit) as e:
                    # not a workflow failure: the worker stops, the task times out and
                    # runs again elsewhere
                    ctx.request_exit(e, f"workflow '{st.workflow_type}' ({st.workflow_id})")
                    continue
                except Exception as e:
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
        if cached is not None and hit:
            self.ctx.stats.cache_hits += 1
            inst = cached.instance
            try:
                return _Activated(run, msgid, st, inst, run_task(inst, events, st.now_ms, fresh=False))
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
            return _Activated(run, msgid, st, inst, run_task(inst, events, st.now_ms, fresh=True))
        except BaseException:
            discard(inst)
            raise

    async def _complete(
        self, shard: int, stream: str, activated: list[_Activated], failures: list[WftFailure]
    ) -> None:
        """Complete the batch in one call; commit to the cache only what Redis accepted."""
        ctx = self.ctx
        replies = await ctx.protocol.wft_complete(
            shard,
            stream,
            ctx.task_queue,
            ctx.settings.retention_ms,
            ctx.identity,
            self.sticky_ms,
            [
                TaskCompletion(a.run, a.started.workflow_id, a.started.fence, a.message_id, a.commands)
                for a in activated
            ],
        )
        wake = False
        for a, r in zip(activated, replies, strict=True):
            if r.reply is Reply.OK and not a.instance.closed:
                self.cache.commit(a.run, a.instance, r.last_event_id, a.started.fence)
                wake = wake or any(c.kind is CommandKind.START_TIMER for c in a.commands)
                continue
            discard(a.instance)
            if r.reply is Reply.AGAIN:
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
            elif r.reply is not Reply.OK:
                ctx.stats.refused += 1
                log.warning("workflow task completion refused", run_id=a.run, reason=r.why)
        if wake:
            ctx.pump_wake.set()

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
