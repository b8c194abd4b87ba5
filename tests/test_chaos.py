"""The chaos harness in the suite. A short run of load_tests.chaos: a few hundred
workflows, a few dozen worker kills, one Redis kill and the AOF tail cut (the full run
is ``python -m load_tests.chaos``; ``RILLFLOW_CHAOS_SEED=N`` repeats the seed a failure
printed). And a check of the checks: runs made lost, stuck, doubled or wrong on purpose
must show up in the figures, so that a zero means something."""

from __future__ import annotations

import os
from typing import Any

import pytest
import redis.asyncio as aioredis

from load_tests import chaos_flows
from load_tests.chaos import NAMESPACE, ChaosConfig, ChaosRun, RunRecord, inspector, run_chaos
from load_tests.chaos_flows import ChaosMix, Plan
from rillflow import Client, Worker
from tests.conftest import FAST, wait_until

pytestmark = pytest.mark.anyio


@pytest.mark.timeout(300)
async def test_short_chaos_run_loses_sticks_and_duplicates_nothing() -> None:
    cfg = ChaosConfig(workflows=250, workers=3, kills=30, redis_kills=1, duration=35.0, settle=60.0)
    if os.environ.get("RILLFLOW_CHAOS_SEED"):
        cfg.seed = int(os.environ["RILLFLOW_CHAOS_SEED"])
    report = await run_chaos(cfg, log=print)
    summary = "\n".join(report.lines())
    print(summary)
    assert report.started == cfg.workflows, summary
    assert report.worker_kills == cfg.kills and report.redis_kills == 1, summary
    assert report.rollback is not None, summary
    assert report.unchecked == [], summary
    assert report.lost == [], summary
    assert report.stuck == [], summary
    assert report.dup_completions == [], summary
    assert report.dup_signals == [], summary
    assert report.wrong == [], summary
    assert report.scheduled >= 0.8 * cfg.duration, summary  # the every-second schedule ran throughout
    assert report.cancels_sent > 0 and report.canceled > 0, summary  # cancellation was exercised


async def test_the_checks_count_what_they_see(redis_url: str, monkeypatch: Any) -> None:
    monkeypatch.setenv(chaos_flows.TALLY_ENV, redis_url)
    client = await Client.connect(redis_url, NAMESPACE)
    chaos = ChaosRun(ChaosConfig(workflows=0))
    chaos.db = inspector(redis_url)
    chaos.tally = aioredis.Redis.from_url(redis_url)

    try:
        async with Worker(
            client, workflows=[ChaosMix], activities=[chaos_flows.add, chaos_flows.double_sync], **FAST
        ):  # type: ignore[arg-type]
            signals = {
                "fine": 1,
                "doubled": 2,
                "wrong": 0,
                "stuck": 1,
                "lost": 0,
                "closed-twice": 0,
                "chained": 2,
                "canceled": 1,
                "canceled-unasked": 1,
            }
            recs = [RunRecord(i, wid, Plan(i=i, signals=n), []) for i, (wid, n) in enumerate(signals.items())]
            fine, doubled, wrong, stuck, lost, closed_twice, chained, canceled, unasked = recs
            chained.plan.hops = 2  # checked across its three runs: counts nothing
            for rec in (fine, doubled, stuck, closed_twice, chained, canceled, unasked):
                h = await client.start_workflow(ChaosMix, rec.plan, execution_id=rec.execution_id)
                rec.run_id = h.run_id
            for rec in (canceled, unasked):  # waiting for a signal: cancelled there
                await client.get_workflow_handle(rec.execution_id).cancel("checked")
            canceled.cancel = "acked"  # the other, as if the harness had never asked
            h = await client.start_workflow(ChaosMix, Plan(i=30), execution_id=wrong.execution_id)
            wrong.run_id = h.run_id  # the harness expects what Plan(i=2) returns
            lost.run_id = "no-such-run"
            for rec, k in (
                (fine, 1),
                (doubled, 1),
                (doubled, 1),
                (chained, 1),
                (chained, 2),
            ):  # doubled: twice
                rid = f"{rec.execution_id}-{len(rec.sent)}"
                await client.get_workflow_handle(rec.execution_id).signal("poke", k, request_id=rid)
                rec.sent.append(rid)
                rec.acked += 1
                rec.acked_sum += k

            async def closed() -> bool:
                runs = (fine, doubled, wrong, closed_twice, chained, canceled, unasked)
                states = [(await client.get_workflow_handle(r.execution_id).describe()).status for r in runs]
                return not {"running", "continued_as_new"} & set(states)

            await wait_until(closed, 20)
            twice = {
                "run": closed_twice.run_id or "",
                "wid": closed_twice.execution_id,
                "status": "completed",
            }
            await chaos.db.xadd(chaos.keys.closed(0), twice)  # type: ignore[arg-type]
            chaos.records = recs
            open_runs = await chaos.check(client)
    finally:
        await chaos.db.aclose()
        await chaos.tally.aclose()
        await client.close()
    rep = chaos.report

    def ids(items: list[str]) -> list[str]:
        return [item.split(" ")[0] for item in items]

    assert open_runs == {stuck.run_id}
    assert ids(rep.stuck) == ["stuck"] and "last events: 1 WorkflowExecutionStarted" in rep.stuck[0]
    assert ids(rep.lost) == ["lost"]
    assert ids(rep.dup_signals) == ["doubled"] and "payload 1 x2" in rep.dup_signals[0]
    assert ids(rep.dup_completions) == ["closed-twice"]
    assert sorted(ids(rep.wrong)) == ["canceled-unasked", "wrong"]
    assert "canceled, but its cancel was never sent" in " ".join(rep.wrong)
    assert rep.canceled == 2 and rep.cancels_acked == 1
    assert rep.unchecked == [] and rep.uncounted == []
    # every activity the finished runs scheduled ran once, in this quiet run
    assert rep.activities == rep.executions > 0
