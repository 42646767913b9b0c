"""Trends against a real Prometheus: the vectorized slope and projection equal Prometheus's own
`deriv` and `predict_linear` over the same samples, and a trend rule finds the same on the agent's
DuckDB history as on a frame built from Prometheus `query_range` results.

The series are generated here, backfilled with promtool and served by a real Prometheus. This
Prometheus (2.x) reads range selectors closed at both ends, `[t - w, t]`, the agent `(t - w, t]`
as Prometheus 3 does: the jittered series and evaluation times never put a sample on a window's
start, so both read the same samples.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from perfagent.detect import compile_rules, evaluate, evaluate_series
from perfagent.detection import Detector
from perfagent.findings import FindingTracker
from perfagent.history import ScrapeRecord, sample_frame, scrape_frame
from perfagent.rules import LoadedRule, Rule, RuleSet, load_rules
from perfagent.store import Store
from tests.prometheus import backfilled_prometheus, openmetrics

T0 = datetime(2026, 1, 1, tzinfo=UTC)
STEP = 15.0  # seconds
POINTS = 121  # 30 minutes
QUANTITIES = ("kv_cache_usage", "requests_waiting")
ENGINES = {"jit-rising": "vllm", "jit-flat": "vllm", "jit-gappy": "sglang", "jit-falling": "vllm"}
GRID_ENGINES = {"grid-filling": "vllm", "grid-queue": "sglang", "grid-calm": "vllm", "grid-noisy": "vllm"}

Series = dict[str, list[tuple[float, float]]]  # quantity -> [(unix seconds, value)]


def _jittered(rng: np.random.Generator) -> dict[str, Series]:
    """Samples 15 s apart plus a jitter distinct per sample (whole ms), so no two samples of an
    instance are a whole number of steps apart: no window start ever falls on a sample."""
    t = np.arange(POINTS) * STEP
    shapes = {
        "jit-rising": (
            0.2 + 0.0004 * t + rng.normal(0, 0.02, POINTS),
            2 + 0.01 * t + rng.normal(0, 1, POINTS),
        ),
        "jit-flat": (np.full(POINTS, 0.4), np.full(POINTS, 3.0)),
        "jit-gappy": (0.5 + 0.3 * np.sin(t / 300) + rng.normal(0, 0.05, POINTS), 20 - 0.005 * t),
        "jit-falling": (0.95 - 0.0003 * t, np.maximum(0, 30 - 0.02 * t + rng.normal(0, 2, POINTS))),
    }
    out: dict[str, Series] = {}
    start = T0.timestamp()
    for instance, (kv, waiting) in shapes.items():
        jitter = rng.choice(3000, size=POINTS, replace=False) / 1000
        keep = rng.random(POINTS) > (0.3 if instance == "jit-gappy" else 0.0)
        stamps = [start + float(s) for s in t + jitter]
        out[instance] = {
            q: [(ts, float(v)) for ts, v, k in zip(stamps, values, keep, strict=True) if k]
            for q, values in zip(QUANTITIES, (np.clip(kv, 0, 1), np.round(waiting)), strict=True)
        }
    return out


def _grid(rng: np.random.Generator) -> dict[str, Series]:
    """Samples on the 15 s grid, no gaps: what `query_range` at that step returns sample for sample."""
    t = np.arange(POINTS) * STEP
    late = np.clip(t - 1200, 0, None)  # the last 10 minutes
    shapes = {
        # Steady at 0.6, then filling at 3 % a minute: KVCacheFullSoon.
        "grid-filling": (0.6 + 0.0005 * late + rng.normal(0, 0.005, POINTS), np.full(POINTS, 1.0)),
        # A queue that grows by one request every 6 s in the last 10 minutes: QueueGrowing.
        "grid-queue": (np.full(POINTS, 0.5), 1 + late / 6),
        "grid-calm": (0.3 + rng.normal(0, 0.01, POINTS), rng.integers(0, 2, POINTS).astype(float)),
        "grid-noisy": (0.9 + rng.normal(0, 0.03, POINTS), 5 + rng.normal(0, 2, POINTS)),
    }
    start = T0.timestamp()
    return {
        instance: {
            q: [(start + float(s), float(v)) for s, v in zip(t, values, strict=True)]
            for q, values in zip(QUANTITIES, (np.clip(kv, 0, 1), np.round(np.clip(w, 0, None))), strict=True)
        }
        for instance, (kv, w) in shapes.items()
    }


def _text(data: dict[str, Series]) -> str:
    return openmetrics(
        [
            (quantity, "gauge", {"instance": instance}, series[quantity])
            for quantity in QUANTITIES
            for instance, series in data.items()
        ]
    )


def _rows(data: dict[str, Series], engines: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """One row per (instance, time) with both quantities (null where one has no sample)."""
    for instance, series in data.items():
        by_time: dict[float, dict[str, float]] = {}
        for quantity, samples in series.items():
            for ts, value in samples:
                by_time.setdefault(ts, {})[quantity] = value
        for ts in sorted(by_time):
            row: dict[str, Any] = {"instance_id": instance, "ts": datetime.fromtimestamp(ts, UTC)}
            if engines is not None:
                row["engine"] = engines[instance]
            yield {**row, **{q: by_time[ts].get(q) for q in QUANTITIES}}


def _frame(rows: Sequence[dict[str, Any]], engine: bool) -> pl.DataFrame:
    schema: dict[str, pl.DataType] = {"instance_id": pl.String(), "ts": pl.Datetime("us", "UTC")}
    if engine:
        schema["engine"] = pl.String()
    schema.update({q: pl.Float64() for q in QUANTITIES})
    return pl.DataFrame(list(rows), schema=schema, orient="row").sort("ts")


def _get(url: str, path: str, **params: str) -> Any:
    with urllib.request.urlopen(f"{url}{path}?{urllib.parse.urlencode(params)}", timeout=30) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


def _instant(url: str, query: str, at: datetime) -> dict[str, float]:
    data = _get(url, "/api/v1/query", query=query, time=f"{at.timestamp():.3f}")
    return {r["metric"]["instance"]: float(r["value"][1]) for r in data["result"]}


@pytest.fixture(scope="module")
def data() -> tuple[dict[str, Series], dict[str, Series]]:
    rng = np.random.default_rng(11)
    return _jittered(rng), _grid(rng)


@pytest.fixture(scope="module")
def prometheus(
    tmp_path_factory: pytest.TempPathFactory, data: tuple[dict[str, Series], dict[str, Series]]
) -> Iterator[str]:
    jittered, grid = data
    with backfilled_prometheus(tmp_path_factory.mktemp("prom"), _text({**jittered, **grid})) as url:
        yield url


def _catch_all(window: str) -> RuleSet:
    """Rules that hold for every value, so each instance's slope and projection come out as findings.

    A projection of a ratio may fall anywhere, but its thresholds stay in 0-1: `>= 0` and `< 0`
    together cover every value.
    """
    specs: list[dict[str, Any]] = []
    for q in QUANTITIES:
        specs.append(
            {"name": f"slope:{q}", "quantity": q, "reduce": "slope", "op": ">", "thresholds": {"LOW": -1e12}}
        )
        for name, op in (("up", ">="), ("down", "<")):
            specs.append(
                {
                    "name": f"predict:{q}:{name}",
                    "quantity": q,
                    "reduce": "predict",
                    "ahead": "10m",
                    "op": op,
                    "thresholds": {"LOW": 0},
                }
            )
    out = []
    for i, spec in enumerate(specs):
        rule = Rule.model_validate({"type": "QUEUE_BUILDUP", "over": window, "recommendation": "r", **spec})
        out.append(LoadedRule(rule, Path("trends.yaml"), i + 1, "g", None, False))
    return RuleSet(tuple(out))


def _values(results: pl.DataFrame) -> dict[tuple[str, str], float]:
    """(instance, "slope:q" or "predict:q") -> the rule's value."""
    return {
        (r["instance_id"], r["rule"].removesuffix(":up").removesuffix(":down")): r["value"]
        for r in results.iter_rows(named=True)
    }


def _prometheus_values(url: str, at: datetime, window: str) -> dict[tuple[str, str], float]:
    out = {}
    for q in QUANTITIES:
        for kind, query in (
            ("slope", f"deriv({q}[{window}])"),
            ("predict", f"predict_linear({q}[{window}], 600)"),
        ):
            for instance, value in _instant(url, query, at).items():
                if instance.startswith("jit-"):
                    out[instance, f"{kind}:{q}"] = value
    return out


def _assert_close(got: dict[tuple[str, str], float], want: dict[tuple[str, str], float], rel: float) -> None:
    """Equal to `rel` (the sums add in another order), and a flat window's slope exactly 0 on both
    sides."""
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=rel, abs=1e-300), key


@pytest.mark.parametrize("window", ["2m", "5m"])
def test_slope_and_projection_equal_deriv_and_predict_linear(
    prometheus: str, data: tuple[dict[str, Series], dict[str, Series]], window: str
) -> None:
    jittered, _ = data
    frame = _frame(list(_rows(jittered, ENGINES)), engine=True)
    compiled = compile_rules(_catch_all(window))
    # Times between samples, at the start (a partial window), in the middle and at the end.
    for at in (
        T0 + timedelta(minutes=1, seconds=4.5),  # a partial window
        T0 + timedelta(minutes=13, seconds=7),
        T0 + timedelta(minutes=29, seconds=58.25),
    ):
        want = _prometheus_values(prometheus, at, window)
        assert len(want) == len(ENGINES) * len(QUANTITIES) * 2
        _assert_close(_values(evaluate(compiled, frame, at).results), want, rel=1e-12)  # seen: 3e-14

    # The rolling evaluation at a few sample times: its sums are over seconds since the frame's
    # first row, shifted to each row's time, which costs a few digits (seen: 1e-11).
    series = evaluate_series(compiled, frame)
    for instance in ENGINES:
        stamps = frame.filter(pl.col("instance_id") == instance)["ts"].to_list()
        for at in stamps[10::37]:
            rows = series.filter((pl.col("instance_id") == instance) & (pl.col("window_end") == at))
            want = {k: v for k, v in _prometheus_values(prometheus, at, window).items() if k[0] == instance}
            assert len(want) == len(QUANTITIES) * 2
            _assert_close(_values(rows), want, rel=1e-9)


def _query_range_frame(url: str, start: datetime, end: datetime) -> pl.DataFrame:
    """The quantities of the grid instances from `query_range` at the data's own 15 s step."""
    rows: dict[tuple[str, float], dict[str, float]] = {}
    for q in QUANTITIES:
        data = _get(
            url,
            "/api/v1/query_range",
            query=f'{q}{{instance=~"grid-.*"}}',
            start=f"{start.timestamp():.3f}",
            end=f"{end.timestamp():.3f}",
            step=f"{STEP:g}",
        )
        for result in data["result"]:
            for ts, value in result["values"]:
                rows.setdefault((result["metric"]["instance"], ts), {})[q] = float(value)
    return _frame(
        [
            {"instance_id": i, "ts": datetime.fromtimestamp(ts, UTC), **{q: v.get(q) for q in QUANTITIES}}
            for (i, ts), v in rows.items()
        ],
        engine=False,
    )


async def _from_history(
    tmp_path: Path, grid: dict[str, Series], at: datetime, rules: RuleSet
) -> pl.DataFrame:
    """The rules at `at` on the grid data written to DuckDB and read back as the agent reads it."""
    store = await Store.open(tmp_path / "history.duckdb")
    try:
        records = [
            ScrapeRecord(r["instance_id"], r["ts"], "test", True, 0.0, values={q: r[q] for q in QUANTITIES})
            for r in _rows(grid)
        ]
        await store.write_history(scrape_frame(records), sample_frame(records))
        compiled = compile_rules(rules)
        detector = Detector(store, compiled, FindingTracker.from_rules(compiled))
        return (await detector.evaluate_history(at, GRID_ENGINES)).results
    finally:
        await store.close()


def test_trend_rules_find_the_same_on_history_and_on_query_range(
    prometheus: str, data: tuple[dict[str, Series], dict[str, Series]], tmp_path: Path
) -> None:
    _, grid = data
    rules = RuleSet((*load_rules().rules, *_catch_all("5m").rules))
    compiled = compile_rules(rules)
    for minutes in (8, 25, 30):
        at = T0 + timedelta(minutes=minutes)
        from_history = asyncio.run(_from_history(tmp_path / str(minutes), grid, at, rules))
        frame = _query_range_frame(prometheus, at - compiled.max_window - timedelta(minutes=1), at)
        from_prometheus = evaluate(compiled, frame, at, engines=GRID_ENGINES).results
        # The same findings and text; values to the last bits, since the streaming engine's sums
        # add in an order that depends on thread scheduling.
        assert from_prometheus.drop("value").equals(from_history.drop("value"))
        assert from_prometheus["value"].to_list() == pytest.approx(from_history["value"].to_list(), rel=1e-9)
        if minutes == 30:  # the built-in trend rules hold where the data says so
            found = set(from_history.select("instance_id", "rule").rows())
            assert {("grid-filling", "KVCacheFullSoon"), ("grid-queue", "QueueGrowing")} <= found
            assert not {
                r
                for i, r in found
                if i in ("grid-calm", "grid-noisy") and r in ("KVCacheFullSoon", "QueueGrowing")
            }
