"""A TCP proxy in front of a real Redis server, for fault injection in tests.

Every byte goes to the real server; the test decides, per command name or any other
byte pattern a client sends, to drop the connection carrying it (``drop_on``), to let
it reach the server and drop the connection before the reply comes back
(``drop_reply_on``: the command took effect, the client does not know), or to hold what
that connection sends until released (``hold_on``). Nothing is faked: the
client speaks to Redis through a socket that misbehaves the way networks do.

Commands are matched on the bytes of their RESP encoding: ``command(b"XRANGE")`` is
``$6\\r\\nXRANGE\\r\\n``, which a script's source (one bulk string) never contains.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

CHUNK = 65536


def command(name: bytes, *args: bytes) -> bytes:
    """The RESP bytes a client sends for a command name and its first arguments."""
    return b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in (name, *args))


@dataclass
class Fault:
    """One rule: what it matches, how many more times it acts (None: while armed)."""

    pattern: bytes
    action: str  # "drop", "drop_reply" or "hold"
    remaining: int | None = None
    armed: bool = True
    hits: int = 0
    last_hit: float = 0.0
    held: list[_Conn] = field(default_factory=list)

    def disarm(self) -> None:
        self.armed = False

    def release(self) -> None:
        """Stop holding: what the held connections sent goes on to the server."""
        self.armed = False
        for conn in self.held:
            conn.release()
        self.held.clear()

    def _take(self) -> bool:
        if not self.armed:
            return False
        if self.remaining is not None:
            if self.remaining <= 0:
                return False
            self.remaining -= 1
        self.hits += 1
        self.last_hit = time.monotonic()
        return True

    async def wait_hits(self, n: int = 1, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.hits < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"fault on {self.pattern!r}: {self.hits} hits, wanted {n}")
            await asyncio.sleep(0.01)


class _Conn:
    def __init__(
        self, proxy: FaultProxy, ident: int, cr: asyncio.StreamReader, cw: asyncio.StreamWriter
    ) -> None:
        self.proxy = proxy
        self.id = ident
        self.cr, self.cw = cr, cw
        self.sw: asyncio.StreamWriter | None = None
        self.holding = False
        self.drop_reply = False  # the server's next bytes are not forwarded: the connection drops
        self.buffer: list[bytes] = []
        self.closed = False

    def release(self) -> None:
        self.holding = False
        if self.sw is not None and not self.closed:
            for chunk in self.buffer:
                self.sw.write(chunk)
        self.buffer.clear()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for w in (self.cw, self.sw):
            if w is not None:
                with contextlib.suppress(Exception):
                    w.transport.abort()
        self.proxy.conns.pop(self.id, None)

    async def run(self) -> None:
        try:
            sr, self.sw = await asyncio.open_connection(self.proxy.host, self.proxy.port)
        except OSError:
            self.close()
            return
        up = asyncio.create_task(self._client_to_server())
        down = asyncio.create_task(self._server_to_client(sr))
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            up.cancel()
            down.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            self.close()

    async def _client_to_server(self) -> None:
        tail = b""
        assert self.sw is not None
        while True:
            chunk = await self.cr.read(CHUNK)
            if not chunk:
                return
            window = tail + chunk
            for f in self.proxy.faults:
                # a match must end in this chunk: one in the tail was seen already
                at = window.find(f.pattern, max(0, len(tail) - len(f.pattern) + 1))
                if at >= 0 and f._take():
                    if f.action == "drop":
                        self.close()
                        return
                    if f.action == "drop_reply":
                        self.drop_reply = True
                    else:
                        self.holding = True
                        f.held.append(self)
            tail = window[-256:]
            if self.holding:
                self.buffer.append(chunk)
                continue
            self.sw.write(chunk)
            await self.sw.drain()

    async def _server_to_client(self, sr: asyncio.StreamReader) -> None:
        while True:
            chunk = await sr.read(CHUNK)
            if not chunk or self.drop_reply:
                return
            self.cw.write(chunk)
            await self.cw.drain()


class FaultProxy:
    """``async with FaultProxy(redis_url) as proxy``; clients connect to ``proxy.url``."""

    def __init__(self, upstream_url: str) -> None:
        u = urlparse(upstream_url)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 6379
        self.db = (u.path or "/0").lstrip("/") or "0"
        self.faults: list[Fault] = []
        self.conns: dict[int, _Conn] = {}
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self.listen_port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.listen_port}/{self.db}"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.listen_port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        conn = _Conn(self, next(self._ids), cr, cw)
        self.conns[conn.id] = conn
        await conn.run()

    def drop_on(self, pattern: bytes, times: int | None = None) -> Fault:
        """Close the connection that sends ``pattern`` (before it reaches the server),
        the next ``times`` times (None: until disarmed)."""
        f = Fault(pattern, "drop", times)
        self.faults.append(f)
        return f

    def drop_reply_on(self, pattern: bytes, times: int | None = None) -> Fault:
        """Let the command carrying ``pattern`` reach the server, then close its
        connection instead of passing the reply back, the next ``times`` times."""
        f = Fault(pattern, "drop_reply", times)
        self.faults.append(f)
        return f

    def hold_on(self, pattern: bytes, times: int | None = None) -> Fault:
        """Hold everything a connection sends from ``pattern`` on, until released."""
        f = Fault(pattern, "hold", times)
        self.faults.append(f)
        return f

    def drop_all(self) -> None:
        for conn in list(self.conns.values()):
            conn.close()

    async def close(self) -> None:
        for f in self.faults:
            f.release()
        if self._server is not None:
            self._server.close()
        self.drop_all()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
