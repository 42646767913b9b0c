"""GET/POST/DELETE /instances, persisted in DuckDB across restarts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from perfagent.app import create_app
from perfagent.settings import Settings
from tests.test_error_shape import assert_envelope

Client = TestClient[web.Request, web.Application]

SPEC = {
    "id": "vllm-a",
    "engine": "vllm",
    "metrics_url": "http://127.0.0.1:8000/metrics",
    "labels": {"model": "qwen2.5-0.5b", "deployment_group": "chat"},
}


async def test_add_list_get_delete(agent: Client) -> None:
    assert await (await agent.get("/api/v1/instances")).json() == []
    response = await agent.post("/api/v1/instances", json=SPEC)
    assert response.status == 201
    created = await response.json()
    assert created["id"] == "vllm-a"
    assert created["source"] == "api"
    assert created["labels"] == SPEC["labels"]
    listed = await (await agent.get("/api/v1/instances")).json()
    assert [i["id"] for i in listed] == ["vllm-a"]
    assert (await (await agent.get("/api/v1/instances/vllm-a")).json())["metrics_url"] == SPEC["metrics_url"]
    assert (await agent.delete("/api/v1/instances/vllm-a")).status == 204
    missing = await agent.get("/api/v1/instances/vllm-a")
    assert missing.status == 404
    assert_envelope(await missing.json(), 404, "NOT_FOUND")


async def test_duplicate_id_conflicts(agent: Client) -> None:
    assert (await agent.post("/api/v1/instances", json=SPEC)).status == 201
    again = await agent.post("/api/v1/instances", json=SPEC)
    assert again.status == 409
    body = await again.json()
    assert_envelope(body, 409, "CONFLICT")
    assert body["error"]["details"]["instance_id"] == "vllm-a"


async def test_bad_instance_is_a_validation_error(agent: Client) -> None:
    response = await agent.post("/api/v1/instances", json={**SPEC, "engine": "triton"})
    assert response.status == 400
    body = await response.json()
    assert body["error"]["details"]["allowed_values"] == ["vllm", "tgi", "sglang"]


async def test_instance_outside_allowed_targets_is_refused(agent: Client) -> None:
    response = await agent.post(
        "/api/v1/instances", json={**SPEC, "metrics_url": "http://192.0.2.10/metrics"}
    )
    assert response.status == 400
    assert (await response.json())["error"]["details"]["field"] == "metrics_url"
    assert await (await agent.get("/api/v1/instances")).json() == []


async def test_instances_survive_a_restart(
    aiohttp_client: Any, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings()
    first = await aiohttp_client(create_app(settings))
    assert (await first.post("/api/v1/instances", json=SPEC)).status == 201
    await first.close()  # runs cleanup: the DuckDB file is closed
    second = await aiohttp_client(create_app(settings))
    listed = await (await second.get("/api/v1/instances")).json()
    assert [(i["id"], i["source"]) for i in listed] == [("vllm-a", "api")]


async def test_config_instances_are_listed_and_not_deletable(
    aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    config_spec = {"id": "cfg-1", "engine": "sglang", "metrics_url": "http://127.0.0.1:30000/metrics"}
    client = await aiohttp_client(create_app(make_settings(instances=[config_spec])))
    listed = await (await client.get("/api/v1/instances")).json()
    assert [(i["id"], i["source"]) for i in listed] == [("cfg-1", "config")]
    response = await client.delete("/api/v1/instances/cfg-1")
    assert response.status == 409
    assert_envelope(await response.json(), 409, "CONFLICT")


async def test_demo_fleet_when_nothing_is_configured(
    aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    client = await aiohttp_client(create_app(make_settings(demo_fleet="captures")))
    listed = await (await client.get("/api/v1/instances")).json()
    assert {i["source"] for i in listed} == {"demo"}
    assert {i["engine"] for i in listed} == {"vllm", "tgi", "sglang"}
    assert any(i["dcgm_url"] for i in listed)
