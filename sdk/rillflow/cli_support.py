"""What every ``rillflow`` command shares: the Redis URL and namespace options, the
connection, the mapping of errors to one line and an exit code (see rillflow.cli), and
the parsing of JSON input and ISO times."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar
from urllib.parse import urlparse, urlsplit, urlunsplit

import typer
from redis.asyncio.connection import parse_url
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    InvalidResponse,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rich.console import Console
from rich.markup import escape

from rillflow.client import Client
from rillflow.devserver import URL_ENV, default_url
from rillflow.errors import (
    InvalidInputError,
    PayloadTooLargeError,
    RillflowError,
    WorkflowAlreadyStartedError,
    WorkflowFailureError,
    WorkflowNotFoundError,
    WorkflowNotRegisteredError,
    WorkflowQueryFailedError,
    WorkflowQueryTimeoutError,
    WorkflowUpdateFailedError,
    WorkflowUpdateTimeoutError,
    safe_text,
)
from rillflow.payloads import to_wire
from rillflow.schedules import ScheduleAlreadyExistsError, ScheduleNotFoundError

out = Console()
err = Console(stderr=True)
T = TypeVar("T")


def _fail(code: int, message: str, label: str = "error:") -> typer.Exit:
    """Say what went wrong in one line (never wrapped, whatever the width) and return
    the exit to raise."""
    err.print(f"[red]{label}[/red] {escape(safe_text(message))}", soft_wrap=True)
    return typer.Exit(code)


def _utf8(param: typer.CallbackParam, value: str | None) -> str | None:
    """A shell passes bytes, and Python turns those that are not UTF-8 into lone
    surrogates, which no name, id, URL or payload can carry: say so, with the bytes."""
    if value is not None:
        try:
            value.encode()
        except UnicodeEncodeError:
            opt = param.opts[0] if param.opts else ""
            label = opt if opt.startswith("-") else (param.name or "an argument").replace("_", " ")
            raise _fail(
                2, f"{label} is not UTF-8 text: {os.fsencode(value)!r}; names, ids and input must be UTF-8"
            ) from None
    return value


UrlOpt = Annotated[
    str | None,
    typer.Option(
        "--url",
        callback=_utf8,
        help=f"Redis URL, redis://[user:password@]host:port/db (default: ${URL_ENV}, else the running "
        "`rillflow dev` server).",
    ),
]
NsOpt = Annotated[
    str,
    typer.Option("--namespace", "-n", envvar="RILLFLOW_NAMESPACE", callback=_utf8, help="Namespace."),
]


class Exit(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def resolve_url(url: str | None) -> tuple[str, str]:
    """The Redis URL to use and where it came from: ``--url``, else ``$RILLFLOW_URL``,
    else the running ``rillflow dev`` server's; refused at once if it is not a Redis URL."""
    found = default_url(url)
    if found is None:
        raise Exit(
            2, f"no Redis URL: pass --url (or set {URL_ENV}), or start a local server with `rillflow dev`"
        )
    target, source = found
    try:
        parse_url(target)
    except ValueError as e:
        raise Exit(
            2,
            f"{source} {redact(target)!r} is not a Redis URL ({e}); "
            "use redis://[user:password@]host:port/db, rediss://... or unix:///path/to/socket",
        ) from None
    return target, source


def redact(url: str) -> str:
    """``url`` without its password, for messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return url


def redis_exit(e: RedisError, url: str, source: str) -> Exit | None:
    """What a Redis error means for the user, as an exit code and a line; None for an
    error that is not the user's to fix (a bug: let its traceback show)."""
    where = f"Redis at {redact(url)} ({source})"
    msg = (safe_text(str(e)) or type(e).__name__).rstrip(".")
    anonymous = urlparse(url).password is None
    needs_auth = (
        msg.startswith(("NOAUTH", "Authentication required"))
        or "must be called with the client already authenticated" in msg
    )
    if needs_auth and anonymous:
        return Exit(
            4,
            f"{where} needs a password and the URL gives none: put it in the URL "
            "(redis://:password@host:port/db, or redis://user:password@...)",
        )
    if isinstance(e, AuthenticationError | AuthenticationWrongNumberOfArgsError) or msg.startswith(
        ("WRONGPASS", "NOAUTH")
    ):
        return Exit(
            4,
            f"{where} refused the credentials: {msg}; put the right ones in the URL "
            "(redis://user:password@host:port/db)",
        )
    if isinstance(e, ReadOnlyError):
        return Exit(4, f"{where} is a read-only replica: {msg}; point the URL at the primary")
    if isinstance(e, OutOfMemoryError):
        return Exit(4, f"{where} refused a write: {msg}; free memory or raise maxmemory")
    if isinstance(e, InvalidResponse):
        return Exit(4, f"{where} does not answer as a Redis server does ({msg}): check the host and port")
    if isinstance(e, NoPermissionError) or msg.startswith("NOPERM") or "ACL failure" in msg:
        return Exit(
            4,
            f"{where}: the Redis user may not do what rillflow needs: {msg}; grant it the namespace's "
            "keys (~rf:*) and the commands on them, e.g. ACL SETUSER <user> ~rf:* +@all",
        )
    if isinstance(e, RedisTimeoutError):
        return Exit(4, f"{where} did not answer in time: {msg}")
    if isinstance(e, RedisConnectionError):
        hint = "; is `rillflow dev` still running?" if "rillflow dev" in source else ""
        return Exit(4, f"cannot reach {where}: {msg.rstrip('.')}{hint}")
    if isinstance(e, ResponseError) and msg.startswith(("DB index", "READONLY", "OOM", "MISCONF", "LOADING")):
        return Exit(4, f"{where} refused: {msg}")
    return None


def run(fn: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine, mapping rillflow's errors to messages and exit codes."""
    try:
        return asyncio.run(fn())  # type: ignore[arg-type]
    except Exit as e:
        raise _fail(e.code, str(e)) from None
    except (InvalidInputError, PayloadTooLargeError) as e:
        raise _fail(2, str(e)) from None
    except (
        WorkflowNotFoundError,
        WorkflowNotRegisteredError,
        WorkflowAlreadyStartedError,
        ScheduleNotFoundError,
        ScheduleAlreadyExistsError,
    ) as e:
        raise _fail(3, str(e)) from None
    except (WorkflowQueryFailedError, WorkflowUpdateFailedError) as e:
        raise _fail(1, str(e), "failed:") from None
    except (WorkflowQueryTimeoutError, WorkflowUpdateTimeoutError) as e:
        raise _fail(5, str(e)) from None
    except WorkflowFailureError as e:
        err.print(f"[red]{escape(safe_text(str(e)))}[/red]", soft_wrap=True)
        if e.cause.stack:
            err.print(safe_text(e.cause.stack.rstrip()), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except RedisConnectionError as e:
        raise _fail(4, f"cannot reach Redis: {e}") from None
    except RillflowError as e:
        raise _fail(2, str(e)) from None


@contextlib.asynccontextmanager
async def connect(url: str | None, namespace: str) -> AsyncIterator[Client]:
    """A client for the command's body; a Redis error the user can fix, in connecting or
    later, becomes one line naming the server and where its URL came from."""
    target, source = resolve_url(url)
    try:
        client = await Client.connect(target, namespace)
        try:
            yield client
        finally:
            await client.close()
    except RedisError as e:
        exit_ = redis_exit(e, target, source)
        if exit_ is None:
            raise
        raise exit_ from None


def _json_default(value: Any) -> str:
    """What JSON has no type for: bytes (a run's seed) as hex, the rest as text."""
    return value.hex() if isinstance(value, bytes) else str(value)


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, default=_json_default)


def _parse_input(raw: str | None, option: str = "--input") -> Any:
    """--input as wire data: valid JSON that the wire can carry (a number beyond 64 bits
    or a "\\ud800" escape is refused here, whatever the workflow is)."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise Exit(2, f"{option} is not valid JSON: {e}") from e
    except RecursionError:
        raise Exit(2, f"{option} is nested too deeply") from None
    return to_wire(value, option)


def _when(raw: str | None, option: str) -> datetime | None:
    """An ISO time for a filter (naive: UTC)."""
    if raw is None:
        return None
    try:
        t = datetime.fromisoformat(raw)
    except ValueError as e:
        raise Exit(2, f"{option} must be an ISO time like 2026-12-07T09:30:00Z, got {raw!r}") from e
    return t if t.tzinfo else t.replace(tzinfo=UTC)
