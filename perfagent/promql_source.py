"""PromQL-only analysis: catalog quantities computed by Prometheus from the series it already scraped.

Each quantity becomes one PromQL expression per engine, built from the engine map the agent's own
normalization uses (perfagent/engines/*.yaml): gauges as they are, counters as `rate` over the window,
means as rate(_sum) / rate(_count), quantiles as `histogram_quantile` over bucket rates. A map's
sources keep their priority: a later source is used only where no earlier one is present, as in
`normalize`. One query serves every quantity for a batch of instances of one engine, each result
series tagged with its quantity by `label_replace`. Windows are computed inside PromQL, so a 30-day
range never fetches raw samples and never exceeds Prometheus's 11,000 points per series.

Instances are matched to Prometheus series by their `instance` label and, when present, `job` (what
discovery sets; a configured instance can carry them too).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import polars as pl

from perfagent.catalog import CATALOG, Kind
from perfagent.detect import CompiledRules
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
    load_engine_map,
)
from perfagent.models import Instance
from perfagent.promclient import PromClient, fit_step, matrix_frame
from perfagent.promql import Matcher, alternation, duration, quote

MIN_WINDOW: Final = timedelta(minutes=1)
"""Shortest rate window: four 15 s scrape intervals, so every window holds enough samples for `rate`."""

ID_LABELS: Final = ("job", "instance")
_BY: Final = "job, instance"
_TAG: Final = "perfagent_quantity"  # the label naming each result series' quantity
_MAX_REGEX_CHARS: Final = 2000  # instances per query are capped so each query stays a few kB per selector
_QUANTITIES_PER_QUERY: Final = 12
_AGGREGATE: Final[dict[Aggregate, str]] = {"sum": "sum", "max": "max", "min": "min", "mean": "avg"}
_HISTOGRAM_PARTS: Final = ("_bucket", "_sum", "_count")

Query = Callable[[str], Awaitable[list[dict[str, Any]]]]


def identity(instance: Instance) -> tuple[str | None, str] | None:
    """(job, instance) labels of the instance's series in Prometheus, or None when it has none."""
    target = instance.labels.get("instance")
    return None if target is None else (instance.labels.get("job"), target)


def frame_schema(quantities: Iterable[str]) -> pl.Schema:
    """The detection input frame's schema (as `Store.recent_scrapes` returns it)."""
    names = sorted(set(quantities))
    unknown = [q for q in names if q not in CATALOG]
    if unknown:
        raise ValueError(f"not catalog quantities: {', '.join(unknown)}")
    return pl.Schema(
        {"instance_id": pl.String(), "ts": pl.Datetime("us", "UTC"), **{q: pl.Float64() for q in names}}
    )


async def range_frame(
    client: PromClient,
    instances: Sequence[Instance],
    quantities: Iterable[str],
    start: datetime,
    end: datetime,
    step: timedelta,
    *,
    window: timedelta | None = None,
) -> pl.DataFrame:
    """Every quantity of every instance at each step of [start, end]; rates and latencies cover
    `window` before each point (default: the step, at least MIN_WINDOW). The step is widened as
    needed to stay under Prometheus's point limit."""
    step = fit_step(start, end, step)
    span = window if window is not None else max(step, MIN_WINDOW)

    async def run(promql: str) -> list[dict[str, Any]]:
        return await client.query_range(promql, start, end, step)

    return await _frame(client, instances, quantities, span, run)


async def instant_frame(
    client: PromClient,
    instances: Sequence[Instance],
    quantities: Iterable[str],
    at: datetime,
    window: timedelta,
) -> pl.DataFrame:
    """One row per instance at `at`: gauges as they were then, everything windowed over `window`
    (any length: a 30-day `rate` is one point)."""

    async def run(promql: str) -> list[dict[str, Any]]:
        return await client.query(promql, at)

    return await _frame(client, instances, quantities, window, run)


async def detection_frame(
    client: PromClient, instances: Sequence[Instance], rules: CompiledRules, at: datetime, step: timedelta
) -> pl.DataFrame:
    """What the rules read for `instances` at `at`: their quantities over the rules' widest window."""
    return await range_frame(client, instances, rules.quantities, at - rules.max_window, at, step)


async def _frame(
    client: PromClient,
    instances: Sequence[Instance],
    quantities: Iterable[str],
    window: timedelta,
    run: Query,
) -> pl.DataFrame:
    schema = frame_schema(quantities)
    names = [q for q in schema.names() if q not in ("instance_id", "ts")]
    batches = [b for b in _batches(instances) if names]
    limit = asyncio.Semaphore(client.workers)  # queued calls would eat into each call's deadline

    async def bounded(promql: str) -> list[dict[str, Any]]:
        async with limit:
            return await run(promql)

    jobs: list[tuple[Batch, tuple[str, InfoSource] | None, Awaitable[list[dict[str, Any]]]]] = []
    for batch in batches:
        builder = _Builder(load_engine_map(batch.engine), batch.scope(), duration(window))
        exprs = sorted((q, e) for q in names if (e := builder.expression(q)) is not None)
        for i in range(0, len(exprs), _QUANTITIES_PER_QUERY):
            jobs.append((batch, None, bounded(_tagged(exprs[i : i + _QUANTITIES_PER_QUERY]))))
        for name, source in builder.info_sources(names).items():
            jobs.append((batch, (name, source), bounded(builder.sel(source))))
    answers = await asyncio.gather(*(job for _, _, job in jobs), return_exceptions=True)
    # Every query ran to its end (each is bounded by the client's deadline); the first failure is
    # the answer, so no task is left behind with an unread exception.
    results: list[list[dict[str, Any]]] = []
    for answer in answers:
        if isinstance(answer, BaseException):
            raise answer
        results.append(answer)
    # Thousands of points per series are real frame work: off the event loop.
    return await asyncio.to_thread(_assemble, [(b, i) for b, i, _ in jobs], results, schema, names)


def _assemble(
    jobs: Sequence[tuple[Batch, tuple[str, InfoSource] | None]],
    results: Sequence[list[dict[str, Any]]],
    schema: pl.Schema,
    names: Sequence[str],
) -> pl.DataFrame:
    parts = [
        _long(batch, matrix_frame(result) if info is None else _info_values(matrix_frame(result), *info))
        for (batch, info), result in zip(jobs, results, strict=True)
    ]
    return _pivot(parts, schema, names)


# --- batches: instances of one engine whose labels fit in one query ----------------------------------


@dataclass(frozen=True, slots=True)
class Batch:
    engine: str
    members: tuple[tuple[str, str | None, str], ...]  # (instance_id, job, instance)

    def scope(self) -> tuple[Matcher, ...]:
        matchers = [Matcher("instance", "=~", alternation(m[2] for m in self.members))]
        if all(m[1] is not None for m in self.members):
            matchers.append(Matcher("job", "=~", alternation(m[1] or "" for m in self.members)))
        return tuple(matchers)

    def lookup(self) -> pl.DataFrame:
        return pl.DataFrame(
            {
                "instance_id": [m[0] for m in self.members],
                "job": [m[1] for m in self.members],
                "instance": [m[2] for m in self.members],
            },
            schema={"instance_id": pl.String, "job": pl.String, "instance": pl.String},
        )


def _batches(instances: Sequence[Instance]) -> list[Batch]:
    by_engine: dict[str, list[tuple[str, str | None, str]]] = {}
    for inst in instances:
        ident = identity(inst)
        if ident is not None:
            by_engine.setdefault(inst.engine.value, []).append((inst.id, *ident))
    out: list[Batch] = []
    for engine, members in sorted(by_engine.items()):
        current: list[tuple[str, str | None, str]] = []
        size = 0
        for member in members:
            cost = len(member[2]) + len(member[1] or "") + 2
            if current and size + cost > _MAX_REGEX_CHARS:
                out.append(Batch(engine, tuple(current)))
                current, size = [], 0
            current.append(member)
            size += cost
        out.append(Batch(engine, tuple(current)))
    return out


# --- expressions ------------------------------------------------------------------------------------


def _keys(selector: Selector, histogram: bool) -> list[str]:
    return [selector.metric + part for part in _HISTOGRAM_PARTS] if histogram else [selector.metric]


def _required(source: Source) -> list[tuple[Selector, bool]]:
    """(selector, is_histogram) of what must be present for `source` to apply (normalize's rule)."""
    match source:
        case GaugeSumSource():
            return [(t, False) for t in source.terms if not t.optional]
        case CounterRatioSource():
            return [(source.numerator, False), (source.denominator, False)]
        case HistogramSumSource():
            return [(t, True) for t in source.terms]
        case HistogramSource():
            return [(source, True)]
        case _:
            return [(source, False)]


@dataclass(frozen=True, slots=True)
class _Builder:
    emap: EngineMap
    scope: tuple[Matcher, ...]  # the batch's instances
    window: str

    # -- selectors and building blocks

    def _scope(self) -> list[Matcher]:
        # Series carrying these labels are re-exports (the vLLM router's `server`), not the engine's own.
        return [*self.scope, *(Matcher(label, "=", "") for label in self.emap.drop_series_with_labels)]

    def sel(self, selector: Selector, suffix: str = "") -> str:
        matchers = self._scope()
        matchers += [Matcher(k, "=~", alternation(v)) for k, v in sorted(selector.where.items())]
        matchers += [Matcher(k, "!~", alternation(v)) for k, v in sorted(selector.where_not.items())]
        return f"{selector.metric}{suffix}{{{', '.join(m.render() for m in matchers)}}}"

    def _names(self, names: Iterable[str], *extra: Matcher) -> str:
        matchers = [Matcher("__name__", "=~", alternation(names)), *self._scope(), *extra]
        return f"group by ({_BY}) ({{{', '.join(m.render() for m in matchers)}}})"

    def _collapse(self, expr: str) -> str:
        # SGLang repeats one state per TP/PP rank: those series collapse by max before any sum.
        if not self.emap.replica_labels:
            return expr
        return f"max without ({', '.join(self.emap.replica_labels)}) ({expr})"

    def _rate(self, selector: Selector, suffix: str = "") -> str:
        return f"sum by ({_BY}) ({self._collapse(f'rate({self.sel(selector, suffix)}[{self.window}])')})"

    # -- when a source applies: its metrics are present (and its era holds)

    def _present(self, source: Source) -> str:
        parts = [self._names(_keys(selector, histogram)) for selector, histogram in _required(source)]
        present = " and ".join(f"({p})" for p in parts)
        if isinstance(source, CounterSource) and source.absent_is_zero_when:
            # A lazily created counter missing while its witnesses are present is 0, not unknown.
            present = f"({present}) or ({self._names(source.absent_is_zero_when)})"
        return present

    def _era_match(self, index: int) -> str:
        era = self.emap.eras[index]
        parts = [self._names(era.any_metric)] if era.any_metric else []
        parts += [self._names(self._map_names(), Matcher(label, "!=", "")) for label in era.any_label]
        return " or ".join(f"({p})" for p in parts)

    def _era(self, hints: Iterable[str]) -> str:
        """Instances whose first matching era (normalize's version hint) is one of `hints`."""
        wanted = set(hints)
        parts = []
        for i, era in enumerate(self.emap.eras):
            if era.hint not in wanted:
                continue
            earlier = [f"({self._era_match(j)})" for j in range(i)]
            part = f"({self._era_match(i)})"
            parts.append(f"({part} unless ({' or '.join(earlier)}))" if earlier else part)
        return " or ".join(parts)  # EngineMap validation guarantees every hint is declared

    def _map_names(self) -> set[str]:
        names: set[str] = set()
        for qmap in self.emap.quantities.values():
            for source in qmap.sources:
                selectors = (
                    [(t, False) for t in source.terms]
                    if isinstance(source, GaugeSumSource)
                    else _required(source)
                )
                for selector, histogram in selectors:
                    names.update(_keys(selector, histogram))
        return names

    def _applies(self, source: Source) -> str:
        present = self._present(source)
        return f"({present}) and ({self._era(source.eras)})" if source.eras else present

    def _choose(
        self, sources: Sequence[Source], value: Callable[[Source], str | None], zero: bool
    ) -> str | None:
        """The first applicable source's value; with `zero`, 0 where the source applies but no series
        matched its labels (a counter whose labelled children were never created)."""
        usable = [(s, v) for s in sources if (v := value(s)) is not None]
        if not usable:
            return None
        if len(usable) == 1 and not usable[0][0].eras:
            source, expr = usable[0]
            return f"({expr}) or (0 * ({self._present(source)}))" if zero else expr
        parts: list[str] = []
        applies = [self._applies(s) for s, _ in usable]
        for i, (_, expr) in enumerate(usable):
            filled = f"({expr}) or (0 * ({applies[i]}))" if zero else expr
            part = f"(({filled}) and ({applies[i]}))"
            if i:
                part += f" unless ({' or '.join(f'({a})' for a in applies[:i])})"
            parts.append(f"({part})")
        return " or ".join(parts)

    # -- values of one source

    def _gauge(self, source: Source) -> str | None:
        match source:
            case GaugeSource():
                series = self._collapse(self.sel(source))
                if source.valid_range is not None:
                    low, high = source.valid_range
                    series = f"(({series}) >= {low!r}) <= {high!r}"
                expr = f"{_AGGREGATE[source.aggregate]} by ({_BY}) ({series})"
            case GaugeSumSource():
                fn = _AGGREGATE[source.aggregate]
                terms = [(t, f"{fn} by ({_BY}) ({self._collapse(self.sel(t))})") for t in source.terms]
                anchor = next(e for t, e in terms if not t.optional)
                expr = " + ".join(f"({e} or 0 * {anchor})" if t.optional else f"({e})" for t, e in terms)
            case _:
                return None
        return expr if source.scale == 1.0 else f"({expr}) * {source.scale!r}"

    def _counter(self, source: Source, rate: bool) -> str | None:
        if not isinstance(source, CounterSource):
            return None
        if rate:
            return self._rate(source)
        return f"sum by ({_BY}) ({self._collapse(self.sel(source))})"

    def _ratio(self, source: Source) -> str | None:
        if isinstance(source, CounterRatioSource):
            num, den = self._rate(source.numerator), self._rate(source.denominator)
            return f"({num} or 0 * {den}) / ({den} > 0)"
        return self._gauge(source)

    def _mean(self, selector: Selector) -> str:
        return f"{self._rate(selector, '_sum')} / ({self._rate(selector, '_count')} > 0)"

    def _quantile(self, selector: Selector, q: float) -> str:
        buckets = self._collapse(f"rate({self.sel(selector, '_bucket')}[{self.window}])")
        return f"histogram_quantile({q!r}, sum by ({_BY}, le) ({buckets}))"

    def _latency(self, source: Source, q: float | None) -> str | None:
        # TGI's TTFT is approximated as a sum of histograms: their means and quantiles add up.
        match source:
            case HistogramSource():
                terms: tuple[Selector, ...] = (source,)
            case HistogramSumSource():
                terms = source.terms
            case _:
                return None
        parts = [self._mean(t) if q is None else self._quantile(t, q) for t in terms]
        return " + ".join(f"({p})" for p in parts)

    # -- quantities

    def _sources(self, name: str) -> tuple[Source, ...]:
        qmap = self.emap.quantities.get(name)
        return qmap.sources if qmap is not None else ()

    def _counter_rate(self, name: str) -> str | None:
        return self._choose(self._sources(name), lambda s: self._counter(s, rate=True), zero=True)

    def expression(self, name: str) -> str | None:
        """PromQL of one catalog quantity for this engine, or None when the map cannot feed it."""
        quantity = CATALOG[name]
        if name in ("request_rate", "error_rate"):
            success = self._counter_rate("requests_success_total")
            failure = self._counter_rate("requests_failure_total")
            if success is None:
                return None
            if name == "request_rate":
                # Without a failure counter (SGLang v0.3) every finished request counts as a success.
                return success if failure is None else f"({success}) + (({failure}) or 0 * ({success}))"
            return None if failure is None else f"({failure}) / ((({success}) + ({failure})) > 0)"
        if quantity.kind is Kind.RATE:
            (base,) = quantity.derived_from
            return self._counter_rate(base)
        if quantity.kind is Kind.QUANTILE:
            (base,) = quantity.derived_from
            q = quantity.quantile
            return self._choose(self._sources(base), lambda s: self._latency(s, q), zero=False)
        sources = self._sources(name)
        if any(isinstance(s, InfoSource) for s in sources):
            return None  # labels hold the number: see info_sources
        match quantity.kind:
            case Kind.GAUGE:
                return self._choose(sources, self._gauge, zero=False)
            case Kind.COUNTER:
                return self._choose(sources, lambda s: self._counter(s, rate=False), zero=True)
            case Kind.RATIO:
                return self._choose(sources, self._ratio, zero=False)
            case Kind.MEAN:
                return self._choose(sources, lambda s: self._latency(s, None), zero=False)
        return None

    def info_sources(self, names: Iterable[str]) -> dict[str, InfoSource]:
        """Quantities read from info-series labels (vLLM's num_gpu_blocks x block_size), which PromQL
        cannot multiply: their series are fetched as they are and multiplied here."""
        out: dict[str, InfoSource] = {}
        for name in names:
            first = next(iter(self._sources(name)), None)
            if isinstance(first, InfoSource):
                out[name] = first
        return out


def _tagged(items: Sequence[tuple[str, str]]) -> str:
    """One query for several quantities, each result series labelled with its quantity."""
    return " or ".join(f'label_replace(({expr}), "{_TAG}", {quote(name)}, "", "")' for name, expr in items)


# --- results to the detection frame -----------------------------------------------------------------


def _long(batch: Batch, frame: pl.DataFrame) -> pl.DataFrame:
    """(instance_id, ts, quantity, value) rows of one query's result frame."""
    decoded = frame.select(
        pl.col("labels")
        .str.json_decode(pl.Struct({"job": pl.String, "instance": pl.String, _TAG: pl.String}))
        .struct.unnest(),
        "ts",
        "value",
    )
    lookup = batch.lookup()
    exact = decoded.join(lookup.filter(pl.col("job").is_not_null()), on=["job", "instance"], how="inner")
    # An instance known without its job matches on `instance` alone.
    loose = decoded.join(lookup.filter(pl.col("job").is_null()).drop("job"), on="instance", how="inner")
    return pl.concat(
        [part.select("instance_id", "ts", pl.col(_TAG).alias("quantity"), "value") for part in (exact, loose)]
    )


def _info_values(frame: pl.DataFrame, name: str, source: InfoSource) -> pl.DataFrame:
    """Raw info series to one value per (job, instance, ts): the product of the named labels,
    aggregated across series as the map says; tagged with the quantity like the other results."""
    fields = {label: pl.String for label in ("job", "instance", *source.product_of_labels)}
    labels = pl.col("labels").str.json_decode(pl.Struct(fields))
    product = pl.lit(1.0)
    for label in source.product_of_labels:
        product = product * labels.struct.field(label).cast(pl.Float64, strict=False)
    agg = {"sum": pl.sum, "max": pl.max, "min": pl.min, "mean": pl.mean}[source.aggregate]
    return (
        frame.with_columns(job=labels.struct.field("job"), instance=labels.struct.field("instance"))
        .with_columns(product=product)
        .filter(pl.col("product").is_not_null())
        .group_by("job", "instance", "ts")
        .agg(agg("product").alias("value"))
        .select(
            pl.struct("job", "instance", pl.lit(name).alias(_TAG)).struct.json_encode().alias("labels"),
            "ts",
            "value",
        )
    )


def _pivot(parts: list[pl.DataFrame], schema: pl.Schema, names: Sequence[str]) -> pl.DataFrame:
    long = pl.concat(parts) if parts else pl.DataFrame()
    if long.height == 0:
        return pl.DataFrame(schema=schema)
    wide = long.pivot(on="quantity", index=["instance_id", "ts"], values="value", aggregate_function="first")
    missing = [pl.lit(None, pl.Float64).alias(q) for q in names if q not in wide.columns]
    # NaN (no observation in the window) and infinities mean "unknown", as in `normalize`.
    finite = [
        pl.when(pl.col(q).is_finite()).then(pl.col(q)).otherwise(None).alias(q)
        for q in names
        if q in wide.columns
    ]
    return (
        wide.with_columns(*missing, *finite)
        .select(list(schema.names()))
        .cast(schema)
        .sort("ts", "instance_id")
    )


__all__ = ["MIN_WINDOW", "detection_frame", "frame_schema", "identity", "instant_frame", "range_frame"]
