"""The http executor against a real control endpoint on loopback."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from perfagent.errors import error_body
from perfagent.executors._http import RECORDED_CHARS
from perfagent.executors.base import Action, Executor, StepOutcome
from perfagent.executors.config import HttpConfig
from perfagent.executors.http import HttpExecutor
from perfagent.models import EngineName, Instance, InstanceSource
from perfagent.settings import Settings
from perfagent.targets import TargetPolicy
from tests.conftest import AiohttpServer, free_port

LOOPBACK = TargetPolicy.from_entries(["127.0.0.0/8"])
KEY = "wf-7/canary/0/tgi-a"


def _control_app(received: list[dict[str, Any]]) -> web.Application:
    async def apply(request: web.Request) -> web.Response:
        received.append({"body": await request.json(), "key": request.headers.get("Idempotency-Key")})
        return web.json_response({"restarting": True, "settings": (await request.json())["settings"]})

    async def refuse(request: web.Request) -> web.Response:
        received.append({"body": await request.json()})
        return web.json_response(error_body("VALIDATION_ERROR", "max_batch_size must be >= 1"), status=400)

    async def huge(request: web.Request) -> web.Response:
        return web.Response(status=500, text="E" * 100_000)

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.json_response({})

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/apply")

    app = web.Application()
    app.router.add_post("/apply", apply)
    app.router.add_post("/refuse", refuse)
    app.router.add_post("/huge", huge)
    app.router.add_post("/slow", slow)
    app.router.add_post("/moved", moved)
    return app


def _action(control_url: str | None, settings: dict[str, Any] | None = None) -> Action:
    instance = Instance(
        id="tgi-a",
        engine=EngineName.TGI,
        metrics_url="http://127.0.0.1:9000/metrics",
        labels={"control_url": control_url} if control_url else {},
        source=InstanceSource.CONFIG,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    return Action(
        key=KEY,
        instance=instance,
        settings=settings or {"max_batch_size": 32},
        previous={"max_batch_size": None},
    )


async def _server(aiohttp_server: AiohttpServer, received: list[dict[str, Any]]) -> TestServer:
    return await aiohttp_server(_control_app(received))


async def test_posts_settings_with_the_step_key(aiohttp_server: AiohttpServer) -> None:
    received: list[dict[str, Any]] = []
    server = await _server(aiohttp_server, received)
    url = str(server.make_url("/apply"))
    executor = HttpExecutor(LOOPBACK, HttpConfig())
    try:
        record = await executor.apply(_action(url))
    finally:
        await executor.close()
    assert record.outcome is StepOutcome.APPLIED, record.message
    body = {
        "step_key": KEY,
        "instance_id": "tgi-a",
        "engine": "tgi",
        "settings": {"max_batch_size": 32},
        "previous": {"max_batch_size": None},
    }
    assert received == [{"body": body, "key": KEY}]
    assert record.ran == {"url": url, "body": body, "headers": {"Idempotency-Key": KEY}}
    assert record.returned == {
        "status": 200,
        "body": {"restarting": True, "settings": {"max_batch_size": 32}},
    }


async def test_the_settings_map_wins_over_the_label(aiohttp_server: AiohttpServer) -> None:
    received: list[dict[str, Any]] = []
    server = await _server(aiohttp_server, received)
    config = HttpConfig(urls={"tgi-a": str(server.make_url("/apply"))}, url_label=None)
    executor = HttpExecutor(LOOPBACK, config)
    try:
        record = await executor.apply(_action(str(server.make_url("/refuse"))))
        assert record.outcome is StepOutcome.APPLIED
        assert record.ran["url"].endswith("/apply")
        # With url_label off, an instance known only by its label has no control URL.
        unknown = await HttpExecutor(LOOPBACK, HttpConfig(url_label=None)).apply(_action(record.ran["url"]))
        assert unknown.outcome is StepOutcome.FAILED and "no control URL" in unknown.message
    finally:
        await executor.close()


async def test_a_url_outside_allowed_targets_is_not_contacted(aiohttp_server: AiohttpServer) -> None:
    received: list[dict[str, Any]] = []
    server = await _server(aiohttp_server, received)
    executor = HttpExecutor(TargetPolicy.from_entries(["10.0.0.0/8"]), HttpConfig())
    try:
        record = await executor.apply(_action(str(server.make_url("/apply"))))
    finally:
        await executor.close()
    assert record.outcome is StepOutcome.FAILED
    assert "allowed_targets" in record.message
    assert record.returned == {"policy": "allowed_targets", "allowed": ["10.0.0.0/8"]}
    assert received == []


async def test_refusals_timeouts_and_redirects_fail(aiohttp_server: AiohttpServer) -> None:
    received: list[dict[str, Any]] = []
    server = await _server(aiohttp_server, received)
    executor = HttpExecutor(LOOPBACK, HttpConfig(timeout_seconds=0.5))
    try:
        refused = await executor.apply(_action(str(server.make_url("/refuse"))))
        assert refused.outcome is StepOutcome.FAILED
        assert refused.message == "control URL answered HTTP 400: max_batch_size must be >= 1"
        assert refused.returned["status"] == 400

        huge = await executor.apply(_action(str(server.make_url("/huge"))))
        assert huge.outcome is StepOutcome.FAILED
        assert huge.returned["body"] == "E" * RECORDED_CHARS  # the answer is kept, truncated

        slow = await executor.apply(_action(str(server.make_url("/slow"))))
        assert slow.outcome is StepOutcome.FAILED and "did not answer within 0.5 s" in slow.message

        moved = await executor.apply(_action(str(server.make_url("/moved"))))
        assert moved.outcome is StepOutcome.FAILED and moved.returned["status"] == 302
        assert len(received) == 1  # the redirect was not followed to /apply

        dead = await executor.apply(_action(f"http://127.0.0.1:{free_port()}/apply"))
        assert dead.outcome is StepOutcome.FAILED and "failed" in dead.message
    finally:
        await executor.close()


def test_from_settings_takes_the_policy_and_the_config(make_settings: Any) -> None:
    settings: Settings = make_settings(
        allowed_targets=["10.1.0.0/16"], executors={"http": {"urls": {"a": "http://10.1.2.3:81/c"}}}
    )
    executor = HttpExecutor.from_settings(settings)
    assert executor.policy.allows("http://10.1.2.3:81/c")
    assert not executor.policy.allows("http://127.0.0.1/c")
    assert executor.config.urls == {"a": "http://10.1.2.3:81/c"}
    assert executor.idempotent is False
    protocol: Executor = executor  # mypy checks it implements the protocol
    assert protocol.name == "http"
