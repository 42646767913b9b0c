"""Detection: rules compiled once to Polars expressions, evaluated over a whole fleet's frame at once.

Input frame: one row per (instance_id, ts) with `instance_id: String`, `engine: String`,
`ts: Datetime(us, UTC)` and one Float64 column per catalog quantity (any subset; null = unknown).
Each rule reads its quantities over a look-back window ending at the evaluation time, `(at - window,
at]`: its `over`, or the lookback (5m, Prometheus's default lookback delta) for the plain latest value.
Nulls are skipped; a window without a sample of the rule's quantity makes the rule *insufficient*
for that instance, which never yields a finding. `and:` conditions combine with Kleene logic: one
known-false condition decides the rule false; an unknown one leaves it insufficient.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

import polars as pl

from perfagent.catalog import CATALOG
from perfagent.rules import (
    LoadedRule,
    Op,
    Reduce,
    RuleSet,
    Severity,
    TemplatePart,
    format_duration,
    parse_template,
)

DEFAULT_LOOKBACK: Final = timedelta(minutes=5)

RESULT_SCHEMA: Final = pl.Schema(
    {
        "instance_id": pl.String(),
        "engine": pl.String(),
        "rule": pl.String(),
        "type": pl.String(),
        "severity": pl.String(),
        "quantity": pl.String(),
        "unit": pl.String(),
        "op": pl.String(),
        "value": pl.Float64(),
        "threshold": pl.Float64(),
        "window_start": pl.Datetime("us", "UTC"),
        "window_end": pl.Datetime("us", "UTC"),
        "summary": pl.String(),
        "description": pl.String(),
        "recommendation": pl.String(),
        "labels": pl.String(),  # JSON object
    }
)

INSUFFICIENT_SCHEMA: Final = pl.Schema(
    {
        "instance_id": pl.String(),
        "engine": pl.String(),
        "rule": pl.String(),
        "quantity": pl.String(),
        "reason": pl.String(),
    }
)

_AGE: Final = "__age"  # at - ts, for the window masks of one evaluation


@dataclass(frozen=True, slots=True)
class Term:
    """One reduced input of a rule: a quantity, how it is reduced, and over which window."""

    quantity: str
    reduce: Reduce
    window: timedelta

    @property
    def column(self) -> str:
        return f"__{self.quantity}|{self.reduce.value}|{int(self.window / timedelta(milliseconds=1))}ms"


@dataclass(frozen=True, slots=True, eq=False)
class CompiledRule:
    """A rule as Polars expressions over its terms' columns (plus `instance_id` and `engine`)."""

    source: LoadedRule
    window: timedelta
    main: Term
    conditions: tuple[tuple[Term, Op, float], ...]
    hit: pl.Expr  # where the rule holds, a struct (severity, value, threshold); null elsewhere
    missing: tuple[pl.Expr, ...]  # per quantity: the rule is undecided and the quantity has no data
    summary: tuple[TemplatePart, ...]
    description: tuple[TemplatePart, ...]

    @property
    def name(self) -> str:
        return self.source.rule.name

    @property
    def terms(self) -> tuple[Term, ...]:
        return (self.main, *(t for t, _, _ in self.conditions))


@dataclass(frozen=True, slots=True, eq=False)
class CompiledRules:
    """Every rule of a RuleSet, compiled; reuse it for every evaluation."""

    rules: tuple[CompiledRule, ...]
    terms: tuple[Term, ...]
    lookback: timedelta
    table: pl.DataFrame  # one row per rule: its constant result columns
    numbers: tuple[pl.Expr, ...]  # every formatted number the templates use, as `__fmt|…` columns
    texts: Mapping[str, tuple[pl.Expr, pl.Expr]]  # per rule, its summary and description
    no_sample: pl.Expr  # the reason for an insufficient (rule, quantity) row

    @property
    def max_window(self) -> timedelta:
        """How much history before `at` an evaluation reads: load at least this much."""
        return max((t.window for t in self.terms), default=self.lookback)

    @property
    def quantities(self) -> frozenset[str]:
        return frozenset(t.quantity for t in self.terms)


@dataclass(frozen=True, slots=True)
class Evaluation:
    """Findings whose condition holds at `at`, and the rules that lacked data to decide."""

    at: datetime
    results: pl.DataFrame  # RESULT_SCHEMA, one row per (instance_id, rule) that holds
    insufficient: pl.DataFrame  # INSUFFICIENT_SCHEMA, one row per (instance_id, rule, quantity)


# --- compilation -----------------------------------------------------------------------------------

_END: Final = "__end"  # the evaluation time of a row
_SEP: Final = "\x1f"  # joins rule and quantity in column names; rule names cannot contain it
_HIT_PREFIX: Final = "__hit|"  # hit columns are named after their rule, apart from the frame's own
_HIT: Final = pl.Struct({"severity": pl.String(), "value": pl.Float64(), "threshold": pl.Float64()})


def _compare(left: pl.Expr, op: Op, right: float) -> pl.Expr:
    if op is Op.GT:
        return left > right
    if op is Op.GE:
        return left >= right
    if op is Op.LT:
        return left < right
    return left <= right


def _number(expr: pl.Expr, spec: str) -> pl.Expr:
    """A number as text: 4 significant digits by default, `.Nf` N decimals, `.N%` a ratio in percent."""
    if not spec:
        return expr.round_sig_figs(4).cast(pl.String).str.strip_suffix(".0")
    digits, percent = int(spec[1]), spec.endswith("%")
    scaled = expr * 100 if percent else expr
    if digits == 0:
        text = scaled.round(0).cast(pl.Int64).cast(pl.String)
    elif digits == 1:
        text = scaled.round(1).cast(pl.String)  # float-to-text always keeps one decimal
    else:
        # Float-to-text drops trailing zeros (0.90 -> "0.9"): pad the decimals back.
        parts = scaled.round(digits).cast(pl.String).str.split_exact(".", 1).struct
        decimals = parts.field("field_1").fill_null("").str.pad_end(digits, "0")
        text = pl.concat_str(parts.field("field_0"), pl.lit("."), decimals)
    return pl.concat_str(text, pl.lit("%")) if percent else text


_FIELD_COLUMNS: Final[Mapping[str, str]] = {
    "instance": "instance_id",
    "engine": "engine",
    "unit": "unit",
    "severity": "severity",
    "quantity": "quantity",
    "rule": "rule",
    "type": "type",
    "window": "__window",
}


def _format_column(field: str, spec: str) -> str:
    return f"__fmt|{field}|{spec}"


def _render(parts: Sequence[TemplatePart]) -> pl.Expr:
    """A template over the results' columns; numbers come from the `__fmt|…` columns."""
    pieces: list[pl.Expr] = []
    for part in parts:
        if part.literal:
            pieces.append(pl.lit(part.literal))
        if part.field in ("value", "threshold"):
            pieces.append(pl.col(_format_column(part.field, part.spec)))
        elif part.field is not None:
            pieces.append(pl.col(_FIELD_COLUMNS[part.field]).fill_null(""))
    return pl.concat_str(pieces) if pieces else pl.lit("")


def _compile_rule(lr: LoadedRule, lookback: timedelta) -> CompiledRule:
    rule = lr.rule
    window = rule.over or lookback
    main = Term(rule.quantity, rule.reduce, window)
    conditions = tuple((Term(c.quantity, c.reduce or rule.reduce, window), c.op, c.value) for c in rule.and_)
    value = pl.col(main.column)
    ladder = rule.ladder()  # highest severity first
    conjunction = _compare(value, rule.op, ladder[-1][1])
    for term, op, threshold in conditions:
        conjunction = conjunction & _compare(pl.col(term.column), op, threshold)  # Kleene AND
    applies = (
        pl.col("engine").is_in([e.value for e in rule.engines]).fill_null(False) if rule.engines else None
    )

    # Nested when/then built from the lowest rung outwards: the highest rung reached wins.
    severity: pl.Expr = pl.lit(None, pl.String)
    reached: pl.Expr = pl.lit(None, pl.Float64)
    for sev, t in reversed(ladder):
        reached_rung = _compare(value, rule.op, t)
        severity = pl.when(reached_rung).then(pl.lit(sev.value)).otherwise(severity)
        reached = pl.when(reached_rung).then(pl.lit(t)).otherwise(reached)

    holds = value.is_not_null() & conjunction.fill_null(False)
    # The rule's own quantity missing is always insufficient; an `and:` quantity missing only when
    # the other conditions leave the outcome open (one known-false condition decides the rule).
    undecided = value.is_null() | conjunction.is_null()
    if applies is not None:
        holds, undecided = applies & holds, applies & undecided
    hit = pl.struct(severity.alias("severity"), value.alias("value"), reached.alias("threshold"))
    # One term per quantity: a rule's terms share its window, so a quantity without a sample lacks
    # one for every reduction at once.
    terms = {t.quantity: t for t in (main, *(t for t, _, _ in conditions))}.values()
    return CompiledRule(
        source=lr,
        window=window,
        main=main,
        conditions=conditions,
        hit=pl.when(holds).then(hit).otherwise(pl.lit(None, _HIT)).alias(f"{_HIT_PREFIX}{rule.name}"),
        missing=tuple(
            (undecided & pl.col(t.column).is_null()).alias(f"{rule.name}{_SEP}{t.quantity}") for t in terms
        ),
        summary=parse_template(rule.annotations.summary),
        description=parse_template(rule.annotations.description),
    )


def _rule_table(rules: Sequence[CompiledRule]) -> pl.DataFrame:
    def unit(quantity: str) -> str:
        return CATALOG[quantity].unit.value if quantity in CATALOG else ""

    loaded = [cr.source.rule for cr in rules]
    return pl.DataFrame(
        {
            "rule": [r.name for r in loaded],
            "type": [r.type.value for r in loaded],
            "quantity": [r.quantity for r in loaded],
            "unit": [unit(r.quantity) for r in loaded],
            "op": [r.op.value for r in loaded],
            "recommendation": [r.recommendation for r in loaded],
            "labels": [json.dumps(r.labels, sort_keys=True) for r in loaded],
            "__length": [cr.window for cr in rules],
            "__window": [format_duration(cr.window) for cr in rules],
        },
        schema={
            "rule": pl.String,
            "type": pl.String,
            "quantity": pl.String,
            "unit": pl.String,
            "op": pl.String,
            "recommendation": pl.String,
            "labels": pl.String,
            "__length": pl.Duration("us"),
            "__window": pl.String,
        },
    )


def compile_rules(
    ruleset: RuleSet | Iterable[LoadedRule], *, lookback: timedelta = DEFAULT_LOOKBACK
) -> CompiledRules:
    """Compile every rule once; the result is immutable and reused for every evaluation."""
    if lookback <= timedelta(0):
        raise ValueError("lookback must be longer than 0s")
    rules = tuple(_compile_rule(lr, lookback) for lr in ruleset)
    terms = tuple(dict.fromkeys(t for r in rules for t in r.terms))
    # Numbers are formatted once over every rule's results; each rule's templates then run on its
    # own rows only (one concat_str each), not on every row behind a when/then per rule.
    formats = dict.fromkeys(
        (p.field, p.spec)
        for cr in rules
        for p in (*cr.summary, *cr.description)
        if p.field in ("value", "threshold")
    )
    numbers = tuple(
        _number(pl.col(field), spec).alias(_format_column(field, spec)) for field, spec in formats
    )
    texts = {
        cr.name: (_render(cr.summary).alias("summary"), _render(cr.description).alias("description"))
        for cr in rules
    }
    windows = {cr.name: format_duration(cr.window) for cr in rules}
    no_sample = pl.format(
        "no sample of '{}' in the {} window",
        "quantity",
        pl.col("rule").replace_strict(windows, return_dtype=pl.String),
    )
    return CompiledRules(rules, terms, lookback, _rule_table(rules), numbers, texts, no_sample)


# --- evaluation at one time ------------------------------------------------------------------------


def _utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _check_frame(names: Sequence[str]) -> None:
    missing = [c for c in ("instance_id", "engine", "ts") if c not in names]
    if missing:
        raise ValueError(f"the frame lacks column(s) {', '.join(missing)}")


def _window_aggs(compiled: CompiledRules, present: set[str]) -> tuple[list[pl.Expr], list[pl.Expr]]:
    """Row-wise masks and per-instance aggregations for every term whose column is present.

    Masks turn samples outside a term's window into nulls, so every aggregation stays on Polars'
    fast path (a plain mean/max/min, or min_by age for `last`) instead of a filter per group.
    """
    masks: dict[str, pl.Expr] = {}
    aggs: list[pl.Expr] = [pl.col("engine").min_by(_AGE).alias("engine")]
    widest = compiled.max_window
    for term in compiled.terms:
        if term.quantity not in present:
            continue
        q = pl.col(term.quantity)
        in_window = pl.col(_AGE) < term.window
        if term.reduce is Reduce.LAST:
            # min_by skips null keys: the key is the sample's age where the sample is known.
            key = f"__age|{term.quantity}|{term.window}"
            masks[key] = pl.when(in_window & q.is_not_null()).then(pl.col(_AGE))
            aggs.append(q.min_by(key).alias(term.column))
            continue
        source = term.quantity
        if term.window < widest:
            source = f"__in|{term.quantity}|{term.window}"
            masks[source] = pl.when(in_window).then(q)
        column = pl.col(source)
        if term.reduce is Reduce.MEAN:
            agg = column.mean()
        elif term.reduce is Reduce.MAX:
            agg = column.max()
        else:
            agg = column.min()
        aggs.append(agg.alias(term.column))
    return [e.alias(k) for k, e in masks.items()], aggs


def _window(
    frame: pl.DataFrame | pl.LazyFrame, columns: list[str], start: datetime, end: datetime
) -> pl.DataFrame:
    """The rows with start < ts <= end: a binary search when the frame is in time order (as scrapes
    are appended), a filter otherwise."""
    if isinstance(frame, pl.DataFrame) and frame.height and frame["ts"].is_sorted():
        ts = frame["ts"]
        lo = int(ts.search_sorted(start, side="right"))
        hi = int(ts.search_sorted(end, side="right"))
        return frame.select(columns).slice(lo, hi - lo)
    window = frame.lazy().select(columns).filter((pl.col("ts") > start) & (pl.col("ts") <= end))
    out: pl.DataFrame = window.collect()
    return out


def _results(compiled: CompiledRules, rows: pl.LazyFrame) -> pl.DataFrame:
    """RESULT_SCHEMA rows for every rule that holds, from rows of term columns and `__end`.

    One pass for all rules: each rule's hit struct, unpivoted to one row per (row, rule) hit, joined
    with the rules' constant columns; then each rule's rows get its text.
    """
    hits = [cr.hit for cr in compiled.rules]
    if not hits:
        return pl.DataFrame(schema=RESULT_SCHEMA)
    found = (
        rows.select("instance_id", "engine", _END, *hits)
        .unpivot(index=["instance_id", "engine", _END], variable_name="rule", value_name="hit")
        .filter(pl.col("hit").is_not_null())
        .unnest("hit")
        .with_columns(pl.col("rule").str.strip_prefix(_HIT_PREFIX))
        .join(compiled.table.lazy(), on="rule", how="left")
        .with_columns(window_start=pl.col(_END) - pl.col("__length"), window_end=pl.col(_END))
        .with_columns(compiled.numbers)
        .collect()
    )
    columns = list(RESULT_SCHEMA)
    rendered = [
        part.lazy().with_columns(compiled.texts[name]).select(columns)
        for (name,), part in found.partition_by("rule", as_dict=True).items()
        if isinstance(name, str)
    ]
    if not rendered:
        return pl.DataFrame(schema=RESULT_SCHEMA)
    out: pl.DataFrame = pl.concat(rendered, rechunk=False).collect()
    return out


def _insufficient(compiled: CompiledRules, rows: pl.LazyFrame, absent: frozenset[str]) -> pl.LazyFrame:
    """(instance, rule, quantity) for every undecided rule and each of its quantities without data."""
    flags = [flag for cr in compiled.rules for flag in cr.missing]
    if not flags:
        return pl.LazyFrame(schema=INSUFFICIENT_SCHEMA)
    not_collected = pl.format("'{}' is not in the data", "quantity")
    return (
        rows.select("instance_id", "engine", *flags)
        .unpivot(index=["instance_id", "engine"], variable_name="pair")
        .filter(pl.col("value"))
        .with_columns(pl.col("pair").str.split_exact(_SEP, 1).struct.rename_fields(["rule", "quantity"]))
        .unnest("pair")
        .select(
            "instance_id",
            "engine",
            "rule",
            "quantity",
            reason=pl.when(pl.col("quantity").is_in(sorted(absent)))
            .then(not_collected)
            .otherwise(compiled.no_sample),
        )
        .cast(INSUFFICIENT_SCHEMA)
    )


def evaluate(compiled: CompiledRules, frame: pl.DataFrame | pl.LazyFrame, at: datetime) -> Evaluation:
    """Evaluate every rule for every instance at `at`, reading `(at - window, at]` of `frame`.

    Instances with no row at all in the widest window are not reported (the caller knows its fleet).
    """
    at = _utc(at)
    names = frame.collect_schema().names()
    _check_frame(names)
    present = set(names) & compiled.quantities
    absent = compiled.quantities - present
    masks, aggs = _window_aggs(compiled, present)
    rows = _window(frame, ["instance_id", "engine", "ts", *sorted(present)], at - compiled.max_window, at)
    agg = (
        rows.with_columns((pl.lit(at) - pl.col("ts")).alias(_AGE))
        .with_columns(masks)
        .group_by("instance_id")
        .agg(aggs)
        .with_columns(
            *(pl.lit(None, pl.Float64).alias(t.column) for t in compiled.terms if t.quantity in absent),
            pl.lit(at, dtype=pl.Datetime("us", "UTC")).alias(_END),
        )
        .lazy()
    )
    results = _results(compiled, agg).sort("instance_id", "rule")
    insufficient = _insufficient(compiled, agg, absent).sort("instance_id", "rule", "quantity").collect()
    return Evaluation(at, results, insufficient)


# --- evaluation at every timestamp -----------------------------------------------------------------


def _rolling_terms(compiled: CompiledRules, present: set[str]) -> list[pl.Expr]:
    """Every term at every row: the same window `(ts - window, ts]`, per instance."""
    exprs: list[pl.Expr] = []
    for term in compiled.terms:
        if term.quantity not in present:
            exprs.append(pl.lit(None, pl.Float64).alias(term.column))
            continue
        q = pl.col(term.quantity)
        expr: pl.Expr
        if term.reduce is Reduce.LAST:
            # The latest known sample, if it falls inside the window (rows are sorted by ts).
            latest = pl.when(q.is_not_null()).then(pl.col("ts")).rolling_max_by("ts", term.window)
            expr = (
                pl.when(latest.over("instance_id").is_not_null())
                .then(q.forward_fill().over("instance_id"))
                .otherwise(None)
            )
        elif term.reduce is Reduce.MEAN:
            expr = q.rolling_mean_by("ts", term.window).over("instance_id")
        elif term.reduce is Reduce.MAX:
            expr = q.rolling_max_by("ts", term.window).over("instance_id")
        else:
            expr = q.rolling_min_by("ts", term.window).over("instance_id")
        exprs.append(expr.alias(term.column))
    return exprs


def evaluate_series(compiled: CompiledRules, frame: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
    """Evaluate every rule at every row's own timestamp, in one pass (backtests, `rules test`).

    Returns RESULT_SCHEMA rows where a rule holds, `window_end` being the evaluation time; the rows at
    one timestamp equal `evaluate(compiled, frame, at=ts).results` for instances sampled at `ts`.
    (instance_id, ts) must be unique.
    """
    names = frame.collect_schema().names()
    _check_frame(names)
    present = set(names) & compiled.quantities
    keep = ["instance_id", "engine", "ts", *sorted(present)]
    # Sorted once, eagerly: forward_fill over an instance needs its rows in time order.
    rows = frame.lazy().select(keep).collect().sort("instance_id", "ts")
    evaluated = rows.lazy().with_columns(
        *_rolling_terms(compiled, present), pl.col("ts").cast(pl.Datetime("us", "UTC")).alias(_END)
    )
    return _results(compiled, evaluated).sort("window_end", "instance_id", "rule")


# --- the specification in plain Python -------------------------------------------------------------

Sample = tuple[datetime, Mapping[str, float | None]]


@dataclass(frozen=True, slots=True)
class ReferenceFinding:
    instance_id: str
    rule: str
    severity: Severity
    value: float
    threshold: float


def _reduce(values: list[float], how: Reduce) -> float | None:
    if not values:
        return None
    result: float = values[-1]
    if how is Reduce.MEAN:
        result = sum(values) / len(values)
    elif how is Reduce.MAX:
        result = max(values)
    elif how is Reduce.MIN:
        result = min(values)
    return result


def evaluate_reference(
    ruleset: Iterable[LoadedRule],
    instances: Mapping[str, tuple[str, Sequence[Sample]]],
    at: datetime,
    *,
    lookback: timedelta = DEFAULT_LOOKBACK,
) -> tuple[list[ReferenceFinding], set[tuple[str, str, str]]]:
    """The rules' meaning as a per-instance loop: findings, and (instance, rule, quantity) lacking data.

    `instances` maps instance_id to (engine, samples sorted by time). Plain Python on purpose: the
    tests check the vectorized engine against it, and the benchmark measures against it.
    """
    at = _utc(at)
    rules = [(lr.rule, at - (lr.rule.over or lookback), lr.rule.ladder()) for lr in ruleset]
    earliest = min((start for _, start, _ in rules), default=at)
    findings: list[ReferenceFinding] = []
    insufficient: set[tuple[str, str, str]] = set()
    for instance_id, (engine, samples) in instances.items():
        end = bisect.bisect_right(samples, at, key=lambda s: s[0])
        if end == 0 or samples[end - 1][0] <= earliest:
            continue  # no sample in the widest window: the instance is not reported
        for rule, start, ladder in rules:
            if rule.engines and engine not in rule.engines:
                continue
            window = samples[bisect.bisect_right(samples, start, key=lambda s: s[0]) : end]

            def reduced(quantity: str, how: Reduce, window: Sequence[Sample] = window) -> float | None:
                return _reduce([v for _, values in window if (v := values.get(quantity)) is not None], how)

            value = reduced(rule.quantity, rule.reduce)
            outcomes: list[bool | None] = [None if value is None else rule.op.holds(value, ladder[-1][1])]
            missing = [rule.quantity] if value is None else []
            for c in rule.and_:
                v = reduced(c.quantity, c.reduce or rule.reduce)
                outcomes.append(None if v is None else c.op.holds(v, c.value))
                if v is None:
                    missing.append(c.quantity)
            if value is None or (False not in outcomes and None in outcomes):
                insufficient.update((instance_id, rule.name, q) for q in missing)
            elif all(outcomes):
                sev, threshold = next((s, t) for s, t in ladder if rule.op.holds(value, t))
                findings.append(ReferenceFinding(instance_id, rule.name, sev, value, threshold))
    return findings, insufficient
