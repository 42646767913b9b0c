"""GET /health and /health/detailed: real checks of the database, Prometheus and every instance."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from perfagent import __version__
from perfagent.clock import utc_now
from perfagent.context import AGENT, Agent
from perfagent.errors import PerfAgentError
from perfagent.models import CheckResult, DetailedHealthResponse, HealthResponse, InstanceReachability
from perfagent.routing import Endpoint, json_response

CHECK_TIMEOUT = 2.0  # a health check must answer quickly even when a dependency hangs


async def health(request: web.Request) -> web.Response:
    return json_response(HealthResponse(status="healthy", timestamp=utc_now()))


async def _check_database(agent: Agent) -> CheckResult:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            await agent.store.ping()
    except Exception as exc:  # any failure, timeouts included, means unhealthy
        return CheckResult(status="unhealthy", detail=f"{type(exc).__name__}: {exc}")
    return CheckResult(
        status="healthy", latency_seconds=time.perf_counter() - started, detail=str(agent.store.path)
    )


async def _check_prometheus(agent: Agent) -> CheckResult:
    if agent.prometheus is None:
        return CheckResult(status="not_configured")
    started = time.perf_counter()
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            await agent.prometheus.ping()
    except TimeoutError:
        return CheckResult(status="unhealthy", detail=f"no answer from /-/ready within {CHECK_TIMEOUT:g} s")
    except PerfAgentError as exc:
        return CheckResult(status="unhealthy", detail=exc.message)
    return CheckResult(
        status="healthy", detail="HTTP 200 from /-/ready", latency_seconds=time.perf_counter() - started
    )


async def _reach(agent: Agent, instance_id: str, url: str) -> InstanceReachability:
    scraper = agent.scraper
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            await scraper.fetch(url)
    except TimeoutError:
        return InstanceReachability(instance_id=instance_id, reachable=False, detail="timeout")
    except PerfAgentError as exc:
        return InstanceReachability(instance_id=instance_id, reachable=False, detail=exc.message)
    return InstanceReachability(instance_id=instance_id, reachable=True)


async def detailed_health(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    try:
        # Discovered instances are read from Prometheus (its check covers them), never fetched.
        instances = await agent.scraped_instances()
    except PerfAgentError:
        instances = []  # the database check below reports why the stored fleet cannot be listed
    database, prometheus = await asyncio.gather(_check_database(agent), _check_prometheus(agent))
    reach = await asyncio.gather(*(_reach(agent, i.id, i.metrics_url) for i in instances))
    reachable = sum(r.reachable for r in reach)
    if not instances:
        fleet = CheckResult(status="not_configured", detail="no instance configured")
    elif reachable == len(instances):
        fleet = CheckResult(status="healthy", detail=f"{reachable}/{len(instances)} reachable")
    else:
        fleet = CheckResult(
            status="unhealthy" if reachable == 0 else "degraded",
            detail=f"{reachable}/{len(instances)} reachable",
        )
    checks = {"database": database, "prometheus": prometheus, "instances": fleet}
    if database.status == "unhealthy":
        overall = "unhealthy"
    elif any(c.status in {"unhealthy", "degraded"} for c in checks.values()):
        overall = "degraded"
    else:
        overall = "healthy"
    return json_response(
        DetailedHealthResponse(
            status=overall,
            version=__version__,
            uptime_seconds=time.monotonic() - agent.started_monotonic,
            dependencies={name: check.status for name, check in checks.items()},
            timestamp=utc_now(),
            checks=checks,
            instances=list(reach),
        )
    )


ENDPOINTS = (
    Endpoint("GET", "/health", health, "Basic health check", "health", response=HealthResponse),
    Endpoint(
        "GET",
        "/health/detailed",
        detailed_health,
        "Health of the agent and its dependencies",
        "health",
        response=DetailedHealthResponse,
        description="Checks the DuckDB store with a query, Prometheus's /-/ready when `prometheus_url` is "
        "set, and fetches the metrics URL of every instance the agent scrapes (discovered ones are read "
        "from Prometheus). `status` is `unhealthy` when the database fails, `degraded` when Prometheus "
        "or some instances fail.",
    ),
)
