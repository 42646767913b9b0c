"""Detection: rules compiled once to Polars expressions, evaluated over a whole fleet's frame at once.

Input frame: one row per (instance_id, ts) with `instance_id: String`, `engine: String` (or the
engines per instance passed apart), `ts: Datetime(us, UTC)` and one Float64 column per catalog
quantity (any subset; null = unknown). Each rule reads its quantities over a look-back window ending
at the evaluation time, `(at - window, at]`: its `over`, or the lookback (5m, Prometheus's default
lookback delta) for the plain latest value. Nulls are skipped; a window without a sample of the
rule's quantity (two for a trend) makes the rule *insufficient* for that instance, which never yields
a finding. `and:` conditions combine with Kleene logic: one known-false condition decides the rule
false; an unknown one leaves it insufficient. Trends (`slope`, `predict`) are Prometheus's
least-squares line (`deriv`, `predict_linear`), from window sums.

One evaluation reduces every rule's terms over each instance's rows of the window with NumPy
(`window_groups`: no loop over instances; the rows' layout is checked, never assumed; quantities in
a pool's parallel threads, as NumPy releases the GIL in its loops), then takes
the rules' verdicts over the per-instance rows in Polars and builds result rows only where a rule
holds.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Final, ParamSpec, TypeVar

import numpy as np
import polars as pl

from perfagent.catalog import CATALOG
from perfagent.rules import (
    LoadedRule,
    Op,
    Reduce,
    Rule,
    RuleSet,
    Severity,
    TemplatePart,
    format_duration,
    parse_template,
)
from perfagent.window_groups import Floats, Index, Mask, WindowGroups

DEFAULT_LOOKBACK: Final = timedelta(minutes=5)

_P = ParamSpec("_P")
_T = TypeVar("_T")

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


_TS: Final = pl.Datetime("us", "UTC")
# The per-instance queries (one row per instance, or per finding) run as written, in memory (no
# morsels to stream): planning is most of their cost, and the optimizer's passes, common
# subexpressions above all, cost more than they save on a few thousand rows.
_AS_WRITTEN: Final = pl.QueryOptFlags.none()
_END: Final = "__end"  # the evaluation time of a row


def _ms(d: timedelta) -> int:
    return int(d / timedelta(milliseconds=1))


@dataclass(frozen=True, slots=True)
class Term:
    """One reduced input of a rule: a quantity, how it is reduced, over which window, and for
    `predict` how far ahead."""

    quantity: str
    reduce: Reduce
    window: timedelta
    ahead: timedelta | None = None
    column: str = field(init=False, compare=False)  # its column in the per-instance frame
    fit: str = field(init=False, compare=False)  # a trend's window sums' prefix (shared per window)

    def __post_init__(self) -> None:
        # Named once: every evaluation reads them many times.
        ahead = f"+{_ms(self.ahead)}ms" if self.ahead is not None else ""
        window = f"{_ms(self.window)}ms"
        object.__setattr__(self, "column", f"__{self.quantity}|{self.reduce.value}{ahead}|{window}")
        object.__setattr__(self, "fit", f"__fit|{self.quantity}|{window}|")


_FIT_STATS: Final = ("n", "sx", "sxx", "sy", "sxy", "lo", "hi")


def _trend(term: Term, sums: Sequence[Any], where: Callable[[Any, Any, Any], Any]) -> Any:
    """A trend term from its window's sums over (x = ts - at in seconds, y) in `_FIT_STATS` order,
    as Prometheus's `linearRegression` does: the least-squares slope (`deriv`), or the line's value
    `ahead` seconds after `at` (`predict_linear`); slope 0 when every y is equal. Plain arithmetic
    and `where(condition, then, otherwise)`, so Polars expressions and NumPy arrays alike."""
    n, sx, sxx, sy, sxy, lo, hi = sums
    flat = lo == hi
    slope = where(flat, 0.0, (sxy - sx * sy / n) / (sxx - sx * sx / n))
    if term.reduce is not Reduce.PREDICT:
        return slope
    ahead = (term.ahead or timedelta(0)).total_seconds()
    return where(flat, lo, sy / n - slope * sx / n) + slope * ahead


def _when(condition: pl.Expr, then: Any, otherwise: Any) -> pl.Expr:
    return pl.when(condition).then(then).otherwise(otherwise)


def _fitted(term: Term) -> pl.Expr:
    """`_trend` as a Polars expression over the sums' columns; null under two samples."""
    sums = [pl.col(term.fit + s) for s in _FIT_STATS]
    return pl.when(sums[0] >= 2).then(_trend(term, sums, _when)).alias(term.column)


def _fitted_arrays(term: Term, sums: Sequence[Floats]) -> tuple[Floats, Mask]:
    """`_trend` over NumPy arrays of the sums: the values, and where known (two samples or more)."""
    known: Mask = sums[0] >= 2
    return _trend(term, sums, np.where), known


@dataclass(frozen=True, slots=True, eq=False)
class CompiledRule:
    """A rule as Polars expressions over its terms' columns (plus `instance_id` and `engine`)."""

    source: LoadedRule
    window: timedelta
    main: Term
    conditions: tuple[tuple[Term, Op, float], ...]
    rung: pl.Expr  # Int8: where the rule holds, its ladder's index of the rung reached; UNDECIDED; else -1
    missing: tuple[tuple[str, tuple[str, ...], str], ...]  # per quantity: its terms' columns; the reason
    texts: tuple[pl.Expr, pl.Expr]  # summary and description, over a result row's columns

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
    constants: pl.DataFrame  # one row per rule: the result columns that depend on the rule alone
    rungs: pl.DataFrame  # one row per (rule, rung): severity and threshold
    first_rung: Index  # per rule, its first row in `rungs`
    window_us: Index  # per rule, its window in microseconds
    rule_rank: Index  # per rule, its rank by name (the output order)
    pair_rank: Index  # per (rule, missing quantity), its rank likewise

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


def _render(parts: Sequence[TemplatePart], constants: Mapping[str, str]) -> pl.Expr:
    """A template as one concat_str over a result row; fields constant for the rule become literals."""
    pieces: list[str | pl.Expr] = []
    for part in parts:
        pieces.append(part.literal)
        if part.field in ("value", "threshold"):
            pieces.append(_number(pl.col(part.field), part.spec))
        elif part.field == "instance":
            pieces.append(pl.col("instance_id"))
        elif part.field in ("engine", "severity"):
            pieces.append(pl.col(part.field).fill_null(""))
        elif part.field is not None:
            pieces.append(constants[part.field])
    merged: list[str | pl.Expr] = []
    for piece in pieces:
        if isinstance(piece, str) and merged and isinstance(merged[-1], str):
            merged[-1] += piece
        elif not isinstance(piece, str) or piece:
            merged.append(piece)
    exprs = [pl.lit(p, pl.String) if isinstance(p, str) else p for p in merged]
    if not exprs:
        return pl.lit("", pl.String)
    return exprs[0] if len(exprs) == 1 else pl.concat_str(exprs)


def value_unit(rule: Rule) -> str:
    """The unit of a rule's value: its quantity's catalog unit, per second for a slope."""
    unit = CATALOG[rule.quantity].unit.value if rule.quantity in CATALOG else ""
    return f"{unit}/s" if rule.reduce is Reduce.SLOPE else unit


def _missing(window: timedelta, terms: Sequence[Term]) -> tuple[tuple[str, tuple[str, ...], str], ...]:
    """Per quantity of a rule: the columns of its terms (an undecided rule lacks the quantity where
    one of them has no value), and the reason reported then."""
    out = []
    for quantity in dict.fromkeys(t.quantity for t in terms):
        mine = [t for t in terms if t.quantity == quantity]
        need = "fewer than 2 samples" if any(t.reduce.trend for t in mine) else "no sample"
        reason = f"{need} of '{quantity}' in the {format_duration(window)} window"
        out.append((quantity, tuple(t.column for t in mine), reason))
    return tuple(out)


def _compile_rule(lr: LoadedRule, lookback: timedelta) -> CompiledRule:
    rule = lr.rule
    window = rule.over or lookback
    main = Term(rule.quantity, rule.reduce, window, rule.ahead_of())
    conditions = tuple(
        (Term(c.quantity, c.reduce or rule.reduce, window, rule.ahead_of(c)), c.op, c.value)
        for c in rule.and_
    )
    value = pl.col(main.column)
    ladder = rule.ladder()  # highest severity first
    conjunction = _compare(value, rule.op, ladder[-1][1])
    for term, op, threshold in conditions:
        conjunction = conjunction & _compare(pl.col(term.column), op, threshold)  # Kleene AND
    holds = value.is_not_null() & conjunction.fill_null(False)
    # The rule's own quantity missing is always insufficient; an `and:` quantity missing only when
    # the other conditions leave the outcome open (one known-false condition decides the rule).
    undecided = value.is_null() | conjunction.is_null()
    if rule.engines:
        applies = pl.col("engine").is_in([e.value for e in rule.engines]).fill_null(False)
        holds, undecided = applies & holds, applies & undecided
    # Nested when/then built from the lowest rung outwards: the highest rung reached wins.
    rung: pl.Expr = pl.lit(-1, pl.Int8)
    for i in reversed(range(len(ladder))):
        rung = pl.when(_compare(value, rule.op, ladder[i][1])).then(pl.lit(i, pl.Int8)).otherwise(rung)
    ahead = rule.ahead_of()
    constants = {
        "unit": value_unit(rule),
        "quantity": rule.quantity,
        "rule": rule.name,
        "type": rule.type.value,
        "window": format_duration(window),
        "ahead": format_duration(ahead) if ahead is not None else "",
    }
    return CompiledRule(
        source=lr,
        window=window,
        main=main,
        conditions=conditions,
        rung=pl.when(holds)
        .then(rung)
        .when(undecided)
        .then(pl.lit(UNDECIDED, pl.Int8))
        .otherwise(pl.lit(-1, pl.Int8)),
        missing=_missing(window, (main, *(t for t, _, _ in conditions))),
        texts=(
            _render(parse_template(rule.annotations.summary), constants).alias("summary"),
            _render(parse_template(rule.annotations.description), constants).alias("description"),
        ),
    )


def compile_rules(
    ruleset: RuleSet | Iterable[LoadedRule], *, lookback: timedelta = DEFAULT_LOOKBACK
) -> CompiledRules:
    """Compile every rule once; the result is immutable and reused for every evaluation."""
    if lookback <= timedelta(0):
        raise ValueError("lookback must be longer than 0s")
    rules = tuple(_compile_rule(lr, lookback) for lr in ruleset)
    terms = tuple(dict.fromkeys(t for r in rules for t in r.terms))
    loaded = [cr.source.rule for cr in rules]
    constants = pl.DataFrame(
        {
            "rule": [r.name for r in loaded],
            "type": [r.type.value for r in loaded],
            "quantity": [r.quantity for r in loaded],
            "unit": [value_unit(r) for r in loaded],
            "op": [r.op.value for r in loaded],
            "recommendation": [r.recommendation for r in loaded],
            "labels": [json.dumps(r.labels, sort_keys=True) for r in loaded],
        },
        schema={
            **{c: pl.String() for c in ("rule", "type", "quantity", "unit", "op")},
            "recommendation": pl.String(),
            "labels": pl.String(),
        },
    )
    ladders = [r.ladder() for r in loaded]
    rungs = pl.DataFrame(
        {
            "severity": [s.value for ladder in ladders for s, _ in ladder],
            "threshold": [t for ladder in ladders for _, t in ladder],
        },
        schema={"severity": pl.String(), "threshold": pl.Float64()},
    )
    first_rung = np.cumsum([0, *(len(ladder) for ladder in ladders)])[:-1].astype(np.int64)
    names = [cr.name for cr in rules]
    pairs = [(cr.name, q) for cr in rules for q, _, _ in cr.missing]
    window_us = np.array([cr.window // timedelta(microseconds=1) for cr in rules], dtype=np.int64)
    return CompiledRules(
        rules,
        terms,
        lookback,
        constants,
        rungs,
        first_rung,
        window_us,
        _positions(names),
        _positions(pairs),
    )


def _positions(keys: Sequence[Any]) -> Index:
    """Each key's position in sorted order."""
    ranks = np.empty(len(keys), dtype=np.int64)
    ranks[sorted(range(len(keys)), key=keys.__getitem__)] = np.arange(len(keys))
    return ranks


# --- results ---------------------------------------------------------------------------------------

_RUNG: Final = "__rung|"
UNDECIDED: Final = -2  # the rung of a rule that a term without data leaves open
_VALUE: Final = "__value|"


def _verdicts(compiled: CompiledRules) -> list[pl.Expr]:
    """Per row: every rule's rung (Int8: the ladder's index reached, UNDECIDED, or -1) and main
    value (NaN: none); none null, so NumPy reads them without a conversion."""
    exprs = [cr.rung.alias(f"{_RUNG}{i}") for i, cr in enumerate(compiled.rules)]
    exprs += [
        pl.col(cr.main.column).fill_null(float("nan")).alias(f"{_VALUE}{i}")
        for i, cr in enumerate(compiled.rules)
    ]
    return exprs


def _take(frame: pl.DataFrame, index: Index) -> pl.DataFrame:
    """The rows at `index`: a direct gather (a `select` would plan a query for it)."""
    return frame[pl.Series(index, dtype=pl.get_index_type())]


def _matrix(rows: pl.DataFrame, prefix: str, count: int) -> Any:
    return rows[[f"{prefix}{i}" for i in range(count)]].to_numpy()


def _rank(column: pl.Series) -> Index:
    """Each row's dense rank in `column`: output rows are ordered by ranks, strings sorted once."""
    ranks: Index = column.rank("dense").cast(pl.Int64).fill_null(0).to_numpy()
    return ranks


def _results(compiled: CompiledRules, rows: pl.DataFrame, order: Sequence[Index]) -> pl.DataFrame:
    """RESULT_SCHEMA rows for every (row, rule) that holds, sorted by the rows' `order` (ranks, most
    significant first) and then by rule name.

    Which rules hold where is read once for all rules, in NumPy from the rung matrix; the result
    rows are gathered directly, rule by rule, and each rule renders its text on its own rows in one
    query for all rules; the output order is applied last.
    """
    n = len(compiled.rules)
    if n == 0 or rows.height == 0:
        return pl.DataFrame(schema=RESULT_SCHEMA)
    rungs = _matrix(rows, _RUNG, n)
    rule, row = np.nonzero(rungs.T >= 0)  # rule-major: each rule's rows are contiguous
    if row.size == 0:
        return pl.DataFrame(schema=RESULT_SCHEMA)
    values = _matrix(rows, _VALUE, n)[row, rule]
    ends = rows[_END].dt.epoch("us").to_numpy()[row]
    windows = pl.DataFrame(
        {
            "value": values,
            "window_start": pl.Series(ends - compiled.window_us[rule]).cast(_TS),
            "window_end": pl.Series(ends).cast(_TS),
        }
    )
    found = pl.concat(
        [
            _take(rows[["instance_id", "engine"]], row),
            _take(compiled.constants, rule),
            _take(compiled.rungs, compiled.first_rung[rule] + rungs[row, rule]),
            windows,
        ],
        how="horizontal",
    )
    bounds = np.cumsum([0, *np.bincount(rule, minlength=n)])
    # One query for every rule's text, so Polars plans and runs the small pieces together.
    texts = pl.concat(
        [
            # with_columns, not select: a text without fields is a literal, broadcast to the rows.
            found.lazy().slice(int(lo), int(hi - lo)).with_columns(cr.texts).select("summary", "description")
            for cr, lo, hi in zip(compiled.rules, bounds[:-1], bounds[1:], strict=True)
            if hi > lo
        ]
    ).collect(engine="in-memory", optimizations=_AS_WRITTEN)
    out = pl.concat([found, texts], how="horizontal")[list(RESULT_SCHEMA)]
    keys = [compiled.rule_rank[rule], *(rank[row] for rank in reversed(order))]
    return _take(out, np.lexsort(keys))


def _insufficient(
    compiled: CompiledRules,
    rows: pl.DataFrame,
    nulls: Mapping[str, Mask],
    absent: frozenset[str],
    instance: Index,
) -> pl.DataFrame:
    """(instance, rule, quantity) for every undecided rule and each of its quantities without data
    (a term of it null: `nulls` per present term column, for the same rows), sorted by instance
    (its rank per row), rule and quantity."""
    pairs = [(cr, q, reason) for cr in compiled.rules for q, _, reason in cr.missing]
    if not pairs or rows.height == 0:
        return pl.DataFrame(schema=INSUFFICIENT_SCHEMA)
    undecided = _matrix(rows, _RUNG, len(compiled.rules)) == UNDECIDED
    everywhere = np.ones(rows.height, dtype=np.bool_)  # an absent quantity's terms
    lacking = np.column_stack(
        [
            undecided[:, r] & np.logical_or.reduce([nulls.get(c, everywhere) for c in columns])
            for r, cr in enumerate(compiled.rules)
            for _, columns, _ in cr.missing
        ]
    )
    row, pair = np.nonzero(lacking)
    reasons = pl.DataFrame(
        {
            "rule": [cr.name for cr, _, _ in pairs],
            "quantity": [q for _, q, _ in pairs],
            "reason": [f"'{q}' is not in the data" if q in absent else reason for _, q, reason in pairs],
        },
        schema={"rule": pl.String(), "quantity": pl.String(), "reason": pl.String()},
    )
    order = np.lexsort([compiled.pair_rank[pair], instance[row]])
    row, pair = row[order], pair[order]
    return pl.concat([_take(rows[["instance_id", "engine"]], row), _take(reasons, pair)], how="horizontal")


# --- evaluation at one time ------------------------------------------------------------------------


def _utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _check_frame(names: Sequence[str], engines: Mapping[str, str] | None) -> None:
    required = ("instance_id", "ts") if engines is not None else ("instance_id", "engine", "ts")
    missing = [c for c in required if c not in names]
    if missing:
        raise ValueError(f"the frame lacks column(s) {', '.join(missing)}")


def engine_lookup(engines: Mapping[str, str]) -> pl.DataFrame:
    """Engines per instance as a frame to join on `instance_id`."""
    return pl.DataFrame(
        {"instance_id": list(engines), "engine": list(engines.values())},
        schema={"instance_id": pl.String(), "engine": pl.String()},
    )


# --- the window's aggregation ----------------------------------------------------------------------


def _quantity_terms(groups: WindowGroups, terms: Sequence[Term]) -> dict[str, tuple[Floats, Mask | None]]:
    """One quantity's terms: per instance, the value, and where there is one (None: everywhere).
    Its trends share their window's least-squares sums. NumPy only: it runs in a pool's thread."""
    columns: dict[str, tuple[Floats, Mask | None]] = {}
    fits: dict[str, tuple[Floats, ...]] = {}
    with np.errstate(invalid="ignore", divide="ignore"):  # thread-local: set in the worker
        for term in terms:
            q, w = term.quantity, term.window // timedelta(microseconds=1)
            if term.reduce.trend:
                if term.fit not in fits:
                    n, x = groups.count(q, w), groups.seconds(q)
                    fits[term.fit] = (
                        n.astype(np.float64),
                        groups.sum(x, w),
                        groups.sum(x * x, w),
                        groups.reduced(q, "sum", w),
                        groups.sum(x * groups.zeroed(q), w),
                        groups.reduced(q, "min", w),
                        groups.reduced(q, "max", w),
                    )
                columns[term.column] = _fitted_arrays(term, fits[term.fit])
            elif term.reduce is Reduce.LAST:
                columns[term.column] = groups.latest(q, w)
            else:
                n = groups.count(q, w)
                if term.reduce is Reduce.MEAN:
                    value = groups.reduced(q, "sum", w) / n
                else:
                    value = groups.reduced(q, term.reduce.value, w)
                columns[term.column] = value, n > 0
    return columns


def default_workers() -> int:
    """Threads for an evaluation pool: the CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _Inline(Executor):
    """Runs each task at once in the calling thread: an evaluation given no pool."""

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> Future[_T]:
        future: Future[_T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # as a pool's future carries it, to its result()
            future.set_exception(exc)
        return future


def _aggregate(
    compiled: CompiledRules,
    rows: pl.DataFrame,
    at: datetime,
    present: frozenset[str],
    engines: Mapping[str, str] | None,
    pool: Executor,
) -> tuple[pl.DataFrame, dict[str, Mask]]:
    """One row per instance of the window: `instance_id`, `engine` (from `engines`, else from the
    window's latest row) and every present term's column; and per term column, where it is null.
    Quantities are independent: they are reduced in the pool's threads, and the engines looked up
    alongside."""
    terms = [t for t in compiled.terms if t.quantity in present]
    if rows.height == 0:
        schema = {
            "instance_id": pl.String(),
            "engine": pl.String(),
            **{t.column: pl.Float64() for t in terms},
        }
        return pl.DataFrame(schema=schema), {t.column: np.zeros(0, dtype=np.bool_) for t in terms}
    groups = WindowGroups(rows, at, compiled.max_window)
    ids = rows["instance_id"].gather(groups.first)

    def engine() -> pl.Series:
        if engines is None:
            return rows["engine"].gather(groups.last)
        # Joined in Polars (which releases the GIL), beside the NumPy work.
        joined = ids.to_frame().join(
            engine_lookup(engines), on="instance_id", how="left", maintain_order="left"
        )
        return joined["engine"]

    per_quantity: dict[str, list[Term]] = {}
    for term in terms:
        per_quantity.setdefault(term.quantity, []).append(term)
    # Trends first, the longest pieces of work, so that the threads finish together.
    work = sorted(per_quantity.values(), key=lambda ts: -sum(4 if t.reduce.trend else 1 for t in ts))
    groups.prepare({t.window // timedelta(microseconds=1) for t in terms})  # shared state, made once
    looked_up = pool.submit(engine)
    parts = list(pool.map(partial(_quantity_terms, groups), work))
    reduced = {name: part for parts_ in parts for name, part in parts_.items()}
    data: dict[str, pl.Series] = {"instance_id": ids, "engine": looked_up.result()}
    nulls: dict[str, Mask] = {}
    for term in terms:
        values, valid = reduced[term.column]
        series = pl.Series(term.column, values, dtype=pl.Float64)
        nulls[term.column] = np.zeros(groups.k, dtype=np.bool_) if valid is None else ~valid
        if valid is not None and not valid.all():
            series = series.scatter(np.flatnonzero(nulls[term.column]), None)
        data[term.column] = series
    return pl.DataFrame(data), nulls


def _window(
    frame: pl.DataFrame | pl.LazyFrame, columns: list[str], start: datetime, end: datetime
) -> pl.DataFrame:
    """The rows with start < ts <= end, in the frame's order: a binary search when the frame is in
    time order (as a fleet's rounds are), none when every row is inside already (the store's window
    by instance), a filter otherwise."""
    if isinstance(frame, pl.DataFrame) and frame.height:
        ts = frame["ts"]
        if ts.is_sorted():
            lo, hi = (int(i) for i in ts.search_sorted(pl.Series([start, end]), side="right"))
            return frame.slice(lo, hi - lo)[columns]  # direct: no query planned
        first, last = ts.min(), ts.max()
        assert isinstance(first, datetime) and isinstance(last, datetime)
        if first > start and last <= end:
            return frame[columns]
    window = frame.lazy().select(columns).filter((pl.col("ts") > start) & (pl.col("ts") <= end))
    # In-memory: its filter keeps the rows' order, which the layouts in window_groups read.
    out: pl.DataFrame = window.collect(engine="in-memory")
    return out


def evaluate(
    compiled: CompiledRules,
    frame: pl.DataFrame | pl.LazyFrame,
    at: datetime,
    *,
    engines: Mapping[str, str] | None = None,
    pool: Executor | None = None,
) -> Evaluation:
    """Evaluate every rule for every instance at `at`, reading `(at - window, at]` of `frame`.

    Each instance's engine is `engines[instance_id]` when `engines` is given (the frame then needs no
    `engine` column), else its latest row's `engine`. Instances with no row at all in the widest
    window are not reported (the caller knows its fleet).

    `pool` runs independent pieces of the work (each quantity's reductions: NumPy releases the GIL
    in its loops) in parallel threads; keep one for many evaluations (`default_workers()` threads),
    as starting threads costs more than a small fleet's evaluation. Without one, all runs here.
    """
    at = _utc(at)
    names = frame.collect_schema().names()
    _check_frame(names, engines)
    present = frozenset(names) & compiled.quantities
    absent = compiled.quantities - present
    columns = ["instance_id", "ts", *sorted(present)]
    if engines is None:
        columns.insert(1, "engine")
    rows = _window(frame, columns, at - compiled.max_window, at)
    pool = pool or _Inline()
    per_instance, nulls = _aggregate(compiled, rows, at, present, engines, pool)
    # The time as an epoch cast in the query: a datetime literal costs a query of its own to convert.
    at_us = (at - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    out = (
        per_instance.lazy()
        .with_columns(
            pl.lit(at_us, dtype=pl.Int64).cast(_TS).alias(_END),
            *(pl.lit(None, pl.Float64).alias(t.column) for t in compiled.terms if t.quantity in absent),
        )
        .select("instance_id", "engine", _END, *_verdicts(compiled))
        .collect(engine="in-memory", optimizations=_AS_WRITTEN)
    )
    ids = out["instance_id"]  # one row per instance: in name order (the store's), rank = position
    instance = np.arange(1, ids.len() + 1) if ids.is_sorted() and not ids.null_count() else _rank(ids)
    insufficient = pool.submit(_insufficient, compiled, out, nulls, absent, instance)
    results = _results(compiled, out, [instance])
    return Evaluation(at, results, insufficient.result())


# --- evaluation at every timestamp -----------------------------------------------------------------


def _rolling_fit(term: Term, t: pl.Expr) -> list[pl.Expr]:
    """A trend's window sums at every row, over x = ts - (the row's ts): rolling sums of t and y,
    shifted to the row's own time (t is seconds from the frame's first row, which keeps t² small)."""
    q = pl.col(term.quantity)
    known = q.is_not_null()
    tk = pl.when(known).then(t)

    def rolling(e: pl.Expr) -> pl.Expr:
        return e.fill_null(0.0).rolling_sum_by("ts", term.window).over("instance_id")

    n, st, stt = rolling(known.cast(pl.Float64)), rolling(tk), rolling(tk * tk)
    sy, sty = rolling(q), rolling(tk * q)
    stats = (
        n,
        st - n * t,
        stt - 2.0 * t * st + n * t * t,
        sy,
        sty - t * sy,
        q.rolling_min_by("ts", term.window).over("instance_id"),
        q.rolling_max_by("ts", term.window).over("instance_id"),
    )
    return [e.alias(term.fit + name) for name, e in zip(_FIT_STATS, stats, strict=True)]


def _rolling_terms(
    compiled: CompiledRules, present: set[str], origin: datetime
) -> tuple[list[pl.Expr], list[pl.Expr]]:
    """Every term at every row: the same window `(ts - window, ts]`, per instance; trends as their
    window sums first, then the fit."""
    exprs: list[pl.Expr] = []
    fits: dict[str, list[pl.Expr]] = {}
    fitted: list[pl.Expr] = []
    t = (pl.col("ts") - pl.lit(origin, dtype=_TS)).dt.total_microseconds() / 1e6
    for term in compiled.terms:
        if term.quantity not in present:
            exprs.append(pl.lit(None, pl.Float64).alias(term.column))
            continue
        q = pl.col(term.quantity)
        expr: pl.Expr
        if term.reduce.trend:
            fits.setdefault(term.fit, _rolling_fit(term, t))
            fitted.append(_fitted(term))
            continue
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
    return [*exprs, *(e for stats in fits.values() for e in stats)], fitted


def evaluate_series(
    compiled: CompiledRules, frame: pl.DataFrame | pl.LazyFrame, *, engines: Mapping[str, str] | None = None
) -> pl.DataFrame:
    """Evaluate every rule at every row's own timestamp, in one pass (backtests, `rules test`).

    Returns RESULT_SCHEMA rows where a rule holds, `window_end` being the evaluation time; the rows at
    one timestamp equal `evaluate(compiled, frame, at=ts).results` for instances sampled at `ts`.
    (instance_id, ts) must be unique.
    """
    names = frame.collect_schema().names()
    _check_frame(names, engines)
    present = set(names) & compiled.quantities
    keep = ["instance_id", "ts", *sorted(present)]
    lazy = frame.lazy().select(keep if engines is not None else ["engine", *keep])
    if engines is not None:
        lazy = lazy.join(engine_lookup(engines).lazy(), on="instance_id", how="left")
    # Sorted once, eagerly: forward_fill over an instance needs its rows in time order.
    rows = lazy.collect().sort("instance_id", "ts")
    if rows.height == 0:
        return pl.DataFrame(schema=RESULT_SCHEMA)
    origin = rows["ts"].min()
    assert isinstance(origin, datetime)
    terms, fitted = _rolling_terms(compiled, present, origin)
    evaluated = (
        rows.lazy()
        .with_columns(*terms, pl.col("ts").cast(_TS).alias(_END))
        .with_columns(fitted)
        .select("instance_id", "engine", _END, *_verdicts(compiled))
        .collect()
    )
    return _results(compiled, evaluated, [_rank(evaluated[_END]), _rank(evaluated["instance_id"])])


# --- the specification in plain Python -------------------------------------------------------------

Sample = tuple[datetime, Mapping[str, float | None]]


@dataclass(frozen=True, slots=True)
class ReferenceFinding:
    instance_id: str
    rule: str
    severity: Severity
    value: float
    threshold: float


def _fit(points: Sequence[tuple[float, float]], how: Reduce, ahead: timedelta | None) -> float | None:
    """`slope` or `predict` of (x = seconds from `at`, y) points, by the same formula as `_fitted`."""
    if len(points) < 2:
        return None
    n = float(len(points))
    sx = sum(x for x, _ in points)
    sxx = sum(x * x for x, _ in points)
    sy = sum(y for _, y in points)
    sxy = sum(x * y for x, y in points)
    lo, hi = min(y for _, y in points), max(y for _, y in points)
    slope = 0.0 if lo == hi else (sxy - sx * sy / n) / (sxx - sx * sx / n)
    if how is Reduce.SLOPE:
        return slope
    intercept = lo if lo == hi else sy / n - slope * sx / n
    return intercept + slope * (ahead or timedelta(0)).total_seconds()


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

            def reduced(
                quantity: str, how: Reduce, ahead: timedelta | None, window: Sequence[Sample] = window
            ) -> float | None:
                known = [(ts, v) for ts, values in window if (v := values.get(quantity)) is not None]
                if how.trend:
                    return _fit([((ts - at).total_seconds(), v) for ts, v in known], how, ahead)
                return _reduce([v for _, v in known], how)

            value = reduced(rule.quantity, rule.reduce, rule.ahead_of())
            outcomes: list[bool | None] = [None if value is None else rule.op.holds(value, ladder[-1][1])]
            missing = [rule.quantity] if value is None else []
            for c in rule.and_:
                v = reduced(c.quantity, c.reduce or rule.reduce, rule.ahead_of(c))
                outcomes.append(None if v is None else c.op.holds(v, c.value))
                if v is None:
                    missing.append(c.quantity)
            if value is None or (False not in outcomes and None in outcomes):
                insufficient.update((instance_id, rule.name, q) for q in missing)
            elif all(outcomes):
                sev, threshold = next((s, t) for s, t in ladder if rule.op.holds(value, t))
                findings.append(ReferenceFinding(instance_id, rule.name, sev, value, threshold))
    return findings, insufficient
