"""A chaos run anyone can repeat: thousands of workflows while workers and Redis die.

    python -m load_tests.chaos [--workflows 2000] [--workers 3] [--kills 120]
        [--redis-kills 3] [--seed N] [--duration 200] [--settle 90] [--no-rollback]

It starts its own Redis (AOF, ``appendfsync always``) on a free port, and a second one
that only tallies activity executions; it never connects to any other server. While
worker processes run the workflows of ``load_tests.chaos_flows``, it SIGKILLs workers
at random (replacing each one), SIGKILLs Redis and restarts it over the same data dir
(the last time after an outage longer than clients retry a call), and once cuts the
tail of the AOF: what an ``appendfsync everysec`` power loss does, limited to what the
workers wrote while starts and signals were paused, so that nothing a client was told
is lost. Every script checks that it touches only the keys its caller declared. Then
it stops the chaos, waits (bounded) for every execution to close (following chains of
continue-as-new), and prints one line per figure. It exits 1 unless lost runs, stuck runs, duplicated completions,
duplicated signal applications and wrong results are all 0.

The seed fixes the workflows, the signals and the chaos schedule; which process a kill
hits still depends on timing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from load_tests.chaos_flows import (
    CLEANUP_N,
    HOP_STRIDE,
    SIGNAL_NAME,
    TALLY_ENV,
    TALLY_PREFIX,
    TICK_SCHEDULE,
    ChaosMix,
    ChaosTick,
    Plan,
    activity_count,
    expected_value,
)
from rillflow import (
    Client,
    HistoryEvent,
    RillflowError,
    WorkflowAlreadyStartedError,
    WorkflowFailureError,
    WorkflowNotFoundError,
)
from rillflow.models import ScheduleDefinition, ScheduleInterval, ScheduleOverlapPolicy, SchedulePolicy
from rillflow.schedules import at_ms, execution_id
from rillflow_runtime.embedded import EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "chaos"
CLOSING = frozenset(
    {
        "WorkflowExecutionCompleted",
        "WorkflowExecutionFailed",
        "WorkflowExecutionTimedOut",
        "WorkflowExecutionTerminated",
        "WorkflowExecutionContinuedAsNew",
        "WorkflowExecutionCanceled",
    }
)
# what a dropped connection or a restarting server raises through redis-py's retries
TRANSIENT = (RedisError, ConnectionError, OSError, TimeoutError)
T = TypeVar("T")
Log = Callable[[str], None]
CANCEL_SHARE = 0.1  # the share of executions the harness asks to cancel


def say(line: str) -> None:
    print(line, flush=True)


def text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else "" if v is None else str(v)


@dataclass(frozen=True)
class Keys:
    """Key names as docs/keyspace.md documents them for redis-cli users: the harness reads
    what the engine left the way an operator would, not through the engine's internals."""

    shards: int
    ns: str = NAMESPACE

    def shard(self, execution_id: str) -> int:
        return zlib.crc32(execution_id.encode()) % self.shards

    def prefix(self, shard: int) -> str:
        return f"rf:{{{self.ns}:{shard}}}:"

    def run(self, shard: int, run_id: str) -> str:
        return f"{self.prefix(shard)}run:{run_id}"

    def closed(self, shard: int) -> str:
        return f"{self.prefix(shard)}closed"

    def timers(self, shard: int) -> str:
        return f"{self.prefix(shard)}timers"

    @property
    def workers(self) -> str:
        return f"rf:{{{self.ns}}}:workers"

    def worker(self, identity: str) -> str:
        return f"rf:{{{self.ns}}}:worker:{identity}"


@dataclass
class ChaosConfig:
    workflows: int = 2000
    workers: int = 3
    kills: int = 120
    redis_kills: int = 3
    seed: int = field(default_factory=lambda: random.SystemRandom().randrange(1, 2**31))
    duration: float = 200.0  # the chaos phase: starts, signals, kills
    settle: float = 90.0  # then at most this long for the runs to close
    rollback: bool = True
    shards: int = 1
    workflow_task_timeout: float = 3.0
    data_dir: Path | None = None  # kept when given; a temp dir removed at the end if not
    progress_every: float = 20.0


# -- the workflows the run starts -------------------------------------------------------
@dataclass
class RunRecord:
    """One workflow of the run, and what the harness was told about it."""

    index: int
    execution_id: str
    plan: Plan
    signal_delays: list[float]
    run_id: str | None = None  # set once the start is acknowledged
    sent: list[str] = field(default_factory=list)  # signal request ids sent, acknowledged or not
    acked: int = 0
    acked_sum: int = 0
    refused: str | None = None  # why a signal was refused, if one was
    cancel_delay: float | None = None  # when the harness asks it to cancel, if it does
    # what the cancel got: "acked" (recorded), "refused" (the run had closed, said to its
    # first attempt), "unsure" (refused to a retry, or never acknowledged)
    cancel: str | None = None


def make_plans(cfg: ChaosConfig) -> list[RunRecord]:
    """The workflows and their signal delays, from the seed alone."""
    rng = random.Random(cfg.seed)
    out = []
    for i in range(cfg.workflows):
        plan = Plan(
            i=i,
            fan=rng.choice([0, 0, 1, 2, 3]),
            sleep_ms=rng.choice([0, rng.randint(50, 1500)]),
            beats=rng.choice([0, rng.randint(5, 20)]),
            signals=rng.choice([0, 1, 2, 3, 5]),
            hops=rng.choice([0, 0, 0, 1, 2]),
        )
        delays = [rng.uniform(0.0, 1.5) for _ in range(plan.signals)]
        out.append(RunRecord(i, f"chaos-{cfg.seed}-{i}", plan, delays))
    # one run in ten is asked to cancel (drawn apart, so the plans stay what a seed made)
    cancels = random.Random(cfg.seed + 3)
    for rec in out:
        if cancels.random() < CANCEL_SHARE:
            rec.cancel_delay = cancels.uniform(0.1, 3.0)
    # and children too (drawn apart likewise)
    kids = random.Random(cfg.seed + 5)
    for rec in out:
        rec.plan.children = kids.choice([0, 0, 0, 1, 2])
    return out


# -- retries and the gate that pauses client writes ---------------------------------------
def raise_if_cancelling() -> None:
    """Call where a transient error is swallowed: redis-py may turn a cancellation into a
    connection error, and a loop that ignored it would never end."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


@contextlib.contextmanager
def transient_ignored() -> Iterator[None]:
    try:
        yield
    except TRANSIENT:
        raise_if_cancelling()


async def retrying(op: Callable[[], Awaitable[T]], budget: float = 120.0) -> T:
    """Run ``op`` until it stops failing with a transient error (Redis is restarting)."""
    deadline = time.monotonic() + budget
    delay = 0.1
    while True:
        try:
            return await op()
        except TRANSIENT:
            raise_if_cancelling()
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)


def inspector(url: str) -> aioredis.Redis:
    """A plain client for reading keys; reconnects on its own after a Redis restart."""
    retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=3)
    return aioredis.Redis.from_url(url, retry=retry, retry_on_error=[RedisConnectionError, RedisTimeoutError])


class Gate:
    """Lets starts and signals through unless paused. Pausing returns once every write in
    flight is acknowledged, so the AOF then holds all that clients were told."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._inflight = 0

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[None]:
        await self._open.wait()
        self._inflight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def pause(self) -> None:
        self._open.clear()
        await self._idle.wait()

    def resume(self) -> None:
        self._open.set()


async def start_run(client: Client, rec: RunRecord) -> None:
    """Start ``rec`` until acknowledged. A retry first looks for the run an earlier
    attempt may have created, so an execution is never started twice."""
    attempt = 0

    async def op() -> str:
        nonlocal attempt
        attempt += 1
        if attempt > 1:
            with contextlib.suppress(WorkflowNotFoundError):
                return str((await client.get_workflow_handle(rec.execution_id).describe()).run_id)
        try:
            handle = await client.start_workflow(ChaosMix, rec.plan, execution_id=rec.execution_id)
        except WorkflowAlreadyStartedError as e:
            return str(e.run_id)
        return str(handle.run_id)

    rec.run_id = await retrying(op)


async def send_cancel(client: Client, rec: RunRecord, gate: Gate) -> None:
    """Ask ``rec``'s execution to cancel after its delay, retried until answered."""
    assert rec.cancel_delay is not None
    await asyncio.sleep(rec.cancel_delay)
    handle = client.get_workflow_handle(rec.execution_id)  # its current run: chains go on
    attempts = 0

    async def op() -> None:
        nonlocal attempts
        attempts += 1
        await handle.cancel("chaos")

    async with gate.write():
        try:
            await retrying(op)
            rec.cancel = "acked"
        except RillflowError as e:  # not running: it closed first (or an earlier attempt landed)
            rec.cancel = "refused" if attempts == 1 and "not running" in str(e) else "unsure"
        except TRANSIENT:
            rec.cancel = "unsure"


async def send_signals(client: Client, rec: RunRecord, gate: Gate) -> None:
    """Send ``rec``'s signals after their delays, each with its own request id, each
    retried with that id until acknowledged."""
    assert rec.run_id is not None
    handle = client.get_workflow_handle(rec.execution_id)  # its current run: chains go on
    for j, delay in enumerate(rec.signal_delays):
        await asyncio.sleep(delay)
        rid = f"{rec.execution_id}-sig-{j}"
        k = j + 1
        async with gate.write():
            rec.sent.append(rid)
            try:
                await retrying(lambda rid=rid, k=k: handle.signal(SIGNAL_NAME, k, request_id=rid))  # type: ignore[misc]
            except WorkflowNotFoundError as e:
                rec.refused = str(e)
                return
            except TRANSIENT as e:
                rec.refused = f"never acknowledged: {e}"
                return
        rec.acked += 1
        rec.acked_sum += k


# -- worker processes ---------------------------------------------------------------------
@dataclass
class WorkerProc:
    identity: str
    proc: subprocess.Popen[bytes]
    log: Path
    ready: bool = False  # its liveness record was seen: it serves


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """PR_SET_PDEATHSIG: a worker never outlives a harness that was itself killed."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)


class WorkerPool:
    """``size`` ``rillflow worker`` processes, each killed one replaced at once."""

    def __init__(self, url: str, tally_url: str, log_dir: Path, size: int, log: Log) -> None:
        self.url = url
        path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)
        self.env = {**os.environ, TALLY_ENV: tally_url, "PYTHONPATH": path}
        self.log_dir = log_dir
        self.size = size
        self.say = log
        self.live: list[WorkerProc] = []
        self.serial = 0
        self.kills = 0
        self.exits: list[str] = []  # workers that exited without being killed, with why

    def spawn(self) -> WorkerProc:
        self.serial += 1
        identity = f"chaos-w{self.serial:03d}"
        log = self.log_dir / f"{identity}.log"
        args = [
            sys.executable,
            "-m",
            "rillflow.cli",
            "worker",
            "load_tests.chaos_flows",
            "--url",
            self.url,
            "--namespace",
            NAMESPACE,
            "--identity",
            identity,
            "--grace",
            "1",
            "--log-level",
            "warning",
        ]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                args,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        w = WorkerProc(identity, proc, log)
        self.live.append(w)
        return w

    def fill(self) -> None:
        while len(self.live) < self.size:
            self.spawn()

    def kill(self, w: WorkerProc) -> None:
        w.proc.send_signal(signal.SIGKILL)
        w.proc.wait()
        self.live.remove(w)
        self.kills += 1
        self.fill()

    def reap(self) -> None:
        """Replace workers that exited by themselves, noting why."""
        for w in [w for w in self.live if w.proc.poll() is not None]:
            tail = w.log.read_text(errors="replace").strip().splitlines()[-3:]
            why = f"{w.identity} exited with {w.proc.returncode}: {' | '.join(tail)[-400:]}"
            self.exits.append(why)
            self.say(f"  worker exit (not a kill): {why}")
            self.live.remove(w)
        self.fill()

    async def watch_ready(self, db: aioredis.Redis, keys: Keys) -> None:
        """Mark workers ready once their liveness record exists (they serve from then on)."""
        while True:
            for w in [w for w in self.live if not w.ready]:
                with transient_ignored():
                    w.ready = bool(await db.exists(keys.worker(w.identity)))
            self.reap()
            await asyncio.sleep(0.1)

    async def wait_all_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not all(w.ready for w in self.live):
            if time.monotonic() > deadline:
                late = [w.identity for w in self.live if not w.ready]
                raise RuntimeError(f"workers {late} did not register within {timeout} s")
            await asyncio.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM (they drain within --grace 1), then SIGKILL what is left."""
        for w in self.live:
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(signal.SIGTERM)
        for w in self.live:
            try:
                w.proc.wait(15)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()

    @property
    def identities(self) -> set[str]:
        return {w.identity for w in self.live}

    def logged_errors(self) -> Counter[str]:
        """Error lines in every worker's log, by message: what the figures may not show."""
        found: Counter[str] = Counter()
        for log in self.log_dir.glob("*.log"):
            for line in log.read_text(errors="replace").splitlines():
                if m := ERROR_LINE.search(line):
                    found[m.group(1).strip()] += 1
        return found


# structlog's console lines: "<time> [error    ] <message>   key=value ..."
ERROR_LINE = re.compile(r"\[(?:error|critical)\s*\]\s+(.*?)(?:\s{2,}|\s+\w+=|$)")


# -- the AOF tail cut ------------------------------------------------------------------
def growing_aof(server: EmbeddedRedis, dirname: str, filename: str) -> Path:
    """The AOF file writes go to now: the last incr file of Redis 7's multi-part AOF (in
    its manifest), or the single file of older servers."""
    mp = server.data_dir / dirname
    manifest = mp / f"{filename}.manifest"
    if manifest.exists():
        incr = [
            line.split()[1]
            for line in manifest.read_text().splitlines()
            if line.startswith("file ") and line.split()[-1] == "i"
        ]
        if incr:
            return Path(mp, incr[-1])
    return Path(server.data_dir, filename)


@dataclass
class Rollback:
    noted: int  # AOF size once every start and signal was acknowledged
    killed_at: int  # its size when Redis was killed
    cut_to: int
    window: float  # seconds the workers wrote past the noted size
    server_said: str

    def describe(self) -> str:
        return (
            f"cut {self.killed_at - self.cut_to} of the {self.killed_at - self.noted} bytes workers wrote "
            f"in the last {self.window:.1f} s (AOF {self.killed_at} -> {self.cut_to} bytes); {self.server_said}"
        )


# -- the run ------------------------------------------------------------------------------
@dataclass
class Leftover:
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, example: str, n: int = 1) -> None:
        self.count += n
        if len(self.examples) < 3:
            self.examples.append(example)


@dataclass
class ChaosReport:
    seed: int
    config: ChaosConfig
    started: int = 0
    not_started: int = 0
    signals_sent: int = 0
    signals_acked: int = 0
    signals_refused: list[str] = field(default_factory=list)
    signals_refused_cancelled: int = 0  # refused by runs asked to cancel: expected
    cancels_sent: int = 0
    cancels_acked: int = 0
    canceled: int = 0  # runs that ended canceled
    children: int = 0  # child workflows the runs started (each checked: once, and told once)
    scheduled: int = 0  # runs of the every-second schedule (each due time: one run)
    lost: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)  # the check itself failed: not a pass
    stuck: list[str] = field(default_factory=list)
    dup_completions: list[str] = field(default_factory=list)
    dup_signals: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    activities: int = 0  # distinct activities executed
    executions: int = 0
    uncounted: list[str] = field(default_factory=list)  # completed activities the tally never saw
    worker_kills: int = 0
    worker_exits: list[str] = field(default_factory=list)
    worker_errors: Counter[str] = field(default_factory=Counter)  # error lines in worker logs
    redis_kills: int = 0
    rollback: Rollback | None = None
    leftovers: dict[str, Leftover] = field(default_factory=dict)
    scanned: str = ""  # when the leftovers were scanned, relative to the last kills
    chaos_s: float = 0.0
    settle_s: float = 0.0
    elapsed_s: float = 0.0

    @property
    def re_executions(self) -> int:
        return self.executions - self.activities

    @property
    def ok(self) -> bool:
        return not (
            self.lost
            or self.stuck
            or self.dup_completions
            or self.dup_signals
            or self.wrong
            or self.unchecked
        )

    def lines(self) -> list[str]:
        def fig(name: str, value: object, note: str = "") -> str:
            return f"{name:<54}{value!s:>7}{'   ' + note if note else ''}"

        out = [
            fig("workflows started (acknowledged)", self.started, f"of {self.config.workflows}"),
            fig(
                "signals acknowledged",
                self.signals_acked,
                f"of {self.signals_sent} sent"
                + (f"; {len(self.signals_refused)} runs had one refused" if self.signals_refused else "")
                + (
                    f"; {self.signals_refused_cancelled} runs asked to cancel refused one"
                    if self.signals_refused_cancelled
                    else ""
                ),
            ),
            fig(
                "cancel requests acknowledged",
                self.cancels_acked,
                f"of {self.cancels_sent} sent; {self.canceled} runs ended canceled",
            ),
            fig("child workflows started", self.children, "each started once, its parent told once"),
            fig("scheduled runs (a schedule due every second)", self.scheduled, "each due time run once"),
            fig("lost runs", len(self.lost)),
            fig(
                "stuck runs",
                len(self.stuck),
                f"still running after the wait ({self.settle_s:.0f} s of at most {self.config.settle:.0f} s)",
            ),
            fig("duplicated completions", len(self.dup_completions)),
            fig("duplicated signal applications", len(self.dup_signals)),
            fig("wrong results", len(self.wrong)),
            fig("runs the check could not read", len(self.unchecked), "(0, or the run fails)"),
            fig(
                "activity re-executions",
                self.re_executions,
                f"{self.executions} executions of {self.activities} activities (expected under kills)",
            ),
            fig("completed activities not counted", len(self.uncounted), "(a check of the tally: 0)"),
            fig("worker kills", self.worker_kills),
            fig("worker exits (not killed)", len(self.worker_exits)),
            fig(
                "worker log errors",
                sum(self.worker_errors.values()),
                "; ".join(f"{n} x {msg}" for msg, n in self.worker_errors.most_common(3)),
            ),
            fig(
                "redis kills",
                self.redis_kills,
                "+ 1 for the AOF tail cut" if self.rollback else "(no AOF tail cut)",
            ),
        ]
        if self.rollback:
            out.append(fig("aof tail cut", 1, self.rollback.describe()))
        if self.leftovers:
            out.append(f"keys left over, scanned {self.scanned}:")
        for kind, left in self.leftovers.items():
            note = ", ".join(left.examples) if left.count else ""
            out.append(fig(f"keys left over: {kind}", left.count, note[:300]))
        out.append(
            fig(
                "time",
                f"{self.elapsed_s:.0f} s",
                f"chaos {self.chaos_s:.0f} s, settle {self.settle_s:.0f} s, seed {self.seed}",
            )
        )
        for title, items in (
            ("LOST", self.lost),
            ("UNCHECKED", self.unchecked),
            ("STUCK", self.stuck),
            ("DUPLICATED COMPLETION", self.dup_completions),
            ("DUPLICATED SIGNAL", self.dup_signals),
            ("WRONG RESULT", self.wrong),
            ("NOT COUNTED", self.uncounted[:20]),
            ("SIGNAL REFUSED", self.signals_refused[:20]),
            ("WORKER EXIT", self.worker_exits[:20]),
        ):
            out += [f"{title}: {item}" for item in items]
        return out


class ChaosRun:
    def __init__(self, cfg: ChaosConfig, log: Log = say) -> None:
        self.cfg = cfg
        self.say = log
        self.rng = random.Random(cfg.seed + 1)  # the chaos schedule; the plans use cfg.seed
        self.victims = random.Random(cfg.seed + 2)  # which ready worker a kill hits
        self.records = make_plans(cfg)
        self.report = ChaosReport(cfg.seed, cfg)
        self.gate = Gate()
        self.keys = Keys(cfg.shards)
        self.senders: list[asyncio.Task[None]] = []
        self.t0 = self.last_kill = self.last_restart = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def run(self) -> ChaosReport:
        cfg = self.cfg
        own_dir = cfg.data_dir is None
        base = Path(tempfile.mkdtemp(prefix="rillflow-chaos-")) if cfg.data_dir is None else cfg.data_dir
        (base / "logs").mkdir(parents=True, exist_ok=True)
        self.server = EmbeddedRedis(base / "redis", appendonly=True, appendfsync="always").start()
        tally = EmbeddedRedis(base / "tally").start()
        self.say(
            f"chaos: seed {cfg.seed}, {cfg.workflows} workflows, {cfg.workers} workers, "
            f"{cfg.kills} worker kills, {cfg.redis_kills} redis kills, "
            f"AOF tail cut {'on' if cfg.rollback else 'off'}, {cfg.duration:.0f} s of chaos; "
            f"redis {self.server.url} (AOF, appendfsync always), data in {base}"
        )
        pool: WorkerPool | None = None
        client: Client | None = None
        tasks: list[asyncio.Task[Any]] = []
        try:
            client = await Client.connect(
                self.server.url,
                NAMESPACE,
                shards=cfg.shards,
                workflow_task_timeout=timedelta(seconds=cfg.workflow_task_timeout),
            )
            self.tally = aioredis.Redis.from_url(tally.url)
            self.db = inspector(self.server.url)
            aof_cfg = await self.db.config_get("append*")
            self.aof_dir = text(aof_cfg.get("appenddirname") or "appendonlydir")
            self.aof_name = text(aof_cfg.get("appendfilename") or "appendonly.aof")
            pool = WorkerPool(self.server.url, tally.url, base / "logs", cfg.workers, self.say)
            pool.fill()
            tasks.append(asyncio.create_task(pool.watch_ready(self.db, self.keys)))
            await pool.wait_all_ready(60)
            self.say(f"[{self.now():5.1f}s] {cfg.workers} workers registered; load and chaos start")
            t_chaos = time.monotonic()
            load = asyncio.create_task(self.load(client))
            tasks.append(load)
            tasks.append(asyncio.create_task(self.progress(client, pool)))
            tick = await retrying(lambda: self.create_schedule(client))
            await self.chaos(pool)
            await load
            await asyncio.gather(*self.senders)
            await retrying(lambda: tick.pause("the chaos is over"))
            self.report.chaos_s = time.monotonic() - t_chaos
            self.say(
                f"[{self.now():5.1f}s] chaos over; waiting up to {cfg.settle:.0f} s for the runs to close"
            )
            t_settle = time.monotonic()
            still_open = await self.settle(client, cfg.settle)
            self.report.settle_s = time.monotonic() - t_settle
            self.say(f"[{self.now():5.1f}s] {still_open} runs still open; checking every run")
            open_runs = await self.check(client)
            open_runs |= await self.check_schedule(client)
            now = time.monotonic()
            self.report.scanned = (
                f"{now - self.last_kill:.0f} s after the last worker kill, "
                f"{now - self.last_restart:.0f} s after the last Redis restart"
            )
            self.report.leftovers = await scan_leftovers(self.db, self.keys, pool.identities, open_runs)
            self.report.worker_kills = pool.kills
            self.report.worker_exits = pool.exits
        finally:
            for t in tasks + self.senders:
                t.cancel()
            await asyncio.gather(*tasks, *self.senders, return_exceptions=True)
            if pool is not None:
                await asyncio.to_thread(pool.stop)
                self.report.worker_errors = pool.logged_errors()
            if client is not None:
                await client.close()
            for db in (getattr(self, "tally", None), getattr(self, "db", None)):
                if db is not None:
                    await db.aclose()
            self.server.cleanup()
            tally.cleanup()
            if own_dir:
                shutil.rmtree(base, ignore_errors=True)
        self.report.elapsed_s = self.now()
        return self.report

    # -- the schedule: due every second while the chaos lasts ------------------------
    async def create_schedule(self, client: Client) -> Any:
        schedule = ScheduleDefinition(
            input={"n": 1},
            intervals=[ScheduleInterval(every=timedelta(seconds=1))],
            policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.ALLOW_ALL),
        )
        try:
            return await client.create_schedule(ChaosTick, schedule, schedule_id=TICK_SCHEDULE)
        except RillflowError:  # (a retried create that had landed)
            return client.get_schedule_handle(TICK_SCHEDULE)

    async def check_schedule(self, client: Client) -> set[str]:
        """Each second from the schedule's creation to its cursor (the due times it acted
        on) has one run, completed with that due time; returns the runs still open."""
        rep = self.report
        h = client.get_schedule_handle(TICK_SCHEDULE)
        ks = client.keyspace
        fin = ks.schedules(ks.shard(TICK_SCHEDULE), "fin")
        deadline = time.monotonic() + 15  # (its last runs' closes wake it: a look takes a round or two)
        while time.monotonic() < deadline and await retrying(lambda: self.db.hexists(fin, TICK_SCHEDULE)):
            await asyncio.sleep(0.2)
        desc = await retrying(h.describe)
        cursor = int(
            await retrying(
                lambda: self.db.hget(ks.schedule(ks.shard(TICK_SCHEDULE), TICK_SCHEDULE), "cursor")
            )
        )
        assert desc.created_at is not None
        first = int(desc.created_at.timestamp()) + 1
        expected = {
            execution_id(TICK_SCHEDULE, at_ms(t * 1000)): at_ms(t * 1000)
            for t in range(first, cursor // 1000 + 1)
        }
        seen: Counter[str] = Counter()
        open_runs: set[str] = set()
        token = None
        while True:
            page = await retrying(
                lambda token=token: client.list_workflows(  # type: ignore[misc]
                    schedule_id=TICK_SCHEDULE, page_size=1000, next_page_token=token
                )
            )
            for e in page.executions:
                seen[e.execution_id] += 1
                if e.status == "running":
                    open_runs.add(e.run_id)
                    rep.stuck.append(f"{e.execution_id} (scheduled) run {e.run_id}: still running")
                elif e.status != "completed":
                    rep.wrong.append(f"{e.execution_id} (scheduled): {e.status}")
                elif e.execution_id in expected:
                    out = await retrying(client.get_workflow_handle(e.execution_id).result)
                    if out != expected[e.execution_id].isoformat():
                        rep.wrong.append(f"{e.execution_id} (scheduled): ran for {out}")
            token = page.next_page_token
            if token is None:
                break
        rep.scheduled = len(seen)
        rep.lost += [f"{wid} (scheduled): no run" for wid in expected if wid not in seen]
        rep.dup_completions += [f"{wid} (scheduled): {n} runs" for wid, n in seen.items() if n > 1]
        rep.wrong += [f"{wid} (scheduled): not a due time it acted on" for wid in seen if wid not in expected]
        if desc.times_skipped:
            rep.wrong.append(f"{TICK_SCHEDULE}: {desc.times_skipped} due times skipped: {desc.skipped[:3]}")
        return open_runs

    # -- load: starts and signals ------------------------------------------------------
    async def load(self, client: Client) -> None:
        """Start the workflows evenly over the first 80% of the chaos phase."""
        window = 0.8 * self.cfg.duration
        t0 = time.monotonic()
        for rec in self.records:
            delay = t0 + window * rec.index / max(1, len(self.records)) - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            async with self.gate.write():
                try:
                    await start_run(client, rec)
                except TRANSIENT as e:
                    self.say(f"  start of {rec.execution_id} never acknowledged: {e}")
                    continue
            if rec.plan.signals:
                self.senders.append(asyncio.create_task(send_signals(client, rec, self.gate)))
            if rec.cancel_delay is not None:
                self.senders.append(asyncio.create_task(send_cancel(client, rec, self.gate)))

    async def progress(self, client: Client, pool: WorkerPool) -> None:
        while True:
            await asyncio.sleep(self.cfg.progress_every)
            closed = "?"
            with transient_ignored():
                closed = str(sum([await self.db.xlen(self.keys.closed(s)) for s in range(self.cfg.shards)]))
            started = sum(r.run_id is not None for r in self.records)
            self.say(
                f"[{self.now():5.1f}s] started {started}, closed {closed}, worker kills {pool.kills}, "
                f"redis kills {self.report.redis_kills}"
            )

    # -- chaos -------------------------------------------------------------------------
    async def chaos(self, pool: WorkerPool) -> None:
        """Worker kills, Redis kills and the AOF tail cut, one at a time, on a schedule
        drawn from the seed; ends once every scheduled kill has happened."""
        d, n = self.cfg.duration, self.cfg.redis_kills
        # (when, what, a parameter): seconds Redis stays down; for the cut, (window, fraction)
        events: list[tuple[float, str, Any]] = [
            (self.rng.uniform(1.0, d), "kill", None) for _ in range(self.cfg.kills)
        ]
        for k in range(n):  # one in each of n slices, in its first 60%: clear of each other
            lo, hi = 0.1 + 0.8 * k / n, 0.1 + 0.8 * (k + 1) / n
            # the last outage outlasts the few seconds a client retries a call: calls fail
            down = self.rng.uniform(6.0, 9.0) if k == n - 1 else self.rng.uniform(0.2, 1.5)
            events.append((d * self.rng.uniform(lo, lo + 0.6 * (hi - lo)), "redis", down))
        if self.cfg.rollback:
            cut = (self.rng.uniform(1.0, 2.0), self.rng.random())
            events.append((d * self.rng.uniform(0.4, 0.6), "rollback", cut))
        events.sort(key=lambda e: e[0])
        t0 = time.monotonic()
        for at, what, arg in events:
            delay = t0 + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if what == "kill":
                await self.kill_worker(pool)
            elif what == "redis":
                await self.kill_redis(arg)
            else:
                await self.cut_aof_tail(*arg)

    async def kill_worker(self, pool: WorkerPool) -> None:
        deadline = time.monotonic() + 30
        while not (ready := [w for w in pool.live if w.ready and w.proc.poll() is None]):
            if time.monotonic() > deadline:
                self.say("  no registered worker to kill for 30 s; skipping a kill")
                return
            await asyncio.sleep(0.05)
        pool.kill(self.victims.choice(ready))
        self.last_kill = time.monotonic()

    async def restart_redis(self) -> None:
        """Start Redis again over its data dir, and wait until it has loaded the AOF (it
        answers PING while loading)."""
        for attempt in range(5):
            try:
                await asyncio.to_thread(self.server.start, 30.0)
                break
            except Exception as e:
                self.say(f"  redis restart failed ({e}); retrying")
                await asyncio.sleep(0.5 * (attempt + 1))
        else:
            raise RuntimeError("redis did not come back")
        deadline = time.monotonic() + 120
        while True:
            with transient_ignored():
                if text((await self.db.info("persistence")).get("loading")) == "0":
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("redis did not finish loading its AOF in 120 s")
            await asyncio.sleep(0.05)
        self.last_restart = time.monotonic()

    async def kill_redis(self, down: float) -> None:
        self.server.crash()
        self.report.redis_kills += 1
        await asyncio.sleep(down)
        await self.restart_redis()
        self.say(f"[{self.now():5.1f}s] redis SIGKILLed, restarted after {down:.1f} s")

    async def cut_aof_tail(self, window: float, fraction: float) -> None:
        """Roll Redis back to a point in what workers wrote during ``window`` s after every
        start and signal was acknowledged (``fraction`` of the way): the crash that
        ``appendfsync everysec`` allows, losing worker transitions only."""
        got = await retrying(lambda: self.db.config_get("aof-load-truncated"))
        loads_truncated = text(got.get("aof-load-truncated"))
        await self.gate.pause()
        try:
            await asyncio.sleep(1.5)
            aof = growing_aof(self.server, self.aof_dir, self.aof_name)
            noted = aof.stat().st_size
            await asyncio.sleep(window)
            log_from = self.server.log_path.stat().st_size
            self.server.crash()
            now_aof = growing_aof(self.server, self.aof_dir, self.aof_name)
            if now_aof != aof:  # a rewrite began meanwhile: all of the new incr file is newer
                noted = 0
            size = now_aof.stat().st_size
            cut = noted + round(fraction * (size - noted))
            os.truncate(now_aof, cut)
            await self.restart_redis()
            said = self.server.log_path.read_bytes()[log_from:].decode(errors="replace")
            m = re.search(r"Truncating the AOF \S+ at offset (\d+)", said)
            if "loaded anyway because aof-load-truncated is enabled" in said and m:
                told = f"the server truncated it at offset {m.group(1)}"
                if "Revert incomplete MULTI/EXEC" in said:
                    told += ", reverting a partly cut script's transaction,"
                told += " and loaded it"
            elif "DB loaded from append only file" in said:
                told = "the server loaded it with no truncation (the cut fell between commands)"
            else:
                told = f"the server log does not say how it loaded it (see {self.server.log_path})"
            told += f" (aof-load-truncated {loads_truncated})"
            self.report.rollback = Rollback(noted, size, cut, window, told)
            self.say(f"[{self.now():5.1f}s] AOF tail cut: {self.report.rollback.describe()}")
        finally:
            self.gate.resume()

    # -- the end: wait, then check every run --------------------------------------------
    async def settle(self, client: Client, timeout: float) -> int:
        """Wait until every started run has closed (or vanished), at most ``timeout`` s."""
        waiting = {r.execution_id: r for r in self.records if r.run_id}
        deadline = time.monotonic() + timeout
        sem = asyncio.Semaphore(64)

        async def closed(rec: RunRecord) -> bool:
            async with sem:
                h = client.get_workflow_handle(rec.execution_id)  # its latest run: chains go on
                try:
                    desc = await retrying(h.describe)
                    return desc.status not in ("running", "continued_as_new")
                except WorkflowNotFoundError:
                    return True  # vanished: the check counts it as lost

        while waiting and time.monotonic() < deadline:
            done = await asyncio.gather(*(closed(r) for r in waiting.values()))
            for rec, d in zip(list(waiting.values()), done, strict=True):
                if d:
                    del waiting[rec.execution_id]
            if waiting:
                await asyncio.sleep(1.0)
        return len(waiting)

    async def check(self, client: Client) -> set[str]:
        """Every figure, from what Redis holds now; returns the run ids still open."""
        rep = self.report
        closes: Counter[str] = Counter()
        for s in range(self.cfg.shards):
            entries: Any = await retrying(lambda s=s: self.db.xrange(self.keys.closed(s)))  # type: ignore[misc]
            for _, f in entries:
                closes[text(f[b"run"])] += 1
        tally = await read_tally(self.tally)
        executed: dict[str, dict[tuple[str, int], int]] = defaultdict(dict)
        for (wid, name, n), count in tally.items():
            executed[wid][(name, n)] = count
        rep.activities = len(tally)
        rep.executions = sum(tally.values())
        open_runs: set[str] = set()
        sem = asyncio.Semaphore(32)

        async def one(rec: RunRecord) -> None:
            rep.signals_sent += len(rec.sent)
            rep.signals_acked += rec.acked
            rep.cancels_sent += rec.cancel is not None
            rep.cancels_acked += rec.cancel == "acked"
            if rec.refused and rec.cancel is None:  # (one asked to cancel may close before)
                rep.signals_refused.append(f"{rec.execution_id}: {rec.refused}")
            elif rec.refused:
                rep.signals_refused_cancelled += 1
            if rec.run_id is None:
                rep.not_started += 1
                return
            rep.started += 1
            async with sem:
                try:
                    await self.check_run(client, rec, closes, executed.get(rec.execution_id, {}), open_runs)
                except Exception as e:  # never a silent pass: the run counts as unchecked
                    rep.unchecked.append(f"{rec.execution_id} run {rec.run_id}: {type(e).__name__}: {e}")

        await asyncio.gather(*(one(r) for r in self.records))
        return open_runs

    async def check_run(
        self,
        client: Client,
        rec: RunRecord,
        closes: Counter[str],
        executed: dict[tuple[str, int], int],
        open_runs: set[str],
    ) -> None:
        rep = self.report
        wid, run = rec.execution_id, rec.run_id
        assert run is not None
        # a retried start may have found the execution a run or two down its chain
        while True:
            try:
                first = await retrying(client.get_workflow_handle(wid, run_id=run).history)
            except WorkflowNotFoundError:
                break  # (counted as lost below)
            before = first[0].attributes.get("continued_from")
            if not before:
                break
            run = str(before)
        # follow the chain of continue-as-new: what the harness checks is the execution
        pokes: list[int] = []
        scheduled: list[tuple[str, int]] = []
        runs: list[str] = []
        while True:
            runs.append(run)
            h = client.get_workflow_handle(wid, run_id=run)
            try:
                desc = await retrying(h.describe)
            except WorkflowNotFoundError:
                rep.lost.append(f"{wid} run {run}: acknowledged or continued into, but Redis has no such run")
                return
            try:
                events = await retrying(h.history)
            except WorkflowNotFoundError:
                events = []
            if not events or events[0].type != "WorkflowExecutionStarted":
                rep.lost.append(
                    f"{wid} run {run}: status {desc.status}, but its history is missing or starts late"
                )
                return
            ending = [e for e in events if e.type in CLOSING]
            if len(ending) > 1 or closes[run] > 1:
                rep.dup_completions.append(
                    f"{wid} run {run}: closing events {[(e.event_id, e.type) for e in ending]}, "
                    f"{closes[run]} entries in the closed stream"
                )
            # each signal of an execution carries its own payload (1, 2, ...): a repeat is a
            # double delivery, within one run or carried into the next
            pokes += [signal_payload(e) for e in events if e.type == "WorkflowExecutionSignaled"]
            # an activity cancelled with its run (asked to cancel) may never have started
            dropped = {e.attributes.get("seq") for e in events if e.type == "ActivityTaskCancelRequested"}
            scheduled += [
                (str(e.attributes.get("name")), int(e.attributes.get("input", {}).get("n", -1)))
                for e in events
                if e.type == "ActivityTaskScheduled" and e.attributes.get("seq") not in dropped
            ]
            cleanups = [
                e
                for e in events
                if e.type == "ActivityTaskScheduled"
                and int(e.attributes.get("input", {}).get("n", -1)) % HOP_STRIDE == CLEANUP_N
            ]
            await self.check_children(client, wid, run, desc.status, events)
            if desc.status != "continued_as_new":
                break
            run = str(ending[-1].attributes["next_run_id"])
            if run in runs:
                rep.wrong.append(f"{wid}: the chain {runs} continues into {run} again")
                return
        if len(runs) != rec.plan.hops + 1 and desc.status == "completed":
            rep.wrong.append(
                f"{wid}: completed after {len(runs)} runs {runs}, the plan has {rec.plan.hops + 1}"
            )
        signaled = len(pokes)
        doubled = [f"payload {k} x{c}" for k, c in Counter(pokes).items() if c > 1]
        if desc.status == "running":
            open_runs.add(run)
            names = ["wft", "wft_q", "sticky", "wft_seq"]
            fields = await retrying(lambda: self.db.hmget(self.keys.run(self.keys.shard(wid), run), names))
            wft = " ".join(
                f"{k}={text(v) if v else ''}"
                for k, v in zip(("wft", "wft_q", "sticky", "fence"), fields, strict=True)
            )
            pending = ", ".join(
                f"{p.name}#{p.seq} {p.state} att {p.attempt}" for p in desc.pending_activities
            )
            rep.stuck.append(
                f"{wid} run {run} ({plan_text(rec.plan)}; run {len(runs)} of the chain): {wft}; "
                f"pending [{pending}]; {signaled} signals in history, {rec.acked} acknowledged; "
                f"wft failures {desc.workflow_task_failures}; last events: {last_events(events)}"
            )
        result: dict[str, int] = {}
        canceled = desc.status == "canceled"
        if canceled:
            rep.canceled += 1
            if rec.cancel not in ("acked", "unsure"):
                rep.wrong.append(
                    f"{wid} run {run}: canceled, but its cancel was {rec.cancel or 'never sent'}"
                )
            elif len(cleanups) != 1:
                rep.wrong.append(f"{wid} run {run}: canceled with {len(cleanups)} clean-up activities, not 1")
        elif desc.status == "completed" and rec.cancel == "acked":
            rep.wrong.append(f"{wid} run {run}: completed, though a cancel request was acknowledged")
        if desc.status != "running" and not canceled:
            try:
                result = await retrying(lambda: h.result(timeout=10))
            except WorkflowFailureError as e:
                rep.wrong.append(f"{wid} run {run}: {desc.status}: {e}; last events: {last_events(events)}")
        applied, applied_sum = result.get("signals", 0), result.get("signal_sum", 0)
        if signaled > len(rec.sent) or doubled or applied > signaled or applied_sum > sum(pokes):
            rep.dup_signals.append(
                f"{wid} run {run}: {signaled} WorkflowExecutionSignaled events ({', '.join(doubled) or 'none repeated'}) "
                f"for {len(rec.sent)} request ids sent; "
                + (f"the workflow applied {applied} summing to {applied_sum}" if result else "still running")
                + f"; signaled at {[e.event_id for e in events if e.type == 'WorkflowExecutionSignaled']}"
            )
        if canceled:
            rep.uncounted += [f"{wid} {key[0]} n={key[1]}" for key in scheduled if key not in executed]
        if not result:
            return
        want = expected_value(rec.plan)
        unapplied = applied < signaled or (applied == signaled and applied_sum != sum(pokes))
        if result.get("value") != want or unapplied:
            rep.wrong.append(
                f"{wid} run {run}: returned {result}, expected value {want} and the {signaled} signals "
                f"of its history (summing to {sum(pokes)}); {rec.acked} acknowledged"
            )
        planned = activity_count(rec.plan) * len(runs)
        if desc.status == "completed" and len(scheduled) != planned:
            rep.wrong.append(
                f"{wid} run {run}: {len(scheduled)} activities scheduled, the plan has {planned}"
            )
        for key in scheduled:
            if key not in executed:
                rep.uncounted.append(f"{wid} {key[0]} n={key[1]}")

    async def check_children(
        self, client: Client, wid: str, run: str, status: str, events: list[HistoryEvent]
    ) -> None:
        """Each child a run started was started once (its execution has the one run the
        parent named), and the parent heard of its start and its close at most once
        each, exactly once when the parent completed; a closed parent leaves no child
        running (the default policy terminates it)."""
        rep = self.report
        started = {
            int(e.attributes["seq"]): e for e in events if e.type == "StartChildWorkflowExecutionInitiated"
        }
        rep.children += len(started)
        heard = Counter(int(e.attributes["seq"]) for e in events if e.type == "ChildWorkflowExecutionStarted")
        ended = Counter(
            int(e.attributes["seq"])
            for e in events
            if e.type.startswith("ChildWorkflowExecution") and e.type != "ChildWorkflowExecutionStarted"
        )
        for seq, init in started.items():
            kid, kid_run = str(init.attributes["workflow_id"]), str(init.attributes["run_id"])
            if heard[seq] > 1 or ended[seq] > 1:
                rep.dup_completions.append(
                    f"{wid} run {run}: child {kid} reported started x{heard[seq]}, closed x{ended[seq]}"
                )
            if status == "completed" and (heard[seq], ended[seq]) != (1, 1):
                rep.wrong.append(
                    f"{wid} run {run}: completed, having heard child {kid} start x{heard[seq]}, close x{ended[seq]}"
                )
            try:
                desc = await retrying(client.get_workflow_handle(kid).describe)
            except WorkflowNotFoundError:
                if heard[seq]:
                    rep.lost.append(
                        f"{wid} run {run}: its child {kid} started, but Redis has no such execution"
                    )
                continue
            if desc.run_id != kid_run:
                rep.dup_completions.append(
                    f"{wid} run {run}: child {kid} has run {desc.run_id}, not {kid_run}"
                )
            if status != "running" and desc.status == "running":
                rep.stuck.append(f"{wid} run {run} ({status}): its child {kid} still runs")


def signal_payload(e: HistoryEvent) -> int:
    data = e.attributes.get("input")
    return int(data.get("k", -1) if isinstance(data, dict) else data if isinstance(data, int) else -1)


def plan_text(plan: Plan) -> str:
    return " ".join(f"{k}={v}" for k, v in plan.model_dump().items())


def last_events(events: list[HistoryEvent], n: int = 8) -> str:
    def brief(e: HistoryEvent) -> str:
        a = e.attributes
        extra = a.get("name") or a.get("worker") or ""
        return f"{e.event_id} {e.type}{'(' + str(extra) + ')' if extra else ''}"

    return ", ".join(brief(e) for e in events[-n:])


async def read_tally(r: aioredis.Redis) -> dict[tuple[str, str, int], int]:
    """Executions per activity: ``(execution id, activity name, n) -> count``."""
    keys = [k async for k in r.scan_iter(match=f"{TALLY_PREFIX}*", count=1000)]
    out: dict[tuple[str, str, int], int] = {}
    for i in range(0, len(keys), 1000):
        chunk = keys[i : i + 1000]
        for k, v in zip(chunk, await r.mget(chunk), strict=True):
            wid, name, n = text(k)[len(TALLY_PREFIX) :].rsplit(":", 2)
            out[(wid, name, int(n))] = int(v or 0)
    return out


# -- keys left over ---------------------------------------------------------------------
LEFTOVER_KINDS = (
    "buffers (buf:*) of closed runs",
    "query inboxes (inbox:*) of closed clients",
    "sticky streams of dead workers",
    "consumers of dead workers",
    "workers index members, record expired",
    "timers of closed runs",
    "task messages of closed runs",
    "pending entries of closed runs",
    "activity fields of closed runs",
    "closed-run keys without a TTL",
    "keys of runs that do not exist",
    "dead letters",
    "listing entries of runs that do not exist",
    "running-index entries of closed runs",
    "schedule entries of closed runs",
    "unknown keys",
)
SHARD_KEY = re.compile(r"^rf:\{" + NAMESPACE + r":(\d+)\}:(.*)$", re.S)
# docs/keyspace.md: an activity in flight has fields <seq>, <seq>:b, <seq>:hb, <seq>:f
IN_FLIGHT_FIELD = re.compile(r"^\d+(:(b|hb|f))?$")
NS_KINDS = ("registry:", "worker:", "janitor:")  # namespace keys of one name each: none grows
NS_KEY = re.compile(r"^rf:\{" + NAMESPACE + r"\}:(.*)$", re.S)


async def scan_leftovers(
    db: aioredis.Redis, keys: Keys, live: set[str], open_runs: set[str]
) -> dict[str, Leftover]:
    """Keys that should not exist once every run has closed, by kind. ``live`` are the
    workers still running; keys of runs still open are left out, since they may rightly
    hold buffers, timers and tasks."""
    out = {k: Leftover() for k in LEFTOVER_KINDS}
    found = [text(k) async for k in db.scan_iter(match=f"rf:{{{keys.ns}*", count=1000)]
    per_run: dict[str, list[str]] = defaultdict(list)  # run id -> its keys (run, h, act, buf, sig, upd)
    run_key: dict[str, str] = {}
    wf_keys: list[str] = []
    streams: list[str] = []
    indexes: list[tuple[str, str]] = []
    sched_open: list[str] = []
    for key in found:
        m = SHARD_KEY.match(key)
        if not m:
            n = NS_KEY.match(key)
            what = n.group(1) if n else key
            if what.startswith("inbox:"):  # the harness's clients are closed: nothing should be left
                out["query inboxes (inbox:*) of closed clients"].add(key)
            elif not (what in ("meta", "registry", "workers") or what.startswith(NS_KINDS)):
                out["unknown keys"].add(key)
            continue
        what = m.group(2)
        kind, _, rest = what.partition(":")
        if kind in ("run", "act", "buf", "upd", "h", "hc"):
            rid = rest.rsplit(":", 1)[-1]  # h:<execution id>:<run id>, hc: likewise
            per_run[rid].append(key)
            if kind == "run":
                run_key[rid] = key
        elif kind in ("wf", "wsig"):  # an execution's: they expire with its last run
            wf_keys.append(key)
        elif what == "outbox":  # applied entries are deleted: one left names its origin run
            streams.append(key)
        elif (kind == "q" and what.endswith(":dlq")) or what == "outbox:dlq":
            if dead := int(await db.xlen(key)):
                out["dead letters"].add(key, dead)
        elif kind == "q":
            streams.append(key)
            if "@" in what and what.rsplit("@", 1)[1] not in live:
                out["sticky streams of dead workers"].add(key)
        elif what in ("idx:start", "idx:open", "idx:exp"):
            indexes.append((key, what))
        elif kind == "schedule":  # a schedule's: its open executions must be open (below)
            if what.endswith(":open"):
                sched_open.append(key)
        elif what == "sched:fin":  # wake-ups of closed runs, handled by the schedule's next look
            for sid, wids in (await db.hgetall(key)).items():
                out["schedule entries of closed runs"].add(f"{key} {text(sid)}: {text(wids)}")
        elif what not in ("timers", "closed", "pump", "idx:sweep", "sched:due", "sched:lease"):
            out["unknown keys"].add(key)
    for rid, rkeys in per_run.items():
        if rid not in run_key:
            for k in rkeys:
                out["keys of runs that do not exist"].add(k)
    rids = list(run_key)
    statuses = await pipelined(db, [("hget", run_key[rid], "status") for rid in rids])
    closed = {rid for rid, st in zip(rids, statuses, strict=True) if text(st) != "running"} - open_runs
    currents = await pipelined(db, [("hget", k.replace(":wsig:", ":wf:", 1), "run") for k in wf_keys])
    owned = [(k, rid) for rid in closed for k in per_run[rid]]
    owned += [(k, text(rid)) for k, rid in zip(wf_keys, currents, strict=True) if text(rid) in closed]
    ttls = await pipelined(db, [("pttl", k) for k, _ in owned])
    for (k, _), ttl in zip(owned, ttls, strict=True):
        what = SHARD_KEY.match(k).group(2)  # type: ignore[union-attr]
        if what.startswith("buf:"):
            out["buffers (buf:*) of closed runs"].add(k)
        if what.startswith("act:"):  # fields of activities in flight; other records may stay
            in_flight = [f for f in map(text, await db.hkeys(k)) if IN_FLIGHT_FIELD.match(f)]
            if in_flight:
                out["activity fields of closed runs"].add(f"{k} {' '.join(in_flight[:4])}", len(in_flight))
        if ttl == -1:
            out["closed-run keys without a TTL"].add(k)
    for key, what in indexes:  # every listed run exists; the running index holds only running ones
        for member in map(text, await db.zrange(key, 0, -1)):
            if member not in run_key:
                out["listing entries of runs that do not exist"].add(f"{key} {member}")
            elif what == "idx:open" and member in closed:
                out["running-index entries of closed runs"].add(f"{key} {member}")
    for key in sched_open:
        prefix = key[: key.index(":schedule:") + 1]
        for wid in map(text, await db.smembers(key)):
            current = text(await db.hget(prefix + "wf:" + wid, "run"))
            if not current or current in closed:
                out["schedule entries of closed runs"].add(f"{key} {wid}")
    for s in range(keys.shards):
        for member in await db.zrange(keys.timers(s), 0, -1):
            parts = text(member).split("|")
            if len(parts) > 1 and parts[1] not in open_runs:
                out["timers of closed runs"].add(text(member))
    for stream in streams:
        entries: Any = await db.xrange(stream)
        for msgid, fields in entries:
            rid = text(fields.get(b"run"))
            if rid not in open_runs:
                out["task messages of closed runs"].add(f"{stream} {text(msgid)} run={rid}")
        try:
            consumers = await db.xinfo_consumers(stream, "rf")
            pending = await db.xpending_range(stream, "rf", min="-", max="+", count=100_000)
        except RedisError:
            continue  # no group on it
        dead_stream = "@" in stream and stream.rsplit("@", 1)[1] not in live
        for c in consumers:  # a dead worker's sticky stream is counted above, its consumer with it
            if text(c["name"]) not in live and not dead_stream:
                out["consumers of dead workers"].add(f"{stream} {text(c['name'])} ({c['pending']} pending)")
        for p in pending:
            msgid = text(p["message_id"])
            msg: Any = await db.xrange(stream, min=msgid, max=msgid)
            rid = text(msg[0][1].get(b"run")) if msg else ""
            if rid not in open_runs:
                out["pending entries of closed runs"].add(f"{stream} {msgid} by {text(p['consumer'])}")
    for member in await db.zrange(keys.workers, 0, -1):
        if not await db.exists(keys.worker(text(member))):
            out["workers index members, record expired"].add(text(member))
    return out


async def pipelined(db: aioredis.Redis, calls: list[tuple[Any, ...]], chunk: int = 1000) -> list[Any]:
    """Run ``(command, *args)`` calls in pipelines of ``chunk``; the replies in order."""
    out: list[Any] = []
    for i in range(0, len(calls), chunk):
        async with db.pipeline(transaction=False) as p:
            for name, *args in calls[i : i + chunk]:
                getattr(p, name)(*args)
            out += await p.execute()
    return out


# -- entry points -------------------------------------------------------------------------
async def run_chaos(cfg: ChaosConfig, log: Log = say) -> ChaosReport:
    return await ChaosRun(cfg, log).run()


def parse_args(argv: list[str] | None = None) -> ChaosConfig:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = ChaosConfig()
    ap.add_argument("--workflows", type=int, default=d.workflows)
    ap.add_argument("--workers", type=int, default=d.workers, help="worker processes alive at a time")
    ap.add_argument("--kills", type=int, default=d.kills, help="worker SIGKILLs")
    ap.add_argument("--redis-kills", type=int, default=d.redis_kills, help="Redis SIGKILLs and restarts")
    ap.add_argument("--seed", type=int, default=None, help="default: a random one, printed")
    ap.add_argument("--duration", type=float, default=d.duration, help="seconds of chaos")
    ap.add_argument("--settle", type=float, default=d.settle, help="seconds the runs get to close after it")
    ap.add_argument("--no-rollback", action="store_true", help="skip the AOF tail cut")
    ap.add_argument("--shards", type=int, default=d.shards)
    ap.add_argument("--data-dir", type=Path, default=None, help="keep the servers' data and worker logs here")
    a = ap.parse_args(argv)
    return ChaosConfig(
        workflows=a.workflows,
        workers=a.workers,
        kills=a.kills,
        redis_kills=a.redis_kills,
        seed=a.seed if a.seed is not None else d.seed,
        duration=a.duration,
        settle=a.settle,
        rollback=not a.no_rollback,
        shards=a.shards,
        data_dir=a.data_dir,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    # every script call (this process's and its workers') refuses a key its caller did not
    # declare: a fault path that misses a declaration shows as a failure, not a Cluster bug
    os.environ["RILLFLOW_CHECK_KEYS"] = "1"
    report = asyncio.run(run_chaos(cfg))
    for line in report.lines():
        say(line)
    say(f"chaos: {'PASS' if report.ok else 'FAIL'} (repeat with --seed {report.seed})")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
