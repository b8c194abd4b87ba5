"""Depends: providers entered once per worker, shared by its activities, closed when it
stops (SIGTERM included); one that fails stops the worker with its name; a direct call
makes its own; and the parameter is no part of the activity's input."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from rillflow import Client, Worker
from rillflow.dependencies import DependencyError
from rillflow.errors import InvalidInputError
from tests import dependency_flows as df
from tests.conftest import FAST, WorkerProcess

pytestmark = pytest.mark.anyio


@pytest.fixture
def deps_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "deps.log"
    monkeypatch.setenv("RF_DEPS_LOG", str(path))
    return path


def events(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_providers_are_entered_once_shared_and_closed_when_the_worker_stops(
    client: Client, deps_log: Path
) -> None:
    async with Worker(client, workflows=df.WORKFLOWS, activities=df.ACTIVITIES, **FAST):
        # entered before any task, once each, a provider's own dependency first
        assert events(deps_log) == ["pool entered", "settings made", "model loaded"]
        out = await client.execute_workflow(df.DepFlow, {"names": ["ann", "bob"]}, result_timeout=20)
        again = await client.execute_workflow(df.DepFlow, {"names": ["cy"]}, result_timeout=20)
    assert out == ["model(hello): ann (1)", "model(hello): bob (2)", 103]
    assert again == ["model(hello): cy (4)", 105]  # the same pool, shared by both activities
    # closed in reverse order, once, after the last task
    assert events(deps_log) == [
        "pool entered",
        "settings made",
        "model loaded",
        "model unloaded",
        "pool closed after 5 uses",
    ]


async def test_an_activity_called_inside_a_workers_activity_uses_the_workers_providers(
    client: Client, deps_log: Path
) -> None:
    async with Worker(client, workflows=df.WORKFLOWS, activities=df.ACTIVITIES, **FAST):
        out = await client.execute_workflow(df.OuterFlow, {"name": "zed"}, result_timeout=20)
    assert out == ["model(hello): zed (1)", 1]  # one pool, the worker's: the inner call used it
    assert events(deps_log).count("pool entered") == 1


async def test_the_parameter_is_not_part_of_the_activitys_input(client: Client) -> None:
    assert df.greet.sig.param_names == ("name",)
    assert set(df.greet.sig.input_model.model_fields) == {"name"}
    with pytest.raises(InvalidInputError):
        df.greet.sig.encode_call(("ann",), {"p": "mine"})


async def test_a_provider_that_fails_stops_the_worker_naming_it(client: Client, deps_log: Path) -> None:
    w = Worker(client, workflows=df.WORKFLOWS, activities=[*df.ACTIVITIES, *df.BROKEN], **FAST)
    with pytest.raises(
        DependencyError,
        match="dependency broken could not be started: ConnectionError: the database is not there",
    ):
        await w.run()
    # what it had entered before the failure is closed, and it never registered
    assert events(deps_log)[-1] == "pool closed after 0 uses"
    assert await client.registry.workers() == []


async def test_a_direct_call_makes_its_own_providers_and_closes_them(deps_log: Path) -> None:
    assert await df.greet("dee") == "model(hello): dee (1)"
    assert await asyncio.to_thread(df.count, 1) == 2  # a plain def: its providers made in a loop of its own
    assert events(deps_log) == [
        "pool entered", "settings made", "model loaded", "model unloaded", "pool closed after 1 uses",
        "pool entered", "pool closed after 1 uses",
    ]  # fmt: skip
    assert await df.greet("eve", p=df.Pool("mine"), m="given") == "given: eve (1)"  # (passed: nothing made)


def test_a_worker_process_closes_its_providers_on_sigterm(redis_url: str, tmp_path: Path) -> None:
    log = tmp_path / "deps.log"
    w = WorkerProcess(
        redis_url, "tests.dependency_flows:SERVED", env={"RF_DEPS_LOG": str(log)}, log=tmp_path / "w.log"
    )
    try:
        assert events(log) == ["pool entered", "settings made", "model loaded"]
        assert w.terminate(timeout=30) == 0
        assert events(log)[-2:] == ["model unloaded", "pool closed after 0 uses"]
    finally:
        w.kill()


def test_a_worker_process_whose_provider_fails_exits_with_one_line(redis_url: str) -> None:
    from tests.test_cli import assert_one_line, rf

    p = rf("worker", "tests.dependency_flows:BROKEN", "--url", redis_url)
    assert_one_line(
        p, 2, "dependency broken could not be started: ConnectionError: the database is not there"
    )
