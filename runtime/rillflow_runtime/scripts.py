"""The Lua scripts, loaded once per client and called by SHA (redis-py ``Script``
re-loads on NOSCRIPT). Each script is ``lib.lua`` followed by its own file."""

from __future__ import annotations

from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

NAMES = (
    "start",
    "wft_start",
    "wft_complete",
    "wft_fail",
    "act_start",
    "act_done",
    "heartbeat",
    "pump",
    "terminate",
    "signal",
    "query",
    "update",
    "dead_letter",
)


def _source(name: str) -> str:
    return resources.files("rillflow_runtime").joinpath("lua", f"{name}.lua").read_text()


def script_sources() -> dict[str, str]:
    lib = _source("lib")
    return {name: lib + "\n" + _source(name) for name in NAMES}


class Scripts:
    """One registered script per transition, bound to a client."""

    def __init__(self, redis: Redis) -> None:
        self._scripts: dict[str, AsyncScript] = {
            name: redis.register_script(src) for name, src in script_sources().items()
        }

    def get(self, name: str) -> AsyncScript:
        return self._scripts[name]

    async def call(self, name: str, timers_key: str, args: list[Any], client: Any = None) -> Any:
        return await self._scripts[name](keys=[timers_key], args=args, client=client)
