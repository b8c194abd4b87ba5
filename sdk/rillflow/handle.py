"""A handle on one workflow execution: its result, state, history and messages."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from rillflow.durations import time_of_ms
from rillflow.errors import (
    InvalidInputError,
    RillflowError,
    WorkflowError,
    WorkflowFailureError,
    WorkflowNotFoundError,
    WorkflowQueryFailedError,
    WorkflowQueryTimeoutError,
    WorkflowUpdateFailedError,
    WorkflowUpdateRejectedError,
    WorkflowUpdateTimeoutError,
    closed_run_failure,
    exception_from_failure,
)
from rillflow.history import HistoryEvent
from rillflow.payloads import check_size, to_wire
from rillflow.watcher import Waiter
from rillflow.workflow import HANDLER_KINDS, HandlerDefinition, WorkflowDefinition, handler_definition
from rillflow_runtime.codec import pack, text, unpack
from rillflow_runtime.connections import make_blocking_reader
from rillflow_runtime.keyspace import ID_RE, NAME_RE
from rillflow_runtime.model import CLOSING_EVENTS, ActivityState, Reply, RunStatus

if TYPE_CHECKING:
    from rillflow.client import Client


@dataclass
class PendingActivity:
    seq: int
    name: str
    state: str
    attempt: int
    last_failure: WorkflowError | None
    heartbeat_details: list[Any] | None
    next_attempt_time: datetime | None = None  # in backoff: when its next attempt is dispatched


@dataclass
class PendingTimer:
    seq: int
    fire_time: datetime


@dataclass
class PendingChild:
    seq: int
    execution_id: str
    run_id: str  # its first run
    state: str  # scheduled (its start not answered yet) or started
    parent_close_policy: str


@dataclass
class WorkflowDescription:
    execution_id: str
    run_id: str
    workflow_type: str
    task_queue: str
    status: str
    start_time: datetime
    close_time: datetime | None
    execution_deadline: datetime | None  # while the run is open (the execution timeout)
    history_length: int
    pending_activities: list[PendingActivity] = field(default_factory=list)
    pending_timers: list[PendingTimer] = field(default_factory=list)
    workflow_task_failures: int = 0
    last_workflow_task_failure: WorkflowError | None = None
    failure: WorkflowError | None = None  # why a closed run did not complete: what result() raises from
    result: Any = None  # a completed run's result, as stored (the typed one: result())
    next_run_id: str | None = None  # the run this one continued as
    pending_children: list[PendingChild] = field(default_factory=list)
    parent_execution_id: str | None = None  # a child's parent, and the parent's run
    parent_run_id: str | None = None


FOLLOW_BLOCK_S = 10.0  # one blocking read of follow_history: how long before it is re-armed


def _next_run(status: Any, outcome: Any) -> str | None:
    """The run a closed run went on as, if it did: the one it continued as, or the one a
    reset replaced it with (its termination names it)."""
    if status is None or not outcome:
        return None
    st = text(status)
    key = (
        "next_run_id"
        if st == RunStatus.CONTINUED_AS_NEW
        else "reset_run_id"
        if st == RunStatus.TERMINATED
        else ""
    )
    if not key:
        return None
    body = unpack(outcome)
    nxt = body.get(key) if isinstance(body, dict) else None
    return str(nxt) if nxt else None


CHAIN_HOPS = 8  # how often a message follows a chain that keeps continuing under it


class WorkflowHandle:
    """One execution: its result, state, history; ``run_id=None`` means the current run.

    A handle given ``run_id`` reads that run; ``result()`` follows it as it continues as
    new. A handle from ``start_workflow`` or ``signal_with_start`` (``follows``) stands for
    the chain it started: once its run continued as new, its messages, queries and
    ``describe()`` reach the chain's current run, never a later chain of the same id."""

    def __init__(
        self, client: Client, execution_id: str, run_id: str | None, defn: WorkflowDefinition | None = None
    ) -> None:
        self.client = client
        self.id = execution_id
        self.run_id = run_id
        self.defn = defn
        self.shard = client.keyspace.shard(execution_id)
        # set by start_workflow when the client's watcher was already reading: registered
        # before the run existed, so it cannot miss the run's close (see result())
        self._closed: Waiter | None = None
        # set by signal_with_start: whether that call started the run it signalled
        self.started: bool | None = None
        self.follows = False  # (set by start_workflow and signal_with_start: see above)
        self._latest = run_id  # the chain's latest run this handle has seen
        # the first run of the chain the handle stands for, once known: the runs it
        # reached may expire before the chain ends
        self._origin: str | None = None

    def _follow_chain(self, origin: str) -> None:
        """Stand for the chain whose first run is ``origin`` (see the class)."""
        self.follows, self._origin = True, origin

    def __del__(self) -> None:
        # a handle dropped without waiting on its result stops waiting for it, so that
        # starting many runs never awaited holds nothing in the watcher; later, from the
        # loop, not from inside whatever code the garbage collector interrupted (the
        # watcher itself may be walking its tables)
        fut, watcher = self._closed, self.client._watcher
        if fut is not None and watcher is not None and not fut.done():
            with contextlib.suppress(Exception):  # the loop is closed: nothing to forget
                fut.get_loop().call_soon(watcher.forget, fut)

    @property
    def execution_id(self) -> str:
        return self.id

    async def _resolve_run(self) -> str:
        if self.run_id:
            return self.run_id
        run = await self.client.redis.hget(self.client.keyspace.wf(self.shard, self.id), "run")
        if not run:
            raise self._not_found()
        return text(run)

    async def _current_in_chain(self, run: str) -> str | None:
        """The execution's current run if it continues the chain ``run`` belongs to (a
        continued run's hash names its chain's first run, ``chain``; a first run has none),
        else None: ``run`` is current itself, or the id went on in another chain. The
        chain is the handle's own when known (``_origin``); else ``run``'s, and a ``run``
        gone past its retention is taken for its chain's first."""
        ks, r = self.client.keyspace, self.client.redis
        async with r.pipeline(transaction=False) as pipe:
            pipe.hget(ks.wf(self.shard, self.id), "run")
            pipe.hmget(ks.run(self.shard, run), ["chain", "status"])
            cur, (mine, status) = await pipe.execute()
        if not cur or text(cur) == run:
            return None
        origin = self._origin
        if origin is None:
            origin = text(mine) if mine else run
            if status is not None:  # read off the run itself: known from now on
                self._origin = origin
        chain = await r.hget(ks.run(self.shard, text(cur)), "chain")
        if chain is None or text(chain) != origin:
            return None
        self._latest = text(cur)
        return self._latest

    async def _message_target(self) -> str | None:
        """The run a message, query or describe reaches: see the class."""
        if not (self.follows and self._latest):
            return self.run_id
        return await self._current_in_chain(self._latest) or self._latest

    async def _send(self, call: Callable[[str | None], Awaitable[Any]]) -> Any:
        """``call`` on the handle's run; for a handle that follows its chain, again on the
        chain's current run while the one it reached had continued as new."""
        run = self._latest if self.follows else self.run_id
        for _ in range(CHAIN_HOPS):
            res = await call(run)
            if res.reply is not Reply.NOT_RUNNING or not (self.follows and run):
                return res
            nxt = await self._current_in_chain(run)
            if nxt is None:
                return res
            run = nxt
        return res

    async def _run_fields(self, run: str, *names: str) -> list[Any]:
        vals = await self.client.redis.hmget(self.client.keyspace.run(self.shard, run), list(names))
        return list(vals)

    async def result(self, timeout: float | timedelta | None = None) -> Any:
        """Wait for the run to close; return its result or raise
        :class:`WorkflowFailureError`. ``TimeoutError`` if ``timeout`` passes first. A run
        that continued as new is followed to the next run, and so on to the last."""
        secs = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
        loop = asyncio.get_running_loop()
        deadline = None if secs is None else loop.time() + secs
        watcher = self.client.watcher
        fut, self._closed = self._closed, None
        if fut is not None and not (self.run_id and watcher.waits(fut)):
            watcher.forget(fut)
            fut = None
        # with a future registered by start_workflow (before the run existed, by a watcher
        # that is still reading), the run's close cannot go unseen: no read comes first
        run = self.run_id if fut is not None and self.run_id else await self._resolve_run()
        while True:
            if fut is None:
                await watcher.ensure_started()
                fut = watcher.wait_run(self.shard, run)
                try:
                    fields = await self._outcome_fields(run)
                except BaseException:
                    watcher.forget(fut)
                    raise
                if fields[0] is None or text(fields[0]) != RunStatus.RUNNING:
                    watcher.forget(fut)
                    if (after := _next_run(*fields)) is not None:
                        run, fut = after, None
                        continue
                    # gone (past retention) while its chain goes on: follow the chain
                    if fields[0] is None and (after := await self._current_in_chain(run)) is not None:
                        run, fut = after, None
                        continue
                    return self._outcome(run, *fields)
            try:
                left = None if deadline is None else max(0.0, deadline - loop.time())
                closing = await asyncio.wait_for(asyncio.shield(fut), left)
            finally:
                watcher.forget(fut)
            if closing and (after := _next_run(*closing)) is not None:
                run, fut = after, None  # continued as new: follow the chain
                continue
            if closing:  # the closed-runs entry, with a small outcome: nothing to read
                return self._outcome(run, *closing)
            # woken without the outcome: the entry did not carry it, or the watcher
            # re-checked what it waits for (after a gap or a reconnect), maybe before this
            # run even existed: look at the run, and wait again if it still runs
            fut = None

    async def _outcome_fields(self, run: str) -> list[Any]:
        """Status and outcome, in one read: a closed run needs no other. A run id of
        another execution reads as no run at all."""
        status, outcome, wid = await self._run_fields(run, "status", "outcome", "wid")
        return [status, outcome] if wid is not None and text(wid) == self.id else [None, None]

    def _outcome(self, run: str, status: Any, outcome: Any) -> Any:
        if status is None:  # gone while we waited: expired, or lost in a Redis rollback
            raise WorkflowNotFoundError(f"run {run} of execution {self.id!r} not found")
        st = text(status)
        body = unpack(outcome) if outcome else {}
        if st == RunStatus.COMPLETED:
            value = body.get("result")
            return self.defn.sig.load_result_leniently(value) if self.defn else value
        raise WorkflowFailureError(self.id, run, st, closed_run_failure(st, body))

    async def describe(self) -> WorkflowDescription:
        run = await self._message_target() or await self._resolve_run()
        ks, r = self.client.keyspace, self.client.redis
        fields: dict[str, Any] = {text(k): v for k, v in (await r.hgetall(ks.run(self.shard, run))).items()}
        if not fields or text(fields.get("wid") or "") != self.id:
            raise WorkflowNotFoundError(f"run {run} of execution {self.id!r} not found")
        # a closed run's act hash is what closing left for retention: nothing is pending
        acts_raw: dict[str, Any] = (
            {text(k): v for k, v in (await r.hgetall(ks.acts(self.shard, run))).items()}
            if text(fields.get("status")) == RunStatus.RUNNING
            else {}
        )
        pending, timers, children = [], [], []
        for key, val in acts_raw.items():
            if key.startswith("timer:"):  # a workflow timer still pending: its due time
                timers.append(
                    PendingTimer(
                        seq=int(key[6:]), fire_time=time_of_ms(val) or datetime.fromtimestamp(0, UTC)
                    )
                )
            elif key.startswith("child:"):  # a child not closed yet
                c = unpack(val)
                children.append(
                    PendingChild(
                        int(key[6:]),
                        text(c.get("wid")),
                        text(c.get("run")),
                        text(c.get("st")),
                        text(c.get("pol")),
                    )
                )
            if ":" in key:
                continue
            s = unpack(val)
            sched = unpack(acts_raw[f"{key}:b"]) if f"{key}:b" in acts_raw else {}
            fail = acts_raw.get(f"{key}:f")
            hb = acts_raw.get(f"{key}:hb")
            pending.append(
                PendingActivity(
                    seq=int(key),
                    name=sched.get("name", "?"),
                    state=text(s.get("st")),
                    attempt=int(s.get("att", 1)),
                    last_failure=exception_from_failure(unpack(fail).get("failure", {})) if fail else None,
                    heartbeat_details=unpack(hb) if hb else None,
                    next_attempt_time=time_of_ms(s.get("due"))
                    if text(s.get("st")) == ActivityState.BACKOFF
                    else None,
                )
            )
        pending.sort(key=lambda p: p.seq)
        timers.sort(key=lambda t: t.seq)
        children.sort(key=lambda c: c.seq)
        parent = text(fields.get("parent") or "").split("|", 2)  # <seq>|<run>|<execution id>
        wft_fail = fields.get("wft_failure")
        status = text(fields.get("status"))
        closed_without_result = status not in (
            RunStatus.RUNNING,
            RunStatus.COMPLETED,
            RunStatus.CONTINUED_AS_NEW,
        )
        outcome = fields.get("outcome")
        body = unpack(outcome) if outcome else {}
        if not isinstance(body, dict):
            body = {}
        return WorkflowDescription(
            execution_id=self.id,
            run_id=run,
            workflow_type=text(fields.get("wtype")),
            task_queue=text(fields.get("tq")),
            status=status,
            start_time=time_of_ms(fields.get("start_ms")) or datetime.fromtimestamp(0, UTC),
            close_time=time_of_ms(fields.get("closed_ms")),
            execution_deadline=time_of_ms(fields.get("deadline_ms")),
            history_length=int(fields.get("last_eid") or 0),
            pending_activities=pending,
            pending_timers=timers,
            workflow_task_failures=int(fields.get("wft_failures") or 0),
            last_workflow_task_failure=exception_from_failure(unpack(wft_fail).get("failure", {}))
            if wft_fail
            else None,
            failure=closed_run_failure(status, body) if closed_without_result else None,
            result=body.get("result") if status == RunStatus.COMPLETED else None,
            next_run_id=_next_run(status, outcome),
            pending_children=children,
            parent_execution_id=parent[2] if len(parent) == 3 else None,
            parent_run_id=parent[1] if len(parent) == 3 else None,
        )

    async def history(self) -> list[HistoryEvent]:
        run = await self._resolve_run()
        entries = await self.client.protocol.history(self.shard, self.id, run)
        if not entries:  # every run's history starts with its start: this run is not the id's
            raise WorkflowNotFoundError(f"run {run} of execution {self.id!r} not found")
        return [HistoryEvent.from_entry(e) for e in entries]

    async def follow_history(self, *, next_runs: bool = True) -> AsyncIterator[HistoryEvent]:
        """The run's events, then each one as it is appended, until the run closes. One
        blocking read at a time waits for the next (see Protocol.wait_history): no
        polling. With ``next_runs``, a run that continues as new is followed into its
        next run, and so on to the last."""
        proto = self.client.protocol
        run = await self._resolve_run()
        reader = make_blocking_reader(self.client.url, 1, FOLLOW_BLOCK_S)
        try:
            while True:
                # the cursor before the first read: a close after it wakes the wait below
                cursor = await proto.closed_cursor(self.shard)
                entries = await proto.history(self.shard, self.id, run)
                if not entries:
                    raise WorkflowNotFoundError(f"run {run} of execution {self.id!r} not found")
                after, last, closed = 0, None, False
                while True:
                    for entry in entries:
                        last = HistoryEvent.from_entry(entry)
                        after = last.event_id
                        yield last
                    if last is not None and last.type in CLOSING_EVENTS:
                        break
                    if closed:  # its stream maybe packed away: what is left, from either
                        entries = await proto.history(self.shard, self.id, run, after=after)
                        if not entries:
                            return  # gone under us (retention, a rollback): nothing more
                        continue
                    entries, closes = await proto.wait_history(
                        reader, self.shard, self.id, run, after, cursor, int(FOLLOW_BLOCK_S * 1000)
                    )
                    if closes:
                        cursor = text(closes[-1][0])
                        closed = any(text(f.get(b"run", b"")) == run for _, f in closes)
                nxt = last.attributes.get("next_run_id") if last is not None else None
                if not (next_runs and nxt):
                    return
                run = str(nxt)
        finally:
            await reader.aclose()

    async def signal(
        self, signal: str | Callable[..., Any], payload: Any = None, *, request_id: str | None = None
    ) -> None:
        """Send a signal: ``signal`` is its name or the decorated handler method. Returns
        once it is recorded (buffered, if a workflow task is running); the workflow
        handles it in history order. The payload is validated first, against the handler
        (known from the class) or the registered schema (given only names), and nothing
        is sent if it fails. A retry with the same ``request_id`` is delivered once."""
        name, data, _ = await self._handler_input("signal", signal, payload)
        body = pack({"name": name, "input": data})
        check_size(body, self.client.max_payload_bytes, f"signal '{name}'")
        rid = request_id or uuid.uuid4().hex
        res = await self._send(lambda run: self.client.protocol.signal(self.id, run, body, rid))
        if res.reply is Reply.NOT_RUNNING:
            raise self._not_running(f"signal '{name}' was not delivered")

    async def query(
        self,
        query: str | Callable[..., Any],
        payload: Any = None,
        *,
        timeout: timedelta = timedelta(seconds=10),
    ) -> Any:
        """Ask a worker of the run's task queue to run a query handler against the run's
        state (running or closed) and return its result: the annotated type given the
        handler or the class, plain data given only names. Nothing is recorded."""
        name, data, h = await self._handler_input("query", query, payload)
        body = pack({"name": name, "input": data})
        check_size(body, self.client.max_payload_bytes, f"query '{name}'")
        answer = await self._ask_worker(body, timeout, f"query '{name}'")
        return self._handler_result("query", name, h, answer)

    async def _ask_worker(self, body: bytes, timeout: timedelta, what: str) -> dict[str, Any]:
        """Have a worker of the run's task queue answer ``body`` (a query, or an update's
        validation) against the run's state; its answer."""
        watcher = self.client.watcher
        await watcher.ensure_started()
        rid, fut = watcher.wait_reply()
        try:
            res = await self.client.protocol.query(
                self.id,
                await self._message_target(),
                body,
                watcher.inbox,
                rid,
                int(timeout.total_seconds() * 1000),
            )
            if res.reply is not Reply.OK:
                raise self._not_found()
            try:
                got = await asyncio.wait_for(asyncio.shield(fut), timeout.total_seconds())
            except TimeoutError:
                # nobody took it: no one should later
                await self.client.redis.xdel(res.stream, res.message_id)
                raise WorkflowQueryTimeoutError(
                    f"no worker answered {what} of execution {self.id!r} within "
                    f"{timeout.total_seconds():g} s: are workers serving task queue '{res.task_queue}' "
                    "running? (see `rillflow workers`)"
                ) from None
        finally:
            watcher.forget(fut)
        answer: dict[str, Any] = unpack(got)
        return answer

    async def execute_update(
        self,
        update: str | Callable[..., Any],
        payload: Any = None,
        *,
        update_id: str | None = None,
        timeout: timedelta | None = None,
    ) -> Any:
        """Send an update and wait for the handler's result: the annotated type given the
        handler or the class, plain data given only names. The update is recorded when
        accepted and when done, so it survives worker crashes; a call with the same
        ``update_id`` is not applied twice and returns the same outcome. ``timeout``
        (default: none) bounds the wait, not the update."""
        name, data, h = await self._handler_input("update", update, payload)
        uid = update_id or uuid.uuid4().hex
        if not ID_RE.fullmatch(uid):
            raise InvalidInputError(
                f"update_id {uid!r} is invalid: use 1-256 characters of letters, digits, '_', '-', '.'"
            )
        body = pack({"update_id": uid, "name": name, "input": data})
        check_size(body, self.client.max_payload_bytes, f"update '{name}'")
        if await self._validated(name, h):
            res = await self._accept_validated(name, data, uid, body, timeout)
        else:
            res = await self._send(lambda run: self.client.protocol.update(self.id, run, uid, body))
        if res.reply is Reply.NOT_RUNNING:
            raise self._not_running(f"update '{name}' was not accepted")
        outcome = (
            unpack(res.outcome or b"")
            if res.reply is Reply.DONE
            else await self._await_update(res.run_id, uid, name, timeout)
        )
        return self._handler_result("update", name, h, outcome)

    async def _validated(self, name: str, h: HandlerDefinition | None) -> bool:
        """Whether update ``name`` must be validated first: it has a validator, as its
        definition or the run's workers' registration says; with neither known, a worker
        is asked all the same (one without a validator accepts it)."""
        if h is not None:
            return h.validator is not None
        if self.defn is not None:
            return self.defn.handler("update", name).validator is not None
        entry = await self.client._registration(await self._workflow_type())
        if entry is None:
            return True
        spec = next((u for u in entry.handlers.get("updates", []) if u["name"] == name), None)
        return bool(spec and spec.get("validated"))

    async def _accept_validated(
        self, name: str, data: Any, uid: str, body: bytes, timeout: timedelta | None
    ) -> Any:
        """Accept an update with a validator: a worker runs the validator on the run's
        state (as of its last completed workflow task), and the update is accepted only
        while that is still the run's state and that task saw every message the run got;
        else it is validated again, once a task has caught up. A rejection writes
        nothing, unless the id was accepted before (a retry): then it stands."""
        ask = pack({"name": name, "input": data, "validate": True})
        wait = min(timeout, timedelta(seconds=10)) if timeout else timedelta(seconds=10)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait.total_seconds()
        for attempt in itertools.count():
            if attempt:  # the run moved on: let its workflow task see what came meanwhile
                if loop.time() >= deadline:
                    break
                await asyncio.sleep(min(0.1, 0.002 * 2**attempt))
            left = timedelta(seconds=max(0.05, deadline - loop.time()))
            answer = await self._ask_worker(ask, left, f"the validation of update '{name}'")
            if "failure" in answer:
                # a retry of an update accepted before stands, whatever the validator says now
                known = await self._send(functools.partial(self._update_expecting, uid, body, "!"))
                if known.reply not in (Reply.STALE, Reply.NOT_RUNNING):
                    return known
                cause = exception_from_failure(answer["failure"])
                if not answer.get("rejected"):  # the worker could not run the validator
                    raise WorkflowUpdateFailedError(
                        f"update '{name}' of execution {self.id!r} could not be validated, so it was not "
                        f"sent: {cause.type}: {cause.message}",
                        cause,
                    )
                raise WorkflowUpdateRejectedError(
                    f"update '{name}' of execution {self.id!r} was rejected by its validator: "
                    f"{cause.type}: {cause.message}",
                    cause,
                )
            res = await self._send(
                functools.partial(self._update_expecting, uid, body, "=" + str(answer.get("result") or ""))
            )
            if res.reply is not Reply.STALE:
                return res
        raise RillflowError(
            f"update '{name}' of execution {self.id!r} was not accepted: the run's state kept "
            f"changing under its validator for {wait.total_seconds():g} s (or its workflow task "
            "keeps failing: see `rillflow describe`); nothing was written, try again"
        )

    def _update_expecting(self, uid: str, body: bytes, expect: str, run: str | None) -> Awaitable[Any]:
        return self.client.protocol.update(self.id, run, uid, body, expect)

    def _handler_result(
        self, kind: str, name: str, h: HandlerDefinition | None, outcome: dict[str, Any]
    ) -> Any:
        """A query's or update's outcome as the caller gets it: its failure raised, its
        result as the annotated type when the handler is known, else plain data."""
        if "failure" in outcome:
            cause = exception_from_failure(outcome["failure"])
            error = WorkflowQueryFailedError if kind == "query" else WorkflowUpdateFailedError
            raise error(
                f"{kind} '{name}' of execution {self.id!r} failed: {cause.type}: {cause.message}", cause
            )
        h = h or (self.defn.handler(kind, name) if self.defn else None)
        return h.sig.load_result_leniently(outcome.get("result")) if h else outcome.get("result")

    async def _await_update(self, run: str, uid: str, name: str, timeout: timedelta | None) -> dict[str, Any]:
        """Wait for the update's outcome: the watcher wakes us when it is recorded; the
        outcome is read from the run's update hash (any caller may read it there)."""
        watcher = self.client.watcher
        await watcher.ensure_started()
        for _ in range(CHAIN_HOPS):
            st, body = await self._await_update_in(run, uid, name, timeout)
            if text(st) != Reply.MOVED or not body:
                break
            run = text(body)  # a reset carried the update into the run that replaced this one
        if text(st) != Reply.DONE or not body:
            raise WorkflowNotFoundError(
                f"update '{name}' ({uid}) of execution {self.id!r}: its record is gone (past retention)"
            )
        outcome: dict[str, Any] = unpack(body)  # (bytes: replies are not decoded)
        return outcome

    async def _await_update_in(self, run: str, uid: str, name: str, timeout: timedelta | None) -> list[Any]:
        """The update's record in ``run`` once it is done (or moved on), as [state, body]."""
        watcher = self.client.watcher
        fut = watcher.wait_update(self.shard, run, uid)
        key = self.client.keyspace.updates(self.shard, run)
        try:
            st, body = await self.client.redis.hmget(key, [uid, f"{uid}:o"])
            if text(st) not in (Reply.DONE, Reply.MOVED):
                try:
                    await asyncio.wait_for(asyncio.shield(fut), timeout.total_seconds() if timeout else None)
                except TimeoutError:
                    raise WorkflowUpdateTimeoutError(
                        f"update '{name}' ({uid}) of execution {self.id!r} had not finished within "
                        f"{timeout.total_seconds() if timeout else 0:g} s; it is accepted and still runs: "
                        "call again with the same update_id to wait for it"
                    ) from None
                st, body = await self.client.redis.hmget(key, [uid, f"{uid}:o"])
        finally:
            watcher.forget(fut)
        return [st, body]

    async def _handler_input(
        self, kind: str, handler: str | Callable[..., Any], payload: Any, workflow_type: str | None = None
    ) -> tuple[str, Any, HandlerDefinition | None]:
        """The handler's name and the payload as validated wire data: against the handler
        when the class is known, else against the schema its workers registered for
        ``workflow_type`` (default: the type of the execution's run)."""
        h = handler_definition(handler)
        if h is not None and h.kind != kind:
            article = "an" if kind[0] in "aeiou" else "a"
            raise InvalidInputError(f"'{h.method}' is a {h.kind} handler, not {article} {kind}")
        name = h.name if h else str(handler)
        if not NAME_RE.fullmatch(name):
            raise InvalidInputError(f"{kind} name {name!r} is invalid")
        if self.defn is not None:
            h = self.defn.handler(kind, name)
        if h is not None:
            return name, h.sig.encode_input(payload), h
        entry = await self.client._registration(workflow_type or await self._workflow_type())
        if entry is None:
            return name, to_wire(payload, f"{kind} '{name}'"), None
        return name, entry.check_handler_input(HANDLER_KINDS[kind], name, payload), None

    def _not_found(self) -> WorkflowNotFoundError:
        return WorkflowNotFoundError(
            f"no workflow execution {self.id!r} in namespace {self.client.namespace!r} "
            "(never started, or past its retention period)"
        )

    def _not_running(self, consequence: str) -> WorkflowNotFoundError:
        return WorkflowNotFoundError(
            f"workflow execution {self.id!r} is not running (closed, or never started): {consequence}"
        )

    async def _workflow_type(self) -> str:
        run = await self._message_target() or await self._resolve_run()
        wtype = await self.client.redis.hget(self.client.keyspace.run(self.shard, run), "wtype")
        if wtype is None:
            raise WorkflowNotFoundError(f"run {run} of execution {self.id!r} not found")
        return text(wtype)

    async def cancel(self, reason: str = "") -> None:
        """Ask the run to cancel, gracefully: its next workflow task raises
        ``asyncio.CancelledError`` at the code's current await point (its pending
        activities are cancelled with it, its timers too). The code may catch it, clean
        up (activities run as usual) and let it through, ending the run as ``canceled``,
        or complete. Returns once the request is recorded; asking again changes nothing.
        Use :meth:`terminate` for a hard stop."""
        body, rid = pack({"reason": reason or "canceled"}), uuid.uuid4().hex
        check_size(body, self.client.max_payload_bytes, "cancel reason")
        res = await self._send(lambda run: self.client.protocol.cancel(self.id, run, body, rid))
        if res.reply is Reply.NOT_RUNNING and not res.run_id:
            raise self._not_found()
        if res.reply is Reply.NOT_RUNNING:
            raise self._not_running("nothing to cancel")

    async def terminate(self, reason: str = "") -> None:
        body, rid, keep = (
            pack({"reason": reason or "terminated"}),
            uuid.uuid4().hex,
            self.client.settings.retention_ms,
        )
        check_size(body, self.client.max_payload_bytes, "termination reason")
        res = await self._send(lambda run: self.client.protocol.terminate(self.id, run, body, keep, rid))
        if res.reply is not Reply.OK and not res.run_id:
            raise self._not_found()
        if res.reply is not Reply.OK:
            raise self._not_running("nothing to terminate")
