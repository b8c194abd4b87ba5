"""Input shapes exactly as the workflows page says, for entrypoints and activities alike."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Any

import pytest
from pydantic import BaseModel

import rillflow as workflows
from rillflow import Client, Worker, get_workflow_definition
from rillflow.payloads import Signature, to_wire
from tests import flows
from tests import seed_examples as ex
from tests.conftest import FAST

pytestmark = pytest.mark.anyio


async def test_the_pages_union_examples_run(client: Client) -> None:
    async with Worker(client, workflows=ex.WORKFLOWS, activities=ex.ACTIVITIES, **FAST):  # type: ignore[arg-type]

        def run(wf: Any, params: Any = None) -> Any:
            return client.execute_workflow(wf, params, result_timeout=10)

        assert await run(ex.FlexibleWorkflow, {"prompt": "hello"}) == "prompt: hello"
        assert await run(ex.FlexibleWorkflow, {"count": 42}) == "count: 42"
        # by name too: the worker applies the same rules
        assert await run("flexible_workflow", {"count": 7}) == "count: 7"
        assert await run(ex.OptionalWorkflow) == "no input"
        assert await run(ex.OptionalWorkflow, {"prompt": "p"}) == "prompt: p"
        assert await run(ex.MyWorkflow, {"prompt": "x"}) == "structured: x"
        assert await run(ex.MyWorkflow, "just text") == "raw: just text"


async def test_a_union_that_matches_no_member_is_refused_before_anything_is_written(client: Client) -> None:
    before = sorted([k async for k in client.redis.scan_iter("rf:*")])
    with pytest.raises(workflows.InvalidInputError) as ei:
        await client.start_workflow(ex.FlexibleWorkflow, {"count": 42, "extra": "field"})
    assert "extra: Extra inputs are not permitted" in str(ei.value)
    assert sorted([k async for k in client.redis.scan_iter("rf:*")]) == before


def test_mixing_a_model_with_a_primitive_fails_at_definition_with_the_pages_message() -> None:
    with pytest.raises(workflows.WorkflowDefinitionError) as ei:

        @workflows.workflow.define(name="my_workflow")
        class MixedWorkflow:
            @workflows.workflow.entrypoint
            async def run(self, params: ex.PromptInput | str) -> str: ...

    assert str(ei.value) == (
        "Cannot generate Pydantic model from parameters of 'run': "
        "Parameter 'params' of 'run' has unsupported union members: str. "
        "Union inputs only support Pydantic BaseModel subclasses and None. "
        "Use a dedicated BaseModel instead."
    )

    async def mixed_activity(x: ex.CountInput | int | str) -> None: ...

    with pytest.raises(workflows.WorkflowDefinitionError, match="unsupported union members: int, str"):
        Signature(mixed_activity, what="activity", require_annotations=False)


class First(BaseModel):
    x: int


class Second(BaseModel):
    x: int
    y: int = 0


def test_union_members_are_tried_left_to_right_not_smart() -> None:
    """Pydantic's default smart mode would pick Second (more fields set); the page
    promises the first member that validates."""

    async def run(params: First | Second) -> str: ...

    sig = Signature(run, what="workflow entrypoint", require_annotations=True)
    (chosen,) = sig.decode_input({"x": 1, "y": 2})
    assert type(chosen) is First


def test_primitive_and_multi_parameter_inputs() -> None:
    sig = get_workflow_definition(ex.ReportWorkflow).sig
    assert sig.decode_input({"report_type": "daily"}) == ["daily", False]  # defaults applied
    assert sig.decode_input({"report_type": "daily", "include_details": True}) == ["daily", True]
    with pytest.raises(workflows.InvalidInputError, match="report_type: Field required"):
        sig.decode_input({})
    with pytest.raises(workflows.InvalidInputError, match="other: Extra inputs are not permitted"):
        sig.decode_input({"report_type": "d", "other": 1})


SCHEMAS: dict[str, Any] = {
    "report_workflow": {
        "additionalProperties": False,
        "properties": {
            "report_type": {"title": "Report Type", "type": "string"},
            "include_details": {"default": False, "title": "Include Details", "type": "boolean"},
        },
        "required": ["report_type"],
        "title": "run_Input",
        "type": "object",
    },
    "report_params_workflow": {
        "properties": {
            "report_type": {"title": "Report Type", "type": "string"},
            "include_details": {"default": False, "title": "Include Details", "type": "boolean"},
        },
        "required": ["report_type"],
        "title": "ReportParams",
        "type": "object",
    },
    "optional_workflow": {
        "$defs": {
            "CountInput": {
                "additionalProperties": False,
                "properties": {"count": {"title": "Count", "type": "integer"}},
                "required": ["count"],
                "title": "CountInput",
                "type": "object",
            },
            "PromptInput": {
                "additionalProperties": False,
                "properties": {"prompt": {"title": "Prompt", "type": "string"}},
                "required": ["prompt"],
                "title": "PromptInput",
                "type": "object",
            },
        },
        "anyOf": [{"$ref": "#/$defs/PromptInput"}, {"$ref": "#/$defs/CountInput"}, {"type": "null"}],
        "title": "run_Input",
    },
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_input_schema_snapshots(name: str) -> None:
    cls = next(c for c in ex.WORKFLOWS if get_workflow_definition(c).name == name)
    assert get_workflow_definition(cls).sig.input_schema() == SCHEMAS[name]


def test_output_schemas() -> None:
    assert get_workflow_definition(ex.LongRunningWorkflow).sig.output_schema() == {
        "properties": {"doubled": {"title": "Doubled", "type": "integer"}},
        "required": ["doubled"],
        "title": "MyResult",
        "type": "object",
    }
    assert get_workflow_definition(ex.FlexibleWorkflow).sig.output_schema() == {"type": "string"}


async def test_activities_follow_the_same_rules(client: Client) -> None:
    assert ex.my_activity.sig.decode_input({"input_data": "a"}) == ["a", 1]
    union_activity = Signature(ex.FlexibleWorkflow.run, what="activity", require_annotations=True)
    assert union_activity.decode_input({"count": 3}) == [ex.CountInput(count=3)]


def test_an_option_rillflow_does_not_have_is_refused_not_ignored() -> None:
    # the anchor's `workflow_description`, not `description`; and no silent no-op options
    with pytest.raises(TypeError, match="unexpected keyword argument 'description'"):
        workflows.workflow.define(name="x", description="d")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected keyword argument 'sticky_to_worker'"):
        workflows.activity(sticky_to_worker=True)  # type: ignore[call-arg]


async def test_results_are_checked_against_the_return_annotation(client: Client) -> None:
    wfs = [flows.WrongResultWorkflow, flows.LooseResultWorkflow]
    async with Worker(client, workflows=wfs, activities=[flows.wrong_result], **FAST):  # type: ignore[arg-type]
        # an activity's wrong result is a bug: it fails at once, without retries
        r = await client.execute_workflow(flows.WrongResultWorkflow, result_timeout=10)
        assert r["attempt"] == 1 and r["type"] == "InvalidResultError"
        assert r["message"].startswith(
            "the result of activity 'wrong_result' does not match its return annotation int: "
        )
        # a workflow's completes as returned (failing it would hang the run until a deploy)
        h = await client.start_workflow(flows.LooseResultWorkflow, {"n": 3})
        assert await h.result(timeout=10) == "3 items"
        assert (await h.describe()).status == "completed"


class _Point(BaseModel):
    x: int


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (Decimal("1.50"), "1.50"),
        (b"utf-8 text", "utf-8 text"),
        (date(2024, 2, 29), "2024-02-29"),
        ((1, 2), [1, 2]),
        (frozenset({3}), [3]),
        (_Point(x=1), {"x": 1}),
        ({1: "a"}, {"1": "a"}),
        (2**64 - 1, 2**64 - 1),
        (-(2**63), -(2**63)),
    ],
    ids=["decimal", "bytes", "date", "tuple", "frozenset", "model", "int-key", "uint64", "int64"],
)
def test_values_become_what_pydantic_json_mode_makes_of_them(value: Any, wire: Any) -> None:
    """By class (an undeclared field) and by name (to_wire) alike, as docs/inputs.md says."""

    async def run(self: Any, payload: Any) -> Any: ...

    sig = Signature(run, what="workflow entrypoint", require_annotations=True)
    assert sig.encode_input({"payload": {"v": value}}) == {"payload": {"v": wire}}
    assert to_wire({"payload": {"v": value}}, "workflow 'w'") == {"payload": {"v": wire}}
    assert sig.dump_result({"v": value}) == {"v": wire}


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (2**64, "the integer 18446744073709551616 does not fit in 64 bits"),
        ({"k": "\udcff"}, "the string has a lone surrogate '\\udcff' at position 0"),
        (b"\xc3\x28", "bytes that are not UTF-8 text (b'\\xc3(')"),
        (object(), "a object is not JSON data"),
    ],
    ids=["int", "surrogate", "bytes", "object"],
)
def test_what_the_wire_cannot_carry_is_refused_with_its_path(value: Any, why: str) -> None:
    async def run(self: Any, payload: Any) -> Any: ...

    sig = Signature(run, what="workflow entrypoint", require_annotations=True)
    path = "payload.0.k" if isinstance(value, dict) else "payload.0"
    with pytest.raises(workflows.InvalidInputError) as ei:
        sig.encode_input({"payload": [value]})
    assert str(ei.value).startswith(f"invalid input for workflow entrypoint 'run': {path}: {why}")
    with pytest.raises(workflows.InvalidInputError) as ei:
        to_wire({"payload": [value]}, "workflow 'w'")
    assert str(ei.value).startswith(f"invalid input for workflow 'w': {path}: {why}")
    with pytest.raises(workflows.InvalidResultError) as ri:
        sig.dump_result([value])
    assert str(ri.value).startswith(
        f"the result of workflow entrypoint 'run' cannot be stored: {path[8:]}: {why}"
    )
