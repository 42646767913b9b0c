"""POST /metrics/collect: scrape one instance now and answer with normalized numbers."""

from __future__ import annotations

from aiohttp import web

from perfagent.collect import Target, build_response, collect
from perfagent.context import AGENT
from perfagent.models import CollectRequest, CollectResponse
from perfagent.routing import Endpoint, json_response, read_body


async def collect_metrics(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    body = await read_body(request, CollectRequest)
    target = Target(
        instance_id=body.instance_id,
        engine=body.instance_type,
        metrics_url=body.metrics_url,
        dcgm_url=body.dcgm_url,
        gpu_selector=body.gpu_selector,
    )
    collection = await collect(agent.scraper, agent.snapshots, target)
    agent.history.add(collection.record())  # an on-demand scrape is history too
    return json_response(build_response(collection))


ENDPOINTS = (
    Endpoint(
        "POST",
        "/metrics/collect",
        collect_metrics,
        "Collect metrics from an LLM inference instance",
        "metrics",
        body=CollectRequest,
        response=CollectResponse,
        errors=(400, 500, 503),
        description="Fetches `metrics_url` (and `dcgm_url` when given), parses the exposition and returns "
        "normalized quantities. Latency means and rates cover the window since the previous collection "
        "of the same `instance_id` (`window.kind` = `since_previous`), or the server's lifetime on a "
        "first collection (`lifetime`, rates null). Unreachable or slow targets give 503 "
        "SERVICE_UNAVAILABLE; a body with no valid sample gives 500 COLLECTION_ERROR naming the first "
        "bad line; skipped lines are listed in `warnings`.",
    ),
)
