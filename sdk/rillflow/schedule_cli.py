"""``rillflow schedule ...``: create, change, inspect and drive schedules from a shell."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.markup import escape
from rich.table import Table

from rillflow.cli_support import Exit, NsOpt, UrlOpt, _parse_input, _utf8, _when, connect, out, run
from rillflow.errors import InvalidInputError
from rillflow.models import ScheduleDefinition, ScheduleOverlapPolicy
from rillflow.payloads import validation_summary
from rillflow.schedules import overlap_of

schedule_app = typer.Typer(
    help="Schedules: a workflow's runs started by the clock (cron, intervals, calendars).",
    no_args_is_help=True,
)

IdArg = Annotated[str, typer.Argument(help="the schedule id", callback=_utf8)]
CronOpt = Annotated[
    list[str] | None,
    typer.Option("--cron", help="a cron expression, like '0 0 * * *' (repeat for several)", callback=None),
]
EveryOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--every", help="an interval: 30s, 15m, 1h, 1d, a bare number is seconds (repeat for several)"
    ),
]
SpecOpt = Annotated[
    str | None,
    typer.Option(
        "--spec",
        help="the definition as JSON (ScheduleDefinition's fields: calendars, skip, ...); the other "
        "options change it",
        callback=_utf8,
    ),
]
InputOpt = Annotated[
    str | None, typer.Option("--input", "-i", help="the runs' input, as JSON", callback=_utf8)
]
OverlapOpt = Annotated[
    str | None,
    typer.Option(
        "--overlap", help="SKIP, BUFFER_ONE, BUFFER_ALL, CANCEL_OTHER, TERMINATE_OTHER or ALLOW_ALL"
    ),
]
ZoneOpt = Annotated[str | None, typer.Option("--time-zone", help="IANA time zone, like Europe/Paris")]
JitterOpt = Annotated[str | None, typer.Option("--jitter", help="start each run up to this late: 30s, 5m")]
CatchupOpt = Annotated[
    str | None, typer.Option("--catchup-window", help="how far back missed due times still run: 10m, 1d")
]
MaxOpt = Annotated[int | None, typer.Option("--max-executions", help="stop after this many runs")]
StartOpt = Annotated[
    str | None, typer.Option("--start-at", help="no due time before this ISO time (naive: UTC)")
]
EndOpt = Annotated[str | None, typer.Option("--end-at", help="no due time after this ISO time (naive: UTC)")]
PofOpt = Annotated[
    bool | None, typer.Option("--pause-on-failure/--no-pause-on-failure", help="pause when a run fails")
]
NoteOpt = Annotated[str | None, typer.Option("--note", help="why (shown by describe)", callback=_utf8)]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]

_DECLARED = (
    "note: workflow {0} declares this schedule in its code; the next worker of {0} to start makes it "
    "as declared again: change the declaration to keep this"
)
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(raw: str, option: str) -> timedelta:
    m = _DURATION.match(raw.strip())
    if not m:
        raise Exit(2, f"{option} must be a duration like 30s, 15m, 1h or 1d, got {raw!r}")
    try:
        return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    except OverflowError:
        raise Exit(2, f"{option} {raw!r} is longer than any schedule may be") from None


def _changes(
    spec: str | None,
    cron: list[str] | None,
    every: list[str] | None,
    input: str | None,
    overlap: str | None,
    time_zone: str | None,
    jitter: str | None,
    catchup: str | None,
    max_executions: int | None,
    start_at: str | None,
    end_at: str | None,
    pause_on_failure: bool | None,
) -> dict[str, Any]:
    """The definition's fields the options give (only those given)."""
    fields: dict[str, Any] = {}
    if spec is not None:
        value = _parse_input(spec, "--spec")
        if not isinstance(value, dict):
            raise Exit(2, "--spec must be a JSON object of ScheduleDefinition's fields")
        known = [n for n in ScheduleDefinition.model_fields if n != "schedule_id"]
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise Exit(
                2, f"--spec: a schedule has no field {', '.join(unknown)} (its fields: {', '.join(known)})"
            )
        fields.update(value)
    if cron:
        fields["cron_expressions"] = list(cron)
    if every:
        fields["intervals"] = [{"every": _duration(e, "--every")} for e in every]  # (checked with the rest)
    if input is not None:
        fields["input"] = _parse_input(input)
    if time_zone is not None:
        fields["time_zone_name"] = time_zone
    if jitter is not None:
        fields["jitter"] = _duration(jitter, "--jitter")
    if max_executions is not None:
        fields["max_executions"] = max_executions
    if start_at is not None:
        fields["start_at"] = _when(start_at, "--start-at")
    if end_at is not None:
        fields["end_at"] = _when(end_at, "--end-at")
    given = fields.get("policy")
    if given is not None and not isinstance(given, dict):
        raise Exit(2, f"--spec: policy must be an object of SchedulePolicy's fields, got {given!r}")
    policy: dict[str, Any] = dict(given or {})
    if overlap is not None:
        policy["overlap"] = ScheduleOverlapPolicy[overlap_of(overlap.strip()).name]
    if catchup is not None:
        policy["catchup_window_seconds"] = int(_duration(catchup, "--catchup-window").total_seconds())
    if pause_on_failure is not None:
        policy["pause_on_failure"] = pause_on_failure
    if policy:
        fields["policy"] = policy
    return fields


def _span(d: timedelta) -> str:
    """A duration as people write it: 90s, 15m, 2h30m, 365d."""
    secs = int(d.total_seconds())
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if secs >= size:
            out += f"{secs // size}{unit}"
            secs %= size
    return out or "0s"


def _due_rules(d: ScheduleDefinition) -> list[str]:
    """When a schedule is due, a line per kind of rule."""
    lines = [f"cron: {', '.join(d.cron_expressions)}"] if d.cron_expressions else []
    if d.intervals:
        items = [
            f"every {_span(i.every)}" + (f" + {_span(i.offset)}" if i.offset else "") for i in d.intervals
        ]
        lines.append("intervals: " + ", ".join(items))
    for name in ("calendars", "skip"):
        for c in getattr(d, name):
            shown = c.model_dump(exclude_defaults=True, mode="json")
            lines.append(
                f"{name[:-1] if name == 'calendars' else name}: {json.dumps(shown) if shown else 'every day at 00:00:00'}"
            )
    for name, t in (("from", d.start_at), ("until", d.end_at)):
        if t is not None:
            lines.append(f"{name}: {t.isoformat()}")
    lines.append(f"time zone: {d.time_zone_name or 'UTC'}")
    return lines


def _definition(fields: dict[str, Any]) -> ScheduleDefinition:
    try:
        return ScheduleDefinition.model_validate(fields)
    except ValidationError as e:
        raise InvalidInputError(f"the schedule is not valid: {validation_summary(e, None)}") from None


@schedule_app.command()
def create(
    schedule_id: IdArg,
    workflow: Annotated[str, typer.Argument(help="the workflow's name", callback=_utf8)],
    cron: CronOpt = None,
    every: EveryOpt = None,
    spec: SpecOpt = None,
    input: InputOpt = None,
    overlap: OverlapOpt = None,
    time_zone: ZoneOpt = None,
    jitter: JitterOpt = None,
    catchup_window: CatchupOpt = None,
    max_executions: MaxOpt = None,
    start_at: StartOpt = None,
    end_at: EndOpt = None,
    pause_on_failure: PofOpt = None,
    task_queue: Annotated[str | None, typer.Option("--task-queue", "-q", callback=_utf8)] = None,
    paused: Annotated[bool, typer.Option("--paused", help="create it paused")] = False,
    note: NoteOpt = None,
    url: UrlOpt = None,
    namespace: NsOpt = "default",
) -> None:
    """Create a schedule of a registered workflow; its input is checked against the
    workflow's schema first (nothing is stored if it fails)."""

    async def main() -> None:
        fields = _changes(
            spec, cron, every, input, overlap, time_zone, jitter, catchup_window, max_executions,
            start_at, end_at, pause_on_failure,
        )  # fmt: skip
        fields.setdefault("input", None)
        if not (fields.get("cron_expressions") or fields.get("intervals") or fields.get("calendars")):
            raise Exit(2, "say when it runs: --cron, --every, or calendars in --spec")
        definition = _definition(fields)
        async with connect(url, namespace) as client:
            h = await client.create_schedule(
                workflow, definition, schedule_id=schedule_id, task_queue=task_queue, paused=paused, note=note
            )
            d = await h.describe()
            nxt = d.future_executions[0].isoformat() if d.future_executions else "none (paused or ended)"
            out.print(f"created schedule {escape(h.id)} of {escape(workflow)}; next due: {nxt}")

    run(main)


@schedule_app.command()
def update(
    schedule_id: IdArg,
    cron: CronOpt = None,
    every: EveryOpt = None,
    spec: SpecOpt = None,
    input: InputOpt = None,
    overlap: OverlapOpt = None,
    time_zone: ZoneOpt = None,
    jitter: JitterOpt = None,
    catchup_window: CatchupOpt = None,
    max_executions: MaxOpt = None,
    start_at: StartOpt = None,
    end_at: EndOpt = None,
    pause_on_failure: PofOpt = None,
    url: UrlOpt = None,
    namespace: NsOpt = "default",
) -> None:
    """Change the fields given; the rest keep their values, and what the schedule has
    done (due times acted on, its runs, its log) stays."""

    async def main() -> None:
        fields = _changes(
            spec, cron, every, input, overlap, time_zone, jitter, catchup_window, max_executions,
            start_at, end_at, pause_on_failure,
        )  # fmt: skip
        if not fields:
            raise Exit(2, "nothing to change: give at least one option (see --help)")
        async with connect(url, namespace) as client:
            h = client.get_schedule_handle(schedule_id)
            if "policy" in fields:
                current = (await h.describe()).definition.policy.model_dump()
                fields["policy"] = {**current, **fields["policy"]}
            await h.update(**fields)
            out.print(f"updated schedule {escape(schedule_id)}")
            origin = (await h.describe()).origin
            if origin.startswith("declared:"):
                out.print(_DECLARED.format(origin.removeprefix("declared:")))

    run(main)


@schedule_app.command(name="list")
def list_(as_json: JsonOpt = False, url: UrlOpt = None, namespace: NsOpt = "default") -> None:
    """Every schedule of the namespace."""

    async def main() -> None:
        async with connect(url, namespace) as client:
            rows = await client.list_schedules()
            if as_json:
                print(json.dumps([s.to_json() for s in rows], indent=2))
                return
            if not rows:
                out.print("no schedules")
                return
            t = Table("schedule id", "workflow", "state", "next run (jitter included)", "origin", "note")
            for col in t.columns:
                col.overflow = "fold"
            for s in rows:
                t.add_row(
                    escape(s.schedule_id),
                    escape(s.workflow_type),
                    s.state,
                    s.next_due.isoformat() if s.next_due else "",
                    escape(s.origin),
                    escape(s.note or ""),
                )
            out.print(t)

    run(main)


@schedule_app.command()
def describe(
    schedule_id: IdArg, as_json: JsonOpt = False, url: UrlOpt = None, namespace: NsOpt = "default"
) -> None:
    """A schedule: its definition and state, its next 10 due times, its last 10 runs
    with their status, and the due times it skipped, with why."""

    async def main() -> None:
        async with connect(url, namespace) as client:
            d = await client.get_schedule_handle(schedule_id).describe()
            if as_json:
                print(json.dumps(d.to_json(), indent=2))
                return
            state = "paused" if d.paused else "done" if d.remaining_executions == 0 else "active"
            out.print(
                f"[bold]{escape(d.schedule_id)}[/bold]  {escape(d.workflow_type)} on {escape(d.task_queue)}"
            )
            out.print(f"state: {state}" + (f" ({escape(d.note)})" if d.note else ""))
            for line in _due_rules(d.definition):
                out.print(escape(line))
            out.print("input: " + escape(json.dumps(d.definition.input, default=str)))
            pol = d.definition.policy
            out.print(
                f"policy: overlap {pol.overlap.name}, catch-up window {_span(pol.catchup_window)}, "
                f"pause on failure {'yes' if pol.pause_on_failure else 'no'}; "
                f"runs left: {'no limit' if d.remaining_executions is None else d.remaining_executions}"
            )
            out.print(
                f"origin: {escape(d.origin)}; runs started: {d.runs_started}, due times skipped: {d.times_skipped}"
            )
            if d.open_executions:
                out.print("open: " + ", ".join(escape(w) for w in d.open_executions))
            if d.waiting:
                out.print("waiting: " + ", ".join(w.isoformat() for w in d.waiting))
            jitter = (
                f" (each run starts up to {_span(d.definition.jitter)} later)" if d.definition.jitter else ""
            )
            out.print("next due times" + jitter + ":" + ("" if d.future_executions else " none"))
            for due in d.future_executions:
                out.print(f"  {due.isoformat()}")
            if d.recent_executions:
                t = Table("execution id", "due", "started", "how", "status", title="last runs")
                for col in t.columns:
                    col.overflow = "fold"
                for r in d.recent_executions:
                    t.add_row(
                        escape(r.execution_id),
                        r.scheduled_time.isoformat(),
                        r.started_at.isoformat(timespec="seconds"),
                        r.how,
                        r.status,
                    )
                out.print(t)
            if d.skipped:
                t = Table("due", "why", title="skipped")
                for col in t.columns:
                    col.overflow = "fold"
                for s in d.skipped:
                    span = s.scheduled_time.isoformat()
                    if s.until:
                        span += f" to {s.until.isoformat()}" + (f" ({s.count} due times)" if s.count else "")
                    t.add_row(span, escape(s.why))
                out.print(t)

    run(main)


def _simple(op: str) -> Any:
    def command(
        schedule_id: IdArg, note: NoteOpt = None, url: UrlOpt = None, namespace: NsOpt = "default"
    ) -> None:
        async def main() -> None:
            async with connect(url, namespace) as client:
                h = client.get_schedule_handle(schedule_id)
                if await getattr(h, op)(note):
                    out.print(f"{op}d schedule {escape(schedule_id)}")
                else:
                    out.print(
                        f"schedule {escape(schedule_id)} was {'paused already' if op == 'pause' else 'not paused'}"
                    )

        run(main)

    return command


schedule_app.command(name="pause", help="Stop starting runs (due times until unpause are skipped).")(
    _simple("pause")
)
schedule_app.command(name="unpause", help="Start runs again, from now on.")(_simple("unpause"))


@schedule_app.command()
def delete(schedule_id: IdArg, url: UrlOpt = None, namespace: NsOpt = "default") -> None:
    """Remove a schedule; its runs go on. (A schedule declared in code comes back when a
    worker of its workflow starts: remove it from the code.)"""

    async def main() -> None:
        async with connect(url, namespace) as client:
            h = client.get_schedule_handle(schedule_id)
            origin = (await h.describe()).origin
            await h.delete()
            out.print(f"deleted schedule {escape(schedule_id)}")
            if origin.startswith("declared:"):
                out.print(_DECLARED.format(origin.removeprefix("declared:")))

    run(main)


@schedule_app.command()
def trigger(
    schedule_id: IdArg, overlap: OverlapOpt = None, url: UrlOpt = None, namespace: NsOpt = "default"
) -> None:
    """Run it now, once, by its overlap policy (or --overlap); prints the execution id."""

    async def main() -> None:
        async with connect(url, namespace) as client:
            h, outcome = await client.get_schedule_handle(schedule_id).trigger_outcome(overlap)
            if h is not None:
                print(h.id)
            elif outcome == "buffered":
                out.print(
                    "not started yet: it waits for the schedule's open run to close (its overlap policy)"
                )
            else:
                out.print(f"not started: {escape(outcome)}")

    run(main)


@schedule_app.command()
def backfill(
    schedule_id: IdArg,
    start: Annotated[str, typer.Option("--start", help="from this ISO time, inclusive (naive: UTC)")],
    end: Annotated[
        str, typer.Option("--end", help="to this ISO time, inclusive (naive: UTC); not in the future")
    ],
    overlap: OverlapOpt = None,
    url: UrlOpt = None,
    namespace: NsOpt = "default",
) -> None:
    """Run the due times from --start to --end that have not run (at most 10,000)."""

    async def main() -> None:
        t0, t1 = _when(start, "--start"), _when(end, "--end")
        assert t0 is not None and t1 is not None
        async with connect(url, namespace) as client:
            res = await client.get_schedule_handle(schedule_id).backfill(t0, t1, overlap)
            out.print(f"started {res.started}, buffered {res.buffered}, skipped {res.skipped}")
            if res.skipped and overlap is None:
                out.print(
                    "(`rillflow schedule describe` says why; by the schedule's overlap policy a due time is "
                    "skipped while an earlier run is open: --overlap ALLOW_ALL or BUFFER_ALL runs them all)"
                )

    run(main)
