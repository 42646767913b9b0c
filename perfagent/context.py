"""The agent's runtime state, owned by one aiohttp application (no module-level state)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import polars as pl
from aiohttp import web

from perfagent.clock import utc_now
from perfagent.collect import SnapshotCache
from perfagent.demo import DemoFleet, SimDemo
from perfagent.detection import Detector
from perfagent.discovery import Discovery
from perfagent.errors import PerfAgentError, ServiceUnavailableError
from perfagent.history import HistoryWriter
from perfagent.models import Instance
from perfagent.poller import Poller
from perfagent.promclient import PromClient
from perfagent.promql_source import detection_frame
from perfagent.rules import RuleSet
from perfagent.scrape import Scraper
from perfagent.settings import Settings
from perfagent.slo_history import SloEvaluator
from perfagent.store import Store
from perfagent.workflow_engine import WorkflowEngine

log = logging.getLogger("perfagent")


@dataclass(slots=True)
class Agent:
    settings: Settings
    store: Store
    scraper: Scraper
    demo: DemoFleet | SimDemo | None
    snapshots: SnapshotCache
    history: HistoryWriter
    poller: Poller
    detector: Detector
    rules: RuleSet
    workflows: WorkflowEngine
    started_monotonic: float = field(default_factory=time.monotonic)
    prometheus: PromClient | None = None
    discovery: Discovery | None = None
    slos: SloEvaluator | None = None

    async def instances(self) -> list[Instance]:
        """Every watched instance: stored ones (config and API), the demo fleet and the discovered."""
        scraped = await self.scraped_instances()
        return scraped + self._discovered(scraped)

    async def scraped_instances(self) -> list[Instance]:
        """The instances the poller scrapes (all but the discovered), with scrape health."""
        stored = await self.store.list_instances()
        demo = list(self.demo.instances) if self.demo is not None else []
        return [self._with_health(i) for i in stored + demo]

    async def instance(self, instance_id: str) -> Instance | None:
        found = await self.store.get_instance(instance_id)
        if found is None and self.demo is not None:
            found = next((i for i in self.demo.instances if i.id == instance_id), None)
        if found is None and self.discovery is not None:
            scraped = await self.scraped_instances()
            found = next((i for i in self._discovered(scraped) if i.id == instance_id), None)
        return None if found is None else self._with_health(found)

    def _discovered(self, scraped: list[Instance]) -> list[Instance]:
        """Discovered instances not already watched: a scraped one with the same id, or the same
        job and instance labels, is the same server and stays scraped."""
        if self.discovery is None:
            return []
        ids = {i.id for i in scraped}
        labelled = {(i.labels.get("job"), i.labels.get("instance")) for i in scraped}
        return [
            i
            for i in self.discovery.instances()
            if i.id not in ids and (i.labels.get("job"), i.labels.get("instance")) not in labelled
        ]

    async def promql_frame(self, instances: list[Instance], at: datetime) -> pl.DataFrame:
        """The detection frame of `instances` computed by Prometheus over the rules' widest window."""
        if self.prometheus is None:
            raise ServiceUnavailableError(
                "no prometheus_url is set: these instances can only be analysed from PromQL",
                {"dependency": "prometheus"},
            )
        step = timedelta(seconds=self.settings.polling_interval)
        return await detection_frame(self.prometheus, instances, self.detector.compiled, at, step)

    async def engines(self) -> dict[str, str]:
        return {i.id: i.engine.value for i in await self.instances()}

    async def detect_cycle(self) -> None:
        """After a poll cycle: write what was scraped, then evaluate the rules on it and on what
        Prometheus computes for the discovered instances."""
        await self.history.flush()
        at = utc_now()
        scraped = await self.scraped_instances()
        discovered = self._discovered(scraped)
        extra = None
        if discovered:
            try:
                extra = await self.promql_frame(discovered, at)
            except PerfAgentError as exc:  # Prometheus down: the scraped instances are still evaluated
                log.warning("discovered instances not evaluated: %s", exc.message)
        engines = await self.engines()
        slo_results = None
        if self.slos is not None:
            try:
                slo_results = (await self.slos.evaluate(at, engines)).results
            except Exception:  # the rules still run; SLO findings resolve until it works again
                log.exception("SLO evaluation failed")
        await self.detector.run_cycle(at, engines, extra, slo_results)

    def _with_health(self, instance: Instance) -> Instance:
        health = self.poller.health.get(instance.id)
        return instance if health is None else instance.model_copy(update={"scrape": health})


AGENT = web.AppKey("agent", Agent)
