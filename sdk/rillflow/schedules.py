"""Schedules in Redis: creating and changing them, finding their due times, and what
``describe`` shows. Every due time's run starts in one script (sched_fire.lua) that
checks and records it, so that however many workers (and clients) act on a schedule at
once, each due time starts one run: the execution ``<schedule id>@<due time>``.

The evaluator (:func:`evaluate`, run by every worker's schedule loop) reads a schedule,
works out its due times up to a clock it is handed, and passes them to that script with
what the script needs declared. The clock is the worker's (Redis's by default); a test
hands one of its own, and no test waits for wall-clock minutes.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from rillflow.durations import time_of_ms
from rillflow.errors import InvalidInputError, RillflowError, WorkflowNotRegisteredError
from rillflow.models import PartialScheduleDefinition, ScheduleDefinition, ScheduleOverlapPolicy
from rillflow.payloads import check_size, validation_summary
from rillflow.schedule_times import fire_times, jittered, next_fire_times
from rillflow_runtime.codec import pack, text, unpack
from rillflow_runtime.keyspace import SCHEDULE_ID_RE
from rillflow_runtime.model import Overlap, Reply, ScheduleAction
from rillflow_runtime.protocol import FireReply, ScheduleFire, ScheduleRecord

if TYPE_CHECKING:
    from rillflow.client import Client
    from rillflow.handle import WorkflowHandle
    from rillflow.workflow import WorkflowDefinition

# how many due times one evaluation passes to the script
BATCH = 100
# how many skipped due times a catch-up counts (past it, the log says "at least")
SKIP_COUNT_CAP = 10_000
# how many due times one backfill may name
BACKFILL_MAX = 10_000
# the score of a schedule that never comes due (see lib.lua's SCHEDULE_NEVER)
NEVER_MS = 253_402_300_800_000

_HASH_FIELDS = (
    "wf",
    "tq",
    "def",
    "digest",
    "origin",
    "paused_ms",
    "note",
    "cursor",
    "remaining",
    "created_ms",
    "updated_ms",
    "n_run",
    "n_skip",
    "catchup",
    "overlap",
    "ver",
)


class ScheduleNotFoundError(RillflowError, LookupError):
    pass


class ScheduleAlreadyExistsError(RillflowError):
    pass


def execution_id(schedule_id: str, due: datetime) -> str:
    """The execution a due time starts: ``<schedule id>@<UTC time>``, whole seconds
    unless the time has milliseconds, like ``report@20261208T000000Z``."""
    due = due.astimezone(UTC)
    stamp = due.strftime("%Y%m%dT%H%M%S")
    if due.microsecond:
        stamp += f".{due.microsecond // 1000:03d}"
    return f"{schedule_id}@{stamp}Z"


def ms(t: datetime) -> int:
    return int((t - _EPOCH) // timedelta(milliseconds=1))


def at_ms(value: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=value)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def overlap_of(policy: ScheduleOverlapPolicy | int | str) -> Overlap:
    """A policy as the scripts store it; a clear error for one that is none."""
    try:
        if isinstance(policy, str) and not policy.isdigit():
            return Overlap(policy.lower())
        return Overlap(ScheduleOverlapPolicy(int(policy)).name.lower())
    except (ValueError, TypeError):
        names = ", ".join(p.name for p in ScheduleOverlapPolicy)
        raise InvalidInputError(f"overlap {policy!r} is not one of {names}") from None


def declared_id(workflow: str, position: int) -> str:
    """The id of a workflow's declared schedule that has no ``schedule_id``: stable as
    long as its place in ``schedules=[...]`` is."""
    return f"{workflow}-{position}"


# -- building what is stored ---------------------------------------------------------------
async def record_for(
    client: Client,
    workflow: type | str,
    schedule: Any,
    *,
    schedule_id: str | None,
    task_queue: str | None,
    origin: str,
    defn: WorkflowDefinition | None = None,
    unregistered_ok: bool = False,
) -> ScheduleRecord:
    """A schedule checked and encoded as sched_put stores it: the definition valid, the
    input fitting the workflow (its class, or its registered schema), the start body
    within the payload limit. Nothing is written."""
    from rillflow.workflow import get_workflow_definition

    if not isinstance(schedule, ScheduleDefinition):
        raise InvalidInputError(
            f"a schedule is a rillflow.models.ScheduleDefinition, not a {type(schedule).__name__}"
        )
    sid = schedule_id or schedule.schedule_id
    if not sid:
        raise InvalidInputError(
            "a schedule needs an id: pass schedule_id=, or set schedule_id in the definition"
        )
    if not isinstance(sid, str) or not SCHEDULE_ID_RE.fullmatch(sid):
        raise InvalidInputError(f"schedule_id {sid!r} is invalid: use 1-200 letters, digits, '_', '-', '.'")
    if defn is None and not isinstance(workflow, str):
        defn = get_workflow_definition(workflow)
    name = defn.name if defn else str(workflow)
    # (unregistered_ok: a change of a stored schedule, whose queue is known, before any
    # worker registered its workflow: checked against the registry if it has it)
    try:
        req = await client._start_request(
            defn.cls if defn else name,
            schedule.input,
            "x",
            task_queue,
            None,
            unregistered_ok and task_queue is not None,
        )
    except WorkflowNotRegisteredError as e:
        raise WorkflowNotRegisteredError(
            f"schedule {sid!r}: {str(e).split('. ')[0]}. Start a worker that serves it first, or create the "
            "schedule from the workflow's class (client.create_schedule(MyWorkflow, ...)), which needs no worker"
        ) from None
    definition = schedule.model_copy(update={"schedule_id": sid})
    try:
        def_json = definition.model_dump_json()
    except Exception as e:  # (an input pydantic cannot write as JSON)
        raise InvalidInputError(f"schedule {sid!r}: its input cannot be stored as JSON: {e}") from None
    start = unpack(req.body)
    data = {k: start[k] for k in ("workflow_type", "task_queue", "input", "execution_timeout_ms")}
    tpl = pack(data)
    # (the run's own entries come on top: a seed, the schedule id, the due time)
    check_size(tpl + b"x" * (len(sid) + 64), client.max_payload_bytes, f"input of schedule {sid!r}")
    digest = hashlib.sha1(
        "\x00".join([name, req.task_queue, str(req.timeout_ms), def_json]).encode()
    ).hexdigest()
    policy = definition.policy
    return ScheduleRecord(
        schedule_id=sid,
        workflow_type=name,
        task_queue=req.task_queue,
        timeout_ms=req.timeout_ms,
        template=tpl[1:],  # (a fixmap: its header is one byte, written again by the script)
        template_entries=len(data),
        definition=def_json,
        digest=digest,
        origin=origin,
        overlap=overlap_of(policy.overlap),
        catchup_ms=policy.catchup_window_seconds * 1000,
        pause_on_failure=policy.pause_on_failure,
        max_executions=definition.max_executions,
    )


# -- the evaluator -----------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """What an evaluation passes to sched_fire: the due times by now, when to look next,
    and the due times the catch-up window leaves behind."""

    fires: list[tuple[int, int, str]]  # (due ms, start ms: with its jitter, execution id)
    next_score: int  # -1: none ahead
    skip_to_ms: int | None = None
    skip_count: int = 0


def plan(
    definition: ScheduleDefinition,
    schedule_id: str,
    cursor_ms: int,
    now_ms: int,
    catchup_ms: int,
    remaining: int | None,
) -> Plan:
    """The due times after the cursor whose (jittered) start is by ``now_ms``, at most
    :data:`BATCH` (and ``remaining``); those older than the catch-up window are counted
    and skipped over, not listed. The window is measured by a run's start (the due time
    with its jitter, as the evaluator is woken by it): due times within a jitter of its
    edge are listed, and the script decides each. Pure: a test hands it any time."""
    lo = now_ms - catchup_ms
    skip_to, skipped = None, 0
    if cursor_ms < lo:
        skip_to = lo
        last: datetime | None = None
        before_last: datetime | None = None
        for due in fire_times(definition, at_ms(cursor_ms), until=at_ms(lo)):
            skipped += 1
            before_last, last = last, due
            if skipped >= SKIP_COUNT_CAP:
                break
        if definition.jitter and last is not None and skipped < SKIP_COUNT_CAP:
            # jitter is capped at the gap to the next due time: of those before the edge
            # only the last may start within the window; it is listed, the script decides
            skip_to, skipped = (ms(before_last) if before_last else cursor_ms), skipped - 1
    after = skip_to if skip_to is not None else cursor_ms
    cap = BATCH if remaining is None else max(0, min(BATCH, remaining))
    fires: list[tuple[int, int, str]] = []
    next_score = -1
    times = fire_times(definition, at_ms(after))
    t = next(times, None)
    while t is not None:
        later = next(times, None)
        start = ms(jittered(definition, t, schedule_id, later))
        if start > now_ms:
            next_score = start
            break
        if len(fires) >= cap:
            next_score = 0 if cap else -1
            break
        fires.append((ms(t), start, execution_id(schedule_id, t)))
        t = later
    return Plan(fires, next_score, skip_to, skipped)


_definitions: dict[str, ScheduleDefinition] = {}


def stored_definition(digest: str, def_json: str) -> ScheduleDefinition:
    """A stored definition, parsed once per digest (the evaluator reads it every round)."""
    d = _definitions.get(digest)
    if d is None:
        if len(_definitions) > 10_000:
            _definitions.clear()
        d = _definitions[digest] = ScheduleDefinition.model_validate_json(def_json)
    return d


@dataclass(frozen=True)
class _State:
    version: str
    workflow_type: str
    task_queue: str
    definition: ScheduleDefinition
    digest: str
    paused: bool
    cursor_ms: int
    remaining: int | None
    catchup_ms: int
    overlap: Overlap
    open: list[str]
    waiting: str | None  # the first waiting entry's execution id
    closed: list[str]
    fields: dict[str, str | None]  # the hash as read
    # (read for describe only) the log, newest first, and every waiting entry
    log: list[dict[str, Any]] = field(default_factory=list)
    buffered: list[str] = field(default_factory=list)


async def _read(client: Client, schedule_id: str, *, full: bool = False) -> _State | None:
    """The schedule's state in one round trip (``full``: its log and waiting entries too)."""
    ks = client.keyspace
    shard = ks.shard(schedule_id)
    async with client.redis.pipeline(transaction=False) as pipe:
        pipe.hmget(ks.schedule(shard, schedule_id), list(_HASH_FIELDS))
        pipe.smembers(ks.schedule(shard, schedule_id, "open"))
        pipe.lrange(ks.schedule(shard, schedule_id, "buf"), 0, -1 if full else 0)
        pipe.hget(ks.schedules(shard, "fin"), schedule_id)
        if full:
            pipe.lrange(ks.schedule(shard, schedule_id, "log"), 0, -1)
        h, members, buf, fin, *log = await pipe.execute()
    f = dict(zip(_HASH_FIELDS, (text(v) if v is not None else None for v in h), strict=True))
    if not f["digest"] or not f["def"]:
        return None
    return _State(
        version=f["ver"] or "0",
        workflow_type=f["wf"] or "",
        task_queue=f["tq"] or "",
        definition=stored_definition(f["digest"], f["def"]),
        digest=f["digest"],
        paused=f["paused_ms"] is not None,
        cursor_ms=int(f["cursor"] or 0),
        remaining=int(f["remaining"]) if f["remaining"] is not None else None,
        catchup_ms=int(f["catchup"] or 0),
        overlap=Overlap(f["overlap"] or Overlap.SKIP.value),
        open=sorted(text(m) for m in members),
        waiting=text(buf[0]).split(" ")[1] if buf else None,
        closed=text(fin).split(" ") if fin else [],
        fields=f,
        log=[unpack(e) for e in log[0]] if log else [],
        buffered=[text(b) for b in buf],
    )


async def evaluate(client: Client, schedule_id: str, now_ms: int, retention_ms: int) -> FireReply:
    """One round of a schedule: its due times by ``now_ms`` (and what waited) acted on
    by sched_fire. Repeated by any number of workers at once, each due time still
    starts once; a definition changed meanwhile is read again."""
    for _ in range(5):
        st = await _read(client, schedule_id)
        if st is None:  # (deleted: the script drops its due entry)
            return await client.protocol.schedule_fire(
                schedule_id, "", now_ms, "tick", version="", task_queue="-", retention_ms=retention_ms
            )
        p = (
            Plan([], -1)
            if st.paused
            else plan(st.definition, schedule_id, st.cursor_ms, now_ms, st.catchup_ms, st.remaining)
        )
        res = await _fire(client, st, schedule_id, now_ms, "tick", p.fires, retention_ms, p, None)
        if res.reply is not Reply.STALE:
            return res
    return FireReply(Reply.STALE)


async def catch_up(client: Client, schedule_id: str, now_ms: int, retention_ms: int) -> None:
    """Evaluate until nothing is due by ``now_ms`` (one round acts on at most
    :data:`BATCH` due times): what a change must come after."""
    ks = client.keyspace
    due = ks.schedules(ks.shard(schedule_id), "due")
    for _ in range(SKIP_COUNT_CAP):
        res = await evaluate(client, schedule_id, now_ms, retention_ms)
        if res.reply is Reply.STALE:
            raise RillflowError(f"schedule {schedule_id!r} kept changing while it was evaluated; try again")
        score = await client.redis.zscore(due, schedule_id)
        if score is None or score > now_ms:
            return
    raise RillflowError(f"schedule {schedule_id!r} has more due times than one change may catch up on")


def _pending(st: _State, now_ms: int) -> int:
    """How many of the stored definition's due times are past but not acted on (their
    jittered start has not come): what moving the cursor to now passes over."""
    if st.paused:
        return 0
    return sum(1 for _ in fire_times(st.definition, at_ms(st.cursor_ms), until=at_ms(now_ms)))


async def _fire(
    client: Client,
    st: _State,
    schedule_id: str,
    now_ms: int,
    mode: str,
    fires: Sequence[tuple[int, int, str]],
    retention_ms: int,
    p: Plan | None,
    overlap: Overlap | None,
) -> FireReply:
    pol = overlap or st.overlap
    ends_others = pol in (Overlap.CANCEL_OTHER, Overlap.TERMINATE_OTHER) and bool(fires)
    return await client.protocol.schedule_fire(
        schedule_id,
        st.digest,
        now_ms,
        mode,
        version=st.version,
        task_queue=st.task_queue,
        retention_ms=retention_ms,
        fires=[ScheduleFire(due, wid, str(uuid.uuid4()), start) for due, start, wid in fires],
        overlap=overlap,
        next_score=p.next_score if p else -1,
        waiting=ScheduleFire(0, st.waiting, str(uuid.uuid4())) if st.waiting else None,
        closed=st.closed,
        others=st.open if ends_others else (),
        skip_to_ms=p.skip_to_ms if p else None,
        skip_count=p.skip_count if p else 0,
    )


# -- what describe shows -----------------------------------------------------------------
@dataclass(frozen=True)
class ScheduledRun:
    """A run a schedule started: its execution, due time, start, how (``clock``: when
    due; ``waited``: after an earlier run closed, by the overlap policy; ``trigger``;
    ``backfill``) and status now (``expired`` when retention has removed it)."""

    execution_id: str
    run_id: str
    scheduled_time: datetime
    started_at: datetime
    how: str
    status: str

    def to_json(self) -> dict[str, Any]:
        return {
            "execution_id": self.execution_id,
            "run_id": self.run_id,
            "scheduled_time": self.scheduled_time.isoformat(),
            "started_at": self.started_at.isoformat(),
            "how": self.how,
            "status": self.status,
        }


@dataclass(frozen=True)
class SkippedTime:
    """A due time (or, with ``until``, a range of them: ``count`` of them when counted)
    that did not run, and why."""

    scheduled_time: datetime
    why: str
    at: datetime
    until: datetime | None = None
    count: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "scheduled_time": self.scheduled_time.isoformat(),
            "until": self.until.isoformat() if self.until else None,
            "count": self.count,
            "why": self.why,
            "at": self.at.isoformat(),
        }


@dataclass(frozen=True)
class ScheduleDescription:
    schedule_id: str
    workflow_type: str
    task_queue: str
    definition: ScheduleDefinition
    origin: str  # "client", or "declared:<workflow>"
    paused: bool
    note: str | None
    remaining_executions: int | None  # None: no limit
    created_at: datetime | None
    updated_at: datetime | None
    runs_started: int
    times_skipped: int
    future_executions: list[datetime]  # the next 10 due times (none while paused)
    recent_executions: list[ScheduledRun]  # the last 10 runs, newest first
    skipped: list[SkippedTime]  # the last 10 skips, newest first
    open_executions: list[str]
    waiting: list[datetime]  # due times waiting for the open runs to close (overlap)
    log: list[dict[str, Any]] = field(repr=False, default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "schedule_id": self.schedule_id,
            "workflow_type": self.workflow_type,
            "task_queue": self.task_queue,
            "origin": self.origin,
            "paused": self.paused,
            "note": self.note,
            "remaining_executions": self.remaining_executions,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
            "runs_started": self.runs_started,
            "times_skipped": self.times_skipped,
            "future_executions": [t.isoformat() for t in self.future_executions],
            "recent_executions": [r.to_json() for r in self.recent_executions],
            "skipped": [s.to_json() for s in self.skipped],
            "open_executions": self.open_executions,
            "waiting": [t.isoformat() for t in self.waiting],
            "definition": _definition_json(self.definition),
        }


def _skipped(definition: ScheduleDefinition, e: dict[str, Any]) -> SkippedTime:
    """A skip as the log has it; a range's ``due`` is the last due time acted on before
    it (excluded): shown from the first due time after it."""
    due, to = at_ms(e["due"]), at_ms(e["to"]) if e.get("to") is not None else None
    if to is not None:
        due = next(fire_times(definition, due, until=to), due)
    return SkippedTime(due, e.get("why", ""), at_ms(e["at"]), to, e.get("n"))


def _definition_json(d: ScheduleDefinition) -> dict[str, Any]:
    out = d.model_dump(mode="json")
    out["policy"]["overlap"] = d.policy.overlap.name  # (by name, as the CLI and the docs say it)
    return out


@dataclass(frozen=True)
class BackfillResult:
    started: int
    skipped: int
    buffered: int


class ScheduleHandle:
    """One schedule: describe it, change it, pause, trigger, backfill, delete.
    ``clock`` (a test's) says what now is for pause, unpause, trigger and describe;
    by default, Redis's."""

    def __init__(self, client: Client, schedule_id: str, clock: Callable[[], datetime] | None = None):
        if not isinstance(schedule_id, str) or not SCHEDULE_ID_RE.fullmatch(schedule_id):
            raise InvalidInputError(
                f"schedule_id {schedule_id!r} is invalid: use 1-200 letters, digits, '_', '-', '.'"
            )
        self.client = client
        self.id = schedule_id
        self._clock = clock

    def __repr__(self) -> str:
        return f"<ScheduleHandle {self.id!r} in namespace {self.client.namespace!r}>"

    async def _now_ms(self) -> int:
        if self._clock is not None:
            return ms(self._clock())
        secs, micros = await self.client.redis.time()
        return int(secs) * 1000 + int(micros) // 1000

    async def _state(self, *, full: bool = False) -> _State:
        st = await _read(self.client, self.id, full=full)
        if st is None:
            raise ScheduleNotFoundError(
                f"no schedule {self.id!r} in namespace '{self.client.namespace}' "
                "(`rillflow schedule list` shows those there are)"
            )
        return st

    async def describe(self) -> ScheduleDescription:
        ks, shard = self.client.keyspace, self.client.keyspace.shard(self.id)
        st = await self._state(full=True)
        f, log = st.fields, st.log
        starts = [e for e in log if e.get("k") == ScheduleAction.STARTED][:10]
        async with self.client.redis.pipeline(transaction=False) as pipe:
            for e in starts:
                pipe.hget(ks.wf(shard, e["wid"]), "status")
            statuses = await pipe.execute()
        now = await self._now_ms()
        after = at_ms(max(st.cursor_ms, now))
        return ScheduleDescription(
            schedule_id=self.id,
            workflow_type=st.workflow_type,
            task_queue=st.task_queue,
            definition=st.definition.model_copy(deep=True),  # (not the evaluator's own)
            origin=f["origin"] or "client",
            paused=st.paused,
            note=f["note"],
            remaining_executions=st.remaining,
            created_at=time_of_ms(f["created_ms"]),
            updated_at=time_of_ms(f["updated_ms"]),
            runs_started=int(f["n_run"] or 0),
            times_skipped=int(f["n_skip"] or 0),
            future_executions=[]
            if st.paused or st.remaining == 0
            else next_fire_times(st.definition, after, 10),
            recent_executions=[
                ScheduledRun(
                    e["wid"],
                    e["run"],
                    at_ms(e["due"]),
                    at_ms(e["at"]),
                    e.get("how", "clock"),
                    text(s) if s else "expired",
                )
                for e, s in zip(starts, statuses, strict=True)
            ],
            skipped=[_skipped(st.definition, e) for e in log if e.get("k") == ScheduleAction.SKIPPED][:10],
            open_executions=st.open,
            waiting=[at_ms(int(b.split(" ")[0])) for b in st.buffered],
            log=log,
        )

    async def update(
        self, schedule: ScheduleDefinition | PartialScheduleDefinition | None = None, **changes: Any
    ) -> None:
        """Replace the definition (``schedule``), or change some of its fields (a
        ``PartialScheduleDefinition``, or ``update(cron_expressions=[...])``: the rest
        keep their values). What the schedule has done stays: its due times acted on,
        its log, its open runs."""
        if isinstance(schedule, PartialScheduleDefinition):
            if changes:
                raise InvalidInputError("pass a PartialScheduleDefinition or the fields to change, not both")
            changes = schedule.changes()
            schedule = None
        unknown = sorted(set(changes) - set(ScheduleDefinition.model_fields) - {"schedule_id"})
        if unknown:
            known = ", ".join(n for n in ScheduleDefinition.model_fields if n != "schedule_id")
            raise InvalidInputError(f"a schedule has no field {', '.join(unknown)} (its fields: {known})")
        if changes.get("schedule_id", self.id) != self.id:
            raise InvalidInputError("a schedule's id does not change: create another and delete this one")
        given = schedule
        for _ in range(5):
            now = await self._now_ms()
            # the old definition's due times up to now are acted on first: the new one applies from now
            await catch_up(self.client, self.id, now, self.client.settings.retention_ms)
            st = await self._state()
            if given is None:
                try:
                    schedule = ScheduleDefinition.model_validate(
                        {**st.definition.model_dump(), **changes, "schedule_id": self.id}
                    )
                except ValidationError as e:
                    raise InvalidInputError(
                        f"schedule {self.id!r} was not changed: {validation_summary(e, None)}"
                    ) from None
            elif changes:
                raise InvalidInputError("pass a whole definition or the fields to change, not both")
            assert schedule is not None
            rec = await record_for(
                self.client,
                st.workflow_type,
                schedule,
                schedule_id=self.id,
                task_queue=st.task_queue,
                origin="client",
                unregistered_ok=True,
            )
            res = await self.client.protocol.schedule_put(
                rec, "update", now, expected_version=st.version, dropped=_pending(st, now)
            )
            if res.reply is not Reply.STALE:  # (changed meanwhile by another: made again on it)
                _check_put(res.reply, res.why, self.id)
                return
        raise RillflowError(f"schedule {self.id!r} kept changing while this update was made; try again")

    async def pause(self, note: str | None = None) -> bool:
        """No due time runs until :meth:`unpause`; those in between are skipped. False if
        it was paused already (the note is changed)."""
        return await self._state_op("pause", note) != "unchanged"

    async def unpause(self, note: str | None = None) -> bool:
        """Start runs again, from now: the due times while it was paused are skipped.
        False if it was not paused."""
        st = await self._state()
        now = await self._now_ms()
        skipped = 0
        if st.paused:
            for _ in fire_times(st.definition, at_ms(st.cursor_ms), until=at_ms(now)):
                skipped += 1
                if skipped >= SKIP_COUNT_CAP:
                    break
        return await self._state_op("unpause", note, skipped, now) != "unchanged"

    async def delete(self) -> None:
        """Remove the schedule; its runs go on. A schedule declared in code is made again
        when a worker of its workflow starts: remove it from the code too."""
        await self._state_op("delete", None)

    async def _state_op(self, op: str, note: str | None, skipped: int = 0, now: int | None = None) -> str:
        if note is not None and not isinstance(note, str):
            raise InvalidInputError(f"note must be a str, got {type(note).__name__}")
        when = now if now is not None else await self._now_ms()
        res = await self.client.protocol.schedule_state(self.id, op, when, note or "", skipped)
        if res.reply is Reply.NOT_FOUND:
            await self._state()  # (raises, naming it)
        return res.why

    async def trigger(self, overlap: ScheduleOverlapPolicy | str | None = None) -> WorkflowHandle | None:
        """Run the schedule now, once, by its overlap policy (or ``overlap``): a handle on
        the run it started, or None if the policy skipped it or made it wait (see
        :meth:`trigger_outcome`)."""
        handle, _ = await self.trigger_outcome(overlap)
        return handle

    async def trigger_outcome(
        self, overlap: ScheduleOverlapPolicy | str | None = None
    ) -> tuple[WorkflowHandle | None, str]:
        """:meth:`trigger`, with what became of it: ``started``, ``buffered`` (it waits
        for the open run, and starts when that closes) or why it was skipped."""
        from rillflow.handle import WorkflowHandle

        ov = overlap_of(overlap) if overlap is not None else None
        now = await self._now_ms()
        res = await self._fire_fresh("trigger", [(now, now, execution_id(self.id, at_ms(now)))], ov)
        if res.first_started:
            return WorkflowHandle(self.client, res.first_started, None, None), "started"
        if res.buffered:
            return None, "buffered"
        return None, res.why_skipped or "skipped"

    async def backfill(
        self, start: datetime, end: datetime, overlap: ScheduleOverlapPolicy | str | None = None
    ) -> BackfillResult:
        """Run the due times from ``start`` to ``end`` (inclusive) that have not run, by
        the overlap policy (or ``overlap``), whatever the catch-up window. At most
        10,000 due times at once."""
        for name, t in (("start", start), ("end", end)):
            if not isinstance(t, datetime) or t.tzinfo is None:
                raise InvalidInputError(f"{name} must be a timezone-aware datetime, got {t!r}")
        if end < start:
            raise InvalidInputError(f"end ({end.isoformat()}) is before start ({start.isoformat()})")
        now = at_ms(await self._now_ms())
        if end > now:
            raise InvalidInputError(
                f"end ({end.isoformat()}) is in the future: a backfill runs due times that have passed "
                f"(it is {now.isoformat()}); the schedule runs the later ones itself"
            )
        st = await self._state()
        times = []
        for t in fire_times(st.definition, start - timedelta(microseconds=1), until=end):
            times.append((ms(t), ms(t), execution_id(self.id, t)))
            if len(times) > BACKFILL_MAX:
                raise InvalidInputError(
                    f"{start.isoformat()} to {end.isoformat()} holds more than {BACKFILL_MAX} due times "
                    "of this schedule: backfill a shorter range at a time"
                )
        ov = overlap_of(overlap) if overlap is not None else None
        started = skipped = buffered = 0
        for i in range(0, len(times), BATCH):
            res = await self._fire_fresh("backfill", times[i : i + BATCH], ov)
            started, skipped, buffered = (
                started + res.started,
                skipped + res.skipped,
                buffered + res.buffered,
            )
        return BackfillResult(started, skipped, buffered)

    async def _fire_fresh(
        self, mode: str, fires: Sequence[tuple[int, int, str]], overlap: Overlap | None
    ) -> FireReply:
        """A trigger's or backfill's call, made again on what changed meanwhile (a pause,
        a change: the script refuses a call made on an older state)."""
        for _ in range(5):
            st = await self._state()
            now = await self._now_ms()
            res = await _fire(
                self.client, st, self.id, now, mode, fires, self.client.settings.retention_ms, None, overlap
            )
            if res.reply is not Reply.STALE:
                _check_fire(res, self.id)
                return res
        raise RillflowError(f"schedule {self.id!r} kept changing while this call was made; try again")


def _check_put(reply: Reply, why: str, schedule_id: str) -> None:
    if reply is Reply.NOT_FOUND:
        raise ScheduleNotFoundError(f"no schedule {schedule_id!r}")
    if reply is Reply.DUPLICATE:
        raise ScheduleAlreadyExistsError(
            f"schedule {schedule_id!r} exists: change it with update(), or delete it first"
        )
    if reply is not Reply.OK:
        raise InvalidInputError(f"schedule {schedule_id!r} was not stored: {why}")


def _check_fire(res: FireReply, schedule_id: str) -> None:
    if res.reply is Reply.NOT_FOUND:
        raise ScheduleNotFoundError(f"no schedule {schedule_id!r}")
    if res.reply is Reply.STALE:
        raise RillflowError(f"schedule {schedule_id!r} changed while this call read it; try again")


@dataclass(frozen=True)
class ScheduleSummary:
    schedule_id: str
    workflow_type: str
    paused: bool
    next_due: datetime | None  # when its next run starts, jitter included (None: never, or paused)
    note: str | None
    origin: str
    task_queue: str = ""
    remaining_executions: int | None = None  # None: no limit

    @property
    def state(self) -> str:
        """``paused``, ``done`` (max_executions reached) or ``active``."""
        return "paused" if self.paused else "done" if self.remaining_executions == 0 else "active"

    def to_json(self) -> dict[str, Any]:
        return {
            "schedule_id": self.schedule_id,
            "workflow_type": self.workflow_type,
            "task_queue": self.task_queue,
            "state": self.state,
            "remaining_executions": self.remaining_executions,
            "paused": self.paused,
            "next_due": self.next_due.isoformat() if self.next_due else None,
            "note": self.note,
            "origin": self.origin,
        }


async def list_schedules(client: Client) -> list[ScheduleSummary]:
    """Every schedule of the namespace, by id."""
    ks = client.keyspace
    out: list[ScheduleSummary] = []
    for shard in ks.all_shards():
        members: Any = await client.redis.zrange(ks.schedules(shard, "due"), 0, -1, withscores=True)
        for i in range(0, len(members), 500):
            chunk = members[i : i + 500]
            async with client.redis.pipeline(transaction=False) as pipe:
                for sid, _ in chunk:
                    pipe.hmget(
                        ks.schedule(shard, text(sid)),
                        ["wf", "paused_ms", "note", "origin", "tq", "remaining"],
                    )
                rows = await pipe.execute()
            for (sid, score), (wf, paused, note, origin, tq, remaining) in zip(chunk, rows, strict=True):
                if wf is None:
                    continue
                out.append(
                    ScheduleSummary(
                        text(sid),
                        text(wf),
                        paused is not None,
                        at_ms(int(score)) if 0 < score < NEVER_MS and paused is None else None,
                        text(note) if note is not None else None,
                        text(origin) if origin else "client",
                        text(tq),
                        int(remaining) if remaining is not None else None,
                    )
                )
    return sorted(out, key=lambda s: s.schedule_id)


async def create_schedule(
    client: Client,
    workflow: type | str,
    schedule: ScheduleDefinition,
    *,
    schedule_id: str | None,
    task_queue: str | None,
    paused: bool,
    note: str | None,
    now_ms: int,
) -> ScheduleHandle:
    rec = await record_for(
        client, workflow, schedule, schedule_id=schedule_id, task_queue=task_queue, origin="client"
    )
    res = await client.protocol.schedule_put(rec, "create", now_ms, paused, note or "")
    _check_put(res.reply, res.why, rec.schedule_id)
    return ScheduleHandle(client, rec.schedule_id)


async def declare_schedules(
    client: Client, definitions: Sequence[WorkflowDefinition], task_queue: str, now_ms: int
) -> list[str]:
    """Make the schedules the workflows declare exist as declared (created, or changed
    where the declaration changed; what they have done stays), and remove those a
    workflow declared before and no longer does. Returns what changed, for the log."""
    changed: list[str] = []
    wanted: dict[str, set[str]] = {}
    for d in definitions:
        ids = wanted.setdefault(d.name, set())
        for i, sched in enumerate(d.schedules):
            sid = sched.schedule_id or declared_id(d.name, i)
            ids.add(sid)
            rec = await record_for(
                client,
                d.name,
                sched,
                schedule_id=sid,
                task_queue=task_queue,
                origin=f"declared:{d.name}",
                defn=d,
            )
            stored = await client.redis.hget(
                client.keyspace.schedule(client.keyspace.shard(sid), sid), "digest"
            )
            dropped = 0
            if stored is not None and text(stored) != rec.digest:
                # (changed: the old declaration's due times up to now first, as update does)
                await catch_up(client, sid, now_ms, client.settings.retention_ms)
                st = await _read(client, sid)
                dropped = _pending(st, now_ms) if st is not None else 0
            res = await client.protocol.schedule_put(rec, "declare", now_ms, dropped=dropped)
            if res.reply is not Reply.OK:
                raise InvalidInputError(f"workflow '{d.name}': schedule {sid!r} was not stored: {res.why}")
            if res.why != "unchanged":
                changed.append(f"{sid} {res.why}")
    if wanted:
        for s in await list_schedules(client):
            owner = s.origin.removeprefix("declared:")
            if s.origin.startswith("declared:") and owner in wanted and s.schedule_id not in wanted[owner]:
                await client.protocol.schedule_state(s.schedule_id, "delete", now_ms)
                changed.append(f"{s.schedule_id} deleted (no longer declared)")
    return changed
