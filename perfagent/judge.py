"""The canary judge: is the changed instance worse than the unchanged ones of its group? Pure, no I/O.

Samples are one value per scrape window (e.g. the window's mean TTFT) of the canary, and of the
baseline instances pooled. Per metric:

* Shift: a one-sided Mann-Whitney U test in the harmful direction (canary higher for latencies,
  lower for throughput). The gate asks "is the canary worse?", so the one-sided test is the test of
  that question and has the most power at a given false-alarm rate. The better direction is tested
  too, only to report improvements; it never decides a verdict. `scipy.stats.mannwhitneyu`, method
  `auto` (exact for small samples without ties, else normal approximation with tie correction).
* Effect size: Cliff's delta = P(canary > baseline) - P(canary < baseline) = 2U/(n_c n_b) - 1, which
  is the rank-biserial correlation of U. Positive means the canary is higher. A significant shift
  counts only when |delta| reaches `min_effect` (default 0.33, "medium" in Romano et al. 2006) and
  the medians differ by at least `min_change` (relative): with hundreds of windows, a consistent 1 %
  difference between two GPUs would otherwise be "significant".
* Spread: a rank test does not see a canary whose median is fine but whose values scatter (e.g.
  stalls). The relative dispersion - mean absolute deviation from the median, divided by the median -
  is compared by the Brown-Forsythe test (Levene's test centred on the median: robust to skew) on
  values scaled by their own median, so a uniformly faster or slower canary is a shift, not a spread
  change. A spread blow-up needs a significant test and a ratio of at least `spread_limit`, and the
  canary must scatter at least that much more in absolute terms too: a canary far faster than the
  baseline keeps some jitter that is large only relative to its small median, and is not unstable.
  Off for zero-inflated metrics (error and preemption rates), where the median is usually 0.
* Data sufficiency: fewer than `min_samples` finite values on either side is `insufficient_data`; so
  is a traffic metric (throughput) with fewer than `min_samples` non-zero windows on either side, and
  then the whole verdict is inconclusive ("no traffic"): a person decides, the workflow does not guess.

False alarms across metrics: every gate test (one shift test per metric, one spread test per metric
that has a spread limit) is one family, adjusted by Holm's step-down method, which bounds the chance
of any false alarm at `alpha` whatever the dependence between metrics. Improvements are a second
family, adjusted the same way.

Verdict: `inconclusive` when there is no traffic; else `fail` when any metric is worse or blew up
(even if others lack data); else `inconclusive` when any metric lacks data; else `pass`. Caveat: consecutive windows of one
instance are autocorrelated, which makes p-values optimistic; the effect-size and change thresholds
are what keep that from failing healthy canaries.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, field_validator
from scipy import stats

from perfagent.catalog import CATALOG

DEFAULT_ALPHA: Final = 0.05
Array = npt.NDArray[np.float64]


class Direction(StrEnum):
    HIGHER_IS_WORSE = "higher_is_worse"
    HIGHER_IS_BETTER = "higher_is_better"


class Decision(StrEnum):
    WORSE = "worse"
    SPREAD = "spread_blowup"
    BETTER = "better"
    NO_CHANGE = "no_change"
    INSUFFICIENT = "insufficient_data"


class Outcome(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


class MetricSpec(BaseModel):
    """How one metric is judged."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    quantity: str = Field(description="Catalog quantity the samples are taken from.")
    direction: Direction
    min_effect: float = Field(0.33, ge=0, le=1, description="Smallest |Cliff's delta| that counts.")
    min_change: float = Field(0.0, ge=0, description="Smallest relative change of the median that counts.")
    min_samples: int = Field(10, ge=3, description="Fewer finite samples on a side: insufficient data.")
    spread_limit: float | None = Field(
        2.0, gt=1, description="Relative-dispersion ratio that fails; None: off."
    )
    traffic: bool = Field(False, description="Zero on most windows means no traffic: inconclusive.")

    @field_validator("quantity")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in CATALOG:
            raise ValueError(f"{value!r} is not a catalog quantity")
        return value


WORSE_UP, BETTER_UP = Direction.HIGHER_IS_WORSE, Direction.HIGHER_IS_BETTER
DEFAULT_METRICS: Final[tuple[MetricSpec, ...]] = (
    MetricSpec(name="ttft", quantity="ttft_seconds", direction=WORSE_UP, min_change=0.05),
    MetricSpec(name="itl", quantity="itl_seconds", direction=WORSE_UP, min_change=0.05),
    MetricSpec(name="e2e_latency", quantity="e2e_latency_seconds", direction=WORSE_UP, min_change=0.05),
    MetricSpec(
        name="throughput",
        quantity="generation_tokens_per_second",
        direction=BETTER_UP,
        min_change=0.05,
        traffic=True,
    ),
    MetricSpec(name="error_rate", quantity="error_rate", direction=WORSE_UP, spread_limit=None),
    MetricSpec(name="preemption_rate", quantity="preemption_rate", direction=WORSE_UP, spread_limit=None),
)


class MetricResult(BaseModel):
    """One metric's statistics and decision. Effect sizes are canary minus baseline in sign."""

    name: str
    quantity: str
    direction: Direction
    decision: Decision
    reason: str
    n_canary: int
    n_baseline: int
    u: float | None = Field(None, description="Mann-Whitney U of the canary sample.")
    p_worse: float | None = Field(None, description="One-sided p that the canary is worse.")
    p_worse_adjusted: float | None = None
    p_better: float | None = Field(None, description="One-sided p that the canary is better.")
    p_better_adjusted: float | None = None
    effect_size: float | None = Field(None, description="Cliff's delta; > 0: canary higher.")
    median_canary: float | None = None
    median_baseline: float | None = None
    relative_change: float | None = Field(None, description="(median canary - median baseline) / baseline.")
    spread_ratio: float | None = Field(None, description="Relative dispersion, canary over baseline.")
    spread_ratio_absolute: float | None = Field(
        None, description="Mean absolute deviation from the median, canary over baseline."
    )
    spread_p: float | None = Field(None, description="Brown-Forsythe p on median-scaled values.")
    spread_p_adjusted: float | None = None


class Verdict(BaseModel):
    outcome: Outcome
    reason: str
    alpha: float
    effect_size_measure: Literal["cliffs_delta"] = "cliffs_delta"
    correction: Literal["holm"] = "holm"
    metrics: list[MetricResult]
    regressions: list[str]
    improvements: list[str]
    insufficient: list[str]


def cliffs_delta(u: float, n_canary: int, n_baseline: int) -> float:
    """Cliff's delta from the canary's U: P(c > b) - P(c < b)."""
    return 2.0 * u / (n_canary * n_baseline) - 1.0


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values, in the input order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def _finite(values: Any) -> Array:
    array = np.asarray(values, dtype=np.float64).ravel()
    return array[np.isfinite(array)]


def _relative(new: float, old: float) -> float:
    if old != 0:
        return (new - old) / abs(old)
    return 0.0 if new == old else math.copysign(math.inf, new - old)


_MEDIAN_FLOOR: Final = 1e-9
"""A median below this share of the largest value counts as zero for the spread test."""


def _dispersion(values: Array, median: float) -> float:
    return float(np.mean(np.abs(values / median - 1.0)))


@dataclass(slots=True)
class _Stats:
    spec: MetricSpec
    canary: Array
    baseline: Array
    insufficient: str = ""  # why, when the data do not suffice
    u: float = math.nan
    p_worse: float = math.nan
    p_better: float = math.nan
    delta: float = math.nan
    median_c: float = math.nan
    median_b: float = math.nan
    spread_ratio: float = math.nan  # inf: the baseline does not vary at all
    spread_ratio_abs: float = math.nan
    spread_p: float = math.nan  # nan: no spread test
    p_worse_adj: float = math.nan
    p_better_adj: float = math.nan
    spread_p_adj: float = math.nan

    @property
    def sign(self) -> float:
        """+1 when higher is worse, so `sign * delta` > 0 always means "canary worse"."""
        return 1.0 if self.spec.direction is Direction.HIGHER_IS_WORSE else -1.0


def _sufficiency(spec: MetricSpec, canary: Array, baseline: Array) -> str:
    for side, values in (("canary", canary), ("baseline", baseline)):
        if values.size < spec.min_samples:
            return f"{values.size} {side} samples < {spec.min_samples}"
        if spec.traffic and np.count_nonzero(values) < spec.min_samples:
            return (
                f"no traffic on the {side}: {np.count_nonzero(values)} non-zero windows < {spec.min_samples}"
            )
    return ""


def _measure(spec: MetricSpec, canary_values: Any, baseline_values: Any) -> _Stats:
    s = _Stats(spec, _finite(canary_values), _finite(baseline_values))
    s.insufficient = _sufficiency(spec, s.canary, s.baseline)
    if s.insufficient:
        return s
    worse, better = (
        ("greater", "less") if spec.direction is Direction.HIGHER_IS_WORSE else ("less", "greater")
    )
    test = stats.mannwhitneyu(s.canary, s.baseline, alternative=worse)
    s.u, s.p_worse = float(test.statistic), float(test.pvalue)
    s.p_better = float(stats.mannwhitneyu(s.canary, s.baseline, alternative=better).pvalue)
    s.delta = cliffs_delta(s.u, s.canary.size, s.baseline.size)
    s.median_c, s.median_b = float(np.median(s.canary)), float(np.median(s.baseline))
    # The spread test scales each side by its median; a median that is zero or negligible next to
    # the data (a mostly-zero sample) has no scale to speak of, and dividing by it overflows.
    scale = max(float(np.max(np.abs(s.canary))), float(np.max(np.abs(s.baseline))))
    if spec.spread_limit is not None and min(s.median_c, s.median_b) > _MEDIAN_FLOOR * scale:
        disp_c, disp_b = _dispersion(s.canary, s.median_c), _dispersion(s.baseline, s.median_b)
        if disp_b > 0:
            s.spread_ratio = disp_c / disp_b
            s.spread_ratio_abs = s.spread_ratio * s.median_c / s.median_b
        elif disp_c > 0:
            s.spread_ratio = s.spread_ratio_abs = math.inf
        if disp_c == 0 and disp_b == 0:
            s.spread_ratio, s.spread_p = 1.0, 1.0  # both constant: nothing to test, and no blow-up
        else:
            # Deviations constant within each group make the F statistic x/0 (inf: p 0) or 0/0 (nan).
            with np.errstate(divide="ignore", invalid="ignore"):
                scaled = stats.levene(s.canary / s.median_c, s.baseline / s.median_b, center="median")
            p = float(scaled.pvalue)
            s.spread_p = 1.0 if math.isnan(p) else p
    return s


def _adjust(measured: list[_Stats]) -> None:
    ready = [s for s in measured if not s.insufficient]
    gate = [s.p_worse for s in ready] + [s.spread_p for s in ready if not math.isnan(s.spread_p)]
    adjusted = iter(holm(gate))
    for s in ready:
        s.p_worse_adj = next(adjusted)
    for s in ready:
        if not math.isnan(s.spread_p):
            s.spread_p_adj = next(adjusted)
    for s, p in zip(ready, holm([s.p_better for s in ready]), strict=True):
        s.p_better_adj = p


def _fmt_change(change: float) -> str:
    return "from 0" if math.isinf(change) else f"{change:+.1%}"


def _decide(s: _Stats, alpha: float) -> tuple[Decision, str]:
    spec = s.spec
    if s.insufficient:
        return Decision.INSUFFICIENT, s.insufficient
    harm = s.sign * s.delta
    change = _relative(s.median_c, s.median_b)
    harm_change = s.sign * change
    stats_text = f"Cliff's delta {s.delta:+.2f}, median {_fmt_change(change)}"
    if s.p_worse_adj <= alpha and harm >= spec.min_effect and harm_change >= spec.min_change:
        return Decision.WORSE, f"canary worse: {stats_text}, Holm p {s.p_worse_adj:.2g} <= {alpha:g}"
    if (
        spec.spread_limit is not None
        and not math.isnan(s.spread_p_adj)
        and s.spread_p_adj <= alpha
        and s.spread_ratio >= spec.spread_limit
        and s.spread_ratio_abs >= spec.spread_limit
    ):
        ratio = "from a constant baseline" if math.isinf(s.spread_ratio) else f"x{s.spread_ratio:.2f}"
        return (
            Decision.SPREAD,
            f"canary scatters more: relative dispersion {ratio} >= x{spec.spread_limit:g}, "
            f"Brown-Forsythe Holm p {s.spread_p_adj:.2g} <= {alpha:g} ({stats_text})",
        )
    if s.p_better_adj <= alpha and -harm >= spec.min_effect and -harm_change >= spec.min_change:
        return Decision.BETTER, f"canary better: {stats_text}, Holm p {s.p_better_adj:.2g} <= {alpha:g}"
    return Decision.NO_CHANGE, f"no harmful change: {stats_text}, Holm p(worse) {s.p_worse_adj:.2g}"


def _number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _result(s: _Stats, decision: Decision, reason: str) -> MetricResult:
    ready = not s.insufficient
    return MetricResult(
        name=s.spec.name,
        quantity=s.spec.quantity,
        direction=s.spec.direction,
        decision=decision,
        reason=reason,
        n_canary=int(s.canary.size),
        n_baseline=int(s.baseline.size),
        u=_number(s.u),
        p_worse=_number(s.p_worse),
        p_worse_adjusted=_number(s.p_worse_adj),
        p_better=_number(s.p_better),
        p_better_adjusted=_number(s.p_better_adj),
        effect_size=_number(s.delta),
        median_canary=_number(s.median_c) if ready else None,
        median_baseline=_number(s.median_b) if ready else None,
        relative_change=_number(_relative(s.median_c, s.median_b)) if ready else None,
        spread_ratio=_number(s.spread_ratio),
        spread_ratio_absolute=_number(s.spread_ratio_abs),
        spread_p=_number(s.spread_p),
        spread_p_adjusted=_number(s.spread_p_adj),
    )


def judge(
    canary: Mapping[str, Any],
    baseline: Mapping[str, Any],
    specs: Sequence[MetricSpec] = DEFAULT_METRICS,
    *,
    alpha: float = DEFAULT_ALPHA,
) -> Verdict:
    """Judge the canary. `canary` and `baseline` map a spec's name to its samples (array-like; NaN and
    missing names count as no data)."""
    if not 0 < alpha < 1:
        raise ValueError("alpha must be between 0 and 1")
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError("metric spec names must be unique")
    measured = [_measure(spec, canary.get(spec.name, ()), baseline.get(spec.name, ())) for spec in specs]
    _adjust(measured)
    results = [_result(s, *_decide(s, alpha)) for s in measured]
    bad = [r.name for r in results if r.decision in (Decision.WORSE, Decision.SPREAD)]
    good = [r.name for r in results if r.decision is Decision.BETTER]
    missing = [r.name for r in results if r.decision is Decision.INSUFFICIENT]
    no_traffic = [s.spec.name for s in measured if s.spec.traffic and s.insufficient]
    if no_traffic:
        outcome, reason = Outcome.INCONCLUSIVE, f"not enough traffic to judge ({', '.join(no_traffic)})"
    elif bad:
        outcome, reason = Outcome.FAIL, f"canary worse on {', '.join(bad)}"
    elif missing:
        outcome, reason = Outcome.INCONCLUSIVE, f"not enough data on {', '.join(missing)}"
    else:
        outcome, reason = (
            Outcome.PASS,
            "no metric is worse" + (f"; better on {', '.join(good)}" if good else ""),
        )
    return Verdict(
        outcome=outcome,
        reason=reason,
        alpha=alpha,
        metrics=results,
        regressions=bad,
        improvements=good,
        insufficient=missing,
    )
