"""``rillflow schedule ...`` as a user runs it: each command, and mistakes as one line."""

from __future__ import annotations

import json
from typing import Any

from tests.test_cli import assert_one_line, rf

TARGET = "tests.schedule_flows:WORKFLOWS"


def test_schedule_commands_from_create_to_delete(redis_url: str, worker_procs: Any) -> None:
    worker_procs(redis_url, TARGET)
    url = ("--url", redis_url)
    p = rf("schedule", "create", "hourly", "sched_tick", "--cron", "0 * * * *", "--input", '{"n": 2}', *url)
    assert p.returncode == 0 and "created schedule hourly of sched_tick; next due:" in p.stdout, p.stderr
    assert_one_line(rf("schedule", "create", "hourly", "sched_tick", "--every", "1h", *url), 3, "exists")
    d = json.loads(rf("schedule", "describe", "hourly", "--json", *url).stdout)
    assert len(d["future_executions"]) == 10 and all(":00:00" in t for t in d["future_executions"])
    assert d["definition"]["input"] == {"n": 2} and d["origin"] == "client" and not d["paused"]

    assert (
        rf("schedule", "update", "hourly", "--every", "15m", "--overlap", "ALLOW_ALL", *url).returncode == 0
    )
    d = json.loads(rf("schedule", "describe", "hourly", "--json", *url).stdout)
    assert d["definition"]["intervals"] == [{"every": "PT15M", "offset": None}]
    assert d["definition"]["policy"]["overlap"] == "ALLOW_ALL" and d["definition"]["cron_expressions"] == [
        "0 * * * *"
    ]

    assert rf("schedule", "pause", "hourly", "--note", "for the test", *url).returncode == 0
    (row,) = json.loads(rf("schedule", "list", "--json", *url).stdout)
    assert row["schedule_id"] == "hourly" and row["paused"] and row["note"] == "for the test"
    p = rf("schedule", "trigger", "hourly", *url)
    assert p.returncode == 0 and p.stdout.startswith("hourly@"), p.stderr
    wid = p.stdout.strip()
    out = json.loads(rf("result", wid, *url).stdout)
    assert out["schedule_id"] == "hourly" and out["id"] == wid and out["n"] == 2
    p = rf(
        "schedule",
        "backfill",
        "hourly",
        "--start",
        "2026-01-01T00:00:00Z",
        "--end",
        "2026-01-01T00:30:00Z",
        *url,
    )
    assert p.returncode == 0 and "started 3, buffered 0, skipped 0" in p.stdout, p.stdout + p.stderr
    listed = json.loads(rf("list", "--schedule", "hourly", "--json", *url).stdout)["executions"]
    assert len(listed) == 4 and {e["schedule_id"] for e in listed} == {"hourly"}
    assert "hourly@20260101T001500Z" in {e["execution_id"] for e in listed}
    human = rf("schedule", "describe", "hourly", *url).stdout
    assert "state: paused (for the test)" in human and "last runs" in human and "backfill" in human

    assert rf("schedule", "unpause", "hourly", *url).returncode == 0
    assert rf("schedule", "delete", "hourly", *url).returncode == 0
    assert_one_line(rf("schedule", "describe", "hourly", *url), 3, "no schedule 'hourly'")
    assert rf("schedule", "list", *url).stdout.strip() == "no schedules"


def test_schedule_mistakes_are_one_line_and_store_nothing(redis_url: str, worker_procs: Any) -> None:
    worker_procs(redis_url, TARGET)
    url = ("--url", redis_url)
    assert_one_line(
        rf("schedule", "create", "s", "sched_tick", "--cron", "nope", *url), 2, "cron_expressions[0]"
    )
    assert_one_line(
        rf("schedule", "create", "s", "sched_tick", "--every", "1h", "--input", '{"n": "many"}', *url), 2, "n"
    )
    assert_one_line(rf("schedule", "create", "s", "no_such_flow", "--every", "1h", *url), 3, "no_such_flow")
    assert_one_line(rf("schedule", "create", "s", "sched_tick", *url), 2, "--cron, --every")
    assert_one_line(rf("schedule", "create", "s", "sched_tick", "--every", "soon", *url), 2, "--every")
    assert_one_line(
        rf("schedule", "create", "s", "sched_tick", "--every", "1h", "--time-zone", "Mars/Olympus", *url),
        2,
        "time_zone_name",
    )
    assert_one_line(
        rf("schedule", "create", "s", "sched_tick", "--every", "1h", "--overlap", "SOMETIMES", *url),
        2,
        "overlap",
    )
    assert_one_line(rf("schedule", "pause", "missing", *url), 3, "no schedule 'missing'")
    assert_one_line(rf("schedule", "update", "missing", "--every", "1h", *url), 3, "no schedule 'missing'")
    assert rf("schedule", "list", *url).stdout.strip() == "no schedules"


def test_schedule_options_out_of_range_are_one_line(redis_url: str, worker_procs: Any) -> None:
    worker_procs(redis_url, TARGET)
    url = ("--url", redis_url)
    assert_one_line(
        rf("schedule", "create", "s", "sched_tick", "--every", "0s", *url), 2, "every must be from 1 second"
    )
    assert_one_line(
        rf("schedule", "create", "s", "sched_tick", "--every", "99999999999d", *url), 2, "--every"
    )
    assert_one_line(
        rf("schedule", "create", "s", "sched_tick", "--every", "1h", "--spec", '{"policy": "x"}', *url),
        2,
        "policy",
    )
    assert rf("schedule", "list", *url).stdout.strip() == "no schedules"
