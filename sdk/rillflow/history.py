"""Events of a run's history, as read from its Redis stream."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from rillflow_runtime.codec import text, unpack
from rillflow_runtime.model import COMMAND_EVENTS, INPUT_EVENTS

__all__ = ["COMMAND_EVENTS", "INPUT_EVENTS", "HistoryEvent"]


@dataclass(frozen=True)
class HistoryEvent:
    event_id: int
    type: str
    time_ms: int
    attributes: dict[str, Any]
    size: int = 0  # the bytes of its body, as the run's history size counts them

    @property
    def time(self) -> datetime:
        return datetime.fromtimestamp(self.time_ms / 1000, tz=UTC)

    @classmethod
    def from_entry(cls, entry: Any) -> HistoryEvent:
        """One XRANGE entry: ``[b"<eid>-0", [b"type", ..., b"t", ..., b"d", ...]]``."""
        sid, raw = entry
        if isinstance(raw, dict):  # redis-py's XRANGE parses the fields; a script returns them flat
            fields = {text(k): v for k, v in raw.items()}
        else:
            fields = {text(raw[i]): raw[i + 1] for i in range(0, len(raw), 2)}
        body = fields.get("d")
        attrs = unpack(body) if body else {}
        return cls(
            event_id=int(text(sid).split("-", 1)[0]),
            type=text(fields.get("type")),
            time_ms=int(fields.get("t") or 0),
            attributes=attrs if isinstance(attrs, dict) else {},
            size=len(body) if body else 0,
        )
