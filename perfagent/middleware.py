"""The one place where errors become responses: the spec's JSON envelope for every failure."""

from __future__ import annotations

import logging

from aiohttp import web

from perfagent.errors import PerfAgentError, error_body
from perfagent.routing import Handler

log = logging.getLogger("perfagent.http")

_HTTP_CODES = {
    400: "VALIDATION_ERROR",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "VALIDATION_ERROR",
    415: "VALIDATION_ERROR",
}


def envelope(status: int, code: str, message: str, details: dict[str, object] | None = None) -> web.Response:
    return web.json_response(error_body(code, message, details), status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except PerfAgentError as exc:
        if exc.status >= 500:
            log.warning("%s %s failed: %s %s", request.method, request.path, exc.code, exc.message)
        return envelope(exc.status, exc.code, exc.message, exc.details)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and the like are not errors
        code = _HTTP_CODES.get(exc.status, "INTERNAL_ERROR" if exc.status >= 500 else "VALIDATION_ERROR")
        details: dict[str, object] = {"path": request.path}
        if isinstance(exc, web.HTTPMethodNotAllowed):
            details["allowed_methods"] = sorted(exc.allowed_methods)
        message = f"{exc.reason}: {request.method} {request.path}"
        return envelope(exc.status, code, message, details)
    except Exception:
        # A bug, not a client error: log the traceback, answer with the envelope, keep serving.
        log.exception("unhandled error in %s %s", request.method, request.path)
        return envelope(500, "INTERNAL_ERROR", "Internal error; see the agent's log")
