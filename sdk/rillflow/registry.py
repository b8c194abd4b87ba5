"""Which workflows a namespace has, their schemas, and which workers serve them now.

Workers publish the definitions they serve when they start, and keep a liveness record
that expires unless they refresh it. Clients read both: to refuse a name no worker ever
registered and input its schema refuses, before anything is written, and to show
operators what runs where. Everything is JSON, so ``redis-cli`` shows it as it is.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonschema_rs
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError as SchemaError
from pydantic import BaseModel
from redis.asyncio import Redis
from redis.exceptions import WatchError

from rillflow.errors import (
    InvalidInputError,
    RillflowError,
    WorkflowNotRegisteredError,
    WorkflowRegistrationConflictError,
    jsonable,
)
from rillflow.payloads import InputShape, to_wire
from rillflow.workflow import WorkflowDefinition
from rillflow_runtime.codec import text
from rillflow_runtime.keyspace import Keyspace

_SPEC = "spec"  # the latest registration, from any queue: what clients validate against
_SPEC_ON = "spec:"  # field prefix: "spec:<task queue>" -> the latest registration there
_QUEUE = "q:"  # field prefix: "q:<task queue>" -> when it was last registered there (ms)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _dt(ms: Any) -> datetime:
    return datetime.fromtimestamp(int(ms) / 1000, tz=UTC)


@dataclass(frozen=True)
class WorkerInfo:
    """A live worker, as its liveness record describes it."""

    identity: str
    task_queue: str
    workflows: list[str]
    activities: list[str]
    host: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime
    expires_in: timedelta


@dataclass(frozen=True)
class RegisteredWorkflow:
    """A workflow as the workers that serve it registered it (the latest one wins)."""

    name: str
    display_name: str | None
    description: str | None
    task_queues: dict[str, datetime]  # queue -> last registered there
    input_schema: dict[str, Any]
    output_schema: dict[str, Any] | None
    input_shape: InputShape
    handlers: dict[str, list[dict[str, Any]]]
    schedules: list[Any]
    execution_timeout: timedelta
    registered_at: datetime
    registered_by: str
    spec_json: str = field(repr=False)
    live_workers: dict[str, list[str]] = field(default_factory=dict)  # queue -> identities

    def check_input(self, data: Any) -> Any:
        """``data`` as wire data (see :func:`to_wire`), normalised as the worker will, if
        it can be encoded and the registered input schema accepts it; otherwise
        :class:`InvalidInputError` listing every error with its path."""
        what = f"workflow '{self.name}'"
        data = _wire_input(self.input_shape, data, what)
        _check(_validator(self.spec_json, "", ""), data, what)
        return data

    def check_handler_input(self, kind: str, name: str, data: Any) -> Any:
        """The same for a handler's input; ``kind`` is ``"signals"`` (later queries and
        updates). An unknown handler name is refused, naming the known ones."""
        handler = next((h for h in self.handlers.get(kind, []) if h["name"] == name), None)
        what = {"signals": "signal", "queries": "query", "updates": "update"}[kind]
        if handler is None:
            has = ", ".join(h["name"] for h in self.handlers.get(kind, [])) or "none"
            raise InvalidInputError(f"workflow '{self.name}' has no {what} '{name}' (its {kind}: {has})")
        label = f"{what} '{name}' of workflow '{self.name}'"
        data = _wire_input(InputShape.from_json(handler["input_shape"]), data, label)
        _check(_validator(self.spec_json, kind, name), data, label)
        return data


def _wire_input(shape: InputShape, data: Any, what: str) -> Any:
    """Input given by name, normalised as the worker will, then as wire data: a bare
    value's errors name its parameter, as they do given the class."""
    if isinstance(data, BaseModel):  # a model given with a name is its data
        data = to_wire(data, what)
    return to_wire(shape.normalize(data), what)


def workflow_spec(defn: WorkflowDefinition, task_queue: str, identity: str) -> dict[str, Any]:
    """What a worker publishes about one workflow it serves."""
    return {
        "name": defn.name,
        "display_name": defn.display_name,
        "description": defn.description,
        "input_schema": defn.sig.input_schema(),
        "output_schema": defn.sig.output_schema(),
        "input_shape": defn.sig.shape.to_json(),
        "handlers": defn.handler_specs(),
        "schedules": jsonable(list(defn.schedules)),
        "execution_timeout_s": defn.execution_timeout.total_seconds(),
        "task_queue": task_queue,
        "registered_ms": _now_ms(),
        "registered_by": identity,
    }


_KIND = {"signals": "signal", "queries": "query", "updates": "update"}


def _schemas(spec: dict[str, Any]) -> dict[str, Any]:
    """What callers depend on in a registration: the input, output and handler schemas
    (not descriptions, timeouts or schedules, which may change in a rolling deploy)."""
    parts: dict[str, Any] = {
        "input schema": spec.get("input_schema"),
        "input shape": spec.get("input_shape"),
        "output schema": spec.get("output_schema"),
    }
    for kind, handlers in sorted(spec.get("handlers", {}).items()):
        for h in handlers:
            parts[f"{_KIND.get(kind, kind)} '{h['name']}'"] = {
                k: h.get(k) for k in ("input_schema", "input_shape", "output_schema")
            }
    return parts


def schema_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """How two registrations of a workflow differ for its callers, part by part, with
    the first paths where a schema differs; empty if they agree."""
    a, b = _schemas(old), _schemas(new)
    out = []
    for part in [*a, *(p for p in b if p not in a)]:
        if part not in b:
            out.append(f"{part} (only on the live worker)")
        elif part not in a:
            out.append(f"{part} (only on the new worker)")
        elif a[part] != b[part]:
            paths = _diff_paths(a[part], b[part])
            out.append(f"{part} (at {', '.join(paths)})" if paths else part)
    return out


def _diff_paths(a: Any, b: Any, path: str = "", limit: int = 3) -> list[str]:
    if a == b:
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in [*a, *(k for k in b if k not in a)]:
            if len(out) >= limit:
                break
            out += _diff_paths(a.get(k), b.get(k), f"{path}.{k}" if path else str(k), limit - len(out))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if len(out) >= limit:
                break
            out += _diff_paths(x, y, f"{path}.{i}" if path else str(i), limit - len(out))
        return out
    return [path or "(root)"]


class Registry:
    """The namespace's registry, read and written through one client's connection."""

    def __init__(self, redis: Redis, keyspace: Keyspace) -> None:
        self.redis = redis
        self.ks = keyspace

    # -- workers' side ------------------------------------------------------------------
    async def publish(self, specs: list[dict[str, Any]], worker: dict[str, Any], ttl_ms: int) -> None:
        """Register definitions and the worker's liveness record in one transaction.

        Refused with :class:`WorkflowRegistrationConflictError`, writing nothing, when
        another live worker serves one of these workflows on the same task queue with
        other schemas: the two would take each other's tasks, and starts by name would be
        checked against whichever registered last. The check and the write are one
        WATCH/MULTI transaction on the registry entries, so of two workers starting at
        once the second sees the first. A worker whose liveness record has expired does
        not count, and the same schemas again (from any worker) are always accepted."""
        ks = self.ks
        keys = [ks.registry_entry(spec["name"]) for spec in specs]
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                if keys:  # a publish that changes an entry meanwhile aborts this one: check again
                    await pipe.watch(*keys)
                    raws = [await pipe.hgetall(k) for k in keys]
                    live = await self.workers()
                    self._check_conflicts(specs, raws, worker["identity"], live)
                pipe.multi()  # type: ignore[no-untyped-call]
                for spec in specs:
                    queue = spec["task_queue"]
                    pipe.sadd(ks.registry, spec["name"])
                    pipe.hset(
                        ks.registry_entry(spec["name"]),
                        mapping={
                            _SPEC: json.dumps(spec),
                            _SPEC_ON + queue: json.dumps(spec),
                            _QUEUE + queue: spec["registered_ms"],
                        },
                    )
                pipe.set(ks.worker(worker["identity"]), json.dumps(worker), px=ttl_ms)
                pipe.zadd(ks.workers, {worker["identity"]: worker["heartbeat_ms"]})
                with contextlib.suppress(WatchError):
                    await pipe.execute()
                    return

    @staticmethod
    def _check_conflicts(
        specs: list[dict[str, Any]], raws: list[dict[Any, Any]], identity: str, live: list[WorkerInfo]
    ) -> None:
        for spec, raw in zip(specs, raws, strict=True):
            name, queue = spec["name"], spec["task_queue"]
            others = sorted(
                w.identity
                for w in live
                if w.identity != identity and w.task_queue == queue and name in w.workflows
            )
            fields = {text(k): text(v) for k, v in raw.items()}
            served = fields.get(_SPEC_ON + queue)
            if served is None and _SPEC in fields:  # registered before per-queue specs were kept
                latest = json.loads(fields[_SPEC])
                served = fields[_SPEC] if latest.get("task_queue") == queue else None
            if not others or served is None:
                continue
            differences = schema_differences(json.loads(served), spec)
            if differences:
                raise WorkflowRegistrationConflictError(name, queue, identity, others, differences)

    async def refresh(self, worker: dict[str, Any], ttl_ms: int) -> bool:
        """Extend a liveness record; False if it had expired (the worker re-publishes)."""
        ok = await self.redis.set(self.ks.worker(worker["identity"]), json.dumps(worker), px=ttl_ms, xx=True)
        if ok:
            await self.redis.zadd(self.ks.workers, {worker["identity"]: worker["heartbeat_ms"]})
        return bool(ok)

    async def withdraw(self, identity: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.ks.worker(identity))
            pipe.zrem(self.ks.workers, identity)
            await pipe.execute()

    # -- operators' side ----------------------------------------------------------------
    async def forget(self, name: str, task_queue: str | None = None) -> list[str]:
        """Unregister ``name`` from ``task_queue`` (default: every queue), e.g. after its
        workers moved to another queue; returns the queues it was removed from. Refused
        while a live worker still serves it there: that worker would register it again."""
        key = self.ks.registry_entry(name)
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                # a worker registering it meanwhile aborts the transaction: check again
                await pipe.watch(key)
                raw = await pipe.hgetall(key)
                entry = _with_workers(_entry(raw), await self.workers()) if raw else None
                queues = self._forgettable(name, task_queue, entry)
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.hdel(key, *(_QUEUE + q for q in queues), *(_SPEC_ON + q for q in queues))
                if entry is not None and set(queues) == set(entry.task_queues):
                    pipe.delete(key)
                    pipe.srem(self.ks.registry, name)
                with contextlib.suppress(WatchError):
                    await pipe.execute()
                    return queues

    def _forgettable(self, name: str, task_queue: str | None, entry: RegisteredWorkflow | None) -> list[str]:
        if entry is None:
            raise WorkflowNotRegisteredError(
                f"no workflow named '{name}' is registered in namespace '{self.ks.namespace}'"
            )
        queues = sorted(entry.task_queues) if task_queue is None else [task_queue]
        if task_queue is not None and task_queue not in entry.task_queues:
            raise WorkflowNotRegisteredError(
                f"workflow '{name}' is not registered on task queue '{task_queue}' "
                f"(it is on: {', '.join(sorted(entry.task_queues))})"
            )
        busy = {q: ids for q in queues if (ids := entry.live_workers.get(q))}
        if busy:
            raise RillflowError(
                f"workflow '{name}' still has live workers ("
                + "; ".join(f"{q}: {', '.join(ids)}" for q, ids in sorted(busy.items()))
                + "): stop them first, or they register it again"
            )
        return queues

    # -- clients' side ------------------------------------------------------------------
    async def names(self) -> list[str]:
        return sorted(text(n) for n in await self.redis.smembers(self.ks.registry))

    async def workflow(self, name: str, *, with_workers: bool = True) -> RegisteredWorkflow | None:
        raw = await self.redis.hgetall(self.ks.registry_entry(name))
        if not raw:
            return None
        entry = _entry(raw)
        return _with_workers(entry, await self.workers()) if with_workers else entry

    async def workflows(self) -> list[RegisteredWorkflow]:
        names = await self.names()
        async with self.redis.pipeline(transaction=False) as pipe:
            for n in names:
                pipe.hgetall(self.ks.registry_entry(n))
            raws = await pipe.execute()
        live = await self.workers()
        return [_with_workers(_entry(raw), live) for raw in raws if raw]

    async def workers(self) -> list[WorkerInfo]:
        """The workers whose liveness record has not expired; the index forgets the rest."""
        members: list[bytes] = await self.redis.zrange(self.ks.workers, 0, -1)  # type: ignore[assignment]
        ids = [text(i) for i in members]
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for i in ids:
                pipe.get(self.ks.worker(i))
                pipe.pttl(self.ks.worker(i))
            res = await pipe.execute()
        live, gone = [], []
        for i, raw, ttl in zip(ids, res[::2], res[1::2], strict=True):
            if raw is None:
                gone.append(i)
                continue
            rec = json.loads(raw)
            live.append(
                WorkerInfo(
                    identity=rec["identity"],
                    task_queue=rec["task_queue"],
                    workflows=rec["workflows"],
                    activities=rec["activities"],
                    host=rec["host"],
                    pid=int(rec["pid"]),
                    started_at=_dt(rec["started_ms"]),
                    heartbeat_at=_dt(rec["heartbeat_ms"]),
                    expires_in=timedelta(milliseconds=max(int(ttl), 0)),
                )
            )
        if gone:
            await self.redis.zrem(self.ks.workers, *gone)
        return live


def _entry(raw: dict[Any, Any]) -> RegisteredWorkflow:
    fields = {text(k): text(v) for k, v in raw.items()}
    spec_json = fields[_SPEC]
    spec = json.loads(spec_json)
    return RegisteredWorkflow(
        name=spec["name"],
        display_name=spec.get("display_name"),
        description=spec.get("description"),
        task_queues={k[len(_QUEUE) :]: _dt(v) for k, v in sorted(fields.items()) if k.startswith(_QUEUE)},
        input_schema=spec["input_schema"],
        output_schema=spec.get("output_schema"),
        input_shape=InputShape.from_json(spec["input_shape"]),
        handlers=spec.get("handlers", {}),
        schedules=spec.get("schedules", []),
        execution_timeout=timedelta(seconds=float(spec["execution_timeout_s"])),
        registered_at=_dt(spec["registered_ms"]),
        registered_by=spec["registered_by"],
        spec_json=spec_json,
    )


def _with_workers(entry: RegisteredWorkflow, live: list[WorkerInfo]) -> RegisteredWorkflow:
    by_queue: dict[str, list[str]] = {q: [] for q in entry.task_queues}
    for w in live:
        if entry.name in w.workflows:
            by_queue.setdefault(w.task_queue, []).append(w.identity)
    return replace(entry, live_workers=by_queue)


@dataclass(frozen=True)
class _Validator:
    """A registered input schema, compiled once. ``fast`` (Rust) only says yes or no, in
    a fraction of a microsecond; ``full`` (pure Python, 50-100x slower) is asked only for
    input ``fast`` refuses, to word every error with its path."""

    fast: Any  # None: the schema is one jsonschema-rs refuses to compile (see _validator)
    full: Draft202012Validator


@functools.lru_cache(maxsize=256)
def _validator(spec_json: str, kind: str, name: str) -> _Validator:
    """Compiled once per registered version of a workflow (or handler), not once per call."""
    spec = json.loads(spec_json)
    if kind:
        schema = next(h for h in spec["handlers"][kind] if h["name"] == name)["input_schema"]
    else:
        schema = spec["input_schema"]
    try:
        fast = jsonschema_rs.Draft202012Validator(schema)
    except Exception:  # (any refusal: the full check alone still serves)
        # jsonschema-rs checks the schema against the metaschema and compiles patterns with
        # Rust's regex (no backreferences, no \Z): a schema pydantic wrote for a Python
        # regex, or with a free-form `examples`, is still a schema the full check reads
        fast = None
    return _Validator(fast, Draft202012Validator(schema))


def _check(validator: _Validator, data: Any, what: str) -> None:
    try:
        if validator.fast is not None and validator.fast.is_valid(data):
            return
    except (ValueError, TypeError):  # data it cannot read (a non-string key): the full check words it
        pass
    # the full check decides: input is refused only with the errors that say why
    errors = sorted(validator.full.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        raise InvalidInputError(
            f"invalid input for {what} (its registered input schema): "
            + "; ".join(_describe(e) for e in errors)
        )


def _describe(e: SchemaError) -> str:
    path = ".".join(str(p) for p in e.absolute_path) or "(input)"
    if e.validator in ("anyOf", "oneOf") and e.context:
        # say why each member refused it, not only that none matched
        members: dict[int, list[str]] = {}
        for sub in e.context:
            members.setdefault(int(sub.schema_path[0]), []).append(_describe(sub))
        options: Any = e.validator_value
        parts = []
        for idx, msgs in sorted(members.items()):
            opt = options[idx]
            label = opt.get("$ref", "").rsplit("/", 1)[-1] or opt.get("title") or opt.get("type") or str(idx)
            parts.append(f"{label}: {', '.join(msgs)}")
        return f"{path}: matches none of the accepted shapes ({'; '.join(parts)})"
    return f"{path}: {e.message}"
