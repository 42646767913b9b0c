"""`perfagent backtest`: replay rules over the past and report when each would have fired.

The data is the agent's history (through the running agent's API, or the DuckDB file opened
read-only when no agent answers, as `perfagent history` does) or Prometheus (`--prometheus URL`).
Exit status: 0 with a report, 1 when the rules are invalid or no data source can be read, 2 for bad
arguments or a backtest over the limits.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import urllib.error
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from perfagent.backtest import DEFAULT_PROMETHEUS_STEP, BacktestReport, run_backtest
from perfagent.client import AgentAPIError, PerformanceAgentClient
from perfagent.clock import iso_z, utc_now
from perfagent.detect import CompiledRules, compile_rules
from perfagent.errors import PerfAgentError
from perfagent.models import EngineName, Instance
from perfagent.rules import RuleFileError, RuleSet, format_duration, load_rules, parse_duration, yaml_files
from perfagent.timespec import parse_moment


class UsageError(Exception):
    """A bad argument: exit status 2."""


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "backtest",
        help="replay rules over the past: when each would have fired, and how often",
        description="Replay rules over a past range of history or Prometheus data, from an empty "
        "state, with the agent's for/keep_firing_for semantics.",
    )
    parser.add_argument(
        "--rules", type=Path, default=None, help="rule file or directory on top of the built-ins"
    )
    parser.add_argument(
        "--rule", action="append", default=[], metavar="NAME", help="only this rule (repeatable)"
    )
    parser.add_argument("--since", default=None, help="start: ISO time or duration ago (default 24h)")
    parser.add_argument("--from", dest="start", default=None, help="start: ISO time or duration ago")
    parser.add_argument("--to", dest="end", default=None, help="end: ISO time or duration ago (default now)")
    parser.add_argument(
        "--step",
        default=None,
        help="time between evaluations, e.g. 15s or 1m (default: the data's scrape "
        f"interval; {format_duration(DEFAULT_PROMETHEUS_STEP)} with --prometheus)",
    )
    parser.add_argument(
        "--instance",
        action="append",
        default=[],
        metavar="ID[=ENGINE]",
        help="history: the one instance to replay (ENGINE if the file does not know it); Prometheus: an "
        "`instance` label and its engine, e.g. 10.0.0.5:8000=vllm (repeatable, or comma-separated)",
    )
    parser.add_argument("--prometheus", default=None, metavar="URL", help="read from this Prometheus")
    parser.add_argument(
        "--selector",
        default=None,
        help="with --prometheus: the targets of a series selector, e.g. '{job=\"vllm\"}'",
    )
    parser.add_argument("--url", default="http://127.0.0.1:8002", help="the agent's base URL")
    parser.add_argument("--db", type=Path, default=Path("data/perfagent.duckdb"), help="DuckDB file")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (the API's shape)")
    parser.add_argument("--limit", type=int, default=1000, help="most episodes listed (default 1000)")


def _range(args: argparse.Namespace, now: datetime) -> tuple[datetime, datetime]:
    if args.since and args.start:
        raise UsageError("give --since or --from, not both")
    try:
        start = parse_moment(args.start or args.since or "24h", now=now)
        end = parse_moment(args.end, now=now) if args.end else now
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if start >= end:
        raise UsageError(f"the range is empty: {iso_z(start)} is not before {iso_z(end)}")
    return start, end


def _step(text: str | None) -> timedelta | None:
    if text is None:
        return None
    try:
        step = parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"--step: {exc}") from None
    if step < timedelta(seconds=1):
        raise UsageError("--step must be at least 1s")
    return step


def _instances(entries: Sequence[str]) -> list[tuple[str, EngineName | None]]:
    out: list[tuple[str, EngineName | None]] = []
    for entry in (e.strip() for text in entries for e in text.split(",")):
        if not entry:
            continue
        name, _, engine = entry.rpartition("=") if "=" in entry else (entry, "", "")
        try:
            out.append((name, EngineName(engine) if engine else None))
        except ValueError:
            known = ", ".join(e.value for e in EngineName)
            raise UsageError(f"--instance {entry}: unknown engine {engine!r}; known: {known}") from None
    return out


def _rules(args: argparse.Namespace) -> tuple[RuleSet, CompiledRules]:
    ruleset = load_rules([args.rules] if args.rules else [])
    if args.rule:
        unknown = [n for n in args.rule if ruleset.get(n) is None]
        if unknown:
            raise UsageError(f"--rule {unknown[0]}: no such rule; known: {', '.join(ruleset.names)}")
        ruleset = RuleSet(tuple(r for r in ruleset if r.name in args.rule), ruleset.files)
    return ruleset, compile_rules(ruleset)


# --- sources ------------------------------------------------------------------------------------------


def _from_api(
    args: argparse.Namespace, start: datetime, end: datetime, instance: str | None, limit: int
) -> dict[str, Any]:
    body: dict[str, Any] = {"start": iso_z(start), "end": iso_z(end), "source": "history", "limit": limit}
    if instance:
        body["instance_id"] = instance
    if args.step:
        body["step"] = args.step
    if args.rules:
        body["rules"] = {p.name: p.read_text(encoding="utf-8") for p in yaml_files(args.rules)}
    if args.rule:
        body["rule_names"] = list(args.rule)
    return PerformanceAgentClient(args.url, timeout=300).backtest(**body)


def _from_file(
    args: argparse.Namespace,
    compiled: CompiledRules,
    start: datetime,
    end: datetime,
    instances: list[tuple[str, EngineName | None]],
) -> BacktestReport:
    from perfagent.backtest_sources import read_history_file

    instance = instances[0][0] if instances else None
    frame, engines = read_history_file(args.db, compiled, start, end, instance)
    engines.update({name: engine.value for name, engine in instances if engine is not None})
    return run_backtest(
        compiled,
        frame,
        engines,
        start,
        end,
        step=_step(args.step),
        instances=[instance] if instance else None,
    )


async def _from_prometheus(
    args: argparse.Namespace,
    compiled: CompiledRules,
    start: datetime,
    end: datetime,
    given: list[tuple[str, EngineName | None]],
) -> BacktestReport:
    # Imported here: the Prometheus client and PromQL builders are not needed by other commands.
    from perfagent.backtest_sources import discovered_instances, labelled_instance, prometheus_frame
    from perfagent.promclient import PromClient

    missing = [name for name, engine in given if engine is None]
    if missing:
        raise UsageError(f"--instance {missing[0]}: give its engine, e.g. {missing[0]}=vllm")
    if not given and not args.selector:
        raise UsageError("--prometheus needs --instance LABEL=ENGINE or --selector")
    try:
        instances: list[Instance] = [labelled_instance(name, engine) for name, engine in given if engine]
    except ValueError as exc:
        raise UsageError(f"--instance: {exc}") from None
    step = _step(args.step) or DEFAULT_PROMETHEUS_STEP
    client = PromClient(args.prometheus)
    try:
        if args.selector:
            try:
                instances += await discovered_instances(client, args.selector, end)
            except ValueError as exc:
                raise UsageError(f"--selector: {exc}") from None
        frame = await prometheus_frame(client, instances, compiled, start, end, step)
    finally:
        client.close()
    engines: dict[str, str | None] = {i.id: i.engine.value for i in instances}
    report = run_backtest(
        compiled, frame, engines, start, end, step=step, source="prometheus", instances=sorted(engines)
    )
    if not instances:
        report.notes.append(f"no target of {args.selector} was known to Prometheus at {iso_z(end)}")
    return report


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except UsageError as exc:
        print(f"perfagent backtest: {exc}", file=sys.stderr)
        return 2
    except RuleFileError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"perfagent backtest: {len(exc.problems)} problem(s) in the rules", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    now = utc_now()
    start, end = _range(args, now)
    _step(args.step)  # a bad step is reported before any data is read
    instances = _instances(args.instance)
    if args.selector and not args.prometheus:
        raise UsageError("--selector needs --prometheus")
    if not args.prometheus and len(instances) > 1:
        raise UsageError("history backtests take one --instance (or none, for every instance)")
    _, compiled = _rules(args)  # a bad rule file stops here, naming the file, rule and line
    limit = max(0, args.limit)
    try:
        if args.prometheus:
            report = asyncio.run(_from_prometheus(args, compiled, start, end, instances))
            print(f"source: Prometheus at {args.prometheus}", file=sys.stderr)
        else:
            try:
                instance = instances[0][0] if instances else None
                body = _from_api(args, start, end, instance, limit)
                print(f"source: the running agent's API at {args.url}", file=sys.stderr)
                report = BacktestReport.model_validate(body)
            except AgentAPIError as exc:
                print(f"perfagent backtest: {exc}", file=sys.stderr)
                for problem in exc.details.get("problems", []):
                    print(f"  {problem}", file=sys.stderr)
                return 2 if exc.status == 400 else 1
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if not args.db.exists():
                    print(
                        f"perfagent backtest: no agent at {args.url} and no database at {args.db}",
                        file=sys.stderr,
                    )
                    return 1
                report = _from_file(args, compiled, start, end, instances)
                print(f"source: the DuckDB file {args.db} (no agent answered at {args.url})", file=sys.stderr)
    except PerfAgentError as exc:
        print(f"perfagent backtest: {exc.message}", file=sys.stderr)
        return 2 if exc.status == 400 else 1
    except (duckdb.Error, OSError) as exc:  # the file cannot be read: another process holds it, permissions
        print(f"perfagent backtest: {args.db} cannot be read: {exc}", file=sys.stderr)
        return 1
    if len(report.episodes) > limit:
        report = report.model_copy(update={"episodes": report.episodes[:limit], "episodes_truncated": True})
    if args.json:
        sys.stdout.write(report.model_dump_json() + "\n")
    else:
        sys.stdout.write(format_report(report))
    return 0


# --- the table ------------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: frozenset[int]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return [line(header), *(line(r) for r in rows)]


def _when(moment: datetime | None, day: bool) -> str:
    if moment is None:
        return "still firing"
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S") if day else moment.strftime("%H:%M:%S")


def _seconds(value: float | None) -> str:
    return "-" if value is None else format_duration(timedelta(seconds=round(value)))


def _number(value: float, unit: str) -> str:
    text = f"{value:.4g}"
    return f"{float(text) * 100:.4g}%" if unit == "ratio" else f"{text} {unit}".strip()


def format_report(report: BacktestReport) -> str:
    """The report as text: one line per rule, then one per episode, then the notes."""
    step = format_duration(timedelta(seconds=report.step_seconds))
    lines = [
        f"Backtest of {len(report.rules)} rule(s) over {len(report.instances)} instance(s) from "
        f"{report.source}: {iso_z(report.start)} to {iso_z(report.end)}, every {step} "
        f"({report.evaluations:,} evaluations)",
        "",
    ]
    lines += _table(
        ["RULE", "TYPE", "FIRED", "ON", "FIRING", "% TIME", "PENDING ONLY", "MAX SEVERITY"],
        [
            [
                s.rule
                + (" (no data: " + ", ".join(s.missing_quantities) + ")" if s.missing_quantities else ""),
                s.type.value,
                str(s.episodes),
                f"{s.instances_fired}/{s.instances}",
                _seconds(s.firing_seconds),
                f"{s.firing_fraction * 100:.1f}",
                str(s.pending_only),
                s.max_severity or "-",
            ]
            for s in report.rules
        ],
        frozenset({2, 3, 4, 5, 6}),
    )
    multi_day = report.end - report.start > timedelta(days=1) or report.start.date() != report.end.date()
    lines += ["", "Episodes (oldest first)" if report.episodes else "No rule fired."]
    if report.episodes:
        lines += _table(
            ["INSTANCE", "RULE", "PENDING", "FIRED", "RESOLVED", "FIRING", "MAX SEVERITY", "PEAK"],
            [
                [
                    e.instance_id,
                    e.rule,
                    _when(e.pending_at, multi_day),
                    _when(e.fired_at, multi_day),
                    _when(e.resolved_at, multi_day),
                    _seconds(e.firing_seconds),
                    e.max_severity,
                    _number(e.peak_value, e.unit),
                ]
                for e in report.episodes
            ],
            frozenset({5}),
        )
    if report.episodes_truncated:
        lines.append(f"(first {len(report.episodes)} episodes only: raise --limit for more)")
    lines += [""] + [f"note: {n}" for n in report.notes] if report.notes else []
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="perfagent")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
