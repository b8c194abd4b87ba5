"""The only code that calls the Lua scripts: one typed method per script.

Each method builds the script's keys and arguments and parses its reply into a
dataclass, so no caller builds an argument list or reads a reply by position. Every
call touches the keys of one shard (one hash tag, so one Redis Cluster slot): the
shard's timers zset and closed-runs stream are ``KEYS[1]`` and ``KEYS[2]``, a task
stream the call names is ``KEYS[3]``, and the other keys of that shard are named by the
script from the prefix in ``ARGV[1]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from typing import Protocol as TypingProtocol

from redis.asyncio import Redis

from rillflow_runtime.codec import pack, text
from rillflow_runtime.keyspace import Keyspace
from rillflow_runtime.model import CommandKind, Reply
from rillflow_runtime.scripts import Scripts


class CommandLike(TypingProtocol):
    """A workflow task's command as the executor issues it."""

    @property
    def kind(self) -> CommandKind: ...

    @property
    def body(self) -> bytes: ...

    @property
    def aux(self) -> Sequence[Any]: ...


@dataclass(frozen=True)
class RunReply:
    """The answer of a call aimed at one run (start, signal, terminate)."""

    reply: Reply
    run_id: str
    why: str = ""


@dataclass(frozen=True)
class UpdateReply:
    reply: Reply  # ACCEPTED, DONE (outcome set) or NOT_RUNNING
    run_id: str
    outcome: bytes | None = None


@dataclass(frozen=True)
class QueryReply:
    reply: Reply  # OK or NOT_FOUND
    run_id: str = ""
    task_queue: str = ""
    stream: str = ""
    message_id: str = ""


@dataclass(frozen=True)
class WftStartItem:
    run_id: str
    message_id: str
    since: int = 0  # the last event id the worker's cached instance applied (0: none)
    fence: str = ""  # the fence of the completion that brought the instance there


@dataclass(frozen=True)
class WftStarted:
    """A workflow task this worker now holds, with the events it has not applied."""

    reply: Reply  # OK, or STALE/BUSY (then nothing else is set)
    fence: str = ""
    now_ms: int = 0
    workflow_id: str = ""
    workflow_type: str = ""
    last_event_id: int = 0
    start_ms: int = 0
    events: list[Any] = field(default_factory=list)  # raw XRANGE entries after `since`
    attempt: int = 1
    since: int = 0  # what the events follow: the worker's value, or 0 if Redis is behind it


@dataclass(frozen=True)
class TaskCompletion:
    run_id: str
    fence: str
    commands: Sequence[CommandLike]


@dataclass(frozen=True)
class CompletionReply:
    reply: Reply  # OK, REFUSED, INVALID or AGAIN
    last_event_id: int = 0
    why: str = ""


@dataclass(frozen=True)
class WftFailure:
    run_id: str
    fence: str
    body: bytes


@dataclass(frozen=True)
class ActStartItem:
    run_id: str
    seq: int
    attempt: int
    message_id: str


@dataclass(frozen=True)
class ActStarted:
    reply: Reply  # OK, or STALE/RUNNING (then nothing else is set)
    scheduled: bytes = b""  # the ActivityTaskScheduled body
    heartbeat_details: bytes = b""
    workflow_id: str = ""
    workflow_type: str = ""
    now_ms: int = 0
    deadline_ms: int = 0


@dataclass(frozen=True)
class ActivityOutcome:
    run_id: str
    seq: int
    attempt: int
    body: bytes
    failed: bool = False
    non_retryable: bool = False
    heartbeat_details: bytes = b""


@dataclass(frozen=True)
class HeartbeatReply:
    reply: Reply  # OK or GONE
    now_ms: int = 0
    deadline_ms: int = 0


@dataclass(frozen=True)
class PumpReply:
    handled: int
    next_due_ms: int  # -1: nothing is due
    now_ms: int


def _reply(value: Any) -> Reply:
    return Reply(text(value))


class Protocol:
    """The scripts of one namespace, called through one client."""

    def __init__(self, redis: Redis, keyspace: Keyspace) -> None:
        self.redis = redis
        self.ks = keyspace
        self.scripts = Scripts(redis)

    def _keys(self, shard: int, *extra: str) -> list[str]:
        return [self.ks.timers(shard), self.ks.closed(shard), *extra]

    async def _call(self, name: str, shard: int, args: list[Any], *stream: str) -> Any:
        return await self.scripts.call(name, self._keys(shard, *stream), [self.ks.prefix(shard), *args])

    # -- clients ----------------------------------------------------------------------
    async def start(
        self, workflow_id: str, run_id: str, workflow_type: str, task_queue: str, body: bytes, timeout_ms: int
    ) -> RunReply:
        shard = self.ks.shard(workflow_id)
        res = await self._call(
            "start", shard, [workflow_id, run_id, workflow_type, task_queue, body, timeout_ms]
        )
        reply = _reply(res[0])
        if reply is Reply.INVALID:
            return RunReply(reply, "", text(res[1]))
        return RunReply(reply, text(res[1]))

    async def terminate(
        self, workflow_id: str, run_id: str | None, body: bytes, retention_ms: int, request_id: str
    ) -> RunReply:
        shard = self.ks.shard(workflow_id)
        res = await self._call(
            "terminate", shard, [workflow_id, run_id or "", body, retention_ms, request_id]
        )
        return RunReply(_reply(res[0]), text(res[1]))

    async def signal(self, workflow_id: str, run_id: str | None, body: bytes, request_id: str) -> RunReply:
        shard = self.ks.shard(workflow_id)
        res = await self._call("signal", shard, [workflow_id, run_id or "", body, request_id])
        return RunReply(_reply(res[0]), text(res[1]))

    async def update(self, workflow_id: str, run_id: str | None, update_id: str, body: bytes) -> UpdateReply:
        shard = self.ks.shard(workflow_id)
        res = await self._call("update", shard, [workflow_id, run_id or "", update_id, body])
        return UpdateReply(_reply(res[0]), text(res[1]), res[2] if len(res) > 2 else None)

    async def query(
        self,
        workflow_id: str,
        run_id: str | None,
        body: bytes,
        reply_stream: str,
        request_id: str,
        wait_ms: int,
    ) -> QueryReply:
        shard = self.ks.shard(workflow_id)
        res = await self._call(
            "query", shard, [workflow_id, run_id or "", body, reply_stream, request_id, wait_ms]
        )
        reply = _reply(res[0])
        if reply is not Reply.OK:
            return QueryReply(reply)
        return QueryReply(reply, text(res[1]), text(res[2]), text(res[3]), text(res[4]))

    # -- workflow tasks ---------------------------------------------------------------
    async def wft_start(
        self,
        shard: int,
        stream: str,
        timeout_ms: int,
        max_events: int,
        worker: str,
        items: Sequence[WftStartItem],
    ) -> list[WftStarted]:
        args: list[Any] = [timeout_ms, max_events, worker]
        for it in items:
            args += [it.run_id, it.message_id, it.since, it.fence]
        res = await self._call("wft_start", shard, args, stream)
        out = []
        for r in res:
            reply = _reply(r[0])
            if reply is not Reply.OK:
                out.append(WftStarted(reply))
                continue
            out.append(
                WftStarted(
                    reply,
                    fence=text(r[1]),
                    now_ms=int(r[2]),
                    workflow_id=text(r[3]),
                    workflow_type=text(r[4]),
                    last_event_id=int(r[5]),
                    start_ms=int(r[6]),
                    events=list(r[7]),
                    attempt=int(r[8]),
                    since=int(r[9]),
                )
            )
        return out

    async def wft_complete(
        self,
        shard: int,
        task_queue: str,
        retention_ms: int,
        worker: str,
        sticky_ms: int,
        tasks: Sequence[TaskCompletion],
    ) -> list[CompletionReply]:
        args: list[Any] = [task_queue, retention_ms, worker, sticky_ms]
        for t in tasks:
            args += [t.run_id, t.fence, len(t.commands)]
            for c in t.commands:
                args += [str(c.kind), c.body, pack(list(c.aux))]
        res = await self._call("wft_complete", shard, args)
        out = []
        for r in res:
            reply = _reply(r[0])
            if reply is Reply.OK:
                out.append(CompletionReply(reply, int(r[1])))
            else:
                out.append(CompletionReply(reply, why=text(r[1]) if len(r) > 1 else ""))
        return out

    async def wft_fail(self, shard: int, failures: Sequence[WftFailure]) -> list[Reply]:
        args: list[Any] = []
        for f in failures:
            args += [f.run_id, f.fence, f.body]
        return [_reply(r) for r in await self._call("wft_fail", shard, args)]

    # -- activities -------------------------------------------------------------------
    async def act_start(
        self, shard: int, stream: str, worker: str, items: Sequence[ActStartItem]
    ) -> list[ActStarted]:
        args: list[Any] = [worker]
        for it in items:
            args += [it.run_id, it.seq, it.attempt, it.message_id]
        res = await self._call("act_start", shard, args, stream)
        out = []
        for r in res:
            reply = _reply(r[0])
            if reply is not Reply.OK:
                out.append(ActStarted(reply))
                continue
            out.append(
                ActStarted(reply, r[1] or b"", r[2] or b"", text(r[3]), text(r[4]), int(r[5]), int(r[6]))
            )
        return out

    async def act_done(self, shard: int, outcomes: Sequence[ActivityOutcome]) -> list[Reply]:
        args: list[Any] = []
        for o in outcomes:
            args += [
                "fail" if o.failed else Reply.OK.value,
                o.run_id,
                o.seq,
                o.attempt,
                o.body,
                "1" if o.non_retryable else "0",
                o.heartbeat_details,
            ]
        return [_reply(r) for r in await self._call("act_done", shard, args)]

    async def heartbeat(
        self, shard: int, run_id: str, seq: int, attempt: int, details: bytes
    ) -> HeartbeatReply:
        res = await self._call("heartbeat", shard, [run_id, seq, attempt, details])
        reply = _reply(res[0])
        if reply is not Reply.OK:
            return HeartbeatReply(reply)
        return HeartbeatReply(reply, int(res[1]), int(res[2]))

    # -- maintenance ------------------------------------------------------------------
    async def pump(self, shard: int, limit: int, retention_ms: int) -> PumpReply:
        res = await self._call("pump", shard, [limit, retention_ms])
        return PumpReply(int(res[0]), int(res[1]), int(res[2]))

    async def dead_letter(self, shard: int, stream: str, message_id: str, reason: str) -> bool:
        return bool(await self._call("dead_letter", shard, [message_id, reason], stream))
