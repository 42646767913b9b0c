"""Shared fixtures: real loopback servers serving the real captures, and the agent built from a test
config on a real DuckDB file."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import settings as hypothesis_settings

from perfagent.app import create_app
from perfagent.settings import Settings, load_settings

FIXTURES = Path(__file__).parent / "fixtures"

# CI replays the same examples on every run, so a red build always reproduces and never depends on
# luck; local runs keep exploring new examples (and keep what they find in .hypothesis/).
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
hypothesis_settings.load_profile("ci" if os.environ.get("CI") else "default")

AiohttpServer = Callable[..., Awaitable[TestServer]]
AiohttpClient = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


def capture(name_prefix: str) -> Path:
    """The one capture in tests/fixtures whose name starts with `name_prefix`."""
    matches = sorted(FIXTURES.glob(f"{name_prefix}*.prom"))
    assert len(matches) == 1, f"{name_prefix!r} matches {matches}"
    return matches[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def targets_app(overrides: dict[str, bytes] | None = None) -> web.Application:
    """A stand-in fleet on loopback: /f/<capture file> serves a real capture; other paths misbehave
    the way real targets do (slow, broken, dead-ish, huge)."""
    extra = dict(overrides or {})

    async def fixture(request: web.Request) -> web.Response:
        path = FIXTURES / request.match_info["name"]
        if not path.is_file():
            raise web.HTTPNotFound()
        return web.Response(body=path.read_bytes(), content_type="text/plain")

    async def body(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in extra:
            raise web.HTTPNotFound()
        return web.Response(body=extra[name], content_type="text/plain")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("seconds", "30")))
        return web.Response(text="vllm:num_requests_running 1\n")

    async def error(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["status"]), text="boom")

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        line = b"vllm:num_requests_running 1\n" * 4096
        for _ in range(1024):  # ~110 MiB unless the client hangs up first
            await response.write(line)
        return response

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/f/" + capture("vllm-v1").name)

    app = web.Application()
    app.router.add_get("/f/{name}", fixture)
    app.router.add_get("/body/{name}", body)
    app.router.add_get("/slow", slow)
    app.router.add_get("/status/{status}", error)
    app.router.add_get("/huge", huge)
    app.router.add_get("/redirect", redirect)
    return app


@pytest.fixture
async def targets(aiohttp_server: AiohttpServer) -> Callable[..., Awaitable[TestServer]]:
    """Start a targets server; call with a dict of extra bodies served at /body/<name>."""

    async def start(overrides: dict[str, bytes] | None = None) -> TestServer:
        return await aiohttp_server(targets_app(overrides))

    return start


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "db_path": tmp_path / "agent.duckdb",
            "demo_fleet": "off",
            "scrape_timeout": 2.0,
        }
        values.update(overrides)
        return load_settings(**values)

    return build


@pytest.fixture
async def agent(
    aiohttp_client: AiohttpClient, make_settings: Callable[..., Settings]
) -> TestClient[web.Request, web.Application]:
    """The agent on a fresh DuckDB file, allowed to fetch loopback targets (the default policy)."""
    return await aiohttp_client(create_app(make_settings()))
