"""The agent's own /metrics: its health (and, from Detection 1, its findings) for Prometheus.

A custom collector on the application's own registry reads the live state at scrape time, the way
prometheus_client documents re-exporting data held elsewhere; nothing is double-bookkept in
prometheus_client metric objects.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from perfagent import __version__
from perfagent.context import Agent


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


def build_registry(agent: Agent) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))
    return registry
