"""Prometheus histograms: window deltas of cumulative buckets and quantiles like PromQL histogram_quantile."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import polars as pl

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Quantile:
    """A quantile estimate; `lower_bound` is set instead of `value` when it lands in the +Inf bucket."""

    value: float | None
    # The highest finite bucket bound: the true quantile is above it, by how much nobody knows.
    lower_bound: float | None = None

    @property
    def above_finite_buckets(self) -> bool:
        """True when the rank fell into the +Inf bucket."""
        return self.lower_bound is not None


@dataclass(frozen=True, slots=True, eq=False)
class Buckets:
    """Cumulative counts by ascending upper bound (`le`); a complete histogram ends with +Inf."""

    bounds: FloatArray
    counts: FloatArray

    @classmethod
    def of(cls, bounds: Sequence[float] | FloatArray, counts: Sequence[float] | FloatArray) -> Buckets:
        """Buckets from parallel sequences, sorted by bound."""
        b = np.asarray(bounds, dtype=np.float64)
        c = np.asarray(counts, dtype=np.float64)
        if b.shape != c.shape or b.ndim != 1:
            raise ValueError("bounds and counts must be 1-D and of equal length")
        order = np.argsort(b, kind="stable")
        return cls(bounds=b[order], counts=c[order])

    @property
    def complete(self) -> bool:
        """True when the last bucket is +Inf, without which no quantile is defined."""
        return self.bounds.size > 0 and bool(np.isposinf(self.bounds[-1]))

    def same_layout(self, other: Buckets) -> bool:
        """True when both have the same bucket bounds."""
        return self.bounds.shape == other.bounds.shape and bool(np.array_equal(self.bounds, other.bounds))

    def quantiles(self, qs: Sequence[float]) -> list[Quantile]:
        """Quantiles for every q in `qs` (see `histogram_quantiles`)."""
        return histogram_quantiles(qs, self.bounds, self.counts)


def histogram_quantiles(qs: Sequence[float], bounds: FloatArray, counts: FloatArray) -> list[Quantile]:
    """PromQL histogram_quantile for several q at once, except that the +Inf bucket is flagged, not invented.

    Linear interpolation inside the bucket holding rank q*total; the first bucket starts at 0 when its
    upper bound is positive. Cumulative counts are made monotone first, as Prometheus does. No
    observations, no +Inf bucket, no finite bucket or non-finite counts give None.
    """
    q = np.asarray(qs, dtype=np.float64)
    if q.size and (np.isnan(q).any() or q.min() < 0.0 or q.max() > 1.0):
        raise ValueError(f"quantiles must lie in [0, 1], got {list(qs)}")
    unknown = [Quantile(None)] * q.size
    if bounds.size < 2 or not np.isposinf(bounds[-1]) or not np.isfinite(counts).all():
        return unknown
    cum = np.maximum.accumulate(counts)
    total = float(cum[-1])
    if not total > 0.0:
        return unknown
    rank = q * total
    # First bucket whose cumulative count reaches the rank; for rank 0 the first non-empty bucket.
    idx = np.where(
        rank > 0.0,
        np.searchsorted(cum, rank, side="left"),
        np.searchsorted(cum, 0.0, side="right"),
    )
    idx = np.minimum(idx, bounds.size - 1)
    upper = bounds[idx]
    prev_count = np.where(idx > 0, cum[idx - 1], 0.0)
    lower = np.where(idx > 0, bounds[idx - 1], 0.0)
    in_bucket = cum[idx] - prev_count
    with np.errstate(divide="ignore", invalid="ignore"):
        value = lower + (upper - lower) * (rank - prev_count) / in_bucket
    # A first bucket with a non-positive bound has no known lower edge: Prometheus answers the bound.
    value = np.where((idx == 0) & (upper <= 0.0), upper, value)
    last_finite = float(bounds[-2])
    out: list[Quantile] = []
    for i, v in zip(idx.tolist(), value.tolist(), strict=True):
        if i == bounds.size - 1:
            out.append(Quantile(None, lower_bound=last_finite))
        else:
            out.append(Quantile(v if math.isfinite(v) else None))
    return out


def histogram_quantile(q: float, buckets: Buckets) -> Quantile:
    """One quantile of `buckets`."""
    return histogram_quantiles([q], buckets.bounds, buckets.counts)[0]


def merge_by_le(frame: pl.DataFrame, *, key: str, le: str = "le", value: str = "value") -> dict[str, Buckets]:
    """Sum bucket counts with the same `le` across series, per `key` (PromQL `sum by (le)`)."""
    merged = frame.group_by([key, le]).agg(pl.col(value).sum()).sort([key, le])
    out: dict[str, Buckets] = {}
    for part in merged.partition_by(key, maintain_order=True):
        name = part[key][0]
        out[str(name)] = Buckets(
            bounds=part[le].to_numpy().astype(np.float64), counts=part[value].to_numpy().astype(np.float64)
        )
    return out


@dataclass(frozen=True, slots=True, eq=False)
class HistogramData:
    """One aggregated histogram at one scrape, or the delta between two scrapes."""

    sum: float | None
    count: float | None
    buckets: Buckets | None

    @property
    def observations(self) -> float | None:
        """Number of observations: `_count`, else the +Inf bucket."""
        if self.count is not None:
            return self.count
        if self.buckets is not None and self.buckets.complete:
            return float(self.buckets.counts[-1])
        return None

    def mean(self) -> float | None:
        """`_sum / _count`; None without observations."""
        n = self.observations
        if self.sum is None or n is None or not n > 0.0:
            return None
        m = self.sum / n
        return m if math.isfinite(m) else None

    def quantiles(self, qs: Sequence[float]) -> list[Quantile]:
        """Quantiles from the buckets; None without buckets."""
        if self.buckets is None:
            return [Quantile(None)] * len(qs)
        return self.buckets.quantiles(qs)

    def is_reset_since(self, previous: HistogramData) -> bool:
        """True when any cumulative value went down or the bucket layout changed (a restart)."""
        if _decreased(self.count, previous.count) or _decreased(self.sum, previous.sum):
            return True
        if (self.buckets is None) != (previous.buckets is None):
            return True
        if self.buckets is not None and previous.buckets is not None:
            if not self.buckets.same_layout(previous.buckets):
                return True
            return bool((self.buckets.counts < previous.buckets.counts).any())
        return False

    def delta(self, previous: HistogramData | None) -> HistogramData:
        """Observations since `previous`; after a reset (or with no previous) the current values."""
        if previous is None or self.is_reset_since(previous):
            return self
        buckets = None
        if self.buckets is not None and previous.buckets is not None:
            buckets = Buckets(
                bounds=self.buckets.bounds, counts=self.buckets.counts - previous.buckets.counts
            )
        return HistogramData(
            sum=_minus(self.sum, previous.sum), count=_minus(self.count, previous.count), buckets=buckets
        )


def _decreased(current: float | None, previous: float | None) -> bool:
    return current is not None and previous is not None and current < previous


def _minus(current: float | None, previous: float | None) -> float | None:
    if current is None:
        return None
    return current if previous is None else current - previous
