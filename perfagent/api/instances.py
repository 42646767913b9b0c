"""GET/POST/DELETE /instances: the fleet the agent watches, persisted in DuckDB."""

from __future__ import annotations

from aiohttp import web

from perfagent.clock import utc_now
from perfagent.context import AGENT
from perfagent.errors import ConflictError, NotFoundError
from perfagent.models import Instance, InstanceSource, InstanceSpec
from perfagent.routing import Endpoint, json_response, read_body


async def list_instances(request: web.Request) -> web.Response:
    return json_response(await request.app[AGENT].instances())


async def get_instance(request: web.Request) -> web.Response:
    instance_id = request.match_info["instance_id"]
    found = await request.app[AGENT].instance(instance_id)
    if found is None:
        raise NotFoundError(f"instance {instance_id!r} not found", {"instance_id": instance_id})
    return json_response(found)


async def add_instance(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    spec = await read_body(request, InstanceSpec)
    agent.scraper.policy.check(spec.metrics_url, field="metrics_url")
    if spec.dcgm_url:
        agent.scraper.policy.check(spec.dcgm_url, field="dcgm_url")
    if await agent.instance(spec.id) is not None or not await agent.store.insert_instance(
        spec, InstanceSource.API, utc_now()
    ):
        raise ConflictError(f"instance {spec.id!r} already exists", {"instance_id": spec.id})
    created = await agent.instance(spec.id)
    assert created is not None  # just inserted on the store's only connection
    return json_response(created, status=201)


async def delete_instance(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    instance_id = request.match_info["instance_id"]
    found = await agent.instance(instance_id)
    if found is None:
        raise NotFoundError(f"instance {instance_id!r} not found", {"instance_id": instance_id})
    if found.source is not InstanceSource.API:
        raise ConflictError(
            f"instance {instance_id!r} comes from the {found.source.value} fleet; remove it there",
            {"instance_id": instance_id, "source": found.source.value},
        )
    await agent.store.delete_instance(instance_id)
    return web.Response(status=204)


ENDPOINTS = (
    Endpoint(
        "GET", "/instances", list_instances, "List watched instances", "instances", response=list[Instance]
    ),
    Endpoint(
        "POST",
        "/instances",
        add_instance,
        "Add an instance to watch",
        "instances",
        body=InstanceSpec,
        response=Instance,
        status=201,
        errors=(400, 409),
        description="Persisted in DuckDB. The URLs must pass `allowed_targets`. "
        "409 CONFLICT when the id exists.",
    ),
    Endpoint(
        "GET",
        "/instances/{instance_id}",
        get_instance,
        "Get one instance",
        "instances",
        response=Instance,
        errors=(404,),
    ),
    Endpoint(
        "DELETE",
        "/instances/{instance_id}",
        delete_instance,
        "Stop watching an instance added through the API",
        "instances",
        status=204,
        errors=(404, 409),
        description="Instances from the config file or the demo fleet cannot be deleted here (409 CONFLICT).",
    ),
)
