"""POST /analysis/detect-bottlenecks and GET /analysis/findings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import polars as pl
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from perfagent.catalog import CATALOG
from perfagent.clock import utc_now
from perfagent.context import AGENT
from perfagent.detect import Evaluation, evaluate
from perfagent.detection import with_engines
from perfagent.errors import NotFoundError, ValidationError
from perfagent.models import (
    Bottleneck,
    DetectRequest,
    DetectResponse,
    Evidence,
    EvidenceSource,
    Finding,
    FindingsResponse,
    InstanceSource,
    InsufficientData,
)
from perfagent.routing import Endpoint, json_response, read_body, read_query, time_param
from perfagent.rules import BottleneckType, Severity


class FindingsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instance_id: str | None = None
    type: BottleneckType | None = Field(None, description="Bottleneck type, e.g. MEMORY_PRESSURE.")
    severity: Severity | None = Field(None, description="The current severity.")
    active: bool | None = Field(None, description="true: still firing; false: resolved.")
    since: str | None = Field(None, description="Findings seen at or after this time (ISO 8601 or e.g. 6h).")
    until: str | None = Field(None, description="Findings that fired at or before this time.")
    limit: int = Field(200, ge=1, le=10_000)


# The collect response's groups, back to catalog quantities (value multiplier for percent fields).
_GROUPS: Mapping[str, Mapping[str, tuple[str, float]]] = {
    "request_metrics": {
        "success_total": ("requests_success_total", 1.0),
        "failure_total": ("requests_failure_total", 1.0),
        "time_to_first_token_seconds": ("ttft_seconds", 1.0),
        "time_per_output_token_seconds": ("itl_seconds", 1.0),
        "e2e_request_latency_seconds": ("e2e_latency_seconds", 1.0),
        "queue_time_seconds": ("queue_time_seconds", 1.0),
        "request_rate": ("request_rate", 1.0),
        "error_rate": ("error_rate", 1.0),
    },
    "gpu_metrics": {
        "cache_usage_perc": ("kv_cache_usage", 0.01),  # the spec's percent, the catalog's ratio
        "memory_usage_bytes": ("gpu_memory_used_bytes", 1.0),
        "num_requests_running": ("requests_running", 1.0),
        "num_requests_waiting": ("requests_waiting", 1.0),
        "memory_total_bytes": ("gpu_memory_total_bytes", 1.0),
        "gpu_utilization": ("gpu_utilization", 1.0),
        "kv_cache_capacity_tokens": ("kv_cache_capacity_tokens", 1.0),
    },
    "throughput_metrics": {
        "tokens_per_second": ("generation_tokens_per_second", 1.0),
        "generation_tokens_total": ("generation_tokens_total", 1.0),
        "prompt_tokens_total": ("prompt_tokens_total", 1.0),
        "prompt_tokens_per_second": ("prompt_tokens_per_second", 1.0),
    },
    "cache_metrics": {
        "prefix_cache_hit_rate": ("prefix_cache_hit_rate", 1.0),
        "preemptions_total": ("preemptions_total", 1.0),
        "preemption_rate": ("preemption_rate", 1.0),
    },
}
_LATENCY = {
    "ttft": "ttft_seconds",
    "itl": "itl_seconds",
    "e2e": "e2e_latency_seconds",
    "queue": "queue_time_seconds",
}
# Parts of a collect response that are context, not metrics.
_IGNORED = {
    "instance_id",
    "timestamp",
    "window",
    "engine",
    "engine_version",
    "approximations",
    "flags",
    "warnings",
    "scrapes",
}


def _number(value: Any, field: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(f"metrics.{field} must be a number or null", {"field": f"metrics.{field}"})
    return float(value)


def quantities_from_metrics(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    """Catalog quantities from a collect-shaped or flat metrics object; unknown keys are errors."""
    out: dict[str, float | None] = {}
    for key, value in metrics.items():
        if key in _IGNORED:
            continue
        if (key in _GROUPS or key in {"latency", "quantities"}) and not isinstance(value, Mapping):
            raise ValidationError(f"metrics.{key} must be an object", {"field": f"metrics.{key}"})
        if key in _GROUPS:
            for field, inner in value.items():
                if field not in _GROUPS[key]:
                    raise ValidationError(
                        f"unknown field metrics.{key}.{field}",
                        {"field": f"metrics.{key}.{field}", "allowed_values": sorted(_GROUPS[key])},
                    )
                name, scale = _GROUPS[key][field]
                number = _number(inner, f"{key}.{field}")
                out[name] = None if number is None else number * scale
        elif key == "latency":
            for short, stats in value.items():
                if short not in _LATENCY or not isinstance(stats, Mapping):
                    raise ValidationError(
                        f"unknown field metrics.latency.{short}",
                        {"field": f"metrics.latency.{short}", "allowed_values": sorted(_LATENCY)},
                    )
                base = _LATENCY[short]
                for stat, number in stats.items():
                    name = base if stat == "mean" else f"{base}_{stat}"
                    if name not in CATALOG:
                        raise ValidationError(
                            f"unknown field metrics.latency.{short}.{stat}",
                            {
                                "field": f"metrics.latency.{short}.{stat}",
                                "allowed_values": ["mean", "p50", "p90", "p99"],
                            },
                        )
                    out[name] = _number(number, f"latency.{short}.{stat}")
        elif key == "quantities":
            for name, number in value.items():
                if name not in CATALOG:
                    raise ValidationError(
                        f"unknown quantity {name!r}", {"field": f"metrics.quantities.{name}"}
                    )
                out[name] = _number(number, f"quantities.{name}")
        elif key in CATALOG:
            out[key] = _number(value, key)
        else:
            raise ValidationError(
                f"unknown field metrics.{key}",
                {
                    "field": f"metrics.{key}",
                    "allowed_values": sorted([*_GROUPS, "latency", "quantities", *CATALOG]),
                },
            )
    return out


def _bottlenecks(evaluation: Evaluation, source: EvidenceSource) -> list[Bottleneck]:
    return [
        Bottleneck(
            type=row["type"],
            severity=row["severity"],
            description=row["description"],
            metric_name=row["quantity"],
            current_value=row["value"],
            threshold_value=row["threshold"],
            recommendation=row["recommendation"],
            detected_at=evaluation.at,
            rule=row["rule"],
            unit=row["unit"],
            summary=row["summary"],
            evidence=Evidence(
                source=source,
                window_start=row["window_start"] if source != "metrics" else None,
                window_end=row["window_end"],
            ),
        )
        for row in evaluation.results.iter_rows(named=True)
    ]


async def detect_bottlenecks(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    body = await read_body(request, DetectRequest)
    now = utc_now()
    instance = await agent.instance(body.instance_id)
    engine = body.instance_type.value if body.instance_type else (instance.engine.value if instance else None)
    if body.metrics is not None:
        values = quantities_from_metrics(body.metrics)
        columns = {q: values.get(q) for q in agent.detector.compiled.quantities}
        frame = pl.DataFrame(
            [{"instance_id": body.instance_id, "engine": engine, "ts": now, **columns}],
            schema={
                "instance_id": pl.String,
                "engine": pl.String,
                "ts": pl.Datetime("us", "UTC"),
                **{q: pl.Float64 for q in columns},
            },
        )
        evaluation = evaluate(agent.detector.compiled, frame, now)
        source: EvidenceSource = "metrics"
    elif instance is not None and instance.source is InstanceSource.DISCOVERED:
        # Never scraped by the agent: Prometheus computes what the rules read.
        frame = await agent.promql_frame([instance], now)
        evaluation = evaluate(
            agent.detector.compiled, with_engines(frame, {instance.id: engine or instance.engine.value}), now
        )
        source = "prometheus"
    else:
        await agent.history.flush()
        engines = await agent.engines()
        if engine is not None:
            engines[body.instance_id] = engine
        evaluation = await agent.detector.evaluate_history(now, engines, body.instance_id)
        if instance is None and evaluation.results.height == 0 and evaluation.insufficient.height == 0:
            raise NotFoundError(
                f"no instance {body.instance_id!r} and no stored history for it; send `metrics` to analyse them",
                {"instance_id": body.instance_id},
            )
        source = "history"
    insufficient = [
        InsufficientData(rule=row["rule"], quantity=row["quantity"], reason=row["reason"])
        for row in evaluation.insufficient.filter(pl.col("instance_id") == body.instance_id).iter_rows(
            named=True
        )
    ]
    return json_response(
        DetectResponse(
            instance_id=body.instance_id,
            bottlenecks=_bottlenecks(evaluation, source),
            analysis_timestamp=now,
            insufficient_data=insufficient,
            rules_evaluated=len(agent.rules),
        )
    )


async def list_findings(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    query = read_query(request, FindingsQuery)
    where: list[str] = []
    params: list[Any] = []
    now = utc_now()
    if query.instance_id:
        where.append("instance_id = ?")
        params.append(query.instance_id)
    if query.type:
        where.append("type = ?")
        params.append(query.type.value)
    if query.severity:
        where.append("severity = ?")
        params.append(query.severity.value)
    if query.active is not None:
        where.append("resolved_at IS NULL" if query.active else "resolved_at IS NOT NULL")
    for field, text, clause in (
        ("since", query.since, "last_seen >= ?"),
        ("until", query.until, "fired_at <= ?"),
    ):
        if text:
            params.append(time_param(text, now=now, field=field))
            where.append(clause)
    frame = await agent.store.findings(where, params, query.limit)
    findings = [Finding(**row, active=row["resolved_at"] is None) for row in frame.iter_rows(named=True)]
    return json_response(FindingsResponse(findings=findings, count=len(findings)))


ENDPOINTS = (
    Endpoint(
        "POST",
        "/analysis/detect-bottlenecks",
        detect_bottlenecks,
        "Detect performance bottlenecks",
        "analysis",
        body=DetectRequest,
        response=DetectResponse,
        errors=(400, 404, 503),
        description="With `metrics`, evaluates every rule on what was sent (one point in time: `for` and look-back "
        "windows cover that point only). With only `instance_id`, evaluates the instance's stored history over "
        "each rule's window; for an instance discovered from Prometheus, that history is computed by PromQL "
        "(503 SERVICE_UNAVAILABLE when Prometheus cannot answer). Rules lacking data are listed in "
        "`insufficient_data`, never as bottlenecks. "
        "`current_value` and `threshold_value` are in the catalog unit of `metric_name`.",
    ),
    Endpoint(
        "GET",
        "/analysis/findings",
        list_findings,
        "Findings the poller's rule evaluations raised",
        "analysis",
        query=FindingsQuery,
        response=FindingsResponse,
        errors=(400,),
        description="One entry per episode of a rule firing on an instance (after its `for`), with first-seen, "
        "fired, last-seen and resolved times (`keep_firing_for` honoured). Newest first.",
    ),
)
