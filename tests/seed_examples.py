"""The examples of the workflows and activities pages, with only the import line changed
(``import mistralai.workflows as workflows`` -> ``import rillflow as workflows``).
Where a page shows a bare decorator or uses a helper it does not define, the smallest
missing piece is added and marked ``# added``."""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel

# -- workflows page: defining a workflow ----------------------------------------------------
import rillflow as workflows


@workflows.workflow.define(name="report_workflow")
class ReportWorkflow:
    @workflows.workflow.entrypoint
    async def run(self, report_type: str, include_details: bool = False) -> dict:
        """Workflow implementation."""
        # Orchestrate activities here
        ...


# -- workflows page: single Pydantic model --------------------------------------------------
from rillflow import workflow  # noqa: E402


class ReportParams(BaseModel):
    report_type: str
    include_details: bool = False


@workflow.define(name="report_params_workflow")  # the page reuses "report_workflow"
class ReportParamsWorkflow:
    @workflow.entrypoint
    async def run(self, params: ReportParams) -> dict:
        return {"report_type": params.report_type, "include_details": params.include_details}  # added


# -- workflows page: union of Pydantic models ----------------------------------------------
from pydantic import ConfigDict  # noqa: E402


class PromptInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str


class CountInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: int


@workflow.define(name="flexible_workflow")
class FlexibleWorkflow:
    @workflow.entrypoint
    async def run(self, params: PromptInput | CountInput) -> str:
        if isinstance(params, PromptInput):
            return f"prompt: {params.prompt}"
        return f"count: {params.count}"


# -- workflows page: optional union (| None) --------------------------------------------------
@workflow.define(name="optional_workflow")
class OptionalWorkflow:
    @workflow.entrypoint
    async def run(self, params: PromptInput | CountInput | None) -> str:
        if params is None:
            return "no input"
        if isinstance(params, PromptInput):
            return f"prompt: {params.prompt}"
        return f"count: {params.count}"


# -- workflows page: a named RootModel for a union with a non-model type ----------------------
from pydantic import RootModel  # noqa: E402


class PromptOrRaw(RootModel[PromptInput | str]):
    pass


@workflow.define(name="my_workflow")
class MyWorkflow:
    @workflow.entrypoint
    async def run(self, params: PromptOrRaw) -> str:
        if isinstance(params.root, PromptInput):
            return f"structured: {params.root.prompt}"
        return f"raw: {params.root}"


# -- workflows page: execution timeout -------------------------------------------------------
class MyParams(BaseModel):  # added
    value: int


class MyResult(BaseModel):  # added
    doubled: int


@workflow.define(name="long_running_workflow", execution_timeout=timedelta(days=7))
class LongRunningWorkflow:
    @workflow.entrypoint
    async def run(self, params: MyParams) -> MyResult:
        return MyResult(doubled=params.value * 2)  # added


# -- workflows page: workflow execution context ----------------------------------------------
@workflows.workflow.define(name="context_workflow")  # added around the page's one line
class ContextWorkflow:
    @workflows.workflow.entrypoint
    async def run(self) -> str:
        execution_id = workflows.get_execution_id()
        return execution_id or ""


# -- workflows page: signals ------------------------------------------------------------------
class ApprovalData(BaseModel):  # added
    approver: str


@workflows.workflow.define(name="invoice_workflow")  # added around the page's handler
class InvoiceWorkflow:
    def __init__(self) -> None:
        self.approved = False
        self.approver = ""

    @workflows.workflow.signal(name="approve", description="Approval signal")
    async def approve_signal(self, data: ApprovalData) -> None:
        self.approved = True
        self.approver = data.approver  # added

    @workflows.workflow.entrypoint
    async def run(self) -> str:
        await workflows.workflow.wait_condition(lambda: self.approved)
        return f"approved by {self.approver}"


# -- workflows page: queries ------------------------------------------------------------------
class WorkflowStatus(BaseModel):  # added
    progress: float
    status: str


@workflows.workflow.define(name="batch_workflow")  # added around the page's handler
class BatchWorkflow:
    def __init__(self) -> None:
        self.progress = 0.0
        self.current_status = "waiting"
        self.resumed = False

    @workflows.workflow.query(name="get_status", description="Get current status")
    def get_status(self) -> WorkflowStatus:
        return WorkflowStatus(progress=self.progress, status=self.current_status)

    @workflows.workflow.query()  # added: a query with input
    def progress_at_least(self, fraction: float) -> bool:
        return self.progress >= fraction

    @workflows.workflow.signal()  # added
    def resume(self) -> None:
        self.resumed = True

    @workflows.workflow.entrypoint
    async def run(self, items: list[int]) -> int:  # added
        total = 0
        for i, x in enumerate(items):
            self.current_status = f"processing item {i + 1} of {len(items)}"
            total += await timed_activity(x)
            self.progress = (i + 1) / len(items)
            if i == 0:
                self.current_status = "paused"
                await workflows.workflow.wait_condition(lambda: self.resumed)
        self.current_status = "done"
        return total


# -- workflows page: updates ------------------------------------------------------------------
class UpdateConfig(BaseModel):  # added
    threshold: int


class UpdateResult(BaseModel):  # added
    success: bool


@workflows.workflow.define(name="configurable_workflow")  # added around the page's handler
class ConfigurableWorkflow:
    def __init__(self) -> None:
        self.threshold = 0
        self.stopped = False

    @workflows.workflow.update(name="update_config", description="Update workflow configuration")
    async def update_config(self, config: UpdateConfig) -> UpdateResult:
        # Handle update
        self.threshold = config.threshold  # added
        return UpdateResult(success=True)

    @workflows.workflow.signal()  # added
    def stop(self) -> None:
        self.stopped = True

    @workflows.workflow.entrypoint
    async def run(self) -> int:  # added
        await workflows.workflow.wait_condition(lambda: self.stopped)
        return self.threshold


# -- activities page ------------------------------------------------------------------------
@workflows.activity()
async def my_activity(input_data: str, count: int = 1) -> dict:
    """Activity implementation"""
    # Perform work here
    return {"result": input_data, "processed_count": count}


@workflows.activity(
    name="custom_activity_name",  # Used for registration, execution, and observability
)
async def named_activity(x: int) -> int:  # added
    return x + 1


@workflows.activity(start_to_close_timeout=timedelta(minutes=10))
async def timed_activity(x: int) -> int:  # added
    return x * 10


@workflows.activity(retry_policy_max_attempts=5, retry_policy_backoff_coefficient=2.0)
async def retried_activity(x: int) -> int:  # added
    return x - 1


from rillflow import activity  # noqa: E402


async def process_item(item: str) -> str:  # added
    return item.upper()


@workflows.activity(start_to_close_timeout=timedelta(minutes=30), heartbeat_timeout=timedelta(seconds=30))
async def long_running_task(items: list[str]) -> dict:
    results = []
    for i, item in enumerate(items):
        result = await process_item(item)
        results.append(result)
        # Report progress to prevent timeout
        activity.heartbeat({"processed": i + 1, "total": len(items)})
    return {"results": results}


@workflows.activity()
async def parent_activity(input_data: str) -> dict:
    """Parent activity that encapsulates a nested activity."""
    # Some logic here
    nested_result = await nested_activity(input_data)
    return {"result_data": nested_result["result_data"]}


@workflows.activity()
async def nested_activity(input_data: str) -> dict:
    """Nested activity."""
    # Logic for the nested activity
    return {"result_data": "processed_data"}


@workflows.workflow.define(name="activities_page_workflow")  # added: runs the page's activities
class ActivitiesPageWorkflow:
    @workflows.workflow.entrypoint
    async def run(self, data: str) -> dict:
        return {
            "my_activity": await my_activity(data, count=2),
            "named": await named_activity(1),
            "timed": await timed_activity(2),
            "retried": await retried_activity(3),
            "long": await long_running_task(["a", "b"]),
            "parent": await parent_activity(data),
        }


# -- workflows page: schedules ----------------------------------------------------------------
from rillflow.models import ScheduleDefinition  # noqa: E402

schedule = ScheduleDefinition(
    input={"report_type": "daily", "include_details": False},  # Input parameters for scheduled runs
    cron_expressions=["0 0 * * *"],  # Run daily at midnight
)


@workflows.workflow.define(
    name="scheduled_report_workflow", schedules=[schedule]
)  # the page reuses "report_workflow"
class ScheduledReportWorkflow:
    @workflows.workflow.entrypoint
    async def run(self, report_type: str = "daily", include_details: bool = False) -> None:
        # Generate report
        pass


WORKFLOWS = [
    ReportWorkflow,
    ReportParamsWorkflow,
    LongRunningWorkflow,
    ContextWorkflow,
    ActivitiesPageWorkflow,
    FlexibleWorkflow,
    OptionalWorkflow,
    MyWorkflow,
    InvoiceWorkflow,
    BatchWorkflow,
    ConfigurableWorkflow,
]
ACTIVITIES = [
    my_activity,
    named_activity,
    timed_activity,
    retried_activity,
    long_running_task,
    parent_activity,
    nested_activity,
]
