"""The outbox poller: every worker applies the entries of every shard's outbox (child
starts and outcomes, parent close policies, signals between workflows) where they take
effect, and takes over the entries of a worker that died holding them (see
rillflow_runtime.outbox for why each applies exactly once in effect)."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from redis.exceptions import ResponseError

from rillflow.worker.context import Context
from rillflow_runtime import outbox
from rillflow_runtime.connections import TRANSIENT, reraise_if_cancelling
from rillflow_runtime.keyspace import GROUP

log = structlog.get_logger("rillflow.worker")

# An entry takes milliseconds to apply: one held this long belongs to a worker that died
# (applying it again is harmless, so the bound is short; the worker's reclaim_idle is
# used when it is shorter).
RECLAIM_IDLE_MS = 5000


class Outbox:
    def __init__(self, ctx: Context, reclaim_idle_ms: int) -> None:
        self.ctx = ctx
        self.reclaim_idle_ms = min(reclaim_idle_ms, RECLAIM_IDLE_MS)
        # entries this worker is applying now: its own reclaim must not apply one again
        # (outbox_done tells a stalled consumer from another that took over, not from itself)
        self._applying: set[tuple[str, str]] = set()  # (stream, entry id): ids are per stream

    def streams(self) -> dict[str, int]:
        return {self.ctx.ks.outbox(s): s for s in self.ctx.ks.all_shards()}

    async def poll(self) -> None:
        await self.ctx.poll(
            "outbox", self.streams(), self.process, "outbox batch interrupted; its entries are reclaimed"
        )

    async def process(self, shard: int, stream: str, entries: list[Any]) -> None:
        """The entries of one run apply in the order that run wrote them (its signals
        to one execution arrive in the order it sent them); those of different runs
        are independent (an entry that depends on another is written only once that one
        was applied), so they apply concurrently."""
        by_run: dict[bytes, list[tuple[Any, Any]]] = {}
        for msgid, fields in entries:
            if fields:
                by_run.setdefault(fields.get(b"run") or b"", []).append((msgid, fields))

        async def in_order(items: list[tuple[Any, Any]]) -> None:
            for msgid, fields in items:
                await self._apply(shard, stream, msgid, fields)

        results = await asyncio.gather(
            *(in_order(items) for items in by_run.values()), return_exceptions=True
        )
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def _apply(self, shard: int, stream: str, msgid: Any, fields: Any) -> None:
        entry_id = msgid.decode() if isinstance(msgid, bytes) else str(msgid)
        key = (stream, entry_id)
        if key in self._applying:
            return
        ctx = self.ctx
        self._applying.add(key)
        try:
            await outbox.apply(ctx.protocol, shard, entry_id, fields, ctx.settings.retention_ms, ctx.identity)
        except outbox.BadEntry as e:
            await ctx.bad_message(shard, stream, entry_id, str(e))
        except TRANSIENT:
            raise
        except Exception as e:  # (a reply this version cannot read, say): set aside like a bad entry
            reraise_if_cancelling()
            log.exception("outbox entry could not be applied", stream=stream, entry_id=entry_id)
            await ctx.bad_message(shard, stream, entry_id, f"{type(e).__name__}: {e}")
        finally:
            self._applying.discard(key)

    async def reclaim(self) -> None:
        for stream, shard in self.streams().items():
            try:
                res: Any = await self.ctx.redis.xautoclaim(
                    stream, GROUP, self.ctx.identity, self.reclaim_idle_ms, "0-0", count=100
                )
            except ResponseError:  # no group yet (made when a worker of this version starts)
                continue
            entries = [e for e in res[1] if e and e[1] is not None]
            if entries:
                log.info("reclaimed outbox entries", stream=stream, count=len(entries))
                await self.process(shard, stream, entries)
