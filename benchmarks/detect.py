"""Detection benchmark: every built-in rule over a fleet's last hour, vectorized vs a per-instance loop.

Builds N instances (default 10,000) × 1 hour of 15-second samples (240 points each) of random but
plausible numbers — most instances healthy, some idle, some in trouble, TGI without the quantities
it does not export, a few failed scrapes — then times one `evaluate()` at the final timestamp
(look-back windows included) against `evaluate_reference()`, the plain-Python per-instance loop, on
the same data in the same run. The loop runs on a sample of instances and is extrapolated linearly.

    .venv/bin/python benchmarks/detect.py [--instances N] [--sample N] [--runs N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import polars as pl

from perfagent.detect import DEFAULT_LOOKBACK, Evaluation, Sample, compile_rules, evaluate, evaluate_reference
from perfagent.rules import Reduce, RuleSet, load_rules

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
    failed = rng.random(rows) < 0.01  # failed scrapes: a row of nulls
    ts = np.datetime64(START.replace(tzinfo=None), "us") + step * np.timedelta64(
        int(STEP.total_seconds() * 1e6), "us"
    )
    frame = pl.DataFrame(
        {
            "instance_id": np.char.add("inst-", np.char.zfill(inst.astype(str), 5)),
            "engine": engines[inst],
            "ts": ts,
            **{k: np.where(failed, np.nan, v) for k, v in columns.items()},
        }
    )
    return frame.with_columns(pl.col("ts").dt.replace_time_zone("UTC")).fill_nan(None)


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


def _scan_loop(
    ruleset: RuleSet, instances: Mapping[str, tuple[str, list[Sample]]], at: datetime
) -> list[tuple[str, str, str]]:
    """The straightforward loop: each rule scans its instance's samples for its window (no bisect)."""
    found: list[tuple[str, str, str]] = []
    for instance_id, (engine, samples) in instances.items():
        for lr in ruleset:
            rule = lr.rule
            if rule.engines and engine not in rule.engines:
                continue
            start = at - (rule.over or DEFAULT_LOOKBACK)
            window = [values for ts, values in samples if start < ts <= at]

            def reduced(
                quantity: str, how: Reduce, window: list[Mapping[str, float | None]] = window
            ) -> float | None:
                known = [v for s in window if (v := s.get(quantity)) is not None]
                if not known:
                    return None
                if how is Reduce.MEAN:
                    return sum(known) / len(known)
                return max(known) if how is Reduce.MAX else min(known) if how is Reduce.MIN else known[-1]

            value = reduced(rule.quantity, rule.reduce)
            if value is None:
                continue
            ladder = rule.ladder()
            ok = rule.op.holds(value, ladder[-1][1])
            for c in rule.and_:
                v = reduced(c.quantity, c.reduce or rule.reduce)
                ok = ok and v is not None and c.op.holds(v, c.value)
            if ok:
                severity = next(s for s, t in ladder if rule.op.holds(value, t))
                found.append((instance_id, rule.name, severity.value))
    return found


def _seconds(run: Callable[[], object]) -> float:
    t = time.perf_counter()
    run()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--sample", type=int, default=1_000, help="instances the Python loop runs on")
    parser.add_argument("--runs", type=int, default=5, help="timed runs of the vectorized evaluation")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)

    print("perfagent detection benchmark")
    print(f"  Python {platform.python_version()}, Polars {pl.__version__}, {os.cpu_count()} CPU(s)")
    t = time.perf_counter()
    frame = _fleet(args.instances, args.seed)
    at = frame["ts"].max()
    assert isinstance(at, datetime)
    print(
        f"  data: {args.instances:,} instances × {POINTS} samples every {STEP.seconds}s (1 h) = "
        f"{frame.height:,} rows, {frame.width - 3} quantity columns (built in {time.perf_counter() - t:.1f}s)"
    )
    ruleset = load_rules()
    t = time.perf_counter()
    compiled = compile_rules(ruleset)
    compile_s = time.perf_counter() - t
    print(
        f"  rules: {len(ruleset)} built-in, longest window {compiled.max_window}, compiled once in "
        f"{compile_s * 1000:.1f} ms"
    )

    def timed(data: pl.DataFrame) -> tuple[float, float, Evaluation]:
        evaluate(compiled, data, at)  # warm-up: thread pool, first-use allocations
        times = []
        for _ in range(args.runs):
            t = time.perf_counter()
            result = evaluate(compiled, data, at)
            times.append(time.perf_counter() - t)
        return min(times), statistics.median(times), result

    best, median, result = timed(frame)
    per_type = result.results.group_by("type").len().sort("type").rows()
    print(
        f"  vectorized evaluate() at the final timestamp, frame in time order (as scrapes are appended):"
        f" best {best:.3f} s, median {median:.3f} s over {args.runs} runs"
    )
    print(
        f"    {result.results.height:,} findings holding "
        f"({', '.join(f'{k} {v:,}' for k, v in per_type)}), "
        f"{result.insufficient.height:,} insufficient-data rows"
    )
    by_instance = frame.sort("instance_id", "ts")
    best_i, median_i, _ = timed(by_instance)
    print(
        f"  the same frame sorted by instance (a filter instead of a binary search for the window):"
        f" best {best_i:.3f} s, median {median_i:.3f} s"
    )

    sample_n = min(args.sample, args.instances)
    scale = args.instances / sample_n
    ids = frame["instance_id"].unique().sort().head(sample_n)
    t = time.perf_counter()
    python_data = _as_python(frame.filter(pl.col("instance_id").is_in(ids.implode())))
    convert_s = (time.perf_counter() - t) * scale
    findings, insufficient = evaluate_reference(ruleset, python_data, at)
    scanned = _scan_loop(ruleset, python_data, at)
    # Best of three, as the vectorized runs are best of --runs.
    bisect_s = min(_seconds(lambda: evaluate_reference(ruleset, python_data, at)) for _ in range(3)) * scale
    scan_s = min(_seconds(lambda: _scan_loop(ruleset, python_data, at)) for _ in range(3)) * scale
    sampled = "" if scale == 1 else f", on a sample of {sample_n:,} instances extrapolated ×{scale:g}"
    print(f"  per-instance pure-Python loops over the same data{sampled}, best of 3:")
    print(f"    evaluate_reference (bisect to each window): {bisect_s:.2f} s")
    print(f"    a straightforward scan of each instance's samples per rule: {scan_s:.2f} s")
    print(
        f"    (turning the frame into per-instance Python rows first, not counted above: {convert_s:.2f} s)"
    )

    # Everything must agree on the sample: same findings, same severities, same missing data.
    mine = result.results.filter(pl.col("instance_id").is_in(ids.implode()))
    got = {(r["instance_id"], r["rule"], r["severity"]) for r in mine.iter_rows(named=True)}
    want = {(f.instance_id, f.rule, f.severity.value) for f in findings}
    got_missing = {
        (r["instance_id"], r["rule"], r["quantity"])
        for r in result.insufficient.filter(pl.col("instance_id").is_in(ids.implode())).iter_rows(named=True)
    }
    agree = got == want == set(scanned) and got_missing == insufficient
    print(f"  vectorized and both loops agree on the sample: {'yes' if agree else 'NO'}")

    loop_s = min(bisect_s, scan_s)  # the faster loop is the baseline
    speedup, speedup_fed = loop_s / best, (loop_s + convert_s) / best
    print(
        f"  speed-up of the best vectorized run over the faster loop: {speedup:.0f}x "
        f"({speedup_fed:.0f}x counting the loop's conversion of the frame)"
    )
    fast = "met" if best < GOAL_SECONDS else "NOT met"
    ratio = "met" if speedup >= GOAL_SPEEDUP else "NOT met"
    note = (
        ""
        if args.instances == 10_000
        else f"; the goal is for 10,000 instances, this run has {args.instances:,}"
    )
    print(
        f"  goal: < {GOAL_SECONDS} s {fast} ({best:.3f} s); >= {GOAL_SPEEDUP:.0f}x the loop alone {ratio} "
        f"({speedup:.0f}x){note}"
    )
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
