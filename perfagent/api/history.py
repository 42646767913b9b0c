"""GET /metrics/history: what an instance looked like over a time range, from DuckDB."""

from __future__ import annotations

from aiohttp import web

from perfagent.catalog import CATALOG
from perfagent.clock import utc_now
from perfagent.context import AGENT
from perfagent.errors import NotFoundError, ValidationError
from perfagent.history import QUANTITY_COLUMNS
from perfagent.models import HistoryPoint, HistoryQuery, HistoryResponse
from perfagent.routing import Endpoint, json_response, read_query, time_param


def _fields(text: str | None) -> list[str]:
    if not text:
        return list(QUANTITY_COLUMNS)
    fields = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in fields if f not in CATALOG]
    if unknown:
        raise ValidationError(
            f"unknown field {unknown[0]!r}", {"field": "fields", "allowed_values": list(QUANTITY_COLUMNS)}
        )
    return fields


async def metrics_history(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    query = read_query(request, HistoryQuery)
    now = utc_now()
    since = time_param(query.since, now=now, field="since")
    until = time_param(query.until, now=now, field="until") if query.until else now
    if since > until:
        raise ValidationError("since is after until", {"field": "since"})
    fields = _fields(query.fields)
    await agent.history.flush()  # what was scraped a moment ago is part of the answer
    frame = await agent.store.history(query.instance_id, since, until, fields)
    if frame.height == 0 and await agent.instance(query.instance_id) is None:
        raise NotFoundError(
            f"no instance {query.instance_id!r} and no history for it", {"instance_id": query.instance_id}
        )
    truncated = frame.height > query.limit
    rows = frame.tail(query.limit).to_dicts()
    points = [
        HistoryPoint(
            ts=row["ts"],
            ok=row["ok"],
            error=row["error"],
            duration_seconds=row["duration_seconds"],
            window_kind=row["window_kind"],
            window_seconds=row["window_seconds"],
            values={f: row[f] for f in fields},
        )
        for row in rows
    ]
    return json_response(
        HistoryResponse(
            instance_id=query.instance_id,
            since=since,
            until=until,
            fields=fields,
            count=len(points),
            truncated=truncated,
            points=points,
        )
    )


ENDPOINTS = (
    Endpoint(
        "GET",
        "/metrics/history",
        metrics_history,
        "Stored scrapes of one instance over a time range",
        "metrics",
        query=HistoryQuery,
        response=HistoryResponse,
        errors=(400, 404),
        description="Every scrape the agent made of the instance (poller and on-demand), oldest first, "
        "with the requested catalog quantities in their catalog units. Failed scrapes are included "
        "with `ok: false` and the error.",
    ),
)
