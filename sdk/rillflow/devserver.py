"""``rillflow dev``: a local server with AOF, a worker, and a demo that prints what
happened; and where other processes find that server.

The demo serves its own task queue under names a user would not pick, so the first
workflow a user writes (say a ``ship_order`` on ``default``) is served by the user's
worker, never taken by the demo's. This module imports little at the top: clients
import it to find the dev server's URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rillflow.errors import RillflowError, WorkflowFailureError

if TYPE_CHECKING:
    from rich.console import Console

    from rillflow.client import Client
    from rillflow.history import HistoryEvent

DEMO_TASK_QUEUE = "rillflow-demo"
URL_ENV = "RILLFLOW_URL"


def home() -> Path:
    """``$RILLFLOW_HOME``, else ``~/.rillflow``: where ``rillflow dev`` keeps its data."""
    return Path(os.environ.get("RILLFLOW_HOME") or Path.home() / ".rillflow")


def url_file() -> Path:
    """Where a running ``rillflow dev`` writes its server's URL (removed when it stops)."""
    return home() / "dev" / "url"


def dev_url() -> str | None:
    """The URL of the running ``rillflow dev`` server, or None if none is running."""
    try:
        return url_file().read_text().strip() or None
    except OSError:
        return None


def default_url(url: str | None = None) -> tuple[str, str] | None:
    """Which Redis to use, and why: ``url`` if given, else ``$RILLFLOW_URL``, else the
    running ``rillflow dev`` server; None if there is none of them. The CLI and
    ``Client.connect()`` follow the same order."""
    if url:
        return url, "--url"
    if env := os.environ.get(URL_ENV):
        return env, f"${URL_ENV}"
    if found := dev_url():
        return found, f"the `rillflow dev` server, from {url_file()}"
    return None


def _check_port_free(port: int) -> None:
    """Refuse a --port something already listens on: the new server could not bind it,
    and its readiness check would be answered by the other one."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as e:
            raise RillflowError(
                f"port {port} is taken ({e.strerror}): pick another --port, or leave it out for a free one"
            ) from None


def _summary(events: list[HistoryEvent]) -> str:
    counts: dict[str, int] = {}
    for e in events:
        counts[e.type] = counts.get(e.type, 0) + 1
    return ", ".join(f"{t} x{n}" if n > 1 else t for t, n in counts.items())


async def _demo(client: Client, out: Console) -> None:
    from rich.table import Table

    from rillflow.cli import event_details
    from rillflow.demo import Order, ProcessOrder, ShipOrder

    out.rule("[bold]demo")
    t0 = time.perf_counter()
    order = Order(order_id="A-1001", items=["kettle", "mug", "tea"], amount=42.5)
    h1 = await client.start_workflow(ProcessOrder, order, execution_id=f"order-A-1001-{int(time.time())}")
    h2 = await client.start_workflow(ShipOrder, {"order_id": "A-1001", "address": "nowhere"})
    h3 = await client.start_workflow("demo_report", {"report_type": "daily"})
    out.print(f"started 3 workflows: {h1.id}, {h2.id}, {h3.id}")
    res = await h1.result(timeout=30)
    out.print(f"[green]demo_process_order completed[/green] in {time.perf_counter() - t0:.2f} s: {res}")
    try:
        await h2.result(timeout=30)
    except WorkflowFailureError as e:
        out.print(f"[yellow]demo_ship_order failed as designed[/yellow]: {e.cause.message}")
    out.print(f"[green]demo_report completed[/green]: {await h3.result(timeout=30)}")
    table = Table("id", "+ms", "event", title=f"history of {h1.id}")
    events = await h1.history()
    for ev in events:
        table.add_row(str(ev.event_id), str(ev.time_ms - events[0].time_ms), f"{ev.type} {event_details(ev)}")
    out.print(table)
    out.print(f"demo_ship_order history: {_summary(await h2.history())}")
    await _refund_demo(client, out)


async def _refund_demo(client: Client, out: Console) -> None:
    from rillflow.demo import Approval, RefundOrder

    out.rule("[bold]signals, queries, updates")
    reg = await client.registry.workflow("demo_refund_order")
    if reg is not None:
        handlers = {k: [h["name"] for h in v] for k, v in reg.handlers.items() if v}
        out.print(f"registry: demo_refund_order on {', '.join(reg.task_queues)}, handlers {handlers}")
    h = await client.start_workflow(RefundOrder, {"order_id": "A-1001", "amount": 42.5})
    while (status := await h.query(RefundOrder.status)).startswith("starting"):
        await asyncio.sleep(0.02)
    out.print(f"query status: {status}")
    out.print(f"update adjust(40.0) answered: {await h.execute_update(RefundOrder.adjust, 40.0)}")
    await h.signal(RefundOrder.approve, Approval(approver="dana"))
    out.print("signal approve sent")
    out.print(f"[green]demo_refund_order completed[/green]: {await h.result(timeout=30)}")
    out.print(f"demo_refund_order history: {_summary(await h.history())}")
    await _children_demo(client, out)


async def _children_demo(client: Client, out: Console) -> None:
    from rich.table import Table

    from rillflow.demo import FulfilOrders, Order

    out.rule("[bold]child workflows, and finding executions")
    orders = [Order(order_id=f"B-{n}", items=["cup"], amount=5.0 * n) for n in (1, 2, 3)]
    h = await client.start_workflow(
        FulfilOrders, {"orders": orders}, execution_id=f"batch-B-{int(time.time())}"
    )
    out.print(f"[green]demo_fulfil_orders completed[/green]: {await h.result(timeout=30)}")
    out.print(f"demo_fulfil_orders history: {_summary(await h.history())}")
    page = await client.list_workflows(page_size=5)
    table = Table("execution id", "workflow", "status", title="the newest runs (rillflow list)")
    for e in page.executions:
        table.add_row(e.execution_id, e.workflow_type, e.status)
    out.print(table)
    counts = {s: await client.count_workflows(status=s) for s in ("completed", "failed", "running")}
    out.print(f"rillflow count: {counts}")
    await _schedule_demo(client, out)


async def _schedule_demo(client: Client, out: Console) -> None:
    from datetime import timedelta

    from rich.table import Table

    from rillflow.demo import ReportWorkflow
    from rillflow.models import ScheduleDefinition, ScheduleInterval

    out.rule("[bold]a schedule")
    sid = f"demo-every-second-{int(time.time())}"
    every_second = ScheduleDefinition(
        input={"report_type": "per-second"},
        intervals=[ScheduleInterval(every=timedelta(seconds=1))],
        max_executions=3,
    )
    h = await client.create_schedule(ReportWorkflow, every_second, schedule_id=sid)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        d = await h.describe()
        if d.remaining_executions == 0 and all(r.status != "running" for r in d.recent_executions):
            break
        await asyncio.sleep(0.2)
    table = Table("execution id", "due", "status", title=f"schedule {sid}: every second, 3 times")
    for col in table.columns:  # (folded, never cut: the id's due time is the point)
        col.overflow = "fold"
    for r in reversed(d.recent_executions):
        table.add_row(r.execution_id, r.scheduled_time.isoformat(), r.status)
    out.print(table)
    await h.delete()
    out.print(f"schedule {sid} deleted (rillflow schedule list shows what is left)")


def _live_url(path: Path) -> str | None:
    """The URL in ``path`` if a server answers there (another dev server's), else None."""
    import redis

    try:
        url = path.read_text().strip()
    except OSError:
        return None
    if not url:
        return None
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5) as r:
            r.ping()
    except (redis.RedisError, OSError, ValueError):
        return None
    return url


async def run_dev(data_dir: Path, port: int | None, once: bool, out: Console) -> None:
    from rillflow.client import Client
    from rillflow.demo import ACTIVITIES, WORKFLOWS
    from rillflow.worker import Worker
    from rillflow_runtime.embedded import EmbeddedRedis, EmbeddedServerError, dir_lock

    if port is not None:
        _check_port_free(port)
    try:
        lock = dir_lock(data_dir)
        lock.__enter__()
    except EmbeddedServerError as e:
        raise RillflowError(str(e)) from e
    server = EmbeddedRedis(data_dir, port=port, appendonly=True, appendfsync="everysec")
    try:
        server.start()
    except EmbeddedServerError as e:
        lock.__exit__(None, None, None)
        raise RillflowError(str(e)) from e
    url_path = url_file()
    # the CLI's default server stays the one that claimed it while that one runs: a second
    # dev server (another --data-dir) is reached with --url
    other = _live_url(url_path)
    claimed = other is None
    try:
        if claimed:
            url_path.parent.mkdir(parents=True, exist_ok=True)
            url_path.write_text(server.url)
    except OSError as e:
        server.stop()
        lock.__exit__(None, None, None)
        raise RillflowError(f"cannot write the server's URL to {url_path}: {e}") from e
    out.print(f"embedded server [bold]{server.url}[/bold] (binary {server.binary}, AOF in {data_dir})")
    if not claimed:
        out.print(
            f"[yellow]another dev server ({other}) is the CLI's default; reach this one with "
            f"--url {server.url}[/yellow]"
        )
    try:
        client = await Client.connect(server.url)
        async with Worker(client, DEMO_TASK_QUEUE, WORKFLOWS, ACTIVITIES, pump_interval=0.1) as worker:
            out.print(
                f"demo worker {worker.identity} serving task queue '{DEMO_TASK_QUEUE}': "
                f"{', '.join(sorted(worker.workflows))}"
            )
            await _demo(client, out)
            if not once:
                out.rule()
                out.print(
                    f"serving at {server.url}; the CLI finds it by itself (through {url_path}),\n"
                    "so in another terminal try:\n"
                    '  rillflow start demo_report --input \'{"report_type": "weekly"}\' --wait\n'
                    "  rillflow history <execution id>\n"
                    "  rillflow workflows; rillflow schema demo_refund_order\n"
                    "  rillflow worker yourmodule    # your own workflows, on task queue 'default'\n"
                    f"  redis-cli -p {server.port} --scan --pattern 'rf:*'\n"
                    "Ctrl-C stops the worker and the server (the data stays in the AOF)."
                )
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    with contextlib.suppress(NotImplementedError):
                        loop.add_signal_handler(sig, stop.set)
                await stop.wait()
        await client.close()
    finally:
        with contextlib.suppress(OSError):
            if claimed and url_path.read_text().strip() == server.url:
                url_path.unlink()
        server.stop()
        lock.__exit__(None, None, None)
        out.print("stopped")
