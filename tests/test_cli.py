"""The ``rillflow`` command, run as a user runs it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from tests.conftest import ROOT


def rf(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rillflow.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        errors="backslashreplace",
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **(env or {})},
    )


def assert_one_line(p: subprocess.CompletedProcess[str], code: int, says: str) -> None:
    """A user's mistake: the documented exit code and one line on stderr, no traceback."""
    assert p.returncode == code, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert says in p.stderr, p.stderr


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


def test_run_id_reads_each_run_of_a_chain(redis_url: str, worker_procs: Any) -> None:
    worker_procs(redis_url, target="tests.test_continue_as_new:CHAIN")
    p = rf(
        "start",
        "chain_workflow",
        "--input",
        '{"n": 0, "until": 3}',
        "--id",
        "cli-chain",
        "--wait",
        "--url",
        redis_url,
    )
    assert p.returncode == 0, p.stderr
    total = json.loads(p.stdout)
    # walk the chain back from the last run: each run's first event names the one before
    p = rf("history", "cli-chain", "--json", "--url", redis_url)
    last = [json.loads(line) for line in p.stdout.splitlines()]
    middle = last[0]["continued_from"]
    p = rf("history", "cli-chain", "--run-id", middle, "--json", "--url", redis_url)
    assert p.returncode == 0, p.stderr
    events = [json.loads(line) for line in p.stdout.splitlines()]
    assert events[0]["input"]["n"] == 1 and events[-1]["type"] == "WorkflowExecutionContinuedAsNew"
    first = events[0]["continued_from"]
    p = rf("history", "cli-chain", "--run-id", first, "--url", redis_url)
    assert p.returncode == 0 and "next run " + middle in p.stdout, p.stdout
    p = rf("describe", "cli-chain", "--run-id", middle, "--url", redis_url)
    assert p.returncode == 0 and "continued_as_new" in p.stdout and "failure" not in p.stdout, p.stdout
    # a closed run's describe shows its result; result of an earlier run follows the chain
    current = rf("describe", "cli-chain", "--url", redis_url)
    assert current.returncode == 0 and re.search(rf"result\s+{total}\b", current.stdout), current.stdout
    last_run = re.search(r"run id\s+(\S+)", current.stdout)
    assert last_run and re.search(r"continued as\s+" + last_run[1], p.stdout), p.stdout
    p = rf("result", "cli-chain", "--run-id", first, "--url", redis_url)
    assert p.returncode == 0 and json.loads(p.stdout) == total
    # a run id of another execution, or none at all, is not found
    for cmd in ("describe", "history", "result"):
        p = rf(cmd, "cli-1-no-such", "--run-id", first, "--url", redis_url)
        assert_one_line(p, 3, "not found")


def test_history_follow_prints_events_as_they_come(redis_url: str, worker_procs: Any) -> None:
    worker_procs(redis_url)
    p = rf("start", "timer_workflow", "--input", '{"seconds": 300}', "--id", "cli-follow", "--url", redis_url)
    assert p.returncode == 0, p.stderr
    cmd = [sys.executable, "-m", "rillflow.cli", "history", "cli-follow", "--follow", "--url", redis_url]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    with subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as f:
        assert f.stdout is not None
        # the start is printed at once, and then the timer it waits on
        lines = [f.stdout.readline()]
        assert "WorkflowExecutionStarted  timer_workflow" in lines[0]
        while "TimerStarted" not in lines[-1]:
            lines.append(f.stdout.readline())
        assert f.poll() is None  # still following the open run
        assert rf("terminate", "cli-follow", "--reason", "seen", "--url", redis_url).returncode == 0
        out, err = f.communicate(timeout=30)
    assert f.returncode == 0, err
    lines += out.splitlines()
    types = [line.split()[2] for line in lines]
    assert types[-1] == "WorkflowExecutionTerminated" and lines[-1].rstrip().endswith("seen"), lines
    assert [int(line.split()[0]) for line in lines] == list(range(1, len(lines) + 1))


def test_a_worker_takes_the_path_of_a_file(redis_url: str, worker_procs: Any, tmp_path: Path) -> None:
    (tmp_path / "cli_file_flows.py").write_text(
        "import rillflow as workflows\n\n"
        "@workflows.workflow.define(name='from_a_file')\n"
        "class FromAFile:\n"
        "    @workflows.workflow.entrypoint\n"
        "    async def run(self) -> str:\n"
        "        return 'ran'\n"
    )
    worker_procs(redis_url, target=str(tmp_path / "cli_file_flows.py") + ":FromAFile")
    p = rf("start", "from_a_file", "--id", "cli-file", "--wait", "--url", redis_url)
    assert p.returncode == 0 and json.loads(p.stdout) == "ran", p.stderr
    assert_one_line(rf("worker", "./no_such_flows.py", "--url", redis_url), 2, "no file './no_such_flows.py'")


def test_a_file_named_like_a_module_already_imported_is_loaded_from_its_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """queue.py (the standard library's queue is imported already) is the user's file,
    which still imports its neighbours; the standard module stays what it was."""
    import queue

    from rillflow.cli import load_target

    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "neighbour_names.py").write_text("NAME = 'from_queue_py'\n")
    (tmp_path / "queue.py").write_text(
        "import rillflow as workflows\n"
        "from neighbour_names import NAME\n\n"
        "@workflows.workflow.define(name=NAME)\n"
        "class FromQueuePy:\n"
        "    @workflows.workflow.entrypoint\n"
        "    async def run(self) -> str:\n"
        "        return 'ran'\n"
    )
    wfs, acts = load_target(str(tmp_path / "queue.py"))
    assert [w.__name__ for w in wfs] == ["FromQueuePy"] and acts == []
    assert sys.modules["queue"] is queue and hasattr(queue, "Queue")
    assert load_target(str(tmp_path / "queue.py") + ":FromQueuePy")[0] == wfs  # loaded once
    # a dotted file name is no module path: the file itself is loaded
    (tmp_path / "flows.v2.py").write_text((tmp_path / "queue.py").read_text().replace("FromQueuePy", "V2"))
    assert [w.__name__ for w in load_target(str(tmp_path / "flows.v2.py"))[0]] == ["V2"]


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
    assert "demo_process_order completed" in p.stdout
    assert "demo_ship_order failed as designed" in p.stdout
    assert "demo_report completed" in p.stdout
    assert "serving task queue 'rillflow-demo'" in p.stdout
    assert "ActivityTaskRetrying" in p.stdout  # the flaky payment was retried
    assert "query status: awaiting approval, 42.50" in p.stdout
    assert "update adjust(40.0) answered: 40.0" in p.stdout
    assert "refund-A-1001-40.00 approved by dana" in p.stdout
    # a schedule every second, three times: three runs, one per due time, then deleted
    assert "every second, 3 times" in p.stdout and re.search(
        r"schedule demo-every-second-\d+ deleted", p.stdout
    )
    assert len(set(re.findall(r"demo-every-second-\d+@\d{8}T\d{6}Z", p.stdout))) == 3
    assert "WorkflowExecutionSignaled" in p.stdout and "WorkflowExecutionUpdateCompleted" in p.stdout
    assert (tmp_path / "data" / "appendonlydir").exists()  # AOF on
    assert not (tmp_path / "dev" / "url").exists()  # cleaned up on exit


def test_a_second_dev_server_leaves_the_first_one_the_clis_default(tmp_path: Path, redis_url: str) -> None:
    """A dev server already answering at the URL the CLI finds stays its default: a
    second one (another --data-dir) neither takes the URL file nor removes it."""
    url_file = tmp_path / "dev" / "url"
    url_file.parent.mkdir(parents=True)
    url_file.write_text(redis_url)  # (a live server, standing for the first dev server)
    p = rf(
        "dev", "--once", "--data-dir", str(tmp_path / "d2"), env={"RILLFLOW_HOME": str(tmp_path)}, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert f"another dev server ({redis_url}) is the CLI's default" in p.stdout
    assert url_file.read_text() == redis_url


def test_worker_serves_a_whole_module(redis_url: str, worker_procs: Any) -> None:
    """What docker-compose's worker service runs: every workflow and activity in a module."""
    worker_procs(redis_url, target="rillflow.demo")
    p = rf("start", "demo_report", "--input", '{"report_type": "weekly"}', "--wait", "--url", redis_url)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"report_type": "weekly", "rows": 3}


@pytest.mark.parametrize(
    ("option", "says"),
    [
        (["--max-eager-activities", "-1"], "--max-eager-activities must not be negative, got -1"),
        (["--max-concurrent-activities", "0"], "--max-concurrent-activities must be at least 1"),
        (["--heartbeat", "0"], "--heartbeat must be a positive number of seconds"),
        (["--log-level", "nope"], "--log-level must be one of debug, info, warning, error, critical"),
        (["--sticky-timeout", "-1"], "--sticky-timeout must not be negative"),
        (["--wait-for-redis", "-1"], "--wait-for-redis must not be negative"),
    ],
)
def test_worker_options_out_of_range_are_one_clear_line(option: list[str], says: str) -> None:
    # (an unreachable server: the options are checked before anything waits for it)
    p = rf("worker", "tests.flows:SERVED", "--url", "redis://127.0.0.1:1/0", *option)
    assert_one_line(p, 2, says)


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


BROKEN_MODULES = {
    "broken_syntax": "def x(:\n    pass\n",
    "broken_import": "import json\nraise RuntimeError('boom at import')\n",
}

MISTAKES: list[tuple[list[str], dict[str, str], int, str]] = [
    (["describe", "x", "--url", "http://x"], {}, 2, "--url 'http://x' is not a Redis URL"),
    (["describe", "x"], {"RILLFLOW_URL": "http://env"}, 2, "$RILLFLOW_URL 'http://env' is not a Redis URL"),
    (["describe", "x", "--url", "redis://127.0.0.1:port/0"], {}, 2, "Port could not be cast to integer"),
    (["describe", "\udcff", "--url", "{url}"], {}, 2, "execution id is not UTF-8 text: b'\\xff'"),
    (["history", "a\udcfe", "--url", "{url}"], {}, 2, "execution id is not UTF-8 text: b'a\\xfe'"),
    (["terminate", "x", "--reason", "\udcff", "--url", "{url}"], {}, 2, "--reason is not UTF-8 text"),
    (["describe", "x", "-n", "\udcff", "--url", "{url}"], {}, 2, "--namespace is not UTF-8 text"),
    (
        [
            "start",
            "w",
            "--allow-unregistered",
            "-i",
            '{"n": [123456789012345678901234567890]}',
            "--url",
            "{url}",
        ],
        {},
        2,
        "n.0: the integer 123456789012345678901234567890 does not fit in 64 bits",
    ),
    (
        ["signal", "x", "s", "-i", '{"text": "\\ud800"}', "--url", "{url}"],
        {},
        2,
        "text: the string has a lone surrogate '\\ud800' at position 0",
    ),
    (["describe", "x", "--url", "{url_db99}"], {}, 4, "refused: DB index is out of range"),
    (["describe", "x", "--url", "{url_wrongpass}"], {}, 4, "refused the credentials"),
    # a worker waits for an unreachable server, not for credentials or a database to change
    (["worker", "rillflow.demo", "--url", "{url_wrongpass}"], {}, 4, "refused the credentials"),
    (["worker", "rillflow.demo", "--url", "{url_db99}"], {}, 4, "refused: DB index is out of range"),
    (["query", "x", "q", "--timeout", "0", "--url", "{url}"], {}, 2, "--timeout must be a positive number"),
    (["result", "x", "--timeout", "-1", "--url", "{url}"], {}, 2, "--timeout must be a positive number"),
    (["worker", "broken_syntax", "--url", "{url}"], {}, 2, "SyntaxError: invalid syntax ("),
    (["worker", "broken_import", "--url", "{url}"], {}, 2, "RuntimeError: boom at import ("),
    (["worker", ":attr", "--url", "{url}"], {}, 2, "':attr' names no module"),
]


@pytest.mark.parametrize(
    ("args", "env", "code", "says"), MISTAKES, ids=[" ".join(m[0][:2]) for m in MISTAKES]
)
def test_user_mistakes_get_one_line_and_an_exit_code(
    redis_url: str, tmp_path: Path, args: list[str], env: dict[str, str], code: int, says: str
) -> None:
    netloc = urlsplit(redis_url).netloc
    urls = {
        "{url}": redis_url,
        "{url_db99}": f"redis://{netloc}/99",
        "{url_wrongpass}": f"redis://nobody:s3cret-pw@{netloc}/0",
    }
    for name, source in BROKEN_MODULES.items():
        (tmp_path / f"{name}.py").write_text(source)
    p = rf(*(urls.get(a, a) for a in args), env=env, cwd=tmp_path)
    assert_one_line(p, code, says)
    assert "s3cret-pw" not in p.stderr  # a password never shows
    if args[:2] == ["worker", "broken_import"]:
        assert f"{tmp_path / 'broken_import.py'}, line 2" in p.stderr  # where, in the user's code


def test_an_acl_user_without_permission_gets_one_line(redis_url: str) -> None:
    user, password = f"rf-noperm-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    netloc = urlsplit(redis_url).netloc
    with redis.Redis.from_url(redis_url) as r:
        r.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~other:*", "+@all")
        try:
            p = rf("describe", "x", "--url", f"redis://{user}:{password}@{netloc}/0")
            assert_one_line(p, 4, "the Redis user may not do what rillflow needs: ")
            assert "ACL SETUSER <user> ~rf:* +@all" in p.stderr and password not in p.stderr
            # the keys it may read, but not the commands rillflow's scripts run
            r.execute_command("ACL", "SETUSER", user, "~*", "-@all", "+@read", "+@connection")
            p = rf("describe", "x", "--url", f"redis://{user}:{password}@{netloc}/0")
            assert_one_line(p, 4, "has no permissions to run the")
        finally:
            r.execute_command("ACL", "DELUSER", user)


def test_the_cli_finds_redis_without_a_url(redis_url: str, tmp_path: Path) -> None:
    """--url, else $RILLFLOW_URL, else the URL the running `rillflow dev` wrote."""
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "url").write_text(redis_url + "\n")
    home = {"RILLFLOW_HOME": str(tmp_path), "RILLFLOW_URL": ""}
    p = rf("workflows", env=home)
    assert p.returncode == 0 and "no workflows registered in namespace 'default'" in p.stderr
    p = rf("workflows", env={**home, "RILLFLOW_URL": "http://env"})  # the variable comes first
    assert_one_line(p, 2, "$RILLFLOW_URL 'http://env' is not a Redis URL")
    p = rf("workflows", "--url", redis_url, env={**home, "RILLFLOW_URL": "http://env"})  # then --url
    assert p.returncode == 0, p.stderr
    p = rf("workflows", env={"RILLFLOW_HOME": str(tmp_path / "none"), "RILLFLOW_URL": ""})
    assert_one_line(p, 2, "no Redis URL: pass --url (or set RILLFLOW_URL), or start a local server")


def _readme_tour() -> tuple[str, list[list[str]]]:
    """The tour's shop.py and its `rillflow` commands, as the README writes them."""
    readme = (ROOT / "README.md").read_text()
    tour = readme[readme.index("## A five-minute tour") : readme.index("## What you get")]
    blocks = re.findall(r"```(\w+)\n(.*?)```", tour, re.S)
    shop = next(code for lang, code in blocks if lang == "python" and code.startswith("# shop.py"))
    commands = [
        shlex.split(line, comments=True)[1:]
        for lang, code in blocks
        if lang == "sh"
        for line in code.splitlines()
        if line.startswith("rillflow ")
    ]
    return shop, commands


def test_the_readme_tour_runs_as_written_against_rillflow_dev(tmp_path: Path) -> None:
    """The first run: `rillflow dev`, the tour's worker and commands, no --url anywhere.
    The demo serves its own queue, so the user's ship_order reaches the user's worker."""
    shop, commands = _readme_tour()
    assert ["worker", "shop"] in commands and not any("--url" in c for c in commands)
    assert "timedelta(seconds=10)" in shop
    (tmp_path / "shop.py").write_text(shop.replace("timedelta(seconds=10)", "timedelta(seconds=1)"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    env |= {"RILLFLOW_HOME": str(tmp_path / "home"), "RILLFLOW_URL": ""}
    started: list[subprocess.Popen[bytes]] = []

    def spawn(*args: str, log: str) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "rillflow.cli", *args]
        with open(tmp_path / log, "wb") as f:
            started.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT))
        return started[-1]

    try:
        dev = spawn("dev", log="dev.log")
        _wait_for(lambda: "serving at" in (tmp_path / "dev.log").read_text(), dev, tmp_path / "dev.log")
        worker = spawn("worker", "shop", log="worker.log")
        url = (tmp_path / "home" / "dev" / "url").read_text().strip()
        with redis.Redis.from_url(url) as r:
            _wait_for(lambda: r.exists("rf:{default}:registry:ship_order"), worker, tmp_path / "worker.log")
        for args in commands:
            if args[0] == "worker":
                continue
            p = rf(
                *args, env={k: env[k] for k in ("RILLFLOW_HOME", "RILLFLOW_URL")}, cwd=tmp_path, timeout=90
            )
            assert p.returncode == 0, (args, p.stderr)
            if args[:2] == ["start", "ship_order"] and "--wait" in args:
                assert json.loads(p.stdout) == "A2: 1 packed"
            if args[:2] == ["result", "R1"]:
                assert "approved by dana" in p.stdout
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        dev.send_signal(signal.SIGTERM)
        assert dev.wait(30) == 0
        assert not (tmp_path / "home" / "dev" / "url").exists()
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _wait_for(ready: Any, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)


def test_the_keyspace_script_counts_keys_by_kind_and_finds_the_url(redis_url: str, worker_procs: Any) -> None:
    """scripts/keyspace.py: an operator's one-screen view, from $RILLFLOW_URL like the CLI."""
    worker_procs(redis_url)
    started = rf(
        "start", "hello_workflow", "--id", "K1", "--input", '{"name": "k"}', "--wait", "--url", redis_url
    )
    assert started.returncode == 0, started.stderr
    p = subprocess.run(
        [sys.executable, "scripts/keyspace.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT), "RILLFLOW_URL": redis_url},
    )
    assert p.returncode == 0, p.stderr
    counts = next(line for line in p.stdout.splitlines() if line.startswith("keys:"))
    assert "'hc': 1" in counts and "'run': 1" in counts and "'other'" not in counts, p.stdout


def test_a_worker_started_while_redis_is_down_waits_for_it(tmp_path: Path, worker_procs: Any) -> None:
    """A worker pod that comes up during a Redis restart or failover waits (saying so in
    its log), then serves, rather than exiting into a crash loop."""
    from rillflow_runtime.embedded import EmbeddedRedis, free_port

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    w = worker_procs(url, wait=False)
    deadline = time.monotonic() + 30
    while "waiting for Redis" not in w.output():
        assert w.proc.poll() is None, w.output()
        assert time.monotonic() < deadline, w.output()
        time.sleep(0.05)
    with EmbeddedRedis(tmp_path / "late", port=port) as server:
        w.wait_registered()
        p = rf("start", "hello_workflow", "--input", '{"name": "late"}', "--wait", "--url", server.url)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout) == ["hello late", "hi late from a thread"]
        assert w.terminate() == 0


def test_a_worker_that_cannot_reach_redis_in_time_exits_with_one_line() -> None:
    p = rf("worker", "tests.flows:SERVED", "--url", "redis://127.0.0.1:1/0", "--wait-for-redis", "0")
    assert_one_line(p, 4, "cannot reach Redis at redis://127.0.0.1:1/0 (--url)")
    p = rf("worker", "tests.flows:SERVED", "--url", "redis://127.0.0.1:1/0", "--wait-for-redis", "1")
    assert p.returncode == 4 and "Traceback" not in p.stderr, p.stderr
    assert "waiting for Redis" in p.stderr  # the log line of each try
    assert "after waiting 1 s: --wait-for-redis" in p.stderr.strip().splitlines()[-1]


def test_a_worker_refused_at_once_does_not_claim_it_waited(redis_url: str) -> None:
    netloc = urlsplit(redis_url).netloc
    for url, says in [
        (f"redis://nobody:s3cret-pw@{netloc}/0", "refused the credentials"),
        (f"redis://{netloc}/99", "DB index is out of range"),
    ]:
        p = rf("worker", "rillflow.demo", "--url", url, "--wait-for-redis", "30")
        assert_one_line(p, 4, says)
        assert "after waiting" not in p.stderr


def test_a_server_that_needs_a_password_the_url_lacks_says_so(tmp_path: Path) -> None:
    from rillflow_runtime.embedded import EmbeddedRedis

    with EmbeddedRedis(tmp_path / "pw") as server:
        with redis.Redis.from_url(server.url) as r:
            r.config_set("requirepass", "s3cret-pw")
        netloc = urlsplit(server.url).netloc
        for cmd in (["worker", "rillflow.demo"], ["describe", "x"], ["history", "x"], ["workers"]):
            p = rf(*cmd, "--url", f"redis://{netloc}/0", timeout=40)  # (it once retried for minutes)
            assert_one_line(p, 4, "needs a password and the URL gives none")
        p = rf("describe", "x", "--url", f"redis://:s3cret-pw@{netloc}/0")
        assert_one_line(p, 3, "no workflow execution 'x'")  # the right one gets through


def test_a_port_that_is_not_redis_gets_one_line() -> None:
    import socket
    import threading

    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def answer_http() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = srv.accept()
                with conn:
                    conn.recv(1024)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    threading.Thread(target=answer_http, daemon=True).start()
    try:
        p = rf("describe", "x", "--url", f"redis://127.0.0.1:{port}/0")
        assert_one_line(p, 4, "does not answer as a Redis server does")
    finally:
        srv.close()
