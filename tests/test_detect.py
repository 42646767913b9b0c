"""Vectorized detection: equal to the plain per-instance reference, and the semantics one by one."""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perfagent.detect import (
    INSUFFICIENT_SCHEMA,
    RESULT_SCHEMA,
    Sample,
    compile_rules,
    evaluate,
    evaluate_reference,
    evaluate_series,
)
from perfagent.rules import SEVERITY_RANK, LoadedRule, Op, Reduce, Rule, RuleSet, Severity, load_rules

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
POOL = ThreadPoolExecutor(2, thread_name_prefix="test-detect")  # one for every test, as the agent keeps one
STEP = timedelta(seconds=15)
# Values on a dyadic grid, so sums and means are exact and both implementations round alike.
RATIO = st.integers(0, 8).map(lambda i: i / 8)
AMOUNT = st.integers(0, 24).map(lambda i: i / 2)
QUANTITIES = {
    "kv_cache_usage": RATIO,
    "prefix_cache_hit_rate": RATIO,
    "requests_waiting": AMOUNT,
    "ttft_seconds_p99": AMOUNT,
}
# Slope thresholds (unit per second, either sign), on the scale the samples' steps every 15s give.
SLOPES = {
    "kv_cache_usage": st.integers(-8, 8).map(lambda i: i / 256),
    "prefix_cache_hit_rate": st.integers(-8, 8).map(lambda i: i / 256),
    "requests_waiting": st.integers(-16, 16).map(lambda i: i / 32),
    "ttft_seconds_p99": st.integers(-16, 16).map(lambda i: i / 32),
}


def grid(quantity: str, reduce: Reduce) -> st.SearchStrategy[float]:
    return SLOPES[quantity] if reduce is Reduce.SLOPE else QUANTITIES[quantity]


ENGINES = ["vllm", "tgi", "sglang", "other"]


def loaded(*rules: dict[str, Any]) -> RuleSet:
    out = []
    for i, raw in enumerate(rules):
        spec = {"name": f"R{i}", "type": "QUEUE_BUILDUP", "recommendation": "r", **raw}
        out.append(LoadedRule(Rule.model_validate(spec), Path("test.yaml"), i + 1, "g", None, False))
    return RuleSet(tuple(out))


def frame(rows: Sequence[dict[str, Any]], quantities: Sequence[str] | None = None) -> pl.DataFrame:
    names = quantities if quantities is not None else sorted({k for r in rows for k in r} - {"i", "e", "t"})
    schema = pl.Schema({"instance_id": pl.String(), "engine": pl.String(), "ts": pl.Datetime("us", "UTC")})
    data: dict[str, list[Any]] = {
        "instance_id": [r["i"] for r in rows],
        "engine": [r.get("e", "vllm") for r in rows],
        "ts": [T0 + r["t"] * STEP for r in rows],
    }
    for q in names:
        data[q] = [r.get(q) for r in rows]
    return pl.DataFrame(data, schema=pl.Schema({**schema, **{q: pl.Float64() for q in names}}))


def as_python(df: pl.DataFrame) -> dict[str, tuple[str, list[Sample]]]:
    quantities = [c for c in df.columns if c not in ("instance_id", "engine", "ts")]
    out: dict[str, tuple[str, list[Sample]]] = {}
    for row in df.sort("instance_id", "ts").iter_rows(named=True):
        entry = out.setdefault(row["instance_id"], (row["engine"], []))
        entry[1].append((row["ts"], {q: row[q] for q in quantities}))
    return out


# --- the property: vectorized == reference ---------------------------------------------------------


@st.composite
def rules(
    draw: st.DrawFn,
    reduces: Sequence[Reduce] = tuple(Reduce),
    overs: Sequence[str | None] = (None, "30s", "1m", "2m"),
) -> dict[str, Any]:
    quantity = draw(st.sampled_from(sorted(QUANTITIES)))
    op = draw(st.sampled_from(list(Op)))
    over = draw(st.sampled_from(list(overs)))
    reduce = draw(st.sampled_from(list(reduces))) if over else Reduce.LAST
    severities = draw(st.lists(st.sampled_from(list(Severity)), min_size=1, max_size=4, unique=True))
    values = draw(
        st.lists(grid(quantity, reduce), min_size=len(severities), max_size=len(severities), unique=True)
    )
    ordered = sorted(severities, key=lambda s: SEVERITY_RANK[s])
    ladder = dict(zip(ordered, sorted(values, reverse=not op.upward), strict=True))
    conditions = []
    predicts = reduce is Reduce.PREDICT  # something reads the rule's `ahead`
    for _ in range(draw(st.integers(0, 2))):
        q = draw(st.sampled_from(sorted(QUANTITIES)))
        cond: dict[str, Any] = {"quantity": q, "op": draw(st.sampled_from(list(Op))).value}
        how = reduce
        if over and draw(st.booleans()):
            how = draw(st.sampled_from(list(Reduce)))
            cond["reduce"] = how.value
        cond["value"] = draw(grid(q, how))
        if how is Reduce.PREDICT:
            if draw(st.booleans()):
                cond["ahead"] = draw(st.sampled_from(["15s", "1m", "7m"]))
            else:
                predicts = True
        conditions.append(cond)
    engines = draw(st.one_of(st.none(), st.lists(st.sampled_from(ENGINES[:3]), min_size=1, unique=True)))
    spec: dict[str, Any] = {
        "quantity": quantity,
        "op": op.value,
        "thresholds": {s.value: v for s, v in ladder.items()},
        "reduce": reduce.value,
        "and": conditions,
    }
    if over:
        spec["over"] = over
    if predicts:
        spec["ahead"] = draw(st.sampled_from(["30s", "2m", "10m"]))
    if engines:
        spec["engines"] = engines
    return spec


@st.composite
def frames(draw: st.DrawFn, dense: bool = False) -> pl.DataFrame:
    """Up to 4 instances with random samples; `dense`: most steps sampled, few nulls (trends need
    two samples in their window to say anything)."""
    present = (
        sorted(QUANTITIES)
        if dense
        else draw(st.lists(st.sampled_from(sorted(QUANTITIES)), unique=True, max_size=4))
    )
    rows = []
    for n in range(draw(st.integers(1, 4))):
        engine = draw(st.sampled_from(ENGINES))
        steps = draw(st.lists(st.integers(0, 14), unique=True, min_size=10 if dense else 1, max_size=15))
        for t in steps:
            row: dict[str, Any] = {"i": f"i{n}", "e": engine, "t": t}
            for q in present:
                missing = draw(st.integers(0, 9)) == 0 if dense else draw(st.booleans())
                row[q] = None if missing else draw(QUANTITIES[q])
            rows.append(row)
    return frame(rows, present).sample(fraction=1.0, shuffle=True, seed=0)


def findings(df: pl.DataFrame) -> set[tuple[str, str, str, float, float]]:
    return {
        (r["instance_id"], r["rule"], r["severity"], r["value"], r["threshold"])
        for r in df.iter_rows(named=True)
    }


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(rules(), min_size=1, max_size=4),
    df=frames(),
    at_step=st.integers(0, 16),
    offset=st.sampled_from([0, 7]),
    lookback=st.sampled_from([timedelta(seconds=45), timedelta(minutes=5)]),
    engines_apart=st.booleans(),
    pooled=st.booleans(),
)
def test_vectorized_equals_the_per_instance_reference(
    specs: list[dict[str, Any]],
    df: pl.DataFrame,
    at_step: int,
    offset: int,
    lookback: timedelta,
    engines_apart: bool,
    pooled: bool,
) -> None:
    ruleset = loaded(*specs)
    at = T0 + at_step * STEP + timedelta(seconds=offset)
    compiled = compile_rules(ruleset, lookback=lookback)
    pool = POOL if pooled else None  # threads, as the agent runs it, or all in this thread
    if engines_apart:  # as `Detector` passes them: per instance, the frame without an engine column
        engines = dict(df.select("instance_id", "engine").unique().iter_rows())
        result = evaluate(compiled, df.drop("engine"), at, engines=engines, pool=pool)
    else:
        result = evaluate(compiled, df, at, pool=pool)
    expected, missing = evaluate_reference(ruleset, as_python(df), at, lookback=lookback)
    assert findings(result.results) == {
        (f.instance_id, f.rule, f.severity.value, f.value, f.threshold) for f in expected
    }
    assert {
        (r["instance_id"], r["rule"], r["quantity"]) for r in result.insufficient.iter_rows(named=True)
    } == missing
    # Insufficient data never yields a finding.
    both = result.results.join(result.insufficient, on=["instance_id", "rule"], how="inner")
    assert both.is_empty()
    assert result.results.schema == RESULT_SCHEMA and result.insufficient.schema == INSUFFICIENT_SCHEMA


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(rules(), min_size=1, max_size=3), df=frames())
def test_evaluate_series_equals_evaluate_at_every_timestamp(
    specs: list[dict[str, Any]], df: pl.DataFrame
) -> None:
    compiled = compile_rules(loaded(*specs))
    series = evaluate_series(compiled, df)
    for ts in df["ts"].unique().sort():
        sampled = df.filter(pl.col("ts") == ts)["instance_id"].implode()
        at_once = evaluate(compiled, df, ts).results.filter(pl.col("instance_id").is_in(sampled))
        in_series = series.filter(pl.col("window_end") == ts).sort("instance_id", "rule")
        assert at_once.equals(in_series), (ts, at_once, in_series)


TRENDS = (Reduce.SLOPE, Reduce.PREDICT)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(rules(reduces=TRENDS, overs=("1m", "2m", "5m")), min_size=1, max_size=3),
    df=frames(dense=True),
    at_step=st.integers(2, 16),
    offset=st.sampled_from([0, 7]),
)
def test_trends_equal_the_reference_and_the_series(
    specs: list[dict[str, Any]], df: pl.DataFrame, at_step: int, offset: int
) -> None:
    """Slopes and projections on dense data (where fits exist): the vectorized evaluation equals the
    reference at one time, and the rolling series equals the evaluation at every sampled time."""
    ruleset = loaded(*specs)
    compiled = compile_rules(ruleset)
    at = T0 + at_step * STEP + timedelta(seconds=offset)
    result = evaluate(compiled, df, at)
    expected, missing = evaluate_reference(ruleset, as_python(df), at)
    assert findings(result.results) == {
        (f.instance_id, f.rule, f.severity.value, f.value, f.threshold) for f in expected
    }
    assert set(result.insufficient.select("instance_id", "rule", "quantity").rows()) == missing
    series = evaluate_series(compiled, df)
    for ts in df["ts"].unique().sort():
        sampled = df.filter(pl.col("ts") == ts)["instance_id"].implode()
        at_once = evaluate(compiled, df, ts).results.filter(pl.col("instance_id").is_in(sampled))
        assert at_once.equals(series.filter(pl.col("window_end") == ts)), ts


@st.composite
def rounds(draw: st.DrawFn) -> pl.DataFrame:
    """Rounds: every scrape round one row per instance, the same instances in the same order (not
    by name), scraped a second apart within a round; some samples null. Sometimes ragged: some
    scrapes failed, and the store has no row for them."""
    present = draw(st.lists(st.sampled_from(sorted(QUANTITIES)), unique=True, min_size=1, max_size=4))
    names = draw(st.permutations([f"i{n}" for n in range(draw(st.integers(1, 4)))]))
    engines = {name: draw(st.sampled_from(ENGINES)) for name in names}
    first, count = draw(st.integers(0, 8)), draw(st.integers(1, 15))
    ragged = draw(st.booleans())
    data: dict[str, list[Any]] = {"instance_id": [], "engine": [], "ts": [], **{q: [] for q in present}}
    for t in range(first, first + count):
        for position, name in enumerate(names):
            if ragged and draw(st.integers(0, 4)) == 0:
                continue
            data["instance_id"].append(name)
            data["engine"].append(engines[name])
            data["ts"].append(T0 + t * STEP + timedelta(seconds=position))
            for q in present:
                data[q].append(None if draw(st.integers(0, 3)) == 0 else draw(QUANTITIES[q]))
    schema = {"instance_id": pl.String(), "engine": pl.String(), "ts": pl.Datetime("us", "UTC")}
    return pl.DataFrame(data, schema={**schema, **{q: pl.Float64() for q in present}})


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(rules(), min_size=1, max_size=4),
    df=rounds(),
    at_step=st.integers(0, 24),
    offset=st.sampled_from([0, 2, 7]),
)
def test_every_row_layout_equals_the_reference(
    specs: list[dict[str, Any]], df: pl.DataFrame, at_step: int, offset: int
) -> None:
    """Rounds in time order, the same rows by instance and time (as the store returns them), each
    instance's rows together but instances not in name order, and shuffled take different paths
    to the per-instance groups; each equals the reference."""
    ruleset = loaded(*specs)
    compiled = compile_rules(ruleset)
    at = T0 + at_step * STEP + timedelta(seconds=offset)
    expected, missing = evaluate_reference(ruleset, as_python(df), at)
    want = {(f.instance_id, f.rule, f.severity.value, f.value, f.threshold) for f in expected}
    engines = dict(df.select("instance_id", "engine").unique().iter_rows())
    # Each instance's rows together, instances in order of first appearance (not by name).
    first_row = pl.col("__row").min().over("instance_id")
    grouped = df.with_row_index("__row").sort(first_row, "__row").drop("__row")
    shuffled = df.sample(fraction=1.0, shuffle=True, seed=1)
    for layout in (df.sort("ts"), df.sort("instance_id", "ts"), grouped, shuffled):
        for result in (
            evaluate(compiled, layout, at),
            evaluate(compiled, layout.drop("engine"), at, engines=engines, pool=POOL),
        ):
            assert findings(result.results) == want
            assert set(result.insufficient.select("instance_id", "rule", "quantity").rows()) == missing


# --- semantics, one by one -------------------------------------------------------------------------

LADDER = {"LOW": 0.5, "MEDIUM": 0.7, "HIGH": 0.9, "CRITICAL": 0.95}


@pytest.mark.parametrize(
    ("value", "severity", "threshold"),
    [
        (0.4, None, None),
        (0.6, "LOW", 0.5),
        (0.9, "MEDIUM", 0.7),
        (0.92, "HIGH", 0.9),
        (0.99, "CRITICAL", 0.95),
    ],
)
def test_the_highest_rung_reached_wins(value: float, severity: str | None, threshold: float | None) -> None:
    ruleset = loaded({"quantity": "kv_cache_usage", "op": ">", "thresholds": LADDER})
    result = evaluate(compile_rules(ruleset), frame([{"i": "a", "t": 0, "kv_cache_usage": value}]), T0)
    rows = result.results.select("severity", "threshold").rows()
    assert rows == ([] if severity is None else [(severity, threshold)])


@pytest.mark.parametrize(
    ("value", "severity"), [(60.0, None), (40.0, "MEDIUM"), (10.0, "HIGH"), (4.0, "CRITICAL")]
)
def test_a_falling_ladder_for_less_than(value: float, severity: str | None) -> None:
    ladder = {"MEDIUM": 50, "HIGH": 20, "CRITICAL": 5}
    ruleset = loaded({"quantity": "generation_tokens_per_second", "op": "<", "thresholds": ladder})
    df = frame([{"i": "a", "t": 0, "generation_tokens_per_second": value}])
    assert evaluate(compile_rules(ruleset), df, T0).results["severity"].to_list() == (
        [severity] if severity else []
    )


def test_insufficient_data_is_reported_never_found() -> None:
    ruleset = loaded(
        {"quantity": "kv_cache_usage", "op": "<", "thresholds": {"LOW": 0.9}},
        {"quantity": "ttft_seconds_p99", "op": ">", "thresholds": {"LOW": 0}},
    )
    df = frame([{"i": "a", "t": 0, "kv_cache_usage": None}, {"i": "b", "t": 0, "kv_cache_usage": 0.5}])
    result = evaluate(compile_rules(ruleset), df, T0)
    assert result.results.select("instance_id", "rule").rows() == [("b", "R0")]
    assert result.insufficient.select("instance_id", "rule", "quantity", "reason").rows() == [
        ("a", "R0", "kv_cache_usage", "no sample of 'kv_cache_usage' in the 5m window"),
        ("a", "R1", "ttft_seconds_p99", "'ttft_seconds_p99' is not in the data"),
        ("b", "R1", "ttft_seconds_p99", "'ttft_seconds_p99' is not in the data"),
    ]


def test_and_conditions_use_three_valued_logic() -> None:
    waiting = {"quantity": "requests_waiting", "op": ">", "value": 0}
    hit = {"quantity": "prefix_cache_hit_rate", "op": "<", "value": 0.5}
    ruleset = loaded(
        {"quantity": "kv_cache_usage", "op": ">", "thresholds": {"HIGH": 0.8}, "and": [waiting, hit]}
    )
    df = frame(
        [
            {
                "i": "holds",
                "t": 0,
                "kv_cache_usage": 0.9,
                "requests_waiting": 3,
                "prefix_cache_hit_rate": 0.1,
            },
            {"i": "decided", "t": 0, "kv_cache_usage": 0.9, "requests_waiting": 0},  # one false decides
            {"i": "open", "t": 0, "kv_cache_usage": 0.9, "requests_waiting": 3},  # true and unknown: open
            {"i": "low", "t": 0, "kv_cache_usage": 0.5, "requests_waiting": 3, "prefix_cache_hit_rate": 0.1},
        ]
    )
    result = evaluate(compile_rules(ruleset), df, T0)
    assert result.results["instance_id"].to_list() == ["holds"]
    assert result.insufficient.select("instance_id", "quantity").rows() == [("open", "prefix_cache_hit_rate")]


def test_over_windows_are_open_at_the_start_and_closed_at_the_end() -> None:
    ruleset = loaded(
        {"quantity": "requests_waiting", "op": ">", "over": "1m", "reduce": "mean", "thresholds": {"LOW": 3}},
        {"quantity": "requests_waiting", "op": ">", "over": "1m", "reduce": "max", "thresholds": {"LOW": 8}},
        {"quantity": "requests_waiting", "op": ">", "over": "1m", "reduce": "min", "thresholds": {"LOW": 1}},
        {"quantity": "requests_waiting", "op": ">", "over": "1m", "reduce": "last", "thresholds": {"LOW": 1}},
    )
    # At 1:00 the window is (0:00, 1:00]: the sample at 0:00 (100) is out, the one at 1:00 is in.
    values = [100, 2, 4, None, 6, 50]
    df = frame([{"i": "a", "t": t, "requests_waiting": v} for t, v in enumerate(values)])
    result = evaluate(compile_rules(ruleset), df, T0 + 4 * STEP)
    assert dict(result.results.select("rule", "value").rows()) == {"R0": 4.0, "R2": 2.0, "R3": 6.0}
    # Samples after `at` are ignored (a backtest may hold the future).
    assert result.results["window_end"].unique().to_list() == [T0 + 4 * STEP]
    assert result.results["window_start"].unique().to_list() == [T0 + 4 * STEP - timedelta(minutes=1)]


def test_last_without_over_reads_within_the_lookback() -> None:
    ruleset = loaded({"quantity": "kv_cache_usage", "op": ">", "thresholds": {"HIGH": 0.8}})
    df = frame([{"i": "a", "t": 0, "kv_cache_usage": 0.9}, {"i": "a", "t": 10, "kv_cache_usage": None}])
    compiled = compile_rules(ruleset, lookback=timedelta(minutes=5))
    assert evaluate(compiled, df, T0 + 10 * STEP).results["value"].to_list() == [0.9]  # 2.5m old
    stale = evaluate(compiled, df, T0 + 20 * STEP)  # 5m old: outside (at - 5m, at]
    assert stale.results.is_empty() and stale.insufficient["instance_id"].to_list() == ["a"]


def test_engines_filter() -> None:
    ruleset = loaded(
        {"quantity": "kv_cache_usage", "op": ">", "thresholds": {"HIGH": 0.8}, "engines": ["sglang"]}
    )
    df = frame(
        [
            {"i": "s", "e": "sglang", "t": 0, "kv_cache_usage": 0.9},
            {"i": "v", "e": "vllm", "t": 0, "kv_cache_usage": 0.9},
            {"i": "v2", "e": "vllm", "t": 0, "kv_cache_usage": None},  # not applicable: not insufficient
        ]
    )
    result = evaluate(compile_rules(ruleset), df, T0)
    assert result.results["instance_id"].to_list() == ["s"] and result.insufficient.is_empty()


def test_an_idle_instance_triggers_no_builtin_rule() -> None:
    idle = {
        "requests_running": 0.0,
        "requests_waiting": 0.0,
        "kv_cache_usage": 0.001,
        "preemption_rate": 0.0,
        "generation_tokens_per_second": 0.0,
        "prompt_tokens_per_second": 0.0,
        "request_rate": 0.0,
    }
    rows = [{"i": f"idle-{e}", "e": e, "t": t, **idle} for e in ENGINES[:3] for t in range(40)]
    df = frame(rows, [*idle, "ttft_seconds_p99", "itl_seconds_p99", "prefix_cache_hit_rate"])
    compiled = compile_rules(load_rules())
    assert evaluate(compiled, df, T0 + 39 * STEP).results.is_empty()
    assert evaluate_series(compiled, df).is_empty()


def test_frame_order_and_laziness_do_not_matter() -> None:
    ruleset = loaded(
        {"quantity": "requests_waiting", "op": ">", "over": "1m", "reduce": "mean", "thresholds": {"LOW": 1}}
    )
    rows = [
        {"i": f"i{n}", "t": t, "requests_waiting": float((n * 7 + t) % 5)}
        for n in range(6)
        for t in range(12)
    ]
    by_time = frame(rows).sort("ts")
    compiled = compile_rules(ruleset)
    at = T0 + 9 * STEP
    expected = evaluate(compiled, by_time, at)  # binary search on the sorted ts
    for other in (by_time.sort("instance_id"), by_time.reverse()):
        assert evaluate(compiled, other, at).results.equals(expected.results)
    assert evaluate(compiled, by_time.lazy(), at).results.equals(expected.results)


def test_rendered_text_and_labels() -> None:
    ruleset = loaded(
        {
            "quantity": "kv_cache_usage",
            "op": ">",
            "over": "2m",
            "reduce": "max",
            "thresholds": {"MEDIUM": 0.8, "HIGH": 0.9},
            "labels": {"team": "inference"},
            "annotations": {
                "summary": "{instance} ({engine}) at {value:.0%}",
                "description": "{rule} {type} {severity}: {value} {unit} of {quantity} over {window}, "
                "rung {threshold:.2f}, {value:.1%}, {{literal}}",
            },
        }
    )
    df = frame([{"i": "vllm-0", "t": 0, "kv_cache_usage": 0.93127}])
    row = evaluate(compile_rules(ruleset), df, T0).results.row(0, named=True)
    assert row["summary"] == "vllm-0 (vllm) at 93%"
    assert row["description"] == (
        "R0 QUEUE_BUILDUP HIGH: 0.9313 ratio of kv_cache_usage over 2m, rung 0.90, 93.1%, {literal}"
    )
    assert json.loads(row["labels"]) == {"team": "inference"} and row["recommendation"] == "r"
    assert (row["unit"], row["op"], row["quantity"]) == ("ratio", ">", "kv_cache_usage")


def test_a_frame_without_identity_columns_is_rejected() -> None:
    compiled = compile_rules(loaded({"quantity": "kv_cache_usage", "op": ">", "thresholds": {"HIGH": 0.8}}))
    with pytest.raises(ValueError, match="engine"):
        evaluate(compiled, frame([{"i": "a", "t": 0, "kv_cache_usage": 1.0}]).drop("engine"), T0)


# --- trends ----------------------------------------------------------------------------------------


def test_slope_and_projection_are_the_least_squares_line() -> None:
    """`slope` and `predict` equal an independent least-squares fit (NumPy) of the window's samples,
    with x relative to the evaluation time; samples outside the window do not count."""
    values = [0.9, 0.1, 0.2, 0.22, 0.35, 0.33, 0.5, 0.48, 0.61]  # the first is outside the 2m window
    df = frame([{"i": "a", "t": t, "kv_cache_usage": v} for t, v in enumerate(values)])
    ruleset = loaded(
        {"quantity": "kv_cache_usage", "op": ">", "over": "2m", "reduce": "slope", "thresholds": {"LOW": -1}},
        {
            "quantity": "kv_cache_usage",
            "op": ">=",
            "over": "2m",
            "reduce": "predict",
            "ahead": "10m",
            "thresholds": {"LOW": 0},
        },
    )
    at = T0 + 8 * STEP + timedelta(seconds=5)
    got = dict(evaluate(compile_rules(ruleset), df, at).results.select("rule", "value").rows())
    x = np.array([(t * STEP - 8 * STEP - timedelta(seconds=5)).total_seconds() for t in range(1, 9)])
    slope, intercept = np.polyfit(x, np.array(values[1:]), 1)
    assert got["R0"] == pytest.approx(slope, rel=1e-12)
    assert got["R1"] == pytest.approx(intercept + slope * 600, rel=1e-12)


def test_a_flat_window_has_slope_zero_and_projects_its_value() -> None:
    ruleset = loaded(
        {
            "quantity": "requests_waiting",
            "op": ">=",
            "over": "1m",
            "reduce": "slope",
            "thresholds": {"LOW": 0},
        },
        {
            "quantity": "requests_waiting",
            "op": ">=",
            "over": "1m",
            "reduce": "predict",
            "ahead": "1h",
            "thresholds": {"LOW": 0},
        },
    )
    df = frame([{"i": "a", "t": t, "requests_waiting": 0.3} for t in range(6)])
    result = evaluate(compile_rules(ruleset), df, T0 + 5 * STEP)
    assert result.results.select("rule", "value").rows() == [("R0", 0.0), ("R1", 0.3)]  # exactly


def test_a_trend_needs_two_samples_in_its_window() -> None:
    ruleset = loaded(
        {"quantity": "kv_cache_usage", "op": ">", "over": "1m", "reduce": "slope", "thresholds": {"LOW": 0}}
    )
    df = frame(
        [
            {"i": "one", "t": 0, "kv_cache_usage": 0.1},  # outside the window at 1:00
            {"i": "one", "t": 4, "kv_cache_usage": 0.5},
            {"i": "two", "t": 3, "kv_cache_usage": 0.1},
            {"i": "two", "t": 4, "kv_cache_usage": 0.5},
        ]
    )
    result = evaluate(compile_rules(ruleset), df, T0 + 4 * STEP)
    assert result.results["instance_id"].to_list() == ["two"]
    assert result.insufficient.select("instance_id", "reason").rows() == [
        ("one", "fewer than 2 samples of 'kv_cache_usage' in the 1m window")
    ]


def test_a_slope_is_per_second_and_templates_name_ahead() -> None:
    ruleset = loaded(
        {
            "quantity": "requests_waiting",
            "op": ">",
            "over": "1m",
            "reduce": "slope",
            "thresholds": {"LOW": 0.1},
            "annotations": {"summary": "{value} {unit} over {window}"},
        },
        {
            "quantity": "requests_waiting",
            "op": ">",
            "over": "1m",
            "reduce": "predict",
            "ahead": "5m",
            "thresholds": {"LOW": 50},
            "annotations": {"summary": "{value} {unit} in {ahead}"},
        },
    )
    # Three more requests waiting every 15 s: 0.2 per second.
    df = frame([{"i": "a", "t": t, "requests_waiting": 3.0 * t} for t in range(5)])
    rows = evaluate(compile_rules(ruleset), df, T0 + 4 * STEP).results.select("unit", "summary").rows()
    assert rows == [("requests/s", "0.2 requests/s over 1m"), ("requests", "72 requests in 5m")]


def test_engines_passed_apart_equal_an_engine_column() -> None:
    """`engines=` (what `Detector` passes) gives what an engine column on every row gives, for the
    rolling evaluation too; an instance missing from the mapping has no engine."""
    ruleset = loaded(
        {"quantity": "kv_cache_usage", "op": ">", "thresholds": {"HIGH": 0.8}, "engines": ["sglang"]},
        {"quantity": "kv_cache_usage", "op": ">", "thresholds": {"HIGH": 0.8}},
    )
    df = frame(
        [
            {"i": i, "e": e, "t": t, "kv_cache_usage": 0.9}
            for i, e in (("s", "sglang"), ("v", "vllm"))
            for t in range(3)
        ]
    )
    compiled = compile_rules(ruleset)
    engines = {"s": "sglang", "v": "vllm"}
    assert evaluate(compiled, df.drop("engine"), T0 + STEP, engines=engines).results.equals(
        evaluate(compiled, df, T0 + STEP).results
    )
    assert evaluate_series(compiled, df.drop("engine"), engines=engines).equals(evaluate_series(compiled, df))
    unknown = evaluate(compiled, df.drop("engine"), T0, engines={"s": "sglang"}).results
    assert unknown.select("instance_id", "engine", "rule").rows() == [
        ("s", "sglang", "R0"),
        ("s", "sglang", "R1"),
        ("v", None, "R1"),
    ]


def test_a_pool_gives_what_one_thread_gives_and_passes_errors_on() -> None:
    """The threads only split the work: the same frames, bit for bit, and an error raised in one of
    them reaches the caller as it does without a pool."""
    compiled = compile_rules(load_rules())
    rng = np.random.default_rng(3)
    quantities = sorted(compiled.quantities)
    # Ratios in 0-1, everything else up to 20 (seconds, rates, queue lengths): some rules hold.
    scale = np.array([1.0 if "usage" in q or "rate" in q else 20.0 for q in quantities])
    rows = [
        {"i": f"i{n:02d}", "e": ("vllm", "sglang", "tgi")[n % 3], "t": t}
        | dict(zip(quantities, (rng.random(len(quantities)) * scale).tolist(), strict=True))
        for n in range(30)
        for t in range(25)
    ]
    df = frame(rows)
    at = T0 + 24 * STEP
    alone, pooled = evaluate(compiled, df, at), evaluate(compiled, df, at, pool=POOL)
    assert not alone.results.is_empty()
    assert pooled.results.equals(alone.results) and pooled.insufficient.equals(alone.insufficient)
    broken = df.with_columns(pl.lit("n/a").alias("kv_cache_usage"))  # not a number
    for pool in (None, POOL):
        with pytest.raises(pl.exceptions.InvalidOperationError):
            evaluate(compiled, broken, at, pool=pool)
