"""The only code that calls the Lua scripts: one typed method per script.

Each method declares in ``KEYS`` every key its script touches, builds the arguments and
parses the reply into a dataclass, so no caller builds an argument list or reads a reply
by position. Every call touches the keys of one shard (one hash tag, so one Redis
Cluster slot): the shard's timers zset and closed-runs stream are ``KEYS[1]`` and
``KEYS[2]``, a task stream the call names is ``KEYS[3]``, then the rest. Keys that
depend on state are known to the caller from an earlier reply (``act_start`` names the
run's streams for ``act_done``) or read first (the current run of an execution for a
client's call, the runs a pump acts on); a script whose state moved past what its caller
declared answers ``REROUTE`` having written nothing, or takes a declared way (see
lib.lua).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from typing import Protocol as TypingProtocol

import msgpack
from redis.asyncio import Redis

from rillflow_runtime.codec import pack, text, unpack
from rillflow_runtime.keyspace import Keyspace
from rillflow_runtime.model import EVENT_CODES, CommandKind, EventType, OutboxKind, Overlap, Reply, TimerKind
from rillflow_runtime.scripts import Scripts

T = TypeVar("T")

# How often a client call looks again when the execution's current run changed between
# its read and its call: each time means another run started in that instant.
REROUTE_TRIES = 20

# The timer kinds that name an activity, whose task stream a pump may write.
_ACTIVITY_TIMERS = frozenset(
    {TimerKind.ACTIVITY_DEADLINE.value, TimerKind.ACTIVITY_RETRY.value, TimerKind.SCHEDULE_TO_CLOSE.value}
)

# The scripts that may start or close a run, or act on the outbox: they write the
# shard's outbox, listing indexes and schedules' wake-ups (see _call). Others never
# touch them.
_STARTS_OR_CLOSES = frozenset(
    {
        "start",
        "signal_start",
        "wft_complete",
        "terminate",
        "pump",
        "reset",
        "outbox_apply",
        "outbox_done",
        "idx_trim",
        "sched_fire",
    }
)

# How many events one read of a history stream returns; more than the longest history
# lib.lua packs at close (PACK_HISTORY_EVENTS, 512), so a packed run fits one page.
HISTORY_PAGE = 1000

# How long a pump holds its shard's lease at most: what a pump that died delays the
# shard's timers by.
PUMP_LEASE_MS = 2000


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
class ResetPlan:
    """What reset.lua writes: the new run of ``workflow_id`` replacing ``old_run``, its
    events after its start, and what they leave pending (see client.reset_workflow)."""

    workflow_id: str
    old_run: str
    new_run: str
    last_event_id: int  # the old run's, as its history was read
    workflow_type: str
    task_queue: str
    timeout_ms: int
    start_body: bytes
    terminate_body: bytes
    events: Sequence[tuple[str, int, bytes]]  # (type, time ms, body) after the start
    activities: Sequence[tuple[Sequence[Any], bytes]]  # (schedule_activity aux, its scheduled body)
    timers: Sequence[tuple[int, int]]  # (seq, due ms)
    # the new run's updates, (id, outcome): done with that outcome, or open (b"")
    updates: Sequence[tuple[str, bytes]]


@dataclass(frozen=True)
class UpdateReply:
    reply: Reply  # ACCEPTED, DONE (outcome set), NOT_RUNNING or STALE (see update())
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
    workflow_id: str = ""  # as the task message names it ('' : read from the run first)


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
    history_bytes: int = -1  # the bytes of the history's event bodies (-1: not counted)


@dataclass(frozen=True)
class TaskCompletion:
    run_id: str
    workflow_id: str
    fence: str
    message_id: str
    commands: Sequence[CommandLike]
    # the seqs of the activities this worker takes itself, started at once in its name
    # (eager dispatch: no task message, no read, no act_start)
    eager: frozenset[int] = frozenset()
    # a speculative task (a run's first, run from its message with no wft_start; fence
    # ''): the start time its workflow was given, to be recorded as the task's start
    speculative_ms: int | None = None


@dataclass(frozen=True)
class CompletionReply:
    reply: Reply  # OK, REFUSED, INVALID or AGAIN; for a speculative task OK, STARTED, BUSY or STALE
    last_event_id: int = 0
    why: str = ""
    now_ms: int = 0
    # the activities handed to this worker, started: (seq, deadline ms) each
    eager: tuple[tuple[int, int], ...] = ()
    fence: str = ""  # the completed task's (Redis made it for a speculative task)
    started: WftStarted | None = None  # STARTED: the task, started the usual way for this worker


@dataclass(frozen=True)
class WftFailure:
    run_id: str
    workflow_id: str
    fence: str
    message_id: str
    body: bytes


@dataclass(frozen=True)
class ActStartItem:
    run_id: str
    seq: int
    attempt: int
    message_id: str


@dataclass(frozen=True)
class ActivityRoute:
    """Where an activity's outcome lands, as its start saw it: the keys ``act_done``
    declares. A sticky worker that changed since only costs the run a cache miss."""

    workflow_id: str
    task_queue: str  # the run's task queue: its next workflow task goes there
    sticky: str  # the worker caching the run ('' = none)
    stream: str  # the activity stream the task came from
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
    route: ActivityRoute | None = None


@dataclass(frozen=True)
class EagerStart:
    """What a worker that reports activity outcomes needs to be handed the workflow task
    an outcome wakes, for a run it caches: the task starts in the same call."""

    worker: str
    timeout_ms: int
    max_events: int
    # run id -> its cached position (last event id applied, fence); a run not here is
    # woken through a task message as usual
    positions: Mapping[str, tuple[int, str]]


@dataclass(frozen=True)
class SignalStartReply:
    reply: Reply  # OK, DUPLICATE (delivered before) or INVALID
    run_id: str
    started: bool = False  # the call started the run it signalled
    why: str = ""


@dataclass(frozen=True)
class ActDone:
    reply: Reply  # OK, RETRY or REFUSED
    task: WftStarted | None = None  # the run's next workflow task, started for this worker


@dataclass(frozen=True)
class ActivityOutcome:
    run_id: str
    seq: int
    attempt: int
    body: bytes
    route: ActivityRoute
    failed: bool = False
    non_retryable: bool = False
    heartbeat_details: bytes = b""


@dataclass(frozen=True)
class HeartbeatReply:
    reply: Reply  # OK or GONE
    now_ms: int = 0
    deadline_ms: int = 0


@dataclass(frozen=True)
class ChildStart:
    """A child's start, as its parent's outbox entry asks for it."""

    workflow_id: str
    run_id: str
    workflow_type: str
    task_queue: str
    start_body: bytes  # the child's WorkflowExecutionStarted body
    timeout_ms: int
    parent_workflow_id: str
    parent_run_id: str
    parent_seq: int


@dataclass(frozen=True)
class ChildClosed:
    """A child's outcome, for its parent."""

    parent_workflow_id: str
    parent_run_id: str
    seq: int
    child_workflow_id: str
    started_body: bytes  # ChildWorkflowExecutionStarted, if the parent has not had it yet
    event_type: EventType
    body: bytes


@dataclass(frozen=True)
class OutboxAnswer:
    """What a run waits for from one of its outbox entries (see outbox_done.lua)."""

    workflow_id: str
    run_id: str
    seq: int
    reply: Reply  # OK, or why not
    body: bytes  # the event the run gets


@dataclass(frozen=True)
class PumpReply:
    handled: int
    next_due_ms: int  # -1: nothing is due
    now_ms: int


@dataclass(frozen=True)
class ScheduleRecord:
    """A schedule as sched_put stores it: what its runs start with, and its policy."""

    schedule_id: str
    workflow_type: str
    task_queue: str
    timeout_ms: int
    template: bytes  # its runs' WorkflowExecutionStarted body: a msgpack map's entries, no header
    template_entries: int
    definition: str  # the ScheduleDefinition as JSON (read by the SDK only)
    digest: str
    origin: str  # "client", or "declared:<workflow>"
    overlap: Overlap
    catchup_ms: int
    pause_on_failure: bool
    max_executions: int | None


@dataclass(frozen=True)
class ScheduleFire:
    """A due time and the run it would start: ``<schedule id>@<due time>``, at
    ``start_ms`` (the due time with its jitter; -1: the due time itself)."""

    due_ms: int
    workflow_id: str
    run_id: str
    start_ms: int = -1


@dataclass(frozen=True)
class FireReply:
    reply: Reply  # OK, NOT_FOUND or STALE
    started: int = 0
    skipped: int = 0
    buffered: int = 0
    first_started: str = ""  # the first execution the call started
    why_skipped: str = ""  # why the call's last skipped due time was skipped


def _reply(value: Any) -> Reply:
    return Reply(text(value))


# a packed history's type codes, as stream entries spell the types
EVENT_TYPES = {i: e.value.encode() for i, e in enumerate(EVENT_CODES, 1)}


def _unpack_history(packed: bytes) -> list[Any]:
    """A packed history (see pack_history in lib.lua) as XRANGE entries."""
    # raw: an event's body is msgpack bytes, which Lua's cmsgpack packs as a string
    value = msgpack.unpackb(packed, raw=True)
    if value and value[0] == 2:
        _, t0, flat = value
        return [
            (f"{i}-0".encode(), {b"type": EVENT_TYPES[code], b"t": str(t0 + dt).encode(), b"d": body})
            for i, (code, dt, body) in enumerate(zip(flat[::3], flat[1::3], flat[2::3], strict=True), 1)
        ]
    return [
        (f"{eid}-0".encode(), {b"type": etype, b"t": str(t).encode(), b"d": body})
        for eid, etype, t, body in value
    ]


def _started(r: Any) -> WftStarted:
    """A workflow task's start, as lib.lua's start_task answers it."""
    return WftStarted(
        _reply(r[0]),
        fence=text(r[1]),
        now_ms=int(r[2]),
        workflow_id=text(r[3]),
        workflow_type=text(r[4]),
        last_event_id=int(r[5]),
        start_ms=int(r[6]),
        events=list(r[7]),
        attempt=int(r[8]),
        since=int(r[9]),
        history_bytes=int(r[10]) if len(r) > 10 else -1,
    )


def _completion(r: Any) -> CompletionReply:
    """A workflow task's completion, as wft_complete answers it."""
    reply = _reply(r[0])
    if reply is Reply.OK:
        handed = [int(x) for x in r[3]]
        pairs = tuple(zip(handed[::2], handed[1::2], strict=True))
        return CompletionReply(reply, int(r[1]), now_ms=int(r[2]), eager=pairs, fence=text(r[4]))
    if reply is Reply.STARTED:
        return CompletionReply(reply, started=_started(r[1]))
    return CompletionReply(reply, why=text(r[1]) if len(r) > 1 else "")


class Protocol:
    """The scripts of one namespace, called through one client."""

    def __init__(self, redis: Redis, keyspace: Keyspace) -> None:
        self.redis = redis
        self.ks = keyspace
        self.scripts = Scripts(redis)
        self._shared_keys: dict[int, tuple[str, ...]] = {}

    async def _call(self, name: str, shard: int, args: list[Any], keys: Iterable[str] = ()) -> Any:
        declared = [self.ks.timers(shard), self.ks.closed(shard), *dict.fromkeys(keys)]
        if name in _STARTS_OR_CLOSES:  # (then the shard's outbox and listing indexes)
            declared += [k for k in self._shared(shard) if k not in declared]
        return await self.scripts.call(name, declared, [self.ks.prefix(shard), *args])

    def _shared(self, shard: int) -> tuple[str, ...]:
        keys = self._shared_keys.get(shard)
        if keys is None:
            ks = self.ks
            keys = self._shared_keys[shard] = (
                ks.outbox(shard),
                ks.index(shard, "start"),
                ks.index(shard, "open"),
                ks.index(shard, "exp"),
                ks.schedules(shard, "due"),
                ks.schedules(shard, "fin"),
            )
        return keys

    async def _client_call(
        self, shard: int, workflow_id: str, run_id: str | None, call: Callable[[list[str]], Awaitable[T]]
    ) -> T:
        """Read which run a client's call reaches and the streams its workflow task would
        go to, declare their keys, call; look again while the script answers REROUTE."""
        ks = self.ks
        for _ in range(REROUTE_TRIES):
            run = run_id or text(await self.redis.hget(ks.wf(shard, workflow_id), "run") or b"")
            keys = [ks.wf(shard, workflow_id)]
            if run:
                keys += await self._run_route_keys(shard, workflow_id, run)
            res = await call(keys)
            if not (isinstance(res, list) and res and _reply(res[0]) is Reply.REROUTE):
                return res
        raise RuntimeError(
            f"execution '{workflow_id}' changed its current run {REROUTE_TRIES} times while a call was "
            "routed to it; try again"
        )

    async def _run_route_keys(self, shard: int, workflow_id: str, run: str) -> list[str]:
        """The run's keys and the streams its workflow tasks go to (its task queue's,
        the sticky one of the worker caching it, and where its task message is, to drop
        it if the call closes the run), read from its hash."""
        ks = self.ks
        tq, sticky, wft_q = await self.redis.hmget(ks.run(shard, run), ["tq", "sticky", "wft_q"])
        keys = ks.run_keys(shard, workflow_id, run)
        if tq:
            keys += [ks.queue(shard, text(tq), "wft"), ks.queue(shard, text(tq), "qry")]
            if sticky:
                keys.append(ks.sticky(shard, text(tq), text(sticky)))
        if wft_q:
            keys.append(text(wft_q))
        return keys

    # -- clients ----------------------------------------------------------------------
    async def start(
        self, workflow_id: str, run_id: str, workflow_type: str, task_queue: str, body: bytes, timeout_ms: int
    ) -> RunReply:
        shard = self.ks.shard(workflow_id)
        ks = self.ks
        keys = [
            ks.wf(shard, workflow_id),
            ks.run(shard, run_id),
            ks.history(shard, workflow_id, run_id),
            ks.queue(shard, task_queue, "wft"),
            ks.signals(shard, workflow_id),  # (kept from the execution's earlier runs)
        ]
        res = await self._call(
            "start", shard, [workflow_id, run_id, workflow_type, task_queue, body, timeout_ms], keys
        )
        reply = _reply(res[0])
        if reply is Reply.INVALID:
            return RunReply(reply, "", text(res[1]))
        return RunReply(reply, text(res[1]))

    async def terminate(
        self, workflow_id: str, run_id: str | None, body: bytes, retention_ms: int, request_id: str
    ) -> RunReply:
        shard = self.ks.shard(workflow_id)
        args = [workflow_id, run_id or "", body, retention_ms, request_id]
        res = await self._client_call(
            shard, workflow_id, run_id, lambda keys: self._call("terminate", shard, args, keys)
        )
        return RunReply(_reply(res[0]), text(res[1]))

    async def cancel(self, workflow_id: str, run_id: str | None, body: bytes, request_id: str) -> RunReply:
        """Ask the run to cancel (see cancel.lua): OK, DUPLICATE (asked before) or NOT_RUNNING."""
        shard = self.ks.shard(workflow_id)
        args = [workflow_id, run_id or "", body, request_id]
        res = await self._client_call(
            shard, workflow_id, run_id, lambda keys: self._call("cancel", shard, args, keys)
        )
        return RunReply(_reply(res[0]), text(res[1]))

    async def reset(self, plan: ResetPlan, retention_ms: int) -> RunReply:
        """Replace run ``plan.old_run`` with a new run built from its history (see
        reset.lua): OK (with the new run), STALE (the old run changed since its history
        was read: nothing written, read again) or INVALID."""
        ks, wid = self.ks, plan.workflow_id
        shard = ks.shard(wid)
        keys = [ks.wf(shard, wid), *await self._run_route_keys(shard, wid, plan.old_run)]
        keys += [*ks.run_keys(shard, wid, plan.new_run), ks.queue(shard, plan.task_queue, "wft")]
        args: list[Any] = [
            wid,
            plan.old_run,
            plan.new_run,
            plan.last_event_id,
            retention_ms,
            plan.terminate_body,
            plan.workflow_type,
            plan.task_queue,
            plan.timeout_ms,
            plan.start_body,
            len(plan.events),
        ]
        for etype, at_ms, body in plan.events:
            args += [etype, at_ms, body]
        args.append(len(plan.activities))
        for aux, body in plan.activities:
            args += [pack(list(aux)), body]
            keys.append(ks.queue(shard, str(aux[1]), "act"))
        args.append(len(plan.timers))
        for seq, due_ms in plan.timers:
            args += [seq, due_ms]
        args.append(len(plan.updates))
        for update_id, outcome in plan.updates:
            args += [update_id, outcome]
        res = await self._call("reset", shard, args, keys)
        reply = _reply(res[0])
        return RunReply(
            reply, text(res[1]) if reply is Reply.OK else "", "" if reply is Reply.OK else text(res[1])
        )

    async def signal(self, workflow_id: str, run_id: str | None, body: bytes, request_id: str) -> RunReply:
        shard = self.ks.shard(workflow_id)
        args = [workflow_id, run_id or "", body, request_id]
        res = await self._client_call(
            shard, workflow_id, run_id, lambda keys: self._call("signal", shard, args, keys)
        )
        return RunReply(_reply(res[0]), text(res[1]))

    async def signal_with_start(
        self,
        workflow_id: str,
        run_id: str,
        workflow_type: str,
        task_queue: str,
        body: bytes,
        timeout_ms: int,
        signal_body: bytes,
        request_id: str,
    ) -> SignalStartReply:
        """Signal the execution's running run, or start ``run_id`` with ``body`` and
        signal it, in one call (see signal_start.lua)."""
        shard = self.ks.shard(workflow_id)
        ks = self.ks
        args = [workflow_id, run_id, workflow_type, task_queue, body, timeout_ms, signal_body, request_id]
        fresh = [*ks.run_keys(shard, workflow_id, run_id), ks.queue(shard, task_queue, "wft")]
        res = await self._client_call(
            shard, workflow_id, None, lambda keys: self._call("signal_start", shard, args, [*keys, *fresh])
        )
        reply = _reply(res[0])
        if reply is Reply.INVALID:
            return SignalStartReply(reply, "", why=text(res[1]))
        return SignalStartReply(reply, text(res[1]), started=text(res[2]) == "1")

    async def update(
        self, workflow_id: str, run_id: str | None, update_id: str, body: bytes, expect: str = ""
    ) -> UpdateReply:
        """Accept an update (see update.lua); ``expect`` is for one with a validator:
        ``"=" + fence`` (accept it only in the state the validator saw), ``"!"`` (only
        answer for an id known already); either is answered STALE otherwise."""
        shard = self.ks.shard(workflow_id)
        args = [workflow_id, run_id or "", update_id, body, expect]
        res = await self._client_call(
            shard, workflow_id, run_id, lambda keys: self._call("update", shard, args, keys)
        )
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
        args = [workflow_id, run_id or "", body, reply_stream, request_id, wait_ms]
        res = await self._client_call(
            shard, workflow_id, run_id, lambda keys: self._call("query", shard, args, keys)
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
        ks = self.ks
        missing = [it.run_id for it in items if not it.workflow_id]
        wids: dict[str, str] = {}
        if missing:  # a message written before task messages named the workflow
            async with self.redis.pipeline(transaction=False) as pipe:
                for run in missing:
                    pipe.hget(ks.run(shard, run), "wid")
                wids = {run: text(w or b"") for run, w in zip(missing, await pipe.execute(), strict=True)}
        args: list[Any] = [timeout_ms, max_events, worker]
        keys = [stream]
        for it in items:
            args += [it.run_id, it.message_id, it.since, it.fence]
            keys += [
                ks.run(shard, it.run_id),
                ks.history(shard, it.workflow_id or wids[it.run_id], it.run_id),
            ]
        res = await self._call("wft_start", shard, args, keys)
        return [_started(r) if _reply(r[0]) is Reply.OK else WftStarted(_reply(r[0])) for r in res]

    async def wft_complete(
        self,
        shard: int,
        stream: str,
        task_queue: str,
        retention_ms: int,
        worker: str,
        sticky_ms: int,
        tasks: Sequence[TaskCompletion],
        *,
        timeout_ms: int = 10_000,
        max_events: int = HISTORY_PAGE,
    ) -> list[CompletionReply]:
        """``stream``: where the tasks' messages were read (shared or this worker's own).
        ``timeout_ms`` and ``max_events`` matter only to a speculative task: the longest
        it may have run, and, started instead, as for wft_start."""
        ks = self.ks
        args: list[Any] = [task_queue, retention_ms, worker, sticky_ms, timeout_ms, max_events]
        keys = [stream, ks.queue(shard, task_queue, "wft"), ks.sticky(shard, task_queue, worker)]
        for t in tasks:
            spec = "" if t.speculative_ms is None else t.speculative_ms
            args += [t.run_id, t.fence, t.message_id, spec, len(t.commands)]
            keys += ks.run_keys(shard, t.workflow_id, t.run_id)
            for c in t.commands:
                activity = c.kind is CommandKind.SCHEDULE_ACTIVITY and len(c.aux) > 1
                eager = activity and c.aux[0] in t.eager
                args += [str(c.kind), c.body, pack(list(c.aux)), "1" if eager else ""]
                if activity and not eager and isinstance(c.aux[1], str):
                    keys.append(ks.queue(shard, c.aux[1], "act"))
                elif c.kind is CommandKind.CONTINUE_AS_NEW and c.aux and isinstance(c.aux[0], str):
                    keys += ks.run_keys(shard, t.workflow_id, c.aux[0])  # the execution's next run
        res = await self._call("wft_complete", shard, args, keys)
        return [_completion(r) for r in res]

    async def wft_fail(self, shard: int, stream: str, failures: Sequence[WftFailure]) -> list[Reply]:
        """``stream``: where the tasks' messages were read."""
        ks = self.ks
        args: list[Any] = []
        keys = [stream]
        for f in failures:
            args += [f.run_id, f.fence, f.message_id, f.body]
            keys += [
                ks.run(shard, f.run_id),
                ks.history(shard, f.workflow_id, f.run_id),
                ks.buffer(shard, f.run_id),
            ]
        return [_reply(r) for r in await self._call("wft_fail", shard, args, keys)]

    # -- activities -------------------------------------------------------------------
    async def act_start(
        self, shard: int, stream: str, worker: str, items: Sequence[ActStartItem]
    ) -> list[ActStarted]:
        ks = self.ks
        args: list[Any] = [worker]
        keys = [stream]
        for it in items:
            args += [it.run_id, it.seq, it.attempt, it.message_id]
            keys += [ks.run(shard, it.run_id), ks.acts(shard, it.run_id)]
        res = await self._call("act_start", shard, args, keys)
        out = []
        for it, r in zip(items, res, strict=True):
            reply = _reply(r[0])
            if reply is not Reply.OK:
                out.append(ActStarted(reply))
                continue
            wid = text(r[3])
            route = ActivityRoute(wid, text(r[7]), text(r[8]), stream, it.message_id)
            out.append(
                ActStarted(reply, r[1] or b"", r[2] or b"", wid, text(r[4]), int(r[5]), int(r[6]), route)
            )
        return out

    async def act_done(
        self, shard: int, outcomes: Sequence[ActivityOutcome], eager: EagerStart | None = None
    ) -> list[ActDone]:
        """``eager``: the reporting worker also runs the runs' workflow tasks."""
        ks = self.ks
        args: list[Any] = [eager.worker, eager.timeout_ms, eager.max_events] if eager else ["", 1, 1]
        keys: list[str] = []
        positions = eager.positions if eager else {}
        for o in outcomes:
            rt = o.route
            since, seen = positions.get(o.run_id, (-1, ""))
            args += [
                "fail" if o.failed else Reply.OK.value,
                o.run_id,
                o.seq,
                o.attempt,
                o.body,
                "1" if o.non_retryable else "0",
                o.heartbeat_details,
                rt.stream,
                rt.message_id,
                since,
                seen,
            ]
            keys += [
                ks.run(shard, o.run_id),
                ks.acts(shard, o.run_id),
                ks.history(shard, rt.workflow_id, o.run_id),
                ks.buffer(shard, o.run_id),
            ]
            if rt.stream:  # (none for an attempt handed over at its scheduling)
                keys.append(rt.stream)
            if rt.task_queue:
                keys.append(ks.queue(shard, rt.task_queue, "wft"))
                if rt.sticky:
                    keys.append(ks.sticky(shard, rt.task_queue, rt.sticky))
        res = await self._call("act_done", shard, args, keys)
        return [ActDone(_reply(r[0]), _started(r[1]) if r[1] else None) for r in res]

    async def heartbeat(
        self, shard: int, run_id: str, seq: int, attempt: int, details: bytes
    ) -> HeartbeatReply:
        keys = [self.ks.run(shard, run_id), self.ks.acts(shard, run_id)]
        res = await self._call("heartbeat", shard, [run_id, seq, attempt, details], keys)
        reply = _reply(res[0])
        if reply is not Reply.OK:
            return HeartbeatReply(reply)
        return HeartbeatReply(reply, int(res[1]), int(res[2]))

    # -- schedules (see sched_put.lua, sched_fire.lua, sched_state.lua) -----------------
    async def schedule_put(
        self,
        rec: ScheduleRecord,
        mode: str,
        now_ms: int,
        paused: bool | None = None,
        note: str = "",
        *,
        expected_version: str = "",
        dropped: int = 0,
    ) -> RunReply:
        """Create (``create``), change (``update``) or create-or-change (``declare``):
        OK with what it did ("created", "updated", "unchanged"), NOT_FOUND, DUPLICATE,
        STALE (``expected_version`` is not the stored one) or INVALID (with why)."""
        shard = self.ks.shard(rec.schedule_id)
        args = [
            rec.schedule_id,
            mode,
            rec.workflow_type,
            rec.task_queue,
            rec.timeout_ms,
            rec.template,
            rec.template_entries,
            rec.definition,
            rec.digest,
            rec.origin,
            rec.overlap.value,
            rec.catchup_ms,
            "1" if rec.pause_on_failure else "0",
            "" if rec.max_executions is None else rec.max_executions,
            now_ms,
            "" if paused is None else ("1" if paused else "0"),
            note,
            expected_version,
            dropped,
        ]
        res = await self._call("sched_put", shard, args, self.ks.schedule_keys(shard, rec.schedule_id))
        return RunReply(_reply(res[0]), "", text(res[1]) if len(res) > 1 else "")

    async def schedule_state(
        self, schedule_id: str, op: str, now_ms: int, note: str = "", skipped: int = 0
    ) -> RunReply:
        """``pause``, ``unpause`` (``skipped``: the due times the pause skipped) or
        ``delete``: OK (with what it did) or NOT_FOUND."""
        shard = self.ks.shard(schedule_id)
        keys = self.ks.schedule_keys(shard, schedule_id)
        res = await self._call("sched_state", shard, [schedule_id, op, now_ms, note, skipped], keys)
        return RunReply(_reply(res[0]), "", text(res[1]) if len(res) > 1 else "")

    async def schedule_fire(
        self,
        schedule_id: str,
        digest: str,
        now_ms: int,
        mode: str,
        *,
        version: str,
        task_queue: str,
        retention_ms: int,
        fires: Sequence[ScheduleFire] = (),
        overlap: Overlap | None = None,
        next_score: int = -1,
        waiting: ScheduleFire | None = None,
        closed: Sequence[str] = (),
        others: Sequence[str] = (),
        skip_to_ms: int | None = None,
        skip_count: int = 0,
    ) -> FireReply:
        """Act on due times (see sched_fire.lua). ``waiting``: the first due time that
        waits, with a run id for it; ``closed``: the executions sched:fin names for the
        schedule; ``others``: its open executions, whose runs a CANCEL_OTHER or
        TERMINATE_OTHER may end (their keys are read here, and again on REROUTE)."""
        ks = self.ks
        shard = ks.shard(schedule_id)
        base = ks.schedule_keys(shard, schedule_id)
        for f in [*fires, *([waiting] if waiting else [])]:
            base += [
                ks.wf(shard, f.workflow_id),
                ks.run(shard, f.run_id),
                ks.history(shard, f.workflow_id, f.run_id),
                ks.signals(shard, f.workflow_id),
            ]
        if fires or waiting:
            base.append(ks.queue(shard, task_queue, "wft"))
        base += [ks.wf(shard, wid) for wid in closed]
        args: list[Any] = [
            schedule_id,
            digest,
            version,
            now_ms,
            mode,
            overlap.value if overlap else "",
            retention_ms,
            next_score,
            waiting.run_id if waiting else "",
            "" if skip_to_ms is None else skip_to_ms,
            skip_count,
            len(fires),
        ]
        for f in fires:
            args += [f.due_ms, f.start_ms if f.start_ms >= 0 else f.due_ms, f.workflow_id, f.run_id]
        for _ in range(REROUTE_TRIES):
            keys = list(base)
            for wid in others:
                run = text(await self.redis.hget(ks.wf(shard, wid), "run") or b"")
                keys.append(ks.wf(shard, wid))
                if run:
                    keys += await self._run_route_keys(shard, wid, run)
            res = await self._call("sched_fire", shard, args, keys)
            reply = _reply(res[0])
            if reply is Reply.REROUTE:
                others = [text(w) for w in await self.redis.smembers(ks.schedule(shard, schedule_id, "open"))]
                continue
            if reply is Reply.INVALID:
                raise ValueError(f"schedule {schedule_id!r}: {text(res[1])}")
            if reply is not Reply.OK:
                return FireReply(reply)
            return FireReply(reply, int(res[1]), int(res[2]), int(res[3]), text(res[4]), text(res[5]))
        raise RuntimeError(f"schedule {schedule_id!r}: its open executions kept changing; try again")

    # -- maintenance ------------------------------------------------------------------
    async def pump(self, shard: int, limit: int, retention_ms: int, worker: str) -> PumpReply:
        """Three steps, so that every key is declared: what is due (taking the shard's
        pump lease when something is), the state of the runs it names (one pipeline of
        reads), then one script that acts on what is still due and gives the lease back.
        Nothing due costs the first step only; while another worker holds the lease, the
        reply's next due time is when it runs out."""
        lease = self.ks.pump_lease(shard)
        due = await self._call("pump_due", shard, [limit, worker, PUMP_LEASE_MS], [lease])
        now, next_due, members = int(due[0]), int(due[1]), [text(m) for m in due[2:]]
        if not members:
            return PumpReply(0, next_due, now)
        keys = await self._pump_keys(shard, members)
        res = await self._call("pump", shard, [retention_ms, worker, *members], [lease, *keys])
        return PumpReply(int(res[0]), int(res[1]), int(res[2]))

    async def _pump_keys(self, shard: int, members: list[str]) -> list[str]:
        ks = self.ks
        runs = list(dict.fromkeys(m.split("|")[1] for m in members if m.count("|") >= 1))
        # a msg_drop member names its stream: after the shard's prefix, past its third '|'
        dropped = [
            ks.prefix(shard) + m.split("|", 3)[3]
            for m in members
            if m.startswith(TimerKind.MESSAGE_DROP.value + "|") and m.count("|") >= 3
        ]
        acts = [(m.split("|")[1], m.split("|")[2]) for m in members if m.split("|")[0] in _ACTIVITY_TIMERS]
        async with self.redis.pipeline(transaction=False) as pipe:
            for run in runs:
                pipe.hmget(ks.run(shard, run), ["wid", "tq", "sticky", "wft_q"])
            for run, seq in acts:
                pipe.hget(ks.acts(shard, run), seq)
            res = await pipe.execute()
        keys: list[str] = dropped
        for run, (wid, tq, sticky, wft_q) in zip(runs, res, strict=False):
            keys += [ks.run(shard, run), ks.acts(shard, run), ks.buffer(shard, run)]
            keys += [ks.updates(shard, run), ks.run_signals(shard, run)]
            if wid:
                w = text(wid)
                keys += [ks.wf(shard, w), ks.history(shard, w, run), ks.history_packed(shard, run)]
                keys.append(ks.signals(shard, w))
            if tq:
                keys.append(ks.queue(shard, text(tq), "wft"))
                if sticky:
                    keys.append(ks.sticky(shard, text(tq), text(sticky)))
            if wft_q:
                keys.append(text(wft_q))
        for raw in res[len(runs) :]:
            state = unpack(raw) if raw else None
            if isinstance(state, dict) and isinstance(state.get("tq"), str):
                keys.append(ks.queue(shard, state["tq"], "act"))
        return keys

    # -- the outbox: effects on other executions (see outbox_apply.lua, outbox.py) ----------
    async def start_child(self, child: ChildStart) -> RunReply:
        """Start a parent's child on the child's shard: OK (now or by an earlier
        delivery), RUNNING (its id is taken by a running run: named) or INVALID."""
        ks, wid, run = self.ks, child.workflow_id, child.run_id
        shard = ks.shard(wid)
        keys = [
            ks.wf(shard, wid),
            ks.run(shard, run),
            ks.history(shard, wid, run),
            ks.queue(shard, child.task_queue, "wft"),
            ks.signals(shard, wid),
        ]
        args = [
            OutboxKind.START_CHILD.value,
            wid,
            run,
            child.workflow_type,
            child.task_queue,
            child.start_body,
            child.timeout_ms,
            f"{child.parent_seq}|{child.parent_run_id}|{child.parent_workflow_id}",
        ]
        res = await self._call("outbox_apply", shard, [1, *args], keys)
        reply = _reply(res[0])
        return RunReply(
            reply,
            text(res[1]) if reply is not Reply.INVALID else "",
            text(res[1]) if reply is Reply.INVALID else "",
        )

    async def report_child_closed(self, report: ChildClosed) -> Reply:
        """Deliver a child's outcome to its parent run: OK, or DUPLICATE (delivered
        before, or the parent no longer waits for it)."""
        ks, wid, run = self.ks, report.parent_workflow_id, report.parent_run_id
        shard = ks.shard(wid)
        keys = await self._run_route_keys(shard, wid, run)
        args = [
            OutboxKind.CHILD_CLOSED.value,
            run,
            report.seq,
            report.child_workflow_id,
            report.started_body,
            str(report.event_type),
            report.body,
        ]
        res = await self._call("outbox_apply", shard, [1, *args], keys)
        return _reply(res[0])

    async def apply_close_policy(
        self,
        kind: OutboxKind,
        child_workflow_id: str,
        parent_run_id: str,
        body: bytes,
        request_id: str,
        retention_ms: int,
    ) -> Reply:
        """Terminate (``kind`` TERMINATE) or ask to cancel (CANCEL) the running run of
        a child's execution, if it is still that parent's child: OK, NOT_RUNNING or
        DUPLICATE (a cancel asked before)."""
        shard = self.ks.shard(child_workflow_id)
        args = [retention_ms, kind.value, child_workflow_id, parent_run_id, body, request_id]
        res = await self._client_call(
            shard, child_workflow_id, None, lambda keys: self._call("outbox_apply", shard, args, keys)
        )
        return _reply(res[0])

    async def outbox_done(
        self, shard: int, entry_id: str, consumer: str, kind: OutboxKind, answer: OutboxAnswer | None = None
    ) -> Reply:
        """Remove an applied outbox entry, recording ``answer`` in the run that waits for
        it (a child's start, a signal's delivery) in the same call: OK, or STALE when
        the entry is no longer pending for ``consumer`` (another took it over)."""
        keys = [self.ks.outbox(shard)]
        args: list[Any] = [entry_id, consumer, kind.value]
        if answer is not None:
            keys += await self._run_route_keys(shard, answer.workflow_id, answer.run_id)
            args += [answer.run_id, answer.seq, answer.reply.value, answer.body]
        return _reply((await self._call("outbox_done", shard, args, keys))[0])

    async def trim_index(self, shard: int, retention_ms: int, limit: int = 1000, sweep: int = 100) -> int:
        """Forget up to ``limit`` expired closed runs in the shard's listing indexes, and
        check the next ``sweep`` entries of idx:open and of idx:start against their runs
        (read here first, so that the script is told every key: see idx_trim.lua)."""
        ks = self.ks
        cursors = ks.index(shard, "sweep")
        at = [0, 0]
        found: Any = [[], []]
        if sweep:  # (the cursors, then both pieces in one round trip)
            at = [int(v or 0) for v in await self.redis.hmget(cursors, ["open", "start"])]
            async with self.redis.pipeline(transaction=False) as pipe:
                for index, i in (("open", at[0]), ("start", at[1])):
                    pipe.zrange(ks.index(shard, index), i, i + sweep - 1)
                found = await pipe.execute()
        args: list[Any] = [limit, retention_ms]
        keys = [cursors]
        for i, members in zip(at, found, strict=True):
            runs = [text(m) for m in members]
            args += [i, sweep, len(runs), *runs]
            keys += [ks.run(shard, run) for run in runs]
        return int(await self._call("idx_trim", shard, args, keys))

    # -- reads --------------------------------------------------------------------------
    async def history(self, shard: int, workflow_id: str, run_id: str, after: int = 0) -> list[Any]:
        """A run's events after ``after``, as XRANGE entries, from its stream or, once the
        run closed, from the value its history was packed into (see lib.lua)."""
        key = self.ks.history(shard, workflow_id, run_id)
        # the first page and the packed value in one round trip: a run is read whole
        # from one or the other (it is packed only if shorter than a page)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xrange(key, min=f"({after}-0", max="+", count=HISTORY_PAGE)
            pipe.get(self.ks.history_packed(shard, run_id))
            pipe.get(self.ks.history_packed_before(shard, workflow_id, run_id))
            pipe.hget(self.ks.run(shard, run_id), "wid")
            page, packed, packed_before, owner = await pipe.execute()
        if packed is not None and owner is not None and text(owner) != workflow_id:
            packed = None  # (keyed by its run alone: another execution's run is not this one's)
        packed = packed or packed_before
        out: list[Any] = list(page)
        while len(page) == HISTORY_PAGE:
            cursor = int(text(page[-1][0]).split("-", 1)[0])
            page = await self.redis.xrange(key, min=f"({cursor}-0", max="+", count=HISTORY_PAGE) or []
            out += page
        if out or packed is None:
            return out
        return [e for e in _unpack_history(packed) if int(e[0][:-2]) > after]

    async def closed_cursor(self, shard: int) -> str:
        """The id of the shard's last closed-stream entry: a follower reading from it
        sees every run that closes afterwards."""
        last = await self.redis.xrevrange(self.ks.closed(shard), count=1)
        return text(last[0][0]) if last else "0-0"

    async def wait_history(
        self, reader: Any, shard: int, workflow_id: str, run_id: str, after: int, closed: str, block_ms: int
    ) -> tuple[list[Any], list[Any]]:
        """One blocking read (on ``reader``, a blocking-read client) of both a run's
        events after ``after`` and the shard's closed stream after ``closed``: it returns
        as soon as the run grows or any run of the shard closes (its history may then
        have been packed: read the rest with :meth:`history`). Both keys share the
        shard's hash tag, so it is one call on a Cluster too."""
        key, ck = self.ks.history(shard, workflow_id, run_id), self.ks.closed(shard)
        resp = await reader.xread({key: f"{after}-0", ck: closed}, block=block_ms, count=HISTORY_PAGE)
        events: list[Any] = []
        closes: list[Any] = []
        for stream, entries in resp or []:
            (events if text(stream) == key else closes).extend(entries)
        return events, closes

    async def dead_letter(self, shard: int, stream: str, message_id: str, reason: str) -> bool:
        keys = [stream, self.ks.dead_letters(stream)]
        return bool(await self._call("dead_letter", shard, [message_id, reason], keys))
