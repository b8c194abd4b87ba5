"""The worker: polls a task queue's streams, runs workflow tasks on the deterministic
executor and activities on its event loop (sync ones in threads), answers queries, and
pumps the shard timers. Any number of workers share a queue through the consumer
groups.

- ``lifecycle``: the ``Worker`` itself: start, liveness, supervised loops, drain.
- ``workflow_tasks``: poll, start, activate, complete or fail; with ``run_cache``, the
  cache of instances and its commit rules.
- ``activities``: attempts, their deadlines and heartbeats, batched results.
- ``queries``: answers from the cache or a replay.
- ``outbox``: applies every shard's outbox (children, close policies, signals).
- ``maintenance``: the timers pump, reclaims, and the janitor.
- ``context``: what they share, and the one way each reads its stream.
"""

from rillflow.worker.context import WorkerStats
from rillflow.worker.lifecycle import Worker

__all__ = ["Worker", "WorkerStats"]
