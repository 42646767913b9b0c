"""The statistical judge: a `CanaryJudge` that decides a batch from the engines' own reports and the
stored history, and asks a person only when the data cannot decide.

For each batch (the canary, then each rollout batch):

1. Warm-up: nothing is looked at until `canary_warmup` seconds after the batch's change (the restart,
   empty caches): PENDING.
2. Did the change take effect? `effect.confirm_effect` on every changed instance. A setting the
   engine reports with another value fails the batch (the change did not happen as planned); an
   engine that cannot be read yet (still restarting) keeps it PENDING, and past the deadline (two
   windows after the warm-up, or after the agent's own start when it restarted since) goes to a
   person; a setting the engine does not report at all is recorded as unverifiable and does
   not block (vLLM exports no `max_num_seqs`, TGI and SGLang no settings at all).
3. Window: once `canary_window` seconds after the warm-up have passed, the samples of the changed
   instances and of the baseline over [change + warm-up, now] go to `judge.judge`. The window is at
   least 12 polling intervals, so each side can have the judge's 10 samples.
4. pass → PASS, fail → FAIL naming the worse metrics, inconclusive (too few samples, no traffic) →
   PENDING while more data may come (one more window), then REVIEW: a person decides.

Every PASS, FAIL and REVIEW carries the judge's statistics and the effect reports, which the
workflow stores with the verdict.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from perfagent.canary import STATISTICAL, BaselineKind, CanaryCase, Judgement, JudgeOutcome
from perfagent.canary_samples import canary_samples
from perfagent.clock import utc_now
from perfagent.effect import EffectReport, EffectStatus, confirm_effect
from perfagent.history import HistoryWriter
from perfagent.judge import (
    DEFAULT_ALPHA,
    DEFAULT_METRICS,
    Decision,
    MetricResult,
    MetricSpec,
    Outcome,
    Verdict,
    judge,
)
from perfagent.models import Instance
from perfagent.scrape import Scraper
from perfagent.store import Store

InstanceLookup = Callable[[str], Awaitable[Instance | None]]
WINDOW_POLLS = 2  # polling intervals beyond the judge's minimum sample count in a window


def _change(metric: MetricResult) -> str:
    change = metric.relative_change
    return "n/a" if change is None else f"{change:+.0%}"


def _worse(metric: MetricResult) -> str:
    if metric.decision is Decision.SPREAD:
        ratio = "n/a" if metric.spread_ratio is None else f"x{metric.spread_ratio:.1f}"
        p = "n/a" if metric.spread_p_adjusted is None else f"{metric.spread_p_adjusted:.2g}"
        return f"{metric.name} scatters {ratio} more (Brown-Forsythe Holm p {p})"
    delta = "n/a" if metric.effect_size is None else f"{metric.effect_size:+.2f}"
    p = "n/a" if metric.p_worse_adjusted is None else f"{metric.p_worse_adjusted:.2g}"
    return f"{metric.name} {_change(metric)} (Cliff's delta {delta}, Holm p {p})"


def describe(verdict: Verdict) -> str:
    """The verdict in one line, naming the metrics that decided it."""
    by_name = {m.name: m for m in verdict.metrics}
    if verdict.outcome is Outcome.FAIL:
        return "worse on " + "; ".join(_worse(by_name[n]) for n in verdict.regressions)
    if verdict.outcome is Outcome.PASS:
        better = ", ".join(f"{n} {_change(by_name[n])}" for n in verdict.improvements)
        return "no metric worse" + (f"; better on {better}" if better else "")
    return verdict.reason


def _mismatches(reports: Sequence[EffectReport]) -> str:
    return "; ".join(
        f"{r.instance_id} reports {c.setting}={c.observed!r} (expected {c.expected!r})"
        for r in reports
        for c in r.checks
        if c.status is EffectStatus.MISMATCH
    )


class StatisticalJudge:
    name = STATISTICAL

    def __init__(
        self,
        store: Store,
        history: HistoryWriter,
        scraper: Scraper,
        instance: InstanceLookup,
        *,
        warmup: float,
        window: float,
        polling_interval: float,
        alpha: float = DEFAULT_ALPHA,
        specs: Sequence[MetricSpec] = DEFAULT_METRICS,
        started: datetime | None = None,
    ) -> None:
        self._store = store
        self._history = history
        self._scraper = scraper
        self._instance = instance
        self.warmup = timedelta(seconds=warmup)
        min_samples = max(spec.min_samples for spec in specs)
        self.window = timedelta(seconds=max(window, (min_samples + WINDOW_POLLS) * polling_interval))
        self.retry = max(polling_interval, 0.2)
        self.alpha = alpha
        self.specs = tuple(specs)
        # Patience counts from the agent's start too: scrapes an agent that was down never took are
        # not a reason to give up on a batch it judges after a restart.
        self.started = started or utc_now()

    def _pending(self, reason: str, until: datetime | None = None) -> Judgement:
        wait = self.retry if until is None else max((until - utc_now()).total_seconds(), 0.05)
        return Judgement(JudgeOutcome.PENDING, reason, retry_after=min(wait, max(self.retry, 5.0)))

    async def judge(self, case: CanaryCase) -> Judgement:
        warm = case.changed_at + self.warmup
        due, deadline = warm + self.window, max(warm, self.started) + 2 * self.window
        if utc_now() < warm:
            return self._pending(f"warm-up until {warm.isoformat()}", warm)
        reports: list[EffectReport] = []
        for instance_id in case.changed:
            instance = await self._instance(instance_id)
            if instance is None:
                return Judgement(JudgeOutcome.REVIEW, f"{instance_id} is no longer watched: nothing to judge")
            reports.append(await confirm_effect(instance, case.settings, self._scraper))
        evidence: dict[str, Any] = {"effect": [r.model_dump(mode="json") for r in reports]}
        if mismatch := _mismatches(reports):
            return Judgement(JudgeOutcome.FAIL, f"the change is not in effect: {mismatch}", evidence)
        if down := [r.instance_id for r in reports if r.status is EffectStatus.UNREACHABLE]:
            if utc_now() >= deadline:
                reason = f"{', '.join(down)} not readable since the change: check the engine, then resume"
                return Judgement(JudgeOutcome.REVIEW, reason, evidence)
            return self._pending(f"waiting for {', '.join(down)} to answer")
        if utc_now() < due:
            return self._pending(f"collecting samples until {due.isoformat()}", due)
        now = utc_now()
        verdict, window = await self._verdict(case, warm, now)
        evidence |= {"statistics": verdict.model_dump(mode="json"), "window": window}
        if verdict.outcome is Outcome.PASS:
            return Judgement(JudgeOutcome.PASS, describe(verdict), evidence)
        if verdict.outcome is Outcome.FAIL:
            return Judgement(JudgeOutcome.FAIL, describe(verdict), evidence)
        if now < deadline:
            return self._pending(f"{verdict.reason}; collecting more until {deadline.isoformat()}")
        return Judgement(JudgeOutcome.REVIEW, f"inconclusive: {verdict.reason}; a person decides", evidence)

    async def _verdict(
        self, case: CanaryCase, warm: datetime, now: datetime
    ) -> tuple[Verdict, dict[str, Any]]:
        await self._history.flush()  # the last scrapes are in the store before they are read
        changed = await canary_samples(
            self._store,
            canary_id=case.changed,
            baseline_ids=case.baseline,
            start=case.changed_at,
            end=now,
            warmup=self.warmup,
            specs=self.specs,
        )
        window: dict[str, Any] = {"since": changed.since.isoformat(), "until": changed.until.isoformat()}
        baseline = changed.baseline
        if case.baseline_kind is BaselineKind.BEFORE:
            # The same instances before the change, over a window as long as the one judged.
            before_until = case.started_at
            before_since = before_until - (now - warm)
            past = await canary_samples(
                self._store,
                canary_id=case.changed,
                baseline_ids=(),
                start=before_since,
                end=before_until,
                warmup=timedelta(0),
                specs=self.specs,
            )
            baseline = past.canary
            window |= {"baseline_since": before_since.isoformat(), "baseline_until": before_until.isoformat()}
        return judge(changed.canary, baseline, self.specs, alpha=self.alpha), window
