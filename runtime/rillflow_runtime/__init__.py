"""The durable engine over Redis: keyspace, Lua scripts and the calls that run them.

It speaks only names, ids and encoded payloads; it knows nothing of Python workflow
classes, so another SDK could drive the same keyspace and scripts.
"""

from rillflow_runtime.keyspace import Keyspace, shard_of

__all__ = ["Keyspace", "shard_of"]
