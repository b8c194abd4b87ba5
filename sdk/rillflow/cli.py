"""The ``rillflow`` command.

Exit codes: 0 success; 1 the workflow failed, timed out, was canceled or terminated (or
a query or update handler failed, or an update was rejected); 2 bad usage or input; 3 no such execution or workflow, or it
is already running; 4 Redis unreachable, or refusing us (credentials, ACL permissions,
a database number it does not have, a read-only replica); 5 no answer in time (a query
or an update). A user's mistake is one line on stderr, never a traceback.

Which Redis: ``--url``, else ``$RILLFLOW_URL``, else the running ``rillflow dev`` server
(whose URL it keeps in ``$RILLFLOW_HOME/dev/url``, ``~/.rillflow/dev/url`` by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import json
import os
import re
import signal as _signals
import sys
import time
import traceback
import zlib
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import structlog
import typer
from redis.exceptions import (
    AuthenticationError,
    RedisError,
)
from rich.markup import escape
from rich.table import Table

from rillflow.activity import ActivityDefinition
from rillflow.cli_support import (
    Exit,
    NsOpt,
    UrlOpt,
    _fail,
    _json,
    _json_default,
    _parse_input,
    _utf8,
    _when,
    connect,
    err,
    out,
    redact,
    redis_exit,
    resolve_url,
    run,
)
from rillflow.client import Client
from rillflow.devserver import home
from rillflow.durations import MAX_DURATION
from rillflow.errors import (
    RillflowError,
    safe_text,
)
from rillflow.history import HistoryEvent
from rillflow.reset import last_good
from rillflow.schedule_cli import schedule_app
from rillflow_runtime.connections import TRANSIENT, wait_until_reachable

app = typer.Typer(
    help="rillflow: durable workflows in plain async Python, on nothing but Redis.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(schedule_app, name="schedule")
ExecIdArg = Annotated[str, typer.Argument(help="the execution id", callback=_utf8)]
RunIdOpt = Annotated[
    str | None,
    typer.Option(
        "--run-id", callback=_utf8, help="an earlier run of the execution (default: its current run)"
    ),
]


def _positive(value: float | None, option: str) -> None:
    if value is not None and not 0 < value <= MAX_SECONDS:
        raise Exit(2, f"{option} must be a positive number of seconds up to {MAX_SECONDS:g}, got {value:g}")


MAX_SECONDS = MAX_DURATION.total_seconds()


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def configure_logging(level: str = "info") -> None:
    import logging

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )


def _first_sentence(text: str) -> str:
    """A description's first sentence, whole even when it runs over several lines."""
    paragraph = " ".join(text.split("\n\n")[0].split())
    return re.split(r"(?<=[.!?])\s", paragraph, maxsplit=1)[0]


# -- worker -------------------------------------------------------------------------------
def _import_file(path: Path) -> ModuleType:
    """The module of file ``path``: by its name (its folder is on sys.path, so that it
    can import its neighbours) when that name finds this file, else from the file under
    a name of its own, so that a file named like another module (queue.py, select.py,
    one imported already) is never mistaken for it nor replaces it."""
    spec = None
    if "." not in path.stem:  # (a dotted stem names a package's module: never this file)
        with contextlib.suppress(ImportError, ValueError):
            spec = importlib.util.find_spec(path.stem)
    if spec is not None and spec.origin and Path(spec.origin).resolve() == path.resolve():
        return importlib.import_module(path.stem)
    stem = re.sub(r"\W", "_", path.stem)
    name = f"rillflow_file_{zlib.crc32(str(path.resolve()).encode()):08x}_{stem}"
    if (mod := sys.modules.get(name)) is not None:
        return mod
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise Exit(2, f"{str(path)!r} cannot be imported as a Python module")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # (before it runs: pydantic and dataclasses look it up)
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod


def load_target(target: str) -> tuple[list[type], list[ActivityDefinition]]:
    """``module`` (every workflow and activity it defines) or ``module:attr`` (a class,
    an activity, or a list of them); ``module`` may be the path of its file."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    mod_name, _, attr = target.partition(":")
    path: Path | None = None
    if not mod_name:
        raise Exit(2, f"{target!r} names no module: use module or module:attr")
    if mod_name.endswith(".py"):  # a file (./shop.py): imported by name from its directory
        path = Path(mod_name)
        if not path.is_file():
            raise Exit(2, f"no file {mod_name!r} (give a module name, shop, or the path of a .py file)")
        folder = str(path.resolve().parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        mod_name = path.stem
    try:
        mod = _import_file(path) if path else importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and mod_name.startswith(e.name):  # the module itself, not one it imports
            raise Exit(
                2, f"cannot import {mod_name!r}: {e} (run from its directory, or add that to PYTHONPATH)"
            ) from e
        raise Exit(2, f"cannot import {mod_name!r}: {_located(e)}") from e
    except Exception as e:  # the module's own code failed: say where, in one line
        raise Exit(2, f"cannot import {mod_name!r}: {_located(e)}") from e
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


def _located(e: BaseException) -> str:
    """``e`` with the line of the user's code it came from, as a one-line message
    (not a line of rillflow's or of the import machinery)."""
    if isinstance(e, SyntaxError) and e.filename:
        return f"{type(e).__name__}: {e.msg} ({e.filename}, line {e.lineno})"
    ours = str(Path(__file__).resolve().parent)
    frames = [
        f
        for f in traceback.extract_tb(e.__traceback__)
        if not f.filename.startswith(("<frozen", ours)) and "importlib" not in f.filename
    ]
    at = f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
    return f"{type(e).__name__}: {e}{at}"


def _sigterm_to_stop(stop: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (_signals.SIGTERM, _signals.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop)


@app.command()
def worker(
    target: Annotated[
        str,
        typer.Argument(
            help="module, module:attr or path/to/module.py[:attr] holding workflows and activities",
            callback=_utf8,
        ),
    ],
    task_queue: Annotated[str, typer.Option("--task-queue", "-q", callback=_utf8)] = "default",
    max_concurrent_activities: Annotated[int, typer.Option()] = 100,
    max_eager_activities: Annotated[
        int,
        typer.Option(
            help="activities a workflow task hands straight to this worker (0: all go through the queue)"
        ),
    ] = 3,
    sticky_timeout: Annotated[
        float,
        typer.Option(
            help="seconds this worker gets to start the next task of a run it caches before any worker "
            "may (0: no sticky queue, and no workflow task started by an activity's result)"
        ),
    ] = 2.0,
    grace: Annotated[float, typer.Option(help="seconds running activities get to finish on SIGTERM")] = 30.0,
    identity: Annotated[
        str | None,
        typer.Option(
            help="the worker's name in `rillflow workers` (default: host-pid-random)", callback=_utf8
        ),
    ] = None,
    heartbeat: Annotated[
        float, typer.Option(help="seconds between liveness refreshes; the record lives three times that")
    ] = 10.0,
    url: UrlOpt = None,
    namespace: NsOpt = "default",
    log_level: Annotated[str, typer.Option()] = "info",
    wait_for_redis: Annotated[
        float,
        typer.Option(
            help="seconds a worker started while Redis is unreachable (restarting, loading, failing "
            "over) waits for it, logging each try, before it exits 4 (0: exit at once)"
        ),
    ] = 60.0,
) -> None:
    """Run a worker until SIGTERM or Ctrl-C (then it stops taking tasks, lets running
    activities finish within --grace seconds, and exits 0)."""
    from rillflow.worker import Worker

    configure_logging(log_level)

    async def main() -> None:
        # every option checked before anything waits for Redis
        if grace < 0:
            raise Exit(2, f"--grace must not be negative, got {grace:g}")
        if sticky_timeout < 0:
            raise Exit(2, f"--sticky-timeout must not be negative, got {sticky_timeout:g}")
        if wait_for_redis < 0:
            raise Exit(2, f"--wait-for-redis must not be negative, got {wait_for_redis:g}")
        if max_concurrent_activities < 1:
            raise Exit(2, f"--max-concurrent-activities must be at least 1, got {max_concurrent_activities}")
        if max_eager_activities < 0:
            raise Exit(2, f"--max-eager-activities must not be negative, got {max_eager_activities}")
        if heartbeat <= 0:
            raise Exit(2, f"--heartbeat must be a positive number of seconds, got {heartbeat:g}")
        if log_level.lower() not in LOG_LEVELS:
            raise Exit(2, f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
        wfs, acts = load_target(target)
        target_url, source = resolve_url(url)
        log = structlog.get_logger("rillflow.worker")

        def waiting(e: BaseException, delay: float) -> None:
            log.warning(
                "waiting for Redis",
                url=redact(target_url),
                source=source,
                error=safe_text(str(e)),
                retry_in_s=delay,
            )

        started = time.monotonic()

        async def reach() -> Client:
            """Redis, waited for until --wait-for-redis runs out: at start, and again if it
            goes away while the worker connects (a restart, a failover)."""
            while True:
                left = max(0.0, wait_for_redis - (time.monotonic() - started))
                try:
                    await wait_until_reachable(target_url, left, waiting)
                    return await Client.connect(target_url, namespace)
                except RedisError as e:
                    gone = isinstance(e, TRANSIENT) and not isinstance(e, AuthenticationError)
                    if gone and time.monotonic() - started < wait_for_redis:
                        waiting(e, 0.25)
                        await asyncio.sleep(0.25)
                        continue
                    exit_ = redis_exit(e, target_url, source)
                    if exit_ is None:
                        raise
                    if gone and wait_for_redis:
                        waited = time.monotonic() - started
                        exit_ = Exit(exit_.code, f"{exit_} (after waiting {waited:.0f} s: --wait-for-redis)")
                    raise exit_ from None

        client = await reach()
        try:
            w = Worker(
                client,
                task_queue,
                wfs,
                acts,
                max_concurrent_activities=max_concurrent_activities,
                max_eager_activities=max_eager_activities,
                sticky_schedule_timeout=timedelta(seconds=sticky_timeout) if sticky_timeout else None,
                graceful_shutdown_timeout=timedelta(seconds=grace),
                identity=identity,
                heartbeat_interval=timedelta(seconds=heartbeat),
            )
            _sigterm_to_stop(w._stopping.set)
            await w.run()
        except RedisError as e:
            exit_ = redis_exit(e, target_url, source)
            if exit_ is None:
                raise
            raise exit_ from None
        finally:
            await client.close()

    run(main)


# -- client commands ----------------------------------------------------------------------
@app.command()
def start(
    name: Annotated[str, typer.Argument(help="workflow name", callback=_utf8)],
    input: Annotated[
        str | None,
        typer.Option("--input", "-i", help="input as JSON (see `rillflow schema NAME`)", callback=_utf8),
    ] = None,
    id: Annotated[
        str | None, typer.Option("--id", help="execution id (default: a new uuid)", callback=_utf8)
    ] = None,
    task_queue: Annotated[
        str | None,
        typer.Option(
            "--task-queue", "-q", help="default: the queue the workflow is registered on", callback=_utf8
        ),
    ] = None,
    execution_timeout: Annotated[float | None, typer.Option(help="seconds")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="wait for the result and print it")] = False,
    allow_unregistered: Annotated[
        bool,
        typer.Option(
            "--allow-unregistered", help="start even if no worker has registered NAME yet (no validation)"
        ),
    ] = False,
    signal: Annotated[
        str | None,
        typer.Option(
            "--signal",
            help="signal-with-start: send this signal to execution --id, starting it first only if no "
            "run of it is running (one atomic call)",
            callback=_utf8,
        ),
    ] = None,
    signal_input: Annotated[
        str | None, typer.Option("--signal-input", help="the signal's input as JSON", callback=_utf8)
    ] = None,
    url: UrlOpt = None,
    namespace: NsOpt = "default",
) -> None:
    """Start a workflow; print its execution id (or, with --wait, its result). The input
    is checked against the registered schema first: nothing is written if it fails.
    With --signal, signal the execution's running run instead if it has one."""

    async def main() -> None:
        _positive(execution_timeout, "--execution-timeout")
        if signal is None and signal_input is not None:
            raise Exit(2, "--signal-input needs --signal NAME")
        if signal is not None and id is None:
            raise Exit(2, "--signal needs --id: the execution to signal, or to start")
        data = _parse_input(input)
        sdata = _parse_input(signal_input, "--signal-input") if signal is not None else None
        timeout = timedelta(seconds=execution_timeout) if execution_timeout is not None else None
        async with connect(url, namespace) as client:
            if signal is not None and id is not None:
                h = await client.signal_with_start(
                    name,
                    data,
                    execution_id=id,
                    signal=signal,
                    signal_payload=sdata,
                    task_queue=task_queue,
                    execution_timeout=timeout,
                    allow_unregistered=allow_unregistered,
                )
                err.print(f"{'started' if h.started else 'signalled running'} {h.id}: {signal}")
            else:
                h = await client.start_workflow(
                    name,
                    data,
                    execution_id=id,
                    task_queue=task_queue,
                    execution_timeout=timeout,
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
    execution_id: ExecIdArg,
    timeout: Annotated[float | None, typer.Option(help="seconds to wait")] = None,
    run_id: RunIdOpt = None,
    url: UrlOpt = None,
    namespace: NsOpt = "default",
) -> None:
    """Wait for an execution's result and print it as JSON (a run that continued as new:
    the result of the last run of its chain)."""

    async def main() -> None:
        _positive(timeout, "--timeout")
        async with connect(url, namespace) as client:
            try:
                value = await client.get_workflow_handle(execution_id, run_id=run_id).result(timeout=timeout)
            except TimeoutError as e:
                raise Exit(1, f"no result within {timeout} s; the run is still open") from e
            print(_json(value))

    run(main)


def _filters(
    status: str | None,
    workflow_type: str | None,
    task_queue: str | None,
    execution_id: str | None,
    after: str | None,
    before: str | None,
    schedule_id: str | None = None,
) -> dict[str, Any]:
    """`list` and `count`'s filter options as list_workflows / count_workflows take them."""
    return {
        "status": status,
        "workflow_type": workflow_type,
        "task_queue": task_queue,
        "execution_id": execution_id,
        "schedule_id": schedule_id,
        "started_after": _when(after, "--after"),
        "started_before": _when(before, "--before"),
    }


StatusOpt = Annotated[
    str | None,
    typer.Option(
        "--status", help="running, completed, failed, timed_out, terminated, canceled, continued_as_new"
    ),
]
TypeOpt = Annotated[str | None, typer.Option("--type", help="only runs of this workflow")]
QueueOpt = Annotated[str | None, typer.Option("--task-queue", help="only runs on this task queue")]
IdOpt = Annotated[str | None, typer.Option("--id", help="only the runs of this execution id")]
AfterOpt = Annotated[str | None, typer.Option("--after", help="started at or after this ISO time")]
BeforeOpt = Annotated[str | None, typer.Option("--before", help="started before this ISO time")]
ScheduleOpt = Annotated[str | None, typer.Option("--schedule", help="only the runs this schedule started")]


@app.command(name="list")
def list_(
    status: StatusOpt = None,
    workflow_type: TypeOpt = None,
    task_queue: QueueOpt = None,
    execution_id: IdOpt = None,
    after: AfterOpt = None,
    before: BeforeOpt = None,
    schedule_id: ScheduleOpt = None,
    limit: Annotated[int, typer.Option("--limit", help="runs per page (1-1000)")] = 20,
    page_token: Annotated[
        str | None, typer.Option("--page-token", help="the next page, as the last one said")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="one JSON object: the runs and the next page token")
    ] = False,
    url: UrlOpt = None,
    namespace: NsOpt = "default",
) -> None:
    """List runs, newest first, across shards: running ones and closed ones still retained."""

    async def main() -> None:
        if not 1 <= limit <= 1000:
            raise Exit(2, f"--limit must be from 1 to 1000, got {limit}")
        async with connect(url, namespace) as client:
            flt = _filters(status, workflow_type, task_queue, execution_id, after, before, schedule_id)
            page = await client.list_workflows(**flt, page_size=limit, next_page_token=page_token)
            if as_json:
                rows = [e.to_json() for e in page.executions]
                print(json.dumps({"executions": rows, "next_page_token": page.next_page_token}, indent=2))
                return
            t = Table("execution id", "run id", "workflow", "status", "started", "closed", "schedule")
            for col in t.columns:  # (folded, never cut: an id on screen can be copied)
                col.overflow = "fold"
            for e in page.executions:
                closed = e.close_time.isoformat(timespec="milliseconds") if e.close_time else ""
                t.add_row(
                    escape(e.execution_id),
                    e.run_id,
                    escape(e.workflow_type),
                    e.status,
                    e.start_time.isoformat(timespec="milliseconds"),
                    closed,
                    escape(e.schedule_id or ""),
                )
            if page.executions:
                out.print(t)
            else:
                out.print("no runs match" + (" on this page" if page.next_page_token else ""))
            if page.next_page_token:
                out.print(f"more: --page-token {page.next_page_token}")

    run(main)


@app.command()
def count(
    status: StatusOpt = None,
    workflow_type: TypeOpt = None,
    task_queue: QueueOpt = None,
    execution_id: IdOpt = None,
    after: AfterOpt = None,
    before: BeforeOpt = None,
    schedule_id: ScheduleOpt = None,
    url: UrlOpt = None,
    namespace: NsOpt = "default",
) -> None:
    """Count the runs `list` would list with the same filters."""

    async def main() -> None:
        async with connect(url, namespace) as client:
            print(
                await client.count_workflows(
                    **_filters(status, workflow_type, task_queue, execution_id, after, before, schedule_id)
                )
            )

    run(main)


@app.command()
def describe(
    execution_id: ExecIdArg, run_id: RunIdOpt = None, url: UrlOpt = None, namespace: NsOpt = "default"
) -> None:
    """Show an execution's state: status, times, result or failure, pending activities,
    task failures."""

    async def main() -> None:
        async with connect(url, namespace) as client:
            d = await client.get_workflow_handle(execution_id, run_id=run_id).describe()
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
                *([("result", _json(d.result))] if d.status == "completed" else []),
                *([("failure", f"{d.failure.type}: {d.failure.message}")] if d.failure else []),
                *([("continued as", d.next_run_id)] if d.next_run_id else []),
                *(
                    [("parent", f"{d.parent_execution_id} (run {d.parent_run_id})")]
                    if d.parent_execution_id
                    else []
                ),
            ]:
                t.add_row(f"[bold]{k}[/bold]", escape(v))
            out.print(t)
            if d.pending_activities:
                pt = Table(
                    "seq",
                    "activity",
                    "state",
                    "attempt",
                    "next attempt",
                    "last failure",
                    title="pending activities",
                )
                for p in d.pending_activities:
                    lf = f"{p.last_failure.type}: {p.last_failure.message}" if p.last_failure else ""
                    nxt = p.next_attempt_time.isoformat() if p.next_attempt_time else ""
                    pt.add_row(str(p.seq), escape(p.name), p.state, str(p.attempt), nxt, escape(lf))
                out.print(pt)
            if d.pending_timers:
                tt = Table("seq", "fires at", title="pending timers")
                for timer in d.pending_timers:
                    tt.add_row(str(timer.seq), timer.fire_time.isoformat())
                out.print(tt)
            if d.pending_children:
                ct = Table(
                    "seq", "child execution", "first run", "state", "parent close policy", title="children"
                )
                for c in d.pending_children:
                    ct.add_row(str(c.seq), escape(c.execution_id), c.run_id, c.state, c.parent_close_policy)
                out.print(ct)
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
            after = f" continued from {a['continued_from']}" if a.get("continued_from") else ""
            return f"{a.get('workflow_type')} input={json.dumps(a.get('input'), default=str)}{after}"
        case "WorkflowExecutionContinuedAsNew":
            return f"next run {a.get('next_run_id')}"
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
        case "WorkflowExecutionTerminated" | "WorkflowExecutionTimedOut" | "WorkflowExecutionCanceled":
            return str(a.get("reason", ""))
        case "WorkflowExecutionCancelRequested":
            return str(a.get("reason", ""))
        case "MarkerRecorded":
            return f"{a.get('marker')} {a.get('id')}" + (" (deprecated)" if a.get("deprecated") else "")
        case "StartChildWorkflowExecutionInitiated":
            return f"#{a.get('seq')} {a.get('workflow_type')} id={a.get('workflow_id')} policy={a.get('parent_close_policy')}"
        case "ChildWorkflowExecutionStarted":
            return f"#{a.get('seq')} id={a.get('workflow_id')} run={a.get('run_id')}"
        case "ChildWorkflowExecutionCompleted":
            return f"#{a.get('seq')} result={json.dumps(a.get('result'), default=str)}"
        case (
            "ChildWorkflowExecutionFailed"
            | "ChildWorkflowExecutionTimedOut"
            | "ChildWorkflowExecutionTerminated"
            | "ChildWorkflowExecutionCanceled"
        ):
            why = f"{f.get('type')}: {f.get('message')}" if f else str(a.get("reason", ""))
            return f"#{a.get('seq')} {why}"
        case "StartChildWorkflowExecutionFailed" | "SignalExternalWorkflowExecutionFailed":
            return f"#{a.get('seq')} {a.get('why')}"
        case "SignalExternalWorkflowExecutionInitiated":
            return f"#{a.get('seq')} {a.get('name')}"
    return ""


@app.command()
def replay(
    target: Annotated[
        str, typer.Argument(help="the workflows' module (or .py file), or module:attr, as for `worker`")
    ],
    execution_ids: Annotated[
        list[str] | None, typer.Argument(help="executions to replay from Redis (their current run)")
    ] = None,
    files: Annotated[
        list[Path] | None,
        typer.Option("--file", "-f", help="a history exported by `rillflow history --json` (repeatable)"),
    ] = None,
    run_id: RunIdOpt = None,
    url: UrlOpt = None,
    namespace: NsOpt = "default",
) -> None:
    """Replay recorded histories against the current code: exit 1 if any would not
    replay (non-determinism), so a deploy can be checked before it ships."""
    from rillflow.replayer import Replayer, ReplayResult, load_history_json

    ids, paths = list(execution_ids or []), list(files or [])
    if not ids and not paths:
        raise _fail(2, "give execution ids to replay from Redis, or --file with an exported history")
    if run_id and len(ids) != 1:
        raise _fail(2, "--run-id names a run of one execution: give exactly one execution id")

    def report(res: ReplayResult) -> None:
        where = f"{res.execution_id} run {res.run_id} ({res.workflow_type}, {res.events} events)"
        if res.ok:
            out.print(f"[green]ok[/green]    {escape(where)}", soft_wrap=True)
        else:
            out.print(
                f"[red]FAIL[/red]  {escape(where)}: {escape(safe_text(str(res.failure)))}", soft_wrap=True
            )

    async def main() -> None:
        workflows, _ = load_target(target)
        if not workflows:
            raise Exit(2, f"{target} defines no workflows")
        replayer = Replayer(workflows)
        results = []
        for path in paths:
            try:
                raw = path.read_text(encoding="utf-8")
            except OSError as e:
                raise Exit(2, f"cannot read {path}: {e.strerror or e}") from e
            events = load_history_json(raw, str(path))
            first = events[0].attributes if events else {}
            res = replayer.replay(
                events,
                execution_id=str(first.get("execution_id") or path.stem),
                run_id=str(first.get("run_id") or "-"),
            )
            report(res)
            results.append(res)
        if ids:
            async with connect(url, namespace) as client:
                for wid in ids:
                    res = await replayer.replay_execution(client, wid, run_id)
                    report(res)
                    results.append(res)
        failed = sum(not r.ok for r in results)
        if failed:
            raise Exit(1, f"{failed} of {len(results)} histories do not replay on this code")
        out.print(f"{len(results)} replayed, all deterministic")

    run(main)


@app.command()
def history(
    execution_id: ExecIdArg,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per event")] = False,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow", "-f", help="then print each new event as it is appended, until the execution closes"
        ),
    ] = False,
    run_id: RunIdOpt = None,
    url: UrlOpt = None,
    namespace: NsOpt = "default",
) -> None:
    """Print an execution's event history."""

    def as_record(e: HistoryEvent, *names: str) -> str:
        rec = {
            "event_id": e.event_id,
            "time": e.time.isoformat(),
            "type": e.type,
            "size": e.size,
            **dict(zip(("execution_id", "run_id"), names, strict=False)),
            **e.attributes,
        }
        return json.dumps(rec, default=_json_default)

    async def main() -> None:
        async with connect(url, namespace) as client:
            handle = client.get_workflow_handle(execution_id, run_id=run_id)
            if follow:  # a line per event, flushed as it comes: a table waits for its end
                async for e in handle.follow_history():
                    if as_json:
                        print(as_record(e), flush=True)
                    else:
                        line = f"{e.event_id:>5}  {e.time.strftime('%H:%M:%S.%f')[:-3]}  {e.type}  {event_details(e)}"
                        print(line.rstrip(), flush=True)
                return
            events = await handle.history()
            if as_json:
                # the first record names the run, so that a replay of the file can say whose
                run = await handle._resolve_run()
                for e in events:
                    print(as_record(e, execution_id, run) if e.event_id == 1 else as_record(e))
                return
            t = Table("id", "time", "type", "details")
            for e in events:
                t.add_row(str(e.event_id), e.time.strftime("%H:%M:%S.%f")[:-3], e.type, event_details(e))
            out.print(t)

    run(main)


@app.command()
def terminate(
    execution_id: ExecIdArg,
    reason: Annotated[
        str, typer.Option("--reason", "-r", help="recorded in the history", callback=_utf8)
    ] = "",
    url: UrlOpt = None,
    namespace: NsOpt = "default",
) -> None:
    """Terminate a running execution at once (no cleanup code runs)."""
    _stop(execution_id, url, namespace, lambda h: h.terminate(reason), f"terminated {execution_id}")


def _stop(
    execution_id: str, url: str | None, namespace: str, how: Callable[[Any], Awaitable[None]], said: str
) -> None:
    """terminate and cancel: ``how`` on the execution's handle; one not running is exit 3."""

    async def main() -> None:
        async with connect(url, namespace) as client:
            try:
                await how(client.get_workflow_handle(execution_id))
            except RillflowError as e:
                raise Exit(3, str(e)) from e
            out.print(said)

    run(main)


@app.command()
def cancel(
    execution_id: ExecIdArg,
    reason: Annotated[
        str, typer.Option("--reason", "-r", help="recorded in the history", callback=_utf8)
    ] = "",
    url: UrlOpt = None,
    namespace: NsOpt = "default",
) -> None:
    """Ask a running execution to cancel: its code gets asyncio.CancelledError where it
    waits, may clean up, and ends as canceled (see `rillflow terminate` for a hard stop)."""
    _stop(execution_id, url, namespace, lambda h: h.cancel(reason), f"cancel requested for {execution_id}")


@app.command()
def reset(
    execution_id: ExecIdArg,
    event_id: Annotated[
        int | None, typer.Option("--event-id", "-e", help="a WorkflowTaskCompleted event of the run")
    ] = None,
    to: Annotated[
        str | None,
        typer.Option("--to", help="last-good: the last WorkflowTaskCompleted before the run's first failure"),
    ] = None,
    reason: Annotated[
        str, typer.Option("--reason", "-r", help="recorded in both runs' histories", callback=_utf8)
    ] = "",
    exclude_signals: Annotated[
        bool, typer.Option("--exclude-signals", help="drop the signals recorded after that point")
    ] = False,
    exclude_updates: Annotated[
        bool, typer.Option("--exclude-updates", help="drop the updates recorded after that point")
    ] = False,
    run_id: RunIdOpt = None,
    url: UrlOpt = None,
    namespace: NsOpt = "default",
) -> None:
    """Run an execution again from one of its workflow tasks, with the code deployed now:
    a new run with the events before it; the old run, if running, is terminated."""
    if (event_id is None) == (to is None):
        raise _fail(2, "give --event-id N or --to last-good (one of them)")
    if to is not None and to != "last-good":
        raise _fail(2, f"--to takes last-good, got {to!r}")

    async def main() -> None:
        async with connect(url, namespace) as client:
            target = event_id
            if target is None:
                events = await client.get_workflow_handle(execution_id, run_id=run_id).history()
                target = last_good(events)
            h = await client.reset_workflow(
                execution_id, target, reason or None, exclude_signals, exclude_updates, run_id=run_id
            )
            out.print(f"reset {execution_id} to event {target}: new run {h.run_id}")

    run(main)


@app.command("signal")
def send_signal(
    execution_id: ExecIdArg,
    name: Annotated[str, typer.Argument(help="signal name (see `rillflow schema WORKFLOW`)", callback=_utf8)],
    input: Annotated[
        str | None, typer.Option("--input", "-i", help="the signal's input as JSON", callback=_utf8)
    ] = None,
    url: UrlOpt = None,
    namespace: NsOpt = "default",
) -> None:
    """Send a signal to a running execution. The input is checked against the
    registered schema first: nothing is sent if it fails."""

    async def main() -> None:
        data = _parse_input(input)
        async with connect(url, namespace) as client:
            await client.get_workflow_handle(execution_id).signal(name, data)
            out.print(f"signalled {execution_id}: {name}")

    run(main)


@app.command()
def query(
    execution_id: ExecIdArg,
    name: Annotated[str, typer.Argument(help="query name (see `rillflow schema WORKFLOW`)", callback=_utf8)],
    input: Annotated[
        str | None, typer.Option("--input", "-i", help="the query's input as JSON", callback=_utf8)
    ] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for a worker's answer")] = 10.0,
    url: UrlOpt = None,
    namespace: NsOpt = "default",
) -> None:
    """Ask a worker for a query's answer about an execution (running or closed) and
    print it as JSON. Exit 1 if the handler raised, 5 if no worker answered in time."""

    async def main() -> None:
        _positive(timeout, "--timeout")
        data = _parse_input(input)
        async with connect(url, namespace) as client:
            h = client.get_workflow_handle(execution_id)
            print(_json(await h.query(name, data, timeout=timedelta(seconds=timeout))))

    run(main)


@app.command()
def update(
    execution_id: ExecIdArg,
    name: Annotated[str, typer.Argument(help="update name (see `rillflow schema WORKFLOW`)", callback=_utf8)],
    input: Annotated[
        str | None, typer.Option("--input", "-i", help="the update's input as JSON", callback=_utf8)
    ] = None,
    update_id: Annotated[
        str | None, typer.Option("--update-id", help="repeat one to wait for it again", callback=_utf8)
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="seconds to wait for the result")] = None,
    url: UrlOpt = None,
    namespace: NsOpt = "default",
) -> None:
    """Send an update to a running execution, wait for the handler's result and print
    it as JSON. Exit 1 if the update failed, 5 if it had not finished in time."""

    async def main() -> None:
        _positive(timeout, "--timeout")
        data = _parse_input(input)
        async with connect(url, namespace) as client:
            h = client.get_workflow_handle(execution_id)
            result = await h.execute_update(
                name,
                data,
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
                        e.name,
                        q,
                        str(n) if n else "[red]0[/red]",
                        _first_sentence(e.description or ""),
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
    name: Annotated[str, typer.Argument(help="workflow name", callback=_utf8)],
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
    name: Annotated[str, typer.Argument(help="workflow name", callback=_utf8)],
    task_queue: Annotated[
        str | None,
        typer.Option("--task-queue", "-q", help="only this queue (default: every queue)", callback=_utf8),
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
    data_dir: Annotated[
        Path | None,
        typer.Option(help="where the server keeps its AOF (default: $RILLFLOW_HOME/dev, ~/.rillflow/dev)"),
    ] = None,
    port: Annotated[int, typer.Option(help="0 = a free port", min=0, max=65535)] = 0,
    once: Annotated[bool, typer.Option("--once", help="exit after the demo instead of serving")] = False,
) -> None:
    """Start an embedded Redis (AOF on), a worker and a demo of real workflows; then
    keep serving until Ctrl-C. Other terminals' `rillflow` commands find the server by
    themselves, with no --url."""
    from rillflow.devserver import run_dev

    configure_logging("warning")
    try:
        asyncio.run(run_dev(data_dir or home() / "dev", port or None, once, out))
    except RillflowError as e:
        raise _fail(2, str(e)) from None
    except OSError as e:  # an unusable --data-dir
        raise _fail(2, f"cannot start the dev server: {e}") from None


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
