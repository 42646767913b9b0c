"""Backtesting: replay rules over a past range of fleet data and report when they would have fired.

The rules are evaluated at a regular grid of evaluation times, `step` apart, as an agent polling
every `step` would have evaluated them: `evaluate_series` over the whole range (in time chunks, so
memory stays bounded), each grid time reading the look-back window that ends there. The holds are
then folded into episodes with `FindingTracker`'s semantics (`for`, `keep_firing_for`), from an
empty state, as if an agent had started at `start`.

The fold is vectorized over runs of consecutive holds instead of stepping the tracker through every
evaluation (one tracker step costs milliseconds; a week at 15 s is 40,320 of them). On a regular
grid the tracker's outcome depends only on those runs:

- a run of holds starting at grid index `a` and ending at `b` fires at `a + ceil(for / step)` if
  that is at most `b`; a run that ends sooner was only pending and is dropped;
- once firing, a finding survives a gap while the next hold comes at most
  `max(1, ceil(keep_firing_for / step))` evaluations after the last, and resolves at that
  evaluation otherwise.

`tests/test_backtest.py` checks this fold against `FindingTracker.replay` step by step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Final, Literal, get_args

import polars as pl
from pydantic import BaseModel, Field

from perfagent.catalog import CATALOG
from perfagent.detect import CompiledRules, evaluate_series
from perfagent.errors import ValidationError
from perfagent.rules import SEVERITY_RANK, BottleneckType

MAX_ROWS: Final = 3_000_000
"""Most data rows (scrapes or Prometheus points) one backtest reads: about 7 days of 15 s scrapes of
75 instances, a few hundred MB of the rules' quantities in memory."""

MAX_EVALUATIONS: Final = 3_000_000
"""Most evaluations (instances x evaluation times) one backtest runs."""

DEFAULT_PROMETHEUS_STEP: Final = timedelta(minutes=1)
"""The step of backtests over Prometheus data: Prometheus's own default evaluation interval."""

CHUNK_EVALUATIONS: Final = 200_000
"""Evaluations per chunk of `evaluate_series`: what bounds the memory of one pass."""

_TS: Final = pl.Datetime("us", "UTC")
# What `_hits` returns and `fold_episodes` reads: one row per (instance, rule, evaluation k) holding.
_HITS_SCHEMA: Final = pl.Schema(
    {
        "instance_id": pl.String(),
        "rule": pl.String(),
        "k": pl.Int64(),
        "severity": pl.String(),
        "value": pl.Float64(),
        "unit": pl.String(),
    }
)
_US: Final = timedelta(microseconds=1)
_KEYS: Final = ["instance_id", "rule"]
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


# Severity names as a Literal, not the rules' enum: the OpenAPI document already names another
# `Severity` enum (recommendations'), and two classes of one name get renamed apart, breaking the
# findings query's reference to `Severity`.
SeverityName = Literal["LOW", "MEDIUM", "HIGH", "CRITICAL"]
_SEVERITIES: Final[tuple[SeverityName, ...]] = get_args(SeverityName)  # the ladder's order, lowest first


class BacktestTooLargeError(ValidationError):
    """The backtest would read or evaluate more than the documented limits."""


class BacktestInstance(BaseModel):
    instance_id: str
    engine: str | None = Field(description="null: unknown, so engine-specific rules skip it.")


class BacktestEpisode(BaseModel):
    """One episode of a rule firing on an instance, as the agent would have recorded it."""

    rule: str
    instance_id: str
    engine: str | None
    type: BottleneckType
    pending_at: datetime = Field(description="The evaluation at which the condition started holding.")
    fired_at: datetime = Field(description="The evaluation at which it had held for the rule's `for`.")
    last_held_at: datetime = Field(description="The last evaluation at which the condition held.")
    resolved_at: datetime | None = Field(
        description="After `keep_firing_for` without the condition; null: still firing at `end`."
    )
    firing_seconds: float = Field(description="From `fired_at` to `resolved_at` (or the end of the range).")
    max_severity: SeverityName = Field(description="The highest severity while firing.")
    peak_value: float = Field(
        description="The worst value while firing: highest for `>` rules, lowest for `<`."
    )
    unit: str = Field(description="Of `peak_value`, as the rule's findings give it (per second for a slope).")


class BacktestRuleSummary(BaseModel):
    """How often one rule would have fired over the range."""

    rule: str
    type: BottleneckType
    quantity: str
    unit: str = Field(description="The catalog unit of `quantity`.")
    for_seconds: float
    keep_firing_for_seconds: float
    instances: int = Field(description="Instances in the data the rule applies to (by engine).")
    episodes: int = Field(description="Times the rule fired.")
    instances_fired: int
    still_firing: int = Field(description="Episodes still firing at the end of the range.")
    pending_only: int = Field(description="Times the condition held but cleared before `for` elapsed.")
    firing_seconds: float = Field(description="Firing time summed over instances.")
    firing_fraction: float = Field(description="firing_seconds over (the range x `instances`), 0-1.")
    mean_time_to_fire_seconds: float | None = Field(
        description="Mean of fired_at - pending_at: the rule's `for`, rounded up to the step."
    )
    mean_episode_seconds: float | None
    max_severity: SeverityName | None
    missing_quantities: list[str] = Field(
        description="Quantities the rule reads that have no sample at all in the range: it could not fire."
    )


class BacktestReport(BaseModel):
    """Per rule, how often it would have fired over the range, and every episode."""

    source: str = Field(description="Where the data came from: `history` or `prometheus`.")
    start: datetime
    end: datetime
    step_seconds: float = Field(description="Seconds between evaluations.")
    evaluations: int = Field(description="Evaluation times in the range (each evaluates every instance).")
    rows: int = Field(description="Data rows read (scrapes or Prometheus points), look-back included.")
    instances: list[BacktestInstance]
    rules: list[BacktestRuleSummary]
    episodes: list[BacktestEpisode] = Field(description="Oldest first.")
    episodes_truncated: bool = Field(False, description="More episodes than the request's limit.")
    notes: list[str] = Field(default_factory=list)


# --- the grid ---------------------------------------------------------------------------------------


def _us(moment: datetime) -> int:
    return (moment.astimezone(UTC) - _EPOCH) // _US


def _at(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def grid(start: datetime, end: datetime, step: timedelta) -> tuple[datetime, int]:
    """The first evaluation time and how many there are: multiples of `step` (since the Unix epoch, so
    reruns line up) in [start, end]."""
    s = step // _US
    if s <= 0:
        raise ValidationError("step must be longer than 0s", {"field": "step"})
    first = -(-_us(start) // s) * s
    last = _us(end) // s * s
    return _at(first), max(0, (last - first) // s + 1)


def data_start(compiled: CompiledRules, start: datetime) -> datetime:
    """Where to start reading data, so the first evaluations see their whole look-back window."""
    return start - compiled.max_window


def scrape_interval(frame: pl.DataFrame) -> timedelta | None:
    """The data's own interval: the median gap between an instance's rows, to the whole second."""
    if frame.height < 2:
        return None
    gaps = (
        frame.lazy()
        .select("instance_id", "ts")
        .sort("instance_id", "ts")
        .select(pl.col("ts").diff().over("instance_id").dt.total_microseconds().alias("gap"))
        .filter(pl.col("gap") > 0)
        .select(pl.col("gap").median())
        .collect()
        .item()
    )
    if gaps is None:
        return None
    return timedelta(seconds=max(1, round(float(gaps) / 1e6)))


def check_rows(rows: int) -> None:
    """Refuse, before reading them, more data rows than MAX_ROWS."""
    if rows > MAX_ROWS:
        raise BacktestTooLargeError(
            f"the range holds {rows:,} data rows, over the backtest limit of {MAX_ROWS:,}: "
            "shorten the range or pick one instance",
            {"field": "start", "rows": rows, "max_rows": MAX_ROWS},
        )


def check_evaluations(instances: int, evaluations: int, step: timedelta) -> None:
    """Refuse more than MAX_EVALUATIONS (instances x evaluation times)."""
    total = instances * evaluations
    if total > MAX_EVALUATIONS:
        raise BacktestTooLargeError(
            f"{instances} instance(s) x {evaluations:,} evaluations ({step.total_seconds():g}s apart) "
            f"= {total:,} evaluations, over the backtest limit of {MAX_EVALUATIONS:,}: "
            "use a longer step, a shorter range or one instance",
            {"field": "step", "evaluations": total, "max_evaluations": MAX_EVALUATIONS},
        )


# --- evaluation -----------------------------------------------------------------------------------


def _hits(
    compiled: CompiledRules,
    frame: pl.DataFrame,
    instances: pl.DataFrame,
    first: datetime,
    count: int,
    step: timedelta,
) -> pl.DataFrame:
    """(instance_id, rule, k, severity, value) for every grid index k at which a rule holds.

    The grid times become rows of their own (quantities null, so every window skips them) where an
    instance has no sample exactly then: `evaluate_series` evaluates at every row's time, and a row at
    a grid time reads the same window `evaluate` would at that time.
    """
    s = step // _US
    per_chunk = max(1, CHUNK_EVALUATIONS // max(1, instances.height))
    quantities = [c for c in frame.columns if c not in ("instance_id", "engine", "ts")]
    ts = frame["ts"]
    parts: list[pl.DataFrame] = []
    for a in range(0, count, per_chunk):
        b = min(count, a + per_chunk)
        t_a, t_b = first + a * step, first + (b - 1) * step
        lo = int(ts.search_sorted(t_a - compiled.max_window, side="right"))
        hi = int(ts.search_sorted(t_b, side="right"))
        rows = frame.slice(lo, hi - lo)
        times = pl.DataFrame({"ts": pl.datetime_range(t_a, t_b, step, time_unit="us", eager=True)})
        points = (
            instances.select("instance_id", "engine")
            .join(times, how="cross")
            .join(rows.select("instance_id", "ts"), on=["instance_id", "ts"], how="anti")
        )
        chunk = pl.concat(
            [
                rows,
                points.with_columns(pl.lit(None, pl.Float64).alias(q) for q in quantities).select(
                    rows.columns
                ),
            ]
        )
        series = evaluate_series(compiled, chunk)
        offset = pl.col("window_end").dt.epoch("us") - _us(first)
        parts.append(
            series.lazy()
            .filter(pl.col("window_end") >= t_a, offset % s == 0)
            .select(
                "instance_id",
                "rule",
                (offset // s).alias("k"),
                "severity",
                "value",
                "unit",
            )
            .collect()
        )
    return pl.concat(parts).cast(_HITS_SCHEMA) if parts else pl.DataFrame(schema=_HITS_SCHEMA)


def fold_episodes(hits: pl.DataFrame, timings: pl.DataFrame, count: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Episodes and pending-only runs from the grid indexes at which each (instance, rule) held.

    `hits`: instance_id, rule, k, severity, value. `timings`: rule, f (`for` in steps, rounded up),
    r (`keep_firing_for` in steps, rounded up, at least 1), upward (the rule's op is `>`/`>=`).
    Returns (episodes: instance_id, rule, pending_k, fired_k, last_k, resolved_k (null: still
    firing at index count - 1), max_rank, peak; runs: instance_id, rule, pending_only).
    """
    ir = pl.col("instance_id"), pl.col("rule")
    held = (
        hits.lazy()
        .sort("instance_id", "rule", "k")
        .with_columns((pl.col("k").diff().over(_KEYS).fill_null(0) != 1).cum_sum().over(_KEYS).alias("run"))
    )
    runs = (
        held.group_by("instance_id", "rule", "run")
        .agg(pl.col("k").min().alias("first"), pl.col("k").max().alias("last"))
        .join(timings.lazy(), on="rule", how="left")
        .sort("instance_id", "rule", "first")
        .with_columns(
            fires=pl.col("last") - pl.col("first") >= pl.col("f"),
            close=(pl.col("first") <= pl.col("last").shift(1).over(_KEYS) + pl.col("r")).fill_null(False),
        )
        .with_columns((~pl.col("close")).cum_sum().over(_KEYS).alias("cluster"))
        # A cluster's episode starts at its first run that fires on its own; every later run of the
        # cluster comes within keep_firing_for of the one before, so it continues the episode.
        .with_columns(
            pl.when(pl.col("fires")).then(pl.col("first")).min().over([*_KEYS, "cluster"]).alias("pending_k")
        )
        .with_columns(in_episode=(pl.col("first") >= pl.col("pending_k")).fill_null(False))
        .collect()
    )
    firing = (
        held.join(
            runs.lazy().select(*ir, "run", "cluster", "pending_k", "in_episode", "f", "upward"),
            on=[*_KEYS, "run"],
        )
        .filter(pl.col("in_episode"), pl.col("k") >= pl.col("pending_k") + pl.col("f"))
        .group_by(*ir, "cluster")
        .agg(
            pl.col("severity").replace_strict(SEVERITY_RANK, return_dtype=pl.Int64).max().alias("max_rank"),
            pl.when(pl.col("upward").first())
            .then(pl.col("value").max())
            .otherwise(pl.col("value").min())
            .alias("peak"),
        )
    )
    episodes = (
        runs.lazy()
        .filter(pl.col("in_episode"))
        .group_by(*ir, "cluster")
        .agg(
            pl.col("pending_k").first(),
            (pl.col("pending_k").first() + pl.col("f").first()).alias("fired_k"),
            pl.col("last").max().alias("last_k"),
            pl.col("r").first(),
        )
        .with_columns(
            resolved_k=pl.when(pl.col("last_k") + pl.col("r") <= count - 1).then(
                pl.col("last_k") + pl.col("r")
            )
        )
        .join(firing, on=[*_KEYS, "cluster"])
        .select(*ir, "pending_k", "fired_k", "last_k", "resolved_k", "max_rank", "peak")
        .sort("fired_k", "instance_id", "rule")
        .collect()
    )
    pending = runs.select(*ir, pending_only=~pl.col("in_episode"))
    return episodes, pending


def _timings(compiled: CompiledRules, step: timedelta) -> pl.DataFrame:
    s = step // _US
    rules = [cr.source.rule for cr in compiled.rules]
    return pl.DataFrame(
        {
            "rule": [r.name for r in rules],
            "f": [-(-(r.for_ // _US) // s) for r in rules],
            "r": [max(1, -(-(r.keep_firing_for // _US) // s)) for r in rules],
            "upward": [r.op.upward for r in rules],
        },
        schema={"rule": pl.String, "f": pl.Int64, "r": pl.Int64, "upward": pl.Boolean},
    )


def _prepare(
    frame: pl.DataFrame, engines: Mapping[str, str | None], quantities: frozenset[str]
) -> pl.DataFrame:
    """The rules' columns (Float64; absent ones stay absent), one row per (instance, ts), in time order."""
    present = sorted(q for q in quantities if q in frame.columns)
    lookup = pl.DataFrame(
        {"instance_id": list(engines), "engine": list(engines.values())},
        schema={"instance_id": pl.String, "engine": pl.String},
    )
    return (
        frame.lazy()
        .select(
            pl.col("instance_id").cast(pl.String),
            pl.col("ts").cast(_TS),
            *(pl.col(q).cast(pl.Float64) for q in present),
        )
        .unique(["instance_id", "ts"], keep="last", maintain_order=True)
        .join(lookup.lazy(), on="instance_id", how="left")
        .select("instance_id", "engine", "ts", *present)
        .sort("ts")
        .collect()
    )


# --- the report -----------------------------------------------------------------------------------


def _unit(quantity: str) -> str:
    return CATALOG[quantity].unit.value if quantity in CATALOG else ""


def _rank_name(rank: int | None) -> SeverityName | None:
    return None if rank is None else _SEVERITIES[rank]


def _summaries(
    compiled: CompiledRules,
    episodes: pl.DataFrame,
    pending: pl.DataFrame,
    instances: pl.DataFrame,
    frame: pl.DataFrame,
    count: int,
    step: timedelta,
) -> list[BacktestRuleSummary]:
    seconds = step.total_seconds()
    with_data = {
        q
        for q in frame.columns
        if q not in ("instance_id", "engine", "ts") and frame[q].null_count() < frame.height
    }
    engines = instances["engine"].to_list()
    out: list[BacktestRuleSummary] = []
    for cr in compiled.rules:
        rule = cr.source.rule
        mine = episodes.filter(pl.col("rule") == rule.name)
        allowed = {e.value for e in rule.engines} if rule.engines else None
        applicable = sum(1 for e in engines if allowed is None or e in allowed)
        steps = (
            mine.select((pl.col("resolved_k").fill_null(count) - pl.col("fired_k")).alias("n"))["n"]
            if mine.height
            else pl.Series("n", [], pl.Int64)
        )
        firing = float(steps.sum()) * seconds
        to_fire = (mine["fired_k"] - mine["pending_k"]).mean() if mine.height else None
        quantities = [rule.quantity, *(c.quantity for c in rule.and_)]
        out.append(
            BacktestRuleSummary(
                rule=rule.name,
                type=rule.type,
                quantity=rule.quantity,
                unit=_unit(rule.quantity),
                for_seconds=rule.for_.total_seconds(),
                keep_firing_for_seconds=rule.keep_firing_for.total_seconds(),
                instances=applicable,
                episodes=mine.height,
                instances_fired=mine["instance_id"].n_unique() if mine.height else 0,
                still_firing=mine["resolved_k"].null_count() if mine.height else 0,
                pending_only=pending.filter(pl.col("rule") == rule.name, pl.col("pending_only")).height,
                firing_seconds=firing,
                firing_fraction=firing / (count * seconds * applicable) if count and applicable else 0.0,
                mean_time_to_fire_seconds=None if to_fire is None else float(to_fire) * seconds,  # type: ignore[arg-type]
                mean_episode_seconds=firing / mine.height if mine.height else None,
                max_severity=_rank_name(mine["max_rank"].max() if mine.height else None),  # type: ignore[arg-type]
                missing_quantities=[q for q in dict.fromkeys(quantities) if q not in with_data],
            )
        )
    return out


def run_backtest(
    compiled: CompiledRules,
    frame: pl.DataFrame,
    engines: Mapping[str, str | None],
    start: datetime,
    end: datetime,
    *,
    step: timedelta | None = None,
    source: str = "history",
    instances: Sequence[str] | None = None,
) -> BacktestReport:
    """Replay every rule of `compiled` over `frame` at `step` from `start` to `end`.

    `frame`: instance_id, ts and catalog quantity columns (Store.recent_scrapes' shape), read from
    `data_start(compiled, start)` so the first evaluations have their look-back. `engines` maps
    instance ids to engines (rows carry none). `step` defaults to the data's own interval. The
    instances evaluated are `instances`, else every instance with data.
    """
    if end <= start:
        raise ValidationError("the range is empty: start must be before end", {"field": "start"})
    check_rows(frame.height)
    data = _prepare(frame, engines, compiled.quantities)
    notes: list[str] = []
    ids = sorted(set(instances) if instances is not None else set(data["instance_id"].unique().to_list()))
    if instances is not None:
        data = data.filter(pl.col("instance_id").is_in(ids))
    chosen = pl.DataFrame(
        {"instance_id": ids, "engine": [engines.get(i) for i in ids]},
        schema={"instance_id": pl.String, "engine": pl.String},
    )
    if step is None:
        step = (
            scrape_interval(data.filter(pl.col("ts") > start))
            or scrape_interval(data)
            or timedelta(seconds=30)
        )
    first, count = grid(start, end, step)
    check_evaluations(len(ids), count, step)
    in_range = data.filter(pl.col("ts") > data_start(compiled, start), pl.col("ts") <= end)
    if in_range.filter(pl.col("ts") >= start).height == 0:
        notes.append(f"no data between {start.isoformat()} and {end.isoformat()}: nothing was evaluated")
    unknown = [i for i in ids if engines.get(i) is None]
    if unknown:
        notes.append(f"engine unknown for {', '.join(unknown)}: engine-specific rules skip them")
    if len(compiled.rules) and count and ids:
        notes.append(
            "replayed from an empty state at the start: a condition already holding then fires only "
            "after its `for`"
        )
    hits = _hits(compiled, in_range, chosen, first, count, step) if ids and count else None
    if hits is None:
        hits = pl.DataFrame(schema=_HITS_SCHEMA)
    episodes, pending = fold_episodes(hits, _timings(compiled, step), count)
    # The value's unit as the findings carry it (a slope's is per second, not the quantity's).
    units: dict[str, str] = dict(hits.unique("rule").select("rule", "unit").iter_rows())

    def at(k: int | None) -> datetime | None:
        return None if k is None else first + k * step

    rules = {cr.name: cr.source.rule for cr in compiled.rules}
    report_episodes = [
        BacktestEpisode(
            rule=row["rule"],
            instance_id=row["instance_id"],
            engine=engines.get(row["instance_id"]),
            type=rules[row["rule"]].type,
            pending_at=first + row["pending_k"] * step,
            fired_at=first + row["fired_k"] * step,
            last_held_at=first + row["last_k"] * step,
            resolved_at=at(row["resolved_k"]),
            firing_seconds=((row["resolved_k"] if row["resolved_k"] is not None else count) - row["fired_k"])
            * step.total_seconds(),
            max_severity=_SEVERITIES[row["max_rank"]],
            peak_value=row["peak"],
            unit=units.get(row["rule"]) or _unit(rules[row["rule"]].quantity),
        )
        for row in episodes.iter_rows(named=True)
    ]
    return BacktestReport(
        source=source,
        start=start,
        end=end,
        step_seconds=step.total_seconds(),
        evaluations=count,
        rows=in_range.height,
        instances=[BacktestInstance(instance_id=i, engine=engines.get(i)) for i in ids],
        rules=_summaries(compiled, episodes, pending, chosen, in_range, count, step),
        episodes=report_episodes,
        notes=notes,
    )
