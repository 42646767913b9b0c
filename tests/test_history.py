"""History: what was scraped is what the history answers, through the API and the CLI."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from perfagent.app import create_app
from perfagent.context import AGENT
from tests.test_error_shape import assert_envelope


def _counting_target(state: dict[str, float]) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        state["scrapes"] += 1
        n = state["scrapes"]
        return web.Response(
            text=(
                "# TYPE vllm:num_requests_running gauge\n"
                f'vllm:num_requests_running{{model_name="m",engine="0"}} {n}\n'
                "# TYPE vllm:kv_cache_usage_perc gauge\n"
                f'vllm:kv_cache_usage_perc{{model_name="m",engine="0"}} {n / 100}\n'
            )
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app


async def test_history_returns_what_was_scraped(aiohttp_client: Any, make_settings: Any) -> None:
    state = {"scrapes": 0.0}
    target = await aiohttp_client(_counting_target(state))
    url = str(target.make_url("/metrics"))
    agent = await aiohttp_client(
        create_app(
            make_settings(
                polling_interval=3600, instances=[{"id": "v", "engine": "vllm", "metrics_url": url}]
            )
        )
    )
    poller = agent.app[AGENT].poller
    for _ in range(500):  # the poller's first scrape, at start-up
        if "v" in poller.health and poller.health["v"].last_success is not None:
            break
        await asyncio.sleep(0.02)
    for _ in range(3):  # on-demand collections are history too
        response = await agent.post(
            "/api/v1/metrics/collect", json={"instance_id": "v", "instance_type": "vllm", "metrics_url": url}
        )
        assert response.status == 200
    response = await agent.get(
        "/api/v1/metrics/history",
        params={"instance_id": "v", "since": "10m", "fields": "requests_running,kv_cache_usage"},
    )
    assert response.status == 200
    body = await response.json()
    assert body["fields"] == ["requests_running", "kv_cache_usage"]
    scraped = int(state["scrapes"])
    assert body["count"] == scraped == 4
    assert [p["values"]["requests_running"] for p in body["points"]] == [1, 2, 3, 4]
    assert [p["values"]["kv_cache_usage"] for p in body["points"]] == pytest.approx([0.01, 0.02, 0.03, 0.04])
    assert [p["window_kind"] for p in body["points"]] == [
        "lifetime",
        "since_previous",
        "since_previous",
        "since_previous",
    ]
    # An ISO range that ends before the first scrape holds nothing.
    early = await agent.get(
        "/api/v1/metrics/history",
        params={"instance_id": "v", "since": "2000-01-01T00:00:00Z", "until": "2000-01-02T00:00:00Z"},
    )
    assert (await early.json())["count"] == 0


@pytest.mark.parametrize(
    ("params", "status", "field"),
    [
        ({"instance_id": "v", "fields": "requests_running,nonsense"}, 400, "fields"),
        ({"instance_id": "v", "since": "yesterday"}, 400, "since"),
        ({"instance_id": "v", "since": "1h", "until": "2h"}, 400, "since"),
        ({"since": "1h"}, 400, "instance_id"),
        ({"instance_id": "v", "limit": "0"}, 400, "limit"),
        ({"instance_id": "nobody"}, 404, None),
    ],
)
async def test_history_errors(agent: Any, params: dict[str, str], status: int, field: str | None) -> None:
    response = await agent.get("/api/v1/metrics/history", params=params)
    assert response.status == status
    body = await response.json()
    assert_envelope(body, status, "VALIDATION_ERROR" if status == 400 else "NOT_FOUND")
    if field is not None:
        assert body["error"]["details"]["field"] == field


async def test_history_cli_reads_the_file_when_no_agent_runs(
    aiohttp_client: Any, make_settings: Any, tmp_path: Path
) -> None:
    state = {"scrapes": 0.0}
    target = await aiohttp_client(_counting_target(state))
    settings = make_settings(
        polling_interval=0.2,
        instances=[{"id": "v", "engine": "vllm", "metrics_url": str(target.make_url("/metrics"))}],
    )
    agent = await aiohttp_client(create_app(settings))
    await asyncio.sleep(0.7)
    await agent.close()  # SIGTERM-like shutdown flushes the last batch
    scraped = int(state["scrapes"])
    result = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "perfagent",
            "history",
            "v",
            "--since",
            "1h",
            "--db",
            str(settings.db_path),
            "--url",
            "http://127.0.0.1:1",
            "--fields",
            "requests_running",
            "--format",
            "csv",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert f"the DuckDB file {settings.db_path}" in result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "ts,ok,requests_running"
    assert [float(line.split(",")[2]) for line in lines[1:]] == [float(n) for n in range(1, scraped + 1)]


async def test_history_cli_uses_the_running_agent(
    aiohttp_server: Any, make_settings: Any, aiohttp_client: Any
) -> None:
    state = {"scrapes": 0.0}
    target = await aiohttp_client(_counting_target(state))
    settings = make_settings(
        polling_interval=3600,
        instances=[{"id": "v", "engine": "vllm", "metrics_url": str(target.make_url("/metrics"))}],
    )
    server = await aiohttp_server(create_app(settings))
    await asyncio.sleep(0.2)
    result = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "perfagent",
            "history",
            "v",
            "--db",
            str(settings.db_path),
            "--url",
            str(server.make_url("")).rstrip("/"),
            "--format",
            "json",
            "--fields",
            "requests_running",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "the running agent's API" in result.stderr
    assert '"requests_running": 1.0' in result.stdout
