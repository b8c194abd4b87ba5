"""The workflows ``rillflow dev`` serves and runs: an order that fans out, retries a
flaky payment and sleeps durably; a shipment whose activity fails for good; a refund
that waits for a person, answers queries and takes updates; a batch of orders run as
child workflows.

Every name starts with ``demo_`` and ``rillflow dev`` serves them on their own task
queue, ``rillflow-demo``: a user's first workflow (the README's ``ship_order`` on
``default``) must reach the user's worker, not the demo's.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from pydantic import BaseModel

import rillflow as workflows
from rillflow import activity


class Order(BaseModel):
    order_id: str
    items: list[str]
    amount: float


@workflows.activity(name="demo_reserve_stock")
async def reserve_stock(item: str) -> str:
    await asyncio.sleep(0.01)
    return f"reserved:{item}"


@workflows.activity(name="demo_charge_card", retry_policy_initial_interval=timedelta(milliseconds=200))
async def charge_card(order_id: str, amount: float) -> str:
    if activity.info().attempt == 1:
        raise ConnectionError("payment gateway did not answer")
    return f"charge-{order_id}-{amount:.2f}"


@workflows.activity(name="demo_send_receipt")
async def send_receipt(order_id: str, charge_id: str) -> str:
    return f"receipt for {order_id} ({charge_id}) sent"


@workflows.workflow.define(name="demo_process_order", execution_timeout=timedelta(minutes=10))
class ProcessOrder:
    """Reserve every item in parallel, charge the card, wait, send the receipt."""

    @workflows.workflow.entrypoint
    async def run(self, order: Order) -> dict[str, object]:
        reservations = await asyncio.gather(*(reserve_stock(item) for item in order.items))
        charge = await charge_card(order.order_id, order.amount)
        await workflows.workflow.sleep(timedelta(milliseconds=300))
        receipt = await send_receipt(order.order_id, charge)
        return {
            "execution_id": workflows.get_execution_id(),
            "reservations": reservations,
            "charge": charge,
            "receipt": receipt,
        }


@workflows.activity(
    name="demo_validate_address",
    retry_policy_max_attempts=3,
    retry_policy_initial_interval=timedelta(milliseconds=100),
)
async def validate_address(address: str) -> str:
    raise workflows.WorkflowError(f"address {address!r} is not deliverable", non_retryable=True)


@workflows.workflow.define(name="demo_ship_order")
class ShipOrder:
    """Fails for good: its activity raises a non-retryable error."""

    @workflows.workflow.entrypoint
    async def run(self, order_id: str, address: str) -> str:
        valid: str = await validate_address(address)
        return valid


@workflows.activity(name="demo_build_report")
async def build_report(report_type: str, include_details: bool) -> dict[str, object]:
    return {"report_type": report_type, "rows": 42 if include_details else 3}


@workflows.workflow.define(name="demo_report")
class ReportWorkflow:
    @workflows.workflow.entrypoint
    async def run(self, report_type: str, include_details: bool = False) -> dict[str, object]:
        """Workflow implementation."""
        report: dict[str, object] = await build_report(report_type, include_details)
        return report


class Approval(BaseModel):
    approver: str


@workflows.activity(name="demo_pay_refund")
async def pay_refund(order_id: str, amount: float) -> str:
    return f"refund-{order_id}-{amount:.2f}"


@workflows.workflow.define(name="demo_refund_order")
class RefundOrder:
    """Waits for a person to approve (a signal), lets them adjust the amount first (an
    update, which answers with the new amount) and tells anyone who asks where it is
    (a query)."""

    def __init__(self) -> None:
        self.amount = 0.0
        self.approver = ""
        self.state = "starting"

    @workflows.workflow.query(description="where the refund is")
    def status(self) -> str:
        return f"{self.state}, {self.amount:.2f}"

    @workflows.workflow.update(description="change the amount before approval")
    def adjust(self, amount: float) -> float:
        if self.approver:
            raise workflows.WorkflowError("already approved", non_retryable=True)
        self.amount = amount
        return self.amount

    @workflows.workflow.signal(description="approve the refund")
    def approve(self, data: Approval) -> None:
        self.approver = data.approver

    @workflows.workflow.entrypoint
    async def run(self, order_id: str, amount: float) -> str:
        self.amount, self.state = amount, "awaiting approval"
        await workflows.workflow.wait_condition(lambda: bool(self.approver))
        self.state = "paying"
        paid = await pay_refund(order_id, self.amount)
        return f"{paid} approved by {self.approver}"


@workflows.workflow.define(name="demo_fulfil_orders", execution_timeout=timedelta(minutes=10))
class FulfilOrders:
    """Processes a batch of orders, each as a child workflow (demo_process_order), in
    parallel: each child is a run of its own, on whichever shard its id falls."""

    @workflows.workflow.entrypoint
    async def run(self, orders: list[Order]) -> list[str]:
        results = await asyncio.gather(
            *(workflows.workflow.execute_workflow(ProcessOrder, order) for order in orders)
        )
        return [str(r["receipt"]) for r in results]


WORKFLOWS = [ProcessOrder, ShipOrder, ReportWorkflow, RefundOrder, FulfilOrders]
ACTIVITIES = [reserve_stock, charge_card, send_receipt, validate_address, build_report, pay_refund]
