"""What a client's callers wait for, from one blocking read: runs closing, updates
finishing (both announced on each shard's ``closed`` stream) and query answers (pushed
to the client's own inbox stream).

No caller polls and none holds a connection while it waits: a wait is a future here.
The ``closed`` streams are capped, so a watcher that falls behind could miss an entry;
it notices (Redis keeps the id of the last entry it trimmed) and then re-reads the state
of everything it waits for, as it does after any failed read.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import TYPE_CHECKING, Any

import structlog
from redis.exceptions import ResponseError

from rillflow_runtime.codec import text
from rillflow_runtime.connections import make_blocking_reader, reraise_if_cancelling
from rillflow_runtime.model import Reply, RunStatus

if TYPE_CHECKING:
    from rillflow.client import Client

log = structlog.get_logger("rillflow.client")

Closing = tuple[Any, Any] | None
"""What woke a waiter for a run: the closed-runs entry's status and outcome
(bytes as Redis gave them), or None when the entry did not carry the outcome (too large)
or a re-check of the run's state woke it: then the waiter reads the run."""

Waiter = asyncio.Future[Closing]

WATCH_BLOCK_S = 5.0
READ_COUNT = 1000


def _id_tuple(sid: str) -> tuple[int, int]:
    ms, _, seq = sid.partition("-")
    return int(ms or 0), int(seq or 0)


class Watcher:
    def __init__(self, client: Client) -> None:
        self.client = client
        self.redis = make_blocking_reader(client.url, 2, WATCH_BLOCK_S)
        self.inbox = client.keyspace.inbox(uuid.uuid4().hex)
        self.closing = False
        # run id (or "<run id>:<update id>") -> (its shard, the futures waiting for it)
        self.runs: dict[str, tuple[int, list[Waiter]]] = {}
        self.updates: dict[str, tuple[int, list[Waiter]]] = {}
        self.replies: dict[str, asyncio.Future[bytes]] = {}  # query request id -> answer
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
            self.cursors.setdefault(self.inbox, "0-0")
            self.task = asyncio.create_task(self._loop(), name="rillflow-watcher")

    # -- waiting --------------------------------------------------------------------------
    def wait_run(self, shard: int, run_id: str) -> Waiter:
        """A future set when the run closes; register it before reading the run's state."""
        return self._add(self.runs, shard, run_id)

    def wait_new_run(self, shard: int, run_id: str) -> Waiter | None:
        """For a run about to be started: a future set when it closes, if this watcher is
        reading already (then its cursors are before the run's close, which it will see,
        and the caller needs no read of the run's status). None if it is not."""
        if self.closing or self.task is None or self.task.done():
            return None
        fut = self.wait_run(shard, run_id)
        fut.rillflow_task = self.task  # type: ignore[attr-defined]  # see waits()
        return fut

    def waits(self, fut: Waiter) -> bool:
        """Whether a future from :meth:`wait_new_run` is still sure to be set: the loop
        that registered it still reads (a new loop starts from the streams' ends)."""
        task = self.task
        return (
            getattr(fut, "rillflow_task", None) is task
            and task is not None
            and not task.done()
            and not self.closing
        )

    def wait_update(self, shard: int, run_id: str, update_id: str) -> Waiter:
        """A future set when the update finishes; register it before reading its state."""
        return self._add(self.updates, shard, f"{run_id}:{update_id}")

    @staticmethod
    def _add(table: dict[str, tuple[int, list[Waiter]]], shard: int, key: str) -> Waiter:
        fut: Waiter = asyncio.get_running_loop().create_future()
        table.setdefault(key, (shard, []))[1].append(fut)
        fut.rillflow_wait = (table, key)  # type: ignore[attr-defined]  # what forget() removes
        return fut

    def wait_reply(self) -> tuple[str, asyncio.Future[bytes]]:
        """A request id, and the future its answer will be set on."""
        rid = uuid.uuid4().hex
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.replies[rid] = fut
        fut.rillflow_wait = (self.replies, rid)  # type: ignore[attr-defined]
        return rid, fut

    def forget(self, fut: asyncio.Future[Any]) -> None:
        """Stop waiting (done, timed out or cancelled): only this waiter's entry is
        touched, so many concurrent waiters cost nothing each."""
        table, key = getattr(fut, "rillflow_wait", (None, None))
        if table is self.replies:
            if self.replies.get(key) is fut:
                del self.replies[key]
        elif table is not None and key in table:
            futs = table[key][1]
            if fut in futs:
                futs.remove(fut)
            if not futs:
                del table[key]

    # -- the loop ---------------------------------------------------------------------------
    async def _loop(self) -> None:
        failures = 0
        while not self.closing:
            try:
                resp: Any = await self.redis.xread(
                    self.cursors,  # type: ignore[arg-type]
                    block=int(WATCH_BLOCK_S * 1000),
                    count=READ_COUNT,
                )
                await self._handle(resp or [])
                if not resp:  # idle: a trim that no read showed would show here
                    await self._check_gaps({k: c for k, c in self.cursors.items() if k != self.inbox})
                if failures:
                    log.info("result watcher reconnected", after_failures=failures)
                    failures = 0
                    await self._recheck()  # what closed while the watcher could not read
            except Exception as e:
                reraise_if_cancelling()
                failures += 1
                if failures == 1:
                    log.warning(
                        "result watcher cannot read from Redis; retrying", error=f"{type(e).__name__}: {e}"
                    )
                await asyncio.sleep(min(2.0, 0.05 * 2**failures))

    async def _handle(self, resp: list[Any]) -> None:
        inbox_ids: list[str] = []
        for stream, entries in resp:
            key = text(stream)
            before = self.cursors[key]
            for sid, fields in entries:
                self.cursors[key] = text(sid)
                if key == self.inbox:
                    inbox_ids.append(text(sid))
                    fut = self.replies.pop(text(fields.get(b"rid")), None)
                    if fut is not None and not fut.done():
                        fut.set_result(fields.get(b"d") or b"")
                    continue
                run = fields.get(b"run")
                if run is not None:
                    outcome = fields.get(b"outcome")
                    closing = None if outcome is None else (fields.get(b"status"), outcome)
                    self._wake(self.runs, text(run), closing)
                upd = fields.get(b"update")
                if upd is not None:
                    self._wake(self.updates, text(upd))
            if key != self.inbox and len(entries) >= READ_COUNT:  # behind: maybe too far
                await self._check_gaps({key: before})
        if inbox_ids:
            await self.client.redis.xdel(self.inbox, *inbox_ids)

    @staticmethod
    def _wake(table: dict[str, tuple[int, list[Waiter]]], key: str, closing: Closing = None) -> None:
        for fut in table.pop(key, (0, []))[1]:
            if not fut.done():
                fut.set_result(closing)

    async def _check_gaps(self, cursors: dict[str, str]) -> None:
        """If a closed stream lost entries after a cursor before they were read (the
        stream is capped), re-read the state of everything waited for. Lost means: the
        stream has grown past the cursor, and its oldest entry is newer than the cursor
        (or it is empty), so what lay between may have been trimmed."""
        if not self.runs and not self.updates:
            return
        async with self.client.redis.pipeline(transaction=False) as pipe:  # every shard in one trip
            for stream in cursors:
                pipe.xinfo_stream(stream)
            infos = await pipe.execute(raise_on_error=False)
        for (stream, cursor), info in zip(cursors.items(), infos, strict=True):
            if isinstance(info, ResponseError):  # no such stream yet: nothing closed there, nothing lost
                continue
            last = _id_tuple(text(info.get("last-generated-id") or "0-0"))
            first = info.get("first-entry")
            if last > _id_tuple(cursor) and (not first or _id_tuple(text(first[0])) > _id_tuple(cursor)):
                log.warning("result watcher fell behind the capped closed stream; re-checking", stream=stream)
                await self._recheck()
                return

    async def _recheck(self) -> None:
        """Wake every waiter whose run closed or update finished, from their state."""
        ks, r = self.client.keyspace, self.client.redis
        runs = [(key, shard) for key, (shard, _) in self.runs.items()]
        updates = [(key, shard) for key, (shard, _) in self.updates.items()]
        if not runs and not updates:
            return
        async with r.pipeline(transaction=False) as pipe:
            for run, shard in runs:
                pipe.hget(ks.run(shard, run), "status")
            for key, shard in updates:
                run, _, uid = key.rpartition(":")
                pipe.hget(ks.updates(shard, run), uid)
            res = await pipe.execute()
        for (run, _), status in zip(runs, res[: len(runs)], strict=True):
            if status is None or text(status) != RunStatus.RUNNING:  # closed, or expired
                self._wake(self.runs, run)
        for (key, _), state in zip(updates, res[len(runs) :], strict=True):
            if state is not None and text(state) == Reply.DONE:
                self._wake(self.updates, key)

    async def close(self) -> None:
        """Stop at once: redis-py lets a cancelled blocking read finish first (up to the
        block time), so the read's connection is closed under it."""
        self.closing = True
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(Exception):
                await self.redis.connection_pool.disconnect(inuse_connections=True)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self.task, WATCH_BLOCK_S)
        with contextlib.suppress(Exception):
            await self.client.redis.delete(self.inbox)
        await self.redis.aclose()
