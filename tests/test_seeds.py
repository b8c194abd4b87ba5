"""The seed pages' examples run on rillflow with only the import line changed."""

from __future__ import annotations

from datetime import timedelta

import pytest

from rillflow import Client, Worker, get_workflow_definition
from tests import seed_examples as ex
from tests.conftest import FAST

pytestmark = pytest.mark.anyio


async def test_workflows_page_examples(client: Client) -> None:
    async with Worker(client, workflows=ex.WORKFLOWS, activities=ex.ACTIVITIES, **FAST):  # type: ignore[arg-type]
        # primitive and multi-parameter input: {"report_type": "daily", "include_details": false}
        assert (
            await client.execute_workflow(
                "report_workflow", {"report_type": "daily", "include_details": False}
            )
            is None
        )
        # a single model: its fields are the top-level input keys
        assert await client.execute_workflow(
            "report_params_workflow", {"report_type": "daily", "include_details": True}
        ) == {"report_type": "daily", "include_details": True}
        assert await client.execute_workflow(ex.LongRunningWorkflow, ex.MyParams(value=21)) == ex.MyResult(
            doubled=42
        )
        h = await client.start_workflow(ex.ContextWorkflow, execution_id="ctx-42")
        assert await h.result(timeout=10) == "ctx-42"
    # started with no worker running, so it is still open when described
    d = await (await client.start_workflow(ex.LongRunningWorkflow, {"value": 1})).describe()
    assert d.execution_deadline is not None
    assert timedelta(days=6, hours=23) < d.execution_deadline - d.start_time <= timedelta(days=7)
    assert get_workflow_definition(ex.ReportWorkflow).execution_timeout == timedelta(hours=1)


async def test_activities_page_examples(client: Client) -> None:
    async with Worker(client, workflows=ex.WORKFLOWS, activities=ex.ACTIVITIES, **FAST):  # type: ignore[arg-type]
        h = await client.start_workflow(ex.ActivitiesPageWorkflow, {"data": "x"})
        res = await h.result(timeout=10)
    assert res == {
        "my_activity": {"result": "x", "processed_count": 2},
        "named": 2,
        "timed": 20,
        "retried": 2,
        "long": {"results": ["A", "B"]},
        "parent": {"result_data": "processed_data"},
    }
    events = await h.history()
    names = [e.attributes["name"] for e in events if e.type == "ActivityTaskScheduled"]
    # the custom name is what is scheduled; the nested activity is no task of its own
    assert names[:2] == ["my_activity", "custom_activity_name"]
    assert "nested_activity" not in names


def test_activity_options_follow_the_page() -> None:
    assert ex.my_activity.name == "my_activity"
    assert ex.named_activity.name == "custom_activity_name"
    assert ex.timed_activity.options.start_to_close_timeout == timedelta(minutes=10)
    o = ex.retried_activity.options
    assert (o.retry_policy_max_attempts, o.retry_policy_backoff_coefficient) == (5, 2.0)
    d = ex.my_activity.options  # the defaults
    assert d.start_to_close_timeout == timedelta(minutes=5)
    assert (d.retry_policy_max_attempts, d.retry_policy_backoff_coefficient) == (3, 2.0)
    assert (d.retry_policy_initial_interval, d.retry_policy_max_interval) == (
        timedelta(seconds=1),
        timedelta(seconds=100),
    )
    assert d.schedule_to_close_timeout is None and d.heartbeat_timeout is None
    assert ex.long_running_task.options.heartbeat_timeout == timedelta(seconds=30)
