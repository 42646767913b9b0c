"""POST /optimization/recommend: engine-specific changes for the bottlenecks given."""

from __future__ import annotations

from aiohttp import web

from perfagent.clock import utc_now
from perfagent.context import AGENT
from perfagent.optimizer import build_response
from perfagent.priors import observed_effects
from perfagent.recommend_models import RecommendRequest, RecommendResponse
from perfagent.routing import Endpoint, json_response, read_body


async def recommend(request: web.Request) -> web.Response:
    body = await read_body(request, RecommendRequest)
    response = build_response(body, utc_now())
    agent = request.app[AGENT]
    instance = await agent.instance(body.instance_id)
    model = instance.labels.get("model") if instance is not None else None
    engine = body.instance_type.value
    observed = observed_effects(await agent.workflows.store.verdicts(engine), engine, model or None)
    for optimization in response.optimizations:
        optimization.observed = observed.get(optimization.id)
    return json_response(response)


ENDPOINTS = (
    Endpoint(
        "POST",
        "/optimization/recommend",
        recommend,
        "Generate optimization recommendations",
        "optimization",
        body=RecommendRequest,
        response=RecommendResponse,
        errors=(400,),
        description="Maps bottlenecks (as the spec's minimal objects or as full findings) to the engine's real "
        "flags, computed from `current_config` (generic keys such as `max_batch_size` are accepted as aliases). "
        "Never proposes what `current_config` already has; `skipped` says what was left out and why. Beside "
        "its `estimated_improvement` prior, each optimization shows what it `observed`ly did in past workflows "
        "on comparable instances (null until one was judged).",
    ),
)
