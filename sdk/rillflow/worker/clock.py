"""Redis's clock as this worker can tell it without asking: for speculative tasks.

A worker that runs a run's first task straight from its message (see wft_complete.lua)
gives the workflow a start time before Redis records one. That time must be Redis's
clock, not the worker's: script answers carry Redis's NOW, and since NOW was read
before the answer arrived, ``NOW - local time on arrival`` never exceeds the true offset
between the two clocks. The largest such offset seen lately is therefore an
estimate that is never ahead of Redis (by more than the clocks drift apart in a window),
and usually within a round trip behind it. The script checks the time anyway (no
earlier than the run's start, no later than its own NOW) and starts the task the usual
way otherwise; ``forget`` then drops what may have gone wrong (a step of either clock).
"""

from __future__ import annotations

import time

# Offsets older than two windows are forgotten, so that a step back of Redis's clock
# (an operator's fix, a failover to another host) stops speculation for a while only.
WINDOW_S = 10.0


class RedisClock:
    def __init__(self) -> None:
        self._best: float | None = None  # the largest offset seen in the current window
        self._older: float | None = None  # ... in the window before
        self._window_start = time.monotonic()

    def observe(self, redis_ms: int) -> None:
        """A time (ms) Redis answered with just now, or earlier."""
        now = time.monotonic()
        if now - self._window_start >= WINDOW_S:
            self._older, self._best, self._window_start = self._best, None, now
        offset = redis_ms - now * 1000
        if self._best is None or offset > self._best:
            self._best = offset

    def now_ms(self) -> int | None:
        """Redis's clock in ms, never ahead of it; None until a time was observed."""
        offsets = [o for o in (self._best, self._older) if o is not None]
        if not offsets:
            return None
        return int(time.monotonic() * 1000 + max(offsets))

    def forget(self) -> None:
        self._best = self._older = None
