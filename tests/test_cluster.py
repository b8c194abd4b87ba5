"""Every script runs unchanged on a real Redis Cluster.

The module starts three cluster-enabled servers of its own, forms a 3-master cluster with
redis-py alone (CLUSTER ADDSLOTS, SET-CONFIG-EPOCH, MEET) and drives whole runs through
``Protocol`` over ``redis.asyncio.cluster.RedisCluster``, on shards whose hash tags land on
different nodes, so that every script runs on every node.

One call must touch one slot. The keys a call declares (``KEYS``) are checked by the
client, which refuses to send a call whose keys span two slots; a key a script builds
itself (from the shard prefix in ``ARGV[1]``) that belongs to another node fails the
script when it reaches that key (the server checks every command a script runs). A key of another slot that the same node
owns is refused too, because every script starts with a ``#!lua`` shebang (without one
the server runs it in EVAL compatibility mode, which allows undeclared cross-slot keys). So after every call the test SCANs every node: each ``rf:`` key must sit on
the node that owns its slot, and each node must hold keys of only the shards the test
drives on it (one per node, every other shard left empty), which a write to another
shard's key, on any node, would break.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, ResponseError

from rillflow_runtime import outbox
from rillflow_runtime.codec import pack, text, unpack
from rillflow_runtime.embedded import EmbeddedRedis, EmbeddedServerError, free_port
from rillflow_runtime.keyspace import GROUP, Keyspace, shard_of
from rillflow_runtime.model import CommandKind, OutboxKind, Overlap, Reply
from rillflow_runtime.protocol import (
    ActDone,
    ActivityOutcome,
    ActivityRoute,
    ActStartItem,
    HeartbeatReply,
    Protocol,
    ResetPlan,
    RunReply,
    ScheduleFire,
    ScheduleRecord,
    TaskCompletion,
    WftFailure,
    WftStartItem,
)
from rillflow_runtime.scripts import NAMES, Scripts

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        bool(os.environ.get("RILLFLOW_TEST_REDIS_URL")),
        reason="RILLFLOW_TEST_REDIS_URL is set: the suite is pointed at an external server, "
        "and this module needs a 3-master cluster of servers it starts itself",
    ),
]

SLOT_BOUNDS = (0, 5461, 10923, 16384)  # node i owns slots [SLOT_BOUNDS[i], SLOT_BOUNDS[i + 1])
NAMESPACE, SHARDS = "ns", 16
TQ = "tq"
RETENTION_MS = 60_000
TIMER_MS = 300
TAG_RE = re.compile(rb"^rf:\{" + NAMESPACE.encode() + rb":(\d+)\}:")


def node_of_slot(slot: int) -> int:
    return next(i for i in range(3) if SLOT_BOUNDS[i] <= slot < SLOT_BOUNDS[i + 1])


def shard_slot(shard: int) -> int:
    return key_slot(Keyspace(NAMESPACE, SHARDS).timers(shard).encode())


# -- the cluster ------------------------------------------------------------------------


@dataclass
class Cluster:
    nodes: list[EmbeddedRedis]
    formed_in: float

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]


def _cluster_port(taken: set[int]) -> int:
    """A free port <= 55535 whose bus port (port + 10000) is free too."""
    for _ in range(100):
        port = free_port()
        if {port, port + 10000} & taken or port - 10000 in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return int(port)
    raise EmbeddedServerError("no free port pair for a cluster node")


def _start_node(tmp: pytest.TempPathFactory, taken: set[int]) -> EmbeddedRedis:
    """One cluster-enabled server; another port if the one picked was taken meanwhile."""
    last: Exception | None = None
    for _ in range(5):
        port = _cluster_port(taken)
        data_dir: Path = tmp.mktemp("cluster-node")
        node = EmbeddedRedis(
            data_dir,
            port=port,
            extra_args=[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(data_dir / "nodes.conf"),
                "--cluster-node-timeout",
                "15000",  # generous: a loaded machine must not mark a node as failing
            ],
        )
        try:
            node.start(timeout=30)
        except EmbeddedServerError as e:  # the port (or its bus port) was taken meanwhile
            last = e
            node.stop()
            continue
        assert node.proc is not None
        with redis.Redis(port=port) as r:  # the server answering is ours, not another's
            pid = r.info("server")["process_id"]
        if pid != node.proc.pid:
            node.stop()
            last = EmbeddedServerError(f"port {port} is answered by process {pid}")
            continue
        taken |= {port, port + 10000}
        return node
    raise EmbeddedServerError(f"could not start a cluster node: {last}")


def _command(r: redis.Redis, *args: Any) -> Any:
    return r.execute_command(*args)  # type: ignore[no-untyped-call]


def _cluster_info(r: redis.Redis) -> dict[str, str]:
    raw = _command(r, "CLUSTER", "INFO")
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    raw = raw.decode() if isinstance(raw, bytes) else str(raw)
    return dict(line.split(":", 1) for line in raw.split() if ":" in line)


def _form(nodes: list[EmbeddedRedis], timeout: float = 60.0) -> None:
    clients = [redis.Redis(port=n.port) for n in nodes]
    try:
        for i, c in enumerate(clients):
            _command(c, "CLUSTER", "ADDSLOTS", *range(SLOT_BOUNDS[i], SLOT_BOUNDS[i + 1]))
            _command(c, "CLUSTER", "SET-CONFIG-EPOCH", i + 1)
        for n in nodes[1:]:
            _command(clients[0], "CLUSTER", "MEET", "127.0.0.1", n.port)
        deadline = time.monotonic() + timeout
        while True:
            infos = [_cluster_info(c) for c in clients]
            if all(
                i.get("cluster_state") == "ok"
                and i.get("cluster_known_nodes") == "3"
                and i.get("cluster_slots_ok") == "16384"
                for i in infos
            ):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the cluster did not form within {timeout} s: {infos}")
            time.sleep(0.05)
    finally:
        for c in clients:
            c.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    t0 = time.monotonic()
    nodes: list[EmbeddedRedis] = []
    try:
        taken: set[int] = set()
        for _ in range(3):
            nodes.append(_start_node(tmp_path_factory, taken))
        _form(nodes)
        yield Cluster(nodes, time.monotonic() - t0)
    finally:
        for n in nodes:
            n.cleanup()


@dataclass
class Conn:
    """A cluster client, the protocol over it, and one plain client per node."""

    rc: RedisCluster
    nodes: list[Redis]
    ports: list[int]
    ks: Keyspace
    protocol: Protocol
    raw_call: Any  # the scripts' own call, without the test's checks
    driven: set[int] = field(default_factory=set)  # the shards whose keys may exist
    calls: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))


@pytest.fixture
async def conn(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Conn]:
    nodes = [Redis(port=p) for p in cluster.ports]
    for n in nodes:  # a clean keyspace and fresh counters for each test
        await n.flushall()
        await n.function_flush()
        await n.config_resetstat()
    rc = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", p) for p in cluster.ports])
    await rc.initialize()
    ks = Keyspace(NAMESPACE, SHARDS)
    protocol = Protocol(rc, ks)  # RedisCluster routes FCALL by its keys, and loads functions on every primary
    original = protocol.scripts.call
    c = Conn(rc, nodes, cluster.ports, ks, protocol, original)

    async def checked_call(name: str, keys: list[str], args: list[Any]) -> Any:
        """Every call: one slot declared, run on the node that owns it, keys left in place."""
        slots = {key_slot(k.encode()) for k in keys}
        assert len(slots) == 1, f"{name} declares keys of slots {slots}: {keys}"
        node = node_of_slot(slots.pop())
        assert port_of(rc, keys[0]) == c.ports[node]  # the client routes it there
        try:
            return await original(name, keys, args)
        finally:
            c.calls[node].append(name)
            await assert_placement(c)

    monkeypatch.setattr(protocol.scripts, "call", checked_call)
    try:
        yield c
    finally:
        await rc.aclose()
        for n in nodes:
            await n.aclose()


async def assert_placement(c: Conn) -> dict[int, set[int]]:
    """Each rf: key sits on the node that owns its slot; each node holds keys of only the
    shards that map to it, and of no shard the test does not drive. Returns the shards
    found on each node."""
    found: dict[int, set[int]] = {}
    for i, node in enumerate(c.nodes):
        shards: set[int] = set()
        async for key in node.scan_iter("rf:*", count=1000):
            slot = key_slot(key)
            if key == c.ks.registry.encode():  # (a namespace's key, of its own slot: workers register there)
                assert node_of_slot(slot) == i
                continue
            m = TAG_RE.match(key)
            assert m, f"{key!r} on node {i} carries no shard hash tag"
            assert node_of_slot(slot) == i, f"{key!r} (slot {slot}) is on node {i}"
            shards.add(int(m.group(1)))
        assert all(node_of_slot(shard_slot(s)) == i for s in shards), f"node {i} holds shards {shards}"
        assert shards <= c.driven, f"node {i} holds keys of shards {shards - c.driven}, never called"
        found[i] = shards
    return found


def port_of(rc: RedisCluster, key: str) -> int:
    """The port of the node the cluster client sends ``key``'s commands to."""
    node = rc.get_node_from_key(key)
    assert node is not None
    return int(node.port)


def one_shard_per_node(ks: Keyspace) -> list[int]:
    """The first shard whose slot each node owns."""
    by_node: dict[int, int] = {}
    for s in ks.all_shards():
        by_node.setdefault(node_of_slot(shard_slot(s)), s)
    assert sorted(by_node) == [0, 1, 2], f"{ks.shards} shards do not reach every node: {by_node}"
    return [by_node[i] for i in range(3)]


def workflow_id_on(ks: Keyspace, shard: int, stem: str) -> str:
    return next(f"{stem}-{n}" for n in range(10_000) if shard_of(f"{stem}-{n}", ks.shards) == shard)


# -- driving a run ------------------------------------------------------------------------


@dataclass(frozen=True)
class Cmd:
    kind: CommandKind
    body: bytes
    aux: list[Any]


def schedule_activity(seq: int) -> Cmd:
    opts = {
        "start_to_close_ms": 60_000,
        "schedule_to_close_ms": 0,
        "heartbeat_ms": 30_000,
        "retry": {
            "max_attempts": 3,
            "backoff_coefficient": 2.0,
            "initial_interval_ms": 1000,
            "max_interval_ms": 10_000,
        },
    }
    body = pack({"seq": seq, "name": "charge", "input": pack([42]), "task_queue": TQ, **opts})
    return Cmd(CommandKind.SCHEDULE_ACTIVITY, body, [seq, TQ, 60_000, 0, 30_000, 3, 1000, 2.0, 10_000])


def start_timer(seq: int, ms: int) -> Cmd:
    return Cmd(CommandKind.START_TIMER, pack({"seq": seq, "duration_ms": ms}), [seq, ms])


async def history(c: Conn, shard: int, wid: str, run: str) -> list[tuple[str, str]]:
    """(entry id, event type) of every event of the run (from its stream, or once it
    closed, from the value its history was packed into)."""
    entries: Any = await c.protocol.history(shard, wid, run)
    return [(i.decode(), f[b"type"].decode()) for i, f in entries]


async def read_one(c: Conn, stream: str, consumer: str) -> tuple[str, dict[bytes, bytes]]:
    resp: Any = await c.rc.xreadgroup(GROUP, consumer, {stream: ">"}, count=1)
    assert resp, f"no message on {stream}"
    msgid, fields = resp[0][1][0]
    return msgid.decode(), fields


async def drive_run(c: Conn, shard: int) -> None:
    """A whole run life through every script, on one shard."""
    p, ks = c.protocol, c.ks
    wid = workflow_id_on(ks, shard, f"order-s{shard}")
    run = uuid.uuid4().hex
    wft_q, act_q = ks.queue(shard, TQ, "wft"), ks.queue(shard, TQ, "act")
    for q in (wft_q, act_q):  # what a worker does before it reads a queue
        await c.rc.xgroup_create(q, GROUP, id="0", mkstream=True)

    # start
    started = await p.start(wid, run, "Checkout", TQ, pack({"input": pack(["cart-1"])}), 60_000)
    assert (started.reply, started.run_id) == (Reply.OK, run)
    again = await p.start(wid, uuid.uuid4().hex, "Checkout", TQ, pack({}), 60_000)
    assert (again.reply, again.run_id) == (Reply.RUNNING, run)
    assert await history(c, shard, wid, run) == [("1-0", "WorkflowExecutionStarted")]

    # the first workflow task
    msg, fields = await read_one(c, wft_q, "w1")
    # (the start event travels with it, for a speculative task: see test_speculative.py)
    assert fields[b"run"] == run.encode() and fields[b"wid"] == wid.encode()
    assert (fields[b"wtype"], fields[b"ev"]) == (b"Checkout", pack({"input": pack(["cart-1"])}))
    (wft,) = await p.wft_start(shard, wft_q, 30_000, 100, "w1", [WftStartItem(run, msg, 0, workflow_id=wid)])
    assert wft.reply is Reply.OK
    assert (wft.workflow_id, wft.workflow_type, wft.last_event_id, wft.attempt, wft.since) == (
        wid,
        "Checkout",
        1,
        1,
        0,
    )
    assert [e[0] for e in wft.events] == [b"1-0"]
    assert wft.fence.startswith("1-")

    act = schedule_activity(1)
    task = TaskCompletion(run, wid, wft.fence, msg, [act, start_timer(1, TIMER_MS)])
    (done,) = await p.wft_complete(shard, wft_q, TQ, RETENTION_MS, "w1", 0, [task])
    assert (done.reply, done.last_event_id) == (Reply.OK, 4)
    assert [t for _, t in await history(c, shard, wid, run)] == [
        "WorkflowExecutionStarted",
        "WorkflowTaskCompleted",
        "ActivityTaskScheduled",
        "TimerStarted",
    ]
    assert await c.rc.xlen(wft_q) == 0  # acknowledged and deleted

    # the activity: start, heartbeat, complete
    amsg, afields = await read_one(c, act_q, "w1")
    assert afields == {b"run": run.encode(), b"seq": b"1", b"att": b"1"}
    (ast,) = await p.act_start(shard, act_q, "w1", [ActStartItem(run, 1, 1, amsg)])
    assert ast.reply is Reply.OK and ast.scheduled == act.body
    assert (ast.workflow_id, ast.workflow_type, ast.heartbeat_details) == (wid, "Checkout", b"")
    assert ast.deadline_ms == ast.now_ms + 30_000  # the heartbeat timeout comes first
    hb = await p.heartbeat(shard, run, 1, 1, pack({"progress": 1}))
    assert hb.reply is Reply.OK and hb.deadline_ms == hb.now_ms + 30_000
    assert await p.heartbeat(shard, run, 1, 2, b"") == HeartbeatReply(Reply.GONE)  # not the current attempt
    result = pack({"result": pack("charged")})
    assert ast.route == ActivityRoute(wid, TQ, "", act_q, amsg)  # what act_done declares
    outcome = ActivityOutcome(run, 1, 1, result, ast.route)
    assert await p.act_done(shard, [outcome]) == [ActDone(Reply.OK)]
    assert await p.act_done(shard, [outcome]) == [ActDone(Reply.OK)]  # a retry
    assert await c.rc.xlen(act_q) == 0
    h = await history(c, shard, wid, run)
    assert h[-1] == ("5-0", "ActivityTaskCompleted") and len(h) == 5

    # the timer: the pump fires it once it is due (Redis's clock)
    deadline = time.monotonic() + 30
    while True:
        pumped = await p.pump(shard, 100, RETENTION_MS, "w1")
        if pumped.handled:
            break
        assert time.monotonic() < deadline, "the timer did not fire"
        await asyncio.sleep(max(0.01, min(0.2, (pumped.next_due_ms - pumped.now_ms) / 1000)))
    assert pumped.handled == 1
    assert pumped.next_due_ms > pumped.now_ms  # the execution timeout, a minute away
    h = await history(c, shard, wid, run)
    assert h[-1] == ("6-0", "TimerFired") and len(h) == 6

    # a signal (a repeat of its request is not delivered twice), an update, a query
    sig = pack({"name": "approve", "input": pack([True])})
    assert await p.signal(wid, None, sig, "req-1") == RunReply(Reply.OK, run)
    assert await p.signal(wid, None, sig, "req-1") == RunReply(Reply.DUPLICATE, run)
    upd = await p.update(wid, None, "u1", pack({"update_id": "u1", "name": "bump", "input": pack([1])}))
    assert (upd.reply, upd.run_id) == (Reply.ACCEPTED, run)
    inbox = ks.inbox("client-1")  # another slot: named as data only, never touched
    qry = await p.query(wid, None, pack({"name": "status", "input": b""}), inbox, "rq-1", 5_000)
    assert (qry.reply, qry.run_id, qry.task_queue, qry.stream) == (
        Reply.OK,
        run,
        TQ,
        ks.queue(shard, TQ, "qry"),
    )
    queries: Any = await c.rc.xrange(qry.stream)
    ((qid, qfields),) = queries
    assert qid.decode() == qry.message_id
    assert (qfields[b"run"], qfields[b"wid"], qfields[b"reply"]) == (
        run.encode(),
        wid.encode(),
        inbox.encode(),
    )
    assert [t for _, t in (await history(c, shard, wid, run))[6:]] == [
        "WorkflowExecutionSignaled",
        "WorkflowExecutionUpdateAccepted",
    ]

    # the second workflow task (scheduled by the activity's completion) fails
    msg2, _ = await read_one(c, wft_q, "w1")
    (wft2,) = await p.wft_start(shard, wft_q, 30_000, 100, "w1", [WftStartItem(run, msg2, 4, wft.fence)])
    assert wft2.workflow_id == wid  # the message named it; without the name, read first
    assert wft2.reply is Reply.OK and wft2.fence.startswith("2-")
    assert (wft2.since, wft2.last_event_id) == (4, 8)
    assert [e[0] for e in wft2.events] == [b"5-0", b"6-0", b"7-0", b"8-0"]
    failure = pack({"failure": {"type": "NonDeterminismError", "message": "boom", "stack": ""}})
    assert await p.wft_fail(shard, wft_q, [WftFailure(run, wid, wft2.fence, msg2, failure)]) == [Reply.OK]
    assert await p.wft_fail(shard, wft_q, [WftFailure(run, wid, wft2.fence, msg2, failure)]) == [
        Reply.OK
    ]  # a retry
    old = WftFailure(run, wid, wft.fence, msg, failure)
    assert await p.wft_fail(shard, wft_q, [old]) == [Reply.REFUSED]  # old fence
    h = await history(c, shard, wid, run)
    assert h[-1] == ("9-0", "WorkflowTaskFailed") and len(h) == 9
    assert await c.rc.xlen(wft_q) == 0

    # cancel: the run is asked once (a retry, or another caller, is a duplicate)
    assert await p.cancel(wid, None, pack({"reason": "stop"}), "c-1") == RunReply(Reply.OK, run)
    assert await p.cancel(wid, None, pack({"reason": "stop"}), "c-2") == RunReply(Reply.DUPLICATE, run)
    h = await history(c, shard, wid, run)
    assert h[-1] == ("10-0", "WorkflowExecutionCancelRequested") and len(h) == 10

    # terminate: the run closes, its pending update is answered, its timers go
    assert await p.terminate(wid, None, pack({"reason": "test"}), RETENTION_MS, "t-1") == RunReply(
        Reply.OK, run
    )
    assert await p.terminate(wid, None, b"", RETENTION_MS, "t-1") == RunReply(Reply.OK, run)  # a retry
    assert await p.terminate(wid, None, b"", RETENTION_MS, "t-2") == RunReply(Reply.NOT_RUNNING, run)
    h = await history(c, shard, wid, run)
    assert h[-1] == ("11-0", "WorkflowExecutionTerminated") and len(h) == 11
    assert not await c.rc.exists(ks.history(shard, wid, run))  # packed: one value, not a stream
    assert 0 < await c.rc.pttl(ks.history_packed(shard, run)) <= RETENTION_MS
    assert await c.rc.hget(ks.run(shard, run), "status") == b"terminated"
    assert 0 < await c.rc.pttl(ks.run(shard, run)) <= RETENTION_MS
    assert await c.rc.zcard(ks.timers(shard)) == 0
    closed_entries: Any = await c.rc.xrange(ks.closed(shard))
    closed = [f for _, f in closed_entries]
    assert closed[0] == {b"update": f"{run}:u1".encode()}
    assert closed[1] == {
        b"run": run.encode(),
        b"wid": wid.encode(),
        b"status": b"terminated",
        b"outcome": pack({"reason": "test"}),  # small: it travels with the entry
    }
    upd2 = await p.update(wid, None, "u1", b"")
    assert upd2.reply is Reply.DONE and upd2.outcome is not None
    assert unpack(upd2.outcome)["failure"]["type"] == "WorkflowClosed"
    assert (await p.signal(wid, None, sig, "req-2")).reply is Reply.NOT_RUNNING
    assert (await p.heartbeat(shard, run, 1, 1, b"")).reply is Reply.GONE
    idle = await p.pump(shard, 100, RETENTION_MS, "w1")
    assert (idle.handled, idle.next_due_ms) == (0, -1)  # closing the run removed all it had due

    # dead_letter: a message no worker can read moves to the queue's dead-letter stream
    bad = text(await c.rc.xadd(act_q, {"junk": "1"}))
    bad_read, _ = await read_one(c, act_q, "w1")
    assert bad_read == bad
    assert await p.dead_letter(shard, act_q, bad, "undecodable") is True
    assert await p.dead_letter(shard, act_q, bad, "undecodable") is False  # gone already
    assert await c.rc.xlen(act_q) == 0
    assert (await c.rc.xpending(act_q, GROUP))["pending"] == 0
    dead: Any = await c.rc.xrange(act_q + ":dlq")
    ((_, dlq),) = dead
    assert dlq == {b"junk": b"1", b"dlq_reason": b"undecodable", b"dlq_source": f"{act_q}/{bad}".encode()}

    # signal-with-start: starts an execution with its signal, then signals its running run
    wid2 = workflow_id_on(ks, shard, f"inbox-s{shard}")
    first = await p.signal_with_start(wid2, uuid.uuid4().hex, "Checkout", TQ, pack({}), 60_000, sig, "s-1")
    assert first.reply is Reply.OK and first.started
    assert [t for _, t in await history(c, shard, wid2, first.run_id)] == [
        "WorkflowExecutionStarted",
        "WorkflowExecutionSignaled",
    ]
    then = await p.signal_with_start(wid2, uuid.uuid4().hex, "Checkout", TQ, pack({}), 60_000, sig, "s-2")
    assert (then.reply, then.run_id, then.started) == (Reply.OK, first.run_id, False)
    dup = await p.signal_with_start(wid2, uuid.uuid4().hex, "Checkout", TQ, pack({}), 60_000, sig, "s-2")
    assert (dup.reply, dup.run_id) == (Reply.DUPLICATE, first.run_id)

    # reset: the terminated run again from its first task, as a new run of its execution,
    # with what was pending then pending again and its signal and update re-applied
    new_run = uuid.uuid4().hex
    marker = pack({"failure": {"type": "ResetWorkflow", "message": "again"}})
    plan = ResetPlan(
        wid,
        run,
        new_run,
        11,
        "Checkout",
        TQ,
        60_000,
        pack({"input": pack(["cart-1"])}),
        pack({"reason": "reset"}),
        [("WorkflowTaskFailed", 0, marker), ("WorkflowExecutionSignaled", 0, sig)],
        [([1, TQ, 30_000, 0, 30_000, 0, 1000, 2.0, 100_000], act.body)],
        [(1, 1)],
        [("u1", b"")],
    )
    assert await p.reset(plan, RETENTION_MS) == RunReply(Reply.OK, new_run)
    assert await p.reset(plan, RETENTION_MS) == RunReply(Reply.OK, new_run)  # a repeat
    assert [t for _, t in await history(c, shard, wid, new_run)] == [
        "WorkflowExecutionStarted",
        "WorkflowTaskFailed",
        "WorkflowExecutionSignaled",
    ]
    assert await c.rc.hget(ks.wf(shard, wid), "run") == new_run.encode()
    assert await c.rc.xlen(act_q) == 1 and await c.rc.hget(ks.updates(shard, new_run), "u1") == b"accepted"
    stale = await p.reset(ResetPlan(**{**plan.__dict__, "new_run": uuid.uuid4().hex}), RETENTION_MS)
    assert stale.reply is Reply.STALE and "is not the current run" in stale.why


async def drive_child(c: Conn, shard: int) -> None:
    """A parent and its child on one shard, through the outbox's scripts."""
    p, ks = c.protocol, c.ks
    wid, kid = workflow_id_on(ks, shard, f"parent-s{shard}"), workflow_id_on(ks, shard, f"kid-s{shard}")
    run, kid_run = uuid.uuid4().hex, uuid.uuid4().hex
    tq = "shop"  # (its own queue: the other run's last task is still on TQ's)
    wft_q, box = ks.queue(shard, tq, "wft"), ks.outbox(shard)
    for stream in (wft_q, box):
        await c.rc.xgroup_create(stream, GROUP, id="0", mkstream=True)
    await c.rc.sadd(ks.registry, "Pay")  # (a child's type must be registered: as a worker does it)
    assert (await p.start(wid, run, "Shop", tq, pack({}), 60_000)).reply is Reply.OK
    msg, _ = await read_one(c, wft_q, "w1")
    (wft,) = await p.wft_start(shard, wft_q, 30_000, 100, "w1", [WftStartItem(run, msg, 0, workflow_id=wid)])
    start = {"seq": 1, "workflow_id": kid, "run_id": kid_run, "workflow_type": "Pay", "task_queue": tq}
    start |= {"input": None, "execution_timeout_ms": 60_000, "parent_close_policy": "terminate"}
    child = Cmd(CommandKind.START_CHILD, pack(start), [1, kid, kid_run, "terminate"])
    (done,) = await p.wft_complete(
        shard, wft_q, tq, RETENTION_MS, "w1", 0, [TaskCompletion(run, wid, wft.fence, msg, [child])]
    )
    assert done.reply is Reply.OK
    # the entry starts the child (on its own shard: here the same) and answers the parent
    entry_id, fields = await read_one(c, box, "w1")
    assert fields[b"kind"] == b"start_child"
    # only the consumer the entry is pending for may finish it
    stale = await p.outbox_done(shard, entry_id, "w2", OutboxKind.START_CHILD)
    assert stale is Reply.STALE and (await c.rc.xpending(box, GROUP))["pending"] == 1
    assert await outbox.apply(p, shard, entry_id, fields, RETENTION_MS, "w1") is Reply.OK
    assert await c.rc.xlen(box) == 0
    assert [t for _, t in await history(c, shard, kid, kid_run)] == ["WorkflowExecutionStarted"]
    assert (await history(c, shard, wid, run))[-1][1] == "ChildWorkflowExecutionStarted"
    # the child's close is reported to the parent through the outbox
    assert (await p.terminate(kid, None, pack({"reason": "x"}), RETENTION_MS, "t")).reply is Reply.OK
    entry_id, fields = await read_one(c, box, "w1")
    assert fields[b"kind"] == b"child_closed"
    assert await outbox.apply(p, shard, entry_id, fields, RETENTION_MS, "w1") is Reply.OK
    assert (await history(c, shard, wid, run))[-1][1] == "ChildWorkflowExecutionTerminated"
    # a close policy for a child that closed already changes nothing
    policy = await p.apply_close_policy(
        OutboxKind.TERMINATE, kid, run, pack({"reason": "y"}), "r", RETENTION_MS
    )
    assert policy is Reply.NOT_RUNNING
    # the listing's indexes: both runs listed, neither past its retention yet
    assert await p.trim_index(shard, RETENTION_MS) == 0
    assert await c.rc.zcard(ks.index(shard, "exp")) == 2


async def drive_schedule(c: Conn, shard: int) -> None:
    """A schedule on one shard: created, two due times (the second terminating the
    first's run: TERMINATE_OTHER), paused and deleted."""
    p = c.protocol
    sid = workflow_id_on(c.ks, shard, f"sched-s{shard}")
    tq = "shop"
    data = {"workflow_type": "Tick", "task_queue": tq, "input": None, "execution_timeout_ms": 60_000}
    rec = ScheduleRecord(
        schedule_id=sid,
        workflow_type="Tick",
        task_queue=tq,
        timeout_ms=60_000,
        template=pack(data)[1:],
        template_entries=len(data),
        definition="{}",
        digest="d1",
        origin="client",
        overlap=Overlap.TERMINATE_OTHER,
        catchup_ms=3_600_000,
        pause_on_failure=False,
        max_executions=None,
    )
    assert (await p.schedule_put(rec, "create", 1_000)).why == "created"
    first = ScheduleFire(2_000, f"{sid}@19700101T000002Z", uuid.uuid4().hex)
    # (an evaluation made on another version than the put's, "1", is refused)
    res = await p.schedule_fire(
        sid, "d1", 2_000, "tick", version="0", task_queue=tq, retention_ms=RETENTION_MS, fires=[first]
    )
    assert res.reply is Reply.STALE
    res = await p.schedule_fire(
        sid, "d1", 2_000, "tick", version="1", task_queue=tq, retention_ms=RETENTION_MS, fires=[first]
    )
    assert (res.reply, res.started) == (Reply.OK, 1)
    second = ScheduleFire(3_000, f"{sid}@19700101T000003Z", uuid.uuid4().hex)
    res = await p.schedule_fire(
        sid,
        "d1",
        3_000,
        "tick",
        version="1",
        task_queue=tq,
        retention_ms=RETENTION_MS,
        fires=[second],
        others=[first.workflow_id],
    )
    assert (res.reply, res.started, res.first_started) == (Reply.OK, 1, second.workflow_id)
    assert text(await c.rc.hget(c.ks.wf(shard, first.workflow_id), "status")) == "terminated"
    assert (await p.schedule_state(sid, "pause", 4_000)).why == "paused"
    assert (await p.schedule_state(sid, "delete", 4_000)).why == "deleted"


async def test_every_script_runs_unchanged_on_every_node_of_a_cluster(cluster: Cluster, conn: Conn) -> None:
    shards = one_shard_per_node(conn.ks)
    for i, s in enumerate(shards):  # the server agrees on the slot, the client on its owner
        key = conn.ks.timers(s)
        slot: Any = await conn.nodes[i].execute_command("CLUSTER", "KEYSLOT", key)  # type: ignore[no-untyped-call]
        assert slot == shard_slot(s)
        assert port_of(conn.rc, key) == cluster.ports[i]

    conn.driven = set(shards)
    t0 = time.monotonic()
    await asyncio.gather(*(drive_run(conn, s) for s in shards))
    await asyncio.gather(*(drive_child(conn, s) for s in shards))
    await asyncio.gather(*(drive_schedule(conn, s) for s in shards))
    elapsed = time.monotonic() - t0

    # every script ran on every node, each node has the keys of its own shard only
    for i in range(3):
        assert set(conn.calls[i]) == set(NAMES), f"node {i} ran {sorted(set(conn.calls[i]))}"
    assert await assert_placement(conn) == {i: {s} for i, s in enumerate(shards)}
    for i, node in enumerate(conn.nodes):
        stats: Any = await node.info("commandstats")
        fcall = [stats.get("cmdstat_fcall", {})]
        assert sum(c.get("calls", 0) for c in fcall) >= len(conn.calls[i])  # they ran there
        # the only calls that failed found the library missing (the node was flushed),
        # and each such failure was followed by a load of the library there
        loads = stats.get("cmdstat_function|load", {}).get("calls", 0)
        assert loads >= 1 and sum(c.get("failed_calls", 0) for c in fcall) <= loads
        assert sum(c.get("rejected_calls", 0) for c in fcall) == 0
    assert not await conn.rc.exists(conn.ks.inbox("client-1"))
    print(f"cluster formed in {cluster.formed_in:.2f} s; three runs driven in {elapsed:.2f} s")


def start_call(
    ks: Keyspace, keys_shard: tuple[int, int], prefix_shard: int, declare: bool = True
) -> tuple[list[str], list[Any]]:
    """The keys and arguments of a ``start`` call, with the keys and the prefix of any
    shards; ``declare=False`` leaves out the run's keys, as a caller with a bug would."""
    run = uuid.uuid4().hex
    args = [ks.prefix(prefix_shard), "wf-x", run, "Checkout", TQ, pack({}), 60_000]
    keys = [ks.timers(keys_shard[0]), ks.closed(keys_shard[1])]
    if declare:
        s = prefix_shard
        keys += [ks.wf(s, "wf-x"), ks.run(s, run), ks.history(s, "wf-x", run), ks.queue(s, TQ, "wft")]
        keys += [ks.index(s, "start"), ks.index(s, "open")]
    return keys, args


def unchecked_call(conn: Conn, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The scripts as a production client has them: without the suite's own check of
    declared keys, so that what the server itself refuses shows."""
    monkeypatch.setenv("RILLFLOW_CHECK_KEYS", "0")
    return Scripts(conn.rc).call


async def test_a_call_whose_keys_span_two_nodes_is_refused(
    conn: Conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    ks, call = conn.ks, conn.raw_call
    a, b, _ = one_shard_per_node(ks)
    # declared keys of two slots: the client refuses to send the call
    with pytest.raises(RedisClusterException, match="same key slot"):
        await call("start", *start_call(ks, (a, b), a))
    with pytest.raises(RedisClusterException, match="same key slot"):
        await call("start", *start_call(ks, (a, a), b))
    # keys a script would reach without declaring them: the suite's check names the first
    # one; without it, the server fails the script at that key (EXISTS, of a slot another
    # node owns), before it writes anything
    with pytest.raises(ResponseError, match="did not declare: rf:"):
        await call("start", *start_call(ks, (a, a), a, declare=False))
    with pytest.raises(ResponseError, match="non local key"):
        await unchecked_call(conn, monkeypatch)("start", *start_call(ks, (a, a), b, declare=False))
    assert await assert_placement(conn) == {0: set(), 1: set(), 2: set()}
    # the same call with the shard's own prefix and keys works
    conn.driven = {a}
    assert (await call("start", *start_call(ks, (a, a), a)))[0] == Reply.OK.value.encode()
    assert (await assert_placement(conn))[0] == {a}


async def test_a_script_is_refused_a_key_of_another_slot_on_its_own_node(
    conn: Conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    ks = conn.ks
    a = one_shard_per_node(ks)[0]
    other = next(
        s for s in ks.all_shards() if s != a and node_of_slot(shard_slot(s)) == node_of_slot(shard_slot(a))
    )
    assert shard_slot(other) != shard_slot(a)
    try:
        await unchecked_call(conn, monkeypatch)("start", *start_call(ks, (a, a), other, declare=False))
    except ResponseError as e:
        assert "do not hash to the same slot" in str(e)
        conn.driven = set()
        assert await assert_placement(conn) == {0: set(), 1: set(), 2: set()}  # nothing was written
    else:
        written = sorted([k.decode() async for k in conn.nodes[0].scan_iter("rf:*")])
        pytest.fail(f"a call on shard {a} wrote keys of shard {other}: {written}")
