"""The agent's runtime state, owned by one aiohttp application (no module-level state)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from perfagent.clock import utc_now
from perfagent.collect import SnapshotCache
from perfagent.demo import DemoFleet, SimDemo
from perfagent.detection import Detector
from perfagent.history import HistoryWriter
from perfagent.models import Instance
from perfagent.poller import Poller
from perfagent.rules import RuleSet
from perfagent.scrape import Scraper
from perfagent.settings import Settings
from perfagent.store import Store


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
    started_monotonic: float = field(default_factory=time.monotonic)

    async def instances(self) -> list[Instance]:
        """Every watched instance, stored ones (config and API) and the demo fleet, with scrape health."""
        stored = await self.store.list_instances()
        demo = list(self.demo.instances) if self.demo is not None else []
        return [self._with_health(i) for i in stored + demo]

    async def instance(self, instance_id: str) -> Instance | None:
        found = await self.store.get_instance(instance_id)
        if found is None and self.demo is not None:
            found = next((i for i in self.demo.instances if i.id == instance_id), None)
        return None if found is None else self._with_health(found)

    async def engines(self) -> dict[str, str]:
        return {i.id: i.engine.value for i in await self.instances()}

    async def detect_cycle(self) -> None:
        """After a poll cycle: write what was scraped, then evaluate the rules on it."""
        await self.history.flush()
        await self.detector.run_cycle(utc_now(), await self.engines())

    def _with_health(self, instance: Instance) -> Instance:
        health = self.poller.health.get(instance.id)
        return instance if health is None else instance.model_copy(update={"scrape": health})


AGENT = web.AppKey("agent", Agent)
