"""Backtests: a simulated day with incidents at known times reports each incident and nothing else;
the replay equals the agent's own evaluation and FindingTracker step by step; the CLI reads the
history file and Prometheus, and stops on a bad rule file."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, get_args

import numpy as np
import polars as pl
import pytest

from perfagent import backtest
from perfagent.backtest import (
    MAX_ROWS,
    BacktestEpisode,
    BacktestReport,
    BacktestTooLargeError,
    SeverityName,
    check_rows,
    fold_episodes,
    run_backtest,
)
from perfagent.backtest_sources import read_history_file
from perfagent.detect import DEFAULT_LOOKBACK, RESULT_SCHEMA, compile_rules, evaluate
from perfagent.detection import with_engines
from perfagent.findings import FindingTracker
from perfagent.rules import SEVERITY_RANK, Severity, load_rules
from perfagent.store import Store
from tests import simday
from tests.prometheus import backfilled_prometheus

DAY = timedelta(days=1)


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "perfagent", "backtest", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --- the simulated day ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def day() -> datetime:
    return simday.day_start()


@pytest.fixture(scope="module")
def day_db(tmp_path_factory: pytest.TempPathFactory, day: datetime) -> Path:
    path = tmp_path_factory.mktemp("day") / "history.duckdb"
    asyncio.run(simday.write_day(path, day))
    return path


@pytest.fixture(scope="module")
def day_report(day_db: Path, day: datetime) -> BacktestReport:
    """The built-in rules over the day, read back through the store as the agent reads history."""
    compiled = compile_rules(load_rules())

    async def read() -> pl.DataFrame:
        store = await Store.open(day_db)
        try:
            return await store.recent_scrapes(day - compiled.max_window, day + DAY, compiled.quantities)
        finally:
            await store.close()

    return run_backtest(compiled, asyncio.run(read()), simday.engines(), day, day + DAY)


def _incident_of(episode: BacktestEpisode, day: datetime) -> simday.Incident | None:
    for incident in simday.INCIDENTS:
        if episode.instance_id == incident.instance_id and (
            day + incident.start <= episode.pending_at <= day + incident.end + incident.drain
        ):
            return incident
    return None


def test_a_simulated_day_reports_each_incident_and_nothing_else(
    day_report: BacktestReport, day: datetime
) -> None:
    report = day_report
    rules = {r.name: r.rule for r in load_rules()}
    step = timedelta(seconds=simday.STEP)
    assert report.step_seconds == simday.STEP  # the data's own scrape interval
    assert report.evaluations == DAY // step + 1
    assert [i.instance_id for i in report.instances] == sorted(simday.engines())
    stray = [e for e in report.episodes if _incident_of(e, day) is None]
    assert not stray, stray  # nothing fired outside the incidents: not on tgi-1, not on a quiet hour

    for incident in simday.INCIDENTS:
        mine = [e for e in report.episodes if _incident_of(e, day) is incident]
        # Every rule the incident is known to fire (a rule added later may join them, never stray).
        assert incident.rules <= {e.rule for e in mine}, incident
        [primary] = [e for e in mine if e.rule == incident.primary]
        rule = rules[incident.primary]
        window = rule.over or DEFAULT_LOOKBACK
        start, end = day + incident.start, day + incident.end
        # The symptom shows, the rule's window fills, its `for` elapses: then it fires, within a scrape.
        assert start < primary.fired_at <= start + incident.onset + window + rule.for_ + 2 * step, primary
        assert primary.fired_at - primary.pending_at == rule.for_
        for episode in mine:
            held = rules[episode.rule]
            assert episode.resolved_at is not None, episode
            last = end + incident.drain + (held.over or DEFAULT_LOOKBACK)
            assert episode.last_held_at <= last, episode
            assert episode.resolved_at <= episode.last_held_at + held.keep_firing_for + step, episode

    by_rule = {s.rule: s for s in report.rules}
    assert by_rule["QueueBuildup"].instances == 4
    assert by_rule["KVCachePreemption"].instances == 3  # not TGI: it exports no KV usage
    assert by_rule["SGLangConservativeScheduling"].instances == 1
    assert by_rule["KVCachePreemption"].max_severity == "CRITICAL"
    assert get_args(SeverityName) == tuple(s.value for s in Severity)  # ranks map to the same names
    for summary in report.rules:
        episodes = [e for e in report.episodes if e.rule == summary.rule]
        assert summary.episodes == len(episodes)
        assert summary.firing_seconds == sum(e.firing_seconds for e in episodes)
        span = report.evaluations * report.step_seconds * summary.instances
        assert summary.firing_fraction == pytest.approx(summary.firing_seconds / span)
        assert summary.missing_quantities == []
        assert summary.still_firing == 0


def test_chunked_evaluation_gives_the_same_report(
    day_db: Path, day: datetime, day_report: BacktestReport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunk boundaries (each chunk re-reads its look-back) change nothing."""
    compiled = compile_rules(load_rules())
    frame, engines = read_history_file(day_db, compiled, day, day + DAY)
    monkeypatch.setattr(backtest, "CHUNK_EVALUATIONS", 1000)  # 250 evaluation times per chunk
    chunked = run_backtest(compiled, frame, engines, day, day + DAY)
    # Trend fits are summed from each chunk's own origin: the same to rounding.
    peaks = [e.peak_value for e in chunked.episodes]
    assert peaks == pytest.approx([e.peak_value for e in day_report.episodes], rel=1e-9)
    same = {"episodes": {"__all__": {"peak_value"}}}
    assert chunked.model_dump(exclude=same) == day_report.model_dump(exclude=same)


def test_the_day_is_what_the_poller_path_produces() -> None:
    """The stored day's start, regenerated live through simulator, parser and normalize: what the
    rules read is what the poller would have stored. After a deliberate change to the simulator or
    to normalization, regenerate the day: `.venv/bin/python -m tests.simday` (minutes)."""
    fresh = simday.generate(10 * simday.STEP)
    stored = pl.read_parquet(simday.FIXTURE).filter(pl.col("offset") <= 10 * simday.STEP)
    keys = ["instance_id", "offset", "window_kind", "engine_version"]
    assert fresh.select(keys).equals(stored.select(keys))
    for q in sorted(compile_rules(load_rules()).quantities):
        got, want = fresh[q].to_list(), stored[q].to_list()
        assert [g is None for g in got] == [w is None for w in want], f"{q}: regenerate the day"
        assert [g for g in got if g is not None] == pytest.approx(
            [w for w in want if w is not None], rel=1e-9
        ), f"{q}: regenerate the day"


# --- the replay equals the agent's evaluation and state machine ---------------------------------------


def _reference(
    compiled: Any, frame: pl.DataFrame, engines: dict[str, str], times: list[datetime]
) -> list[tuple[Any, ...]]:
    """What an agent evaluating at each of `times` would record: `evaluate`, then `FindingTracker`."""
    tracker = FindingTracker.from_rules(compiled)
    upward = {cr.name: cr.source.rule.op.upward for cr in compiled.rules}
    state = tracker.empty_state()
    data = with_engines(frame, engines).sort("ts")
    open_: dict[tuple[str, str], list[Any]] = {}
    done: list[list[Any]] = []
    for at in times:
        results = evaluate(compiled, data, at).results
        step = tracker.advance(state, results, at)
        for t in step.transitions.iter_rows(named=True):
            key = (t["instance_id"], t["rule"])
            if t["kind"] == "fired":
                open_[key] = [*key, t["first_seen"], t["at"], None, t["severity"], t["value"]]
            elif t["kind"] == "resolved":
                open_[key][4] = t["at"]
                done.append(open_.pop(key))
        state = step.state
        for row in results.iter_rows(named=True):  # the worst severity and value while firing
            episode = open_.get((row["instance_id"], row["rule"]))
            if episode is not None:
                if SEVERITY_RANK[row["severity"]] > SEVERITY_RANK[episode[5]]:
                    episode[5] = row["severity"]
                pick = max if upward[row["rule"]] else min
                episode[6] = pick(episode[6], row["value"])
    done += open_.values()
    return sorted((tuple(e) for e in done), key=lambda e: (e[3], e[0], e[1]))


def _levels(rng: np.random.Generator, n: int, values: list[float]) -> list[float]:
    out: list[float] = []
    while len(out) < n:
        out += [float(rng.choice(values))] * int(rng.integers(2, 30))
    return out[:n]


def test_the_replay_equals_evaluate_and_the_tracker_at_every_step() -> None:
    """Off-grid, jittered scrapes with gaps: each grid evaluation reads what `evaluate` reads there."""
    rng = np.random.default_rng(5)
    start = datetime(2026, 3, 1, tzinfo=UTC)
    rows = []
    for instance in ("a", "b"):
        n = 400  # 10 s scrapes for a little over an hour
        waiting = _levels(rng, n, [0, 3, 8, 25, 60])
        kv = _levels(rng, n, [0.5, 0.85, 0.92, 0.97])
        preempt = _levels(rng, n, [0.0, 0.0, 0.5])
        for i in range(n):
            if rng.random() < 0.1:
                continue  # a missed scrape
            # Mostly off the evaluation grid (every 30 s), sometimes exactly on it.
            jitter = 0.0 if rng.random() < 0.3 else float(rng.uniform(0.1, 2.0))
            ts = start + timedelta(seconds=10 * i + jitter)
            rows.append(
                {
                    "instance_id": instance,
                    "ts": ts,
                    "requests_waiting": waiting[i],
                    "kv_cache_usage": kv[i],
                    "preemption_rate": preempt[i],
                }
            )
    frame = pl.DataFrame(rows, schema_overrides={"ts": pl.Datetime("us", "UTC")})
    # Every built-in rule on these quantities: thresholds, windows, `and`, trends (nulls skipped).
    data = {"requests_waiting", "kv_cache_usage", "preemption_rate"}
    chosen = [r for r in load_rules() if {r.rule.quantity, *(c.quantity for c in r.rule.and_)} <= data]
    assert {"QueueBuildup", "KVCachePreemption", "SGLangConservativeScheduling"} <= {r.name for r in chosen}
    compiled = compile_rules(chosen)
    engines = {"a": "vllm", "b": "sglang"}
    begin, end = start + timedelta(minutes=2), start + timedelta(minutes=66)
    report = run_backtest(compiled, frame, engines, begin, end, step=timedelta(seconds=30))

    times = [begin + timedelta(seconds=30 * k) for k in range(report.evaluations)]
    expected = _reference(compiled, frame, engines, times)
    got = [
        (e.instance_id, e.rule, e.pending_at, e.fired_at, e.resolved_at, e.max_severity, e.peak_value)
        for e in report.episodes
    ]
    assert len(got) >= 4  # the data is built to fire, resolve and flap
    assert [e[:-1] for e in got] == [e[:-1] for e in expected]
    # Trend fits are summed in another order over a rolling window: equal to rounding.
    assert [e[-1] for e in got] == pytest.approx([e[-1] for e in expected], rel=1e-9)


def test_the_fold_equals_the_finding_tracker() -> None:
    """Random holds under random `for` and `keep_firing_for` (multiples of the step or not): the
    vectorized fold gives the tracker's episodes, stepped evaluation by evaluation."""
    rnd = random.Random(7)
    origin = datetime(2026, 1, 1, tzinfo=UTC)
    n = 60
    for step in (10, 15, 30):
        timings = {
            f"R{i}": (rnd.choice([0, 10, 15, 45, 60, 120]), rnd.choice([0, 10, 30, 60, 90])) for i in range(6)
        }
        times = [origin + timedelta(seconds=step * k) for k in range(n)]
        held = [
            (f"i{j}", rule, k, rnd.choice(["LOW", "HIGH", "CRITICAL"]), rnd.random())
            for j in range(30)
            for rule, p in ((r, rnd.random()) for r in timings)
            for k in range(n)
            if rnd.random() < p
        ]
        hits = pl.DataFrame(
            held,
            schema={
                "instance_id": pl.String,
                "rule": pl.String,
                "k": pl.Int64,
                "severity": pl.String,
                "value": pl.Float64,
            },
            orient="row",
        )
        series = hits.select(
            "instance_id",
            "rule",
            "severity",
            "value",
            window_end=pl.lit(origin) + pl.duration(seconds=pl.col("k") * step),
        )
        series = series.select(
            [series[c] if c in series.columns else pl.lit(None, t).alias(c) for c, t in RESULT_SCHEMA.items()]
        ).cast(RESULT_SCHEMA)
        tracker = FindingTracker(
            pl.DataFrame(
                {
                    "rule": list(timings),
                    "for": [timedelta(seconds=f) for f, _ in timings.values()],
                    "keep": [timedelta(seconds=k) for _, k in timings.values()],
                },
                schema={"rule": pl.String, "for": pl.Duration("us"), "keep": pl.Duration("us")},
            )
        )
        expected: dict[tuple[str, str], list[list[Any]]] = {}
        for step_ in tracker.replay(series, times):
            for t in step_.transitions.iter_rows(named=True):
                episodes = expected.setdefault((t["instance_id"], t["rule"]), [])
                if t["kind"] == "fired":
                    episodes.append([t["first_seen"], t["at"], None])
                elif t["kind"] == "resolved":
                    episodes[-1][2] = t["at"]
        steps = pl.DataFrame(
            {
                "rule": list(timings),
                "f": [-(-f // step) for f, _ in timings.values()],
                "r": [max(1, -(-k // step)) for _, k in timings.values()],
                "upward": [True] * len(timings),
            }
        )
        folded, _ = fold_episodes(hits, steps, n)
        got: dict[tuple[str, str], list[list[Any]]] = {}
        for e in folded.sort("pending_k").iter_rows(named=True):
            resolved = None if e["resolved_k"] is None else times[e["resolved_k"]]
            got.setdefault((e["instance_id"], e["rule"]), []).append(
                [times[e["pending_k"]], times[e["fired_k"]], resolved]
            )
        assert sum(len(v) for v in expected.values()) > 100
        assert got == expected, (step, timings)


# --- bounds and edges ---------------------------------------------------------------------------------


def test_backtests_over_the_limits_are_refused() -> None:
    compiled = compile_rules(load_rules())
    start = datetime(2026, 1, 1, tzinfo=UTC)
    frame = pl.DataFrame(
        {"instance_id": ["a"], "ts": [start], "requests_waiting": [1.0]},
        schema_overrides={"ts": pl.Datetime("us", "UTC")},
    )
    with pytest.raises(BacktestTooLargeError, match="evaluations") as caught:
        run_backtest(
            compiled, frame, {"a": "vllm"}, start, start + timedelta(days=40), step=timedelta(seconds=1)
        )
    assert caught.value.details["field"] == "step"
    with pytest.raises(BacktestTooLargeError, match="data rows"):
        check_rows(MAX_ROWS + 1)


def test_a_range_without_data_is_an_empty_report_with_a_note() -> None:
    compiled = compile_rules(load_rules())
    start = datetime(2026, 1, 1, tzinfo=UTC)
    empty = pl.DataFrame(schema={"instance_id": pl.String, "ts": pl.Datetime("us", "UTC")})
    report = run_backtest(compiled, empty, {}, start, start + timedelta(hours=1))
    assert report.episodes == [] and report.instances == [] and report.rows == 0
    assert all(s.episodes == 0 and s.firing_fraction == 0 for s in report.rules)
    assert any("no data" in note for note in report.notes)


# --- the command line -----------------------------------------------------------------------------------


def test_cli_replays_the_history_file(
    day_db: Path, day: datetime, day_report: BacktestReport, tmp_path: Path
) -> None:
    db = tmp_path / "copy.duckdb"
    shutil.copy(day_db, db)
    result = _cli(
        "--db",
        str(db),
        "--url",
        "http://127.0.0.1:1",
        "--from",
        day.isoformat(),
        "--to",
        (day + DAY).isoformat(),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    assert f"the DuckDB file {db}" in result.stderr
    report = BacktestReport.model_validate_json(result.stdout)
    # Engines come from the file's engine hints here, from the fleet in-process: the same report.
    assert report.model_dump() == day_report.model_dump()


def test_cli_table_for_one_rule_and_instance(day_db: Path, day: datetime, tmp_path: Path) -> None:
    db = tmp_path / "copy.duckdb"
    shutil.copy(day_db, db)
    result = _cli(
        "--db",
        str(db),
        "--url",
        "http://127.0.0.1:1",
        "--from",
        day.isoformat(),
        "--to",
        (day + DAY).isoformat(),
        "--rule",
        "QueueBuildup",
        "--instance",
        "vllm-0",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Backtest of 1 rule(s) over 1 instance(s) from history")
    header = next(i for i, line in enumerate(lines) if line.startswith("RULE"))
    assert lines[header + 1].split()[:4] == ["QueueBuildup", "QUEUE_BUILDUP", "1", "1/1"]
    [episode] = [line for line in lines if line.startswith("vllm-0 ")]
    assert episode.split()[1] == "QueueBuildup" and "CRITICAL" in episode


def test_cli_stops_on_a_bad_rule_file(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "slo.yaml").write_text(
        "groups:\n"
        "  - name: slo\n"
        "    rules:\n"
        "      - name: TooSlow\n"
        "        type: HIGH_LATENCY\n"
        "        quantity: ttft_secs_p99\n"
        "        op: '>'\n"
        "        thresholds: {MEDIUM: 1}\n"
        "        recommendation: Add replicas.\n"
    )
    result = _cli("--rules", str(rules), "--db", str(tmp_path / "none.duckdb"), "--url", "http://127.0.0.1:1")
    assert result.returncode == 1
    assert (
        f"{rules / 'slo.yaml'}:6: rule 'TooSlow': quantity: unknown quantity 'ttft_secs_p99'" in result.stderr
    )
    assert result.stdout == ""


# --- Prometheus -------------------------------------------------------------------------------------------


def prometheus_day(day: datetime) -> str:
    """OpenMetrics for two vLLM targets over four hours, 15 s samples: `a` queues 60 requests from
    01:00 to 01:40, `b` always has 2 waiting."""
    stamps = [day.timestamp() + 15 * i for i in range(4 * 240 + 1)]
    lines = ["# TYPE vllm:num_requests_waiting gauge"]
    for target in ("a", "b"):
        for ts in stamps:
            busy = target == "a" and 3600 <= ts - day.timestamp() < 6000
            lines.append(
                f'vllm:num_requests_waiting{{instance="{target}",job="vllm"}} {60 if busy else 2} {ts:.0f}'
            )
    return "\n".join([*lines, "# EOF", ""])


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory, day: datetime) -> Iterator[str]:
    with backfilled_prometheus(tmp_path_factory.mktemp("prometheus"), prometheus_day(day)) as url:
        yield url


def test_cli_replays_prometheus(prometheus: str, day: datetime) -> None:
    result = _cli(
        "--prometheus",
        prometheus,
        "--selector",
        '{job="vllm"}',
        "--rule",
        "QueueBuildup",
        "--from",
        day.isoformat(),
        "--to",
        (day + timedelta(hours=4)).isoformat(),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    assert f"Prometheus at {prometheus}" in result.stderr
    report = BacktestReport.model_validate_json(result.stdout)
    assert report.source == "prometheus" and report.step_seconds == 60
    assert [(i.instance_id, i.engine) for i in report.instances] == [("vllm-a", "vllm"), ("vllm-b", "vllm")]
    [episode] = report.episodes
    # Each minute's point is the gauge's latest sample; `for: 2m`, `keep_firing_for: 1m`, on the minute.
    assert (episode.instance_id, episode.rule, episode.max_severity, episode.peak_value) == (
        "vllm-a",
        "QueueBuildup",
        "CRITICAL",
        60,
    )
    assert episode.pending_at == day + timedelta(hours=1)
    assert episode.fired_at == day + timedelta(hours=1, minutes=2)
    assert episode.last_held_at == day + timedelta(hours=1, minutes=39)
    assert episode.resolved_at == day + timedelta(hours=1, minutes=40)
    assert json.loads(result.stdout)["rules"][0]["instances_fired"] == 1
