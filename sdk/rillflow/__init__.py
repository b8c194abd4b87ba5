"""rillflow: durable workflows in plain async Python, on nothing but Redis.

``import rillflow as workflows`` gives the API of the workflows and activities pages:
``workflows.workflow.define``, ``workflows.activity(...)``, ``workflows.get_execution_id``.
"""

from rillflow.activity import ActivityInfo, activity, activity_heartbeat
from rillflow.children import ChildWorkflowHandle, ParentClosePolicy
from rillflow.client import Client
from rillflow.dependencies import Depends
from rillflow.errors import (
    ActivityError,
    ChildWorkflowError,
    InvalidInputError,
    InvalidResultError,
    NonDeterminismError,
    PayloadTooLargeError,
    RestrictedWorkflowAccessError,
    RillflowError,
    WorkflowAlreadyStartedError,
    WorkflowDefinitionError,
    WorkflowError,
    WorkflowFailureError,
    WorkflowNotFoundError,
    WorkflowNotRegisteredError,
    WorkflowQueryFailedError,
    WorkflowQueryTimeoutError,
    WorkflowRegistrationConflictError,
    WorkflowUpdateFailedError,
    WorkflowUpdateRejectedError,
    WorkflowUpdateTimeoutError,
)
from rillflow.executor import WorkflowInfo
from rillflow.handle import WorkflowDescription, WorkflowHandle
from rillflow.history import HistoryEvent
from rillflow.listing import WorkflowExecution, WorkflowPage
from rillflow.registry import RegisteredWorkflow, WorkerInfo
from rillflow.replayer import Replayer, ReplayResult, load_history_json
from rillflow.worker import Worker
from rillflow.workflow import get_execution_id, get_workflow_definition, workflow

# the page's top-level form: a child workflow from workflow code
execute_workflow = workflow.execute_workflow

__version__ = "0.1.0"

__all__ = [
    "ActivityError",
    "ActivityInfo",
    "ChildWorkflowError",
    "ChildWorkflowHandle",
    "Client",
    "Depends",
    "HistoryEvent",
    "InvalidInputError",
    "InvalidResultError",
    "NonDeterminismError",
    "ParentClosePolicy",
    "PayloadTooLargeError",
    "RegisteredWorkflow",
    "ReplayResult",
    "Replayer",
    "RestrictedWorkflowAccessError",
    "RillflowError",
    "Worker",
    "WorkerInfo",
    "WorkflowAlreadyStartedError",
    "WorkflowDefinitionError",
    "WorkflowDescription",
    "WorkflowError",
    "WorkflowExecution",
    "WorkflowFailureError",
    "WorkflowHandle",
    "WorkflowInfo",
    "WorkflowNotFoundError",
    "WorkflowNotRegisteredError",
    "WorkflowPage",
    "WorkflowQueryFailedError",
    "WorkflowQueryTimeoutError",
    "WorkflowRegistrationConflictError",
    "WorkflowUpdateFailedError",
    "WorkflowUpdateRejectedError",
    "WorkflowUpdateTimeoutError",
    "__version__",
    "activity",
    "activity_heartbeat",
    "execute_workflow",
    "get_execution_id",
    "get_workflow_definition",
    "load_history_json",
    "workflow",
]
