"""Finding executions: ``client.list_workflows`` and ``client.count_workflows``.

Each shard keeps three sorted sets of run ids, written by the scripts that start and
close runs (docs/keyspace.md): ``idx:start`` (every retained run, by start time),
``idx:open`` (the running ones) and ``idx:exp`` (closed ones, by when their keys
expire, when maintenance drops them from ``idx:start``). A listing walks the index
that fits the filter on every shard, newest first, merges the shards, and reads each
candidate's run hash for the rest of the filter: no key is ever scanned. A page token
is the position of the last run returned, so a page never repeats or skips a run that
was already listed, whatever starts meanwhile.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from redis.exceptions import ResponseError

from rillflow.durations import time_of_ms
from rillflow.errors import InvalidInputError
from rillflow_runtime.codec import text
from rillflow_runtime.model import RunStatus

if TYPE_CHECKING:
    from rillflow.client import Client
    from rillflow_runtime.keyspace import Keyspace

# how many index members one read returns, and how many run hashes one pipeline reads
CHUNK = 500
MAX_PAGE = 1000
# the most run hashes one page reads: past it, the page ends (fewer runs than asked for,
# with a token to go on), so that a filter that matches few of many runs answers in bounded time
READ_BUDGET = 10_000
_FIELDS = ("wid", "wtype", "tq", "status", "start_ms", "closed_ms", "sched")


@dataclass(frozen=True)
class WorkflowExecution:
    """One run, as a listing shows it."""

    execution_id: str
    run_id: str
    workflow_type: str
    task_queue: str
    status: str
    start_time: datetime
    close_time: datetime | None
    schedule_id: str | None = None  # the schedule that started it

    def to_json(self) -> dict[str, Any]:
        return {
            "execution_id": self.execution_id,
            "run_id": self.run_id,
            "workflow_type": self.workflow_type,
            "task_queue": self.task_queue,
            "status": self.status,
            "start_time": self.start_time.isoformat(),
            "close_time": self.close_time.isoformat() if self.close_time else None,
            "schedule_id": self.schedule_id,
        }


@dataclass(frozen=True)
class WorkflowPage:
    executions: list[WorkflowExecution]
    next_page_token: str | None  # None: this was the last page


@dataclass(frozen=True)
class Filter:
    status: str | None = None
    workflow_type: str | None = None
    task_queue: str | None = None
    execution_id: str | None = None
    schedule_id: str | None = None
    started_after: datetime | None = None  # inclusive
    started_before: datetime | None = None  # exclusive

    @classmethod
    def of(cls, **kw: Any) -> Filter:
        """The filter, checked: a clear error for a status or time that cannot match."""
        status = kw.get("status")
        if status is not None:
            try:
                status = RunStatus(str(getattr(status, "value", status)).lower()).value
            except ValueError:
                valid = ", ".join(s.value for s in RunStatus)
                raise InvalidInputError(f"status {kw['status']!r} is not one of {valid}") from None
        for name in ("started_after", "started_before"):
            t = kw.get(name)
            if t is not None and not (isinstance(t, datetime) and t.tzinfo is not None):
                raise InvalidInputError(f"{name} must be a timezone-aware datetime, got {t!r}")
        for name in ("workflow_type", "task_queue", "execution_id", "schedule_id"):
            v = kw.get(name)
            if v is not None and (not isinstance(v, str) or not v):
                raise InvalidInputError(f"{name} must be a non-empty string, got {v!r}")
        return cls(status=status, **{k: v for k, v in kw.items() if k != "status"})

    @property
    def index(self) -> str:
        return "open" if self.status == RunStatus.RUNNING else "start"

    def window(self) -> tuple[float, float]:
        """The start times (whole ms, as the index has them) to walk: those at or after
        ``started_after`` and before ``started_before``."""
        lo = _ms_up(self.started_after) if self.started_after else float("-inf")
        hi = _ms_up(self.started_before) - 1 if self.started_before else float("inf")
        return hi, lo

    def digest(self) -> str:
        """What a page token is bound to: a token from another listing is refused."""
        parts: list[Any] = [
            self.status,
            self.workflow_type,
            self.task_queue,
            self.execution_id,
            self.schedule_id,
        ]
        parts += self.window()
        return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:8]

    @property
    def needs_runs(self) -> bool:
        """Whether the run hashes decide (beyond the index itself)."""
        closed_status = self.status is not None and self.status != RunStatus.RUNNING
        return closed_status or bool(
            self.workflow_type or self.task_queue or self.execution_id or self.schedule_id
        )

    def shards(self, ks: Keyspace) -> list[int]:
        """The shards that may hold a match: an execution's runs, and a schedule's, all
        live on one (see keyspace.shard_of)."""
        if self.execution_id is not None:
            return [ks.shard(self.execution_id)]
        if self.schedule_id is not None:
            return [ks.shard(self.schedule_id)]
        return list(ks.all_shards())

    def matches(self, row: WorkflowExecution) -> bool:
        return (
            (self.status is None or row.status == self.status)
            and (self.workflow_type is None or row.workflow_type == self.workflow_type)
            and (self.task_queue is None or row.task_queue == self.task_queue)
            and (self.execution_id is None or row.execution_id == self.execution_id)
            and (self.schedule_id is None or row.schedule_id == self.schedule_id)
        )


def _ms_up(t: datetime) -> int:
    """``t`` in ms since the epoch, rounded up (a start at ms T is before T + 0.5 ms)."""
    us = (t - _EPOCH) // timedelta(microseconds=1)
    return -(-us // 1000)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def encode_token(flt: Filter, score: int, run: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([score, run, flt.digest()]).encode()).decode().rstrip("=")


def decode_token(flt: Filter, token: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        score, run, digest = json.loads(raw)
        ok = isinstance(score, int) and abs(score) < 2**53 and isinstance(run, str) and digest == flt.digest()
    except (ValueError, TypeError, binascii.Error, json.JSONDecodeError):
        ok = False
    if not ok:
        raise InvalidInputError(
            f"page token {token[:40]!r} is not one this listing gave: pass the next_page_token of the "
            "previous page, unchanged, with the same filters"
        )
    return score, run


async def _walk(
    client: Client, shard: int, flt: Filter, after: tuple[int, str] | None
) -> AsyncGenerator[tuple[int, str], None]:
    """The shard's runs in the filter's index, newest first ((start ms, run id) descending),
    from just past ``after``. Each read goes on from the last run given, found by its
    rank (exact, whatever left the index before it), or, if that run has left the index
    meanwhile, by its start time."""
    key = client.keyspace.index(shard, flt.index)
    hi, lo = flt.window()
    last = after
    while True:
        found: Any = await client.redis.zrevrank(key, last[1]) if last is not None else None
        rank = int(found) if isinstance(found, int) else None
        res: Any
        if rank is not None:
            res = await client.redis.zrange(key, rank + 1, rank + CHUNK, desc=True, withscores=True)
            full = len(res) == CHUNK
        else:
            top = min(hi, last[0]) if last is not None else hi
            count = CHUNK
            while True:  # (runs that share the last one's ms and were given already are skipped)
                res = await client.redis.zrange(
                    key,
                    "+inf" if top == float("inf") else int(top),
                    "-inf" if lo == float("-inf") else int(lo),
                    desc=True,
                    byscore=True,
                    offset=0,
                    num=count,
                    withscores=True,
                )
                full = len(res) == count
                res = [(m, sc) for m, sc in res if last is None or (int(sc), text(m)) < last]
                if res or not full:
                    break
                count *= 2
        for member, raw in res:
            score, run = int(raw), text(member)
            if score > hi:
                continue
            if score < lo:
                return
            yield score, run
            last = (score, run)
        if not full or not res:
            return


async def _rows(client: Client, shard: int, runs: list[str]) -> list[WorkflowExecution | None]:
    async with client.redis.pipeline(transaction=False) as pipe:
        for run in runs:
            pipe.hmget(client.keyspace.run(shard, run), list(_FIELDS))
        res = await pipe.execute()
    out: list[WorkflowExecution | None] = []
    for run, (wid, wtype, tq, status, start, closed, sched) in zip(runs, res, strict=True):
        if wid is None:  # expired, not yet forgotten by the index
            out.append(None)
            continue
        out.append(
            WorkflowExecution(
                text(wid),
                run,
                text(wtype or b""),
                text(tq or b""),
                text(status or b""),
                time_of_ms(start) or datetime.fromtimestamp(0, UTC),
                time_of_ms(closed),
                text(sched) if sched else None,
            )
        )
    return out


async def list_workflows(client: Client, flt: Filter, page_size: int, token: str | None) -> WorkflowPage:
    if not isinstance(page_size, int) or isinstance(page_size, bool) or not 1 <= page_size <= MAX_PAGE:
        raise InvalidInputError(f"page_size must be a whole number from 1 to {MAX_PAGE}, got {page_size!r}")
    after = decode_token(flt, token) if token else None
    walks = {s: _walk(client, s, flt, after) for s in flt.shards(client.keyspace)}
    # a heap of each shard's next run: heapq pops the smallest, and newest first is the
    # largest start time, then (ties) the largest run id, as each shard's index orders them
    heads: list[tuple[int, str, int, int, str]] = []

    async def advance(shard: int) -> None:
        nxt = await anext(walks[shard], None)
        if nxt is not None:
            heapq.heappush(heads, (-nxt[0], _desc(nxt[1]), shard, *nxt))

    try:
        for s in walks:
            await advance(s)
        page: list[WorkflowExecution] = []
        last: tuple[int, str] | None = None
        pending: list[tuple[int, int, str]] = []  # candidates taken, not yet looked at
        read = 0  # run hashes read: a filter that matches few runs stops at READ_BUDGET
        while (heads or pending) and len(page) < page_size and (read < READ_BUDGET or pending):
            if not pending:  # the next candidates, newest first, as many as the page needs
                while heads and len(pending) < max(page_size - len(page), 16):
                    *_, shard, score, run = heapq.heappop(heads)
                    pending.append((shard, score, run))
                    await advance(shard)
                rows = await _rows_of(client, pending)
                read += len(pending)
            shard, score, run = pending.pop(0)
            last = (score, run)
            row = rows.pop((shard, run))
            if row is not None and flt.matches(row):
                page.append(row)
        more = bool(heads or pending)
        if more and len(page) == page_size and flt.needs_runs:
            # (a full page of a filtered listing: is there a next match at all? Looked for
            # within what is left of the budget, so that the last page says it is the last)
            more = await _any_match(client, flt, heads, pending, rows, advance, READ_BUDGET - read)
        return WorkflowPage(page, encode_token(flt, *last) if more and last is not None else None)
    finally:
        for w in walks.values():
            await w.aclose()


async def _any_match(
    client: Client,
    flt: Filter,
    heads: list[tuple[int, str, int, int, str]],
    pending: list[tuple[int, int, str]],
    rows: dict[tuple[int, str], WorkflowExecution | None],
    advance: Any,
    budget: int,
) -> bool:
    """Whether a run after the page matches, looking at most ``budget`` runs ahead
    (True when the budget ends first: the next page says)."""
    for shard, _, run in pending:
        row = rows.get((shard, run))
        if row is not None and flt.matches(row):
            return True
    while heads:
        if budget <= 0:
            return True
        ahead: list[tuple[int, int, str]] = []
        while heads and len(ahead) < min(budget, 100):
            *_, shard, score, run = heapq.heappop(heads)
            ahead.append((shard, score, run))
            await advance(shard)
        budget -= len(ahead)
        if any(r is not None and flt.matches(r) for r in (await _rows_of(client, ahead)).values()):
            return True
    return False


async def _rows_of(
    client: Client, items: list[tuple[int, int, str]]
) -> dict[tuple[int, str], WorkflowExecution | None]:
    by_shard: dict[int, list[str]] = {}
    for shard, _, run in items:
        by_shard.setdefault(shard, []).append(run)
    out: dict[tuple[int, str], WorkflowExecution | None] = {}
    for shard, runs in by_shard.items():
        for run, row in zip(runs, await _rows(client, shard, runs), strict=True):
            out[(shard, run)] = row
    return out


def _desc(run: str) -> str:
    """A key that sorts run ids in reverse (for the heap, which pops the smallest)."""
    return "".join(chr(0x10FFFF - ord(c)) for c in run)


async def count_workflows(client: Client, flt: Filter) -> int:
    ks = client.keyspace
    for s in ks.all_shards():  # what expired is not counted (a read-only user counts it)
        try:
            while await client.protocol.trim_index(s, client.settings.retention_ms, sweep=0) >= 1000:
                pass
        except ResponseError:
            break
    if not flt.needs_runs:
        hi, lo = flt.window()
        total = 0
        for s in ks.all_shards():
            total += int(
                await client.redis.zcount(
                    ks.index(s, flt.index),
                    "-inf" if lo == float("-inf") else int(lo),
                    "+inf" if hi == float("inf") else int(hi),
                )
            )
        return total
    total = 0
    for s in flt.shards(ks):
        runs: list[str] = []
        async for _, run in _walk(client, s, flt, None):
            runs.append(run)
            if len(runs) == CHUNK:
                total += sum(1 for r in await _rows(client, s, runs) if r is not None and flt.matches(r))
                runs = []
        if runs:
            total += sum(1 for r in await _rows(client, s, runs) if r is not None and flt.matches(r))
    return total
