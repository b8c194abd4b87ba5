"""Replaying recorded histories against the current code, outside any worker: whether a
deploy would break the runs it inherits (non-determinism), checked in CI before it ships."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from rillflow.errors import InvalidInputError, NonDeterminismError, WorkflowDefinitionError
from rillflow.executor import WorkflowInfo, WorkflowInstance, WorkflowTaskError, replay
from rillflow.history import HistoryEvent
from rillflow.workflow import WorkflowDefinition, get_workflow_definition
from rillflow_runtime.model import EventType

if TYPE_CHECKING:
    from rillflow.client import Client


@dataclass
class ReplayResult:
    """One history replayed: ``failure`` is None when the code reproduced every command
    the history records, else why not (a :class:`NonDeterminismError`, or the error the
    code now raises where the history's task completed)."""

    execution_id: str
    run_id: str
    workflow_type: str
    events: int
    failure: Exception | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


class Replayer:
    """Replays histories against ``workflows`` (the classes a worker would serve)."""

    def __init__(self, workflows: Sequence[type]) -> None:
        self.workflows: dict[str, WorkflowDefinition] = {}
        for cls in workflows:
            defn = get_workflow_definition(cls)
            if defn.name in self.workflows and self.workflows[defn.name].cls is not cls:
                raise WorkflowDefinitionError(f"two workflow classes are named '{defn.name}'")
            self.workflows[defn.name] = defn

    def replay(
        self,
        events: Sequence[HistoryEvent],
        *,
        execution_id: str = "replay",
        run_id: str = "replay",
        raise_on_failure: bool = False,
    ) -> ReplayResult:
        """Replay one run's history (whole or as far as it goes). With
        ``raise_on_failure``, a failure is raised instead of returned."""
        history = list(events)
        if not history or history[0].type != EventType.WORKFLOW_EXECUTION_STARTED:
            raise InvalidInputError("a history to replay starts with its WorkflowExecutionStarted event")
        start = history[0]
        wtype = str(start.attributes.get("workflow_type", ""))
        result = ReplayResult(execution_id, run_id, wtype, len(history))
        defn = self.workflows.get(wtype)
        if defn is None:
            result.failure = InvalidInputError(
                f"the history is of workflow '{wtype}', which is not among the replayer's: "
                f"{sorted(self.workflows)}"
            )
        else:
            info = WorkflowInfo(
                execution_id, run_id, wtype, str(start.attributes.get("task_queue", "")), start.time
            )
            inst = WorkflowInstance(defn, info)
            try:
                replay(inst, history)
            except (NonDeterminismError, WorkflowTaskError) as e:
                result.failure = e
            finally:
                inst.teardown()
        if raise_on_failure and result.failure is not None:
            raise result.failure
        return result

    def replay_all(self, histories: Iterable[tuple[str, str, Sequence[HistoryEvent]]]) -> list[ReplayResult]:
        """Replay each ``(execution_id, run_id, events)``; a failure of one is its result."""
        return [self.replay(events, execution_id=wid, run_id=run) for wid, run, events in histories]

    async def replay_execution(
        self, client: Client, execution_id: str, run_id: str | None = None
    ) -> ReplayResult:
        """Replay a run stored in Redis: ``run_id``, else the execution's current run."""
        handle = client.get_workflow_handle(execution_id, run_id=run_id)
        events = await handle.history()
        run = run_id or (await handle.describe()).run_id
        return self.replay(events, execution_id=execution_id, run_id=run)


def load_history_json(text: str, source: str = "history") -> list[HistoryEvent]:
    """A history exported by ``rillflow history --json`` (one JSON object per line; a
    JSON array of them is read too) as events to replay."""
    try:
        stripped = text.strip()
        records: list[Any] = (
            json.loads(stripped)
            if stripped.startswith("[")
            else [json.loads(line) for line in stripped.splitlines() if line.strip()]
        )
    except json.JSONDecodeError as e:
        raise InvalidInputError(
            f"{source} is not a history exported by `rillflow history --json`: {e}"
        ) from e
    events = []
    for n, rec in enumerate(records, 1):
        if not isinstance(rec, dict) or not {"event_id", "type", "time"} <= rec.keys():
            raise InvalidInputError(
                f"{source}, record {n}: not an event of `rillflow history --json` "
                "(each has event_id, time, type and the event's attributes)"
            )
        # (the first record names its execution and run: kept for the caller, see cli.replay)
        attrs = {k: v for k, v in rec.items() if k not in ("event_id", "time", "type", "size")}
        if rec["type"] == EventType.WORKFLOW_EXECUTION_STARTED and isinstance(attrs.get("seed"), str):
            attrs["seed"] = bytes.fromhex(attrs["seed"])  # (exported as hex: JSON has no bytes)
        try:
            when = datetime.fromisoformat(str(rec["time"]))
        except ValueError as e:
            raise InvalidInputError(f"{source}, record {n}: bad time {rec['time']!r}") from e
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        ms = round(when.timestamp() * 1000)
        events.append(
            HistoryEvent(int(rec["event_id"]), str(rec["type"]), ms, attrs, int(rec.get("size", 0)))
        )
    return events
