"""GET /config and /capabilities: what this agent is set up to do, truthfully."""

from __future__ import annotations

from aiohttp import web

from perfagent import __version__
from perfagent.catalog import QUANTITIES
from perfagent.context import AGENT
from perfagent.models import (
    CapabilitiesResponse,
    CapabilitySet,
    ConfigResponse,
    EngineName,
    QuantityInfo,
)
from perfagent.routing import Endpoint, json_response
from perfagent.workflow_models import WorkflowType

# Metric groups of the collect response, as the spec names them.
SUPPORTED_METRICS = [
    "request_metrics",
    "gpu_metrics",
    "throughput_metrics",
    "latency",
    "cache_metrics",
]


async def get_config(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    settings = agent.settings
    return json_response(
        ConfigResponse(
            agent_id=settings.agent_id,
            version=__version__,
            capabilities=list(EngineName),
            polling_interval=settings.polling_interval,
            dev_mode=settings.dev,
            allowed_targets=agent.scraper.policy.describe(),
            prometheus_url=settings.prometheus_url,
            instances=len(await agent.instances()),
        )
    )


async def get_capabilities(request: web.Request) -> web.Response:
    return json_response(
        CapabilitiesResponse(
            capabilities=CapabilitySet(
                collectors=[e.value for e in EngineName],
                optimizers=[
                    "quantization",
                    "kv_cache",
                    "batching",
                    "speculative_decoding",
                    "prefix_caching",
                    "scheduling",
                    "scale_out",
                ],
                workflows=[t.value for t in WorkflowType],
            ),
            supported_metrics=SUPPORTED_METRICS,
            quantities=[
                QuantityInfo(name=q.name, unit=q.unit, description=q.description) for q in QUANTITIES
            ],
        )
    )


ENDPOINTS = (
    Endpoint("GET", "/config", get_config, "Agent configuration", "config", response=ConfigResponse),
    Endpoint(
        "GET",
        "/capabilities",
        get_capabilities,
        "Agent capabilities and the catalog of normalized quantities",
        "config",
        response=CapabilitiesResponse,
    ),
)
