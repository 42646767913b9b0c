"""Accumulators behind the simulated exposition: weighted histograms, counters and smoothed rates.

Counts are kept as floats because the fluid model produces fractional event counts within a tick
(e.g. 3.7 decode steps); the renderers print ``floor`` of the cumulative counts, which stays
monotonic in time and across buckets, and keeps ``+Inf`` equal to ``_count``.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]


class Hist:
    """A Prometheus-style histogram: ``le`` buckets (value <= bound), plus ``+Inf``, sum and count."""

    __slots__ = ("_bounds_list", "bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds_list = [float(b) for b in bounds]
        self.bounds = np.asarray(self._bounds_list, dtype=np.float64)
        self.counts = np.zeros(len(self._bounds_list) + 1, dtype=np.float64)  # last slot is +Inf only
        self.sum = 0.0

    def observe(self, values: FloatArray, weights: FloatArray | None = None) -> None:
        """Observe many values at once (``weights``: how many observations each value stands for)."""
        if values.size == 0:
            return
        idx = np.searchsorted(self.bounds, values, side="left")
        self.counts += np.bincount(idx, weights=weights, minlength=self.counts.size)
        self.sum += float(values.sum()) if weights is None else float(values @ weights)

    def observe_one(self, value: float, weight: float = 1.0) -> None:
        if weight <= 0.0:
            return
        self.counts[bisect_left(self._bounds_list, value)] += weight
        self.sum += value * weight

    @property
    def count(self) -> float:
        return float(self.counts.sum())

    def cumulative(self) -> list[float]:
        """Cumulative bucket counts (floored), one per bound and a final ``+Inf``."""
        return [float(math.floor(c + 1e-9)) for c in np.cumsum(self.counts)]

    @property
    def upper_bounds(self) -> list[float]:
        return list(self._bounds_list)


def hists(layout: Mapping[str, Sequence[float]]) -> dict[str, Hist]:
    return {name: Hist(bounds) for name, bounds in layout.items()}


@dataclass
class Counters:
    """Monotonic totals since the (simulated) process started. Engine renderers pick what they need."""

    arrived: float = 0.0  # every request that reached the server (incl. rejected)
    rejected_overloaded: float = 0.0  # TGI: over max_concurrent_requests
    rejected_validation: float = 0.0  # TGI: prompt longer than max_input_tokens
    finished: float = 0.0
    finished_stop: float = 0.0
    finished_length: float = 0.0
    prompt_tokens: float = 0.0  # prompt tokens of requests that produced their first token
    prompt_tokens_done: float = 0.0  # prompt tokens of finished requests (SGLang counts at finish)
    generation_tokens: float = 0.0
    generation_tokens_done: float = 0.0  # output tokens of finished requests
    cached_tokens_done: float = 0.0  # prefix-cache hits of finished requests
    prefix_queries: float = 0.0  # prompt tokens looked up in the prefix cache
    prefix_hits: float = 0.0
    local_compute_tokens: float = 0.0
    preemptions: float = 0.0
    preempted_input_tokens: float = 0.0
    preempted_output_tokens: float = 0.0
    prefill_steps: float = 0.0  # forward passes carrying prefill work (TGI: prefill calls)
    decode_steps: float = 0.0
    new_batches: float = 0.0  # TGI: batches taken from the queue
    concats: float = 0.0  # TGI: new batches concatenated onto a running one
    flops: float = 0.0
    read_bytes: float = 0.0
    write_bytes: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Ewma:
    """Exponentially smoothed value with a time constant, for 'recent' gauges (throughput, hit rate)."""

    __slots__ = ("_alpha", "_dt", "tau", "value")

    def __init__(self, tau: float) -> None:
        self.tau = tau
        self.value = 0.0
        self._dt = self._alpha = 0.0

    def update(self, sample: float, dt: float) -> None:
        if dt != self._dt:
            self._dt, self._alpha = dt, 1.0 - math.exp(-dt / tau) if (tau := self.tau) else 1.0
        self.value += self._alpha * (sample - self.value)
