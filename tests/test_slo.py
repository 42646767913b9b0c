"""SLOs: the loader's errors name file, SLO and line; thresholds are checked against the engines' real
bucket edges; burn rates by hand and as properties; nothing fires on a steady or idle simulated fleet."""

from __future__ import annotations

import functools
import itertools
import json
import math
import textwrap
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import polars as pl
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from perfagent.buckets import bucket_data
from perfagent.burnrate import (
    COUNTS_SCHEMA,
    RATIO_SCHEMA,
    SloEvaluation,
    evaluate,
    history_ratios,
    increments,
    project_counts,
    slo_keys,
    spans_of,
    window_sums,
)
from perfagent.enginemap import HistogramSource, load_engine_map
from perfagent.exposition import parse_exposition_report
from perfagent.models import EngineName
from perfagent.normalize import normalize
from perfagent.rules import BUILTIN_RULES_DIR, Severity, load_rules
from perfagent.sim.fleet import SimFleet
from perfagent.slo import (
    BUILTIN_SLOS_DIR,
    DEFAULT_ALERTS,
    LATENCY_HISTOGRAMS,
    LoadedSlo,
    Slo,
    SloFileError,
    SloProblem,
    SloSet,
    load_slos,
    resolve_targets,
)
from perfagent.slo_history import read_sums
from tests.conftest import capture

T = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
VLLM_TTFT = "vllm:time_to_first_token_seconds"


def write(tmp_path: Path, text: str, name: str = "slos.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def slo_file(body: str, name: str = "s") -> str:
    """A file with one SLO: the given lines (unindented) after its name."""
    return f"slos:\n  - name: {name}\n" + textwrap.indent(textwrap.dedent(body), " " * 4)


BASE = """\
engines: [vllm]
histogram: ttft_seconds
threshold: 2.5
objective: 0.95
"""


def only(path: Path) -> SloProblem:
    with pytest.raises(SloFileError) as info:
        load_slos([path], builtin=False)
    found = info.value.problems
    assert len(found) == 1, "\n".join(map(str, found))
    return found[0]


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


# --- the loader -------------------------------------------------------------------------------------


def test_builtin_slos_load_with_the_engines_exact_edges() -> None:
    slos = load_slos()
    assert [s.name for s in slos] == ["vllm-ttft", "sglang-ttft", "tgi-queue", "itl", "tgi-itl"]
    assert all(s.builtin and s.file.parent == BUILTIN_SLOS_DIR for s in slos)
    queue = slos.get("tgi-queue")
    assert queue is not None and queue.slo.threshold == 0.4988
    # Written to 4 significant digits; the edge is TGI's own float, printed as le="0.49878850951194753".
    assert [(t.engine, t.metrics, t.edge) for t in queue.targets] == [
        (EngineName.TGI, ("tgi_request_queue_duration",), 0.49878850951194753)
    ]
    itl = slos.get("itl")
    assert itl is not None and itl.slo.alerts == DEFAULT_ALERTS
    assert itl.targets[0].metrics == (
        "vllm:inter_token_latency_seconds",
        "vllm:time_per_output_token_seconds",
    )
    assert slos.span == timedelta(days=30)


def test_the_rule_loader_leaves_the_slo_directory_alone() -> None:
    ruleset = load_rules()
    assert ruleset.files and all(path.parent == BUILTIN_RULES_DIR for path in ruleset.files)


def test_a_threshold_between_edges_names_the_nearest_ones(tmp_path: Path) -> None:
    path = write(tmp_path, slo_file(BASE.replace("threshold: 2.5", "threshold: 2")))
    problem = only(path)
    assert problem.slo == "s" and problem.file == path and problem.line == line_of(path, "threshold")
    assert "2 s is not a bucket edge of vllm's ttft_seconds histogram" in problem.message
    assert "nearest edges on every vllm version: 1 s and 2.5 s" in problem.message
    assert str(problem).startswith(f"{path}:{problem.line}: slo 's': threshold: ")


def test_an_edge_of_newer_versions_only_is_refused(tmp_path: Path) -> None:
    # vLLM V1 added 20 s to the TTFT buckets; a V0 server has no bucket there.
    problem = only(write(tmp_path, slo_file(BASE.replace("threshold: 2.5", "threshold: 20"))))
    assert "in vLLM V0 (<= 0.7) (layout vllm-v0-ttft), though it is one in vllm-v1-ttft" in problem.message
    assert "nearest edges on every vllm version: 10 s" in problem.message


def test_tgi_edges_written_to_four_digits_name_the_exact_edge(tmp_path: Path) -> None:
    body = "engines: [tgi]\nhistogram: e2e_latency_seconds\nobjective: 0.95\n"
    good = load_slos([write(tmp_path, slo_file(body + "threshold: 2.525\n"))], builtin=False)
    assert good.slos[0].targets[0].edge == 2.5251168294042348
    problem = only(write(tmp_path, slo_file(body + "threshold: 2.5\n"), "bad.yaml"))
    assert "nearest edges on every tgi version: 1.68341 s and 2.52512 s" in problem.message


def test_tgi_has_no_ttft_histogram(tmp_path: Path) -> None:
    path = write(tmp_path, slo_file(BASE.replace("[vllm]", "[vllm, tgi]")))
    problem = only(path)
    assert problem.line == line_of(path, "histogram")
    assert "tgi has no ttft_seconds histogram" in problem.message
    assert "queue_time_seconds or e2e_latency_seconds" in problem.message


@pytest.mark.parametrize(
    ("objective", "expected"),
    [
        ("95", "95.0 is not a fraction: write 0.95 for 95%"),
        ("1", "must lie strictly between 0 and 1"),
        ("0", "must lie strictly between 0 and 1"),
        ("high", "valid number"),
    ],
)
def test_bad_objectives(tmp_path: Path, objective: str, expected: str) -> None:
    path = write(tmp_path, slo_file(BASE.replace("objective: 0.95", f"objective: {objective}")))
    problem = only(path)
    assert problem.line == line_of(path, "objective") and expected in problem.message


def test_the_default_pairs_need_an_objective_above_0_9306(tmp_path: Path) -> None:
    path = write(tmp_path, slo_file(BASE.replace("objective: 0.95", "objective: 0.9")))
    problem = only(path)
    assert problem.line == line_of(path, "objective")
    assert "CRITICAL pair's factor 14.4 can never be reached" in problem.message
    assert "the burn rate is at most 10" in problem.message


ALERTS = """\
alerts:
  - {long: 1h, short: 5m, factor: 14.4, severity: CRITICAL}
  - {long: 6h, short: 30m, factor: 6, severity: HIGH}
"""


@pytest.mark.parametrize(
    ("old", "new", "at", "expected"),
    [
        ("short: 30m", "short: 6h", "6h, short: 6h", "6h must be shorter than long (6h)"),
        ("short: 5m", "short: 5x", "short: 5x", "bad duration '5x'"),
        ("severity: HIGH", "severity: URGENT", "URGENT", "Input should be 'LOW', 'MEDIUM'"),
        ("factor: 6", "factor: 0", "factor: 0", "greater than 0"),
        ("factor: 6", "factor: 20", "factor: 20", "HIGH pair's factor 20 can never be reached"),
    ],
)
def test_bad_alert_pairs(tmp_path: Path, old: str, new: str, at: str, expected: str) -> None:
    path = write(tmp_path, slo_file(BASE + ALERTS.replace(old, new)))
    problem = only(path)
    assert problem.line == line_of(path, at) and expected in problem.message, problem


def test_the_period_covers_the_longest_window(tmp_path: Path) -> None:
    path = write(tmp_path, slo_file(BASE + "period: 2d\n"))
    problem = only(path)
    assert problem.line == line_of(path, "period")
    assert "2d is shorter than the longest alert window (3d)" in problem.message


@pytest.mark.parametrize(
    ("histogram", "expected"),
    [
        ("ttft", "unknown histogram 'ttft' (did you mean 'ttft_seconds'?)"),
        ("ttft_seconds_p99", "'ttft_seconds_p99' is not a latency histogram"),
        ("kv_cache_usage", "'kv_cache_usage' is not a latency histogram"),
        ("sglang:time_to_first_token_seconds", "is a sglang histogram, not one of vllm"),
    ],
)
def test_bad_histograms(tmp_path: Path, histogram: str, expected: str) -> None:
    path = write(tmp_path, slo_file(BASE.replace("ttft_seconds", f'"{histogram}"')))
    problem = only(path)
    assert problem.line == line_of(path, "histogram") and expected in problem.message


def test_an_engine_histogram_by_its_exposed_name(tmp_path: Path) -> None:
    body = 'engines: [vllm]\nhistogram: "vllm:e2e_request_latency_seconds"\nthreshold: 10\nobjective: 0.99\n'
    (loaded,) = load_slos([write(tmp_path, slo_file(body))], builtin=False)
    assert loaded.targets[0].metrics == ("vllm:e2e_request_latency_seconds",)


def test_unknown_fields_and_duplicate_names(tmp_path: Path) -> None:
    path = write(tmp_path, slo_file(BASE.replace("threshold:", "threshhold:")), "typo.yaml")
    with pytest.raises(SloFileError) as info:
        load_slos([path], builtin=False)
    assert [(p.line, p.message) for p in info.value.problems] == [
        (2, "threshold: Field required"),
        (line_of(path, "threshhold"), "unknown field 'threshhold' (did you mean 'threshold'?)"),
    ]
    twice = write(tmp_path, slo_file(BASE) + slo_file(BASE).removeprefix("slos:\n"), "twice.yaml")
    problem = only(twice)
    assert "duplicate SLO name (first defined at line 2)" in problem.message and problem.line == 7


def test_a_user_slo_replaces_the_builtin_of_its_name(tmp_path: Path) -> None:
    mine = write(tmp_path, slo_file(BASE.replace("2.5", "5"), name="vllm-ttft"))
    slos = load_slos([mine])
    replaced = slos.get("vllm-ttft")
    assert replaced is not None and replaced.slo.threshold == 5 and not replaced.builtin
    assert len(slos) == len(load_slos())


def test_every_problem_of_a_file_is_reported(tmp_path: Path) -> None:
    text = slo_file(BASE.replace("2.5", "2")) + slo_file(BASE.replace("0.95", "95"), "t").removeprefix(
        "slos:\n"
    )
    with pytest.raises(SloFileError) as info:
        load_slos([write(tmp_path, text)], builtin=False)
    assert [(p.slo, p.message.split(":")[0]) for p in info.value.problems] == [
        ("s", "threshold"),
        ("t", "objective"),
    ]


# --- bucket layouts: the engines' real edges --------------------------------------------------------

# Captures with every bucket of every latency histogram (the HYBRID and the curated SGLang 0.5.10
# fixtures abbreviate their bucket lists, see tests/fixtures/SOURCES.md).
FULL_CAPTURES = {
    "vllm-v1-recent": "vllm",
    "vllm-v0-0.5.x": "vllm",
    "vllm-v0-llama3.1": "vllm",
    "sglang-0.3.x": "sglang",
    "tgi-3.x": "tgi",
}


def _bounds(engine: str, text: str) -> dict[str, tuple[float, ...]]:
    report = parse_exposition_report(text)
    raw = normalize(engine, report.samples, at=T).raw
    return {name: h.bounds for name, h in raw.histograms.items() if "{" not in name}


def _known(engine: str, metric: str) -> list[tuple[float, ...]]:
    return [layout.bounds for layout in bucket_data().layouts_of(engine, metric)]


@pytest.mark.parametrize(("prefix", "engine"), sorted(FULL_CAPTURES.items()))
def test_layouts_match_the_real_captures(prefix: str, engine: str) -> None:
    found = _bounds(engine, capture(prefix).read_text())
    assert found
    for metric, bounds in found.items():
        assert bounds in _known(engine, metric), f"{prefix}: {metric} has unrecorded edges {bounds}"


@pytest.mark.parametrize("vllm_version", ["v0", "v1"])
def test_layouts_match_the_simulator(vllm_version: str) -> None:
    fleet = SimFleet("mixed", 3, clock="manual", vllm_version=vllm_version)  # type: ignore[arg-type]
    for inst in fleet.instances.values():
        text = inst.render()
        assert text is not None
        for metric, bounds in _bounds(inst.engine, text).items():
            assert bounds in _known(inst.engine, metric), f"{inst.engine} {metric}: {bounds}"


def test_every_latency_histogram_an_engine_map_reads_has_layouts() -> None:
    for engine in ("vllm", "tgi", "sglang"):
        emap = load_engine_map(engine)
        for quantity in LATENCY_HISTOGRAMS:
            for source in emap.quantities[quantity].sources:
                if isinstance(source, HistogramSource):
                    assert _known(engine, source.metric), f"{engine} {source.metric}"


# --- burn rates by hand -----------------------------------------------------------------------------

HAND = """\
engines: [vllm]
histogram: ttft_seconds
threshold: 2.5
objective: 0.9
period: 1h
alerts:
  - {long: 10m, short: 2m, factor: 2, severity: HIGH}
  - {long: 30m, short: 5m, factor: 1, severity: LOW}
"""


@pytest.fixture
def hand(tmp_path: Path) -> SloSet:
    return load_slos([write(tmp_path, slo_file(HAND, "hand"))], builtin=False)


def counts(rows: Sequence[tuple[str, float, float, float]], *, le: float = 2.5) -> pl.DataFrame:
    """COUNTS rows from (instance, minutes before T, cumulative good, cumulative total)."""
    return pl.DataFrame(
        {
            "instance_id": [r[0] for r in rows],
            "ts": [T - timedelta(minutes=r[1]) for r in rows],
            "histogram": VLLM_TTFT,
            "le": le,
            "good": [r[2] for r in rows],
            "total": [r[3] for r in rows],
        },
        schema=COUNTS_SCHEMA,
    )


def ratios_of(frame: pl.DataFrame) -> dict[tuple[str, timedelta], float | None]:
    return {(r["instance_id"], r["window"]): r["bad_ratio"] for r in frame.iter_rows(named=True)}


def test_bad_ratios_by_hand(hand: SloSet) -> None:
    rows = [
        ("a", 11, 0, 0),  # before the 10m window: its increase to the next sample is not counted
        ("a", 9, 100, 100),
        ("a", 5, 150, 160),
        ("a", 1, 160, 180),
        ("a", 0, 165, 190),
    ]
    got = ratios_of(history_ratios(counts(rows), hand, T))
    # 10m: increases (50 of 60), (10 of 20), (5 of 10) good: 25 bad of 90. 2m: 5 bad of 10.
    assert got[("a", timedelta(minutes=10))] == pytest.approx(25 / 90)
    assert got[("a", timedelta(minutes=2))] == pytest.approx(0.5)
    # 30m, 5m and the 1h period also start with the first sample, at T - 11m.
    assert got[("a", timedelta(minutes=30))] == pytest.approx(25 / 190)
    assert got[("a", timedelta(minutes=5))] == pytest.approx(15 / 30)
    assert set(got) == {("a", timedelta(minutes=m)) for m in (2, 5, 10, 30, 60)}


def test_a_counter_reset_counts_what_the_new_process_counted(hand: SloSet) -> None:
    rows = [("a", 4, 1000, 1100), ("a", 3, 1050, 1160), ("a", 2, 20, 30), ("a", 0, 40, 60)]
    got = ratios_of(history_ratios(counts(rows), hand, T))
    assert got[("a", timedelta(minutes=5))] == pytest.approx((10 + 10 + 10) / (60 + 30 + 30))


def test_findings_need_both_windows_and_take_the_highest_pair(hand: SloSet) -> None:
    ratios = pl.DataFrame(
        {
            "slo": "hand",
            "instance_id": ["a", "a", "a", "a", "b", "b", "b", "b"],
            "window": [timedelta(minutes=m) for m in (10, 2, 30, 5, 10, 2, 30, 5)],
            # a: 10m/2m burn 2.5 and 3 (> 2: HIGH), 30m/5m 1.5 and 1.2 (> 1: LOW): HIGH wins.
            # b: 10m burns 3 but 2m only 1 (not > 2); 30m burns 1.1 but 5m 0.9 (not > 1): nothing.
            "bad_ratio": [0.25, 0.3, 0.15, 0.12, 0.3, 0.1, 0.11, 0.09],
        },
        schema=RATIO_SCHEMA,
    )
    evaluation = evaluate(hand, ratios, {"a": "vllm"}, T)
    rows = evaluation.results.to_dicts()
    assert [(r["instance_id"], r["rule"], r["severity"], r["type"]) for r in rows] == [
        ("a", "slo:hand", "HIGH", "HIGH_LATENCY")
    ]
    (row,) = rows
    assert row["value"] == pytest.approx(2.5) and row["threshold"] == 2.0 and row["engine"] == "vllm"
    assert row["window_start"] == T - timedelta(minutes=10) and row["window_end"] == T
    assert row["summary"] == "SLO hand burning its error budget 2.5x over 10m and 3.0x over 2m on a"
    assert "0.9 of requests must see ttft_seconds at or under 2.5 s over 1h" in row["description"]
    burn = {(r["instance_id"], r["window"]): r["burn_rate"] for r in evaluation.burn.iter_rows(named=True)}
    assert burn[("b", timedelta(minutes=10))] == pytest.approx(3.0)


def test_zero_traffic_gives_no_number_and_no_finding(hand: SloSet) -> None:
    rows = [("idle", m, 500, 500) for m in (20, 10, 5, 1, 0)]
    evaluation = evaluate(hand, history_ratios(counts(rows), hand, T), {}, T)
    assert evaluation.results.is_empty()
    assert evaluation.burn["burn_rate"].null_count() == evaluation.burn.height > 0
    assert evaluation.budgets.to_dicts() == [
        {"slo": "hand", "instance_id": "idle", "error_budget_remaining": None}
    ]


def test_a_histogram_without_the_edge_gives_no_counts() -> None:
    raw = {
        "histograms": {
            VLLM_TTFT: {
                "sum": 1.0,
                "count": 9.0,
                "bounds": [1.0, 5.0],
                "counts": [4.0, 8.0],
                "inf_count": 9.0,
            }
        }
    }
    scrapes = pl.DataFrame(
        {"instance_id": ["a"], "ts": [T], "raw": [json.dumps(raw)]},
        schema={"instance_id": pl.String, "ts": pl.Datetime("us", "UTC"), "raw": pl.String},
    )
    keys = pl.DataFrame({"slo": ["x", "y"], "histogram": [VLLM_TTFT] * 2, "le": [2.5, 5.0]})
    got = project_counts(scrapes, keys)
    assert got.select("le", "good", "total").rows() == [(5.0, 8.0, 9.0)]


# --- properties -------------------------------------------------------------------------------------


@functools.cache
def _builtin() -> SloSet:
    return load_slos()


steps_strategy = st.lists(
    st.tuples(st.integers(0, 1000), st.integers(0, 200)), min_size=2, max_size=25
)  # (good, bad) finished per scrape interval


def _series(
    steps: list[tuple[int, int]], base: tuple[float, float] = (0.0, 0.0)
) -> list[tuple[float, float]]:
    good, total, out = base[0], base[1], []
    for g, b in steps:
        good, total = good + g, total + g + b
        out.append((good, total))
    return out


def _rows(points: list[tuple[float, float]], instance: str = "a") -> list[tuple[str, float, float, float]]:
    n = len(points)
    return [(instance, n - 1 - i + 0.1, g, t) for i, (g, t) in enumerate(points)]


def _reference(points: list[tuple[float, float]], window: timedelta) -> float | None:
    """PromQL's increase() semantics by hand: consecutive samples both inside (T - window, T]."""
    n = len(points)
    minutes = [n - 1 - i + 0.1 for i in range(n)]
    inside = [p for p, m in zip(points, minutes, strict=True) if timedelta(minutes=m) < window]
    bad = total = 0.0
    for (g0, t0), (g1, t1) in itertools.pairwise(inside):
        dg = g1 - g0 if g1 >= g0 else g1
        dt = t1 - t0 if t1 >= t0 else t1
        bad, total = bad + dt - dg, total + dt
    return bad / total if total > 0 else None


@settings(max_examples=60, deadline=None)
@given(steps=steps_strategy, base=st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)))
def test_ratios_equal_the_increase_reference(steps: list[tuple[int, int]], base: tuple[int, int]) -> None:
    slos = _builtin()
    points = _series(steps, (float(base[0]), float(base[0] + base[1])))
    got = ratios_of(history_ratios(counts(_rows(points)), slos, T).filter(pl.col("slo") == "vllm-ttft"))
    for (_, window), ratio in got.items():
        expected = _reference(points, window)
        assert (ratio is None) == (expected is None)
        if ratio is not None and expected is not None:
            assert ratio == pytest.approx(expected, rel=1e-9, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(a=steps_strategy, b=steps_strategy, back=st.integers(0, 20))
def test_duckdb_sums_the_stored_increases_as_polars_does(
    a: list[tuple[int, int]], b: list[tuple[int, int]], back: int
) -> None:
    """The agent sums stored increases in DuckDB (slo_history.read_sums); the pure path in Polars."""
    rows = increments(counts(_rows(_series(a), "a") + _rows(_series(b, (5.0, 9.0)), "b"))).collect()
    at = T - timedelta(minutes=back)
    spans = spans_of(_builtin())
    conn = duckdb.connect(":memory:")
    try:
        read_sums(conn, at, spans)  # creates the table
        conn.register("rows", rows.to_arrow())
        conn.execute("INSERT INTO slo_counts BY NAME SELECT * FROM rows")
        keys = ["instance_id", "histogram", "le", "first"]
        got = read_sums(conn, at, spans).sort(keys)
    finally:
        conn.close()
    assert got.equals(window_sums(rows, at, spans).sort(keys))


@settings(max_examples=60, deadline=None)
@given(steps=steps_strategy, scale=st.floats(0.001, 1000.0))
def test_burn_rates_are_scale_invariant(steps: list[tuple[int, int]], scale: float) -> None:
    slos = _builtin()
    points = _series(steps)
    scaled = [(g * scale, t * scale) for g, t in points]
    one = evaluate(slos, history_ratios(counts(_rows(points)), slos, T), {"a": "vllm"}, T)
    other = evaluate(slos, history_ratios(counts(_rows(scaled)), slos, T), {"a": "vllm"}, T)
    # A burn rate equal to a factor may land on either side of it after rounding: not a finding to compare.
    factors = [p.factor for p in DEFAULT_ALERTS]
    assume(
        not any(math.isclose(b, f, rel_tol=1e-9) for b in one.burn["burn_rate"].drop_nulls() for f in factors)
    )
    for a, b in zip(one.burn["burn_rate"].to_list(), other.burn["burn_rate"].to_list(), strict=True):
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert a == pytest.approx(b, rel=1e-9, abs=1e-12)
            assert 0.0 <= a <= 1 / (1 - 0.95) + 1e-9
    assert one.results.select("rule", "severity").equals(other.results.select("rule", "severity"))


@settings(max_examples=60, deadline=None)
@given(
    steps=steps_strategy, at=st.integers(1, 24), base=st.tuples(st.integers(1, 10**5), st.integers(0, 10**5))
)
def test_a_restart_loses_no_request(steps: list[tuple[int, int]], at: int, base: tuple[int, int]) -> None:
    """Counters that restart from 0 at one scrape give the same ratios as counters that never did, as long
    as the restart is visible (the new process has counted less than the old one had)."""
    assume(at < len(steps))
    slos = _builtin()
    kept = _series(steps, (float(base[0]), float(base[0] + base[1])))
    restarted = kept[:at] + _series(steps[at:])
    before, after = kept[at - 1], restarted[at]
    assume(after[1] < before[1] and (after[0] < before[0] or before[0] == 0))
    one = ratios_of(history_ratios(counts(_rows(kept)), slos, T))
    other = ratios_of(history_ratios(counts(_rows(restarted)), slos, T))
    assert one.keys() == other.keys()
    for key, ratio in one.items():
        if ratio is None:
            assert other[key] is None
        else:
            assert other[key] == pytest.approx(ratio, rel=1e-9, abs=1e-12)


def _objective_slos(objective: float) -> SloSet:
    """One SLO with the default pairs, built from the models (no file)."""
    fields = {"name": "p", "engines": ["vllm"], "histogram": "ttft_seconds", "threshold": 2.5}
    slo = Slo.model_validate({**fields, "objective": objective})
    targets = resolve_targets(slo.engines, slo.histogram, slo.threshold)
    return SloSet((LoadedSlo(slo, Path("p.yaml"), 1, False, targets),))


@settings(max_examples=100, deadline=None)
@given(
    ratios=st.lists(st.one_of(st.none(), st.floats(0.0, 1.0)), min_size=8, max_size=8),
    objective=st.sampled_from([0.95, 0.99, 0.999]),
)
def test_findings_follow_the_pairs(ratios: list[float | None], objective: float) -> None:
    """A finding exactly when some pair's two windows both burn above its factor, at the highest such pair."""
    slos = _objective_slos(objective)
    windows = sorted({w for p in DEFAULT_ALERTS for w in (p.long, p.short)} | {timedelta(days=30)})
    frame = pl.DataFrame(
        {"slo": "p", "instance_id": "a", "window": windows, "bad_ratio": ratios}, schema=RATIO_SCHEMA
    )
    got = evaluate(slos, frame, {"a": "vllm"}, T).results
    burn = {w: None if r is None else r / (1 - objective) for w, r in zip(windows, ratios, strict=True)}
    firing = [
        p
        for p in DEFAULT_ALERTS
        if (lb := burn[p.long]) is not None
        and (sb := burn[p.short]) is not None
        and lb > p.factor
        and sb > p.factor
    ]
    if not firing:
        assert got.is_empty()
    else:
        top = max(firing, key=lambda p: list(Severity).index(p.severity))
        assert got.select("severity", "threshold").rows() == [(top.severity.value, top.factor)]


# --- the simulator: nothing fires on a steady or an idle instance -----------------------------------


def _simulated_counts(load: str, minutes: int) -> pl.DataFrame:
    """Scrape a simulated fleet of every engine every 30 s, keeping what history stores (the raw JSON)."""
    fleet = SimFleet("mixed", 3, clock="manual", load=load, seed=3)
    rows: list[dict[str, object]] = []
    for k in range(minutes * 2):
        fleet.advance(30.0)
        at = T - timedelta(seconds=30 * (minutes * 2 - 1 - k))
        for inst in fleet.instances.values():
            text = inst.render()
            assert text is not None
            raw = normalize(inst.engine, parse_exposition_report(text).samples, at=at).raw
            rows.append({"instance_id": inst.id, "ts": at, "raw": raw.model_dump_json()})
    scrapes = pl.DataFrame(
        rows, schema={"instance_id": pl.String, "ts": pl.Datetime("us", "UTC"), "raw": pl.String}
    )
    return project_counts(scrapes, slo_keys(load_slos()))


def _evaluate_builtin(frame: pl.DataFrame) -> SloEvaluation:
    slos = load_slos()
    engines = {i: i.split("-")[0] for i in frame["instance_id"].unique()}
    return evaluate(slos, history_ratios(frame, slos, T), engines, T)


def test_nothing_fires_on_a_steady_fleet() -> None:
    evaluation = _evaluate_builtin(_simulated_counts("steady", 12))
    assert evaluation.results.is_empty(), evaluation.results.to_dicts()
    budgets = {
        (r["slo"], r["instance_id"]): r["error_budget_remaining"]
        for r in evaluation.budgets.iter_rows(named=True)
    }
    # Every instance is covered by an SLO of its engine, and spends little of its budget.
    assert {i for _, i in budgets} == {"vllm-0", "tgi-1", "sglang-2"}
    assert all(b is not None and 0.5 < b <= 1.0 for b in budgets.values()), budgets


def test_nothing_fires_on_an_idle_fleet() -> None:
    evaluation = _evaluate_builtin(_simulated_counts("idle", 10))
    assert evaluation.results.is_empty()
    assert (
        evaluation.budgets.height
        and evaluation.budgets["error_budget_remaining"].null_count() == evaluation.budgets.height
    )
    assert not any(math.isfinite(b) for b in evaluation.burn["burn_rate"].drop_nulls().to_list())
