"""The judge's samples from stored history: one value per scrape window, canary against pooled baseline.

Each successful scrape of an instance in the judged window gives one sample per metric: the window's
mean latency, its throughput, its error rate... Baseline instances are pooled (they run the old
settings; pooling them is what a comparison against "the rest of the group" means). The warm-up after
the change - the restart, empty caches - is left out, and so is any window that began inside it (a
sample covers the window that ends at its scrape, so its start must be after the warm-up). Windows the
agent computed over the engine's lifetime (its first scrape after the agent started) are left out too:
they are not comparable with per-interval windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import polars as pl

from perfagent.judge import DEFAULT_METRICS, Array, MetricSpec
from perfagent.store import Store


@dataclass(frozen=True, slots=True)
class CanarySamples:
    canary: dict[str, Array]  # spec name -> samples
    baseline: dict[str, Array]
    since: datetime  # change time + warm-up
    until: datetime


async def _windows(
    store: Store, instance_id: str, since: datetime, until: datetime, fields: list[str]
) -> pl.DataFrame:
    frame = await store.history(instance_id, since, until, fields)
    # DuckDB hands back the session's zone (e.g. Etc/UTC); compare in UTC like the rest of the agent.
    started = pl.col("ts").dt.convert_time_zone("UTC") - pl.duration(
        microseconds=(pl.col("window_seconds") * 1e6).cast(pl.Int64)
    )
    return frame.filter(pl.col("ok") & (pl.col("window_kind") == "since_previous") & (started >= since))


def _values(frames: Sequence[pl.DataFrame], quantity: str) -> Array:
    parts = [f[quantity].drop_nulls().to_numpy().astype(np.float64) for f in frames if f.height]
    values = np.concatenate(parts) if parts else np.empty(0, dtype=np.float64)
    return values[np.isfinite(values)]


async def canary_samples(
    store: Store,
    *,
    canary_id: str | Sequence[str],
    baseline_ids: Sequence[str],
    start: datetime,
    end: datetime,
    warmup: timedelta,
    specs: Sequence[MetricSpec] = DEFAULT_METRICS,
) -> CanarySamples:
    """Samples of every spec's quantity from windows within [start + warmup, end], keyed by spec name.
    Several canary ids (a rollout batch) are pooled like the baseline."""
    canary_ids = [canary_id] if isinstance(canary_id, str) else list(canary_id)
    if set(canary_ids) & set(baseline_ids):
        raise ValueError("the canary cannot be its own baseline")
    since = start + warmup
    fields = sorted({spec.quantity for spec in specs})
    canary = [await _windows(store, c, since, end, fields) for c in canary_ids]
    baseline = [await _windows(store, b, since, end, fields) for b in baseline_ids]
    return CanarySamples(
        canary={spec.name: _values(canary, spec.quantity) for spec in specs},
        baseline={spec.name: _values(baseline, spec.quantity) for spec in specs},
        since=since,
        until=end,
    )
