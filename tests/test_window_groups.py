"""The layouts `WindowGroups` recognizes, and its per-instance reductions over shorter windows.

That each layout gives the rules' reference results is `test_detect`'s property test; this checks
that each layout takes the path meant for it (a frame the store returns is never sorted again),
and the reductions themselves against plain Python, windows without rows included."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from perfagent.window_groups import WindowGroups

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
STEP = timedelta(seconds=15)
US = timedelta(microseconds=1)


def last_ts(df: pl.DataFrame) -> datetime:
    at = df["ts"].max()
    assert isinstance(at, datetime)
    return at


def fleet(instances: int, rounds: int, *, jitter: bool) -> pl.DataFrame:
    """Time-major rounds; with jitter each instance is scraped at its own offset, so a round's
    order is by scrape time, not the same every round."""
    rng = np.random.default_rng(3)
    rows = []
    for r in range(rounds):
        offsets = rng.uniform(0, 14, instances) if jitter else np.arange(instances) * 0.01
        for i in range(instances):
            ts = T0 + r * STEP + timedelta(seconds=float(offsets[i]))
            rows.append({"instance_id": f"i{i}", "ts": ts, "q": float(r * 10 + i)})
    schema = {"instance_id": pl.String(), "ts": pl.Datetime("us", "UTC"), "q": pl.Float64()}
    return pl.DataFrame(rows, schema=schema).sort("ts")


def test_aligned_rounds_are_reduced_as_a_grid() -> None:
    df = fleet(5, 8, jitter=False)
    groups = WindowGroups(df, last_ts(df), timedelta(hours=1))
    assert groups.layout == "rounds" and groups.source is None and groups.k == 5


def test_the_store_order_is_read_as_segments_without_a_sort() -> None:
    df = fleet(5, 8, jitter=True).sort("instance_id", "ts")  # Store.recent_scrapes' order
    groups = WindowGroups(df, last_ts(df), timedelta(hours=1))
    assert groups.layout == "segments" and groups.first.tolist() == [0, 8, 16, 24, 32]


def test_jittered_time_order_is_sorted_once() -> None:
    df = fleet(5, 8, jitter=True)
    groups = WindowGroups(df, last_ts(df), timedelta(hours=1))
    assert groups.layout == "sorted" and groups.k == 5


def test_an_instance_in_two_places_is_not_a_segment() -> None:
    df = fleet(3, 4, jitter=False).sort("instance_id", "ts")
    moved = pl.concat([df.slice(2), df.slice(0, 2)])  # i0's rows at both ends
    groups = WindowGroups(moved, last_ts(df), timedelta(hours=1))
    assert groups.layout == "sorted" and groups.k == 3


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=5),
    window_s=st.integers(1, 200),
    after_s=st.integers(0, 120),
    by_instance=st.booleans(),
)
def test_reductions_over_a_window_equal_plain_python(
    sizes: list[int], window_s: int, after_s: int, by_instance: bool
) -> None:
    """Sum, count, max and latest over `(at - window, at]` per instance, for rows by instance
    (segments) or in time order; instances whose window holds no row get the identity."""
    rows: list[dict[str, Any]] = []
    for i, size in enumerate(sizes):
        for r in range(size):
            ts = T0 + r * STEP + timedelta(seconds=i)
            rows.append({"instance_id": f"i{i}", "ts": ts, "q": float(i * 100 + r)})
    schema = {"instance_id": pl.String(), "ts": pl.Datetime("us", "UTC"), "q": pl.Float64()}
    df = pl.DataFrame(rows, schema=schema).sort(["instance_id", "ts"] if by_instance else ["ts"])
    at = last_ts(df) + timedelta(seconds=after_s)
    widest = at - T0 + timedelta(seconds=1)  # every row is inside the widest window
    groups = WindowGroups(df, at, widest)
    window = timedelta(seconds=window_s)
    w = window // US
    sums = groups.sum(groups.column("q")[0], w)
    counts = groups.lengths(w)
    highest = groups.reduced("q", "max", w)
    latest, has = groups.latest("q", w)
    ids = df["instance_id"].gather(groups.first).to_list()
    for position, instance in enumerate(ids):
        inside = [r["q"] for r in rows if r["instance_id"] == instance and r["ts"] > at - window]
        assert counts[position] == len(inside)
        assert sums[position] == sum(inside)
        if inside:
            assert highest[position] == max(inside) and latest[position] == inside[-1] and has[position]
        else:
            assert math.isnan(highest[position]) and not has[position]
