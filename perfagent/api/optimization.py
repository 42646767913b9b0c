"""POST /optimization/recommend: engine-specific changes for the bottlenecks given."""

from __future__ import annotations

from aiohttp import web

from perfagent.clock import utc_now
from perfagent.optimizer import build_response
from perfagent.recommend_models import RecommendRequest, RecommendResponse
from perfagent.routing import Endpoint, json_response, read_body


async def recommend(request: web.Request) -> web.Response:
    body = await read_body(request, RecommendRequest)
    return json_response(build_response(body, utc_now()))


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
        "Never proposes what `current_config` already has; `skipped` says what was left out and why.",
    ),
)
