"""What keeps a namespace moving and tidy, whichever workers are alive: the timers pump
(due timers, retries, deadlines, timeouts), the reclaim of task messages (and outbox
entries) a dead worker had read, and the janitor that removes what dead workers leave behind (their consumers
in the groups, their sticky streams, their entries in the workers index)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import Any

import structlog

from rillflow.worker.activities import Activities
from rillflow.worker.context import Context, Streak
from rillflow.worker.outbox import Outbox
from rillflow.worker.workflow_tasks import WorkflowTasks
from rillflow_runtime.codec import text
from rillflow_runtime.connections import TRANSIENT
from rillflow_runtime.keyspace import GROUP

log = structlog.get_logger("rillflow.worker")

PUMP_BATCH = 500
JANITOR_INTERVAL_S = 30.0


class Maintenance:
    def __init__(
        self,
        ctx: Context,
        tasks: WorkflowTasks | None,
        activities: Activities | None,
        outbox: Outbox,
        *,
        pump_interval: float,
        reclaim_idle_ms: int,
    ) -> None:
        self.ctx = ctx
        self.tasks = tasks
        self.activities = activities
        self.outbox = outbox
        self.pump_interval = pump_interval
        self.reclaim_idle_ms = reclaim_idle_ms
        self.closing = False

    async def pump_loop(self) -> None:
        """Every worker pumps every shard: a due entry is removed by the script that acts
        on it, so each is handled once. Sleeps until the next due entry or a wake-up."""
        ctx = self.ctx
        # the janitor's first round comes a few seconds in (a worker may not live a whole
        # interval); the lease keeps it to one worker of the queue per interval
        last_reclaim, last_janitor = 0.0, time.monotonic() - JANITOR_INTERVAL_S + random.uniform(1.0, 5.0)
        streak = Streak("timer pump: redis unavailable")
        while not self.closing:
            wait = self.pump_interval
            try:
                for s in ctx.ks.all_shards():
                    p = await ctx.protocol.pump(s, PUMP_BATCH, ctx.settings.retention_ms, ctx.identity)
                    ctx.clock(s).observe(p.now_ms)
                    if p.handled >= PUMP_BATCH:
                        wait = 0
                    elif p.next_due_ms > 0:
                        wait = min(wait, max(0.002, (p.next_due_ms - p.now_ms) / 1000))
                if not ctx.stopping.is_set():
                    if time.monotonic() - last_reclaim > min(self.reclaim_idle_ms / 2000, 5.0):
                        last_reclaim = time.monotonic()
                        await self.reclaim()
                        for s in ctx.ks.all_shards():  # closed runs past retention leave the listing
                            await ctx.protocol.trim_index(s, ctx.settings.retention_ms)
                    if time.monotonic() - last_janitor > JANITOR_INTERVAL_S:
                        last_janitor = time.monotonic()
                        await self.janitor()
                streak.ok()
            except TRANSIENT as e:
                await streak.failed(e)
                wait = 0
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ctx.pump_wake.wait(), wait)
            ctx.pump_wake.clear()

    async def reclaim(self) -> None:
        """Take over task messages another consumer read and never started (it died)."""
        ctx = self.ctx
        kinds: list[tuple[str, int]] = []
        if self.tasks is not None:
            kinds.append(("wft", ctx.settings.workflow_task_timeout_ms))
        if self.activities is not None:
            kinds.append(("act", self.reclaim_idle_ms))
        for kind, idle in kinds:
            for stream, s in ctx.streams(kind).items():
                count = 100
                if kind == "act" and self.activities is not None:
                    count = min(count, self.activities.free())  # take no more than it can run
                    if count <= 0:
                        continue
                res: Any = await ctx.redis.xautoclaim(stream, GROUP, ctx.identity, idle, "0-0", count=count)
                entries = [e for e in res[1] if e and e[1] is not None]  # deleted ones are skipped
                if not entries:
                    continue
                log.info("reclaimed task messages", stream=stream, count=len(entries))
                if kind == "wft" and self.tasks is not None:
                    await self.tasks.process(s, stream, entries)
                elif self.activities is not None:
                    await self.activities.start(s, stream, entries)
        await self.outbox.reclaim()  # (an entry it cannot apply is set aside there: never raised here)

    async def janitor(self) -> None:
        """Remove what dead workers of this task queue left: consumers with nothing
        pending (a consumer with pending messages stays until they are reclaimed, or
        the messages would be lost), empty sticky streams, dead index entries. Runs on
        one worker of the namespace at a time."""
        ctx = self.ctx
        lease = ctx.ks.ns_key(f"janitor:{ctx.task_queue}")
        if not await ctx.redis.set(lease, ctx.identity, nx=True, px=int(JANITOR_INTERVAL_S * 1000)):
            return
        live = {w.identity for w in await ctx.client.registry.workers()}  # drops dead index entries
        live.add(ctx.identity)
        removed = 0
        for kind in ("wft", "act", "qry"):
            for stream in ctx.streams(kind):
                removed += await self._drop_dead_consumers(stream, live)
        for stream in self.outbox.streams():
            removed += await self._drop_dead_consumers(stream, live)
        swept = 0
        for s in ctx.ks.all_shards():
            pattern = ctx.ks.sticky(s, ctx.task_queue, "*")
            async for key in ctx.redis.scan_iter(match=pattern, count=1000):
                name = text(key)
                owner = name.rsplit("@", 1)[1]
                if owner in live or ":" in owner:  # live, or a dead-letter stream
                    continue
                if await ctx.redis.xlen(name) == 0:  # what was there was moved by its sticky timers
                    await ctx.redis.delete(name)
                    swept += 1
                else:
                    removed += await self._drop_dead_consumers(name, live)
        if removed or swept:
            log.info("removed what dead workers left", consumers=removed, sticky_streams=swept)

    async def _drop_dead_consumers(self, stream: str, live: set[str]) -> int:
        ctx = self.ctx
        try:
            consumers: Any = await ctx.redis.xinfo_consumers(stream, GROUP)
        except Exception:  # no such stream or group (yet)
            return 0
        n = 0
        for c in consumers:
            name = text(c.get("name"))
            if name not in live and int(c.get("pending", 0)) == 0:
                await ctx.redis.xgroup_delconsumer(stream, GROUP, name)
                n += 1
        return n

    async def leave(self, streams: list[str]) -> None:
        """On a graceful stop: remove this worker's consumers (each with nothing pending:
        a pending message must stay claimable) and its sticky streams (what is left there
        is moved to the shared queue by the sticky timers)."""
        ctx = self.ctx
        for stream in streams:
            try:
                consumers: Any = await ctx.redis.xinfo_consumers(stream, GROUP)
            except Exception:
                continue
            for c in consumers:
                if text(c.get("name")) == ctx.identity and int(c.get("pending", 0)) == 0:
                    await ctx.redis.xgroup_delconsumer(stream, GROUP, ctx.identity)
        if self.tasks is not None and self.tasks.sticky_streams():
            await ctx.redis.delete(*self.tasks.sticky_streams())
