"""The schedule loop: every worker looks after every schedule of the namespace.

Each shard's ``sched:due`` says when each schedule is next worth a look; the loop takes
what is due by its clock and evaluates it (see rillflow.schedules.evaluate). A shard's
schedules are looked after by one worker at a time (a lease that expires, so a dead
worker's pass to another within seconds); that saves work only: two workers acting on
a schedule at once still start each due time's run once, by sched_fire's construction.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog

from rillflow.schedules import evaluate, ms
from rillflow.worker.context import Context, Streak
from rillflow_runtime.codec import text
from rillflow_runtime.connections import TRANSIENT
from rillflow_runtime.model import Reply

log = structlog.get_logger("rillflow.worker")

# how long a worker looks after a shard's schedules without renewing its lease
LEASE_MS = 3000
# the longest the loop sleeps (a schedule created or woken meanwhile waits this long)
IDLE_S = 0.5
DUE_BATCH = 50
RETRY_MS = 30_000


class Schedules:
    def __init__(self, ctx: Context, clock: Callable[[], datetime] | None = None) -> None:
        self.ctx = ctx
        self._clock = clock

    def now_ms(self, shard: int) -> int:
        if self._clock is not None:
            return ms(self._clock())
        redis_ms = self.ctx.clock(shard).now_ms()
        return redis_ms if redis_ms is not None else ms(datetime.now(UTC))

    async def loop(self) -> None:
        streak = Streak("schedules: redis unavailable")
        while not self.ctx.stopping.is_set():
            wait = IDLE_S
            try:
                for shard in self.ctx.ks.all_shards():
                    wait = min(wait, await self._shard(shard))
                streak.ok()
            except TRANSIENT as e:
                await streak.failed(e)
                wait = 0
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.ctx.stopping.wait(), wait)

    async def _shard(self, shard: int) -> float:
        """Evaluate what is due on the shard; returns how long to sleep (s)."""
        ctx, ks = self.ctx, self.ctx.ks
        due_key = ks.schedules(shard, "due")
        now = self.now_ms(shard)
        first: Any = await ctx.redis.zrange(due_key, 0, 0, withscores=True)
        if not first or first[0][1] > now:
            return min(IDLE_S, (first[0][1] - now) / 1000) if first else IDLE_S
        lease = ks.schedules(shard, "lease")
        if not await ctx.redis.set(lease, ctx.identity, nx=True, px=LEASE_MS):
            if text(await ctx.redis.get(lease)) != ctx.identity:
                return IDLE_S  # another worker looks after them now
            await ctx.redis.pexpire(lease, LEASE_MS)
        began = time.monotonic()
        due: Any = await ctx.redis.zrangebyscore(due_key, "-inf", now, start=0, num=DUE_BATCH)
        for sid in due:
            if ctx.stopping.is_set() or (time.monotonic() - began) * 1000 > LEASE_MS / 2:
                return 0
            try:
                res = await evaluate(ctx.client, text(sid), self.now_ms(shard), ctx.settings.retention_ms)
            except TRANSIENT:
                raise
            except Exception:
                # one schedule this worker cannot read (a definition of a later release?)
                # must not hold up the others: it is looked at again in a while
                log.exception("schedule could not be evaluated; trying again later", schedule_id=text(sid))
                await ctx.redis.zadd(due_key, {text(sid): now + RETRY_MS}, xx=True)
                continue
            if res.started or res.skipped:
                log.info(
                    "schedule acted",
                    schedule_id=text(sid),
                    started=res.started,
                    skipped=res.skipped,
                    buffered=res.buffered,
                )
            elif res.reply is Reply.STALE:
                log.warning("schedule kept changing while evaluated", schedule_id=text(sid))
        return 0 if len(due) >= DUE_BATCH else IDLE_S
