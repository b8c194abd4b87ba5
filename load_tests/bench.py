"""Throughput and latency of rillflow on this machine: one worker process, one load
generator process (this one), one Redis. Prints one line per figure.

    python -m load_tests.bench [--n 2000] [--url redis://...] [--shards 1] [--workers 1]

Without --url it starts an embedded server (AOF off, as a pure-speed baseline).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rillflow import Client
from rillflow_runtime.embedded import EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent


async def info(client: Client) -> tuple[int, int]:
    """Commands run so far (those inside scripts too), and the memory closed runs keep:
    Redis's used memory less the closed-runs streams, which are capped (10,000 entries a
    shard) and so cost nothing per run at a steady rate."""
    stats = await client.redis.info("commandstats")
    calls = sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_"))
    mem = int((await client.redis.info("memory"))["used_memory"])
    for shard in client.keyspace.all_shards():
        mem -= int(await client.redis.memory_usage(client.keyspace.closed(shard), samples=0) or 0)
    return calls, mem


class Cpu:
    """CPU seconds used so far by the worker processes, this process (the load generator)
    and Redis: steadier than throughput on a shared machine, where other work takes turns
    on the same cores."""

    def __init__(self, client: Client, worker_pids: list[int]) -> None:
        self.client, self.worker_pids = client, worker_pids

    def _worker(self) -> float:
        total = 0.0
        for pid in self.worker_pids:
            try:  # Linux: utime + stime, in clock ticks
                f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                return float("nan")
            total += (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        return total

    async def read(self) -> tuple[float, float, float]:
        r = await self.client.redis.info("cpu")
        return self._worker(), time.process_time(), float(r["used_cpu_user"]) + float(r["used_cpu_sys"])

    @staticmethod
    def line(
        label: str, before: tuple[float, float, float], after: tuple[float, float, float], n: int
    ) -> str:
        w, c, r = (1000 * (a - b) / n for a, b in zip(after, before, strict=True))
        return f"{label} cpu ms/wf         workers {w:.3f}  load generator {c:.3f}  redis {r:.3f}"


async def run_batch(client: Client, name: str, n: int, concurrency: int = 256) -> tuple[float, list[float]]:
    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []

    async def one(i: int) -> None:
        async with sem:
            t = time.perf_counter()
            h = await client.start_workflow(name, {"i": i})
            await h.result(timeout=300)
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return time.perf_counter() - t0, lat


def start_worker(url: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rillflow.cli",
            "worker",
            "load_tests.flows:SERVED",
            "--url",
            url,
            "--namespace",
            "bench",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


async def live_workers(client: Client) -> int:
    """Workers that registered (0 until the registry knows the bench's workflows)."""
    if "bench_w2" not in await client.registry.names():
        return 0
    return int(await client.redis.zcard(client.keyspace.workers))


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] * 1000


async def bench(url: str, n: int, shards: int, workers: int) -> None:
    client = await Client.connect(url, namespace="bench", shards=shards)
    procs = [start_worker(url) for _ in range(workers)]
    try:
        while await live_workers(client) < workers:  # as in production: workers are up
            for w in procs:
                if w.poll() is not None:
                    raise SystemExit(f"a worker exited with {w.returncode}")
            await asyncio.sleep(0.05)
        await run_batch(client, "bench_w1", 200)  # warm-up: scripts loaded, routes known
        print(
            f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}, shards={shards}, "
            f"workers={workers}, n={n}"
        )

        cpu = Cpu(client, [w.pid for w in procs])
        c0, m0 = await info(client)
        t0 = await cpu.read()
        el, lat = await run_batch(client, "bench_w1", n)
        t1 = await cpu.read()
        c1, m1 = await info(client)
        print(f"W1 workflows/s          {n / el:10.0f}   ({n} workflows of 1 activity in {el:.2f} s)")
        print(f"W1 start->result p50/p99 {pct(lat, 0.5):8.1f} / {pct(lat, 0.99):.1f} ms (at {256} in flight)")
        print(f"W1 redis commands/wf    {(c1 - c0) / n:10.1f}")
        print(f"W1 redis bytes/wf       {(m1 - m0) / n:10.0f}   (what a closed run keeps for its retention)")
        print(Cpu.line("W1", t0, t1, n))

        n2 = max(n // 4, 50)
        c0, _ = await info(client)
        t0 = await cpu.read()
        el, lat = await run_batch(client, "bench_w2", n2)
        t1 = await cpu.read()
        c1, _ = await info(client)
        print(
            f"W2 activities/s         {10 * n2 / el:10.0f}   ({n2} workflows of 10 sequential activities in {el:.2f} s)"
        )
        print(f"W2 workflows/s          {n2 / el:10.0f}")
        print(f"W2 start->result p50/p99 {pct(lat, 0.5):8.1f} / {pct(lat, 0.99):.1f} ms")
        print(f"W2 redis commands/wf    {(c1 - c0) / n2:10.1f}")
        print(Cpu.line("W2", t0, t1, n2))

        n3 = max(n // 20, 20)
        c0, _ = await info(client)
        t0 = await cpu.read()
        el, lat = await run_batch(client, "bench_children", n3, concurrency=64)
        t1 = await cpu.read()
        c1, _ = await info(client)
        print(
            f"children/s              {10 * n3 / el:10.0f}   ({n3} parents of 10 parallel W1 children in {el:.2f} s)"
        )
        print(
            f"parent start->result p50/p99 {pct(lat, 0.5):5.1f} / {pct(lat, 0.99):.1f} ms (at 64 in flight)"
        )
        print(f"children redis commands/child {(c1 - c0) / (10 * n3):6.1f}   (the parent's share included)")
        print(Cpu.line("children", t0, t1, 10 * n3).replace("cpu ms/wf", "cpu ms/child"))

        probe: list[float] = []
        for i in range(100):
            t = time.perf_counter()
            await (await client.start_workflow("bench_w1", {"i": i})).result(timeout=30)
            probe.append(time.perf_counter() - t)
        print(
            f"latency probe p50       {statistics.median(probe) * 1000:10.2f} ms, p99 {pct(probe, 0.99):.2f} ms "
            "(100 sequential W1 runs)"
        )
    finally:
        for w in procs:
            w.terminate()
        for w in procs:
            w.wait(30)
        await client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--url")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1, help="worker processes")
    a = ap.parse_args()
    if a.url:
        asyncio.run(bench(a.url, a.n, a.shards, a.workers))
        return
    with EmbeddedRedis() as server:
        asyncio.run(bench(server.url, a.n, a.shards, a.workers))


if __name__ == "__main__":
    main()
