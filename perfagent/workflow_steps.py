"""The steps of a workflow's stages, and what the workflow engine should do next, decided from the
persisted workflow and its steps alone (nothing in memory survives a crash, and nothing needs to).

The deployment group changes in batches (`batch_plan`): the canary alone (CANARY), then ROLLOUT
batches that each double the number of changed instances (1, 1, 2, 4, ...). Each batch is one apply
step per instance, then a question to the judge about the batch; the next batch starts only after a
pass. ROLLBACK is one step per instance whose change may be in effect, last changed first. A step's
key, `<workflow>/<stage>/<n>/<instance>`, is stable across restarts: the executors' idempotency key.

What a batch is compared with (`judge_case`): the group's instances not changed yet, over the same
window (a concurrent comparison: load and time of day are the same on both sides). The last batch
has none left, nor has a group of one: it is compared with its own history just before the change.
Not with the instances changed before it: they have run the new settings for a while, and a batch
that has just restarted differs from them by its warm-up alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from perfagent.canary import BaselineKind, CanaryCase
from perfagent.engine_args import args_with
from perfagent.workflow_models import (
    Stage,
    StageName,
    StageStatus,
    Step,
    StepKind,
    StepState,
    Workflow,
    WorkflowStatus,
)

STEP_STAGES = (StageName.CANARY, StageName.ROLLOUT, StageName.ROLLBACK)
_DONE_STAGE = frozenset({StageStatus.COMPLETED, StageStatus.SKIPPED, StageStatus.FAILED})


def step_key(workflow_id: str, stage: StageName, n: int, instance_id: str) -> str:
    return f"{workflow_id}/{stage.value}/{n}/{instance_id}"


def _planned(wf: Workflow, stage: StageName, n: int, kind: StepKind, at: datetime) -> Step:
    assert wf.change is not None
    instance_id = wf.instances[n]
    previous = {k: wf.change.previous.get(instance_id, {}).get(k) for k in wf.change.settings}
    if kind is StepKind.APPLY:
        settings, before, args = dict(wf.change.settings), previous, wf.current_args
    else:
        settings, before = previous, dict(wf.change.settings)
        args = None if wf.current_args is None else args_with(wf.instance_type.value, wf.current_args, before)
    return Step(
        key=step_key(wf.workflow_id, stage, n, instance_id),
        workflow_id=wf.workflow_id,
        stage=stage,
        n=n,
        instance_id=instance_id,
        kind=kind,
        executor=wf.executor,
        state=StepState.STARTED,
        settings=settings,
        previous=before,
        current_args=args,
        attempts=0,
        started_at=at,
    )


def rollback_targets(wf: Workflow, steps: Sequence[Step]) -> list[Step]:
    """Apply steps whose change may be in effect, last first: what a rollback undoes."""
    applied = [s for s in steps if s.kind is StepKind.APPLY and s.maybe_in_effect]
    return sorted(applied, key=lambda s: s.n, reverse=True)


def batch_plan(instances: Sequence[str]) -> list[list[str]]:
    """The canary alone, then batches that double the changed count: sizes 1, 1, 2, 4, ..."""
    if not instances:
        return []
    plan, start = [[instances[0]]], 1
    while start < len(instances):
        plan.append(list(instances[start : start + start]))
        start += start
    return plan


def batches(wf: Workflow) -> list[list[str]]:
    """The workflow's batches as persisted when it was created (a plan worked out from its instances
    for a workflow stored before batches were)."""
    return wf.batches or batch_plan(wf.instances)


def decided(wf: Workflow, stage: StageName, batch: int) -> bool:
    return any(v.stage is stage and v.batch == batch for v in wf.verdicts)


def judge_case(wf: Workflow, action: Judge) -> CanaryCase:
    """The question put to the judge about one batch (see the module docstring for the baseline)."""
    assert wf.change is not None
    plan = batches(wf)
    changed = plan[action.batch]
    later = [i for b in plan[action.batch + 1 :] for i in b]
    kind = BaselineKind.UNCHANGED if later else BaselineKind.BEFORE
    return CanaryCase(
        workflow_id=wf.workflow_id,
        engine=wf.instance_type,
        changed=tuple(changed),
        baseline=tuple(later),
        baseline_kind=kind,
        settings=dict(wf.change.settings),
        changed_at=action.changed_at,
        started_at=action.started_at,
        addresses=tuple(wf.change.addresses),
        stage=action.stage.value,
        batch=action.batch,
    )


def planned_steps(wf: Workflow, steps: Sequence[Step], stage: StageName, at: datetime) -> list[Step]:
    """The steps of a stage, in order, as they would be started now."""
    if wf.change is None:
        return []
    if stage is StageName.CANARY:
        return [_planned(wf, stage, 0, StepKind.APPLY, at)]
    if stage is StageName.ROLLOUT:
        return [_planned(wf, stage, n, StepKind.APPLY, at) for n in range(1, len(wf.instances))]
    if stage is StageName.ROLLBACK:
        return [_planned(wf, stage, s.n, StepKind.ROLLBACK, at) for s in rollback_targets(wf, steps)]
    return []


def effective_at(step: Step) -> datetime | None:
    if not step.in_effect:
        return None
    return step.confirmed_at or step.done_at


# ---- what the engine does next ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    pass


@dataclass(frozen=True, slots=True)
class RunStep:
    step: Step
    rerun: bool = False  # the step has a row already: run again (after a restart, or a person's resume)


@dataclass(frozen=True, slots=True)
class InDoubt:
    """A step persisted as started but never as done: the agent stopped while it ran."""

    step: Step


@dataclass(frozen=True, slots=True)
class Judge:
    """Every step of a batch is in effect: ask the judge about it."""

    stage: StageName
    batch: int
    changed_at: datetime  # when the last of its steps came into effect
    started_at: datetime  # when the first of its steps began


@dataclass(frozen=True, slots=True)
class StageDone:
    stage: StageName  # ROLLOUT → VALIDATION, ROLLBACK → ROLLED_BACK


@dataclass(frozen=True, slots=True)
class Validate:
    since: datetime


@dataclass(frozen=True, slots=True)
class WaitUntil:
    at: datetime


@dataclass(frozen=True, slots=True)
class Idle:
    """Nothing to do: ended, or waiting for a person."""


NextAction = Start | RunStep | InDoubt | Judge | StageDone | Validate | WaitUntil | Idle


def next_action(wf: Workflow, steps: Sequence[Step], now: datetime, validation_delay: float) -> NextAction:
    """What the engine should do for `wf` now, from its persisted state alone."""
    if wf.status is WorkflowStatus.APPROVED:
        return Start()
    if wf.status is not WorkflowStatus.IN_PROGRESS or wf.waiting_for is not None or wf.current_stage is None:
        return Idle()
    stage = wf.current_stage
    by_key = {s.key: s for s in steps}
    if stage is StageName.ROLLBACK:
        for planned in planned_steps(wf, steps, stage, now):
            if (todo := _step_todo(wf, by_key.get(planned.key), planned)) is not None:
                return todo
        return StageDone(stage)
    if stage in (StageName.CANARY, StageName.ROLLOUT):
        plan = batches(wf)
        numbered = range(1, len(plan)) if stage is StageName.ROLLOUT else range(1)
        for batch in numbered:
            if decided(wf, stage, batch):
                continue
            rows: list[Step] = []
            for instance_id in plan[batch]:
                planned = _planned(wf, stage, wf.instances.index(instance_id), StepKind.APPLY, now)
                row = by_key.get(planned.key)
                if (todo := _step_todo(wf, row, planned)) is not None:
                    return todo
                assert row is not None
                rows.append(row)
            changed_at = max(effective_at(r) or now for r in rows)
            return Judge(stage, batch, changed_at, min(r.started_at for r in rows))
        return StageDone(stage)
    if stage is StageName.VALIDATION:
        times = [t for s in steps if s.kind is StepKind.APPLY and (t := effective_at(s)) is not None]
        since = max(times) if times else now
        due = since + timedelta(seconds=validation_delay)
        return Validate(since) if now >= due else WaitUntil(due)
    return Idle()


def _step_todo(wf: Workflow, row: Step | None, planned: Step) -> NextAction | None:
    """What one step still needs, or None once it is in effect."""
    if row is None:
        return RunStep(planned)
    if row.key == wf.retry_step:
        return RunStep(row, rerun=True)
    if row.state is StepState.STARTED:
        return InDoubt(row)
    if not row.in_effect:
        return Idle()  # a waiting step always comes with waiting_for; nothing to do alone
    return None


# ---- progress -----------------------------------------------------------------------------------


def with_progress(wf: Workflow, steps: Sequence[Step]) -> tuple[list[Stage], float]:
    """The stages with each one's progress, and the workflow's (the mean over its stages)."""
    stages = [s.model_copy() for s in wf.stages]
    by_stage: Mapping[StageName, list[Step]] = {
        name: [s for s in steps if s.stage is name] for name in StageName
    }
    for stage in stages:
        if stage.status in _DONE_STAGE:
            stage.progress = 1.0
        elif stage.status is StageStatus.IN_PROGRESS and stage.name in STEP_STAGES:
            planned = planned_steps(wf, steps, stage.name, wf.updated_at) if wf.change else []
            done = sum(1 for s in by_stage[stage.name] if s.in_effect)
            total = len(planned) or 1
            if stage.name is StageName.ROLLBACK:
                stage.progress = min(done / total, 1.0)
            else:
                # Changing a batch is half the work; its verdict is the other half.
                judged = sum(1 for v in wf.verdicts if v.stage is stage.name)
                count = 1 if stage.name is StageName.CANARY else max(len(batches(wf)) - 1, 1)
                stage.progress = 0.5 * min(done / total, 1.0) + 0.5 * min(judged / count, 1.0)
    if wf.ended:
        return stages, 1.0
    if wf.current_stage is StageName.ROLLBACK:
        rollback = next(s for s in stages if s.name is StageName.ROLLBACK)
        return stages, round(rollback.progress, 4)
    return stages, round(sum(s.progress for s in stages) / len(stages), 4)
