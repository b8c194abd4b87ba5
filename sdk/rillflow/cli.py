"""The ``rillflow`` command.

Exit codes: 0 success; 1 the workflow failed, timed out or was terminated; 2 bad usage
or input; 3 no such execution, or it is already running; 4 Redis unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import signal as _signals
import sys
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar

import structlog
import typer
from redis.exceptions import ConnectionError as RedisConnectionError
from rich.console import Console
from rich.table import Table

from rillflow.activity import ActivityDefinition
from rillflow.client import Client
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
)
from rillflow.history import HistoryEvent

app = typer.Typer(
    help="rillflow: durable workflows in plain async Python, on nothing but Redis.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)
T = TypeVar("T")

DEV_HOME = Path(os.environ.get("RILLFLOW_HOME", Path.home() / ".rillflow"))
URL_FILE = DEV_HOME / "dev" / "url"

UrlOpt = Annotated[
    str | None,
    typer.Option(
        "--url", envvar="RILLFLOW_URL", help="Redis URL (default: the running `rillflow dev` server)."
    ),
]
NsOpt = Annotated[str, typer.Option("--namespace", "-n", envvar="RILLFLOW_NAMESPACE", help="Namespace.")]


class Exit(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def configure_logging(level: str = "info") -> None:
    import logging

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )


def resolve_url(url: str | None) -> str:
    if url:
        return url
    if URL_FILE.exists():
        return URL_FILE.read_text().strip()
    raise Exit(
        2, "no Redis URL: pass --url (or set RILLFLOW_URL), or start a local server with `rillflow dev`"
    )


def run(fn: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine, mapping rillflow's errors to messages and exit codes."""
    try:
        return asyncio.run(fn())  # type: ignore[arg-type]
    except Exit as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(e.code) from None
    except (InvalidInputError, PayloadTooLargeError) as e:
        err.print(f"[red]invalid input:[/red] {e}")
        raise typer.Exit(2) from None
    except (WorkflowNotFoundError, WorkflowNotRegisteredError, WorkflowAlreadyStartedError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(3) from None
    except (WorkflowQueryFailedError, WorkflowUpdateFailedError) as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
    except (WorkflowQueryTimeoutError, WorkflowUpdateTimeoutError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(5) from None
    except WorkflowFailureError as e:
        err.print(f"[red]{e}[/red]")
        if e.cause.stack:
            err.print(e.cause.stack.rstrip())
        raise typer.Exit(1) from None
    except RedisConnectionError as e:
        err.print(f"[red]cannot reach Redis:[/red] {e}")
        raise typer.Exit(4) from None
    except RillflowError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None


@contextlib.asynccontextmanager
async def connect(url: str | None, namespace: str) -> Any:
    client = await Client.connect(resolve_url(url), namespace)
    try:
        yield client
    finally:
        await client.close()


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)


def _parse_input(raw: str | None) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise Exit(2, f"--input is not valid JSON: {e}") from e


# -- worker -------------------------------------------------------------------------------
def load_target(target: str) -> tuple[list[type], list[ActivityDefinition]]:
    """``module`` (every workflow and activity it defines) or ``module:attr`` (a class,
    an activity, or a list of them)."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    mod_name, _, attr = target.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise Exit(2, f"cannot import {mod_name!r}: {e}") from e
    if attr:
        try:
            obj = getattr(mod, attr)
        except AttributeError as e:
            raise Exit(2, f"module {mod_name!r} has no attribute {attr!r}") from e
        objs = list(obj) if isinstance(obj, list | tuple) else [obj]
    else:
        objs = list(vars(mod).values())
    wfs = [o for o in objs if isinstance(o, type) and hasattr(o, "__rillflow_workflow__")]
    acts = [o for o in objs if isinstance(o, ActivityDefinition)]
    if attr and len(wfs) + len(acts) != len(objs):
        bad = [o for o in objs if o not in wfs and o not in acts]
        raise Exit(2, f"{target} holds things that are neither workflows nor activities: {bad!r}")
    if not wfs and not acts:
        raise Exit(2, f"{target} defines no workflows and no activities")
    return list(dict.fromkeys(wfs)), list(dict.fromkeys(acts))


def _sigterm_to_stop(stop: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (_signals.SIGTERM, _signals.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop)


@app.command()
def worker(
    target: Annotated[str, typer.Argument(help="module or module:attr holding workflows and activities")],
    task_queue: Annotated[str, typer.Option("--task-queue", "-q")] = "default",
    max_concurrent_activities: Annotated[int, typer.Option()] = 100,
    grace: Annotated[float, typer.Option(help="seconds running activities get to finish on SIGTERM")] = 30.0,
    identity: Annotated[
        str | None, typer.Option(help="the worker's name in `rillflow workers` (default: host-pid-random)")
    ] = None,
    heartbeat: Annotated[
        float, typer.Option(help="seconds between liveness refreshes; the record lives three times that")
    ] = 10.0,
    url: UrlOpt = None,
    namespace: NsOpt = "default",
    log_level: Annotated[str, typer.Option()] = "info",
) -> None:
    """Run a worker until SIGTERM or Ctrl-C (then it stops taking tasks, lets running
    activities finish within --grace seconds, and exits 0)."""
    from rillflow.worker import Worker

    configure_logging(log_level)

    async def main() -> None:
        wfs, acts = load_target(target)
        async with connect(url, namespace) as client:
            w = Worker(
                client,
                task_queue,
                wfs,
                acts,
                max_concurrent_activities=max_concurrent_activities,
                graceful_shutdown_timeout=timedelta(seconds=grace),
                identity=identity,
                heartbeat_interval=timedelta(seconds=heartbeat),
            )
            _sigterm_to_stop(w._stopping.set)
            await w.run()

    run(main)


# -- client commands ----------------------------------------------------------------------
@app.command()
def start(
    name: Annotated[str, typer.Argument(help="workflow name")],
    input: Annotated[
        str | None, typer.Option("--input", "-i", help="input as JSON (see `rillflow schema NAME`)")
    ] = None,
    id: Annotated[str | None, typer.Option("--id", help="execution id (default: a new uuid)")] = None,
    task_queue: Annotated[
        str | None,
        typer.Option("--task-queue", "-q", help="default: the queue the workflow is registered on"),
    ] = None,
    execution_timeout: Annotated[float | None, typer.Option(help="seconds")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="wait for the result and print it")] = False,
    allow_unregistered: Annotated[
        bool,
        typer.Option(
            "--allow-unregistered", help="start even if no worker has registered NAME yet (no validation)"
        ),
    ] = False,
    url: UrlOpt = None,
    namespace: NsOpt = "default",
) -> None:
    """Start a workflow; print its execution id (or, with --wait, its result). The input
    is checked against the registered schema first: nothing is written if it fails."""

    async def main() -> None:
        data = _parse_input(input)
        async with connect(url, namespace) as client:
            h = await client.start_workflow(
                name,
                data,
                execution_id=id,
                task_queue=task_queue,
                execution_timeout=timedelta(seconds=execution_timeout) if execution_timeout else None,
                allow_unregistered=allow_unregistered,
            )
            if not wait:
                print(h.id)
                return
            err.print(f"started {h.id}; waiting for the result")
            print(_json(await h.result()))

    run(main)


@app.command()
def result(
    execution_id: str,
    timeout: Annotated[float | None, typer.Option(help="seconds to wait")] = None,
    url: UrlOpt = None,
    namespace: NsOpt = "default",
) -> None:
    """Wait for an execution's result and print it as JSON."""

    async def main() -> None:
        async with connect(url, namespace) as client:
            try:
                value = await client.get_workflow_handle(execution_id).result(timeout=timeout)
            except TimeoutError as e:
                raise Exit(1, f"no result within {timeout} s; the run is still open") from e
            print(_json(value))

    run(main)


@app.command()
def describe(execution_id: str, url: UrlOpt = None, namespace: NsOpt = "default") -> None:
    """Show an execution's state: status, times, pending activities, task failures."""

    async def main() -> None:
        async with connect(url, namespace) as client:
            d = await client.get_workflow_handle(execution_id).describe()
            t = Table(show_header=False, box=None)
            for k, v in [
                ("execution id", d.execution_id),
                ("run id", d.run_id),
                ("workflow", d.workflow_type),
                ("task queue", d.task_queue),
                ("status", d.status),
                ("started", d.start_time.isoformat()),
                ("closed", d.close_time.isoformat() if d.close_time else "-"),
                ("deadline", d.execution_deadline.isoformat() if d.execution_deadline else "-"),
                ("history events", str(d.history_length)),
            ]:
                t.add_row(f"[bold]{k}[/bold]", v)
            out.print(t)
            if d.pending_activities:
                pt = Table("seq", "activity", "state", "attempt", "last failure", title="pending activities")
                for p in d.pending_activities:
                    lf = f"{p.last_failure.type}: {p.last_failure.message}" if p.last_failure else ""
                    pt.add_row(str(p.seq), p.name, p.state, str(p.attempt), lf)
                out.print(pt)
            if d.last_workflow_task_failure:
                f = d.last_workflow_task_failure
                out.print(
                    f"[red]workflow task failing[/red] ({d.workflow_task_failures} times): {f.type}: {f.message}"
                )
                out.print(f.stack.rstrip(), markup=False, highlight=False)

    run(main)


def event_details(e: HistoryEvent) -> str:
    a = e.attributes
    f = a.get("failure") or {}
    match e.type:
        case "WorkflowExecutionStarted":
            return f"{a.get('workflow_type')} input={json.dumps(a.get('input'), default=str)}"
        case "ActivityTaskScheduled":
            return f"#{a.get('seq')} {a.get('name')} input={json.dumps(a.get('input'), default=str)}"
        case "ActivityTaskCompleted":
            return f"#{a.get('seq')} attempt {a.get('att')} result={json.dumps(a.get('result'), default=str)}"
        case "ActivityTaskRetrying" | "ActivityTaskFailed" | "ActivityTaskTimedOut":
            return f"#{a.get('seq')} attempt {a.get('att')} {f.get('type')}: {f.get('message')}"
        case "TimerStarted":
            return f"#{a.get('seq')} {a.get('duration_ms')} ms"
        case "TimerFired" | "TimerCanceled" | "ActivityTaskCancelRequested":
            return f"#{a.get('seq')}"
        case "WorkflowExecutionCompleted":
            return f"result={json.dumps(a.get('result'), default=str)}"
        case "WorkflowExecutionFailed" | "WorkflowTaskFailed":
            return f"{f.get('type')}: {f.get('message')}"
        case "WorkflowExecutionTerminated" | "WorkflowExecutionTimedOut":
            return str(a.get("reason", ""))
    return ""


@app.command()
def history(
    execution_id: str,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per event")] = False,
    url: UrlOpt = None,
    namespace: NsOpt = "default",
) -> None:
    """Print an execution's event history."""

    async def main() -> None:
        async with connect(url, namespace) as client:
            events = await client.get_workflow_handle(execution_id).history()
            if as_json:
                for e in events:
                    rec = {"event_id": e.event_id, "time": e.time.isoformat(), "type": e.type, **e.attributes}
                    print(json.dumps(rec, default=str))
                return
            t = Table("id", "time", "type", "details")
            for e in events:
                t.add_row(str(e.event_id), e.time.strftime("%H:%M:%S.%f")[:-3], e.type, event_details(e))
            out.print(t)

    run(main)


@app.command()
def terminate(
    execution_id: str,
    reason: Annotated[str, typer.Option("--reason", "-r", help="recorded in the history")] = "",
    url: UrlOpt = None,
    namespace: NsOpt = "default",
) -> None:
    """Terminate a running execution at once (no cleanup code runs)."""

    async def main() -> None:
        async with connect(url, namespace) as client:
            try:
                await client.get_workflow_handle(execution_id).terminate(reason)
            except RillflowError as e:
                raise Exit(3, str(e)) from e
            out.print(f"terminated {execution_id}")

    run(main)


@app.command("signal")
def send_signal(
    execution_id: str,
    name: Annotated[str, typer.Argument(help="signal name (see `rillflow schema WORKFLOW`)")],
    input: Annotated[str | None, typer.Option("--input", "-i", help="the signal's input as JSON")] = None,
    url: UrlOpt = None,
    namespace: NsOpt = "default",
) -> None:
    """Send a signal to a running execution. The input is checked against the
    registered schema first: nothing is sent if it fails."""

    async def main() -> None:
        async with connect(url, namespace) as client:
            await client.get_workflow_handle(execution_id).signal(name, _parse_input(input))
            out.print(f"signalled {execution_id}: {name}")

    run(main)


@app.command()
def query(
    execution_id: str,
    name: Annotated[str, typer.Argument(help="query name (see `rillflow schema WORKFLOW`)")],
    input: Annotated[str | None, typer.Option("--input", "-i", help="the query's input as JSON")] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for a worker's answer")] = 10.0,
    url: UrlOpt = None,
    namespace: NsOpt = "default",
) -> None:
    """Ask a worker for a query's answer about an execution (running or closed) and
    print it as JSON. Exit 1 if the handler raised, 5 if no worker answered in time."""

    async def main() -> None:
        async with connect(url, namespace) as client:
            h = client.get_workflow_handle(execution_id)
            print(_json(await h.query(name, _parse_input(input), timeout=timedelta(seconds=timeout))))

    run(main)


@app.command()
def update(
    execution_id: str,
    name: Annotated[str, typer.Argument(help="update name (see `rillflow schema WORKFLOW`)")],
    input: Annotated[str | None, typer.Option("--input", "-i", help="the update's input as JSON")] = None,
    update_id: Annotated[
        str | None, typer.Option("--update-id", help="repeat one to wait for it again")
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="seconds to wait for the result")] = None,
    url: UrlOpt = None,
    namespace: NsOpt = "default",
) -> None:
    """Send an update to a running execution, wait for the handler's result and print
    it as JSON. Exit 1 if the update failed, 5 if it had not finished in time."""

    async def main() -> None:
        async with connect(url, namespace) as client:
            h = client.get_workflow_handle(execution_id)
            result = await h.execute_update(
                name,
                _parse_input(input),
                update_id=update_id,
                timeout=timedelta(seconds=timeout) if timeout is not None else None,
            )
            print(_json(result))

    run(main)


# -- registry -----------------------------------------------------------------------------
@app.command()
def workflows(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per workflow")] = False,
    url: UrlOpt = None,
    namespace: NsOpt = "default",
) -> None:
    """List the workflows registered in the namespace: task queues and live workers."""

    async def main() -> None:
        async with connect(url, namespace) as client:
            entries = await client.registry.workflows()
            if as_json:
                for e in entries:
                    rec = {
                        "name": e.name,
                        "description": e.description,
                        "task_queues": {q: at.isoformat() for q, at in e.task_queues.items()},
                        "live_workers": e.live_workers,
                        "registered_at": e.registered_at.isoformat(),
                        "registered_by": e.registered_by,
                    }
                    print(json.dumps(rec))
                return
            if not entries:
                err.print(f"no workflows registered in namespace {namespace!r}: start a worker")
                return
            t = Table("workflow", "task queue", "live workers", "description")
            for e in entries:
                for q in sorted(e.live_workers):
                    n = len(e.live_workers[q])
                    t.add_row(
                        e.name, q, str(n) if n else "[red]0[/red]", (e.description or "").split("\n")[0]
                    )
            out.print(t)

    run(main)


@app.command()
def workers(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per worker")] = False,
    url: UrlOpt = None,
    namespace: NsOpt = "default",
) -> None:
    """List the live workers: task queue, what they serve, last heartbeat."""

    async def main() -> None:
        async with connect(url, namespace) as client:
            live = await client.registry.workers()
            if as_json:
                for w in live:
                    print(json.dumps({**w.__dict__, "expires_in": w.expires_in.total_seconds()}, default=str))
                return
            t = Table("identity", "task queue", "workflows", "activities", "started", "last heartbeat")
            for w in live:
                t.add_row(
                    w.identity,
                    w.task_queue,
                    ", ".join(w.workflows),
                    str(len(w.activities)),
                    w.started_at.strftime("%Y-%m-%d %H:%M:%S"),
                    w.heartbeat_at.strftime("%H:%M:%S"),
                )
            out.print(t)

    run(main)


@app.command()
def schema(
    name: Annotated[str, typer.Argument(help="workflow name")],
    part: Annotated[
        str, typer.Option("--part", help="all, input, output, signals, queries or updates")
    ] = "all",
    url: UrlOpt = None,
    namespace: NsOpt = "default",
) -> None:
    """Print a workflow's registered JSON schemas: input, output and handlers."""
    parts = ("all", "input", "output", "signals", "queries", "updates")
    if part not in parts:
        raise typer.BadParameter(f"--part must be one of {', '.join(parts)}")

    async def main() -> None:
        async with connect(url, namespace) as client:
            e = await client.registry.workflow(name, with_workers=False)
            if e is None:
                known = await client.registry.names()
                raise Exit(
                    3,
                    f"no workflow named {name!r} is registered in namespace {namespace!r} "
                    f"(registered: {', '.join(known) if known else 'none yet'})",
                )
            doc: dict[str, Any] = {
                "name": e.name,
                "input": e.input_schema,
                "output": e.output_schema,
                **{k: e.handlers.get(k, []) for k in ("signals", "queries", "updates")},
            }
            print(_json(doc if part == "all" else doc[part]))

    run(main)


@app.command()
def unregister(
    name: Annotated[str, typer.Argument(help="workflow name")],
    task_queue: Annotated[
        str | None, typer.Option("--task-queue", "-q", help="only this queue (default: every queue)")
    ] = None,
    url: UrlOpt = None,
    namespace: NsOpt = "default",
) -> None:
    """Forget a registration no worker serves any more (e.g. a queue the workflow left).
    Refused while a live worker serves it there; runs and their history are untouched."""

    async def main() -> None:
        async with connect(url, namespace) as client:
            queues = await client.registry.forget(name, task_queue)
            print(f"unregistered {name} from {', '.join(queues)}")

    run(main)


# -- dev ----------------------------------------------------------------------------------
@app.command()
def dev(
    data_dir: Annotated[Path, typer.Option(help="where the server keeps its AOF")] = DEV_HOME / "dev",
    port: Annotated[int, typer.Option(help="0 = a free port")] = 0,
    once: Annotated[bool, typer.Option("--once", help="exit after the demo instead of serving")] = False,
) -> None:
    """Start an embedded Redis (AOF on), a worker and a demo of real workflows; then
    keep serving until Ctrl-C so other terminals can use `rillflow start`/`history`."""
    from rillflow.devserver import run_dev

    configure_logging("warning")
    try:
        asyncio.run(run_dev(data_dir, port or None, once, out))
    except RillflowError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None


@contextlib.contextmanager
def _no_traceback() -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def main() -> None:
    with _no_traceback():
        app()


if __name__ == "__main__":
    main()
