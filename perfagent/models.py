"""Pydantic models of the REST API: requests, responses and the instances the agent watches.

The spec's documented fields come first in each model; what the agent adds beyond them follows, so
the documented shapes stay a subset of every response.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, StringConstraints, field_validator

InstanceId = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
]


class EngineName(StrEnum):
    """Inference engines the agent understands (the spec's `instance_type`)."""

    VLLM = "vllm"
    TGI = "tgi"
    SGLANG = "sglang"


class InstanceSource(StrEnum):
    CONFIG = "config"  # listed in the config file
    API = "api"  # added with POST /instances
    DEMO = "demo"  # the bundled captures, served when nothing is configured and demo_fleet is captures
    SIMULATOR = "simulator"  # the built-in simulated fleet, served when nothing is configured
    DISCOVERED = "discovered"  # found in Prometheus by a `discovery` selector; never scraped


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_http_url(value: str) -> str:
    url = AnyHttpUrl(value)  # raises a ValueError pydantic reports against the field
    if not url.host:
        raise ValueError("URL has no host")
    return value


class InstanceSpec(_Strict):
    """One inference server to watch, as written in the config file or POSTed to /instances."""

    id: InstanceId
    engine: EngineName
    metrics_url: str = Field(description="The engine's Prometheus /metrics URL.")
    dcgm_url: str | None = Field(None, description="dcgm-exporter /metrics URL for this instance's GPUs.")
    gpu_selector: dict[str, str] = Field(
        default_factory=dict, description='Label equalities picking this instance\'s GPUs, e.g. {"gpu": "0"}.'
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="Free labels, e.g. model and deployment_group."
    )

    @field_validator("metrics_url", "dcgm_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return value if value is None else _check_http_url(value)


class ScrapeHealth(BaseModel):
    """What the last scrapes of an instance did."""

    last_success: datetime | None = None
    last_error: str | None = None
    last_error_at: datetime | None = None
    last_duration_seconds: float | None = None
    scrapes_total: int = 0
    errors_total: int = 0


class Instance(InstanceSpec):
    """An instance as the API lists it."""

    source: InstanceSource
    created_at: datetime
    scrape: ScrapeHealth = Field(default_factory=ScrapeHealth)


# ---- health, config, capabilities -------------------------------------------------------------


class HealthResponse(BaseModel):
    status: Literal["healthy"]
    timestamp: datetime


class CheckResult(BaseModel):
    status: Literal["healthy", "degraded", "unhealthy", "not_configured"]
    detail: str | None = None
    latency_seconds: float | None = None


class InstanceReachability(BaseModel):
    instance_id: str
    reachable: bool
    detail: str | None = None


class DetailedHealthResponse(BaseModel):
    status: Literal["healthy", "degraded", "unhealthy"]
    version: str
    uptime_seconds: float
    dependencies: dict[str, str] = Field(
        description="Status per dependency: database, prometheus, instances."
    )
    timestamp: datetime
    checks: dict[str, CheckResult]
    instances: list[InstanceReachability]


class ConfigResponse(BaseModel):
    agent_id: str
    version: str
    capabilities: list[EngineName]
    polling_interval: float
    dev_mode: bool
    allowed_targets: list[str]
    prometheus_url: str | None
    instances: int


class CapabilitySet(BaseModel):
    collectors: list[str]
    optimizers: list[str]
    workflows: list[str]


class QuantityInfo(BaseModel):
    name: str
    unit: str
    description: str


class CapabilitiesResponse(BaseModel):
    capabilities: CapabilitySet
    supported_metrics: list[str]
    quantities: list[QuantityInfo]


# ---- metrics collection -----------------------------------------------------------------------


class CollectRequest(_Strict):
    instance_id: InstanceId
    instance_type: EngineName
    metrics_url: str
    dcgm_url: str | None = None
    gpu_selector: dict[str, str] = Field(default_factory=dict)

    @field_validator("metrics_url", "dcgm_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return value if value is None else _check_http_url(value)


class RequestMetrics(BaseModel):
    success_total: float | None
    failure_total: float | None
    time_to_first_token_seconds: float | None = Field(description="Mean TTFT over the window.")
    time_per_output_token_seconds: float | None = Field(
        description="Mean inter-token latency over the window."
    )
    e2e_request_latency_seconds: float | None = Field(description="Mean end-to-end latency over the window.")
    queue_time_seconds: float | None
    request_rate: float | None = Field(description="Finished requests per second over the window.")
    error_rate: float | None = Field(description="Failed share (0-1) of requests finished in the window.")


class GpuMetrics(BaseModel):
    cache_usage_perc: float | None = Field(description="KV-cache usage in percent (0-100).")
    memory_usage_bytes: float | None = Field(description="GPU framebuffer used (dcgm-exporter), bytes.")
    num_requests_running: float | None
    num_requests_waiting: float | None
    memory_total_bytes: float | None
    gpu_utilization: float | None = Field(description="0-1.")
    kv_cache_capacity_tokens: float | None


class ThroughputMetrics(BaseModel):
    tokens_per_second: float | None = Field(description="Generated tokens per second over the window.")
    generation_tokens_total: float | None
    prompt_tokens_total: float | None
    prompt_tokens_per_second: float | None


class LatencyPercentiles(BaseModel):
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None


class CacheMetrics(BaseModel):
    prefix_cache_hit_rate: float | None = Field(description="0-1.")
    preemptions_total: float | None
    preemption_rate: float | None = Field(description="Preemptions per second over the window.")


class WindowInfo(BaseModel):
    kind: Literal["since_previous", "lifetime"]
    start: datetime | None
    end: datetime
    seconds: float | None


class ParseWarning(BaseModel):
    line: int
    text: str
    reason: str


class ScrapeInfo(BaseModel):
    url: str
    bytes: int
    duration_seconds: float
    samples: int


class CollectResponse(BaseModel):
    instance_id: str
    timestamp: datetime
    request_metrics: RequestMetrics
    gpu_metrics: GpuMetrics
    throughput_metrics: ThroughputMetrics
    latency: dict[str, LatencyPercentiles] = Field(
        description="ttft, itl, e2e and queue latency in seconds: window mean and percentiles."
    )
    cache_metrics: CacheMetrics
    quantities: dict[str, float | None] = Field(description="Every catalog quantity, in its catalog unit.")
    window: WindowInfo
    engine: EngineName
    engine_version: str | None
    approximations: dict[str, str]
    flags: dict[str, str]
    warnings: list[ParseWarning]
    scrapes: list[ScrapeInfo]


# ---- errors -----------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: dict[str, Any]


class ErrorResponse(BaseModel):
    """The spec's error envelope, returned by every failing request."""

    error: ErrorDetail
    timestamp: datetime


# ---- history ----------------------------------------------------------------------------------


class HistoryQuery(_Strict):
    instance_id: InstanceId = Field(description="The instance whose scrapes to return.")
    since: str = Field("1h", description="ISO 8601 time, or a duration ago such as 30m, 6h, 7d.")
    until: str | None = Field(None, description="ISO 8601 time or duration ago; default now.")
    fields: str | None = Field(None, description="Comma-separated catalog quantities; default all.")
    limit: int = Field(10_000, ge=1, le=100_000, description="Most points returned (the newest are kept).")


class HistoryPoint(BaseModel):
    ts: datetime
    ok: bool
    error: str | None
    duration_seconds: float | None
    window_kind: str | None
    window_seconds: float | None
    values: dict[str, float | None]


class HistoryResponse(BaseModel):
    instance_id: str
    since: datetime
    until: datetime
    fields: list[str]
    count: int
    truncated: bool
    points: list[HistoryPoint]


# ---- analysis ---------------------------------------------------------------------------------


class DetectRequest(_Strict):
    instance_id: InstanceId
    instance_type: EngineName | None = Field(
        None,
        description="The engine; taken from the stored instance when omitted. Engine-specific rules need it.",
    )
    metrics: dict[str, Any] | None = Field(
        None,
        description="Metrics to analyse, as POST /metrics/collect returns them (request_metrics, gpu_metrics, "
        "throughput_metrics, cache_metrics, latency, quantities) or as flat catalog quantities. Without it, "
        "the instance's stored history is analysed.",
    )


EvidenceSource = Literal["metrics", "history", "prometheus"]


class Evidence(BaseModel):
    source: EvidenceSource
    window_start: datetime | None
    window_end: datetime


class Bottleneck(BaseModel):
    type: str
    severity: str
    description: str
    metric_name: str = Field(description="The catalog quantity the rule reads.")
    current_value: float | None = Field(description="In the quantity's catalog unit (ratios 0-1).")
    threshold_value: float | None
    recommendation: str
    detected_at: datetime
    rule: str
    unit: str
    summary: str
    evidence: Evidence


class InsufficientData(BaseModel):
    rule: str
    quantity: str
    reason: str


class DetectResponse(BaseModel):
    instance_id: str
    bottlenecks: list[Bottleneck]
    analysis_timestamp: datetime
    insufficient_data: list[InsufficientData] = Field(
        description="Rules that could not be evaluated for lack of data; never reported as bottlenecks."
    )
    rules_evaluated: int


class Finding(BaseModel):
    instance_id: str
    rule: str
    engine: str | None
    type: str
    severity: str
    max_severity: str
    value: float | None
    threshold: float | None
    summary: str | None
    description: str | None
    recommendation: str | None
    first_seen: datetime = Field(description="When the condition started to hold (before `for`).")
    fired_at: datetime | None
    last_seen: datetime | None
    resolved_at: datetime | None
    active: bool


class FindingsResponse(BaseModel):
    findings: list[Finding]
    count: int
