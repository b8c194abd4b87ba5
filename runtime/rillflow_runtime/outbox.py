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


async def apply(protocol: Protocol, shard: int, entry_id: str, fields: Any, retention_ms: int) -> None:
    """Apply one entry of shard ``shard``'s outbox and remove it. Raises BadEntry for an
    entry it cannot read (left pending: the caller sets it aside)."""
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
        seq, target = _seq(fields), _field(fields, "cwid")
        res = await protocol.signal(
            target, _field(fields, "crun") or None, fields.get(b"d") or b"", f"{run}:s{seq}"
        )
        ok = res.reply in (Reply.OK, Reply.DUPLICATE)
        why = "" if ok else f"execution '{target}' is not running"
        answer = OutboxAnswer(
            wid,
            run,
            seq,
            Reply.OK if ok else res.reply,
            pack({"seq": seq, "workflow_id": target, "why": why}),
        )
    await protocol.outbox_done(shard, entry_id, kind, answer)


async def _start_child(protocol: Protocol, fields: Any, wid: str, run: str) -> OutboxAnswer:
    seq, cwid, crun = _seq(fields), _field(fields, "cwid"), _field(fields, "crun")
    try:
        ev = unpack(fields[b"d"])
        start = {
            "workflow_type": ev["workflow_type"],
            "task_queue": ev["task_queue"],
            "input": ev.get("input"),
            "execution_timeout_ms": ev["execution_timeout_ms"],
            "seed": ev.get("seed"),
            "parent": {"workflow_id": wid, "run_id": run, "seq": seq},
        }
    except (KeyError, TypeError, ValueError) as e:
        raise BadEntry(f"outbox entry with an unreadable child start ({e})") from e
    res = await protocol.start_child(
        ChildStart(
            cwid,
            crun,
            str(start["workflow_type"]),
            str(start["task_queue"]),
            pack(start),
            int(start["execution_timeout_ms"]),
            wid,
            run,
            seq,
        )
    )
    if res.reply is Reply.OK:
        return OutboxAnswer(wid, run, seq, Reply.OK, pack({"seq": seq, "workflow_id": cwid, "run_id": crun}))
    if res.reply is Reply.RUNNING:
        why = f"execution id '{cwid}' is already running (run {res.run_id})"
    else:
        why = f"the child could not start: {res.why}"
    body = pack({"seq": seq, "workflow_id": cwid, "run_id": res.run_id, "cause": str(res.reply), "why": why})
    return OutboxAnswer(wid, run, seq, res.reply, body)


async def _child_closed(protocol: Protocol, fields: Any, parent_wid: str, parent_run: str) -> None:
    seq, cwid, crun = _seq(fields), _field(fields, "cwid"), _field(fields, "crun")
    try:
        status = RunStatus(_field(fields, "status"))
        etype = CHILD_CLOSED_EVENTS[status]
        outcome = unpack(fields[b"d"]) or {}
    except (KeyError, TypeError, ValueError) as e:
        raise BadEntry(f"outbox entry with an unreadable child outcome ({e})") from e
    if not isinstance(outcome, dict):
        outcome = {}
    body = pack({**outcome, "seq": seq, "workflow_id": cwid, "run_id": crun, "status": status.value})
    started = pack({"seq": seq, "workflow_id": cwid, "run_id": crun})
    await protocol.report_child_closed(ChildClosed(parent_wid, parent_run, seq, cwid, started, etype, body))
