"""msgpack for event and task bodies: compact, fast, and readable by Lua's cmsgpack."""

from __future__ import annotations

from typing import Any

import msgpack

_packer_opts: dict[str, Any] = {"use_bin_type": True}


def pack(value: Any) -> bytes:
    return msgpack.packb(value, **_packer_opts)  # type: ignore[no-any-return]


def unpack(data: bytes) -> Any:
    # strict_map_key=False: Lua's cmsgpack may write integer keys for array-like tables.
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value
