"""The OpenAPI 3.1 document is generated from the endpoints' models and is valid."""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient
from openapi_spec_validator import validate

from perfagent.app import ENDPOINTS

Client = TestClient[web.Request, web.Application]


async def test_document_is_valid_openapi_3_1(agent: Client) -> None:
    response = await agent.get("/openapi.json")
    assert response.status == 200
    document = await response.json()
    assert document["openapi"] == "3.1.0"
    validate(document)  # raises on any schema violation
    # The validator does not resolve every reference; a dangling one breaks ReDoc, so check them all.
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(document)))
    assert refs <= set(document["components"]["schemas"]), refs - set(document["components"]["schemas"])


async def test_document_lists_exactly_the_served_endpoints(agent: Client) -> None:
    document = await (await agent.get("/openapi.json")).json()
    listed = {(method.upper(), path) for path, ops in document["paths"].items() for method in ops}
    assert listed == {(ep.method, ep.full_path) for ep in ENDPOINTS}
    # Docs pages are not API operations.
    assert not any(path.startswith(("/docs", "/redoc")) for _, path in listed)


async def test_documented_examples_fields_are_in_the_schemas(agent: Client) -> None:
    document = await (await agent.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    spec_fields = {
        "CollectRequest": {"instance_id", "instance_type", "metrics_url"},
        "RequestMetrics": {
            "success_total",
            "failure_total",
            "time_to_first_token_seconds",
            "time_per_output_token_seconds",
            "e2e_request_latency_seconds",
        },
        "GpuMetrics": {
            "cache_usage_perc",
            "memory_usage_bytes",
            "num_requests_running",
            "num_requests_waiting",
        },
        "ThroughputMetrics": {"tokens_per_second", "generation_tokens_total", "prompt_tokens_total"},
        "DetailedHealthResponse": {"status", "version", "uptime_seconds", "dependencies", "timestamp"},
        "ConfigResponse": {"agent_id", "version", "capabilities", "polling_interval"},
        "ErrorDetail": {"code", "message", "details"},
        "CreateWorkflowRequest": {"instance_id", "instance_type", "workflow_type", "auto_approve"},
        "WorkflowDetail": {
            "workflow_id",
            "status",
            "instance_id",
            "optimizations",
            "created_at",
            "requires_approval",
            "current_stage",
            "progress",
            "stages",
            "updated_at",
        },
        "Stage": {"name", "status", "started_at", "completed_at", "progress"},
        "WorkflowSummary": {"workflow_id", "status", "instance_id", "created_at"},
        "ApproveResponse": {"workflow_id", "status", "approved_at", "approved_by"},
        "RejectRequest": {"reason"},
        "RejectResponse": {"workflow_id", "status", "rejected_at", "rejected_by", "reason"},
    }
    for model, fields in spec_fields.items():
        assert fields <= set(schemas[model]["properties"]), model
    collect = document["paths"]["/api/v1/metrics/collect"]["post"]
    assert set(collect["responses"]) >= {"200", "400", "500", "503"}
    assert schemas["CollectRequest"]["properties"]["instance_type"]["$ref"].endswith("/EngineName")
    assert schemas["EngineName"]["enum"] == ["vllm", "tgi", "sglang"]


async def test_the_agents_own_docs_pages_list_its_endpoints(aiohttp_server: Any, make_settings: Any) -> None:
    """Swagger UI and ReDoc, served by the real app with no internet, render every endpoint."""
    from perfagent.app import create_app
    from tests.browser import dump_dom, require_chromium

    require_chromium()
    server = await aiohttp_server(create_app(make_settings()))
    swagger = await dump_dom(str(server.make_url("/docs")))
    redoc = await dump_dom(str(server.make_url("/redoc")))
    for endpoint in ENDPOINTS:
        assert endpoint.full_path in swagger, endpoint.full_path
        assert endpoint.summary in redoc, endpoint.summary
