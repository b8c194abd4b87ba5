"""The Lua scripts, loaded once per client and called by SHA (redis-py ``Script``
re-loads on NOSCRIPT). Each script is the constant tables generated from ``model``,
then ``lib.lua``, then its own file. Only ``protocol`` calls them."""

from __future__ import annotations

import os
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from rillflow_runtime.model import ENUMS

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
    "signal",
    "query",
    "update",
    "dead_letter",
)


def lua_source(name: str) -> str:
    return resources.files("rillflow_runtime").joinpath("lua", f"{name}.lua").read_text()


# Scripts that only read: Redis runs them on replicas too and never refuses them for
# memory.
READ_ONLY = frozenset({"pump_due"})


def check_keys() -> bool:
    """``RILLFLOW_CHECK_KEYS=1`` (the test suite and the chaos run set it) makes every
    script refuse a command on a key its caller did not declare (see lib.lua)."""
    return os.environ.get("RILLFLOW_CHECK_KEYS", "") not in ("", "0")


def lua_constants() -> str:
    """One Lua table per enum (``EV.WORKFLOW_EXECUTION_STARTED`` ...). Reading a member
    that does not exist is an error, not a silent nil."""
    lines = [
        f"local CHECK_KEYS = {'true' if check_keys() else 'false'}",
        "local STRICT = { __index = function(_, k) error('unknown protocol constant ' .. tostring(k)) end }",
    ]
    for table, enum in ENUMS.items():
        items = ", ".join(f"{m.name} = '{m.value}'" for m in enum)
        lines.append(f"local {table} = setmetatable({{ {items} }}, STRICT)")
    return "\n".join(lines) + "\n"


def script_sources() -> dict[str, str]:
    """The ``#!lua`` first line makes Redis (>= 7.0) hold a script to one slot: a key of
    another slot is refused even when the same node owns it, and a write script is
    refused before it starts, not half way, when the server is out of memory."""
    head = lua_constants() + lua_source("lib")
    return {
        name: ("#!lua flags=no-writes\n" if name in READ_ONLY else "#!lua\n") + head + "\n" + lua_source(name)
        for name in NAMES
    }


class Scripts:
    """One registered script per transition, bound to a client."""

    def __init__(self, redis: Redis) -> None:
        self._scripts: dict[str, AsyncScript] = {
            name: redis.register_script(src) for name, src in script_sources().items()
        }

    async def call(self, name: str, keys: list[str], args: list[Any], client: Any = None) -> Any:
        return await self._scripts[name](keys=keys, args=args, client=client)
