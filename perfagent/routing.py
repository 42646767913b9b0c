"""Endpoints as data: each handler is declared once with its models, which both registers the aiohttp
route and feeds the OpenAPI generator, so the document cannot drift from what is served."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, TypeAdapter
from pydantic import ValidationError as PydanticValidationError

from perfagent.errors import ValidationError
from perfagent.timespec import parse_moment

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
M = TypeVar("M", bound=BaseModel)

API_PREFIX = "/api/v1"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One operation of the REST API."""

    method: str
    path: str  # relative to API_PREFIX, aiohttp syntax: /instances/{instance_id}
    handler: Handler
    summary: str
    tag: str
    response: Any = None  # a pydantic model or a type TypeAdapter understands (list[Model]); None: no body
    status: int = 200
    body: type[BaseModel] | None = None
    body_required: bool = True
    query: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()
    description: str = ""

    @property
    def full_path(self) -> str:
        return API_PREFIX + self.path


def add_endpoints(app: web.Application, endpoints: Iterable[Endpoint]) -> None:
    for endpoint in endpoints:
        app.router.add_route(endpoint.method, endpoint.full_path, endpoint.handler)


def _validation_error(exc: PydanticValidationError, model: type[BaseModel], where: str) -> ValidationError:
    """Turn pydantic's report into the spec's VALIDATION_ERROR, naming the first bad field."""
    first = exc.errors(include_url=False)[0]
    loc = ".".join(str(part) for part in first["loc"])
    details: dict[str, Any] = {
        "field": loc or where,
        "errors": [
            {
                "field": ".".join(str(p) for p in err["loc"]) or where,
                "message": err["msg"],
                "type": err["type"],
            }
            for err in exc.errors(include_url=False)
        ],
    }
    allowed = _allowed_values(model, first["loc"])
    if allowed is not None:
        details["allowed_values"] = allowed
    message = f"Invalid {loc}: {first['msg']}" if loc else f"Invalid {where}: {first['msg']}"
    return ValidationError(message, details)


def _allowed_values(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str] | None:
    """The enum members of the field an error points at, so clients see what would be accepted."""
    if len(loc) != 1 or not isinstance(loc[0], str):
        return None
    info = model.model_fields.get(loc[0])
    if info is None:
        return None
    if info.annotation is None:
        return None
    schema = TypeAdapter(info.annotation).json_schema()
    # An optional enum is `anyOf: [{$ref to the enum}, {type: null}]`: look through the alternatives.
    defs = schema.get("$defs", {})
    for option in [schema, *schema.get("anyOf", [])]:
        if "$ref" in option:
            option = defs.get(option["$ref"].rsplit("/", 1)[-1], {})
        values = option.get("enum")
        if isinstance(values, list):
            return [str(v) for v in values]
    return None


async def read_body(request: web.Request, model: type[M]) -> M:
    """Parse and validate a JSON body; every failure is a VALIDATION_ERROR."""
    raw = await request.read()
    try:
        data = json.loads(raw) if raw.strip() else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValidationError(f"Request body is not valid JSON: {exc}", {"field": "body"}) from exc
    if not isinstance(data, dict):
        raise ValidationError("Request body must be a JSON object", {"field": "body"})
    try:
        return model.model_validate(data)
    except PydanticValidationError as exc:
        raise _validation_error(exc, model, "body") from exc


async def read_optional_body(request: web.Request, model: type[M]) -> M:
    """Like `read_body`, but an empty body means every field's default (e.g. a bare POST .../approve)."""
    if not (await request.read()).strip():
        return model()
    return await read_body(request, model)


def read_query(request: web.Request, model: type[M]) -> M:
    try:
        return model.model_validate(dict(request.query))
    except PydanticValidationError as exc:
        raise _validation_error(exc, model, "query") from exc


def time_param(text: str, *, now: datetime, field: str) -> datetime:
    """A query's point in time (ISO 8601 or a duration ago); a bad one is a VALIDATION_ERROR naming it."""
    try:
        return parse_moment(text, now=now)
    except ValueError as exc:
        raise ValidationError(str(exc), {"field": field}) from exc


def json_response(payload: BaseModel | list[Any], *, status: int = 200) -> web.Response:
    """Serialize through pydantic, so datetimes are ISO 8601 and NaN/inf become null, never bare NaN."""
    if isinstance(payload, BaseModel):
        body = payload.model_dump_json()
    else:
        body = TypeAdapter(list[Any]).dump_json(payload).decode()
    return web.Response(text=body, status=status, content_type="application/json")
