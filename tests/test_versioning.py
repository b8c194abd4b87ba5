"""Versioning: workflow.patched() and deprecate_patch() let a change to a workflow ship
while runs started before it keep their old path; the Replayer (and `rillflow replay`)
checks recorded histories against new code before it ships."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import rillflow as workflows
from rillflow import Client, Replayer, Worker
from rillflow.errors import NonDeterminismError
from tests import flows
from tests.conftest import FAST, wait_until
from tests.test_cli import rf

pytestmark = pytest.mark.anyio
workflow = workflows.workflow

# Five deploys of one workflow ("priced_workflow"): the old path runs the `step`
# activity, the new one `hello`, so a replay down the wrong path is seen.


class _Waits:
    def __init__(self) -> None:
        self.go = False

    @workflow.signal()
    def proceed(self) -> None:
        self.go = True


@workflow.define(name="priced_workflow")
class V1(_Waits):
    @workflow.entrypoint
    async def run(self) -> str:
        a = str(await flows.step(1))
        await workflow.wait_condition(lambda: self.go)
        return f"v1 {a}"


@workflow.define(name="priced_workflow")
class V2(_Waits):
    @workflow.entrypoint
    async def run(self) -> str:
        if workflow.patched("fee"):
            a = await flows.hello("fee")
        else:
            a = str(await flows.step(1))
        await workflow.wait_condition(lambda: self.go)
        return f"v2 {a} {workflow.patched('fee')}"  # (the answer is fixed for the run)


@workflow.define(name="priced_workflow")
class V3(_Waits):
    @workflow.entrypoint
    async def run(self) -> str:
        workflow.deprecate_patch("fee")
        a = await flows.hello("fee")
        await workflow.wait_condition(lambda: self.go)
        return f"v3 {a}"


@workflow.define(name="priced_workflow")
class V4(_Waits):
    @workflow.entrypoint
    async def run(self) -> str:
        a = await flows.hello("fee")
        await workflow.wait_condition(lambda: self.go)
        return f"v4 {a}"


BROKEN = V4  # the change shipped without a patch: runs started on V1 cannot replay on it


def _worker(client: Client, cls: type) -> Worker:
    return Worker(client, workflows=[cls], activities=[flows.step, flows.hello], **FAST)  # type: ignore[arg-type]


async def _waiting(h: Any) -> bool:
    types = [e.type for e in await h.history()]
    return types.count("WorkflowTaskCompleted") >= 2  # its activity done, waiting for the signal


def _markers(events: list[Any]) -> list[tuple[str, bool]]:
    return [(e.attributes["id"], e.attributes["deprecated"]) for e in events if e.type == "MarkerRecorded"]


async def test_a_patch_keeps_old_runs_on_their_path_and_new_runs_take_the_new_one(
    client: Client, tmp_path: Path, redis_url: str
) -> None:
    async with _worker(client, V1):
        old = await client.start_workflow(V1, execution_id="ver-old")
        await wait_until(lambda: _waiting(old), 15)
    # deployed with the patch: the old run replays down its old path, a new run takes the new
    async with _worker(client, V2):
        new = await client.start_workflow(V2, execution_id="ver-new")
        await wait_until(lambda: _waiting(new), 15)
        for h in (old, new):
            await h.signal("proceed")
        assert await old.result(timeout=15) == "v2 2 False"
        assert await new.result(timeout=15) == "v2 hello fee True"
    old_events, new_events = await old.history(), await new.history()
    assert _markers(old_events) == [] and _markers(new_events) == [("fee", False)]
    assert [e.attributes.get("name") for e in new_events if e.type == "ActivityTaskScheduled"] == ["hello"]
    # the patch deprecated, then removed: runs recorded with the marker still replay
    async with _worker(client, V3):
        third = await client.start_workflow(V3, execution_id="ver-third")
        await wait_until(lambda: _waiting(third), 15)
        await third.signal("proceed")
        assert await third.result(timeout=15) == "v3 hello fee"
    assert _markers(await third.history()) == [("fee", True)]

    replay = {cls: Replayer([cls]) for cls in (V1, V2, V3, V4)}
    histories = {"old": old_events, "new": new_events, "third": await third.history()}
    verdicts = {
        (cls.__name__, name): replay[cls].replay(events).ok
        for cls in replay
        for name, events in histories.items()
    }
    assert verdicts == {
        ("V1", "old"): True,
        ("V1", "new"): False,  # a rollback past the patch would break the new runs
        ("V1", "third"): False,
        ("V2", "old"): True,
        ("V2", "new"): True,
        ("V2", "third"): True,
        ("V3", "old"): False,  # deprecated too early: an old run is still open
        ("V3", "new"): True,
        ("V3", "third"): True,
        ("V4", "old"): False,
        ("V4", "new"): True,
        ("V4", "third"): True,
    }
    failure = replay[V4].replay(old_events, execution_id="ver-old").failure
    assert isinstance(failure, NonDeterminismError)
    assert "ScheduleActivity(1, 'step')" in str(failure) and "ScheduleActivity(1, 'hello')" in str(failure)
    with pytest.raises(NonDeterminismError):
        replay[V4].replay(old_events, raise_on_failure=True)


async def test_rillflow_replay_checks_stored_and_exported_histories(
    client: Client, tmp_path: Path, redis_url: str
) -> None:
    async with _worker(client, V1):
        old = await client.start_workflow(V1, execution_id="ver-cli")
        await wait_until(lambda: _waiting(old), 15)
    exported = rf("history", "ver-cli", "--json", "--url", redis_url)
    assert exported.returncode == 0, exported.stderr
    path = tmp_path / "ver-cli.jsonl"
    path.write_text(exported.stdout)
    # the export replays as the stored history does
    events = workflows.load_history_json(path.read_text())
    assert [e.type for e in events] == [e.type for e in await old.history()]
    assert Replayer([V2]).replay(events).ok

    good = rf("replay", "tests.test_versioning:V2", "ver-cli", "--file", str(path), "--url", redis_url)
    assert good.returncode == 0, good.stderr
    assert good.stdout.count("ok") == 2 and "2 replayed, all deterministic" in good.stdout
    bad = rf("replay", "tests.test_versioning:BROKEN", "ver-cli", "--url", redis_url)
    assert bad.returncode == 1, bad.stderr
    assert "FAIL" in bad.stdout and "is not deterministic" in bad.stdout
    assert "1 of 1 histories do not replay on this code" in bad.stderr
    # files only: no Redis needed (a CI check of a deploy)
    offline = rf(
        "replay", "tests.test_versioning:BROKEN", "--file", str(path), "--url", "redis://127.0.0.1:1"
    )
    assert offline.returncode == 1 and "FAIL" in offline.stdout, offline.stderr
    # the export names its execution and run, which the replay of the file reports
    assert f"ver-cli run {old.run_id}" in offline.stdout and f"(run {old.run_id})" in offline.stdout
    await old.terminate("done")


def test_replay_mistakes_get_a_clear_error(tmp_path: Path) -> None:
    from tests.test_cli import assert_one_line

    assert_one_line(rf("replay", "tests.test_versioning:V2"), 2, "give execution ids")
    junk = tmp_path / "junk.jsonl"
    junk.write_text("not json\n")
    assert_one_line(
        rf("replay", "tests.test_versioning:V2", "--file", str(junk)), 2, "is not a history exported"
    )
    missing = tmp_path / "missing.jsonl"
    assert_one_line(rf("replay", "tests.test_versioning:V2", "--file", str(missing)), 2, "cannot read")
    with pytest.raises(workflows.InvalidInputError, match="starts with its WorkflowExecutionStarted"):
        Replayer([V2]).replay([])
    other = Replayer([flows.HelloWorkflow]).replay(
        workflows.load_history_json(
            '{"event_id": 1, "time": "2026-01-01T00:00:00+00:00", '
            '"type": "WorkflowExecutionStarted", "workflow_type": "priced_workflow"}'
        )
    )
    assert not other.ok and "not among the replayer's" in str(other.failure)


def test_patched_outside_a_workflow_is_refused() -> None:
    with pytest.raises(RuntimeError, match="can only be called from workflow code"):
        workflow.patched("fee")
    with pytest.raises(RuntimeError, match="can only be called from workflow code"):
        workflow.deprecate_patch("fee")
