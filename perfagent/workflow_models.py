"""Workflows as data: the spec's seven statuses, what a workflow waits for, its stages, steps and
audit events, and the request and response models of the /workflows endpoints.

The spec's documented fields come first in each response model; what perfagent adds follows.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from perfagent.canary import MANUAL, BaselineKind
from perfagent.effect import EffectReport
from perfagent.judge import Verdict as Statistics
from perfagent.models import EngineName, InstanceId
from perfagent.recommend_models import Addressed, Bottleneck, Optimization, Skipped

Actor = str  # who did something: a person's name as given, "perfagent", or "judge:<name>"
ActorName = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class WorkflowStatus(StrEnum):
    """The spec's statuses."""

    PENDING_APPROVAL = "PENDING_APPROVAL"
    APPROVED = "APPROVED"
    REJECTED = "REJECTED"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    ROLLED_BACK = "ROLLED_BACK"


ACTIVE = frozenset({WorkflowStatus.PENDING_APPROVAL, WorkflowStatus.APPROVED, WorkflowStatus.IN_PROGRESS})
TERMINAL = frozenset(
    {WorkflowStatus.COMPLETED, WorkflowStatus.FAILED, WorkflowStatus.REJECTED, WorkflowStatus.ROLLED_BACK}
)


class WaitingFor(StrEnum):
    """What a workflow waits for beside its status; null while it runs or once it has ended."""

    APPROVAL = "approval"  # PENDING_APPROVAL: POST .../approve or .../reject
    CONFIRM = "confirm"  # a dry_run step was handed to a person: POST .../confirm once it is applied
    CANARY_REVIEW = "canary_review"  # the judge left the canary to a person: POST .../resume with a verdict
    ATTENTION = "attention"  # something needs a person (see `reason`): confirm, resume or cancel


class WorkflowType(StrEnum):
    OPTIMIZATION = "optimization"  # carry a change out: approval, canary, rollout, validation
    ANALYSIS = "analysis"  # detect and recommend only, then COMPLETED


class StageName(StrEnum):
    ANALYSIS = "ANALYSIS"
    APPROVAL = "APPROVAL"
    CANARY = "CANARY"
    ROLLOUT = "ROLLOUT"
    VALIDATION = "VALIDATION"
    ROLLBACK = "ROLLBACK"  # only when a change is undone


class StageStatus(StrEnum):
    PENDING = "PENDING"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    SKIPPED = "SKIPPED"
    FAILED = "FAILED"


class StepKind(StrEnum):
    APPLY = "apply"
    ROLLBACK = "rollback"


class StepState(StrEnum):
    STARTED = "started"  # persisted before the executor runs
    DONE = "done"  # the executor's record (or a person's confirmation) is persisted


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"


# ---- persisted parts ---------------------------------------------------------------------------


class Stage(BaseModel):
    name: StageName
    status: StageStatus
    started_at: datetime | None = None
    completed_at: datetime | None = None
    progress: float = Field(0.0, ge=0, le=1)


class WorkflowOptimization(Optimization):
    """A recommended optimization, and whether this workflow carries it out."""

    selected: bool = Field(
        description="This workflow carries it out: the first auto-applicable one. Others are listed as advice."
    )


class PlannedChange(BaseModel):
    """The one change a workflow carries out, on every instance of the deployment group."""

    optimization_id: str
    settings: dict[str, Any] = Field(description="Real flag keys to new values.")
    cli_args: list[str]
    previous: dict[str, dict[str, Any]] = Field(
        description="Per instance, the values the change replaces (null: unknown or the engine default); "
        "what a rollback restores."
    )
    addresses: list[Addressed]


class CanaryDecision(BaseModel):
    verdict: Verdict
    reason: str | None = None
    decided_by: Actor
    decided_at: datetime


class JudgedWindow(BaseModel):
    since: datetime = Field(description="The batch's change plus the warm-up.")
    until: datetime
    baseline_since: datetime | None = Field(None, description="BEFORE: the baseline's own window.")
    baseline_until: datetime | None = None


class JudgedBatch(BaseModel):
    """One batch put to the judge (the canary is batch 0) and the evidence: the judge's statistics
    (per metric n, U, p, Cliff's delta, medians) and what the engines report about the change."""

    stage: StageName
    batch: int
    instances: list[str] = Field(description="The changed instances judged.")
    baseline: list[str] = Field(description="What they were compared with (empty: their own past).")
    baseline_kind: BaselineKind
    reason: str | None = None
    statistics: Statistics | None = Field(None, description="The statistical judge's verdict; null: none.")
    effect: list[EffectReport] = Field(default_factory=list, description="Per changed instance.")
    window: JudgedWindow | None = None


class BatchVerdict(JudgedBatch):
    verdict: Verdict
    decided_by: Actor
    decided_at: datetime
    failing_metrics: list[str] = Field(
        default_factory=list, description="Metrics on which the batch was worse (a failed verdict)."
    )


class InstanceValidation(BaseModel):
    instance_id: str
    scrapes: int = Field(description="Successful scrapes since the change, the data detection ran on.")
    still_firing: list[str] = Field(description="Rules the change addressed that still hold.")
    other_findings: list[str] = Field(description="Other rules that hold now.")


class Validation(BaseModel):
    outcome: Literal["resolved", "still_present", "no_data"]
    since: datetime
    at: datetime
    instances: list[InstanceValidation]


class Workflow(BaseModel):
    """A workflow as stored (one JSON document per row) and as the API shows it."""

    workflow_id: str
    status: WorkflowStatus
    instance_id: str
    current_stage: StageName | None
    stages: list[Stage]
    created_at: datetime
    updated_at: datetime
    optimizations: list[WorkflowOptimization]
    requires_approval: bool
    workflow_type: WorkflowType
    instance_type: EngineName
    waiting_for: WaitingFor | None = None
    reason: str | None = Field(None, description="Why it is in its status or waits, in words.")
    auto_approve: bool = False
    executor: str
    deployment_group: str | None = Field(description="The instances' `deployment_group` label; null: alone.")
    instances: list[str] = Field(
        description="The deployment group: the canary first, then the rollout order."
    )
    change: PlannedChange | None = None
    bottlenecks: list[Bottleneck] = Field(description="What the analysis found.")
    skipped: list[Skipped] = Field(default_factory=list, description="Optimizations left out, and why.")
    current_config: dict[str, Any] = Field(
        default_factory=dict, description="Known settings, real flag keys."
    )
    current_args: list[str] | None = None
    requested_by: Actor = "operator"
    approved_at: datetime | None = None
    approved_by: Actor | None = None
    approval_comment: str | None = None
    rejected_at: datetime | None = None
    rejected_by: Actor | None = None
    canary: CanaryDecision | None = None
    judge: str = Field(MANUAL, description="Who judges each batch: `statistical` or `manual` (a person).")
    model: str | None = Field(
        None, description="The instance's `model` label: which verdicts are comparable."
    )
    batches: list[list[str]] = Field(
        default_factory=list,
        description="The instances in the order they change, batch by batch: the canary, then the rollout.",
    )
    verdicts: list[BatchVerdict] = Field(
        default_factory=list, description="Every judged batch, with the judge's statistics."
    )
    review: JudgedBatch | None = Field(None, description="The batch waiting for a person (canary_review).")
    validation: Validation | None = None
    rollback_reason: str | None = Field(None, description="Why the change is being, or was, rolled back.")
    attention_step: str | None = Field(None, description="The step a person is asked about.")
    retry_step: str | None = Field(None, description="A step a person asked to run again.")
    version: int = 0

    def stage(self, name: StageName) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    @property
    def ended(self) -> bool:
        """Terminal and waiting for nobody (a FAILED rollback waits for a person)."""
        return self.status in TERMINAL and self.waiting_for is None


class Step(BaseModel):
    """One executor step: the idempotency record of the workflow engine."""

    key: str = Field(description="<workflow>/<stage>/<n>/<instance>, stable across restarts.")
    workflow_id: str
    stage: StageName
    n: int
    instance_id: str
    kind: StepKind
    executor: str
    state: StepState
    settings: dict[str, Any]
    previous: dict[str, Any]
    current_args: list[str] | None = None
    attempts: int = 1
    started_at: datetime
    done_at: datetime | None = None
    outcome: str | None = Field(None, description="applied, waiting or failed (the executor's).")
    record: dict[str, Any] | None = Field(None, description="What ran and what came back.")
    confirmed_at: datetime | None = None
    confirmed_by: Actor | None = None

    @property
    def in_effect(self) -> bool:
        """The change is known to be made: applied by the executor, or confirmed by a person."""
        return self.state is StepState.DONE and (self.outcome == "applied" or self.confirmed_at is not None)

    @property
    def maybe_in_effect(self) -> bool:
        """The change may have been made: anything but a step the executor reports as failed."""
        return self.state is StepState.STARTED or self.outcome != "failed" or self.confirmed_at is not None


class Event(BaseModel):
    """One line of the audit trail: who did what, when, why, and from which status and stage."""

    seq: int
    at: datetime
    actor: Actor
    action: str
    from_status: WorkflowStatus | None
    to_status: WorkflowStatus
    from_stage: StageName | None
    to_stage: StageName | None
    waiting_for: WaitingFor | None
    reason: str | None
    data: dict[str, Any]


# ---- requests ----------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateWorkflowRequest(_Body):
    instance_id: InstanceId
    instance_type: EngineName | None = Field(None, description="Must match the instance's engine when given.")
    workflow_type: WorkflowType = WorkflowType.OPTIMIZATION
    auto_approve: bool = Field(False, description="Skip the APPROVAL stage.")
    executor: str | None = Field(None, description="How steps are carried out; default from settings.")
    current_config: dict[str, Any] | None = Field(
        None,
        description="The engine's current settings (real flags or the generic aliases of "
        "/optimization/recommend); the values the change starts from and rollback restores.",
    )
    current_args: list[str] | None = Field(
        None,
        max_length=1000,
        description="The container's complete current args; dry_run then patches the whole list exactly.",
    )
    requested_by: ActorName | None = None
    optimization_id: str | None = Field(
        None,
        max_length=200,
        description="Carry out this one of the recommended optimizations (its `id`) instead of the first "
        "auto-applicable one; it must be auto-applicable and change engine flags only.",
    )
    judge: Literal["statistical", "manual"] | None = Field(
        None,
        description="Who judges the canary and each rollout batch. Default: `statistical` when the executor "
        "changes engines itself (sim, command, http), `manual` (a person) for dry_run.",
    )


class ApproveRequest(_Body):
    approved_by: ActorName | None = None
    comment: str | None = Field(None, max_length=2000)


class RejectRequest(_Body):
    reason: str | None = Field(None, max_length=2000)
    rejected_by: ActorName | None = None


class ConfirmRequest(_Body):
    confirmed_by: ActorName | None = None
    comment: str | None = Field(None, max_length=2000)


class ResumeRequest(_Body):
    verdict: Verdict | None = Field(
        None, description="At canary_review: pass (default) rolls out, fail rolls back."
    )
    reason: str | None = Field(None, max_length=2000)
    resumed_by: ActorName | None = None


class CancelRequest(_Body):
    reason: str | None = Field(None, max_length=2000)
    cancelled_by: ActorName | None = None


class WorkflowsQuery(_Body):
    status: WorkflowStatus | None = None
    instance_id: str | None = None
    limit: int = Field(50, ge=1, le=1000)


# ---- responses ---------------------------------------------------------------------------------


class WorkflowSummary(BaseModel):
    workflow_id: str
    status: WorkflowStatus
    instance_id: str
    created_at: datetime
    workflow_type: WorkflowType
    current_stage: StageName | None
    waiting_for: WaitingFor | None
    updated_at: datetime
    deployment_group: str | None


class WorkflowDetail(Workflow):
    progress: float = Field(ge=0, le=1)
    events: list[Event]
    steps: list[Step]


class ApproveResponse(BaseModel):
    workflow_id: str
    status: WorkflowStatus
    approved_at: datetime
    approved_by: Actor
    comment: str | None = None


class RejectResponse(BaseModel):
    workflow_id: str
    status: WorkflowStatus
    rejected_at: datetime
    rejected_by: Actor
    reason: str | None
