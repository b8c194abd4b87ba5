"""The Lua scripts, as one Redis function library (Redis >= 7.0, ``FUNCTION LOAD``).

The library is the constant tables generated from ``model``, then ``lib.lua``, then each
script's file as the body of one registered function. Redis runs all of that once, when
the library is loaded, so a call runs only its own function: as plain ``EVALSHA``
scripts, the shared prelude ran again on every call, about 12 µs each, several times per
workflow. The library's name and its functions' names carry a digest of its source, so
workers of different versions (a rolling upgrade) each call their own. A server that
does not have it (new, flushed, restarted without persistence) gets it on the first call
that misses it. Only ``protocol`` calls the scripts.
"""

from __future__ import annotations

import hashlib
import os
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from rillflow_runtime.model import ACTIVATION_ORDER, ENUMS, EVENT_CODES, MAX_DURATION_MS

NAMES = (
    "start",
    "wft_start",
    "wft_complete",
    "wft_fail",
    "act_start",
    "act_done",
    "heartbeat",
    "pump_due",
    "pump",
    "terminate",
    "cancel",
    "reset",
    "signal",
    "signal_start",
    "query",
    "update",
    "dead_letter",
    "outbox_apply",
    "outbox_done",
    "idx_trim",
    "sched_put",
    "sched_fire",
    "sched_state",
)


def check_keys() -> bool:
    """``RILLFLOW_CHECK_KEYS=1`` (the test suite and the chaos run set it) makes every
    script refuse a command on a key its caller did not declare (see lib.lua)."""
    return os.environ.get("RILLFLOW_CHECK_KEYS", "") not in ("", "0")


def lua_source(name: str) -> str:
    return resources.files("rillflow_runtime").joinpath("lua", f"{name}.lua").read_text()


def lua_constants() -> str:
    """One Lua table per enum (``EV.WORKFLOW_EXECUTION_STARTED`` ...). A member that does
    not exist would read as nil: tests/test_scripts.py refuses any in the sources (a
    library's load has no setmetatable to make it an error at run time)."""
    lines = [f"local CHECK_KEYS = {'true' if check_keys() else 'false'}"]
    for table, enum in ENUMS.items():
        items = ", ".join(f"{m.name} = '{m.value}'" for m in enum)
        lines.append(f"local {table} = {{ {items} }}")
    codes = ", ".join(f"{e.value} = {i}" for i, e in enumerate(EVENT_CODES, 1))
    lines.append(f"local EVCODE = {{ {codes} }}")
    lines.append(f"local MAX_DURATION_MS = {MAX_DURATION_MS}")
    lines.append(f"local ACTIVATION_ORDER = {ACTIVATION_ORDER}")
    return "\n".join(lines) + "\n"


# How many times a call loads the library it finds missing before it gives up.
LOAD_TRIES = 5


class Library:
    """The library's source, its name, and the name each script is called by."""

    def __init__(self) -> None:
        parts = [lua_constants(), lua_source("lib")]
        for name in NAMES:
            # a script's body reads KEYS and ARGV as a plain script would: here they are
            # its function's arguments; finish() writes what the call deferred, even when
            # the body fails (a bug) after appending: a run's event counter never falls
            # behind its history, whose next append would then be refused for good
            parts.append(
                f"local function {name}_body(KEYS, ARGV)\n{lua_source(name)}\nend\n"
                f"local function {name}_fn(KEYS, ARGV)\nbegin(KEYS, ARGV)\n"
                f"local ok, reply = pcall({name}_body, KEYS, ARGV)\nfinish()\n"
                f"if not ok then error(reply, 0) end\nreturn reply\nend\n"
            )
        body = "\n".join(parts)
        digest = hashlib.sha1(body.encode()).hexdigest()[:12]
        self.name = f"rillflow_{digest}"
        self.functions = {name: f"rf_{digest}_{name}" for name in NAMES}
        registrations = [
            f"redis.register_function{{ function_name = '{self.functions[name]}', callback = {name}_fn }}"
            for name in NAMES
        ]
        # the #!lua line makes Redis hold a call to one slot: a key of another slot is
        # refused even when the same node owns it, and a write is refused before it starts,
        # not half way, when the server is out of memory
        self.source = f"#!lua name={self.name}\n" + body + "\n" + "\n".join(registrations) + "\n"


class Scripts:
    """The library, called through one client; loaded where it is missing."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.library = Library()

    async def load(self) -> None:
        """Load the library (replacing one of the same name: the same source)."""
        await self.redis.function_load(self.library.source, replace=True)

    async def call(self, name: str, keys: list[str], args: list[Any]) -> Any:
        fn = self.library.functions[name]
        for _ in range(LOAD_TRIES):
            try:
                return await self.redis.fcall(fn, len(keys), *keys, *args)
            except ResponseError as e:
                if "function not found" not in str(e).lower():
                    raise
            # (deleted again between a load and the call: an operator's FUNCTION FLUSH)
            await self.load()
        return await self.redis.fcall(fn, len(keys), *keys, *args)
