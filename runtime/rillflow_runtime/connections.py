"""How rillflow talks to Redis: one pooled client for commands and scripts, and
dedicated connections for blocking reads, each with the rules that make them safe."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from typing import Any

import hiredis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import AuthenticationError, DataError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

TRANSIENT = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)
"""Errors that mean "Redis is unreachable for now": retried, never recorded as failures."""

COMMAND_TIMEOUT_S = 15.0
"""A reply slower than this is a dead connection; well above the slowest script."""


class _HiredisPacking:
    """Commands packed by hiredis, in C. redis-py's asyncio connections pack in Python,
    copying the command built so far once per argument: a script call that declares its
    keys has dozens of arguments, and packing them took a tenth of a worker's CPU. (Its
    sync connections already pack with hiredis, as here.)"""

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        # a command name may carry its subcommand ("FUNCTION LOAD"): Redis wants them apart
        if isinstance(first, str):
            args = (*first.encode().split(), *args[1:])
        elif b" " in first:
            args = (*first.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError as e:  # what redis-py's packer refuses too (None, a bool, ...)
            raise DataError(str(e)) from e


_PACKING_CLASSES: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def _pack_with_hiredis(redis: Redis) -> Redis:
    """The client's connections (TCP, TLS or a Unix socket, as its URL says) pack with
    hiredis; set before the pool opens its first connection."""
    pool = redis.connection_pool
    cls = pool.connection_class
    if cls not in _PACKING_CLASSES:
        _PACKING_CLASSES[cls] = type(f"Hiredis{cls.__name__}", (_HiredisPacking, cls), {})
    pool.connection_class = _PACKING_CLASSES[cls]
    return redis


class _Refused(Exception):
    def __init__(self, error: AuthenticationError) -> None:
        super().__init__(str(error))
        self.error = error


class _TransientRetry(Retry):
    """Retries TRANSIENT errors but a refused or missing password: redis-py files
    AuthenticationError under ConnectionError, and retrying it (inside the retries of
    the pool's health checks, which retry too) held a command for minutes before the
    user learnt that the URL lacks a password."""

    async def call_with_retry(self, do: Callable[[], Any], *args: Any, **kwargs: Any) -> Any:
        async def once() -> Any:
            try:
                return await do()
            except AuthenticationError as e:
                raise _Refused(e) from e

        try:
            return await super().call_with_retry(once, *args, **kwargs)
        except _Refused as r:
            raise r.error from None


def make_redis(url: str, max_connections: int = 64) -> Redis:
    """A client that waits for a free connection rather than failing, and rides out a
    dropped connection or a restarting server by retrying with backoff (a few seconds).
    Every script answers a repeated call as the first one, so a re-sent call is safe."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=None,
        socket_timeout=COMMAND_TIMEOUT_S,
        retry=_TransientRetry(ExponentialWithJitterBackoff(cap=1.0, base=0.02), retries=12),
        retry_on_error=list(TRANSIENT),
        health_check_interval=30,
    )
    return _pack_with_hiredis(Redis(connection_pool=pool))


def make_blocking_reader(url: str, max_connections: int, block_s: float) -> Redis:
    """Connections for blocking reads (XREAD/XREADGROUP BLOCK). Their socket timeout is
    well above ``block_s``, so an idle read ends with an empty reply, not a timeout
    error; and they never retry by themselves, because redis-py would re-issue a
    cancelled blocking read and a stopping loop would keep reading. The loops that use
    them retry on their own, with backoff and a log line."""
    reader = Redis.from_url(
        url,
        max_connections=max_connections,
        socket_timeout=block_s + COMMAND_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
    )
    return _pack_with_hiredis(reader)


def reraise_if_cancelling() -> None:
    """redis-py may turn a cancellation into a connection error: call this in an
    ``except`` that retries, so a cancelled loop still ends."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def wait_until_reachable(
    url: str, wait_s: float, on_wait: Callable[[BaseException, float], None] | None = None
) -> None:
    """Return once the server at ``url`` answers a PING, trying for up to ``wait_s``
    seconds: a worker started while Redis restarts, loads its AOF or fails over waits
    for it (as Celery's and arq's workers do) instead of exiting into a crash loop.
    ``on_wait(error, delay)`` is told of each failed try. An error that waiting cannot
    fix (credentials, ACLs, a bad URL) is raised at once; the last transient one when
    the time is up."""
    deadline = time.monotonic() + wait_s
    delay = 0.25
    while True:
        redis = Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5, retry=Retry(NoBackoff(), 0))
        try:
            await redis.ping()
            return
        except TRANSIENT as e:  # (a server still loading its data answers BusyLoadingError, one of them)
            left = deadline - time.monotonic()
            if isinstance(e, AuthenticationError) or _tls_refused(e) or left <= 0:
                raise  # (wrong credentials or certificates: no wait makes them right)
            pause = min(delay, left)  # the last try comes at the deadline, not before it
            if on_wait is not None:
                on_wait(e, pause)
        finally:
            await redis.aclose()
        await asyncio.sleep(pause)
        delay = min(delay * 2, 5.0)


def _tls_refused(e: BaseException) -> bool:
    """A TLS handshake that failed on certificates or protocol: a setting, not an outage."""
    seen: BaseException | None = e
    for _ in range(8):  # (a chain of causes is short; a cycle must not spin)
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
