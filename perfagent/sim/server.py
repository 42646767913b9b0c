"""The simulated fleet over HTTP: one metrics URL per instance and a JSON control API.

    GET  /instances                      every instance (id, engine, version, metrics_url, settings, load)
    GET  /instances/{id}                 one instance, with its current state and totals
    GET  /instances/{id}/metrics         Prometheus text (503 while the instance restarts)
    POST /instances/{id}/load            {"rate", "prompt_tokens", "output_tokens", "prefix_share",
                                          "prefix_groups", "max_tokens", "scenario"}: no restart
    POST /instances/{id}/settings        {knob: value, ...}: validated per engine; restarts the instance
    POST /instances/{id}/advance         {"seconds": S} (manual clock only)
    POST /load | /settings               the same for many: optional "engine" and "instances" select them
    POST /advance                        {"seconds": S} for every instance

Errors use the project's JSON envelope: 400 names the bad knob or field, 404 an unknown instance,
409 an advance on the real clock.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from perfagent.errors import error_body
from perfagent.sim.exposition import CONTENT_TYPE
from perfagent.sim.fleet import ClockError, SimFleet, UnknownInstanceError
from perfagent.sim.knobs import KnobError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
FLEET: web.AppKey[SimFleet] = web.AppKey("sim_fleet", SimFleet)
SYNC_INTERVAL_S = 1.0  # real clock: advance every instance this often, so a scrape never waits long
MAX_ADVANCE_S = 30 * 86400.0
SELECTORS = ("engine", "instances")


def _error(status: int, code: str, message: str, **details: Any) -> web.Response:
    return web.json_response(error_body(code, message, details), status=status)


class BadRequestError(Exception):
    """The request body is not a JSON object."""


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        data = await request.json()
    except ValueError:
        raise BadRequestError("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequestError("request body must be a JSON object")
    return data


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except KnobError as exc:
        return _error(400, "VALIDATION_ERROR", exc.message, knob=exc.knob)
    except BadRequestError as exc:
        return _error(400, "VALIDATION_ERROR", str(exc))
    except UnknownInstanceError as exc:
        return _error(
            404, "NOT_FOUND", f"no simulated instance {exc.instance_id!r}", instance=exc.instance_id
        )
    except ClockError as exc:
        return _error(409, "CONFLICT", str(exc))


def _origin(request: web.Request) -> str:
    return str(request.url.origin())


def _selection(body: Mapping[str, Any]) -> dict[str, Any]:
    engine, ids = body.get("engine"), body.get("instances")
    if engine is not None and not isinstance(engine, str):
        raise KnobError("engine", "engine must be a string")
    if ids is not None and not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
        raise KnobError("instances", "instances must be a list of instance ids")
    return {"engine": engine, "ids": ids}


def _seconds(body: Mapping[str, Any]) -> float:
    seconds = body.get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds <= MAX_ADVANCE_S:
        raise KnobError("seconds", f"seconds must be a number between 0 and {MAX_ADVANCE_S:g}")
    return float(seconds)


async def index(request: web.Request) -> web.Response:
    fleet = request.app[FLEET]
    return web.json_response(
        {"simulated": True, "clock": fleet.clock, "seed": fleet.seed, "instances": len(fleet.instances)}
    )


async def list_instances(request: web.Request) -> web.Response:
    fleet = request.app[FLEET]
    fleet.sync()
    views = [inst.view(_origin(request)) for inst in fleet.instances.values()]
    return web.json_response({"simulated": True, "clock": fleet.clock, "instances": views})


async def get_instance(request: web.Request) -> web.Response:
    fleet = request.app[FLEET]
    inst = fleet.instance(request.match_info["id"])
    fleet.sync()
    return web.json_response(inst.detail(_origin(request)))


async def metrics(request: web.Request) -> web.Response:
    text = request.app[FLEET].render(request.match_info["id"])
    if text is None:
        return web.Response(status=503, text="simulated instance is restarting\n")
    return web.Response(body=text.encode("utf-8"), headers={"Content-Type": CONTENT_TYPE})


async def post_load(request: web.Request) -> web.Response:
    fleet, body = request.app[FLEET], await _body(request)
    chosen = fleet.set_load(body, ids=[request.match_info["id"]])
    return web.json_response(chosen[0].view(_origin(request)))


async def post_settings(request: web.Request) -> web.Response:
    fleet, body = request.app[FLEET], await _body(request)
    [(inst, restarted)] = fleet.apply_settings(body, ids=[request.match_info["id"]])
    return web.json_response({"restarted": restarted, "instance": inst.view(_origin(request))})


async def post_advance(request: web.Request) -> web.Response:
    fleet, body = request.app[FLEET], await _body(request)
    instance_id = request.match_info["id"]
    fleet.instance(instance_id)
    fleet.advance(_seconds(body), ids=[instance_id])
    return web.json_response(fleet.instance(instance_id).view(_origin(request)))


async def post_group_load(request: web.Request) -> web.Response:
    fleet, body = request.app[FLEET], await _body(request)
    changes = {k: v for k, v in body.items() if k not in SELECTORS}
    chosen = fleet.set_load(changes, **_selection(body))
    return web.json_response({"instances": [inst.view(_origin(request)) for inst in chosen]})


async def post_group_settings(request: web.Request) -> web.Response:
    fleet, body = request.app[FLEET], await _body(request)
    changes = {k: v for k, v in body.items() if k not in SELECTORS}
    done = fleet.apply_settings(changes, **_selection(body))
    return web.json_response(
        {"instances": [{"restarted": r, "instance": inst.view(_origin(request))} for inst, r in done]}
    )


async def post_group_advance(request: web.Request) -> web.Response:
    fleet, body = request.app[FLEET], await _body(request)
    fleet.advance(_seconds(body))
    return web.json_response(
        {"instances": [inst.view(_origin(request)) for inst in fleet.instances.values()]}
    )


async def _ticker(app: web.Application) -> AsyncIterator[None]:
    """Real clock: keep instances current in the background, so each scrape only adds a second's work."""
    fleet = app[FLEET]

    async def loop() -> None:
        while True:
            await asyncio.sleep(SYNC_INTERVAL_S)
            fleet.sync()

    task = asyncio.create_task(loop()) if fleet.clock == "real" else None
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def build_app(fleet: SimFleet) -> web.Application:
    app = web.Application(middlewares=[_errors])
    app[FLEET] = fleet
    app.router.add_get("/", index)
    app.router.add_get("/instances", list_instances)
    app.router.add_get("/instances/{id}", get_instance)
    app.router.add_get("/instances/{id}/metrics", metrics)
    app.router.add_post("/instances/{id}/load", post_load)
    app.router.add_post("/instances/{id}/settings", post_settings)
    app.router.add_post("/instances/{id}/advance", post_advance)
    app.router.add_post("/load", post_group_load)
    app.router.add_post("/settings", post_group_settings)
    app.router.add_post("/advance", post_group_advance)
    app.cleanup_ctx.append(_ticker)
    return app
