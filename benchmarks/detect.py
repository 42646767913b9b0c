"""Detection benchmark: every built-in rule over a fleet's last hour, vectorized vs a per-instance loop.

Builds N instances (default 10,000) × 1 hour of 15-second samples (240 points each) of random but
plausible numbers — most instances healthy, some idle, some in trouble, TGI without the quantities
it does not export, a few failed scrapes — then times one `evaluate()` at the final timestamp
(look-back windows included) against a plain-Python per-instance loop on the same data in the same
run: `evaluate_reference()` (the rules' meaning, one instance at a time) plus turning its findings
into the same rows `evaluate()` returns (rule constants, rendered summary and description, reasons
for missing data), over every instance.

The vectorized side gets what `Detector` passes it: the rows `Store.recent_scrapes` returns for the
rules' widest window (its own query, run by DuckDB over the hour: by instance, then time; no engine
column), the engines per instance, and a thread pool kept for every evaluation (one thread per CPU); the loop gets the same rows as each instance's Python tuples,
as a per-instance agent would keep them (building those is timed separately, not counted).

    .venv/bin/python benchmarks/detect.py [--instances N] [--runs N] [--no-trends]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import numpy as np
import polars as pl

from perfagent.detect import (
    DEFAULT_LOOKBACK,
    Evaluation,
    Sample,
    compile_rules,
    default_workers,
    evaluate,
    evaluate_reference,
    value_unit,
)
from perfagent.rules import (
    LoadedRule,
    Reduce,
    RuleSet,
    TemplatePart,
    format_duration,
    load_rules,
    parse_template,
)
from perfagent.store import read_recent_scrapes

POINTS = 240
STEP = timedelta(seconds=15)
START = datetime(2025, 1, 1, tzinfo=UTC)
GOAL_SECONDS = 0.5
GOAL_SPEEDUP = 50.0


def _fleet(n: int, seed: int) -> pl.DataFrame:
    """n instances × POINTS samples; per instance a regime (healthy, idle, trouble) and an engine."""
    rng = np.random.default_rng(seed)
    rows = n * POINTS
    # Time-major, as the store appends them: every scrape round, one row per instance.
    inst = np.tile(np.arange(n), POINTS)
    step = np.repeat(np.arange(POINTS), n)
    engines = rng.choice(np.array(["vllm", "tgi", "sglang"]), size=n, p=[0.5, 0.25, 0.25])
    # 0 healthy (80%), 1 idle (10%), 2 in trouble (10%); trouble starts somewhere in the hour.
    regime = rng.choice(3, size=n, p=[0.80, 0.10, 0.10])[inst]
    onset = rng.integers(0, POINTS, size=n)[inst]
    trouble = (regime == 2) & (step >= onset)
    idle = regime == 1

    def noise(low: float, high: float) -> np.ndarray[Any, np.dtype[np.float64]]:
        return rng.uniform(low, high, rows)

    running = np.where(idle, 0.0, np.round(noise(4, 48)))
    waiting = np.where(trouble, np.round(noise(4, 60)), np.round(np.clip(noise(-3, 2), 0, None)))
    waiting = np.where(idle, 0.0, waiting)
    kv = np.where(trouble, noise(0.82, 0.99), noise(0.2, 0.75))
    kv = np.where(idle, noise(0.0, 0.01), kv)
    preempt = np.where(trouble & (rng.random(rows) < 0.6), noise(0.01, 2.0), 0.0)
    gen_tps = np.where(trouble, noise(2, 80), noise(300, 3000))
    gen_tps = np.where(idle, 0.0, gen_tps)
    prompt_tps = np.where(idle, 0.0, noise(50, 5000))
    hit = np.where(trouble & (rng.random(rows) < 0.5), noise(0.0, 0.15), noise(0.25, 0.9))
    ttft = np.where(trouble, noise(1.5, 12), noise(0.08, 1.2))
    itl = np.where(trouble, noise(0.1, 0.9), noise(0.01, 0.12))
    latency_null = idle
    columns: dict[str, np.ndarray[Any, np.dtype[np.float64]]] = {
        "requests_running": running,
        "requests_waiting": waiting,
        "kv_cache_usage": kv,
        "preemption_rate": preempt,
        "generation_tokens_per_second": gen_tps,
        "prompt_tokens_per_second": prompt_tps,
        "prefix_cache_hit_rate": np.where(idle, np.nan, hit),
        "ttft_seconds": np.where(latency_null, np.nan, ttft * 0.4),
        "ttft_seconds_p90": np.where(latency_null, np.nan, ttft * 0.8),
        "ttft_seconds_p99": np.where(latency_null, np.nan, ttft),
        "itl_seconds": np.where(latency_null, np.nan, itl * 0.5),
        "itl_seconds_p99": np.where(latency_null, np.nan, itl),
        "e2e_latency_seconds": np.where(latency_null, np.nan, ttft + itl * 200),
        "queue_time_seconds": np.where(latency_null, np.nan, waiting * 0.2),
        "gpu_utilization": np.where(idle, 0.0, noise(0.3, 1.0)),
    }
    # TGI exports no KV usage, preemptions or prefix-cache hits (ENGINES.md §5).
    tgi = engines[inst] == "tgi"
    for name in ("kv_cache_usage", "preemption_rate", "prefix_cache_hit_rate"):
        columns[name] = np.where(tgi, np.nan, columns[name])
    # Each instance is scraped at its own offset in the interval, give or take the fetch time, as
    # the poller stamps each scrape when its fetch ends: a round's order differs from round to round.
    step_us = int(STEP.total_seconds() * 1e6)
    offset = rng.integers(0, step_us - 1_000_000, size=n)[inst] + rng.integers(0, 500_000, size=rows)
    ts = np.datetime64(START.replace(tzinfo=None), "us") + (step * step_us + offset).astype("m8[us]")
    ok = rng.random(rows) >= 0.01  # failed scrapes: the store keeps no row for them
    frame = pl.DataFrame(
        {
            "instance_id": np.char.add("inst-", np.char.zfill(inst.astype(str), 5))[ok],
            "engine": engines[inst][ok],
            "ts": ts[ok],
            **{k: v[ok] for k, v in columns.items()},
        }
    )
    # In time order, as the store's table is appended to.
    return frame.with_columns(pl.col("ts").dt.replace_time_zone("UTC")).fill_nan(None).sort("ts")


def _store_window(hour: pl.DataFrame, since: datetime, until: datetime) -> pl.DataFrame:
    """The rows `Store.recent_scrapes(since, until)` returns: its very query (`read_recent_scrapes`),
    run by DuckDB over the hour's rows as the `scrapes` table (every row a successful scrape)."""
    with duckdb.connect() as db:
        db.register("scrapes", hour.with_columns(ok=pl.lit(True)))
        quantities = [c for c in hour.columns if c not in ("instance_id", "ts")]
        frame = read_recent_scrapes(db, since, until, quantities)
    missing = set(quantities) - set(frame.columns)
    assert not missing, f"not store columns: {missing}"
    return frame


def _as_python(frame: pl.DataFrame) -> dict[str, tuple[str, list[Sample]]]:
    """The frame as a per-instance loop would hold it: samples sorted by time, a dict per sample."""
    quantities = [c for c in frame.columns if c not in ("instance_id", "engine", "ts")]
    frame = frame.sort("instance_id", "ts")
    ids, engines, stamps = (frame[c].to_list() for c in ("instance_id", "engine", "ts"))
    values = [dict(zip(quantities, row, strict=True)) for row in frame.select(quantities).iter_rows()]
    out: dict[str, tuple[str, list[Sample]]] = {}
    for i, instance_id in enumerate(ids):
        out.setdefault(instance_id, (engines[i], []))[1].append((stamps[i], values[i]))
    return out


def _py_number(value: float, spec: str) -> str:
    """`detect._number` in plain Python: 4 significant digits, `.Nf`, or `.N%`."""
    if not spec:
        text = repr(float(f"{value:.4g}"))
        return text.removesuffix(".0")
    digits = int(spec[1])
    return f"{value * 100:.{digits}f}%" if spec.endswith("%") else f"{value:.{digits}f}"


class _LoopRule:
    """What the loop needs of a rule besides its condition: its constant columns and templates."""

    def __init__(self, lr: LoadedRule) -> None:
        rule = lr.rule
        window = rule.over or DEFAULT_LOOKBACK
        unit = value_unit(rule)
        ahead = rule.ahead_of()
        self.window = window
        self.fields = {
            "unit": unit,
            "quantity": rule.quantity,
            "rule": rule.name,
            "type": rule.type.value,
            "window": format_duration(window),
            "ahead": format_duration(ahead) if ahead is not None else "",
        }
        self.constants = {
            "rule": rule.name,
            "type": rule.type.value,
            "quantity": rule.quantity,
            "unit": unit,
            "op": rule.op.value,
            "recommendation": rule.recommendation,
            "labels": json.dumps(rule.labels, sort_keys=True),
        }
        self.summary = parse_template(rule.annotations.summary)
        self.description = parse_template(rule.annotations.description)
        trends = {q for q, how in self._reads(lr) if how.trend}
        self.no_sample = {
            q: f"{'fewer than 2 samples' if q in trends else 'no sample'} of '{q}' in the "
            f"{format_duration(window)} window"
            for q, _ in self._reads(lr)
        }

    @staticmethod
    def _reads(lr: LoadedRule) -> list[tuple[str, Reduce]]:
        rule = lr.rule
        return [(rule.quantity, rule.reduce), *((c.quantity, c.reduce or rule.reduce) for c in rule.and_)]


def _render(parts: Sequence[TemplatePart], fields: Mapping[str, str], value: float, threshold: float) -> str:
    out = []
    for part in parts:
        out.append(part.literal)
        if part.field == "value":
            out.append(_py_number(value, part.spec))
        elif part.field == "threshold":
            out.append(_py_number(threshold, part.spec))
        elif part.field is not None:
            out.append(fields[part.field])
    return "".join(out)


def _loop(
    ruleset: RuleSet,
    prepared: Mapping[str, _LoopRule],
    instances: Mapping[str, tuple[str, list[Sample]]],
    at: datetime,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The per-instance loop, producing what `evaluate()` produces: full result rows with text, and
    insufficient-data rows with their reason."""
    findings, missing = evaluate_reference(ruleset, instances, at)
    results = []
    for f in findings:
        r = prepared[f.rule]
        engine = instances[f.instance_id][0]
        fields = {**r.fields, "instance": f.instance_id, "engine": engine, "severity": f.severity.value}
        results.append(
            {
                "instance_id": f.instance_id,
                "engine": engine,
                **r.constants,
                "severity": f.severity.value,
                "value": f.value,
                "threshold": f.threshold,
                "window_start": at - r.window,
                "window_end": at,
                "summary": _render(r.summary, fields, f.value, f.threshold),
                "description": _render(r.description, fields, f.value, f.threshold),
            }
        )
    insufficient = [
        {
            "instance_id": instance_id,
            "engine": instances[instance_id][0],
            "rule": rule,
            "quantity": quantity,
            "reason": prepared[rule].no_sample[quantity],
        }
        for instance_id, rule, quantity in sorted(missing)
    ]
    return results, insufficient


def _seconds(run: Callable[[], object]) -> float:
    t = time.perf_counter()
    run()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of vectorized runs and one loop")
    parser.add_argument("--runs", type=int, default=6, help="vectorized runs per round")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-trends", action="store_true", help="leave out the rules that read a trend")
    args = parser.parse_args(argv)

    print("perfagent detection benchmark")
    print(f"  Python {platform.python_version()}, Polars {pl.__version__}, {os.cpu_count()} CPU(s)")
    t = time.perf_counter()
    fleet = _fleet(args.instances, args.seed)
    at = fleet["ts"].max()
    assert isinstance(at, datetime)
    print(
        f"  data: {args.instances:,} instances × {POINTS} samples every {STEP.seconds}s (1 h) = "
        f"{fleet.height:,} rows, {fleet.width - 3} quantity columns (built in {time.perf_counter() - t:.1f}s)"
    )
    ruleset = load_rules()
    if args.no_trends:
        plain = (lr for lr in ruleset if not any(how.trend for _, how in _LoopRule._reads(lr)))
        ruleset = RuleSet(tuple(plain))
    t = time.perf_counter()
    compiled = compile_rules(ruleset)
    compile_s = time.perf_counter() - t
    print(
        f"  rules: {len(ruleset)} built-in{' (trends left out)' if args.no_trends else ''}, longest window {compiled.max_window}, compiled once in "
        f"{compile_s * 1000:.1f} ms"
    )

    # What `Detector` hands evaluate(): the rows `Store.recent_scrapes` returns for the rules' widest
    # window (its SQL, run by DuckDB over the hour: by instance, then time; no engine column), and
    # the engines per instance. Reading them is not timed, on either side.
    engines = dict(fleet.select("instance_id", "engine").unique().iter_rows())
    stored = _store_window(fleet.drop("engine"), at - compiled.max_window, at)

    # The loop holds what a per-instance agent would keep: each instance's samples of the rules'
    # widest window, as Python tuples (building them is not counted).
    t = time.perf_counter()
    with_engine = stored.join(
        fleet.select("instance_id", "engine").unique(), on="instance_id", maintain_order="left"
    )
    python_data = _as_python(with_engine)
    convert_s = time.perf_counter() - t
    # Its ~200,000 sample dicts are long-lived: out of the garbage collector's sweeps, which would
    # otherwise charge both sides for walking them.
    gc.freeze()
    prepared = {lr.name: _LoopRule(lr) for lr in ruleset}
    rows, missing = _loop(ruleset, prepared, python_data, at)

    pool = ThreadPoolExecutor(default_workers(), thread_name_prefix="perfagent-detect")  # as the app's

    def vectorized() -> Evaluation:
        return evaluate(compiled, stored, at, engines=engines, pool=pool)

    # Interleaved rounds, each `--runs` vectorized evaluations then one loop: a shared machine's
    # slow and fast spells then fall on both sides alike, rather than on whichever ran during one.
    result = vectorized()  # warm-up: first-use allocations
    vector_times: list[float] = []
    round_ratios: list[float] = []
    loop_times: list[float] = []
    for _ in range(args.rounds):
        times = [_seconds(vectorized) for _ in range(args.runs)]
        loop_times.append(_seconds(lambda: _loop(ruleset, prepared, python_data, at)))
        vector_times += times
        round_ratios.append(loop_times[-1] / min(times))
    best, median, loop_s = min(vector_times), statistics.median(vector_times), min(loop_times)
    per_type = result.results.group_by("type").len().sort("type").rows()
    print(
        f"  vectorized evaluate() at the final timestamp over the store's window ({stored.height:,} rows"
        f" by instance and time) and engines per instance:"
        f" best {best:.3f} s, median {median:.3f} s over {len(vector_times)} runs"
    )
    print(
        f"    {result.results.height:,} findings holding "
        f"({', '.join(f'{k} {v:,}' for k, v in per_type)}), "
        f"{result.insufficient.height:,} insufficient-data rows"
    )
    print(
        f"  the per-instance pure-Python loop over the same data, every instance: best {loop_s:.2f} s, "
        f"median {statistics.median(loop_times):.2f} s over {len(loop_times)} runs, one after each "
        f"{args.runs} vectorized runs"
    )
    bare_s = _seconds(lambda: evaluate_reference(ruleset, python_data, at))
    print(
        f"    of which evaluate_reference (the rules' conditions, binary search to each window): {bare_s:.2f} s"
    )
    print(
        f"    (building the loop's per-instance Python samples from the frame, not counted: {convert_s:.2f} s)"
    )

    def timed(run: Callable[[], Evaluation]) -> tuple[float, float, Evaluation]:
        out = run()  # warm-up
        times = [_seconds(run) for _ in range(args.runs)]
        return min(times), statistics.median(times), out

    best_e, median_e, _ = timed(lambda: evaluate(compiled, with_engine, at, pool=pool))
    print(
        f"  the same with an engine column on every row instead: best {best_e:.3f} s, median {median_e:.3f} s"
    )
    hour = fleet.drop("engine")
    best_h, median_h, hourly = timed(lambda: evaluate(compiled, hour, at, engines=engines, pool=pool))
    print(
        f"  the whole hour in time order ({hour.height:,} rows; the window cut by binary search, its"
        f" rows sorted by instance once): best {best_h:.3f} s, median {median_h:.3f} s"
    )

    # Same findings, severities, text and missing data; values to 1e-12 (the vectorized sums add in
    # another order).
    got = {(r["instance_id"], r["rule"]): r for r in result.results.iter_rows(named=True)}
    want = {(r["instance_id"], r["rule"]): r for r in rows}
    same_rows = got.keys() == want.keys() and all(
        math.isclose(got[k].pop("value"), want[k].pop("value"), rel_tol=1e-12) and got[k] == want[k]
        for k in got
    )
    agree = (
        same_rows
        and set(result.insufficient.rows()) == {tuple(r.values()) for r in missing}
        and hourly.results.equals(result.results)
        and hourly.insufficient.equals(result.insufficient)
    )
    print(f"  vectorized and loop agree (every column): {'yes' if agree else 'NO'}")

    speedup = loop_s / best
    print(
        f"  speed-up of the best vectorized run over the best loop: {speedup:.0f}x "
        f"({(loop_s + convert_s) / best:.0f}x counting the loop's conversion of the frame); "
        f"per round, loop / best vectorized: {', '.join(f'{r:.0f}x' for r in round_ratios)}"
    )
    fast = "met" if best < GOAL_SECONDS else "NOT met"
    ratio = "met" if speedup >= GOAL_SPEEDUP else "NOT met"
    note = (
        ""
        if args.instances == 10_000
        else f"; the goal is for 10,000 instances, this run has {args.instances:,}"
    )
    print(
        f"  goal: < {GOAL_SECONDS} s {fast} ({best:.3f} s); >= {GOAL_SPEEDUP:.0f}x the loop {ratio} "
        f"({speedup:.0f}x){note}"
    )
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
