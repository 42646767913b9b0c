"""The /workflows endpoints: open a workflow (its analysis runs inside the call), read and list
them, and the operator's actions: approve, reject, confirm, resume, cancel."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web

from perfagent.clock import utc_now
from perfagent.context import AGENT
from perfagent.errors import NotFoundError, ValidationError
from perfagent.priors import observed_effects
from perfagent.routing import Endpoint, json_response, read_body, read_optional_body, read_query
from perfagent.workflow_analysis import (
    analyse,
    carried_out,
    deployment_group,
    group_members,
    simulated_config,
    simulator_settings,
)
from perfagent.workflow_machine import (
    Transition,
    approve,
    cancel,
    chosen_optimization,
    confirm,
    open_workflow,
    reject,
    resume,
)
from perfagent.workflow_models import (
    ApproveRequest,
    ApproveResponse,
    CancelRequest,
    ConfirmRequest,
    CreateWorkflowRequest,
    RejectRequest,
    RejectResponse,
    ResumeRequest,
    Step,
    Workflow,
    WorkflowDetail,
    WorkflowsQuery,
    WorkflowSummary,
    WorkflowType,
)
from perfagent.workflow_store import group_key

DEFAULT_ACTOR = "operator"  # the spec's approve example answers `approved_by: operator`


async def create_workflow(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    engine = agent.workflows
    body = await read_body(request, CreateWorkflowRequest)
    instance = await agent.instance(body.instance_id)
    if instance is None:
        raise NotFoundError(f"no instance {body.instance_id!r} is watched", {"instance_id": body.instance_id})
    if body.instance_type is not None and body.instance_type != instance.engine:
        raise ValidationError(
            f"instance_type {body.instance_type.value} does not match {instance.id}, a {instance.engine.value} instance",
            {"field": "instance_type", "allowed_values": [instance.engine.value]},
        )
    executor = body.executor or engine.executors.default_for(instance)
    if executor not in engine.executors:
        raise ValidationError(
            f"unknown executor {executor!r}",
            {"field": "executor", "allowed_values": engine.executors.names()},
        )
    judge = body.judge or engine.executors.default_judge(executor)
    members = group_members(instance, await agent.instances())
    # Simulated instances report their settings exactly: the change starts from them, rollback restores them.
    known: dict[str, dict[str, Any]] = {}
    for m in members:
        config = simulated_config(agent.demo, m.id) or await simulator_settings(agent.scraper, m)
        if config is not None:
            known[m.id] = config
    now = utc_now()
    analysis = await analyse(
        agent.store,
        agent.detector,
        agent.history,
        instance,
        await agent.engines(),
        body.current_config if body.current_config is not None else known.get(instance.id),
        now,
    )
    asked = body.optimization_id if body.workflow_type is WorkflowType.OPTIMIZATION else None
    if asked is not None and chosen_optimization(analysis.plan.optimizations, asked) is None:
        allowed = [o.id for o in analysis.plan.optimizations if carried_out(o)]
        raise ValidationError(
            f"optimization_id {asked!r} is not among the optimizations this workflow can carry out on "
            f"{instance.id} now",
            {"field": "optimization_id", "allowed_values": allowed},
        )
    verdicts = await engine.store.verdicts(instance.engine.value)
    observed = observed_effects(verdicts, instance.engine.value, instance.labels.get("model") or None)
    t = open_workflow(
        workflow_id=f"wf-{uuid.uuid4()}",
        instance=instance,
        members=members if body.workflow_type is WorkflowType.OPTIMIZATION else [instance],
        workflow_type=body.workflow_type,
        auto_approve=body.auto_approve,
        executor=executor,
        analysis=analysis,
        known_configs=known,
        current_args=body.current_args,
        requested_by=body.requested_by or DEFAULT_ACTOR,
        at=now,
        judge=judge,
        optimization_id=body.optimization_id,
        observed=observed,
    )
    await engine.store.create(t.workflow, t, group_key(deployment_group(instance), instance.id))
    engine.wake()
    return json_response(await engine.detail(t.workflow.workflow_id), status=201)


async def get_workflow(request: web.Request) -> web.Response:
    engine = request.app[AGENT].workflows
    return json_response(await engine.detail(request.match_info["workflow_id"]))


async def list_workflows(request: web.Request) -> web.Response:
    query = read_query(request, WorkflowsQuery)
    found = await request.app[AGENT].workflows.store.find(query.status, query.instance_id, query.limit)
    return json_response(
        [WorkflowSummary.model_validate(wf.model_dump()) for wf in found]  # the spec's list: a bare array
    )


async def _act(request: web.Request, decide: Callable[[Workflow, list[Step]], Transition]) -> Transition:
    engine = request.app[AGENT].workflows
    t = await engine.store.transition(request.match_info["workflow_id"], decide)
    engine.wake()
    return t


async def approve_workflow(request: web.Request) -> web.Response:
    body = await read_optional_body(request, ApproveRequest)
    actor = body.approved_by or DEFAULT_ACTOR
    t = await _act(request, lambda wf, _: approve(wf, actor, body.comment, utc_now()))
    wf = t.workflow
    assert wf.approved_at is not None and wf.approved_by is not None
    return json_response(
        ApproveResponse(
            workflow_id=wf.workflow_id,
            status=wf.status,
            approved_at=wf.approved_at,
            approved_by=wf.approved_by,
            comment=wf.approval_comment,
        )
    )


async def reject_workflow(request: web.Request) -> web.Response:
    body = await read_optional_body(request, RejectRequest)
    actor = body.rejected_by or DEFAULT_ACTOR
    t = await _act(request, lambda wf, _: reject(wf, actor, body.reason, utc_now()))
    wf = t.workflow
    assert wf.rejected_at is not None and wf.rejected_by is not None
    return json_response(
        RejectResponse(
            workflow_id=wf.workflow_id,
            status=wf.status,
            rejected_at=wf.rejected_at,
            rejected_by=wf.rejected_by,
            reason=body.reason,
        )
    )


async def confirm_workflow(request: web.Request) -> web.Response:
    body = await read_optional_body(request, ConfirmRequest)
    actor = body.confirmed_by or DEFAULT_ACTOR
    t = await _act(request, lambda wf, steps: confirm(wf, steps, actor, body.comment, utc_now()))
    return json_response(await request.app[AGENT].workflows.detail(t.workflow.workflow_id))


async def resume_workflow(request: web.Request) -> web.Response:
    body = await read_optional_body(request, ResumeRequest)
    actor = body.resumed_by or DEFAULT_ACTOR
    t = await _act(request, lambda wf, _: resume(wf, body.verdict, body.reason, actor, utc_now()))
    return json_response(await request.app[AGENT].workflows.detail(t.workflow.workflow_id))


async def cancel_workflow(request: web.Request) -> web.Response:
    body = await read_optional_body(request, CancelRequest)
    actor = body.cancelled_by or DEFAULT_ACTOR
    t = await _act(request, lambda wf, steps: cancel(wf, steps, actor, body.reason, utc_now()))
    return json_response(await request.app[AGENT].workflows.detail(t.workflow.workflow_id))


_TAG = "workflows"
_ACTION_ERRORS = (400, 404, 409)

ENDPOINTS = (
    Endpoint(
        "POST",
        "/workflows",
        create_workflow,
        "Start an optimization workflow",
        _TAG,
        body=CreateWorkflowRequest,
        response=WorkflowDetail,
        status=201,
        errors=(400, 404, 409),
        description="Runs the analysis inside the call (the rules over the instance's stored history, then the "
        "recommender) and lists its optimizations, each with what it `observed`ly did in past workflows; the "
        "first auto-applicable one (or the one named by `optimization_id`) is the change carried out on the "
        "deployment group (instances sharing the `deployment_group` label): the canary, then rollout batches, "
        "each judged by the workflow's `judge`. Nothing to carry out: the workflow is created COMPLETED with "
        "the reason. `workflow_type: analysis` only detects and recommends. One active optimization workflow "
        "per deployment group: a second is a 409 CONFLICT naming the first (`details.active_workflow_id`).",
    ),
    Endpoint(
        "GET",
        "/workflows",
        list_workflows,
        "List workflows",
        _TAG,
        query=WorkflowsQuery,
        response=list[WorkflowSummary],
        errors=(400,),
        description="Newest first. `instance_id` matches the workflow's instance or any of its deployment group.",
    ),
    Endpoint(
        "GET",
        "/workflows/{workflow_id}",
        get_workflow,
        "Get workflow status and details",
        _TAG,
        response=WorkflowDetail,
        errors=(404,),
        description="Status, stage, progress and stages as the spec shows, plus `waiting_for`, the "
        "optimizations, the planned change, the audit trail (`events`) and the executor steps.",
    ),
    Endpoint(
        "POST",
        "/workflows/{workflow_id}/approve",
        approve_workflow,
        "Approve a pending workflow",
        _TAG,
        body=ApproveRequest,
        body_required=False,
        response=ApproveResponse,
        errors=_ACTION_ERRORS,
        description="Optional body `{approved_by, comment}`; `approved_by` defaults to `operator`. A workflow "
        "that is not PENDING_APPROVAL is a 409 CONFLICT; of two concurrent approve/reject calls exactly one wins.",
    ),
    Endpoint(
        "POST",
        "/workflows/{workflow_id}/reject",
        reject_workflow,
        "Reject a pending workflow",
        _TAG,
        body=RejectRequest,
        body_required=False,
        response=RejectResponse,
        errors=_ACTION_ERRORS,
        description="Optional body `{reason, rejected_by}`. A workflow that is not PENDING_APPROVAL is a 409 CONFLICT.",
    ),
    Endpoint(
        "POST",
        "/workflows/{workflow_id}/confirm",
        confirm_workflow,
        "Confirm that the pending step is in effect",
        _TAG,
        body=ConfirmRequest,
        body_required=False,
        response=WorkflowDetail,
        errors=_ACTION_ERRORS,
        description="At `waiting_for: confirm`: the dry_run change was applied. At `attention` about a step: it "
        "was carried out. Otherwise a 409 CONFLICT.",
    ),
    Endpoint(
        "POST",
        "/workflows/{workflow_id}/resume",
        resume_workflow,
        "Resume a workflow waiting for a person",
        _TAG,
        body=ResumeRequest,
        body_required=False,
        response=WorkflowDetail,
        errors=_ACTION_ERRORS,
        description='At `canary_review`: `{"verdict": "pass"}` (the default) goes on with the batch in `review`, '
        '`"fail"` rolls back. At `attention` (also a FAILED rollback): go on, running the step in question '
        "again. Otherwise a 409 CONFLICT.",
    ),
    Endpoint(
        "POST",
        "/workflows/{workflow_id}/cancel",
        cancel_workflow,
        "Cancel a workflow",
        _TAG,
        body=CancelRequest,
        body_required=False,
        response=WorkflowDetail,
        errors=_ACTION_ERRORS,
        description="Before any change: REJECTED. Once a change may be in effect: rolled back instance by "
        "instance (each step through the executor), then ROLLED_BACK. An ended workflow is a 409 CONFLICT.",
    ),
)
