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


@pytest.mark.parametrize(
    "cmd",
    [
        "dev",
        "worker",
        "start",
        "result",
        "describe",
        "history",
        "terminate",
        "signal",
        "query",
        "update",
        "workflows",
        "workers",
        "schema",
        "unregister",
    ],
)
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
    assert "query status: awaiting approval, 42.50" in p.stdout
    assert "update adjust(40.0) answered: 40.0" in p.stdout
    assert "refund-A-1001-40.00 approved by dana" in p.stdout
    assert "WorkflowExecutionSignaled" in p.stdout and "WorkflowExecutionUpdateCompleted" in p.stdout
    assert (tmp_path / "data" / "appendonlydir").exists()  # AOF on
    assert not (tmp_path / "dev" / "url").exists()  # cleaned up on exit


def test_worker_serves_a_whole_module(redis_url: str, worker_procs: Any) -> None:
    """What docker-compose's worker service runs: every workflow and activity in a module."""
    worker_procs(redis_url, target="rillflow.demo")
    p = rf("start", "report_workflow", "--input", '{"report_type": "weekly"}', "--wait", "--url", redis_url)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"report_type": "weekly", "rows": 3}


def test_registry_commands(redis_url: str, worker_procs: Any) -> None:
    url = ["--url", redis_url]
    p = rf("workflows", *url)
    assert p.returncode == 0 and "no workflows registered in namespace 'default'" in p.stderr
    w1 = worker_procs(redis_url, task_queue="blue")
    w2 = worker_procs(redis_url, target="tests.flows:OrderWorkflow", task_queue="green")

    p = rf("workflows", *url)
    assert p.returncode == 0, p.stderr
    rows = {tuple(line.split("│")[1:4]) for line in p.stdout.splitlines() if "│" in line}
    rows = {tuple(c.strip() for c in r) for r in rows}
    assert ("hello_workflow", "blue", "1") in rows and ("order_workflow", "green", "1") in rows
    assert "Totals an order." in p.stdout and "Second line" not in p.stdout
    p = rf("workflows", "--json", *url)
    recs = {r["name"]: r for r in map(json.loads, p.stdout.splitlines())}
    assert recs["order_workflow"]["live_workers"] == {"green": [w2.identity]}
    assert recs["hello_workflow"]["registered_by"] == w1.identity

    p = rf("workers", "--json", *url)
    live = {r["identity"]: r for r in map(json.loads, p.stdout.splitlines())}
    assert set(live) == {w1.identity, w2.identity}
    assert live[w2.identity]["task_queue"] == "green" and live[w2.identity]["workflows"] == ["order_workflow"]
    assert w1.identity in rf("workers", *url).stdout

    p = rf("schema", "order_workflow", *url)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["input"]["required"] == ["customer", "lines"]
    assert doc["output"] == {"type": "integer"}
    assert doc["signals"] == doc["queries"] == doc["updates"] == []
    p = rf("schema", "order_workflow", "--part", "input", *url)
    assert json.loads(p.stdout) == doc["input"]
    p = rf("schema", "ordr_workflow", *url)
    assert p.returncode == 3 and "no workflow named 'ordr_workflow'" in p.stderr
    assert "hello_workflow" in p.stderr and "order_workflow" in p.stderr
    p = rf("schema", "order_workflow", "--part", "nope", *url)
    assert p.returncode == 2 and "--part must be one of" in p.stderr

    # start validates against the registered schema and routes to the registered queue
    p = rf("start", "order_workflow", "-i", '{"customer": "c", "lines": [{"sku": "a", "qty": 0}]}', *url)
    assert p.returncode == 2 and "lines.0.qty: 0 is less than the minimum of 1" in p.stderr
    p = rf(
        "start",
        "order_workflow",
        "-i",
        '{"customer": "c", "lines": [{"sku": "a", "qty": 4}]}',
        "--wait",
        *url,
    )
    assert p.returncode == 0 and json.loads(p.stdout) == 4
    p = rf("start", "ordr_workflow", "-i", "{}", *url)
    assert p.returncode == 3 and "no worker has registered a workflow named 'ordr_workflow'" in p.stderr
    p = rf("start", "later_workflow", "--allow-unregistered", "-q", "green", "--id", "later-1", *url)
    assert p.returncode == 0 and p.stdout.strip() == "later-1"

    # a queue whose workers have gone can be forgotten; one with live workers cannot
    p = rf("unregister", "order_workflow", *url)
    assert p.returncode == 2 and f"still has live workers (green: {w2.identity})" in p.stderr
    assert w2.terminate() == 0
    p = rf("unregister", "order_workflow", *url)
    assert p.returncode == 0 and "unregistered order_workflow from green" in p.stdout
    p = rf("workflows", "--json", *url)
    names = [json.loads(line)["name"] for line in p.stdout.splitlines()]
    assert "order_workflow" not in names and "hello_workflow" in names
