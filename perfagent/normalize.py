"""Normalization: one engine scrape (plus optional DCGM scrape) to catalog quantities in catalog units.

The engine map (perfagent/engines/*.yaml) says which exposed metrics feed each quantity. For one scrape:
keep the rows of mapped metrics, collapse rank replicas, pick the first source present per quantity,
aggregate everything in one Polars select (buckets by `le` in one group_by), then window counters and
histograms against the previous RawSnapshot and derive rates and ratios.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

import numpy as np
import polars as pl
from pydantic import AwareDatetime, BaseModel, ConfigDict

from perfagent.catalog import CATALOG, QUANTILE_SUFFIXES
from perfagent.enginemap import (
    Aggregate,
    CounterRatioSource,
    CounterSource,
    EngineMap,
    GaugeSource,
    GaugeSumSource,
    HistogramSource,
    HistogramSumSource,
    InfoSource,
    Selector,
    Source,
    canonical_metric,
    load_engine_map,
)
from perfagent.exposition import label
from perfagent.histogram import Buckets, HistogramData, Quantile, merge_by_le

ENGINES: tuple[str, ...] = ("vllm", "tgi", "sglang")


_HISTOGRAM_PARTS = ("_bucket", "_sum", "_count")
_QS = tuple(q for _, q in QUANTILE_SUFFIXES)


class Window(BaseModel):
    """The time span that windowed quantities (means, quantiles, rates, ratios) cover."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["since_previous", "lifetime"]
    start: AwareDatetime | None  # None for lifetime: the engine's start is not known here
    end: AwareDatetime
    seconds: float | None  # None for lifetime


class HistogramSnapshot(BaseModel):
    """An aggregated histogram at one scrape; +Inf is kept apart so the model stays valid JSON."""

    model_config = ConfigDict(frozen=True)

    sum: float | None
    count: float | None
    bounds: tuple[float, ...] = ()  # finite upper bounds, ascending
    counts: tuple[float, ...] = ()  # cumulative counts of those bounds
    inf_count: float | None = None  # the +Inf bucket; None when the scrape had none

    @classmethod
    def of(cls, data: HistogramData) -> HistogramSnapshot | None:
        """Snapshot of `data`, or None when a value is not finite (it cannot start a window)."""
        bounds: tuple[float, ...] = ()
        counts: tuple[float, ...] = ()
        inf_count = None
        if data.buckets is not None:
            finite = np.isfinite(data.buckets.bounds)
            bounds = tuple(data.buckets.bounds[finite].tolist())
            counts = tuple(data.buckets.counts[finite].tolist())
            if data.buckets.complete:
                inf_count = float(data.buckets.counts[-1])
        numbers = [*counts, *(x for x in (data.sum, data.count, inf_count) if x is not None)]
        if not all(math.isfinite(x) for x in numbers):
            return None
        return cls(sum=data.sum, count=data.count, bounds=bounds, counts=counts, inf_count=inf_count)

    def data(self) -> HistogramData:
        """Back to a HistogramData."""
        buckets = None
        if self.bounds or self.inf_count is not None:
            inf = () if self.inf_count is None else (math.inf,)
            tail = () if self.inf_count is None else (self.inf_count,)
            buckets = Buckets.of((*self.bounds, *inf), (*self.counts, *tail))
        return HistogramData(sum=self.sum, count=self.count, buckets=buckets)


class RawSnapshot(BaseModel):
    """Aggregated counters and histograms of one scrape; pass it back as `previous` next time."""

    model_config = ConfigDict(frozen=True)

    engine: str
    at: AwareDatetime
    counters: dict[str, float] = {}  # keyed by selector text, e.g. vllm:request_success_total{...}
    histograms: dict[str, HistogramSnapshot] = {}


class Normalized(BaseModel):
    """Every catalog quantity for one scrape, with the window and caveats behind the numbers."""

    model_config = ConfigDict(frozen=True)

    engine: str
    values: dict[str, float | None]  # every catalog quantity; None when unknown, never NaN
    window: Window
    approximations: dict[str, str]  # quantity -> how it is approximated
    flags: dict[str, str]  # quantity -> why it is None or doubtful ("window" for the window itself)
    lower_bounds: dict[str, float]  # quantile -> the value it is known to exceed (+Inf bucket)
    sources: dict[str, str]  # quantity -> the exposed metric(s) it came from
    engine_version_hint: str | None
    raw: RawSnapshot


def counter_delta(current: float, previous: float | None) -> float:
    """Increase of a counter since `previous`; a decrease is a reset, so the increase is `current`."""
    if previous is None or current < previous:
        return current
    return current - previous


def normalize(
    engine: str,
    samples: pl.DataFrame,
    *,
    at: datetime,
    previous: RawSnapshot | None = None,
    dcgm: pl.DataFrame | None = None,
    gpu_selector: Mapping[str, str] | None = None,
) -> Normalized:
    """Normalize one parsed scrape of `engine` (vllm, tgi or sglang), taken at `at`."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("`at` must be timezone-aware")
    out = _Output()
    window, prev = _window(engine, at, previous, out.flags)
    emap = load_engine_map(engine)
    extracted = _extract(samples, emap)
    ctx = _WindowedValues(extracted, prev, window.seconds)
    _fill_sourced(extracted, ctx, out)
    _fill_derived(extracted, ctx, out)
    if dcgm is not None:
        _fill_gpu(dcgm, gpu_selector, out)
    raw = RawSnapshot(
        engine=engine,
        at=at,
        counters={k: v for k, v in extracted.counters.items() if math.isfinite(v)},
        histograms={
            k: s for k, h in extracted.histograms.items() if (s := HistogramSnapshot.of(h)) is not None
        },
    )
    return Normalized(
        engine=engine,
        values={name: _finite(out.values.get(name)) for name in CATALOG},
        window=window,
        approximations=out.approximations,
        flags=out.flags,
        lower_bounds=out.lower_bounds,
        sources=out.sources,
        engine_version_hint=extracted.hint,
        raw=raw,
    )


@dataclass(slots=True)
class _Output:
    values: dict[str, float | None] = field(default_factory=dict)
    approximations: dict[str, str] = field(default_factory=dict)
    flags: dict[str, str] = field(default_factory=dict)
    lower_bounds: dict[str, float] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)


def _window(
    engine: str, at: datetime, previous: RawSnapshot | None, flags: dict[str, str]
) -> tuple[Window, RawSnapshot | None]:
    if previous is not None and previous.engine != engine:
        flags["window"] = (
            f"previous snapshot is of engine {previous.engine!r}, not {engine!r}: lifetime window"
        )
        previous = None
    if previous is not None and previous.at >= at:
        flags["window"] = f"previous snapshot ({previous.at.isoformat()}) is not before `at`: lifetime window"
        previous = None
    if previous is None:
        return Window(kind="lifetime", start=None, end=at, seconds=None), None
    seconds = (at - previous.at).total_seconds()
    return Window(kind="since_previous", start=previous.at, end=at, seconds=seconds), previous


# --- extraction: one engine map applied to one frame ------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Extracted:
    resolved: dict[str, Source]  # quantity -> the first source present in the scrape
    gauges: dict[str, float | None]  # quantity -> value, for gauge, gauge_sum and info sources
    counters: dict[str, float]  # selector text -> current cumulative value
    histograms: dict[str, HistogramData]  # selector text -> current aggregated histogram
    hint: str | None


def _extract(samples: pl.DataFrame, emap: EngineMap) -> _Extracted:
    frame = _prepare(samples, emap)
    present = set(frame.get_column("key").unique().to_list())
    hint = _era(samples, frame, emap)
    resolved = {
        name: source
        for name, qmap in emap.quantities.items()
        if (source := _first_present(qmap.sources, present, hint)) is not None
    }
    exprs: dict[str, pl.Expr] = {}
    hist_ids: dict[str, Selector] = {}
    for name, source in resolved.items():
        _plan(name, source, exprs, hist_ids)
    scalars = frame.select(**exprs).row(0, named=True) if exprs else {}
    buckets = _bucket_frames(frame, hist_ids)
    counters = {k[2:]: float(v) for k, v in scalars.items() if k.startswith("c:") and v is not None}
    histograms = {
        sid: HistogramData(
            sum=scalars[f"h:{sid}:sum"], count=scalars[f"h:{sid}:count"], buckets=buckets.get(sid)
        )
        for sid in hist_ids
    }
    gauges = {k[2:]: v for k, v in scalars.items() if k.startswith("g:")}
    return _Extracted(resolved, gauges, counters, histograms, hint)


def _prepare(samples: pl.DataFrame, emap: EngineMap) -> pl.DataFrame:
    """Rows of the metrics this map uses, keyed by canonical name, rank replicas collapsed."""
    frame = (
        samples.lazy()
        .select(_canonical(pl.col("name")).alias("key"), "labels", "value", "le")
        .filter(pl.col("key").is_in(sorted(_sample_keys(emap))))
    )
    if emap.drop_series_with_labels:
        frame = frame.filter(
            ~_label_names().list.eval(pl.element().is_in(emap.drop_series_with_labels)).list.any()
        )
    if emap.replica_labels:
        # Same name, le and labels apart from the rank labels: one state seen from several ranks (max).
        frame = (
            frame.with_columns(series=_series_text(exclude=emap.replica_labels))
            .group_by("key", "series", "le")
            .agg(pl.col("value").max(), pl.col("labels").first())
            .drop("series")
        )
    return frame.collect()


def _canonical(name: pl.Expr) -> pl.Expr:
    return name.str.to_lowercase().str.replace_all(":", "_", literal=True)


def _label_names() -> pl.Expr:
    return pl.col("labels").list.eval(pl.element().struct.field("name"))


def _series_text(*, exclude: Iterable[str]) -> pl.Expr:
    """Labels as sorted `name\\x1fvalue` text joined by \\x1e, without `exclude` (a group key)."""
    kept = pl.element().filter(~pl.element().struct.field("name").is_in(list(exclude)))
    pair = kept.struct.field("name") + "\x1f" + kept.struct.field("value")
    return pl.col("labels").list.eval(pair).list.sort().list.join("\x1e")


def _sources_selectors(source: Source) -> list[tuple[Selector, bool, bool]]:
    """(selector, is_histogram, required) for every selection a source reads."""
    match source:
        case GaugeSumSource():
            return [(t, False, not t.optional) for t in source.terms]
        case CounterRatioSource():
            return [(source.numerator, False, True), (source.denominator, False, True)]
        case HistogramSumSource():
            return [(t, True, True) for t in source.terms]
        case HistogramSource():
            return [(source, True, True)]
        case _:
            return [(source, False, True)]


def _keys(selector: Selector, histogram: bool) -> list[str]:
    base = canonical_metric(selector.metric)
    return [base + part for part in _HISTOGRAM_PARTS] if histogram else [base]


def _sample_keys(emap: EngineMap) -> set[str]:
    return {
        key
        for qmap in emap.quantities.values()
        for source in qmap.sources
        for selector, histogram, _ in _sources_selectors(source)
        for key in _keys(selector, histogram)
    } | {canonical_metric(m) for m in _zero_witnesses(emap)}


def _zero_witnesses(emap: EngineMap) -> set[str]:
    return {
        m
        for qmap in emap.quantities.values()
        for source in qmap.sources
        if isinstance(source, CounterSource)
        for m in source.absent_is_zero_when
    }


def _era(samples: pl.DataFrame, frame: pl.DataFrame, emap: EngineMap) -> str | None:
    if not emap.eras:
        return None
    names = set(samples.select(_canonical(pl.col("name")).unique()).to_series().to_list())
    labels = set(
        frame.select(_label_names().list.explode(keep_nulls=False, empty_as_null=False).unique())
        .to_series()
        .to_list()
    )
    for era in emap.eras:
        if any(canonical_metric(m) in names for m in era.any_metric) or labels.intersection(era.any_label):
            return era.hint
    return None


def _is_present(source: Source, present: set[str]) -> bool:
    if all(
        any(k in present for k in _keys(sel, hist))
        for sel, hist, required in _sources_selectors(source)
        if required
    ):
        return True
    # A lazily created counter that is missing while its witnesses are present is 0 (sum over no rows).
    return isinstance(source, CounterSource) and any(
        canonical_metric(m) in present for m in source.absent_is_zero_when
    )


def _first_present(sources: Iterable[Source], present: set[str], hint: str | None) -> Source | None:
    for source in sources:
        if (not source.eras or hint in source.eras) and _is_present(source, present):
            return source
    return None


def _predicate(selector: Selector, suffix: str = "") -> pl.Expr:
    pred = pl.col("key") == canonical_metric(selector.metric) + suffix
    for name, allowed in selector.where.items():
        pred = pred & label(name).is_in(list(allowed)).fill_null(False)
    for name, banned in selector.where_not.items():
        pred = pred & ~label(name).is_in(list(banned)).fill_null(False)
    return pred


def _aggregate(values: pl.Expr, how: Aggregate) -> pl.Expr:
    match how:
        case "sum":
            return values.sum()
        case "max":
            return values.max()
        case "min":
            return values.min()
        case "mean":
            return values.mean()


def _gauge_expr(selector: Selector, how: Aggregate, valid: tuple[float, float] | None = None) -> pl.Expr:
    """Aggregate of the matching series; null when none match (a sum over nothing is unknown, not 0)."""
    pred = _predicate(selector)
    if valid is not None:
        pred = pred & pl.col("value").is_between(valid[0], valid[1])
    return pl.when(pred.any()).then(_aggregate(pl.col("value").filter(pred), how))


def _info_expr(source: InfoSource) -> pl.Expr:
    product = pl.lit(1.0)
    for name in source.product_of_labels:
        product = product * label(name).cast(pl.Float64, strict=False)
    pred = _predicate(source) & product.is_not_null()
    return pl.when(pred.any()).then(_aggregate(product.filter(pred), source.aggregate))


def _sum_or_null(pred: pl.Expr) -> pl.Expr:
    return pl.when(pred.any()).then(pl.col("value").filter(pred).sum())


def _plan(name: str, source: Source, exprs: dict[str, pl.Expr], hist_ids: dict[str, Selector]) -> None:
    """Add the aggregate expressions `source` needs, keyed g:<quantity>, c:<id> or h:<id>:sum|count."""
    match source:
        case GaugeSource():
            exprs[f"g:{name}"] = _gauge_expr(source, source.aggregate, source.valid_range) * source.scale
        case GaugeSumSource():
            total: pl.Expr = pl.lit(0.0)
            for term in source.terms:
                part = _gauge_expr(term, source.aggregate)
                total = total + (part.fill_null(0.0) if term.optional else part)
            exprs[f"g:{name}"] = total * source.scale
        case InfoSource():
            exprs[f"g:{name}"] = _info_expr(source)
        case CounterSource() | CounterRatioSource():
            # Labelled children appear on first increment, so a present metric with no matching series is 0.
            for selector, _, _ in _sources_selectors(source):
                exprs[f"c:{selector.series_id}"] = pl.col("value").filter(_predicate(selector)).sum()
        case HistogramSource() | HistogramSumSource():
            for selector, _, _ in _sources_selectors(source):
                sid = selector.series_id
                hist_ids[sid] = selector
                exprs[f"h:{sid}:sum"] = _sum_or_null(_predicate(selector, "_sum"))
                exprs[f"h:{sid}:count"] = _sum_or_null(_predicate(selector, "_count"))


def _bucket_frames(frame: pl.DataFrame, hist_ids: Mapping[str, Selector]) -> dict[str, Buckets]:
    if not hist_ids:
        return {}
    parts = [
        frame.filter(_predicate(selector, "_bucket") & pl.col("le").is_not_null()).select(
            pl.lit(sid).alias("sid"), "le", "value"
        )
        for sid, selector in hist_ids.items()
    ]
    return merge_by_le(pl.concat(parts), key="sid")


# --- windowed values --------------------------------------------------------------------------------


class _WindowedValues:
    """Counter and histogram deltas over the window (the whole lifetime without a previous snapshot)."""

    def __init__(self, extracted: _Extracted, previous: RawSnapshot | None, seconds: float | None) -> None:
        self._x = extracted
        self._prev = previous
        self.seconds = seconds

    def counter(self, sid: str) -> float | None:
        current = self._x.counters.get(sid)
        if current is None or not math.isfinite(current) or current < 0.0:
            return None
        if self._prev is None:
            return current
        return counter_delta(current, self._prev.counters.get(sid))

    def histogram(self, sid: str) -> HistogramData | None:
        current = self._x.histograms.get(sid)
        if current is None or self._prev is None:
            return current
        before = self._prev.histograms.get(sid)
        return current.delta(None if before is None else before.data())

    def rate(self, delta: float | None) -> float | None:
        if delta is None or self.seconds is None or not self.seconds > 0.0:
            return None
        return delta / self.seconds


def _fill_sourced(x: _Extracted, ctx: _WindowedValues, out: _Output) -> None:
    for name, source in x.resolved.items():
        out.sources[name] = _describe(source)
        if source.approximation:
            out.approximations[name] = source.approximation
        match source:
            case GaugeSource() | GaugeSumSource() | InfoSource():
                out.values[name] = x.gauges.get(name)
            case CounterSource():
                out.values[name] = x.counters.get(source.series_id)
            case CounterRatioSource():
                num = ctx.counter(source.numerator.series_id)
                den = ctx.counter(source.denominator.series_id)
                out.values[name] = num / den if num is not None and den is not None and den > 0 else None
            case HistogramSource() | HistogramSumSource():
                _fill_latency(name, source, ctx, out)


def _fill_latency(
    name: str, source: HistogramSource | HistogramSumSource, ctx: _WindowedValues, out: _Output
) -> None:
    selectors = [sel for sel, _, _ in _sources_selectors(source)]
    parts = [ctx.histogram(sel.series_id) for sel in selectors]
    means = [None if p is None else p.mean() for p in parts]
    out.values[name] = sum(m for m in means if m is not None) if all(m is not None for m in means) else None
    per_part = [[Quantile(None)] * len(_QS) if p is None else p.quantiles(_QS) for p in parts]
    for i, (suffix, _) in enumerate(QUANTILE_SUFFIXES):
        qname = f"{name}_{suffix}"
        out.sources[qname] = out.sources[name]
        if source.approximation:
            out.approximations[qname] = source.approximation
        _set_quantile(qname, [q[i] for q in per_part], [s.metric for s in selectors], out)


def _set_quantile(qname: str, parts: list[Quantile], metrics: list[str], out: _Output) -> None:
    """Store a quantile, the sum of `parts` when the quantity is approximated by several histograms."""
    if any(p.value is None and not p.above_finite_buckets for p in parts):
        out.values[qname] = None
        return
    flagged = [(p, m) for p, m in zip(parts, metrics, strict=True) if p.above_finite_buckets]
    if not flagged:
        out.values[qname] = sum(p.value for p in parts if p.value is not None)
        return
    # Known parts add their values, flagged parts their lower bounds: the sum is a lower bound too.
    bound = sum(p.value if p.value is not None else (p.lower_bound or 0.0) for p in parts)
    out.values[qname] = None
    out.lower_bounds[qname] = bound
    if len(parts) == 1:
        out.flags[qname] = f"above highest finite bucket {_fmt(bound)} s"
    else:
        which = ", ".join(f"{m} above {_fmt(p.lower_bound or 0.0)} s" for p, m in flagged)
        out.flags[qname] = f"above highest finite bucket ({which}); at least {_fmt(bound)} s"


def _counter_quantity(x: _Extracted, ctx: _WindowedValues, name: str) -> float | None:
    source = x.resolved.get(name)
    return ctx.counter(source.series_id) if isinstance(source, CounterSource) else None


def _inherit(out: _Output, target: str, inputs: Iterable[str]) -> None:
    notes = [out.approximations[i] for i in inputs if i in out.approximations]
    if notes:
        out.approximations[target] = "; ".join(dict.fromkeys(notes))


def _fill_derived(x: _Extracted, ctx: _WindowedValues, out: _Output) -> None:
    success = _counter_quantity(x, ctx, "requests_success_total")
    failure = _counter_quantity(x, ctx, "requests_failure_total")
    # Without a failure counter (SGLang v0.3) every finished request counts as a success.
    finished = None if success is None else success + (failure or 0.0)
    out.values["request_rate"] = ctx.rate(finished)
    out.values["error_rate"] = (
        failure / (success + failure)
        if success is not None and failure is not None and success + failure > 0
        else None
    )
    for target in ("request_rate", "error_rate"):
        _inherit(out, target, CATALOG[target].derived_from)
    for target in ("prompt_tokens_per_second", "generation_tokens_per_second", "preemption_rate"):
        (base,) = CATALOG[target].derived_from
        out.values[target] = ctx.rate(_counter_quantity(x, ctx, base))
        _inherit(out, target, (base,))


# --- GPU (dcgm-exporter) ----------------------------------------------------------------------------


def _fill_gpu(dcgm: pl.DataFrame, selector: Mapping[str, str] | None, out: _Output) -> None:
    emap = load_engine_map("dcgm")
    frame = dcgm
    if selector:
        pred = pl.lit(True)
        for name, value in selector.items():
            pred = pred & (label(name) == value).fill_null(False)
        frame = dcgm.filter(pred)
        if frame.height == 0:
            for name in emap.quantities:
                out.flags[name] = f"no DCGM series matched gpu_selector {dict(selector)}"
            return
    x = _extract(frame, emap)
    for name, source in x.resolved.items():
        out.sources[name] = _describe(source)
        out.values[name] = x.gauges.get(name)


# --- small helpers ----------------------------------------------------------------------------------


def _describe(source: Source) -> str:
    match source:
        case CounterRatioSource():
            return f"{source.numerator.series_id} / {source.denominator.series_id}"
        case GaugeSumSource() | HistogramSumSource():
            return " + ".join(t.series_id for t in source.terms)
        case _:
            return source.series_id


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _fmt(x: float) -> str:
    return repr(round(x, 6))
