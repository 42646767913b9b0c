"""The task that drives workflows: it asks the state machine what each runnable workflow needs next,
does it (a step through an executor, a question to the workflow's judge about a batch, a
validation), and persists the result as a transition.

Crash safety: a step is persisted as `started` before its executor runs and as `done`, with the
executor's record, after it returns, and the engine keeps no state that matters in memory. After a
restart every workflow continues from its persisted state. A step found `started` but not `done`
(the agent died while it ran) runs again only if its executor is idempotent by key (dry_run);
otherwise the workflow waits with `waiting_for: attention` until a person confirms the step (it
was carried out), resumes (run it again) or cancels (roll back).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping

from perfagent.canary import CanaryJudge, JudgeOutcome
from perfagent.clock import utc_now
from perfagent.detection import Detector
from perfagent.errors import ConflictError, NotFoundError
from perfagent.executors.base import Action, StepOutcome, StepRecord, rerun_safe
from perfagent.executors.registry import ExecutorRegistry
from perfagent.history import HistoryWriter
from perfagent.models import Instance
from perfagent.store import Store
from perfagent.workflow_analysis import validate
from perfagent.workflow_machine import (
    Transition,
    begin_step,
    finish_step,
    judged,
    needs_attention,
    stage_done,
    start,
    validated,
)
from perfagent.workflow_models import Step, Workflow, WorkflowDetail
from perfagent.workflow_steps import (
    InDoubt,
    Judge,
    RunStep,
    StageDone,
    Start,
    Validate,
    WaitUntil,
    judge_case,
    next_action,
    with_progress,
)
from perfagent.workflow_store import WorkflowStore

log = logging.getLogger("perfagent.workflows")

TICK = 1.0  # seconds between looks at workflows when nothing wakes the engine
NO_DATA_GRACE = 30.0  # seconds VALIDATION waits at least, beyond its delay, for a scrape after the change
_MAX_MOVES = 100  # transitions of one workflow per pass: a guard against a loop, never reached normally

InstanceLookup = Callable[[str], Awaitable[Instance | None]]


class WorkflowEngine:
    def __init__(
        self,
        store: Store,
        executors: ExecutorRegistry,
        judges: Mapping[str, CanaryJudge],
        detector: Detector,
        history: HistoryWriter,
        instance: InstanceLookup,
        *,
        validation_delay: float,
        judge_override: CanaryJudge | None = None,
    ) -> None:
        self.store = WorkflowStore(store)
        self.executors = executors
        self.judges = dict(judges)
        self._override = judge_override  # tests bring one judge for every workflow
        self._db = store
        self._detector = detector
        self._history = history
        self._instance = instance
        self.validation_delay = validation_delay
        self._wake = asyncio.Event()
        self._judge_after: dict[str, float] = {}  # workflow -> monotonic time of the judge's next look

    async def setup(self) -> None:
        await self.store.setup()

    def wake(self) -> None:
        """Look at the workflows now (after an API call changed one)."""
        self._wake.set()

    async def detail(self, workflow_id: str) -> WorkflowDetail:
        found = await self.store.detail(workflow_id)
        if found is None:
            raise NotFoundError(f"no workflow {workflow_id!r}", {"workflow_id": workflow_id})
        wf, events, steps = found
        stages, progress = with_progress(wf, steps)
        return WorkflowDetail(
            **{**wf.model_dump(), "stages": stages}, progress=progress, events=events, steps=steps
        )

    async def run(self) -> None:
        while True:
            self._wake.clear()
            try:
                delay = await self.advance_all()
            except Exception:
                log.exception("workflow engine pass failed; trying again")
                delay = TICK
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)

    async def advance_all(self) -> float:
        """One pass over every runnable workflow; seconds until one wants another look."""
        delay = TICK
        for workflow_id in await self.store.runnable():
            delay = min(delay, await self.advance(workflow_id))
        return max(delay, 0.01)

    async def advance(self, workflow_id: str) -> float:
        """Move one workflow on until it waits; seconds until it wants another look."""
        for _ in range(_MAX_MOVES):
            try:
                wait = await self._move(workflow_id)
            except ConflictError:
                continue  # changed by an API call meanwhile (a cancel): decide again from the new state
            except Exception as exc:
                log.exception("workflow %s: advancing failed", workflow_id)
                await self._attention(
                    workflow_id, f"unexpected error while advancing: {exc!r}; resume to try again"
                )
                return TICK
            if wait is not None:
                return wait
        return TICK

    async def _transition(
        self, workflow_id: str, decide: Callable[[Workflow, list[Step]], Transition]
    ) -> Transition:
        t = await self.store.transition(workflow_id, decide)
        log.info(
            "workflow %s: %s",
            workflow_id,
            t.action,
            extra={
                "status": t.workflow.status.value,
                "stage": t.workflow.current_stage,
                "waiting_for": t.workflow.waiting_for,
            },
        )
        return t

    async def _attention(self, workflow_id: str, reason: str, step: str | None = None) -> None:
        with contextlib.suppress(Exception):
            await self._transition(workflow_id, lambda wf, _: needs_attention(wf, reason, step, utc_now()))

    async def _move(self, workflow_id: str) -> float | None:
        """Do the next thing for one workflow: None when it moved (look again), else seconds to wait."""
        wf = await self.store.get(workflow_id)
        if wf is None:
            return math.inf
        steps = await self.store.steps(workflow_id)
        now = utc_now()
        action = next_action(wf, steps, now, self.validation_delay)
        if isinstance(action, Start):
            await self._transition(workflow_id, lambda w, _: start(w, utc_now()))
            return None
        if isinstance(action, RunStep):
            reason = "run again as a person asked" if action.rerun else None
            return await self._run_step(action.step, reason)
        if isinstance(action, InDoubt):
            return await self._in_doubt(action.step)
        if isinstance(action, Judge):
            return await self._judge(wf, action)
        if isinstance(action, StageDone):
            await self._transition(workflow_id, lambda w, _: stage_done(w, action.stage, utc_now()))
            return None
        if isinstance(action, Validate):
            assert wf.change is not None
            validation = await validate(
                self._db,
                self._detector,
                self._history,
                wf.instances,
                wf.instance_type.value,
                wf.change.addresses,
                action.since,
                utc_now(),
            )
            # Right after a restart (or a slow scrape) an instance may have no scrape since the change
            # yet: wait for one before calling the change unverifiable.
            patience = self.validation_delay + max(self.validation_delay, NO_DATA_GRACE)
            if validation.outcome == "no_data" and (now - action.since).total_seconds() < patience:
                return TICK
            await self._transition(workflow_id, lambda w, _: validated(w, validation, utc_now()))
            return None
        if isinstance(action, WaitUntil):
            return max((action.at - now).total_seconds(), 0.0)
        return math.inf  # Idle: ended, or waiting for a person

    async def _in_doubt(self, step: Step) -> float | None:
        executor = self.executors.get(step.executor)
        if executor is not None and rerun_safe(executor):
            reason = (
                f"found started but not done after a restart; {step.executor} is idempotent by key, "
                "so the step runs again"
            )
            return await self._run_step(step, reason)
        reason = (
            f"step {step.key} was started but not recorded as done before the agent stopped; "
            f"{step.executor} may or may not have changed {step.instance_id}: confirm if the change is in "
            "effect, resume to run the step again, or cancel to roll back"
        )
        await self._attention(step.workflow_id, reason, step.key)
        return None

    async def _run_step(self, step: Step, rerun_reason: str | None) -> float | None:
        executor = self.executors.get(step.executor)
        existing = step.attempts > 0
        if executor is None:
            reason = f"executor {step.executor!r} is not available (available: {', '.join(self.executors.names())})"
            await self._attention(step.workflow_id, reason, step.key if existing else None)
            return None
        instance = await self._instance(step.instance_id)
        if instance is None:
            reason = f"instance {step.instance_id} is no longer watched; restore it and resume, or cancel"
            await self._attention(step.workflow_id, reason, step.key if existing else None)
            return None
        t = await self._transition(
            step.workflow_id, lambda wf, _: begin_step(wf, step, utc_now(), rerun_reason=rerun_reason)
        )
        row = t.steps[0]
        action = Action(
            key=row.key,
            instance=instance,
            settings=row.settings,
            previous=row.previous,
            current_args=None if row.current_args is None else tuple(row.current_args),
        )
        try:
            record = await executor.apply(action)
        except Exception as exc:  # the protocol says never raise; a bug must not leave the step open
            log.exception("executor %s raised on %s", step.executor, row.key)
            record = StepRecord(StepOutcome.FAILED, ran={}, returned={}, message=f"executor raised {exc!r}")
        await self._transition(
            step.workflow_id, lambda wf, steps: finish_step(wf, steps, row.key, record, utc_now())
        )
        return None

    async def _judge(self, wf: Workflow, action: Judge) -> float | None:
        due = self._judge_after.get(wf.workflow_id, 0.0) - time.monotonic()
        if due > 0:
            return due
        judge = self._override or self.judges.get(wf.judge)
        if judge is None:
            reason = (
                f"judge {wf.judge!r} is not available ({', '.join(sorted(self.judges))}); resume to try again"
            )
            await self._attention(wf.workflow_id, reason)
            return None
        case = judge_case(wf, action)
        judgement = await judge.judge(case)
        if judgement.outcome is JudgeOutcome.PENDING:
            self._judge_after[wf.workflow_id] = time.monotonic() + judgement.retry_after
            return judgement.retry_after
        self._judge_after.pop(wf.workflow_id, None)
        await self._transition(wf.workflow_id, lambda w, _: judged(w, case, judgement, judge.name, utc_now()))
        return None
