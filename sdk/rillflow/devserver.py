"""``rillflow dev``: a local server with AOF, a worker, and a demo that prints what
happened."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rillflow.cli import event_details
from rillflow.client import Client
from rillflow.errors import RillflowError, WorkflowFailureError
from rillflow.history import HistoryEvent
from rillflow_runtime.embedded import EmbeddedRedis, EmbeddedServerError, dir_lock


def _summary(events: list[HistoryEvent]) -> str:
    counts: dict[str, int] = {}
    for e in events:
        counts[e.type] = counts.get(e.type, 0) + 1
    return ", ".join(f"{t} x{n}" if n > 1 else t for t, n in counts.items())


async def _demo(client: Client, out: Console) -> None:
    from rillflow.demo import Order, ProcessOrder, ShipOrder

    out.rule("[bold]demo")
    t0 = time.perf_counter()
    order = Order(order_id="A-1001", items=["kettle", "mug", "tea"], amount=42.5)
    h1 = await client.start_workflow(ProcessOrder, order, execution_id=f"order-A-1001-{int(time.time())}")
    h2 = await client.start_workflow(ShipOrder, {"order_id": "A-1001", "address": "nowhere"})
    h3 = await client.start_workflow("report_workflow", {"report_type": "daily"})
    out.print(f"started 3 workflows: {h1.id}, {h2.id}, {h3.id}")
    res = await h1.result(timeout=30)
    out.print(f"[green]process_order completed[/green] in {time.perf_counter() - t0:.2f} s: {res}")
    try:
        await h2.result(timeout=30)
    except WorkflowFailureError as e:
        out.print(f"[yellow]ship_order failed as designed[/yellow]: {e.cause.message}")
    out.print(f"[green]report_workflow completed[/green]: {await h3.result(timeout=30)}")
    table = Table("id", "+ms", "event", title=f"history of {h1.id}")
    events = await h1.history()
    for ev in events:
        table.add_row(str(ev.event_id), str(ev.time_ms - events[0].time_ms), f"{ev.type} {event_details(ev)}")
    out.print(table)
    out.print(f"ship_order history: {_summary(await h2.history())}")
    await _refund_demo(client, out)


async def _refund_demo(client: Client, out: Console) -> None:
    from rillflow.demo import Approval, RefundOrder

    out.rule("[bold]signals, queries, updates")
    reg = await client.registry.workflow("refund_order")
    if reg is not None:
        handlers = {k: [h["name"] for h in v] for k, v in reg.handlers.items() if v}
        out.print(f"registry: refund_order on {', '.join(reg.task_queues)}, handlers {handlers}")
    h = await client.start_workflow(RefundOrder, {"order_id": "A-1001", "amount": 42.5})
    while (status := await h.query(RefundOrder.status)).startswith("starting"):
        await asyncio.sleep(0.02)
    out.print(f"query status: {status}")
    out.print(f"update adjust(40.0) answered: {await h.execute_update(RefundOrder.adjust, 40.0)}")
    await h.signal(RefundOrder.approve, Approval(approver="dana"))
    out.print("signal approve sent")
    out.print(f"[green]refund_order completed[/green]: {await h.result(timeout=30)}")
    out.print(f"refund_order history: {_summary(await h.history())}")


async def run_dev(data_dir: Path, port: int | None, once: bool, out: Console) -> None:
    from rillflow.cli import URL_FILE
    from rillflow.demo import ACTIVITIES, WORKFLOWS
    from rillflow.worker import Worker

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
    URL_FILE.parent.mkdir(parents=True, exist_ok=True)
    URL_FILE.write_text(server.url)
    out.print(f"embedded server [bold]{server.url}[/bold] (binary {server.binary}, AOF in {data_dir})")
    try:
        client = await Client.connect(server.url)
        async with Worker(client, "default", WORKFLOWS, ACTIVITIES, pump_interval=0.1) as worker:
            out.print(
                f"worker {worker.identity} serving task queue 'default': {', '.join(sorted(worker.workflows))}"
            )
            await _demo(client, out)
            if not once:
                out.rule()
                out.print(
                    "serving; in another terminal try:\n"
                    '  rillflow start report_workflow --input \'{"report_type": "weekly"}\' --wait\n'
                    "  rillflow history <execution id>\n"
                    "  rillflow workflows; rillflow schema refund_order\n"
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
            URL_FILE.unlink()
        server.stop()
        lock.__exit__(None, None, None)
        out.print("stopped")
