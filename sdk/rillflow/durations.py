"""The one rule for every timeout and interval a user gives: a positive ``timedelta`` of
at most ten years. Longer is a mistake, and past the clock's range once added to now
(describe() and the scripts' deadlines would overflow)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from rillflow_runtime.model import MAX_DURATION_MS

MAX_DURATION = timedelta(milliseconds=MAX_DURATION_MS)


def duration_problem(value: Any, name: str, *, optional: bool = False) -> str | None:
    """What is wrong with ``value`` as the duration ``name`` (None: nothing)."""
    if value is None and optional:
        return None
    if not isinstance(value, timedelta) or value <= timedelta(0) or value > MAX_DURATION:
        more = " or None" if optional else ""
        return f"{name} must be a positive timedelta of at most {MAX_DURATION.days} days{more}, got {value!r}"
    return None


def time_of_ms(ms: Any) -> datetime | None:
    """A time the scripts wrote (ms since the epoch; None when unset). Past what datetime
    holds (a run started before the ten-year cap on timeouts) reads as the largest it
    holds, not as an error."""
    if not ms:
        return None
    try:
        return datetime.fromtimestamp(int(ms) / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return datetime.max.replace(tzinfo=UTC)
