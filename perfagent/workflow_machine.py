"""The workflow state machine, as pure functions: which action is allowed in which state, what it
changes, and the audit event that says so. Nothing here does I/O; `workflow_store` runs each
transition in one DuckDB transaction together with its audit event, and `workflow_steps` says what
the engine should do next.

Statuses are the spec's seven. Stages run ANALYSIS → APPROVAL → CANARY → ROLLOUT → VALIDATION, with
ROLLBACK appended when a change is undone. What a workflow waits for is `waiting_for`: `approval`
(PENDING_APPROVAL), and, while IN_PROGRESS, `confirm`, `canary_review` or `attention`. A rollback
step that fails leaves the workflow FAILED with `waiting_for: attention`: a person restores the
instance and confirms, or resumes to try the rollback again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from perfagent.canary import CanaryCase, Judgement, JudgeOutcome
from perfagent.engine_args import flag_args
from perfagent.errors import ConflictError
from perfagent.executors.base import StepOutcome, StepRecord
from perfagent.models import Instance
from perfagent.recommend_models import Observed, Optimization
from perfagent.workflow_analysis import GROUP_LABEL, Analysis, carried_out, why_not_carried_out
from perfagent.workflow_models import (
    Actor,
    BatchVerdict,
    CanaryDecision,
    JudgedBatch,
    PlannedChange,
    Stage,
    StageName,
    StageStatus,
    Step,
    StepKind,
    StepState,
    Validation,
    Verdict,
    WaitingFor,
    Workflow,
    WorkflowOptimization,
    WorkflowStatus,
    WorkflowType,
)
from perfagent.workflow_steps import batch_plan, batches, rollback_targets

SYSTEM: Actor = "perfagent"


@dataclass(frozen=True, slots=True)
class Transition:
    """A workflow's new state, the audit event that explains it, and the step rows it writes."""

    workflow: Workflow
    action: str
    actor: Actor
    reason: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    steps: tuple[Step, ...] = ()
    verdict: BatchVerdict | None = None  # a batch decided by this transition: also a workflow_verdicts row


def conflict(wf: Workflow, message: str) -> ConflictError:
    return ConflictError(
        message,
        {"workflow_id": wf.workflow_id, "status": wf.status.value, "waiting_for": _value(wf.waiting_for)},
    )


def _value(waiting: WaitingFor | None) -> str | None:
    return None if waiting is None else waiting.value


def _next(wf: Workflow, at: datetime, **update: Any) -> Workflow:
    """A copy of `wf` one version on; stages are copied so the original stays as it was."""
    return wf.model_copy(deep=True, update={"updated_at": at, "version": wf.version + 1, **update})


def _set_stage(wf: Workflow, name: StageName, status: StageStatus, at: datetime) -> None:
    stage = wf.stage(name)
    if stage is None:
        stage = Stage(name=name, status=StageStatus.PENDING)
        wf.stages.append(stage)
    if status is StageStatus.IN_PROGRESS:
        stage.started_at = stage.started_at or at
    elif status is not StageStatus.PENDING:
        stage.completed_at = at
    stage.status = status


def _skip_pending(wf: Workflow, at: datetime) -> None:
    for stage in wf.stages:
        if stage.status is StageStatus.PENDING:
            _set_stage(wf, stage.name, StageStatus.SKIPPED, at)


def initial_stages(at: datetime, *, analysis_only: bool, skip_approval: bool) -> list[Stage]:
    stages = [Stage(name=StageName.ANALYSIS, status=StageStatus.COMPLETED, started_at=at, completed_at=at)]
    if analysis_only:
        return stages
    approval = (
        Stage(name=StageName.APPROVAL, status=StageStatus.SKIPPED, completed_at=at)
        if skip_approval
        else Stage(name=StageName.APPROVAL, status=StageStatus.IN_PROGRESS, started_at=at)
    )
    rest = [
        Stage(name=n, status=StageStatus.PENDING)
        for n in (StageName.CANARY, StageName.ROLLOUT, StageName.VALIDATION)
    ]
    return [*stages, approval, *rest]


def chosen_optimization(
    optimizations: Sequence[Optimization], optimization_id: str | None
) -> Optimization | None:
    """The first optimization that can be carried out, or the one asked for (None: not among them)."""
    for o in optimizations:
        if carried_out(o) and (optimization_id is None or o.id == optimization_id):
            return o
    return None


def _nothing_to_do(instance_id: str, analysis: Analysis, advice: Sequence[Optimization]) -> str:
    if not analysis.bottlenecks:
        lacking = f" ({analysis.insufficient} rule(s) lacked data)" if analysis.insufficient else ""
        return f"no bottleneck found on {instance_id}{lacking}: nothing to do"
    if not advice:
        return "the findings call for no change of this engine's flags (see skipped): nothing to do"
    return "no optimization can be carried out automatically: " + "; ".join(
        f"{o.id} {why_not_carried_out(o)}" for o in advice
    )


def open_workflow(
    *,
    workflow_id: str,
    instance: Instance,
    members: Sequence[Instance],
    workflow_type: WorkflowType,
    auto_approve: bool,
    executor: str,
    analysis: Analysis,
    known_configs: Mapping[str, Mapping[str, Any]],
    current_args: list[str] | None,
    requested_by: Actor,
    at: datetime,
    judge: str,
    optimization_id: str | None = None,
    observed: Mapping[str, Observed] | None = None,
) -> Transition:
    """A new workflow after its analysis: PENDING_APPROVAL (or APPROVED with `auto_approve`) when
    there is a change to carry out; COMPLETED with the reason otherwise, or for an analysis workflow."""
    found = analysis.plan
    chosen = chosen_optimization(found.optimizations, optimization_id)
    if workflow_type is WorkflowType.ANALYSIS:
        chosen = None
    seen = observed or {}
    optimizations = [
        WorkflowOptimization.model_validate(
            {**o.model_dump(), "selected": o is chosen, "observed": seen.get(o.id)}
        )
        for o in found.optimizations
    ]
    change = None
    if chosen is not None:
        previous = {
            m.id: {
                k: known_configs.get(m.id, {}).get(k, chosen.current_values.get(k))
                for k in chosen.config_changes
            }
            for m in members
        }
        change = PlannedChange(
            optimization_id=chosen.id,
            settings=dict(chosen.config_changes),
            cli_args=flag_args(instance.engine.value, chosen.config_changes),
            previous=previous,
            addresses=chosen.addresses,
        )
    if workflow_type is WorkflowType.ANALYSIS:
        status, reason = (
            WorkflowStatus.COMPLETED,
            (f"analysis only: {len(optimizations)} optimization(s) recommended, none carried out"),
        )
    elif change is None:
        status, reason = WorkflowStatus.COMPLETED, _nothing_to_do(instance.id, analysis, found.optimizations)
    elif auto_approve:
        status, reason = WorkflowStatus.APPROVED, "auto_approve: the APPROVAL stage is skipped"
    else:
        status, reason = WorkflowStatus.PENDING_APPROVAL, f"approve to carry out {change.optimization_id}"
    wf_instances = [m.id for m in members]
    stages = initial_stages(
        at,
        analysis_only=workflow_type is WorkflowType.ANALYSIS,
        skip_approval=status is not WorkflowStatus.PENDING_APPROVAL,
    )
    wf = Workflow(
        workflow_id=workflow_id,
        status=status,
        instance_id=instance.id,
        current_stage=StageName.APPROVAL if status is WorkflowStatus.PENDING_APPROVAL else None,
        stages=stages,
        created_at=at,
        updated_at=at,
        optimizations=optimizations,
        requires_approval=status is WorkflowStatus.PENDING_APPROVAL,
        workflow_type=workflow_type,
        instance_type=instance.engine,
        waiting_for=WaitingFor.APPROVAL if status is WorkflowStatus.PENDING_APPROVAL else None,
        reason=reason,
        auto_approve=auto_approve,
        executor=executor,
        deployment_group=instance.labels.get(GROUP_LABEL) or None,
        instances=wf_instances,
        change=change,
        bottlenecks=analysis.bottlenecks,
        skipped=list(found.skipped),
        current_config=dict(found.normalized_config.values),
        current_args=current_args,
        requested_by=requested_by,
        judge=judge,
        model=instance.labels.get("model") or None,
        batches=batch_plan(wf_instances) if change is not None else [],
    )
    if status is WorkflowStatus.COMPLETED:
        _skip_pending(wf, at)
    data = {
        "bottlenecks": [f"{b.rule or b.type.value} ({b.severity.value})" for b in analysis.bottlenecks],
        "optimization": None if change is None else change.optimization_id,
        "settings": None if change is None else change.settings,
        "executor": executor,
        "judge": judge,
        "instances": wf.instances,
        "batches": wf.batches,
    }
    return Transition(wf, "created", requested_by, reason, data)


# ---- transitions --------------------------------------------------------------------------------


def approve(wf: Workflow, actor: Actor, comment: str | None, at: datetime) -> Transition:
    if wf.status is not WorkflowStatus.PENDING_APPROVAL:
        raise conflict(
            wf, f"workflow {wf.workflow_id} is {wf.status.value}, not PENDING_APPROVAL: cannot approve"
        )
    new = _next(
        wf,
        at,
        status=WorkflowStatus.APPROVED,
        waiting_for=None,
        reason=None,
        approved_at=at,
        approved_by=actor,
        approval_comment=comment,
    )
    _set_stage(new, StageName.APPROVAL, StageStatus.COMPLETED, at)
    return Transition(new, "approved", actor, comment)


def reject(wf: Workflow, actor: Actor, reason: str | None, at: datetime) -> Transition:
    if wf.status is not WorkflowStatus.PENDING_APPROVAL:
        raise conflict(
            wf, f"workflow {wf.workflow_id} is {wf.status.value}, not PENDING_APPROVAL: cannot reject"
        )
    new = _next(
        wf,
        at,
        status=WorkflowStatus.REJECTED,
        waiting_for=None,
        current_stage=None,
        reason=reason,
        rejected_at=at,
        rejected_by=actor,
    )
    _set_stage(new, StageName.APPROVAL, StageStatus.FAILED, at)
    _skip_pending(new, at)
    return Transition(new, "rejected", actor, reason)


def start(wf: Workflow, at: datetime) -> Transition:
    if wf.status is not WorkflowStatus.APPROVED:
        raise conflict(wf, "only an APPROVED workflow starts")
    new = _next(wf, at, status=WorkflowStatus.IN_PROGRESS, current_stage=StageName.CANARY)
    _set_stage(new, StageName.CANARY, StageStatus.IN_PROGRESS, at)
    return Transition(new, "started", SYSTEM, f"canary on {wf.instances[0]}")


def _at_step(wf: Workflow, step: Step) -> bool:
    return (
        wf.status is WorkflowStatus.IN_PROGRESS and wf.waiting_for is None and wf.current_stage is step.stage
    )


def begin_step(wf: Workflow, step: Step, at: datetime, *, rerun_reason: str | None = None) -> Transition:
    """Persist "started" before the executor runs, so a crash in between is seen after a restart."""
    if not _at_step(wf, step):
        raise conflict(wf, f"workflow {wf.workflow_id} moved on before step {step.key} began")
    row = step.model_copy(
        update={
            "state": StepState.STARTED,
            "attempts": step.attempts + 1,
            "started_at": at,
            "done_at": None,
            "outcome": None,
            "record": None,
            "confirmed_at": None,
            "confirmed_by": None,
        }
    )
    new = _next(wf, at, retry_step=None if wf.retry_step == step.key else wf.retry_step)
    data = {
        "step": step.key,
        "instance_id": step.instance_id,
        "executor": step.executor,
        "attempt": row.attempts,
    }
    return Transition(
        new, "step_rerun" if rerun_reason else "step_started", SYSTEM, rerun_reason, data, (row,)
    )


def finish_step(
    wf: Workflow, steps: Sequence[Step], key: str, record: StepRecord, at: datetime
) -> Transition:
    """Persist the executor's record, and what it means for the workflow, in one transaction."""
    step = next(s for s in steps if s.key == key)
    row = step.model_copy(
        update={
            "state": StepState.DONE,
            "done_at": at,
            "outcome": record.outcome.value,
            "record": record.as_dict(),
        }
    )
    data = {"step": key, "instance_id": step.instance_id, "record": record.as_dict()}
    if not _at_step(wf, step):
        # Cancelled (or otherwise moved on) while the executor ran: keep the record, change nothing;
        # a rollback counts this step among those to undo.
        return Transition(_next(wf, at), "step_finished_late", SYSTEM, record.message or None, data, (row,))
    if record.outcome is StepOutcome.APPLIED:
        return Transition(
            _next(wf, at, reason=None), "step_applied", SYSTEM, record.message or None, data, (row,)
        )
    if record.outcome is StepOutcome.WAITING:
        new = _next(wf, at, waiting_for=WaitingFor.CONFIRM, reason=record.message or f"confirm step {key}")
        return Transition(new, "step_waiting", SYSTEM, new.reason, data, (row,))
    reason = f"step {key} failed: {record.message or 'no message'}"
    if step.kind is StepKind.ROLLBACK:
        new = _next(
            wf,
            at,
            status=WorkflowStatus.FAILED,
            waiting_for=WaitingFor.ATTENTION,
            attention_step=key,
            reason=f"rollback failed: {reason}; {step.instance_id} may still run the new settings: confirm "
            "once it is restored by hand, or resume to try again",
        )
        _set_stage(new, StageName.ROLLBACK, StageStatus.FAILED, at)
        return Transition(new, "rollback_failed", SYSTEM, new.reason, data, (row,))
    others = [s for s in rollback_targets(wf, steps) if s.key != key]
    if not others:
        new = _next(wf, at, status=WorkflowStatus.FAILED, current_stage=None, reason=reason)
        _set_stage(new, step.stage, StageStatus.FAILED, at)
        _skip_pending(new, at)
        return Transition(new, "step_failed", SYSTEM, reason, data, (row,))
    new = _start_rollback(wf, at, reason, StageStatus.FAILED)
    return Transition(new, "step_failed", SYSTEM, reason, data, (row,))


def _start_rollback(wf: Workflow, at: datetime, reason: str, interrupted: StageStatus) -> Workflow:
    new = _next(
        wf,
        at,
        current_stage=StageName.ROLLBACK,
        waiting_for=None,
        attention_step=None,
        retry_step=None,
        reason=reason,
        rollback_reason=reason,
    )
    if wf.current_stage is not None:
        _set_stage(new, wf.current_stage, interrupted, at)
    _skip_pending(new, at)
    _set_stage(new, StageName.ROLLBACK, StageStatus.IN_PROGRESS, at)
    return new


def _pending_confirmation(wf: Workflow, steps: Sequence[Step]) -> Step | None:
    if wf.waiting_for is WaitingFor.ATTENTION:
        return next((s for s in steps if s.key == wf.attention_step), None)
    waiting = [
        s
        for s in steps
        if s.stage is wf.current_stage
        and s.state is StepState.DONE
        and not s.in_effect
        and s.outcome == "waiting"
    ]
    return waiting[-1] if waiting else None


def confirm(
    wf: Workflow, steps: Sequence[Step], actor: Actor, comment: str | None, at: datetime
) -> Transition:
    """A person says the pending step is in effect (a dry_run change applied, or a step in doubt done)."""
    if wf.waiting_for not in (WaitingFor.CONFIRM, WaitingFor.ATTENTION):
        raise conflict(wf, f"workflow {wf.workflow_id} is not waiting for a confirmation")
    step = _pending_confirmation(wf, steps)
    if step is None:
        raise conflict(wf, f"workflow {wf.workflow_id} has no step to confirm: resume or cancel it")
    row = step.model_copy(
        update={
            "state": StepState.DONE,
            "done_at": step.done_at or at,
            "confirmed_at": at,
            "confirmed_by": actor,
        }
    )
    new = _reopened(_next(wf, at, waiting_for=None, reason=None, attention_step=None), at)
    data = {"step": step.key, "instance_id": step.instance_id}
    return Transition(new, "confirmed", actor, comment, data, (row,))


def _reopened(wf: Workflow, at: datetime) -> Workflow:
    """A FAILED rollback a person took on (confirmed or resumed) is in progress again."""
    if wf.status is WorkflowStatus.FAILED and wf.current_stage is StageName.ROLLBACK:
        wf.status = WorkflowStatus.IN_PROGRESS
        stage = wf.stage(StageName.ROLLBACK)
        if stage is not None:
            stage.status, stage.completed_at = StageStatus.IN_PROGRESS, None
    return wf


def _batch_name(stage: StageName, batch: int) -> str:
    return "canary" if stage is StageName.CANARY else f"rollout batch {batch}"


def _decide(
    wf: Workflow, verdict: BatchVerdict, at: datetime, action: str, data: dict[str, Any]
) -> Transition:
    """Record a batch's verdict: a pass goes on (the canary's to ROLLOUT), a fail rolls back."""
    what = _batch_name(verdict.stage, verdict.batch)
    update: dict[str, Any] = {"verdicts": [*wf.verdicts, verdict], "review": None, "waiting_for": None}
    if verdict.stage is StageName.CANARY:
        update["canary"] = CanaryDecision(
            verdict=verdict.verdict,
            reason=verdict.reason,
            decided_by=verdict.decided_by,
            decided_at=verdict.decided_at,
        )
    data = {**data, "verdict": verdict.verdict.value, "batch": verdict.batch, "instances": verdict.instances}
    if verdict.verdict is Verdict.PASS:
        new = _next(wf, at, reason=None, **update)
        if verdict.stage is StageName.CANARY:
            new.current_stage = StageName.ROLLOUT
            _set_stage(new, StageName.CANARY, StageStatus.COMPLETED, at)
            _set_stage(new, StageName.ROLLOUT, StageStatus.IN_PROGRESS, at)
    else:
        reason = f"{what} failed: {verdict.reason or 'no reason given'}"
        new = _start_rollback(wf.model_copy(update=update), at, reason, StageStatus.FAILED)
    return Transition(new, action, verdict.decided_by, verdict.reason, data, verdict=verdict)


def _judged_batch(case: CanaryCase, judgement: Judgement) -> JudgedBatch:
    evidence = judgement.data
    return JudgedBatch.model_validate(
        {
            "stage": case.stage,
            "batch": case.batch,
            "instances": list(case.changed),
            "baseline": list(case.baseline),
            "baseline_kind": case.baseline_kind,
            "reason": judgement.reason,
            "statistics": evidence.get("statistics"),
            "effect": evidence.get("effect", []),
            "window": evidence.get("window"),
        }
    )


def judged(wf: Workflow, case: CanaryCase, judgement: Judgement, judge: str, at: datetime) -> Transition:
    """The judge's answer about a batch (PENDING answers change nothing and are not recorded)."""
    stage = StageName(case.stage)
    if (
        wf.status is not WorkflowStatus.IN_PROGRESS
        or wf.current_stage is not stage
        or wf.waiting_for
        or any(v.stage is stage and v.batch == case.batch for v in wf.verdicts)
    ):
        raise conflict(wf, f"the {_batch_name(stage, case.batch)} is not up for judgement")
    batch = _judged_batch(case, judgement)
    data = {"judge": judge, "outcome": judgement.outcome.value, **judgement.data}
    if judgement.outcome is JudgeOutcome.REVIEW:
        new = _next(wf, at, waiting_for=WaitingFor.CANARY_REVIEW, reason=judgement.reason, review=batch)
        return Transition(new, "canary_review", f"judge:{judge}", judgement.reason, data)
    passed = judgement.outcome is JudgeOutcome.PASS
    failing = [] if passed or batch.statistics is None else list(batch.statistics.regressions)
    verdict = BatchVerdict(
        **batch.model_dump(),
        verdict=Verdict.PASS if passed else Verdict.FAIL,
        decided_by=f"judge:{judge}",
        decided_at=at,
        failing_metrics=failing,
    )
    return _decide(wf, verdict, at, "judged", data)


def resume(
    wf: Workflow, verdict: Verdict | None, reason: str | None, actor: Actor, at: datetime
) -> Transition:
    """canary_review: a person's verdict on the batch in review (pass by default). attention: go on,
    running the step in question again."""
    if wf.waiting_for is WaitingFor.CANARY_REVIEW:
        review = wf.review or _legacy_review(wf)
        decision = BatchVerdict(
            **review.model_dump(exclude={"reason"}),
            reason=reason,
            verdict=verdict or Verdict.PASS,
            decided_by=actor,
            decided_at=at,
        )
        return _decide(wf, decision, at, "resumed", {})
    if wf.waiting_for is WaitingFor.ATTENTION:
        if verdict is not None:
            raise conflict(wf, "a verdict is only taken at canary_review")
        new = _reopened(
            _next(wf, at, waiting_for=None, reason=None, retry_step=wf.attention_step, attention_step=None),
            at,
        )
        return Transition(new, "resumed", actor, reason, {"retry_step": wf.attention_step})
    raise conflict(wf, f"workflow {wf.workflow_id} is not waiting for canary_review or attention")


def _legacy_review(wf: Workflow) -> JudgedBatch:
    """A workflow stored at canary_review before reviews were recorded: its canary was in review."""
    plan = batches(wf)
    return JudgedBatch(
        stage=StageName.CANARY,
        batch=0,
        instances=plan[0] if plan else [wf.instance_id],
        baseline=[i for b in plan[1:] for i in b],
        baseline_kind="unchanged" if len(plan) > 1 else "before",
    )


def stage_done(wf: Workflow, stage: StageName, at: datetime) -> Transition:
    if wf.current_stage is not stage or wf.status is not WorkflowStatus.IN_PROGRESS:
        raise conflict(wf, f"workflow {wf.workflow_id} is not in {stage.value}")
    if stage is StageName.ROLLOUT:
        new = _next(wf, at, current_stage=StageName.VALIDATION)
        _set_stage(new, StageName.ROLLOUT, StageStatus.COMPLETED, at)
        _set_stage(new, StageName.VALIDATION, StageStatus.IN_PROGRESS, at)
        return Transition(new, "rollout_completed", SYSTEM, f"{len(wf.instances)} instance(s) changed")
    new = _next(
        wf,
        at,
        status=WorkflowStatus.ROLLED_BACK,
        current_stage=None,
        waiting_for=None,
        reason=wf.rollback_reason,
    )
    _set_stage(new, StageName.ROLLBACK, StageStatus.COMPLETED, at)
    return Transition(new, "rolled_back", SYSTEM, wf.rollback_reason)


def validated(wf: Workflow, validation: Validation, at: datetime) -> Transition:
    if wf.current_stage is not StageName.VALIDATION or wf.status is not WorkflowStatus.IN_PROGRESS:
        raise conflict(wf, f"workflow {wf.workflow_id} is not in VALIDATION")
    reason = {
        "resolved": "the addressed findings are gone",
        "still_present": "some addressed findings still hold: "
        + "; ".join(
            f"{i.instance_id}: {', '.join(i.still_firing)}" for i in validation.instances if i.still_firing
        ),
        "no_data": "no scrape since the change on "
        + ", ".join(i.instance_id for i in validation.instances if not i.scrapes)
        + ": the findings could not be checked",
    }[validation.outcome]
    new = _next(
        wf, at, status=WorkflowStatus.COMPLETED, current_stage=None, validation=validation, reason=reason
    )
    _set_stage(new, StageName.VALIDATION, StageStatus.COMPLETED, at)
    return Transition(new, "validated", SYSTEM, reason, validation.model_dump(mode="json"))


def cancel(wf: Workflow, steps: Sequence[Step], actor: Actor, reason: str | None, at: datetime) -> Transition:
    """Before any change: REJECTED. After one may have been made: roll back, then ROLLED_BACK."""
    if wf.ended:
        raise conflict(wf, f"workflow {wf.workflow_id} has ended ({wf.status.value})")
    if wf.current_stage is StageName.ROLLBACK:
        raise conflict(wf, f"workflow {wf.workflow_id} is already rolling back")
    why = f"cancelled by {actor}" + (f": {reason}" if reason else "")
    if not rollback_targets(wf, steps):
        new = _next(
            wf,
            at,
            status=WorkflowStatus.REJECTED,
            current_stage=None,
            waiting_for=None,
            attention_step=None,
            reason=why,
            rejected_at=at,
            rejected_by=actor,
        )
        if wf.current_stage is not None:
            _set_stage(new, wf.current_stage, StageStatus.FAILED, at)
        _skip_pending(new, at)
        return Transition(new, "cancelled", actor, why)
    return Transition(_start_rollback(wf, at, why, StageStatus.FAILED), "cancelled", actor, why)


def needs_attention(wf: Workflow, reason: str, step: str | None, at: datetime) -> Transition:
    if wf.status not in (WorkflowStatus.IN_PROGRESS, WorkflowStatus.APPROVED):
        raise conflict(wf, f"workflow {wf.workflow_id} is {wf.status.value}")
    new = _next(wf, at, waiting_for=WaitingFor.ATTENTION, reason=reason, attention_step=step)
    return Transition(new, "attention", SYSTEM, reason, {"step": step} if step else {})
