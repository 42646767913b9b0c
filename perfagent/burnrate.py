"""Burn rates: SLO bad-request ratios over windows, to findings and error budgets, for a whole fleet.

Over a window w, the bad ratio is bad / total requests finished in w, with bad = `_count` minus the
cumulative bucket at `le = threshold`; the burn rate is the bad ratio / (1 - objective), so a burn
rate of 1 spends exactly the error budget over the period (Google SRE workbook, ch. 5). The error
budget remaining is 1 - the burn rate over the period. No request finished in a window: its ratio,
burn rate and budget are null, never an invented number.

The ratios come from stored history (per-scrape cumulative counts: `increments`, `window_sums`,
`ratios_from_sums`; the agent sums in DuckDB, perfagent/slo_history.py) or from PromQL
(perfagent/slo_promql.py); `evaluate` turns either into the same findings and budgets. The history
math is PromQL's `increase()` over `(at - w, at]`: the reset-corrected increases between consecutive
samples inside the window. PromQL also extrapolates to the window's edges, by one factor for the
bucket and the count series of one scrape alike, which cancels in their ratio.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

import polars as pl

from perfagent.detect import RESULT_SCHEMA
from perfagent.rules import SEVERITY_RANK, BottleneckType
from perfagent.slo import SloSet

_TS: Final = pl.Datetime("us", "UTC")
_WINDOW: Final = pl.Duration("us")

COUNTS_SCHEMA: Final = pl.Schema(
    {
        "instance_id": pl.String(),
        "ts": _TS,
        "histogram": pl.String(),  # the exposed histogram, e.g. vllm:time_to_first_token_seconds
        "le": pl.Float64(),  # the SLO's bucket edge
        "good": pl.Float64(),  # cumulative bucket at `le`, summed over the engine's series
        "total": pl.Float64(),  # cumulative `_count`
    }
)
"""Per-scrape cumulative counts of one histogram at one edge: what burn rates need from history."""

RATIO_SCHEMA: Final = pl.Schema(
    {"slo": pl.String(), "instance_id": pl.String(), "window": _WINDOW, "bad_ratio": pl.Float64()}
)
BURN_SCHEMA: Final = pl.Schema(
    {"slo": pl.String(), "instance_id": pl.String(), "window": _WINDOW, "burn_rate": pl.Float64()}
)
BUDGET_SCHEMA: Final = pl.Schema(
    {"slo": pl.String(), "instance_id": pl.String(), "error_budget_remaining": pl.Float64()}
)

# Every SLO here is on a latency histogram, so a burning budget is a latency bottleneck: the findings
# filters and POST /optimization/recommend accept the type unchanged; the `slo:` rule prefix tells
# them apart from threshold rules.
SLO_FINDING_TYPE: Final = BottleneckType.HIGH_LATENCY
BURN_RATE_UNIT: Final = "burn_rate"  # multiples of the rate that spends the budget over the period

_SERIES: Final = ("instance_id", "histogram", "le")
_H: Final = pl.Struct(
    {
        "count": pl.Float64,
        "bounds": pl.List(pl.Float64),
        "counts": pl.List(pl.Float64),
        "inf_count": pl.Float64,
    }
)


def window_label(window: timedelta) -> str:
    """A window as SLOs speak of it, days at most (`30d`, `1h30m`; format_duration would say `4w2d`)."""
    seconds = int(window.total_seconds())
    parts = []
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)):
        n, seconds = divmod(seconds, size)
        if n:
            parts.append(f"{n}{unit}")
    return "".join(parts) or "0s"


# --- the SLO set as frames ------------------------------------------------------------------------


def slo_keys(slos: SloSet) -> pl.DataFrame:
    """(slo, histogram, le): every exposed histogram each SLO reads, at its edge."""
    rows = [(s.name, m, t.edge) for s in slos for t in s.targets for m in t.metrics]
    return pl.DataFrame(
        rows, schema={"slo": pl.String, "histogram": pl.String, "le": pl.Float64}, orient="row"
    )


def slo_windows(slos: SloSet) -> pl.DataFrame:
    """(slo, window): the alert windows and the period of each SLO."""
    rows = {
        (s.name, w)
        for s in slos
        for w in (s.slo.period, *(x for p in s.slo.alerts for x in (p.long, p.short)))
    }
    return pl.DataFrame(sorted(rows), schema={"slo": pl.String, "window": _WINDOW}, orient="row")


def keyset(slos: SloSet) -> str:
    """The (histogram, le) pairs stored counts must cover, as text: a change means recounting."""
    return json.dumps(sorted({(m, t.edge) for s in slos for t in s.targets for m in t.metrics}))


# --- history: counts from stored scrapes, and their ratios -----------------------------------------


def project_counts(scrapes: pl.DataFrame, keys: pl.DataFrame) -> pl.DataFrame:
    """COUNTS_SCHEMA rows from scrape rows (instance_id, ts, raw): each scrape's RawSnapshot JSON holds
    its histograms summed over the engine's series, cumulative; a histogram without the edge gives none."""
    pairs = keys.select("histogram", "le").unique().sort("histogram", "le").rows()
    if not pairs or scrapes.height == 0:
        return pl.DataFrame(schema=COUNTS_SCHEMA)
    dtype = pl.Struct({"histograms": pl.Struct({m: _H for m in sorted({m for m, _ in pairs})})})
    decoded = scrapes.lazy().select("instance_id", "ts", raw=pl.col("raw").str.json_decode(dtype))
    parts = []
    for metric, le in pairs:
        h = pl.col("raw").struct.field("histograms").struct.field(metric)
        # `le` values parse to the engine's exact edge; the tolerance only absorbs float printing.
        hit = h.struct.field("bounds").list.eval((pl.element() - le).abs() <= 1e-9 * abs(le) + 1e-12)
        good = pl.when(hit.list.any()).then(
            h.struct.field("counts").list.get(hit.list.arg_max(), null_on_oob=True)
        )
        total = pl.coalesce(h.struct.field("count"), h.struct.field("inf_count"))
        parts.append(
            decoded.select(
                "instance_id",
                "ts",
                histogram=pl.lit(metric),
                le=pl.lit(le, pl.Float64),
                good=good,
                total=total,
            )
        )
    out = pl.concat(parts).filter(pl.col("good").is_not_null() & pl.col("total").is_not_null())
    return out.collect().cast(dict(COUNTS_SCHEMA))  # type: ignore[arg-type]


INCREMENTS_SCHEMA: Final = pl.Schema(
    {
        **COUNTS_SCHEMA,
        "prev_ts": _TS,  # the series' previous sample
        "d_bad": pl.Float64(),  # bad requests finished since it (reset-corrected)
        "d_total": pl.Float64(),  # requests finished since it (reset-corrected)
    }
)
"""Counts with the increase since each series' previous sample: what windows add up."""

SUMS_SCHEMA: Final = pl.Schema(
    {
        "instance_id": pl.String(),
        "histogram": pl.String(),
        "le": pl.Float64(),
        "first": pl.Int32(),  # index (in ascending windows) of the smallest window holding these increases
        "bad": pl.Float64(),
        "total": pl.Float64(),
    }
)


def _increase(column: str) -> pl.Expr:
    """Increase since the previous sample (`prev_<column>`); a decrease is a counter reset (PromQL)."""
    value, previous = pl.col(column), pl.col(f"prev_{column}")
    return (
        pl.when(previous.is_null())
        .then(pl.lit(None, pl.Float64))
        .when(value >= previous)
        .then(value - previous)
        .otherwise(value)
    )


def increments(counts: pl.DataFrame | pl.LazyFrame) -> pl.LazyFrame:
    """`counts` with INCREMENTS_SCHEMA's columns added: the increases since each series' previous sample
    (null for a series' first sample)."""
    # Sorting by time alone (history arrives in time order) keeps each series' samples in order for the
    # shift; sorting by the series' text keys as well costs far more on days of scrapes.
    previous = pl.struct("ts", "good", "total").shift(1).over(_SERIES)
    return (
        counts.lazy()
        .sort("ts")
        .with_columns(previous.struct.rename_fields(["prev_ts", "prev_good", "prev_total"]).struct.unnest())
        .with_columns(d_bad=_increase("total") - _increase("good"), d_total=_increase("total"))
        .drop("prev_good", "prev_total")  # other columns of `counts` ride along
    )


def spans_of(slos: SloSet) -> list[timedelta]:
    """Every window any SLO reads, ascending (alert windows and periods)."""
    return sorted(set(slo_windows(slos).get_column("window").to_list()))


def window_sums(rows: pl.DataFrame | pl.LazyFrame, at: datetime, spans: list[timedelta]) -> pl.DataFrame:
    """SUMS_SCHEMA from INCREMENTS rows: increases whose two samples both lie in `(at - w, at]`, as PromQL's
    increase() counts them before extrapolating. The windows are nested (all end at `at`): an increase
    counts in every window from the smallest one holding it on, so one sum per (series, smallest window)
    is enough. (perfagent/slo_history.py computes the same in DuckDB over the stored increments.)"""
    at = at.astimezone(UTC)
    out = (
        rows.lazy()
        .filter(pl.col("ts") <= pl.lit(at, _TS), pl.col("prev_ts") > pl.lit(at - spans[-1], _TS))
        .with_columns(
            first=pl.lit(len(spans), pl.Int32)
            - pl.sum_horizontal([(pl.col("prev_ts") > pl.lit(at - w, _TS)).cast(pl.Int32) for w in spans])
        )
        .group_by(*_SERIES, "first")
        .agg(pl.col("d_bad").sum().alias("bad"), pl.col("d_total").sum().alias("total"))
    )
    return out.collect().cast(dict(SUMS_SCHEMA))  # type: ignore[arg-type]


def ratios_from_sums(sums: pl.DataFrame, slos: SloSet, spans: list[timedelta]) -> pl.DataFrame:
    """Every SLO's bad ratio per instance and window (RATIO_SCHEMA) from window_sums' rows; an SLO's
    histograms (an engine's old and new name) are added together. A window with fewer than two samples
    has no row, as PromQL's increase() has no result; no request finished: a null ratio."""
    index = pl.LazyFrame(
        {"i": list(range(len(spans))), "window": spans}, schema={"i": pl.Int32, "window": _WINDOW}
    )
    out = (
        sums.lazy()
        .join(index, how="cross")
        .filter(pl.col("first") <= pl.col("i"))
        .join(slo_keys(slos).lazy(), on=["histogram", "le"])
        .join(slo_windows(slos).lazy(), on=["slo", "window"], how="semi")
        .group_by("slo", "instance_id", "window")
        .agg(pl.col("bad").sum(), pl.col("total").sum())
        .select(
            "slo",
            "instance_id",
            "window",
            bad_ratio=pl.when(pl.col("total") > 0).then(pl.col("bad") / pl.col("total")),
        )
        .sort("slo", "instance_id", "window")
    )
    return out.collect().cast(dict(RATIO_SCHEMA))  # type: ignore[arg-type]


def history_ratios(counts: pl.DataFrame | pl.LazyFrame, slos: SloSet, at: datetime) -> pl.DataFrame:
    """Every SLO's bad ratio over each of its windows ending at `at`, per instance, from cumulative counts
    (RATIO_SCHEMA): increments, then window sums, then ratios."""
    spans = spans_of(slos)
    if not spans:
        return pl.DataFrame(schema=RATIO_SCHEMA)
    at = at.astimezone(UTC)
    recent = counts.lazy().filter(pl.col("ts") > pl.lit(at - spans[-1], _TS), pl.col("ts") <= pl.lit(at, _TS))
    return ratios_from_sums(window_sums(increments(recent), at, spans), slos, spans)


# --- from ratios to burn rates, budgets and findings ----------------------------------------------


@dataclass(frozen=True, slots=True)
class SloEvaluation:
    """Every SLO's burn rates and budgets at `at`, and the findings whose alert pairs hold."""

    at: datetime
    burn: pl.DataFrame  # BURN_SCHEMA: per slo, instance and window (alert windows and the period)
    budgets: pl.DataFrame  # BUDGET_SCHEMA
    results: pl.DataFrame  # detect.RESULT_SCHEMA: one row per (instance, SLO) with a firing pair

    @classmethod
    def empty(cls, at: datetime) -> SloEvaluation:
        return cls(
            at,
            pl.DataFrame(schema=BURN_SCHEMA),
            pl.DataFrame(schema=BUDGET_SCHEMA),
            pl.DataFrame(schema=RESULT_SCHEMA),
        )


def _slo_table(slos: SloSet) -> pl.DataFrame:
    rows = [
        {
            "slo": s.name,
            "rule": s.rule,
            "objective": s.slo.objective,
            "period": s.slo.period,
            "quantity": s.slo.histogram,
            "text": (
                f"{s.slo.objective:.6g} of requests must see {s.slo.histogram} at or under "
                f"{s.slo.threshold:.6g} s over {window_label(s.slo.period)}"
            ),
            "recommendation": s.slo.recommendation,
            "labels": json.dumps(s.slo.labels, sort_keys=True),
        }
        for s in slos
    ]
    schema = pl.Schema(
        {
            "slo": pl.String(),
            "rule": pl.String(),
            "objective": pl.Float64(),
            "period": _WINDOW,
            "quantity": pl.String(),
            "text": pl.String(),
            "recommendation": pl.String(),
            "labels": pl.String(),
        }
    )
    return pl.DataFrame(rows, schema=schema)


def _alert_table(slos: SloSet) -> pl.DataFrame:
    rows = [
        {
            "slo": s.name,
            "severity": p.severity.value,
            "rank": SEVERITY_RANK[p.severity.value],
            "long": p.long,
            "short": p.short,
            "long_text": window_label(p.long),
            "short_text": window_label(p.short),
            "factor": p.factor,
        }
        for s in slos
        for p in s.slo.alerts
    ]
    schema = pl.Schema(
        {
            "slo": pl.String(),
            "severity": pl.String(),
            "rank": pl.Int64(),
            "long": _WINDOW,
            "short": _WINDOW,
            "long_text": pl.String(),
            "short_text": pl.String(),
            "factor": pl.Float64(),
        }
    )
    return pl.DataFrame(rows, schema=schema)


def _num(expr: pl.Expr, decimals: int) -> pl.Expr:
    return expr.round(decimals).cast(pl.String)


def evaluate(slos: SloSet, ratios: pl.DataFrame, engines: dict[str, str], at: datetime) -> SloEvaluation:
    """Burn rates, budgets and findings from bad ratios (RATIO_SCHEMA), for every instance at once.

    A pair fires when the burn rate exceeds its factor over both its long and its short window; an
    instance's finding for an SLO takes the highest severity among the pairs that fire.
    """
    at = at.astimezone(UTC)
    table = _slo_table(slos)
    burn = (
        ratios.lazy()
        .join(table.lazy().select("slo", "objective"), on="slo")
        .select("slo", "instance_id", "window", burn_rate=pl.col("bad_ratio") / (1.0 - pl.col("objective")))
        .sort("slo", "instance_id", "window")
    )
    budgets = (
        burn.join(table.lazy().select("slo", window="period"), on=["slo", "window"])
        .select("slo", "instance_id", error_budget_remaining=1.0 - pl.col("burn_rate"))
        .sort("slo", "instance_id")
    )
    rates = burn.filter(pl.col("burn_rate").is_not_null())
    engine_of = pl.DataFrame(
        {"instance_id": list(engines), "engine": list(engines.values())},
        schema={"instance_id": pl.String, "engine": pl.String},
    )
    firing = (
        _alert_table(slos)
        .lazy()
        .join(rates.rename({"window": "long", "burn_rate": "burn_long"}), on=["slo", "long"])
        .join(
            rates.rename({"window": "short", "burn_rate": "burn_short"}), on=["slo", "short", "instance_id"]
        )
        .filter(pl.col("burn_long") > pl.col("factor"), pl.col("burn_short") > pl.col("factor"))
        .sort("rank", "factor", descending=True)
        .unique(["slo", "instance_id"], keep="first", maintain_order=True)
        .join(table.lazy(), on="slo")
        .join(engine_of.lazy(), on="instance_id", how="left")
    )
    results = firing.select(
        "instance_id",
        "engine",
        "rule",
        type=pl.lit(SLO_FINDING_TYPE.value),
        severity="severity",
        quantity="quantity",
        unit=pl.lit(BURN_RATE_UNIT),
        op=pl.lit(">"),
        value="burn_long",
        threshold="factor",
        window_start=pl.lit(at, _TS) - pl.col("long"),
        window_end=pl.lit(at, _TS),
        summary=pl.concat_str(
            pl.lit("SLO "),
            pl.col("slo"),
            pl.lit(" burning its error budget "),
            _num(pl.col("burn_long"), 1),
            pl.lit("x over "),
            pl.col("long_text"),
            pl.lit(" and "),
            _num(pl.col("burn_short"), 1),
            pl.lit("x over "),
            pl.col("short_text"),
            pl.lit(" on "),
            pl.col("instance_id"),
        ),
        description=pl.concat_str(
            pl.col("instance_id"),
            pl.lit(" ("),
            pl.col("engine").fill_null("unknown engine"),
            pl.lit("): "),
            pl.col("text"),
            pl.lit(". Burn rate "),
            _num(pl.col("burn_long"), 2),
            pl.lit(" over "),
            pl.col("long_text"),
            pl.lit(" and "),
            _num(pl.col("burn_short"), 2),
            pl.lit(" over "),
            pl.col("short_text"),
            pl.lit(" (1 spends the budget over the period): both exceed the "),
            pl.col("severity"),
            pl.lit(" pair's factor "),
            _num(pl.col("factor"), 2),
            pl.lit("."),
        ),
        recommendation="recommendation",
        labels="labels",
    ).sort("instance_id", "rule")
    burn_frame, budget_frame, result_frame = pl.collect_all([burn, budgets, results])
    return SloEvaluation(
        at,
        burn_frame.cast(dict(BURN_SCHEMA)),  # type: ignore[arg-type]
        budget_frame.cast(dict(BUDGET_SCHEMA)),  # type: ignore[arg-type]
        result_frame.select(list(RESULT_SCHEMA)).cast(dict(RESULT_SCHEMA)),  # type: ignore[arg-type]
    )
