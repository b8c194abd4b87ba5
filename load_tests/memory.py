"""Redis memory under a steady load: does it stay flat once closed runs start to expire?

    python -m load_tests.memory [--minutes 30] [--rate 400] [--retention 15] [--every 30]

One worker process and this load generator run W1 workflows (one no-op activity) at a
fixed rate against an embedded server (AOF off), in a namespace whose closed runs are
kept ``--retention`` seconds. Every ``--every`` seconds it prints Redis's used memory,
its key count, and what the closed runs kept at that moment should weigh (rate x
retention x the bytes a closed run keeps, measured at the start): once the retention
horizon is reached, memory should stop growing.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import timedelta

from load_tests.bench import live_workers, start_worker
from rillflow import Client
from rillflow_runtime.embedded import EmbeddedRedis

NAMESPACE = "bench"


async def used(client: Client) -> tuple[int, int]:
    mem = int((await client.redis.info("memory"))["used_memory"])
    return mem, int(await client.redis.dbsize())


async def run_bytes(client: Client) -> int:
    """What one closed W1 run keeps: MEMORY USAGE of each of its keys."""
    h = await client.start_workflow("bench_w1", {"i": -1})
    await h.result(timeout=60)
    ks, run = client.keyspace, h.run_id or ""
    shard = ks.shard(h.id)
    total = 0
    for key in ks.run_keys(shard, h.id, run):
        total += int(await client.redis.memory_usage(key, samples=0) or 0)
    return total


async def steady(url: str, minutes: float, rate: float, retention_s: float, every_s: float) -> None:
    client = await Client.connect(url, namespace=NAMESPACE, retention=timedelta(seconds=retention_s))
    worker = start_worker(url)
    done = 0
    failed = 0
    inflight: set[asyncio.Task[None]] = set()

    async def one(i: int) -> None:
        nonlocal done, failed
        try:
            await (await client.start_workflow("bench_w1", {"i": i})).result(timeout=60)
            done += 1
        except Exception:
            failed += 1

    try:
        while await live_workers(client) < 1:
            await asyncio.sleep(0.05)
        await asyncio.gather(*(one(i) for i in range(200)))  # warm-up
        per_run = await run_bytes(client)
        print(
            f"a closed W1 run keeps {per_run} bytes in its keys; rate {rate:.0f}/s, retention "
            f"{retention_s:.0f} s; the closed-runs stream (capped) and the queues come on top"
        )
        print(f"{'t s':>6} {'done':>8} {'wf/s':>6} {'used MB':>8} {'keys':>8} {'live set MB':>12}")
        start = time.monotonic()
        next_report, i, last_done, last_t = start, 0, done, start
        while (now := time.monotonic()) - start < minutes * 60:
            due = int((now - start) * rate)
            while i < due and len(inflight) < 2000:  # a stalled server must not pile up tasks
                t = asyncio.create_task(one(i))
                inflight.add(t)
                t.add_done_callback(inflight.discard)
                i += 1
            if now >= next_report:
                mem, keys = await used(client)
                wfs = (done - last_done) / max(1e-9, now - last_t)
                live = min(now - start, retention_s) * rate * per_run / 1e6
                print(
                    f"{now - start:6.0f} {done:8d} {wfs:6.0f} {mem / 1e6:8.1f} {keys:8d} {live:12.1f}",
                    flush=True,
                )
                next_report += every_s
                last_done, last_t = done, now
            await asyncio.sleep(0.01)
        await asyncio.gather(*inflight, return_exceptions=True)
        print(f"done: {done} workflows, {failed} failed")
    finally:
        worker.terminate()
        worker.wait(30)
        await client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--rate", type=float, default=400, help="workflows started per second")
    ap.add_argument("--retention", type=float, default=15, help="seconds closed runs are kept")
    ap.add_argument("--every", type=float, default=30, help="seconds between reports")
    a = ap.parse_args()
    with EmbeddedRedis() as server:
        asyncio.run(steady(server.url, a.minutes, a.rate, a.retention, a.every))


if __name__ == "__main__":
    main()
