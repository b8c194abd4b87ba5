"""The benchmark's workflows: W1 = one no-op activity, W2 = ten sequential ones, and a
parent that fans out ten W1 children."""

from __future__ import annotations

import asyncio

import rillflow as workflows


@workflows.activity()
async def noop(i: int) -> int:
    return i


@workflows.workflow.define(name="bench_w1")
class W1:
    @workflows.workflow.entrypoint
    async def run(self, i: int) -> int:
        return await noop(i)


@workflows.workflow.define(name="bench_w2")
class W2:
    @workflows.workflow.entrypoint
    async def run(self, i: int) -> int:
        for k in range(10):
            i = await noop(i + k)
        return i


@workflows.workflow.define(name="bench_children")
class Children:
    @workflows.workflow.entrypoint
    async def run(self, i: int) -> int:
        results = await asyncio.gather(
            *(workflows.workflow.execute_workflow(W1, {"i": i + k}) for k in range(10))
        )
        return sum(results)


SERVED = [W1, W2, Children, noop]
