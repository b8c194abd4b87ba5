"""Activities with Depends parameters. Each provider notes when it is entered and closed
in the file $RF_DEPS_LOG (one line per event), so a test sees how often and when."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

from rillflow import Depends, activity, workflow


def note(event: str) -> None:
    path = os.environ.get("RF_DEPS_LOG")
    if path:
        with open(path, "a") as f:
            f.write(event + "\n")


class Pool:
    def __init__(self, name: str) -> None:
        self.name = name
        self.uses = 0


async def pool() -> AsyncIterator[Pool]:
    """An async generator: what follows the yield runs when the worker stops."""
    note("pool entered")
    p = Pool("pool")
    yield p
    note(f"pool closed after {p.uses} uses")


def settings() -> dict[str, Any]:
    note("settings made")
    return {"greeting": "hello"}


@contextlib.contextmanager
def model(cfg: dict[str, Any] = Depends(settings)) -> Iterator[str]:  # (a provider with its own)
    note("model loaded")
    yield f"model({cfg['greeting']})"
    note("model unloaded")


@activity(name="dep_greet")
async def greet(name: str, p: Pool = Depends(pool), m: str = Depends(model)) -> str:
    p.uses += 1
    return f"{m}: {name} ({p.uses})"


@activity(name="dep_count")
def count(n: int, p: Pool = Depends(pool)) -> int:  # a plain def, run in a thread
    p.uses += 1
    return n + p.uses


@activity(name="dep_outer")
async def outer(name: str, p: Pool = Depends(pool)) -> list[Any]:
    """Calls another activity directly: it gets this worker's providers, not new ones."""
    inner = await greet(name)
    return [inner, p.uses]


@workflow.define(name="dep_outer_flow")
class OuterFlow:
    @workflow.entrypoint
    async def run(self, name: str) -> list[Any]:
        return await outer(name)


@workflow.define(name="dep_flow")
class DepFlow:
    @workflow.entrypoint
    async def run(self, names: list[str]) -> list[Any]:
        out: list[Any] = [await greet(n) for n in names]
        out.append(await count(100))
        return out


async def broken() -> AsyncIterator[None]:
    raise ConnectionError("the database is not there")
    yield  # (a generator)


@activity(name="dep_broken")
async def needs_broken(x: int, b: None = Depends(broken)) -> int:
    return x


WORKFLOWS = [DepFlow, OuterFlow]
ACTIVITIES = [greet, count, outer]
SERVED = [*WORKFLOWS, *ACTIVITIES]  # (a worker process's target)
BROKEN = [needs_broken]
