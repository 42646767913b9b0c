"""Request and response models of POST /optimization/recommend.

The spec's documented fields come first in each model (`type`, `priority`, `description`,
`estimated_improvement`, `config_changes`, `risks`); what perfagent adds follows, so the spec's
shapes stay a subset of every response.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from perfagent.catalog import CATALOG
from perfagent.models import EngineName, InstanceId


class Severity(StrEnum):
    """Severity of a bottleneck, and priority of an optimization; lowest first."""

    LOW = "LOW"
    MEDIUM = "MEDIUM"
    HIGH = "HIGH"
    CRITICAL = "CRITICAL"


class BottleneckType(StrEnum):
    """The spec's bottleneck types."""

    MEMORY_PRESSURE = "MEMORY_PRESSURE"
    HIGH_LATENCY = "HIGH_LATENCY"
    LOW_THROUGHPUT = "LOW_THROUGHPUT"
    QUEUE_BUILDUP = "QUEUE_BUILDUP"
    CACHE_INEFFICIENCY = "CACHE_INEFFICIENCY"


class OptimizationType(StrEnum):
    """The spec's four optimization types plus the three perfagent adds."""

    QUANTIZATION = "QUANTIZATION"
    KV_CACHE = "KV_CACHE"
    BATCHING = "BATCHING"
    SPECULATIVE_DECODING = "SPECULATIVE_DECODING"
    PREFIX_CACHING = "PREFIX_CACHING"
    SCHEDULING = "SCHEDULING"
    SCALE_OUT = "SCALE_OUT"


class SkipReason(StrEnum):
    """Why an optimization that the bottlenecks called for was not proposed."""

    ALREADY_IN_FORCE = "already_in_force"  # current_config already has every value it would set
    ALREADY_CONFIGURED = "already_configured"  # current_config already has the feature (e.g. fp8 KV)
    NOT_APPLICABLE = "not_applicable"  # the engine has no flag for it
    CONDITION_NOT_MET = "condition_not_met"  # the metrics point elsewhere
    MISSING_INPUT = "missing_input"  # a current value or metric it needs was not given
    AT_BOUND = "at_bound"  # the value is already at or past the bound it would move to
    CONFLICT = "conflict"  # a higher-ranked optimization sets the same flag to another value
    DUPLICATE = "duplicate"  # a higher-ranked optimization already makes the same changes


# ---- request ----------------------------------------------------------------------------------


class Bottleneck(BaseModel):
    """A bottleneck: the spec's minimal form (type, severity, description) or a full finding.

    Extra keys of a finding are kept. A finding written with the rule engine's names (`quantity`,
    `value`, `threshold`) is read as `metric_name`, `current_value`, `threshold_value`.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    type: BottleneckType
    severity: Severity
    description: str | None = None
    metric_name: str | None = None
    current_value: float | None = None
    threshold_value: float | None = None
    recommendation: str | None = None
    detected_at: datetime | None = None
    rule: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _finding_names(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for spec_name, finding_name in (
            ("metric_name", "quantity"),
            ("current_value", "value"),
            ("threshold_value", "threshold"),
        ):
            if out.get(spec_name) is None and out.get(finding_name) is not None:
                out[spec_name] = out[finding_name]
        for key in ("type", "severity"):
            if isinstance(out.get(key), str):
                out[key] = out[key].strip().upper()
        return out


class RecommendRequest(BaseModel):
    """POST /optimization/recommend body."""

    model_config = ConfigDict(extra="forbid")

    instance_id: InstanceId
    instance_type: EngineName
    bottlenecks: list[Bottleneck] = Field(description="Minimal bottlenecks or full findings.")
    current_config: dict[str, Any] | None = Field(
        None,
        description="The engine's current settings: real flag names (max_num_seqs or --max-num-seqs) or "
        "the documented generic aliases (max_batch_size, quantization, kv_cache_dtype, "
        "gpu_memory_utilization, block_size, ...). Unknown keys are reported, not rejected.",
    )
    metrics: dict[str, float | None] | None = Field(
        None,
        description="Catalog quantities (e.g. kv_cache_usage, requests_waiting, preemption_rate) that "
        "refine the choice; the `quantities` of POST /metrics/collect fit as they are.",
    )

    @field_validator("metrics")
    @classmethod
    def _catalog_names(cls, value: dict[str, float | None] | None) -> dict[str, float | None] | None:
        unknown = sorted(set(value or {}) - set(CATALOG))
        if unknown:
            raise ValueError(f"not catalog quantities: {', '.join(unknown)} (see GET /capabilities)")
        return value


# ---- response ---------------------------------------------------------------------------------


class EstimatedImprovement(BaseModel):
    """Numbers like the spec's ({"memory_reduction": 0.5}) plus where they come from.

    Keys: `memory_reduction` (fraction of the memory named in `basis`: KV cache, weights, or
    per-GPU weights), `kv_cache_capacity_gain` (fraction more KV tokens), `throughput_gain`,
    `latency_impact` (signed fraction; negative is faster). A number is given only where a
    documented fact or arithmetic supports it; otherwise `basis` says why there is none.
    """

    model_config = ConfigDict(extra="allow", frozen=True)
    __pydantic_extra__: dict[str, float] = Field(init=False)

    basis: str = Field(
        description="A documented engine fact, a rule of thumb with its source, or a heuristic."
    )


class Addressed(BaseModel):
    """A bottleneck an optimization rests on."""

    type: BottleneckType
    severity: Severity
    description: str | None = None
    rule: str | None = None
    metric_name: str | None = None
    current_value: float | None = None
    threshold_value: float | None = None


class Observed(BaseModel):
    """What the same optimization measurably did before: the judged batches (canaries and rollout
    batches) of past workflows on the same engine and, when known, the same model. Filled by the agent
    from its stored verdicts (`perfagent.priors`)."""

    scope: str = Field(description='Which verdicts count: "model <label>" or "engine <name>".')
    workflows: int = Field(description="Workflows that carried it out.")
    canaries: int = Field(description="Their canaries that were judged.")
    batches: int = Field(description="Judged batches in all: canaries and rollout batches.")
    passed: int = Field(description="Batches judged not worse.")
    failed: int = Field(description="Batches judged worse: each one rolled its workflow back.")
    median_relative_change: dict[str, float] = Field(
        description="Per judge metric (ttft, itl, e2e_latency, throughput, ...), the median over those "
        "batches of (changed median - baseline median) / baseline median."
    )
    last_at: datetime


class Optimization(BaseModel):
    """One proposed change of one engine's flags (or of the deployment, for SCALE_OUT)."""

    type: OptimizationType
    priority: Severity = Field(description="The highest severity among `addresses`, possibly lowered a rung.")
    description: str
    estimated_improvement: EstimatedImprovement
    config_changes: dict[str, Any] = Field(
        description='Real flag names without leading dashes, e.g. {"max_num_seqs": 128}.'
    )
    risks: list[str]
    id: str = Field(description="Stable identifier, <engine>.<name>.")
    engine: EngineName
    rank: int = Field(description="Order among equal priorities, from the optimization data.")
    cli_args: list[str] = Field(description='The same changes as arguments, e.g. ["--max-num-seqs", "128"].')
    current_values: dict[str, Any] = Field(
        description="Per changed flag, the value it replaces (from current_config or the engine default; "
        "null when unknown): what a rollback restores."
    )
    deployment_changes: dict[str, int] = Field(
        default_factory=dict, description='Changes outside the engine, e.g. {"replicas_delta": 1}.'
    )
    requires_restart: bool
    requires_new_weights: bool = Field(description="Needs a different checkpoint (e.g. an AWQ int4 model).")
    auto_applicable: bool = Field(
        description="A workflow may apply it after approval and canary; else advice."
    )
    addresses: list[Addressed]
    notes: list[str] = Field(default_factory=list, description="Assumptions behind the values.")
    observed: Observed | None = Field(
        None,
        description="Beside the `estimated_improvement` prior: what this optimization did in past "
        "workflows on comparable instances; null until one was judged.",
    )


class Skipped(BaseModel):
    """An optimization the bottlenecks called for but that is not proposed, and why."""

    id: str
    type: OptimizationType
    reason: SkipReason
    detail: str
    config_changes: dict[str, Any] = Field(
        default_factory=dict, description="What it would have set (conflicts and duplicates only)."
    )
    addresses: list[Addressed]


class AliasUse(BaseModel):
    """A current_config key that was read as one of the engine's real flags."""

    given: str
    flag: str
    cli: str
    note: str


class ConfigProblem(BaseModel):
    key: str
    value: Any
    reason: str


class NormalizedConfig(BaseModel):
    """current_config in the engine's real flag names."""

    values: dict[str, Any] = Field(description="Real flag name to value; null means the engine default.")
    aliases: list[AliasUse]
    unrecognized: dict[str, Any] = Field(
        description="Keys that are no flag or alias of this engine, kept as given."
    )
    invalid: list[ConfigProblem] = Field(description="Values that could not be read; they are ignored.")
    notes: list[str] = Field(default_factory=list)


class RecommendResponse(BaseModel):
    instance_id: str
    optimizations: list[Optimization] = Field(description="Sorted by priority, then rank.")
    recommendation_timestamp: datetime
    engine: EngineName
    assumes: str = Field(description="The engine version and defaults the values assume.")
    normalized_config: NormalizedConfig
    skipped: list[Skipped]
