"""Findings over time: `for` and `keep_firing_for`, as Prometheus alerts do, as a pure state step.

A finding is pending while its rule's condition holds for less than the rule's `for`, firing once
it has held continuously that long, and keeps firing for `keep_firing_for` after the condition last
held; then it resolves. `FindingTracker.advance` takes the previous state (a frame the caller may
persist, e.g. in DuckDB, to survive restarts) and one evaluation's results, and returns the new state
plus the transitions (fired, resolved, severity_changed). It keeps no state of its own.

One difference from Prometheus: `keep_firing_for` counts from the last evaluation at which the
condition held, not from the first at which it did not, so a finding resolves at the first
evaluation at least `keep_firing_for` after it last held. Missed evaluations are not detected: the
condition is assumed to have held in between, as Prometheus assumes when it restores alert state.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Final

import polars as pl

from perfagent.detect import CompiledRules
from perfagent.rules import LoadedRule, RuleSet

_TS: Final = pl.Datetime("us", "UTC")


class FindingState(StrEnum):
    PENDING = "pending"
    FIRING = "firing"


class TransitionKind(StrEnum):
    FIRED = "fired"
    RESOLVED = "resolved"
    SEVERITY_CHANGED = "severity_changed"


# The columns of a finding that come from the latest evaluation in which its condition held.
_CARRIED: Final[tuple[str, ...]] = (
    "engine",
    "type",
    "severity",
    "value",
    "threshold",
    "summary",
    "description",
    "recommendation",
)

STATE_SCHEMA: Final = pl.Schema(
    {
        "instance_id": pl.String(),
        "rule": pl.String(),
        "state": pl.String(),  # pending | firing
        "engine": pl.String(),
        "type": pl.String(),
        "severity": pl.String(),
        "value": pl.Float64(),
        "threshold": pl.Float64(),
        "summary": pl.String(),
        "description": pl.String(),
        "recommendation": pl.String(),
        "first_seen": _TS,  # the condition has held continuously since (the episode's start)
        "fired_at": _TS,  # null while pending
        "last_seen": _TS,  # the last evaluation at which the condition held
    }
)

TRANSITION_SCHEMA: Final = pl.Schema(
    {
        "kind": pl.String(),  # fired | resolved | severity_changed
        "at": _TS,
        **{k: v for k, v in STATE_SCHEMA.items() if k != "state"},
        "previous_severity": pl.String(),  # for severity_changed
        "resolved_at": _TS,  # for resolved
    }
)

_TIMING_SCHEMA: Final = pl.Schema({"rule": pl.String(), "for": pl.Duration("us"), "keep": pl.Duration("us")})


@dataclass(frozen=True, slots=True)
class Step:
    """The state after one evaluation, and what changed."""

    at: datetime
    state: pl.DataFrame  # STATE_SCHEMA
    transitions: pl.DataFrame  # TRANSITION_SCHEMA

    @property
    def firing(self) -> pl.DataFrame:
        return self.state.filter(pl.col("state") == FindingState.FIRING.value)


@dataclass(frozen=True, slots=True, eq=False)
class FindingTracker:
    """The `for` / `keep_firing_for` of every rule; `advance` is a pure function of its arguments."""

    timings: pl.DataFrame  # rule, for, keep

    @classmethod
    def from_rules(cls, rules: RuleSet | CompiledRules | Iterable[LoadedRule]) -> FindingTracker:
        loaded = [cr.source for cr in rules.rules] if isinstance(rules, CompiledRules) else list(rules)
        timings = pl.DataFrame(
            {
                "rule": [lr.rule.name for lr in loaded],
                "for": [lr.rule.for_ for lr in loaded],
                "keep": [lr.rule.keep_firing_for for lr in loaded],
            },
            schema=_TIMING_SCHEMA,
        )
        return cls(timings)

    @staticmethod
    def empty_state() -> pl.DataFrame:
        return pl.DataFrame(schema=STATE_SCHEMA)

    def advance(self, state: pl.DataFrame, results: pl.DataFrame, at: datetime) -> Step:
        """Fold one evaluation (`Evaluation.results` at `at`) into `state`.

        Rows of `results` are the (instance, rule) pairs whose condition holds at `at`; a pair absent
        from them does not hold (insufficient data counts as not holding). A rule unknown to the
        tracker (removed from the rule set) gets `for: 0` and `keep_firing_for: 0`.
        """
        at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
        now = pl.lit(at, dtype=_TS)
        current = results.select(
            pl.col("instance_id"),
            pl.col("rule"),
            *(pl.col(c).alias(f"{c}_new") for c in _CARRIED),
        ).unique(["instance_id", "rule"], keep="any")
        previous = state.select(list(STATE_SCHEMA)).cast(STATE_SCHEMA)
        zero = pl.lit(timedelta(0), dtype=pl.Duration("us"))

        holds = pl.col("severity_new").is_not_null()
        was_firing = (pl.col("state") == FindingState.FIRING.value).fill_null(False)
        first_seen = (
            pl.when(holds & pl.col("state").is_null()).then(now).otherwise(pl.col("first_seen")).cast(_TS)
        )
        last_seen = pl.when(holds).then(now).otherwise(pl.col("last_seen")).cast(_TS)
        step = (
            previous.lazy()
            .join(current.lazy(), on=["instance_id", "rule"], how="full", coalesce=True)
            .join(self.timings.lazy(), on="rule", how="left")
            .with_columns(pl.col("for").fill_null(zero), pl.col("keep").fill_null(zero))
            .with_columns(first_seen.alias("first_seen"), last_seen.alias("last_seen"), was=was_firing)
            .with_columns(
                new_state=pl.when(holds & (pl.col("was") | (now - pl.col("first_seen") >= pl.col("for"))))
                .then(pl.lit(FindingState.FIRING.value))
                .when(holds)
                .then(pl.lit(FindingState.PENDING.value))
                .when(pl.col("was") & (now - pl.col("last_seen") < pl.col("keep")))
                .then(pl.lit(FindingState.FIRING.value))
                .otherwise(pl.lit(None, pl.String)),
                previous_severity=pl.col("severity"),
                **{c: pl.coalesce(f"{c}_new", c) for c in _CARRIED},
            )
            .with_columns(
                fired_at=pl.when(pl.col("was"))
                .then(pl.col("fired_at"))
                .when(pl.col("new_state") == FindingState.FIRING.value)
                .then(now)
                .otherwise(pl.lit(None, _TS)),
                kind=pl.when((pl.col("new_state") == FindingState.FIRING.value) & ~pl.col("was"))
                .then(pl.lit(TransitionKind.FIRED.value))
                .when(pl.col("was") & pl.col("new_state").is_null())
                .then(pl.lit(TransitionKind.RESOLVED.value))
                .when(pl.col("was") & holds & (pl.col("severity") != pl.col("previous_severity")))
                .then(pl.lit(TransitionKind.SEVERITY_CHANGED.value))
                .otherwise(pl.lit(None, pl.String)),
            )
        )
        new_state, transitions = pl.collect_all(
            [
                step.filter(pl.col("new_state").is_not_null())
                .with_columns(state=pl.col("new_state"))
                .select(list(STATE_SCHEMA))
                .sort("instance_id", "rule"),
                step.filter(pl.col("kind").is_not_null())
                .with_columns(
                    at=now,
                    resolved_at=pl.when(pl.col("kind") == TransitionKind.RESOLVED.value)
                    .then(now)
                    .otherwise(pl.lit(None, _TS)),
                    previous_severity=pl.when(pl.col("kind") == TransitionKind.SEVERITY_CHANGED.value)
                    .then(pl.col("previous_severity"))
                    .otherwise(pl.lit(None, pl.String)),
                )
                .select(list(TRANSITION_SCHEMA))
                .sort("instance_id", "rule"),
            ]
        )
        return Step(at, new_state.cast(STATE_SCHEMA), transitions.cast(TRANSITION_SCHEMA))

    def replay(
        self, series: pl.DataFrame, times: Sequence[datetime], state: pl.DataFrame | None = None
    ) -> Iterator[Step]:
        """Advance through `times` with the results of `evaluate_series` (rows keyed by window_end)."""
        state = self.empty_state() if state is None else state
        by_time = series.partition_by("window_end", as_dict=True) if series.height else {}
        empty = series.clear()
        for at in times:
            at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
            step = self.advance(state, by_time.get((at,), empty), at)
            state = step.state
            yield step
