"""Answering queries: from the run's cached instance when it is idle here, else from a
replay of its history up to the last completed task. A query is answered at most once:
it is acknowledged as it is read, and its caller gives up after its timeout."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from rillflow.errors import failure_from_exception
from rillflow.executor import QueryChangedStateError, WorkflowInstance, replay
from rillflow.worker.context import BadMessage, Context, field
from rillflow.worker.run_cache import RunCache, discard
from rillflow.worker.workflow_tasks import WorkflowTasks
from rillflow_runtime.codec import pack, text, unpack
from rillflow_runtime.connections import TRANSIENT
from rillflow_runtime.keyspace import GROUP
from rillflow_runtime.model import EventType, Reply

log = structlog.get_logger("rillflow.worker")

INBOX_TTL_MS = 60_000


class Queries:
    def __init__(self, ctx: Context, tasks: WorkflowTasks, cache: RunCache) -> None:
        self.ctx = ctx
        self.tasks = tasks
        self.cache = cache
        self.inbox_prefix = ctx.ks.inbox("")

    async def poll(self) -> None:
        """Its own loop, so that a query that replays a long history never holds up
        workflow tasks."""
        await self.ctx.poll(
            "query",
            self.ctx.streams("qry"),
            self.process,
            "query batch interrupted; its callers will time out",
        )

    async def process(self, shard: int, stream: str, entries: list[Any]) -> None:
        async with self.ctx.redis.pipeline(transaction=False) as pipe:
            for msgid, _ in entries:
                pipe.xack(stream, GROUP, msgid)
                pipe.xdel(stream, msgid)
            await pipe.execute()
        for msgid, fields in entries:
            try:
                run, wid, wtype = field(fields, "run"), field(fields, "wid"), field(fields, "wtype")
                reply, rid = field(fields, "reply"), field(fields, "rid")
                body = unpack(fields[b"d"])
                if not reply.startswith(self.inbox_prefix) or not isinstance(body, dict):
                    raise BadMessage("no reply inbox of this namespace, or no query body")
            except (BadMessage, KeyError, ValueError, TypeError) as e:
                log.warning("unreadable query dropped", stream=stream, message_id=str(msgid), reason=str(e))
                continue
            try:
                answer: dict[str, Any] = {"result": await self._answer(shard, run, wid, wtype, body)}
            except TRANSIENT:
                raise
            except Rejected as r:  # the validator refused the update (not a failure to validate)
                answer = {"failure": failure_from_exception(r.cause), "rejected": True}
            except Exception as e:
                answer = {"failure": failure_from_exception(e)}
            except (KeyboardInterrupt, SystemExit) as e:  # the handler asked the process to stop
                self.ctx.request_exit(e, f"query '{body.get('name')}'")
                answer = {"failure": failure_from_exception(e)}
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # a handler's own BaseException fails its query, not the poller
                answer = {"failure": failure_from_exception(e)}
            async with self.ctx.redis.pipeline(transaction=False) as pipe:
                pipe.xadd(reply, {"rid": rid, "d": pack(answer)}, maxlen=1000, approximate=True)
                pipe.pexpire(reply, INBOX_TTL_MS)  # a caller that went away leaves nothing behind
                await pipe.execute()

    async def _answer(self, shard: int, run: str, wid: str, wtype: str, body: dict[str, Any]) -> Any:
        """A query's result; for a validation (``validate``, see handle.execute_update),
        the fence of the completed workflow task whose state the validator accepted the
        update in ('' before any), which the update's acceptance must still find."""
        name, data, validate = str(body.get("name")), body.get("input"), bool(body.get("validate"))
        cached = self.cache.peek(run)
        if cached is not None:
            done = await self.ctx.redis.hget(self.ctx.ks.run(shard, run), "wft_done")
            # the cache holds what Redis holds only if Redis's last completion is the one
            # that brought the instance there (the rule wft_start applies)
            if done is None or not text(done).startswith(f"{cached.fence}|{Reply.OK.value}|"):
                if self.cache.peek(run) is cached:
                    self.cache.evict(run)
                cached = None
            elif self.cache.peek(run) is not cached:  # a task took it meanwhile: not idle
                cached = None
        if cached is not None:
            inst = cached.instance
            try:
                if validate:
                    _validate(inst, name, data)
                    return cached.fence
                return inst.answer_query(inst.defn.handler("query", name), data)
            except (QueryChangedStateError, Rejected) as e:
                # (a handler that tried to change the instance leaves it unlike the history)
                if isinstance(e, QueryChangedStateError) or isinstance(e.cause, QueryChangedStateError):
                    self.cache.evict(run)
                raise
        # not cached here (or its task is in flight): the state the history records
        events = await self.tasks.history_after(shard, wid, run, 0)
        start_ms = events[0].time_ms if events else 0  # WorkflowExecutionStarted
        inst = self.tasks.new_instance(wid, run, wtype, start_ms, 1)
        try:
            replay(inst, events)
            if validate:
                _validate(inst, name, data)
                tasks = [e for e in events if e.type == EventType.WORKFLOW_TASK_COMPLETED]
                return str(tasks[-1].attributes.get("fence") or "") if tasks else ""
            return inst.answer_query(inst.defn.handler("query", name), data)
        finally:
            discard(inst)


class Rejected(Exception):
    """An update's validator raised ``cause``: the update is rejected."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _validate(inst: WorkflowInstance, name: str, data: Any) -> None:
    h = inst.defn.handler("update", name)  # (an unknown update fails the validation: no rejection)
    try:
        inst.validate_update(h, data)
    except Exception as e:  # (QueryChangedStateError too: a validator may only read)
        raise Rejected(e) from e
