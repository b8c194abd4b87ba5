"""Key names. Every key of a namespace starts with ``rf:`` and carries the hash tag
``{<namespace>:<shard>}``, so one script only ever touches one Redis Cluster slot.
docs/keyspace.md documents each key for redis-cli users."""

from __future__ import annotations

import functools
import re
import zlib
from dataclasses import dataclass

GROUP = "rf"  # the consumer group on every task stream
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
# an execution id as it may be named (a schedule's runs have an '@'; see shard_of) ...
ID_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,256}$")
# ... and the shape of a schedule's run's id (<schedule id>@<UTC time>Z), which only a
# schedule starts: a start given such an id is refused, so none takes a due time
SCHEDULE_RUN_RE = re.compile(r"@\d{8}T\d{6}(\.\d{3})?Z$")


def startable_id(execution_id: object) -> bool:
    """Whether a start may choose this id: a valid one not shaped like a schedule's run."""
    return (
        isinstance(execution_id, str)
        and ID_RE.fullmatch(execution_id) is not None
        and not SCHEDULE_RUN_RE.search(execution_id)
    )


# a schedule's runs are "<schedule id>@<due time>" (see shard_of): room is left for the time
SCHEDULE_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


def shard_of(workflow_id: str, shards: int) -> int:
    """The shard a workflow id belongs to, fixed for the life of the namespace: that of
    the part before its first ``@`` (all of it without one), so that ids sharing that
    part share a shard. A schedule and its runs (``<schedule id>@<due time>``) do: one
    script sees both, and decides a due time's run and the overlap with earlier runs
    at once."""
    return zlib.crc32(workflow_id.partition("@")[0].encode()) % shards


@dataclass(frozen=True)
class Keyspace:
    namespace: str
    shards: int

    @staticmethod
    def meta_key(namespace: str) -> str:
        return f"rf:{{{namespace}}}:meta"

    # -- namespace-level keys: the registry of workflows and the live workers -------------
    def ns_key(self, what: str) -> str:
        return f"rf:{{{self.namespace}}}:{what}"

    @property
    def registry(self) -> str:
        """A set of every workflow name ever registered in the namespace."""
        return self.ns_key("registry")

    def registry_entry(self, name: str) -> str:
        """One workflow's definition (``spec``) and the task queues it was registered on."""
        return self.ns_key(f"registry:{name}")

    @property
    def workers(self) -> str:
        """A sorted set of worker identities (score: last heartbeat, ms)."""
        return self.ns_key("workers")

    def worker(self, identity: str) -> str:
        """A worker's liveness record, which expires unless the worker refreshes it."""
        return self.ns_key(f"worker:{identity}")

    @functools.cached_property
    def _prefixes(self) -> tuple[str, ...]:
        # every key of every call starts with one of these: built once, not per key
        return tuple(f"rf:{{{self.namespace}:{s}}}:" for s in range(self.shards))

    def prefix(self, shard: int) -> str:
        return self._prefixes[shard]

    def shard(self, workflow_id: str) -> int:
        return shard_of(workflow_id, self.shards)

    def timers(self, shard: int) -> str:
        return self.prefix(shard) + "timers"

    def pump_lease(self, shard: int) -> str:
        """Which worker is pumping the shard's timers now (expires: a dead one's passes)."""
        return self.prefix(shard) + "pump"

    def closed(self, shard: int) -> str:
        return self.prefix(shard) + "closed"

    def index(self, shard: int, what: str) -> str:
        """What lists runs: ``start`` (every retained run; score: its start ms), ``open``
        (the running ones, likewise), ``exp`` (closed ones; score: when their keys
        expire, when they leave ``start``). Members are run ids."""
        return f"{self.prefix(shard)}idx:{what}"

    def outbox(self, shard: int) -> str:
        """Effects of the shard's runs on other executions (child starts and outcomes,
        parent close policies, signals), applied where those live by any worker."""
        return self.prefix(shard) + "outbox"

    def schedules(self, shard: int, what: str) -> str:
        """The shard's schedules: ``due`` (members: schedule ids; score: when the
        evaluator looks at each next, ms, 0 = now) and ``fin`` (schedule id -> the ids of
        its runs that closed since it last looked, space-separated: close_run writes it)."""
        return f"{self.prefix(shard)}sched:{what}"

    def schedule(self, shard: int, schedule_id: str, part: str = "") -> str:
        """One schedule: its hash (definition, state), and ``open`` (a set of its
        executions still running), ``buf`` (a list of due times waiting for them to
        close, "<ms> <execution id>"), ``log`` (its recent actions, newest first)."""
        return f"{self.prefix(shard)}schedule:{schedule_id}" + (f":{part}" if part else "")

    def schedule_keys(self, shard: int, schedule_id: str) -> list[str]:
        return [
            self.schedule(shard, schedule_id),
            self.schedule(shard, schedule_id, "open"),
            self.schedule(shard, schedule_id, "buf"),
            self.schedule(shard, schedule_id, "log"),
            self.schedules(shard, "due"),
            self.schedules(shard, "fin"),
        ]

    def wf(self, shard: int, workflow_id: str) -> str:
        return f"{self.prefix(shard)}wf:{workflow_id}"

    def run(self, shard: int, run_id: str) -> str:
        return f"{self.prefix(shard)}run:{run_id}"

    def history(self, shard: int, workflow_id: str, run_id: str) -> str:
        return f"{self.prefix(shard)}h:{workflow_id}:{run_id}"

    def history_packed(self, shard: int, run_id: str) -> str:
        """A closed run's history packed into one msgpack value, in place of its stream
        (named by the run alone: a closed run's keys are most of what retention costs)."""
        return f"{self.prefix(shard)}hc:{run_id}"

    def history_packed_before(self, shard: int, workflow_id: str, run_id: str) -> str:
        """Where runs closed by an earlier version packed their history: read, never written."""
        return f"{self.prefix(shard)}hc:{workflow_id}:{run_id}"

    def acts(self, shard: int, run_id: str) -> str:
        return f"{self.prefix(shard)}act:{run_id}"

    def buffer(self, shard: int, run_id: str) -> str:
        """Events that arrived while the run's workflow task was in flight."""
        return f"{self.prefix(shard)}buf:{run_id}"

    def signals(self, shard: int, workflow_id: str) -> str:
        """The request ids of the signals an execution received lately, whichever run got
        them (a retry is not delivered twice)."""
        return f"{self.prefix(shard)}wsig:{workflow_id}"

    def run_signals(self, shard: int, run_id: str) -> str:
        """A run's own signal request ids, where releases before :meth:`signals` kept
        them: still read (a retry through this release is not delivered twice) and
        expired with the run."""
        return f"{self.prefix(shard)}sig:{run_id}"

    def updates(self, shard: int, run_id: str) -> str:
        """A run's updates: ``<id>`` -> accepted/done, ``<id>:o`` -> the outcome."""
        return f"{self.prefix(shard)}upd:{run_id}"

    def inbox(self, client_id: str) -> str:
        """A client's inbox: workers add the answers to its queries here."""
        return self.ns_key(f"inbox:{client_id}")

    def sticky(self, shard: int, task_queue: str, worker: str) -> str:
        """A worker's own workflow-task stream: the tasks of the runs it caches."""
        return self.queue(shard, task_queue, f"wft@{worker}")

    def queue(self, shard: int, task_queue: str, kind: str) -> str:
        """``kind`` is ``wft`` (workflow tasks) or ``act`` (activity tasks)."""
        return f"{self.prefix(shard)}q:{task_queue}:{kind}"

    @staticmethod
    def dead_letters(stream: str) -> str:
        """Where a task stream's undeliverable messages go, with the reason."""
        return f"{stream}:dlq"

    def run_keys(self, shard: int, workflow_id: str, run_id: str) -> list[str]:
        """Every key of one run a script may touch, as the scripts declare them."""
        p = self.prefix(shard)
        return [
            f"{p}run:{run_id}",
            f"{p}h:{workflow_id}:{run_id}",
            f"{p}hc:{run_id}",
            f"{p}act:{run_id}",
            f"{p}buf:{run_id}",
            f"{p}wsig:{workflow_id}",
            f"{p}sig:{run_id}",
            f"{p}upd:{run_id}",
            f"{p}wf:{workflow_id}",
        ]

    def all_shards(self) -> range:
        return range(self.shards)
