"""GET /health and /health/detailed: real checks, never a hard-coded "healthy"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from perfagent.app import create_app
from perfagent.context import AGENT
from tests.conftest import capture, free_port
from tests.prometheus import running_prometheus

Client = TestClient[web.Request, web.Application]


async def test_health(agent: Client) -> None:
    response = await agent.get("/api/v1/health")
    assert response.status == 200
    body = await response.json()
    assert body["status"] == "healthy"
    assert body["timestamp"].endswith("Z")


async def _detailed(client: Client) -> dict[str, Any]:
    response = await client.get("/api/v1/health/detailed")
    assert response.status == 200
    body: dict[str, Any] = await response.json()
    return body


async def test_detailed_with_nothing_configured(agent: Client) -> None:
    body = await _detailed(agent)
    assert body["status"] == "healthy"
    assert body["dependencies"] == {
        "database": "healthy",
        "prometheus": "not_configured",
        "instances": "not_configured",
    }
    assert body["uptime_seconds"] >= 0
    assert body["version"]


async def test_detailed_reports_each_instance(aiohttp_client: Any, make_settings: Any, targets: Any) -> None:
    fleet = await targets()
    good = str(fleet.make_url(f"/f/{capture('tgi-3.x').name}"))
    dead = f"http://127.0.0.1:{free_port()}/metrics"
    client = await aiohttp_client(
        create_app(
            make_settings(
                instances=[
                    {"id": "good", "engine": "tgi", "metrics_url": good},
                    {"id": "dead", "engine": "vllm", "metrics_url": dead},
                ]
            )
        )
    )
    body = await _detailed(client)
    assert body["status"] == "degraded"
    assert body["dependencies"]["instances"] == "degraded"
    reach = {i["instance_id"]: i["reachable"] for i in body["instances"]}
    assert reach == {"good": True, "dead": False}


async def test_detailed_sees_a_failed_database(agent: Client) -> None:
    await agent.app[AGENT].store.close()
    body = await _detailed(agent)
    assert body["status"] == "unhealthy"
    assert body["dependencies"]["database"] == "unhealthy"


async def test_detailed_checks_a_real_prometheus(
    aiohttp_client: Any, make_settings: Any, tmp_path: Path
) -> None:
    with running_prometheus(tmp_path) as url:
        client = await aiohttp_client(create_app(make_settings(prometheus_url=url)))
        body = await _detailed(client)
        assert body["dependencies"]["prometheus"] == "healthy"
        assert body["checks"]["prometheus"]["detail"] == "HTTP 200 from /-/ready"
    # The same agent once Prometheus is gone.
    body = await _detailed(client)
    assert body["dependencies"]["prometheus"] == "unhealthy"
    assert body["status"] == "degraded"
