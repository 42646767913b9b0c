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


Refs = dict[tuple[type[BaseModel], str], dict[str, Any]]


def _schema_of(tp: Any, refs: Refs, defs: dict[str, Any]) -> dict[str, Any]:
    """JSON schema of a response: a model's ref, or a container's schema with its definitions."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return refs[(tp, "serialization")]
    schema = TypeAdapter(tp).json_schema(ref_template=_REF, mode="serialization")
    for name, definition in schema.pop("$defs", {}).items():
        defs.setdefault(name, definition)
    return schema


def _models(endpoints: Iterable[Endpoint]) -> list[tuple[type[BaseModel], str]]:
    """Responses are documented as serialized, request bodies as validated: pydantic names a model
    that differs between the two `Name-Input` / `Name-Output`, so every ref comes from its map."""
    found: dict[tuple[type[BaseModel], str], None] = {(ErrorResponse, "serialization"): None}
    for ep in endpoints:
        if isinstance(ep.response, type) and issubclass(ep.response, BaseModel):
            found[(ep.response, "serialization")] = None
        if ep.body is not None:
            found[(ep.body, "validation")] = None
    return list(found)


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
    wanted = _models(endpoints)
    keyed, top = models_json_schema(wanted, ref_template=_REF)  # type: ignore[arg-type]
    refs: Refs = {key: dict(keyed[key]) for key in wanted}  # type: ignore[index]
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
                "content": {"application/json": {"schema": refs[(ep.body, "validation")]}},
            }
        ok: dict[str, Any] = {"description": HTTPStatus(ep.status).phrase}
        if ep.response is not None:
            ok["content"] = {"application/json": {"schema": _schema_of(ep.response, refs, defs)}}
        responses: dict[str, Any] = {str(ep.status): ok}
        for status in sorted({*ep.errors, 500}):
            responses[str(status)] = {
                "description": _ERROR_TEXT.get(status, HTTPStatus(status).phrase),
                "content": {"application/json": {"schema": refs[(ErrorResponse, "serialization")]}},
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
