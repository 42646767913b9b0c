"""Histogram quantiles and window deltas (perfagent.histogram)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perfagent.histogram import Buckets, HistogramData, Quantile, histogram_quantile, merge_by_le
from perfagent.normalize import counter_delta

INF = math.inf

# vllm-v0-llama3.1-8b-fp8-kubeai-EDITED.prom, vllm:time_to_first_token_seconds (9 observations).
FP8_TTFT = Buckets.of(
    [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, INF],
    [0, 0, 0, 0, 1, 6, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9],
)


def test_quantile_matches_hand_calculation() -> None:
    # p50: rank 4.5 lands in (0.04, 0.06] holding observations 2..6, so 0.04 + 0.02 * 3.5/5.
    assert histogram_quantile(0.5, FP8_TTFT).value == pytest.approx(0.054)
    # p90: rank 8.1 lands in (0.06, 0.08] holding 7..9, so 0.06 + 0.02 * 2.1/3.
    assert histogram_quantile(0.9, FP8_TTFT).value == pytest.approx(0.074)
    # q=1 is the upper bound of the bucket that reaches the total.
    assert histogram_quantile(1.0, FP8_TTFT).value == pytest.approx(0.08)


def test_first_bucket_starts_at_zero() -> None:
    b = Buckets.of([1.0, 2.0, INF], [4, 4, 4])
    assert histogram_quantile(0.5, b).value == pytest.approx(0.5)


def test_first_bucket_with_non_positive_bound_answers_the_bound() -> None:
    # SGLang's queue_time histogram starts with le="0.0" (ENGINES.md §3.3).
    b = Buckets.of([0.0, 0.1, INF], [3, 4, 4])
    assert histogram_quantile(0.5, b).value == 0.0


def test_quantile_in_inf_bucket_is_flagged_not_invented() -> None:
    b = Buckets.of([1.0, 10.0, INF], [1, 2, 100])
    q = histogram_quantile(0.99, b)
    assert q == Quantile(None, lower_bound=10.0)
    assert q.above_finite_buckets


@pytest.mark.parametrize(
    "buckets",
    [
        Buckets.of([1.0, INF], [0, 0]),  # zero observations
        Buckets.of([1.0, 2.0], [1, 2]),  # no +Inf bucket
        Buckets.of([INF], [5]),  # nothing finite to interpolate in
        Buckets.of([1.0, INF], [1, math.nan]),
    ],
)
def test_unknown_quantiles_are_none(buckets: Buckets) -> None:
    assert histogram_quantile(0.5, buckets) == Quantile(None)


def test_quantile_outside_unit_interval_rejected() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        FP8_TTFT.quantiles([1.5])


def test_non_monotone_counts_are_fixed_like_prometheus() -> None:
    # A scrape can see a lower bucket after a higher one moved; Prometheus takes the running max.
    b = Buckets.of([1.0, 2.0, 3.0, INF], [2, 1, 4, 4])
    assert histogram_quantile(0.5, b).value == pytest.approx(1.0)


def test_merge_by_le_sums_series_and_formats() -> None:
    # `le="1"` (Rust, TGI) and `le="1.0"` (Python) parse to the same float and merge.
    frame = pl.DataFrame(
        {
            "sid": ["a", "a", "a", "a", "b"],
            "le": [1.0, INF, 1.0, INF, 2.0],
            "value": [1.0, 2.0, 3.0, 5.0, 7.0],
        }
    )
    merged = merge_by_le(frame, key="sid")
    assert merged["a"].bounds.tolist() == [1.0, INF]
    assert merged["a"].counts.tolist() == [4.0, 7.0]
    assert merged["b"].counts.tolist() == [7.0]


def test_delta_and_reset() -> None:
    before = HistogramData(sum=2.0, count=3.0, buckets=Buckets.of([1.0, INF], [2, 3]))
    after = HistogramData(sum=5.0, count=5.0, buckets=Buckets.of([1.0, INF], [2, 5]))
    d = after.delta(before)
    assert (d.sum, d.count) == (3.0, 2.0)
    assert d.buckets is not None
    assert d.buckets.counts.tolist() == [0.0, 2.0]
    assert d.mean() == pytest.approx(1.5)
    restarted = HistogramData(sum=1.0, count=1.0, buckets=Buckets.of([1.0, INF], [1, 1]))
    assert restarted.delta(before) is restarted
    relayout = HistogramData(sum=9.0, count=9.0, buckets=Buckets.of([2.0, INF], [9, 9]))
    assert relayout.delta(before) is relayout


def test_mean_without_observations_is_none() -> None:
    assert HistogramData(sum=0.0, count=0.0, buckets=None).mean() is None
    assert HistogramData(sum=None, count=4.0, buckets=None).mean() is None


# --- properties -------------------------------------------------------------------------------------


@st.composite
def histograms(draw: st.DrawFn) -> Buckets:
    """Random complete histograms: ascending finite bounds (maybe one <= 0) plus +Inf."""
    n = draw(st.integers(min_value=1, max_value=8))
    raw = draw(
        st.lists(
            st.floats(min_value=-5, max_value=1000, allow_nan=False), min_size=n, max_size=n, unique=True
        )
    )
    bounds = sorted(raw)
    per_bucket = draw(st.lists(st.integers(min_value=0, max_value=50), min_size=n + 1, max_size=n + 1))
    return Buckets.of([*bounds, INF], np.cumsum(per_bucket).astype(float))


def _reference(q: float, bounds: list[float], counts: list[float]) -> Quantile:
    """Straight port of Prometheus bucketQuantile (a linear scan), with the +Inf case flagged."""
    total = counts[-1]
    if total <= 0 or len(bounds) < 2:
        return Quantile(None)
    rank = q * total
    b = 0
    while b < len(counts) - 1 and not (counts[b] >= rank if rank > 0 else counts[b] > 0):
        b += 1
    if b == len(counts) - 1:
        return Quantile(None, lower_bound=bounds[-2])
    if b == 0 and bounds[0] <= 0:
        return Quantile(bounds[0])
    start, prev = (bounds[b - 1], counts[b - 1]) if b > 0 else (0.0, 0.0)
    return Quantile(start + (bounds[b] - start) * (rank - prev) / (counts[b] - prev))


QS = st.lists(st.floats(min_value=0, max_value=1, allow_nan=False), min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(histograms(), QS)
def test_quantiles_equal_brute_force_reference(b: Buckets, qs: list[float]) -> None:
    got = b.quantiles(qs)
    for q, g in zip(qs, got, strict=True):
        want = _reference(q, b.bounds.tolist(), b.counts.tolist())
        assert g.lower_bound == want.lower_bound
        if want.value is None:
            assert g.value is None
        else:
            assert g.value == pytest.approx(want.value, rel=1e-9, abs=1e-9)


@settings(max_examples=200, deadline=None)
@given(histograms(), QS)
def test_quantiles_monotone_and_within_their_bucket(b: Buckets, qs: list[float]) -> None:
    qs = sorted(qs)
    got = b.quantiles(qs)
    # Flagged quantiles sit above every finite bound, so compare with the lower bound stand-in.
    as_numbers = [g.value if g.value is not None else g.lower_bound for g in got]
    known = [x for x in as_numbers if x is not None]
    assert all(a <= b + 1e-9 for a, b in itertools.pairwise(known))
    total = b.counts[-1]
    for q, g in zip(qs, got, strict=True):
        if g.value is None:
            continue
        rank = q * total
        i = int(np.searchsorted(b.counts, rank, side="left")) if rank > 0 else int(np.argmax(b.counts > 0))
        lower = b.bounds[i - 1] if i > 0 else min(0.0, b.bounds[0])
        assert lower - 1e-9 <= g.value <= b.bounds[i] + 1e-9


COUNTS = st.floats(min_value=0, max_value=1e12, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(COUNTS, st.one_of(st.none(), COUNTS))
def test_counter_delta_never_negative(current: float, previous: float | None) -> None:
    d = counter_delta(current, previous)
    assert d >= 0.0
    assert d == (current if previous is None or current < previous else current - previous)


@settings(max_examples=200, deadline=None)
@given(histograms(), histograms())
def test_histogram_delta_never_negative(before: Buckets, after: Buckets) -> None:
    prev = HistogramData(sum=float(before.counts[-1]), count=float(before.counts[-1]), buckets=before)
    cur = HistogramData(sum=float(after.counts[-1]), count=float(after.counts[-1]), buckets=after)
    d = cur.delta(prev)
    assert d.count is not None
    assert d.count >= 0
    assert d.sum is not None
    assert d.sum >= 0
    assert d.buckets is not None
    assert (d.buckets.counts >= 0).all()
