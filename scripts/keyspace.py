"""A one-screen view of a namespace for operators: keys by kind, task-queue backlogs,
messages in flight, dead letters, due timers.

    python scripts/keyspace.py [--url redis://127.0.0.1:6379/0] [--namespace default]

Without --url it looks where the CLI does: $RILLFLOW_URL, else the `rillflow dev` server.
"""

from __future__ import annotations

import argparse
import collections
import re

import redis

from rillflow.devserver import default_url

KIND = re.compile(
    r"^rf:\{[^}]+\}:(wf|run|hc|h|act|buf|wsig|sig|upd|q|timers|closed|outbox|idx|pump|meta|sched|schedule)(?::|$)"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url")
    ap.add_argument("--namespace", default="default")
    a = ap.parse_args()
    found = default_url(a.url)
    if found is None:
        raise SystemExit(
            "no Redis URL: pass --url (or set RILLFLOW_URL), or start a local server with `rillflow dev`"
        )
    a.url = found[0]
    r = redis.Redis.from_url(a.url, decode_responses=True)
    meta = r.hgetall(f"rf:{{{a.namespace}}}:meta")
    if not meta:
        raise SystemExit(f"no namespace {a.namespace!r} at {a.url}")
    print(f"namespace {a.namespace}: {meta}")
    counts: collections.Counter[str] = collections.Counter()
    queues = []
    for key in r.scan_iter(f"rf:{{{a.namespace}:*"):
        m = KIND.match(key)
        counts[m.group(1) if m else "other"] += 1
        if ":q:" in key or key.endswith(":outbox") or key.endswith(":outbox:dlq"):
            queues.append(key)
    print("keys:", dict(counts))
    for q in sorted(queues):
        line = f"{q}: length {r.xlen(q)}"
        if not q.endswith(":dlq"):
            try:
                pending = r.xpending(q, "rf") if r.exists(q) else {"pending": 0}
            except redis.ResponseError:  # a stream no worker has read yet: no group
                pending = {"pending": 0}
            line += f", in flight {pending['pending']}"
        print(line)
    for shard in range(int(meta.get("shards", 1))):
        t = f"rf:{{{a.namespace}:{shard}}}:timers"
        nxt = r.zrange(t, 0, 0, withscores=True)
        print(f"{t}: {r.zcard(t)} due entries; next {nxt[0] if nxt else '-'}")
        d = f"rf:{{{a.namespace}:{shard}}}:sched:due"
        if r.exists(d):
            print(f"{d}: {r.zcard(d)} schedules; next look {r.zrange(d, 0, 0, withscores=True)[0]}")


if __name__ == "__main__":
    main()
