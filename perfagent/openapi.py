"""OpenAPI 3.1 document generated from the declared endpoints and their pydantic models."""

from __future__ import annotations

import re
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import models_json_schema

from perfagent.models import ErrorResponse
from perfagent.routing import Endpoint

_REF = "#/components/schemas/{model}"
_ERROR_TEXT = {
    400: "Invalid request (VALIDATION_ERROR)",
    404: "Resource not found (NOT_FOUND)",
    409: "Conflicts with current state (CONFLICT)",
    500: "Failed (COLLECTION_ERROR, ANALYSIS_ERROR, WORKFLOW_ERROR or INTERNAL_ERROR)",
    503: "A dependency is unreachable (SERVICE_UNAVAILABLE)",
}


def _schema_of(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    """JSON schema of a model or a container of models, collecting definitions into `defs`."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return {"$ref": _REF.format(model=tp.__name__)}
    schema = TypeAdapter(tp).json_schema(ref_template=_REF)
    defs.update(schema.pop("$defs", {}))
    return schema


def _models(endpoints: Iterable[Endpoint]) -> list[type[BaseModel]]:
    found: dict[str, type[BaseModel]] = {"ErrorResponse": ErrorResponse}
    for ep in endpoints:
        for tp in (ep.response, ep.body):
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                found[tp.__name__] = tp
    return list(found.values())


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    schema = model.model_json_schema(ref_template=_REF)
    required = set(schema.get("required", []))
    return [
        {
            "name": name,
            "in": "query",
            "required": name in required,
            "schema": {k: v for k, v in prop.items() if k not in {"title", "description"}},
            **({"description": prop["description"]} if "description" in prop else {}),
        }
        for name, prop in schema.get("properties", {}).items()
    ]


def build_openapi(endpoints: Iterable[Endpoint], *, title: str, version: str) -> dict[str, Any]:
    endpoints = list(endpoints)
    _, top = models_json_schema(
        [(m, "serialization") for m in _models(endpoints)]
        + [(ep.body, "validation") for ep in endpoints if ep.body is not None],
        ref_template=_REF,
    )
    defs: dict[str, Any] = dict(top.get("$defs", {}))
    paths: dict[str, dict[str, Any]] = {}
    for ep in endpoints:
        op: dict[str, Any] = {
            "operationId": ep.handler.__name__.lstrip("_"),
            "summary": ep.summary,
            "tags": [ep.tag],
        }
        if ep.description:
            op["description"] = ep.description
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"{(\w+)}", ep.path)
        ]
        if ep.query is not None:
            params += _query_parameters(ep.query)
        if params:
            op["parameters"] = params
        if ep.body is not None:
            op["requestBody"] = {
                "required": ep.body_required,
                "content": {"application/json": {"schema": {"$ref": _REF.format(model=ep.body.__name__)}}},
            }
        ok: dict[str, Any] = {"description": HTTPStatus(ep.status).phrase}
        if ep.response is not None:
            ok["content"] = {"application/json": {"schema": _schema_of(ep.response, defs)}}
        responses: dict[str, Any] = {str(ep.status): ok}
        for status in sorted({*ep.errors, 500}):
            responses[str(status)] = {
                "description": _ERROR_TEXT.get(status, HTTPStatus(status).phrase),
                "content": {"application/json": {"schema": {"$ref": _REF.format(model="ErrorResponse")}}},
            }
        op["responses"] = responses
        paths.setdefault(ep.full_path, {})[ep.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": "REST API of perfagent, a performance agent for LLM inference fleets.",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {"schemas": defs},
    }
