"""SLO bad ratios from an operator's Prometheus: the windows of perfagent/burnrate.py as PromQL.

For a window w and an SLO on histogram `h` with edge `le`, per instance:

    (sum by (instance) (increase(h_count[w])) - sum by (instance) (increase(h_bucket{le=~"…"}[w])))
      / sum by (instance) (increase(h_count[w]))

Histograms an engine renamed (vLLM's TPOT to ITL) are joined with `or`, first present wins, as the
engine maps read them. `le` must be string-matched here, so the matcher lists every spelling of the
edge the engines' clients print (`1.0` from Python, `1` from Rust, `0.00015000000000000001`).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import polars as pl

from perfagent.burnrate import RATIO_SCHEMA, slo_windows, window_label
from perfagent.enginemap import load_engine_map
from perfagent.promclient import PromClient
from perfagent.promql import alternation, quote
from perfagent.slo import LoadedSlo, SloSet


def le_spellings(edge: float) -> tuple[str, ...]:
    """How exporters print `edge` as an `le` label: Python repr, Go/Rust shortest forms, with and
    without a trailing `.0`."""
    forms = {
        repr(edge),
        np.format_float_positional(edge, unique=True, trim="-"),
        np.format_float_positional(edge, unique=True, trim="0"),
        np.format_float_scientific(edge, unique=True, trim="-", exp_digits=2),
    }
    if edge == int(edge) and abs(edge) < 1e16:
        forms |= {str(int(edge)), f"{int(edge)}.0"}
    return tuple(sorted(forms))


def le_matcher(edge: float) -> str:
    """A `le=~"…"` matcher for every spelling of `edge`."""
    return f"le=~{quote(alternation(le_spellings(edge)))}"


def _selector(metric: str, matchers: Sequence[str]) -> str:
    return f"{metric}{{{','.join(matchers)}}}" if matchers else metric


def bad_ratio_query(slo: LoadedSlo, window: timedelta, *, by: str = "instance") -> str:
    """PromQL for the SLO's bad ratio over `window`, one series per `by` value."""
    w = window_label(window)
    branches = []
    for target in slo.targets:
        # Series the engine map drops (the vLLM router's re-exports carry `server`) must not count.
        drop = [f'{label}=""' for label in load_engine_map(target.engine.value).drop_series_with_labels]
        for metric in target.metrics:
            count = f"sum by ({by}) (increase({_selector(metric + '_count', drop)}[{w}]))"
            good_sel = _selector(metric + "_bucket", [le_matcher(target.edge), *drop])
            good = f"sum by ({by}) (increase({good_sel}[{w}]))"
            branches.append(f"(({count} - {good}) / {count})")
    return " or ".join(branches)


def _value(entry: dict[str, Any]) -> float | None:
    value = float(entry["value"][1])
    return value if math.isfinite(value) else None  # 0/0 without traffic is NaN: no ratio


async def prometheus_ratios(
    client: PromClient, slos: SloSet, at: datetime, *, instance_label: str = "instance"
) -> pl.DataFrame:
    """Every SLO's bad ratio over each of its windows at `at`, per instance (burnrate.RATIO_SCHEMA)."""
    at = at.astimezone(UTC)
    jobs = [
        (slo, window) for slo in slos for window in slo_windows(SloSet((slo,))).get_column("window").to_list()
    ]
    answers = await asyncio.gather(
        *(client.query(bad_ratio_query(slo, window, by=instance_label), at) for slo, window in jobs)
    )
    rows = [
        (slo.name, entry["metric"].get(instance_label), window, _value(entry))
        for (slo, window), result in zip(jobs, answers, strict=True)
        for entry in result
        if entry.get("metric", {}).get(instance_label) is not None
    ]
    frame = pl.DataFrame(rows, schema=RATIO_SCHEMA, orient="row")
    return frame.sort("slo", "instance_id", "window")
