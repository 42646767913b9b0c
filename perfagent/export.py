"""The agent's own /metrics: its health (and, from Detection 1, its findings) for Prometheus.

A custom collector on the application's own registry reads the live state at scrape time, the way
prometheus_client documents re-exporting data held elsewhere; nothing is double-bookkept in
prometheus_client metric objects.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import polars as pl
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from perfagent import __version__
from perfagent.burnrate import window_label
from perfagent.catalog import CATALOG
from perfagent.context import Agent
from perfagent.workflow_models import WorkflowStatus


class AgentCollector(Collector):
    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily | InfoMetricFamily]:
        agent = self._agent
        info = InfoMetricFamily("perfagent_build", "perfagent version.")
        info.add_metric([], {"version": __version__})
        yield info
        yield GaugeMetricFamily(
            "perfagent_uptime_seconds",
            "Seconds since the agent started.",
            value=time.monotonic() - agent.started_monotonic,
        )
        duration = GaugeMetricFamily(
            "perfagent_scrape_duration_seconds",
            "Duration of the last scrape of each instance.",
            labels=["instance"],
        )
        scrapes = CounterMetricFamily(
            "perfagent_scrapes", "Scrapes finished (successful or not) per instance.", labels=["instance"]
        )
        errors = CounterMetricFamily(
            "perfagent_scrape_errors", "Failed scrapes per instance.", labels=["instance"]
        )
        up = GaugeMetricFamily(
            "perfagent_instance_up", "1 when the last scrape of the instance succeeded.", labels=["instance"]
        )
        for instance_id, health in sorted(agent.poller.health.items()):
            if health.last_duration_seconds is not None:
                duration.add_metric([instance_id], health.last_duration_seconds)
            scrapes.add_metric([instance_id], health.scrapes_total)
            errors.add_metric([instance_id], health.errors_total)
            ok = health.last_success is not None and (
                health.last_error_at is None or health.last_success >= health.last_error_at
            )
            up.add_metric([instance_id], 1.0 if ok else 0.0)
        yield from (duration, scrapes, errors, up)
        stats = agent.poller.stats
        yield CounterMetricFamily("perfagent_poller_ticks", "Poller cycles started.", value=stats.ticks)
        yield CounterMetricFamily(
            "perfagent_poller_missed_ticks",
            "Poller cycles that could not start on time.",
            value=stats.missed_ticks,
        )
        yield CounterMetricFamily(
            "perfagent_poller_skipped_scrapes",
            "Scrapes skipped because the previous scrape of the instance was still running.",
            value=stats.skipped,
        )
        lag = GaugeMetricFamily(
            "perfagent_history_write_lag_seconds",
            "Age of the oldest scrape in the last history batch when it was written.",
        )
        if agent.history.last_write_lag_seconds is not None:
            lag.add_metric([], agent.history.last_write_lag_seconds)
        yield lag
        yield GaugeMetricFamily(
            "perfagent_history_pending",
            "Scrapes waiting to be written to DuckDB.",
            value=agent.history.pending,
        )
        workflows = GaugeMetricFamily("perfagent_workflows", "Workflows by status.", labels=["status"])
        for status in WorkflowStatus:
            workflows.add_metric([status.value], agent.workflows.store.counts.get(status.value, 0))
        yield workflows
        yield from self._findings()
        yield from self._slos()

    def _findings(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        detector = self._agent.detector
        active = GaugeMetricFamily(
            "perfagent_bottleneck_active",
            "1 for each firing finding: a rule whose condition held for its `for` on an instance.",
            labels=["instance", "type", "severity", "rule"],
        )
        value = GaugeMetricFamily(
            "perfagent_bottleneck_value",
            "The value a firing finding's rule read, in the catalog unit of `quantity`.",
            labels=["instance", "rule", "quantity", "unit"],
        )
        threshold = GaugeMetricFamily(
            "perfagent_bottleneck_threshold",
            "The threshold of the severity rung a firing finding reached, in the catalog unit of `quantity`.",
            labels=["instance", "rule", "quantity", "unit"],
        )
        pending = GaugeMetricFamily(
            "perfagent_bottleneck_pending",
            "1 for each finding whose condition holds but not yet for its rule's `for`.",
            labels=["instance", "type", "rule"],
        )
        quantities = {r.name: r.source.rule.quantity for r in detector.compiled.rules}
        for row in detector.state.iter_rows(named=True):
            quantity = quantities.get(row["rule"], "")
            unit = CATALOG[quantity].unit.value if quantity in CATALOG else ""
            if row["state"] == "firing":
                active.add_metric([row["instance_id"], row["type"], row["severity"], row["rule"]], 1.0)
                if row["value"] is not None:
                    value.add_metric([row["instance_id"], row["rule"], quantity, unit], row["value"])
                if row["threshold"] is not None:
                    threshold.add_metric([row["instance_id"], row["rule"], quantity, unit], row["threshold"])
            else:
                pending.add_metric([row["instance_id"], row["type"], row["rule"]], 1.0)
        yield from (active, value, threshold, pending)
        duration = GaugeMetricFamily(
            "perfagent_rule_evaluation_seconds",
            "Duration of the last evaluation of every rule over the fleet.",
        )
        if detector.last_seconds is not None:
            duration.add_metric([], detector.last_seconds)
        yield duration
        yield CounterMetricFamily(
            "perfagent_rule_evaluations",
            "Evaluations of the rule set over the fleet.",
            value=detector.evaluations,
        )
        yield GaugeMetricFamily("perfagent_rules", "Rules loaded.", value=len(detector.compiled.rules))

    def _slos(self) -> Iterable[GaugeMetricFamily]:
        evaluator = self._agent.slos
        last = evaluator.last if evaluator is not None else None
        budget = GaugeMetricFamily(
            "perfagent_slo_error_budget_remaining",
            "Share of the SLO's error budget left over its period, per instance: 1 - burn rate over the "
            "period; negative once overspent; absent while no request finished in the period.",
            labels=["slo", "instance"],
        )
        burn = GaugeMetricFamily(
            "perfagent_slo_burn_rate",
            "Error budget burn rate over a window (alert windows and the period): bad ratio / (1 - "
            "objective); 1 spends the budget exactly over the period.",
            labels=["slo", "instance", "window"],
        )
        objective = GaugeMetricFamily(
            "perfagent_slo_objective", "Share of requests an SLO wants under its threshold.", labels=["slo"]
        )
        if last is not None:
            budgets = last.budgets.filter(pl.col("error_budget_remaining").is_not_null())
            for row in budgets.iter_rows(named=True):
                budget.add_metric([row["slo"], row["instance_id"]], row["error_budget_remaining"])
            for row in last.burn.filter(pl.col("burn_rate").is_not_null()).iter_rows(named=True):
                window = window_label(row["window"])
                burn.add_metric([row["slo"], row["instance_id"], window], row["burn_rate"])
        duration = GaugeMetricFamily(
            "perfagent_slo_evaluation_seconds",
            "Duration of the last evaluation of every SLO over the fleet, counting new scrapes included.",
        )
        if evaluator is not None:
            for slo in evaluator.slos:
                objective.add_metric([slo.name], slo.slo.objective)
            if evaluator.last_seconds is not None:
                duration.add_metric([], evaluator.last_seconds)
        yield from (budget, burn, objective, duration)


def build_registry(agent: Agent) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))
    return registry
