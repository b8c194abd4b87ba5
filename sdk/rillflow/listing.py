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
import heapq
import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from rillflow.errors import InvalidInputError
from rillflow_runtime.codec import text
from rillflow_runtime.model import RunStatus

if TYPE_CHECKING:
    from rillflow.client import Client

# how many index members one read returns, and how many run hashes one pipeline reads
CHUNK = 500
MAX_PAGE = 1000
_FIELDS = ("wid", "wtype", "tq", "status", "start_ms", "closed_ms")


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

    def to_json(self) -> dict[str, Any]:
        return {
            "execution_id": self.execution_id,
            "run_id": self.run_id,
            "workflow_type": self.workflow_type,
            "task_queue": self.task_queue,
            "status": self.status,
            "start_time": self.start_time.isoformat(),
            "close_time": self.close_time.isoformat() if self.close_time else None,
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
        for name in ("workflow_type", "task_queue", "execution_id"):
            v = kw.get(name)
            if v is not None and (not isinstance(v, str) or not v):
                raise InvalidInputError(f"{name} must be a non-empty string, got {v!r}")
        return cls(status=status, **{k: v for k, v in kw.items() if k != "status"})

    @property
    def index(self) -> str:
        return "open" if self.status == RunStatus.RUNNING else "start"

    def window(self) -> tuple[float, float]:
        """The start times (ms) to walk: [after, before)."""
        lo = _ms(self.started_after) if self.started_after else float("-inf")
        hi = _ms(self.started_before) - 1 if self.started_before else float("inf")
        return hi, lo

    @property
    def needs_runs(self) -> bool:
        """Whether the run hashes decide (beyond the index itself)."""
        closed_status = self.status is not None and self.status != RunStatus.RUNNING
        return closed_status or bool(self.workflow_type or self.task_queue or self.execution_id)

    def matches(self, row: WorkflowExecution) -> bool:
        return (
            (self.status is None or row.status == self.status)
            and (self.workflow_type is None or row.workflow_type == self.workflow_type)
            and (self.task_queue is None or row.task_queue == self.task_queue)
            and (self.execution_id is None or row.execution_id == self.execution_id)
        )


def _ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def _dt(ms: Any) -> datetime | None:
    return datetime.fromtimestamp(int(ms) / 1000, UTC) if ms not in (None, b"", "") else None


def encode_token(score: int, run: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([score, run]).encode()).decode().rstrip("=")


def decode_token(token: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        score, run = json.loads(raw)
        if not isinstance(score, int) or not isinstance(run, str):
            raise ValueError(token)
        return score, run
    except (ValueError, TypeError, binascii.Error, json.JSONDecodeError):
        raise InvalidInputError(
            f"page token {token!r} is not one this listing gave: pass the next_page_token of the "
            "previous page, unchanged"
        ) from None


async def _walk(
    client: Client, shard: int, flt: Filter, after: tuple[int, str] | None
) -> AsyncGenerator[tuple[int, str], None]:
    """The shard's runs in the filter's index, newest first ((start ms, run id) descending),
    from just past ``after``."""
    key = client.keyspace.index(shard, flt.index)
    hi, lo = flt.window()
    if after is not None:
        hi = min(hi, after[0])
    seen: set[str] = set()  # the runs already given at the score the next read starts from
    last: float | None = None
    while True:
        res: Any = await client.redis.zrange(
            key,
            "+inf" if hi == float("inf") else int(hi),
            "-inf" if lo == float("-inf") else int(lo),
            desc=True,
            byscore=True,
            offset=len(seen) if last == hi else 0,
            num=CHUNK,
            withscores=True,
        )
        if not res:
            return
        for member, raw in res:
            score, run = int(raw), text(member)
            if after is not None and (score, run) >= after:
                continue  # at or before the token's position (ties: by run id, descending)
            yield score, run
        tail = int(res[-1][1])
        if len(res) < CHUNK:
            return
        if tail != hi:
            hi, seen = tail, set()
        seen.update(text(m) for m, s in res if int(s) == tail)
        last = hi


async def _rows(client: Client, shard: int, runs: list[str]) -> list[WorkflowExecution | None]:
    async with client.redis.pipeline(transaction=False) as pipe:
        for run in runs:
            pipe.hmget(client.keyspace.run(shard, run), list(_FIELDS))
        res = await pipe.execute()
    out: list[WorkflowExecution | None] = []
    for run, (wid, wtype, tq, status, start, closed) in zip(runs, res, strict=True):
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
                _dt(start) or datetime.fromtimestamp(0, UTC),
                _dt(closed),
            )
        )
    return out


async def list_workflows(client: Client, flt: Filter, page_size: int, token: str | None) -> WorkflowPage:
    if not isinstance(page_size, int) or isinstance(page_size, bool) or not 1 <= page_size <= MAX_PAGE:
        raise InvalidInputError(f"page_size must be a whole number from 1 to {MAX_PAGE}, got {page_size!r}")
    after = decode_token(token) if token else None
    walks = [_walk(client, s, flt, after) for s in client.keyspace.all_shards()]
    # a heap of each shard's next run: heapq pops the smallest, and newest first is the
    # largest start time, then (ties) the largest run id, as each shard's index orders them
    heads: list[tuple[int, str, int, int, str]] = []

    async def advance(shard: int) -> None:
        nxt = await anext(walks[shard], None)
        if nxt is not None:
            heapq.heappush(heads, (-nxt[0], _desc(nxt[1]), shard, *nxt))

    try:
        for s in range(len(walks)):
            await advance(s)
        page: list[WorkflowExecution] = []
        last: tuple[int, str] | None = None
        pending: list[tuple[int, int, str]] = []  # candidates taken, not yet looked at
        while (heads or pending) and len(page) < page_size:
            if not pending:  # the next candidates, newest first, as many as the page needs
                while heads and len(pending) < max(page_size - len(page), 16):
                    *_, shard, score, run = heapq.heappop(heads)
                    pending.append((shard, score, run))
                    await advance(shard)
                rows = await _rows_of(client, pending)
            shard, score, run = pending.pop(0)
            last = (score, run)
            row = rows.pop((shard, run))
            if row is not None and flt.matches(row):
                page.append(row)
        more = bool(heads or pending)
        return WorkflowPage(page, encode_token(*last) if more and last is not None else None)
    finally:
        for w in walks:
            await w.aclose()


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
    for s in ks.all_shards():  # what expired is not counted
        while await client.protocol.trim_index(s) >= 1000:
            pass
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
    for s in ks.all_shards():
        runs: list[str] = []
        async for _, run in _walk(client, s, flt, None):
            runs.append(run)
            if len(runs) == CHUNK:
                total += sum(1 for r in await _rows(client, s, runs) if r is not None and flt.matches(r))
                runs = []
        if runs:
            total += sum(1 for r in await _rows(client, s, runs) if r is not None and flt.matches(r))
    return total
