"""What the worker's parts share: the connections, the worker's identity, its counters,
and the one way every part reads a task stream and sets aside what it cannot read."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from rillflow.client import Client
from rillflow.dependencies import Scope
from rillflow.worker.clock import RedisClock
from rillflow_runtime.codec import text
from rillflow_runtime.connections import TRANSIENT, make_blocking_reader, reraise_if_cancelling
from rillflow_runtime.keyspace import GROUP

log = structlog.get_logger("rillflow.worker")

READ_BLOCK_S = 1.0


@dataclass
class WorkerStats:
    workflow_tasks: int = 0
    workflow_task_failures: int = 0
    activities: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    refused: int = 0
    dead_lettered: int = 0
    speculated: int = 0  # first workflow tasks run from their message and recorded as run
    speculation_refused: int = 0  # ... that Redis could not record as run (run again)


class Streak:
    """Counts consecutive failures of one loop, so that a persistent error is logged once
    (with what it was) and then only when it ends, and the loop backs off meanwhile."""

    def __init__(self, what: str, cap: float = 5.0) -> None:
        self.what = what
        self.cap = cap
        self.failures = 0

    async def failed(self, error: BaseException) -> None:
        reraise_if_cancelling()
        self.failures += 1
        if self.failures == 1:
            log.warning(f"{self.what}; retrying", error=f"{type(error).__name__}: {error}")
        await asyncio.sleep(min(self.cap, 0.05 * 2**self.failures))

    def ok(self) -> None:
        if self.failures:
            log.info(f"{self.what}: recovered", after_failures=self.failures)
            self.failures = 0


class Context:
    """Shared by the workflow-task pipeline, the activities, the queries and the
    maintenance of one worker."""

    def __init__(
        self,
        client: Client,
        task_queue: str,
        identity: str,
        *,
        batch_size: int,
        max_deliveries: int,
        readers: int,
    ) -> None:
        self.client = client
        self.protocol = client.protocol
        self.ks = client.keyspace
        self.redis = client.redis
        self.settings = client.settings
        self.task_queue = task_queue
        self.identity = identity
        self.batch_size = batch_size
        self.max_deliveries = max_deliveries
        self.stats = WorkerStats()
        self.stopping = asyncio.Event()
        # the providers of its activities' Depends parameters, entered when it starts
        self.dependencies = Scope()
        self.exit_request: BaseException | None = None  # SystemExit & co. raised by user code
        self.pump_wake = asyncio.Event()
        self._clocks: dict[int, RedisClock] = {}
        self.reader: Redis = make_blocking_reader(client.url, readers, READ_BLOCK_S)

    def clock(self, shard: int) -> RedisClock:
        """Redis's time as the answers of a shard's calls tell it (speculative tasks): one
        per shard, as shards may live on different servers."""
        c = self._clocks.get(shard)
        if c is None:
            c = self._clocks[shard] = RedisClock()
        return c

    async def learn_clocks(self) -> None:
        """Seed each shard's clock with Redis's TIME, so that the first tasks a starting
        worker reads (a backlog) can already run speculatively. (This client talks to one
        server, which holds every shard.)"""
        sec, usec = await self.redis.time()
        for s in self.ks.all_shards():
            self.clock(s).observe(int(sec) * 1000 + int(usec) // 1000)

    def streams(self, kind: str) -> dict[str, int]:
        """This queue's stream of ``kind`` in every shard, with its shard."""
        return {self.ks.queue(s, self.task_queue, kind): s for s in self.ks.all_shards()}

    async def ensure_groups(self, streams: Iterable[str]) -> None:
        for stream in streams:
            try:
                await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    async def read(self, streams: dict[str, int], count: int, streak: Streak) -> list[tuple[int, str, Any]]:
        """One blocking XREADGROUP over ``streams``: (shard, stream, entries) per stream
        that had something. Redis being away is waited out here, with backoff."""
        try:
            resp: Any = await self.reader.xreadgroup(
                GROUP,
                self.identity,
                dict.fromkeys(streams, ">"),
                count=count,
                block=int(READ_BLOCK_S * 1000),
            )
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            await self.ensure_groups(streams)  # the stream was deleted (say, a FLUSHALL)
            return []
        except TRANSIENT as e:
            if not self.stopping.is_set():  # stopping: the drain closed the read under it
                await streak.failed(e)
            return []
        streak.ok()
        return [(streams[text(s)], text(s), entries) for s, entries in resp or []]

    async def poll(
        self,
        what: str,
        streams: dict[str, int],
        process: Callable[[int, str, Any], Awaitable[None]],
        interrupted: str,
    ) -> None:
        """Read ``streams`` and hand each batch to ``process`` until the worker stops; a
        batch Redis cut short is left to its retry path (reclaim, timeouts), and says so
        once per streak."""
        streak = Streak(f"{what} poller: redis unavailable")
        batch = Streak(interrupted)
        while not self.stopping.is_set():
            for shard, stream, entries in await self.read(streams, self.batch_size, streak):
                try:
                    await process(shard, stream, entries)
                    batch.ok()
                except TRANSIENT as e:
                    await batch.failed(e)

    async def bad_message(self, shard: int, stream: str, message_id: str, reason: str) -> None:
        """A task message this worker cannot read: left for redelivery (another worker,
        say a newer version, may read it) until it was delivered ``max_deliveries``
        times, then moved to the queue's dead-letter stream with the reason."""
        try:
            info = await self.redis.xpending_range(stream, GROUP, min=message_id, max=message_id, count=1)
            deliveries = int(info[0]["times_delivered"]) if info else self.max_deliveries
            if deliveries < self.max_deliveries:
                log.warning(
                    "unreadable task message left for redelivery",
                    stream=stream,
                    message_id=message_id,
                    reason=reason,
                    deliveries=deliveries,
                )
                return
            if await self.protocol.dead_letter(
                shard, stream, message_id, f"{reason} (after {deliveries} deliveries)"
            ):
                self.stats.dead_lettered += 1
                log.error(
                    "task message moved to dead-letter stream",
                    stream=stream,
                    dead_letter_stream=self.ks.dead_letters(stream),
                    message_id=message_id,
                    reason=reason,
                    deliveries=deliveries,
                )
        except TRANSIENT as e:
            reraise_if_cancelling()
            log.warning("could not set an unreadable task message aside", stream=stream, error=str(e))

    def request_exit(self, e: BaseException, where: str) -> None:
        """User code raised SystemExit or KeyboardInterrupt: the worker stops gracefully
        and then re-raises it; the task it interrupted is retried elsewhere."""
        log.error(
            f"{where} asked the process to stop; the worker stops, the task is retried elsewhere",
            error=repr(e),
        )
        if self.exit_request is None:
            self.exit_request = e
        self.stopping.set()


class BadMessage(Exception):
    """A task message that does not have the fields its kind needs."""


def field(fields: Any, name: str, default: str | None = None) -> str:
    """One field of a task message as text; a missing one (unless it has a default) or
    an undecodable one is a BadMessage."""
    try:
        raw = fields[name.encode()]
        return raw.decode() if isinstance(raw, bytes) else str(raw)
    except KeyError as e:
        if default is not None:
            return default
        raise BadMessage(f"without a '{name}' field") from e
    except (TypeError, AttributeError) as e:
        raise BadMessage(f"without a '{name}' field") from e
    except UnicodeDecodeError as e:
        raise BadMessage(f"with a '{name}' field that is not UTF-8") from e


def int_field(fields: Any, name: str) -> int:
    value = field(fields, name)
    try:
        return int(value)
    except ValueError as e:
        raise BadMessage(f"with a '{name}' field that is not an integer: {value[:40]!r}") from e
