"""The suite starts its own servers: one per session (per xdist worker) on a free port,
and private ones for crash tests. ``RILLFLOW_REDIS_SERVER`` points it at another binary
(say the system's Redis 7.0); ``RILLFLOW_TEST_REDIS_URL`` at a server you started for it
(the suite flushes it). It never touches any other server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from rillflow import Client
from rillflow_runtime.embedded import EmbeddedRedis
from rillflow_runtime.keyspace import Keyspace

ROOT = Path(__file__).resolve().parent.parent

# every script the suite runs (and the workers it starts, which inherit this) refuses a
# command on a key its caller did not declare: a missing declaration fails a test
os.environ["RILLFLOW_CHECK_KEYS"] = "1"


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    external = os.environ.get("RILLFLOW_TEST_REDIS_URL")
    if external:
        yield external
        return
    server = EmbeddedRedis().start()
    try:
        yield server.url
    finally:
        server.cleanup()


@pytest.fixture
def redis_url(redis_server: str) -> str:
    r = redis.Redis.from_url(redis_server)
    r.flushall()
    r.function_flush()  # each test's first call loads the scripts again, as a new server's does
    r.close()
    return redis_server


@pytest.fixture(params=[1, 4], ids=["shards1", "shards4"])
def shards(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def namespace_shards() -> int:
    return 1


@pytest.fixture
async def client(redis_url: str, namespace_shards: int) -> AsyncIterator[Client]:
    c = await Client.connect(redis_url, shards=namespace_shards, workflow_task_timeout=timedelta(seconds=2))
    try:
        yield c
    finally:
        await c.close()


FAST = {"pump_interval": 0.05, "reclaim_idle": timedelta(seconds=1)}


class WorkerProcess:
    """A real ``rillflow worker`` process, for tests that kill workers."""

    def __init__(
        self,
        url: str,
        target: str,
        *,
        namespace: str = "default",
        task_queue: str = "default",
        heartbeat: float = 10.0,
        env: dict[str, str] | None = None,
        grace: float = 30.0,
        log: Path | None = None,
        wait: bool = True,
    ) -> None:
        self.log = log
        self.url = url
        self.namespace = namespace
        self.identity = f"test-worker-{uuid.uuid4().hex[:8]}"
        args = [
            sys.executable,
            "-m",
            "rillflow.cli",
            "worker",
            target,
            "--url",
            url,
            "--namespace",
            namespace,
            "--grace",
            str(grace),
            "--identity",
            self.identity,
            "--task-queue",
            task_queue,
            "--heartbeat",
            str(heartbeat),
        ]
        self.proc = subprocess.Popen(
            args,
            cwd=ROOT,
            env={**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL,
            stderr=open(log, "w") if log else subprocess.DEVNULL,  # noqa: SIM115
        )
        if wait:
            self.wait_registered()

    def wait_registered(self, timeout: float = 30.0) -> None:
        """Until the worker has published what it serves (its liveness record exists)."""
        key = Keyspace(self.namespace, 1).worker(self.identity)
        with redis.Redis.from_url(self.url) as r:
            deadline = time.monotonic() + timeout
            while not r.exists(key):
                if self.proc.poll() is not None:
                    raise AssertionError(f"worker exited with {self.proc.returncode}: {self.output()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"worker did not register within {timeout} s: {self.output()}")
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text() if self.log else ""


@pytest.fixture
def worker_procs(tmp_path: Path) -> Iterator[Any]:
    procs: list[WorkerProcess] = []

    def spawn(url: str, target: str = "tests.flows:SERVED", **kw: Any) -> WorkerProcess:
        p = WorkerProcess(url, target, log=tmp_path / f"worker{len(procs)}.log", **kw)
        procs.append(p)
        return p

    yield spawn
    for p in procs:
        p.kill()


async def wait_until(pred: Any, timeout: float = 10.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return
        await asyncio.sleep(interval)
    raise AssertionError("condition not met in time")
