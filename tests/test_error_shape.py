"""Every route's failures share the spec's error envelope (one middleware maps them all)."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from perfagent.app import ENDPOINTS
from perfagent.routing import Endpoint

Client = TestClient[web.Request, web.Application]


def assert_envelope(body: Any, status: int, code: str) -> None:
    assert isinstance(body, dict)
    assert set(body) == {"error", "timestamp"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["code"] == code, (status, body)
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["details"], dict)


def _failing_request(ep: Endpoint) -> tuple[str, str, Any, int, str]:
    """A request that must fail on this endpoint, and how."""
    path = ep.full_path.replace("{instance_id}", "no-such-instance")
    path = path.replace("{workflow_id}", "no-such-workflow")
    if ep.body is not None:
        return ep.method, path, {"unexpected": True}, 400, "VALIDATION_ERROR"
    if "{" in ep.path:
        return ep.method, path, None, 404, "NOT_FOUND"
    # Read-only collection routes cannot fail on input; a wrong method is their failure.
    return "PATCH", path, None, 405, "METHOD_NOT_ALLOWED"


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=[f"{e.method} {e.path}" for e in ENDPOINTS])
async def test_every_route_fails_with_the_envelope(agent: Client, endpoint: Endpoint) -> None:
    method, path, body, status, code = _failing_request(endpoint)
    response = await agent.request(method, path, json=body)
    assert response.status == status
    assert response.content_type == "application/json"
    assert_envelope(await response.json(), status, code)


async def test_unknown_route_is_not_found(agent: Client) -> None:
    response = await agent.get("/api/v1/no-such-route")
    assert response.status == 404
    assert_envelope(await response.json(), 404, "NOT_FOUND")


async def test_wrong_method_lists_the_allowed_ones(agent: Client) -> None:
    response = await agent.delete("/api/v1/health")
    assert response.status == 405
    body = await response.json()
    assert_envelope(body, 405, "METHOD_NOT_ALLOWED")
    assert body["error"]["details"]["allowed_methods"] == ["GET"]


async def test_a_bug_in_a_handler_is_an_enveloped_500(aiohttp_client: Any) -> None:
    from perfagent.middleware import error_middleware

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("bug")

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/x", broken)
    client = await aiohttp_client(app)
    response = await client.get("/x")
    assert response.status == 500
    assert_envelope(await response.json(), 500, "INTERNAL_ERROR")
