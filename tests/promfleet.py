"""A simulated fleet scraped by a real Prometheus: the sim servers on loopback ports, one scrape job per
engine with a target per simulated instance (its own `instance` label and metrics path)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from aiohttp.test_utils import TestServer

from perfagent.clock import utc_now
from perfagent.models import EngineName, Instance, InstanceSource
from perfagent.promclient import PromClient
from perfagent.sim.fleet import SimFleet


@dataclass(frozen=True, slots=True)
class SimTarget:
    """One simulated instance as Prometheus scrapes it."""

    job: str
    instance: str  # the `instance` label Prometheus attaches
    sim_id: str  # the id inside its SimFleet
    engine: EngineName
    server: TestServer

    @property
    def address(self) -> str:
        return f"{self.server.host}:{self.server.port}"

    @property
    def metrics_path(self) -> str:
        return f"/instances/{self.sim_id}/metrics"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.address}{self.metrics_path}"

    def as_instance(self, instance_id: str | None = None) -> Instance:
        """The agent's view of it, labelled so PromQL finds its series."""
        return Instance(
            id=instance_id or self.instance,
            engine=self.engine,
            metrics_url=self.metrics_url,
            labels={"job": self.job, "instance": self.instance},
            source=InstanceSource.CONFIG,
            created_at=utc_now(),
        )


def targets_of(fleet: SimFleet, server: TestServer, *, prefix: str = "") -> list[SimTarget]:
    """A target per simulated instance, the job named after its engine."""
    return [
        SimTarget(inst.engine, prefix + inst.id, inst.id, EngineName(inst.engine), server)
        for inst in fleet.instances.values()
    ]


def scrape_configs(targets: Sequence[SimTarget], *, extra: str = "") -> str:
    """One job per distinct `job`; each target sets its metrics path and instance label."""
    lines = ["scrape_configs:"]
    for job in dict.fromkeys(t.job for t in targets):
        lines += [f"  - job_name: {job}", "    static_configs:"]
        for t in targets:
            if t.job == job:
                lines += [
                    f"      - targets: ['{t.address}']",
                    f"        labels: {{instance: '{t.instance}', __metrics_path__: '{t.metrics_path}'}}",
                ]
    return "\n".join(lines) + "\n" + extra


async def scraped_after(client: PromClient, since: datetime, targets: int) -> datetime:
    """Wait (up to 20 s) until Prometheus has started a scrape of every one of `targets` after `since`."""
    # timestamp() of a plain selector is the scrape's start; of any other expression, the query time.
    up = 'up{job!="prometheus"}'
    query = f"min(timestamp({up})) and on () (count({up} == 1) >= {targets})"
    async with asyncio.timeout(20):
        while True:
            result = await client.query(query)
            if result and datetime.fromtimestamp(float(result[0]["value"][1]), UTC) > since:
                return utc_now()
            await asyncio.sleep(0.2)
