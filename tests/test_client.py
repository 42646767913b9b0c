"""perfagent.client.PerformanceAgentClient against the running app over real HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from perfagent.app import create_app
from perfagent.client import AgentAPIError, PerformanceAgentClient
from tests.conftest import capture


async def test_client_methods(
    aiohttp_server: Callable[..., Awaitable[TestServer]], make_settings: Any, targets: Any
) -> None:
    server = await aiohttp_server(create_app(make_settings()))
    fleet = await targets()
    client = PerformanceAgentClient(str(server.make_url("")).rstrip("/"))
    call = asyncio.to_thread  # the client is synchronous; the app serves on this loop meanwhile

    assert (await call(client.health))["status"] == "healthy"
    assert (await call(client.config))["capabilities"] == ["vllm", "tgi", "sglang"]
    assert "request_metrics" in (await call(client.capabilities))["supported_metrics"]
    url = str(fleet.make_url(f"/f/{capture('vllm-v0-llama3.1').name}"))
    metrics = await call(client.collect_metrics, "vllm-1", "vllm", url)
    assert metrics["gpu_metrics"]["num_requests_running"] == 3
    added = await call(client.add_instance, "vllm-1", "vllm", url, labels={"deployment_group": "g"})
    assert added["source"] == "api"
    assert [i["id"] for i in await call(client.list_instances)] == ["vllm-1"]
    assert (await call(client.get_instance, "vllm-1"))["labels"] == {"deployment_group": "g"}
    history = await call(client.metrics_history, "vllm-1", since="1h", fields=["requests_running"])
    assert history["points"][-1]["values"]["requests_running"] == 3  # the collection above is history
    detected = await call(client.detect_bottlenecks, "vllm-1", metrics, instance_type="vllm")
    assert detected["bottlenecks"] == []  # light traffic
    assert (await call(client.findings, active=True))["findings"] == []
    advice = await call(client.recommend, "vllm-1", "vllm", [{"type": "MEMORY_PRESSURE", "severity": "HIGH"}])
    assert {o["type"] for o in advice["optimizations"]} >= {"KV_CACHE"}
    detailed = await call(client.health_detailed)
    assert detailed["dependencies"]["instances"] == "healthy"
    await call(client.delete_instance, "vllm-1")
    with pytest.raises(AgentAPIError) as info:
        await call(client.get_instance, "vllm-1")
    assert (info.value.status, info.value.code) == (404, "NOT_FOUND")
    with pytest.raises(AgentAPIError) as bad:
        await call(client.collect_metrics, "x", "triton", url)
    assert bad.value.code == "VALIDATION_ERROR"
    assert bad.value.details["allowed_values"] == ["vllm", "tgi", "sglang"]
