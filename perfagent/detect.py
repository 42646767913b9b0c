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
(`_Groups`: no loop over instances; rows are put in (instance, ts) order explicitly, or checked to
be), then takes the rules' verdicts over the per-instance rows in Polars and builds result rows only
where a rule holds.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

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

Index = np.ndarray[Any, np.dtype[np.int64]]

_TS: Final = pl.Datetime("us", "UTC")
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

    @property
    def column(self) -> str:
        ahead = f"+{_ms(self.ahead)}ms" if self.ahead is not None else ""
        return f"__{self.quantity}|{self.reduce.value}{ahead}|{_ms(self.window)}ms"

    @property
    def fit(self) -> str:
        """The prefix of the least-squares sums a trend term is computed from (shared per window)."""
        return f"__fit|{self.quantity}|{_ms(self.window)}ms|"


_FIT_STATS: Final = ("n", "sx", "sxx", "sy", "sxy", "lo", "hi")


def _fitted(term: Term) -> pl.Expr:
    """A trend term from its window's sums over (x = ts - at in seconds, y), as Prometheus's
    `linearRegression` does: the least-squares slope (`deriv`), or the line's value `ahead` seconds
    after `at` (`predict_linear`); slope 0 when every y is equal; null under two samples."""
    n, sx, sxx, sy, sxy, lo, hi = (pl.col(term.fit + s) for s in _FIT_STATS)
    flat = lo == hi
    slope = pl.when(flat).then(0.0).otherwise((sxy - sx * sy / n) / (sxx - sx * sx / n))
    value = slope
    if term.reduce is Reduce.PREDICT:
        ahead = (term.ahead or timedelta(0)).total_seconds()
        value = pl.when(flat).then(lo).otherwise(sy / n - slope * sx / n) + slope * ahead
    return pl.when(n >= 2).then(value).alias(term.column)


@dataclass(frozen=True, slots=True, eq=False)
class CompiledRule:
    """A rule as Polars expressions over its terms' columns (plus `instance_id` and `engine`)."""

    source: LoadedRule
    window: timedelta
    main: Term
    conditions: tuple[tuple[Term, Op, float], ...]
    rung: pl.Expr  # Int8: where the rule holds, the index in its ladder of the rung reached; else -1
    missing: tuple[tuple[str, pl.Expr, str], ...]  # per quantity: undecided for lack of it; the reason
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


def _missing(
    window: timedelta, terms: Sequence[Term], undecided: pl.Expr
) -> tuple[tuple[str, pl.Expr, str], ...]:
    """Per quantity of a rule: the flag "undecided, and a term of this quantity has no value", and
    the reason reported with it."""
    out = []
    for quantity in dict.fromkeys(t.quantity for t in terms):
        mine = [t for t in terms if t.quantity == quantity]
        flag = pl.any_horizontal(pl.col(t.column).is_null() for t in mine)
        need = "fewer than 2 samples" if any(t.reduce.trend for t in mine) else "no sample"
        reason = f"{need} of '{quantity}' in the {format_duration(window)} window"
        out.append((quantity, undecided & flag, reason))
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
        rung=pl.when(holds).then(rung).otherwise(pl.lit(-1, pl.Int8)),
        missing=_missing(window, (main, *(t for t, _, _ in conditions)), undecided),
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
            "__length": [cr.window for cr in rules],
        },
        schema={
            **{c: pl.String() for c in ("rule", "type", "quantity", "unit", "op")},
            "recommendation": pl.String(),
            "labels": pl.String(),
            "__length": pl.Duration("us"),
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
    return CompiledRules(
        rules, terms, lookback, constants, rungs, first_rung, _positions(names), _positions(pairs)
    )


def _positions(keys: Sequence[Any]) -> Index:
    """Each key's position in sorted order."""
    ranks = np.empty(len(keys), dtype=np.int64)
    ranks[sorted(range(len(keys)), key=keys.__getitem__)] = np.arange(len(keys))
    return ranks


# --- results ---------------------------------------------------------------------------------------

_RUNG: Final = "__rung|"
_VALUE: Final = "__value|"
_MISSING: Final = "__missing|"


def _verdicts(compiled: CompiledRules) -> list[pl.Expr]:
    """Per row: every rule's rung (Int8, -1: does not hold), main value, and missing-data flags."""
    exprs = [cr.rung.alias(f"{_RUNG}{i}") for i, cr in enumerate(compiled.rules)]
    exprs += [pl.col(cr.main.column).alias(f"{_VALUE}{i}") for i, cr in enumerate(compiled.rules)]
    flags = [flag for cr in compiled.rules for _, flag, _ in cr.missing]
    exprs += [flag.alias(f"{_MISSING}{i}") for i, flag in enumerate(flags)]
    return exprs


def _gather(frame: pl.DataFrame, index: Index) -> pl.DataFrame:
    return frame.select(pl.all().gather(pl.Series(index, dtype=pl.Int64)))


def _rank(column: pl.Series) -> Index:
    """Each row's dense rank in `column`: output rows are ordered by ranks, strings sorted once."""
    ranks: Index = column.rank("dense").cast(pl.Int64).fill_null(0).to_numpy()
    return ranks


def _results(compiled: CompiledRules, rows: pl.DataFrame, order: Sequence[Index]) -> pl.DataFrame:
    """RESULT_SCHEMA rows for every (row, rule) that holds, sorted by the rows' `order` (ranks, most
    significant first) and then by rule name.

    Which rules hold where is read once for all rules, in NumPy from the rung matrix; the result
    rows are gathered in one step and each rule renders its text on its own rows only.
    """
    n = len(compiled.rules)
    if n == 0 or rows.height == 0:
        return pl.DataFrame(schema=RESULT_SCHEMA)
    rungs = rows.select(pl.col(f"{_RUNG}{i}") for i in range(n)).to_numpy()
    rule, row = np.nonzero(rungs.T >= 0)  # rule-major: each rule's rows are contiguous
    if row.size == 0:
        return pl.DataFrame(schema=RESULT_SCHEMA)
    values = rows.select(pl.col(f"{_VALUE}{i}") for i in range(n)).to_numpy()
    found = pl.concat(
        [
            _gather(rows.select("instance_id", "engine", pl.col(_END).alias("window_end")), row),
            _gather(compiled.constants, rule),
            _gather(compiled.rungs, compiled.first_rung[rule] + rungs[row, rule]),
            pl.DataFrame({"value": values[row, rule]}, schema={"value": pl.Float64()}),
        ],
        how="horizontal",
    ).with_columns(window_start=pl.col("window_end") - pl.col("__length"))
    bounds = np.cumsum([0, *np.bincount(rule, minlength=n)])
    # One query for every rule's text, so Polars plans and runs the small pieces together.
    texts = pl.concat(
        [
            found.lazy().slice(int(lo), int(hi - lo)).with_columns(cr.texts).select("summary", "description")
            for cr, lo, hi in zip(compiled.rules, bounds[:-1], bounds[1:], strict=True)
            if hi > lo
        ]
    ).collect(engine="in-memory")
    keys = [compiled.rule_rank[rule], *(rank[row] for rank in reversed(order))]
    out = pl.concat([found, texts], how="horizontal").select(list(RESULT_SCHEMA))
    return _gather(out, np.lexsort(keys))


def _insufficient(
    compiled: CompiledRules, rows: pl.DataFrame, absent: frozenset[str], instance: Index
) -> pl.DataFrame:
    """(instance, rule, quantity) for every undecided rule and each of its quantities without data,
    sorted by instance (its rank per row), rule and quantity."""
    pairs = [(cr, q, reason) for cr in compiled.rules for q, _, reason in cr.missing]
    if not pairs or rows.height == 0:
        return pl.DataFrame(schema=INSUFFICIENT_SCHEMA)
    flags = rows.select(pl.col(f"{_MISSING}{i}") for i in range(len(pairs))).to_numpy()
    row, pair = np.nonzero(flags)
    reasons = pl.DataFrame(
        {
            "rule": [cr.name for cr, _, _ in pairs],
            "quantity": [q for _, q, _ in pairs],
            "reason": [f"'{q}' is not in the data" if q in absent else reason for _, q, reason in pairs],
        },
        schema={"rule": pl.String(), "quantity": pl.String(), "reason": pl.String()},
    )
    out = pl.concat(
        [_gather(rows.select("instance_id", "engine"), row), _gather(reasons, pair)], how="horizontal"
    )
    return _gather(out, np.lexsort([compiled.pair_rank[pair], instance[row]]))


# --- evaluation at one time ------------------------------------------------------------------------


def _utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _check_frame(names: Sequence[str], engines: Mapping[str, str] | None) -> None:
    required = ("instance_id", "ts") if engines is not None else ("instance_id", "engine", "ts")
    missing = [c for c in required if c not in names]
    if missing:
        raise ValueError(f"the frame lacks column(s) {', '.join(missing)}")


def _engine_lookup(engines: Mapping[str, str]) -> pl.DataFrame:
    return pl.DataFrame(
        {"instance_id": list(engines), "engine": list(engines.values())},
        schema={"instance_id": pl.String(), "engine": pl.String()},
    )


# --- the window's aggregation ----------------------------------------------------------------------

Floats = np.ndarray[Any, np.dtype[np.float64]]
Mask = np.ndarray[Any, np.dtype[np.bool_]]
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


class _Groups:
    """The window's rows grouped by instance, each instance's rows in time order, and the vectorized
    reductions per instance every term is computed from.

    Two layouts, both without a loop over instances. The store appends one row per instance per
    scrape round, so its window is usually whole rounds of the same instances in the same order
    (checked, never assumed): then a column reshaped to (rounds, instances) has each instance's
    samples in a column, in time order, and reductions run along axis 0. Otherwise one explicit
    stable sort by (instance, ts) makes each instance's rows a contiguous segment, reduced with
    `ufunc.reduceat`. Arrays here are in that order; a mask left `None` selects every row.
    Reductions are memoized per (quantity, window), so terms sharing a window's sums compute them
    once.
    """

    def __init__(self, rows: pl.DataFrame, at: datetime, widest: timedelta) -> None:
        ids, ts = rows["instance_id"], rows["ts"]
        self.rows, self.n, self.widest = rows, rows.height, _us(widest)
        self.order: Index | None = None
        period = _period(ids, ts)
        self.rounds = period is not None
        if period is not None:
            self.k, self.starts = period, np.empty(0, dtype=np.int64)
            self.first: Index = np.arange(period)
            self.last: Index = np.arange(self.n - period, self.n)
            self.lengths: Index = np.full(period, self.n // period)
        else:
            starts = _segments(ids, ts)
            if starts is None:  # one explicit stable sort: by time, then by instance
                codes = ids.rank("dense").fill_null(0).to_numpy()
                order = np.argsort(codes, kind="stable")
                if not ts.is_sorted():
                    by_time = np.argsort(ts.dt.epoch("us").to_numpy(), kind="stable")
                    order = by_time[np.argsort(codes[by_time], kind="stable")]
                grouped = codes[order]
                self.order = order.astype(np.int64)
                starts = np.flatnonzero(np.concatenate(([True], grouped[1:] != grouped[:-1])))
            self.k, self.starts = starts.size, starts
            self.first, self.last = starts, np.append(starts[1:], self.n) - 1
            self.lengths = self.last + 1 - self.first
        # Nulls as NaN (one query for every column): NumPy reads the buffers without a copy.
        self.filled = rows.select(
            pl.col(c).cast(pl.Float64).fill_null(float("nan"))
            for c in rows.columns
            if c not in ("instance_id", "engine", "ts")
        )
        self.age = (at - _EPOCH) // timedelta(microseconds=1) - self._ordered(ts.dt.epoch("us"))  # µs
        self._columns: dict[str, tuple[Floats, Mask | None]] = {}
        self._masks: dict[tuple[str, int], Mask | None] = {}
        self._counts: dict[tuple[str, int], Index] = {}
        self._reduced: dict[tuple[str, str, int], Floats] = {}

    def _ordered(self, series: pl.Series) -> Any:
        values = series.to_numpy()
        return values if self.order is None else values[self.order]

    def pick(self, series: pl.Series, rows: Index) -> pl.Series:
        """`series` at the given rows (of this order)."""
        return series.gather(rows if self.order is None else self.order[rows])

    def reduce(self, ufunc: np.ufunc, values: Any, dtype: Any = None) -> Any:
        """`ufunc` over each instance's rows."""
        if self.rounds:
            return ufunc.reduce(values.reshape(-1, self.k), axis=0, dtype=dtype)
        return ufunc.reduceat(values, self.starts, dtype=dtype)

    def column(self, quantity: str) -> tuple[Floats, Mask | None]:
        """A quantity's values (null as NaN) and where they are known."""
        if quantity not in self._columns:
            series = self.rows[quantity]
            values: Floats = self._ordered(self.filled[quantity])
            known: Mask | None = None
            if series.null_count():
                known = ~np.isnan(values)
                if np.count_nonzero(~known) != series.null_count():  # NaN samples too: known
                    known = self._ordered(series.is_not_null())
            self._columns[quantity] = values, known
        return self._columns[quantity]

    def known(self, quantity: str, window: int) -> Mask | None:
        """Where a quantity is known inside the window `(at - window, at]` (every row is inside the
        widest)."""
        key = (quantity, window)
        if key not in self._masks:
            known = self.column(quantity)[1]
            if window < self.widest:
                inside = self.age < window
                known = inside if known is None else inside & known
            self._masks[key] = known
        return self._masks[key]

    def count(self, quantity: str, window: int) -> Index:
        key = (quantity, window)
        if key not in self._counts:
            known = self.known(quantity, window)
            self._counts[key] = self.lengths if known is None else self.reduce(np.add, known, dtype=np.int64)
        return self._counts[key]

    def sum(self, values: Floats, known: Mask | None) -> Floats:
        out: Floats = self.reduce(np.add, values if known is None else np.where(known, values, 0.0))
        return out

    def zeroed(self, quantity: str, window: int) -> Floats:
        """A quantity's values in the window, 0 where not known."""
        key = (quantity, "zeroed", window)
        if key not in self._reduced:
            values, known = self.column(quantity)[0], self.known(quantity, window)
            self._reduced[key] = values if known is None else np.where(known, values, 0.0)
        return self._reduced[key]

    def reduced(self, quantity: str, how: str, window: int) -> Floats:
        """`sum`, `min` or `max` (NaN-skipping, as Polars' min and max) of a quantity's known values
        in the window; 0 or NaN where there are none."""
        key = (quantity, how, window)
        if key not in self._reduced:
            values, known = self.column(quantity)[0], self.known(quantity, window)
            if how == "sum":
                out = self.sum(self.zeroed(quantity, window), None)
            else:
                masked = values if known is None else np.where(known, values, np.nan)
                out = self.reduce(np.fmin if how == "min" else np.fmax, masked)
            self._reduced[key] = out
        return self._reduced[key]

    def latest(self, quantity: str, window: int) -> tuple[Floats, Mask]:
        """Each instance's latest known value in the window (its rows are in time order)."""
        values, known = self.column(quantity)[0], self.known(quantity, window)
        if known is None:
            return values[self.last], np.ones(self.k, dtype=np.bool_)
        index = self.reduce(np.maximum, np.where(known, np.arange(self.n), -1))
        return values[np.maximum(index, 0)], index >= 0


def _segments(ids: pl.Series, ts: pl.Series) -> Index | None:
    """Where each instance's rows start when the rows are sorted by (instance_id, ts) already (a
    frame sorted by instance): checked in one pass, never assumed."""
    n = ids.len()
    if n == 0 or ids.null_count() or not ids.is_sorted():
        return None
    change = np.concatenate(([True], (ids.slice(1) != ids.slice(0, n - 1)).to_numpy()))
    if not np.all(change[1:] | (np.diff(ts.dt.epoch("us").to_numpy()) >= 0)):
        return None
    starts: Index = np.flatnonzero(change)
    return starts


def _period(ids: pl.Series, ts: pl.Series) -> int | None:
    """k when the rows are in time order and are rounds of the same k distinct instances in the
    same order (row i and row i + k are the same instance): the store's layout."""
    n = ids.len()
    if n == 0 or ids.null_count() or not ts.is_sorted():
        return None
    again = (ids == ids[0]).arg_true()
    k = int(again[1]) if again.len() > 1 else n
    if n % k or (k < n and not (ids.slice(k) == ids.slice(0, n - k)).all()):
        return None
    return k if ids.slice(0, k).n_unique() == k else None


def _us(d: timedelta) -> int:
    return d // timedelta(microseconds=1)


def _aggregate(
    compiled: CompiledRules, rows: pl.DataFrame, at: datetime, present: frozenset[str]
) -> pl.DataFrame:
    """One row per instance of the window: `instance_id`, `engine` if the window has the column,
    every present term's column, and each trend's window sums (`_FIT_STATS`); in instance order."""
    columns: dict[str, tuple[Floats, Mask | None]] = {}
    terms = [t for t in compiled.terms if t.quantity in present]
    if rows.height == 0:
        names = [
            *(t.fit + s for t in terms if t.reduce.trend for s in _FIT_STATS),
            *(t.column for t in terms if not t.reduce.trend),
        ]
        schema = {
            "instance_id": pl.String(),
            **({"engine": pl.String()} if "engine" in rows.columns else {}),
            **{c: pl.Float64() for c in names},
        }
        return pl.DataFrame(schema=schema)
    groups = _Groups(rows, at, compiled.max_window)
    with np.errstate(invalid="ignore", divide="ignore"):
        for term in terms:
            q, w = term.quantity, _us(term.window)
            if term.reduce.trend:
                if term.fit + "n" in columns:
                    continue
                known, n = groups.known(q, w), groups.count(q, w)
                x = groups.age / -1e6
                x = x if known is None else np.where(known, x, 0.0)  # 0 where y is not known
                stats = (
                    n.astype(np.float64),
                    groups.sum(x, None),
                    groups.sum(x * x, None),
                    groups.reduced(q, "sum", w),
                    groups.sum(x * groups.zeroed(q, w), None),
                    groups.reduced(q, "min", w),
                    groups.reduced(q, "max", w),
                )
                some = n > 0
                for name, stat in zip(_FIT_STATS, stats, strict=True):
                    columns[term.fit + name] = stat, (some if name in ("lo", "hi") else None)
            elif term.reduce is Reduce.LAST:
                columns[term.column] = groups.latest(q, w)
            else:
                n = groups.count(q, w)
                if term.reduce is Reduce.MEAN:
                    value = groups.reduced(q, "sum", w) / n
                else:
                    value = groups.reduced(q, term.reduce.value, w)
                columns[term.column] = value, n > 0
    data: dict[str, pl.Series] = {"instance_id": groups.pick(rows["instance_id"], groups.first)}
    if "engine" in rows.columns:
        data["engine"] = groups.pick(rows["engine"], groups.last)
    for name, (values, valid) in columns.items():
        series = pl.Series(name, values, dtype=pl.Float64)
        if valid is not None and not valid.all():
            series = series.scatter(np.flatnonzero(~valid), None)
        data[name] = series
    return pl.DataFrame(data)


def _window(
    frame: pl.DataFrame | pl.LazyFrame, columns: list[str], start: datetime, end: datetime
) -> pl.DataFrame:
    """The rows with start < ts <= end: a binary search when the frame is in time order (as scrapes
    are appended), a filter otherwise."""
    if isinstance(frame, pl.DataFrame) and frame.height and frame["ts"].is_sorted():
        lo, hi = (int(i) for i in frame["ts"].search_sorted(pl.Series([start, end]), side="right"))
        return frame.select(columns).slice(lo, hi - lo)
    window = frame.lazy().select(columns).filter((pl.col("ts") > start) & (pl.col("ts") <= end))
    out: pl.DataFrame = window.collect()
    return out


def evaluate(
    compiled: CompiledRules,
    frame: pl.DataFrame | pl.LazyFrame,
    at: datetime,
    *,
    engines: Mapping[str, str] | None = None,
) -> Evaluation:
    """Evaluate every rule for every instance at `at`, reading `(at - window, at]` of `frame`.

    Each instance's engine is `engines[instance_id]` when `engines` is given (the frame then needs no
    `engine` column), else its latest row's `engine`. Instances with no row at all in the widest
    window are not reported (the caller knows its fleet).
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
    per_instance = _aggregate(compiled, rows, at, present)
    if engines is not None:
        per_instance = per_instance.join(_engine_lookup(engines), on="instance_id", how="left")
    out = (
        per_instance.lazy()
        .with_columns(
            pl.lit(at, dtype=_TS).alias(_END),
            *(pl.lit(None, pl.Float64).alias(t.column) for t in compiled.terms if t.quantity in absent),
            *(_fitted(t) for t in compiled.terms if t.reduce.trend and t.quantity in present),
        )
        .select("instance_id", "engine", _END, *_verdicts(compiled))
        .collect(engine="in-memory")  # one row per instance: no morsels to stream
    )
    instance = _rank(out["instance_id"])
    return Evaluation(at, _results(compiled, out, [instance]), _insufficient(compiled, out, absent, instance))


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
        lazy = lazy.join(_engine_lookup(engines).lazy(), on="instance_id", how="left")
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
