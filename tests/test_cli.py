"""The ``rillflow`` command, run as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT


def rf(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rillflow.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **(env or {})},
    )


def test_start_wait_result_describe_history(redis_url: str, worker_procs: Any) -> None:
    worker_procs(redis_url)
    p = rf(
        "start",
        "hello_workflow",
        "--input",
        '{"name": "cli", "times": 2}',
        "--id",
        "cli-1",
        "--wait",
        "--url",
        redis_url,
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == ["hello cli", "hello cli1", "hi cli from a thread"]
    p = rf("result", "cli-1", "--url", redis_url)
    assert p.returncode == 0 and json.loads(p.stdout)[0] == "hello cli"
    p = rf("describe", "cli-1", "--url", redis_url)
    assert p.returncode == 0 and "completed" in p.stdout and "hello_workflow" in p.stdout
    p = rf("history", "cli-1", "--url", redis_url)
    assert p.returncode == 0
    for t in (
        "WorkflowExecutionStarted",
        "ActivityTaskScheduled",
        "ActivityTaskCompleted",
        "WorkflowExecutionCompleted",
    ):
        assert t in p.stdout
    p = rf("history", "cli-1", "--json", "--url", redis_url)
    events = [json.loads(line) for line in p.stdout.splitlines()]
    assert [e["event_id"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "WorkflowExecutionStarted" and events[0]["input"] == {
        "name": "cli",
        "times": 2,
    }
    # an id that is running is refused
    p = rf("start", "timer_workflow", "--input", '{"seconds": 30}', "--id", "cli-2", "--url", redis_url)
    assert p.returncode == 0 and p.stdout.strip() == "cli-2"
    p = rf("start", "timer_workflow", "--input", '{"seconds": 30}', "--id", "cli-2", "--url", redis_url)
    assert p.returncode == 3 and "already running" in p.stderr
    p = rf("terminate", "cli-2", "--reason", "from the shell", "--url", redis_url)
    assert p.returncode == 0, p.stderr
    p = rf("result", "cli-2", "--url", redis_url)
    assert p.returncode == 1 and "terminated" in p.stderr and "from the shell" in p.stderr
    p = rf("terminate", "cli-2", "--url", redis_url)
    assert p.returncode == 3 and "not running" in p.stderr


def test_errors_have_exit_codes(redis_url: str) -> None:
    p = rf("start", "hello_workflow", "--input", "{not json", "--url", redis_url)
    assert p.returncode == 2 and "not valid JSON" in p.stderr
    p = rf("result", "no-such-id", "--url", redis_url)
    assert p.returncode == 3 and "no workflow execution 'no-such-id'" in p.stderr
    p = rf("describe", "x", "--url", "redis://127.0.0.1:1/0", timeout=120)
    assert p.returncode == 4 and "cannot reach Redis" in p.stderr
    p = rf("worker", "no_such_module_here", "--url", redis_url)
    assert p.returncode == 2 and "cannot import 'no_such_module_here'" in p.stderr
    p = rf("worker", "tests.flows", "--url", redis_url)
    assert p.returncode == 2 and "two workflow classes are named 'nd_workflow'" in p.stderr
    p = rf("describe", "x", env={"RILLFLOW_HOME": "/nonexistent-rillflow-home"})
    assert p.returncode == 2 and "no Redis URL" in p.stderr


@pytest.mark.parametrize("cmd", ["dev", "worker", "start", "result", "describe", "history", "terminate"])
def test_help_everywhere(cmd: str) -> None:
    p = rf(cmd, "--help")
    assert p.returncode == 0 and "Usage" in p.stdout


def test_dev_runs_the_demo(tmp_path: Path) -> None:
    p = rf(
        "dev",
        "--once",
        "--data-dir",
        str(tmp_path / "data"),
        env={"RILLFLOW_HOME": str(tmp_path)},
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert "process_order completed" in p.stdout
    assert "ship_order failed as designed" in p.stdout
    assert "report_workflow completed" in p.stdout
    assert "ActivityTaskRetrying" in p.stdout  # the flaky payment was retried
    assert (tmp_path / "data" / "appendonlydir").exists()  # AOF on
    assert not (tmp_path / "dev" / "url").exists()  # cleaned up on exit


def test_worker_serves_a_whole_module(redis_url: str, worker_procs: Any) -> None:
    """What docker-compose's worker service runs: every workflow and activity in a module."""
    worker_procs(redis_url, target="rillflow.demo")
    p = rf("start", "report_workflow", "--input", '{"report_type": "weekly"}', "--wait", "--url", redis_url)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"report_type": "weekly", "rows": 3}
