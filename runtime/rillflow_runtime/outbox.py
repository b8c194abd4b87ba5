"""Applying a shard's outbox entries where they take effect (DESIGN.md §6).

A run's effect on another execution (start a child, tell a parent its child closed,
apply a parent close policy, signal) is an entry its script adds to its own shard's
outbox, in the same call as the event that causes it. Any worker reads the entries
(one consumer group: each goes to one worker at a time, and a dead worker's are
reclaimed) and applies each in two calls: its effect on the target's shard
(``outbox_apply``, which knows a repeat), then, on the entry's shard, the answer its
origin waits for and the entry's removal (``outbox_done``). A worker that dies between
the two leaves the entry pending; whoever reclaims it applies it again, to no second
effect: exactly once in effect, whatever dies when.
"""

from __future__ import annotations

from typing import Any

from rillflow_runtime.codec import pack, text, unpack
from rillflow_runtime.model import CHILD_CLOSED_EVENTS, OutboxKind, Reply, RunStatus
from rillflow_runtime.protocol import ChildClosed, ChildStart, OutboxAnswer, Protocol


class BadEntry(Exception):
    """An outbox entry without the fields its kind needs (another version wrote it)."""


def _field(fields: Any, name: str) -> str:
    raw = fields.get(name.encode()) if isinstance(fields, dict) else None
    if raw is None:
        raise BadEntry(f"outbox entry without a '{name}' field")
    return text(raw)


def _seq(fields: Any) -> int:
    try:
        return int(_field(fields, "seq"))
    except ValueError as e:
        raise BadEntry("outbox entry whose 'seq' is not an integer") from e


def _kind(fields: Any) -> OutboxKind:
    try:
        return OutboxKind(_field(fields, "kind"))
    except ValueError as e:
        raise BadEntry(f"outbox entry of an unknown kind {fields.get(b'kind')!r}") from e


async def apply(
    protocol: Protocol, shard: int, entry_id: str, fields: Any, retention_ms: int, consumer: str
) -> Reply:
    """Apply one entry of shard ``shard``'s outbox, pending for ``consumer``, and remove
    it: OK, or STALE (another consumer took it over meanwhile: its answer holds). Raises
    BadEntry for an entry it cannot read (left pending: the caller sets it aside)."""
    kind = _kind(fields)
    wid, run = _field(fields, "wid"), _field(fields, "run")
    answer: OutboxAnswer | None = None
    if kind is OutboxKind.START_CHILD:
        answer = await _start_child(protocol, fields, wid, run)
    elif kind is OutboxKind.CHILD_CLOSED:
        await _child_closed(protocol, fields, wid, run)
    elif kind in (OutboxKind.TERMINATE, OutboxKind.CANCEL):
        await protocol.apply_close_policy(
            kind, _field(fields, "cwid"), run, fields.get(b"d") or b"", f"{run}:{_seq(fields)}", retention_ms
        )
    elif kind is OutboxKind.SIGNAL:
        answer = await _signal(protocol, fields, wid, run)
    return await protocol.outbox_done(shard, entry_id, consumer, kind, answer)


def _body(fields: Any, what: str) -> dict[str, Any]:
    try:
        body = unpack(fields[b"d"])
    except (KeyError, TypeError, ValueError) as e:
        raise BadEntry(f"outbox entry with an unreadable {what} ({e})") from e
    if not isinstance(body, dict):
        raise BadEntry(f"outbox entry whose {what} is not a map")
    return body


async def _start_child(protocol: Protocol, fields: Any, wid: str, run: str) -> OutboxAnswer:
    seq, cwid, crun = _seq(fields), _field(fields, "cwid"), _field(fields, "crun")
    ev = _body(fields, "child start")
    try:
        wtype, tq = str(ev["workflow_type"]), str(ev["task_queue"])
        timeout_ms = int(ev["execution_timeout_ms"])
    except (KeyError, TypeError, ValueError) as e:
        raise BadEntry(f"outbox entry with an unreadable child start ({type(e).__name__}: {e})") from e
    start = {
        "workflow_type": wtype,
        "task_queue": tq,
        "input": ev.get("input"),
        "execution_timeout_ms": timeout_ms,
        "seed": ev.get("seed"),
        "parent": {"workflow_id": wid, "run_id": run, "seq": seq},
    }
    if not await protocol.redis.sismember(protocol.ks.registry, wtype):  # (as a client's start refuses it)
        why = (
            f"no worker has registered a workflow named '{wtype}' in this namespace: deploy a worker "
            "that serves it (children run on their parent's task queue)"
        )
        body = pack({"seq": seq, "workflow_id": cwid, "run_id": "", "cause": "not_registered", "why": why})
        return OutboxAnswer(wid, run, seq, Reply.INVALID, body)
    res = await protocol.start_child(
        ChildStart(cwid, crun, wtype, tq, pack(start), timeout_ms, wid, run, seq)
    )
    if res.reply is Reply.OK:
        return OutboxAnswer(wid, run, seq, Reply.OK, pack({"seq": seq, "workflow_id": cwid, "run_id": crun}))
    if res.reply is Reply.RUNNING:
        why = f"execution id '{cwid}' is already running (run {res.run_id})"
    else:
        why = f"the child could not start: {res.why}"
    cause = "already_running" if res.reply is Reply.RUNNING else "invalid"
    body = pack({"seq": seq, "workflow_id": cwid, "run_id": res.run_id, "cause": cause, "why": why})
    return OutboxAnswer(wid, run, seq, res.reply, body)


async def _signal(protocol: Protocol, fields: Any, wid: str, run: str) -> OutboxAnswer:
    seq, target = _seq(fields), _field(fields, "cwid")
    sent = _body(fields, "signal")
    # what the target's history records: the signal, and who sent it
    body = pack(
        {"name": sent.get("name"), "input": sent.get("input"), "sender": {"workflow_id": wid, "run_id": run}}
    )
    res = await protocol.signal(target, _field(fields, "crun") or None, body, f"{run}:s{seq}")
    ok = res.reply in (Reply.OK, Reply.DUPLICATE)
    why = "" if ok else f"execution '{target}' is not running"
    reply = Reply.OK if ok else res.reply
    return OutboxAnswer(wid, run, seq, reply, pack({"seq": seq, "workflow_id": target, "why": why}))


async def _child_closed(protocol: Protocol, fields: Any, parent_wid: str, parent_run: str) -> None:
    seq, cwid, crun = _seq(fields), _field(fields, "cwid"), _field(fields, "crun")
    try:
        status = RunStatus(_field(fields, "status"))
        etype = CHILD_CLOSED_EVENTS[status]
    except (KeyError, ValueError) as e:
        raise BadEntry(f"outbox entry with an unreadable child outcome ({e})") from e
    outcome = _body(fields, "child outcome")
    body = pack({**outcome, "seq": seq, "workflow_id": cwid, "run_id": crun, "status": status.value})
    started = pack({"seq": seq, "workflow_id": cwid, "run_id": crun})
    await protocol.report_child_closed(ChildClosed(parent_wid, parent_run, seq, cwid, started, etype, body))
