"""The workflow engine with executors and judges other than dry_run and the person: a step the agent
stopped in the middle of is never blindly re-run by an executor that is not idempotent; automatic
verdicts, failed steps and failed rollbacks each end where the state machine says.

The executors and judges here implement the real protocols (perfagent.executors.base,
perfagent.canary) and run inside the real app over real HTTP and DuckDB; they force each path (a
slow restart, a refused change, a given verdict) that the real executors and the statistical judge
reach only by chance. The real ones run end to end in tests/test_closed_loop.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import pytest

from perfagent.canary import CanaryCase, Judgement, JudgeOutcome
from perfagent.errors import ConflictError
from perfagent.executors.base import Action, StepOutcome, StepRecord
from perfagent.executors.dry_run import DryRunExecutor
from perfagent.executors.registry import ExecutorRegistry
from perfagent.workflow_machine import approve, reject
from perfagent.workflow_models import Workflow, WorkflowStatus
from tests.test_workflows_api import (
    WF,
    actions,
    assert_trail_is_a_chain,
    create,
    fleet_settings,
    get,
    post,
    start_agent,
    wait_for,
    waiting,
)


class GateExecutor:
    """Carries a step out once its gate opens: a slow restart. Not idempotent by key."""

    name: ClassVar[str] = "gate"

    def __init__(self, open_: bool) -> None:
        self.gate = asyncio.Event()
        if open_:
            self.gate.set()
        self.calls: list[str] = []

    async def apply(self, action: Action) -> StepRecord:
        self.calls.append(action.key)
        await self.gate.wait()
        return StepRecord(StepOutcome.APPLIED, ran={"settings": dict(action.settings)}, returned={"ok": True})


class FleetExecutor:
    """Applies every step at once, failing on the instances (and step kinds) it is told to."""

    name: ClassVar[str] = "fleet"

    def __init__(self, fail: Iterable[tuple[str, str]] = ()) -> None:
        self.fail = set(fail)  # (instance id, "apply" | "rollback")
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def apply(self, action: Action) -> StepRecord:
        kind = "rollback" if "/ROLLBACK/" in action.key else "apply"
        self.calls.append((action.key, dict(action.settings)))
        if (action.instance.id, kind) in self.fail:
            return StepRecord(StepOutcome.FAILED, ran={}, returned={"exit_code": 1}, message="engine refused")
        return StepRecord(
            StepOutcome.APPLIED, ran={"settings": dict(action.settings)}, returned={"exit_code": 0}
        )


class ScriptedJudge:
    """Answers with the given outcomes in turn (the last one repeats)."""

    name = "scripted"

    def __init__(self, *outcomes: JudgeOutcome) -> None:
        self.outcomes = list(outcomes)
        self.cases: list[CanaryCase] = []

    async def judge(self, case: CanaryCase) -> Judgement:
        self.cases.append(case)
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        return Judgement(outcome, f"scripted {outcome.value}", {"p99_ratio": 1.1}, retry_after=0.1)


def registry(*executors: Any) -> ExecutorRegistry:
    reg = ExecutorRegistry("dry_run")
    reg.register(DryRunExecutor())
    for executor in executors:
        reg.register(executor)
    return reg


async def test_a_step_in_doubt_waits_for_a_person_unless_its_executor_is_idempotent(
    aiohttp_client: Any, make_settings: Any, tmp_path: Path
) -> None:
    settings, _ = await fleet_settings(aiohttp_client, make_settings, tmp_path)
    first = GateExecutor(open_=False)
    agent = await start_agent(aiohttp_client, settings, executors=registry(first))
    wid = (await create(agent, auto_approve=True, executor="gate"))["workflow_id"]
    body = await wait_for(agent, wid, lambda b: bool(b["steps"]))
    assert body["steps"][0]["state"] == "started" and first.calls == [body["steps"][0]["key"]]
    await agent.close()  # the agent stops while the executor is still restarting vllm-1

    second = GateExecutor(open_=True)
    agent = await start_agent(aiohttp_client, settings, executors=registry(second))
    body = await wait_for(agent, wid, waiting("attention", "CANARY"))
    assert second.calls == []  # not run again behind anyone's back
    assert body["attention_step"] == body["steps"][0]["key"]
    assert "may or may not have changed vllm-1" in body["reason"]
    assert body["steps"][0]["attempts"] == 1 and body["steps"][0]["state"] == "started"

    # The person checked: the change is in effect. The workflow goes on without running the step again.
    status, body = await post(agent, f"{WF}/{wid}/confirm", {"confirmed_by": "carol"})
    assert status == 200
    body = await wait_for(agent, wid, waiting("canary_review"))
    assert second.calls == [] and body["steps"][0]["attempts"] == 1
    assert body["steps"][0]["confirmed_by"] == "carol"
    assert actions(body) == ["created", "started", "step_started", "attention", "confirmed", "canary_review"]
    assert_trail_is_a_chain(body)


async def test_resume_after_attention_runs_the_step_again(
    aiohttp_client: Any, make_settings: Any, tmp_path: Path
) -> None:
    settings, _ = await fleet_settings(aiohttp_client, make_settings, tmp_path)
    agent = await start_agent(aiohttp_client, settings, executors=registry(GateExecutor(open_=False)))
    wid = (await create(agent, auto_approve=True, executor="gate"))["workflow_id"]
    await wait_for(agent, wid, lambda b: bool(b["steps"]))
    await agent.close()

    second = GateExecutor(open_=True)
    agent = await start_agent(aiohttp_client, settings, executors=registry(second))
    await wait_for(agent, wid, waiting("attention"))
    status, body = await post(agent, f"{WF}/{wid}/resume", {"reason": "vllm-1 still on the old flags"})
    assert status == 200
    body = await wait_for(agent, wid, waiting("canary_review"))
    assert len(second.calls) == 1 and body["steps"][0]["attempts"] == 2
    assert body["steps"][0]["outcome"] == "applied"
    assert actions(body)[3:] == ["attention", "resumed", "step_rerun", "step_applied", "canary_review"]


async def test_an_executor_gone_after_a_restart_needs_attention(
    aiohttp_client: Any, make_settings: Any, tmp_path: Path
) -> None:
    settings, _ = await fleet_settings(aiohttp_client, make_settings, tmp_path)
    agent = await start_agent(aiohttp_client, settings, executors=registry(GateExecutor(open_=False)))
    wid = (await create(agent, auto_approve=True, executor="gate"))["workflow_id"]
    await wait_for(agent, wid, lambda b: bool(b["steps"]))
    await agent.close()
    agent = await start_agent(aiohttp_client, settings)
    body = await wait_for(agent, wid, waiting("attention"))
    assert body["steps"][0]["attempts"] == 1
    status, body = await post(agent, f"{WF}/{wid}/cancel")  # roll back with... the executor named: still gone
    assert status == 200
    body = await wait_for(agent, wid, waiting("attention", "ROLLBACK"))
    assert "executor 'gate' is not available" in body["reason"]


async def test_automatic_verdict_rollout_and_validation(
    aiohttp_client: Any, make_settings: Any, tmp_path: Path
) -> None:
    settings, _ = await fleet_settings(aiohttp_client, make_settings, tmp_path)
    fleet, judge = FleetExecutor(), ScriptedJudge(JudgeOutcome.PENDING, JudgeOutcome.PASS)
    agent = await start_agent(aiohttp_client, settings, executors=registry(fleet), judge=judge)
    wid = (await create(agent, executor="fleet"))["workflow_id"]
    await post(agent, f"{WF}/{wid}/approve")
    body = await wait_for(agent, wid, lambda b: b["status"] == "COMPLETED")
    # Nothing waited for a person: applied steps, the judge's pass after one "not yet".
    assert [key.split("/", 1)[1] for key, _ in fleet.calls] == [
        "CANARY/0/vllm-1",
        "ROLLOUT/1/vllm-2",
        "ROLLOUT/2/vllm-3",
    ]
    # The canary (asked twice), then each rollout batch against what has not changed yet, the last
    # one against its own history before the change.
    assert [(c.stage, c.batch, c.changed, c.baseline, c.baseline_kind.value) for c in judge.cases] == [
        ("CANARY", 0, ("vllm-1",), ("vllm-2", "vllm-3"), "unchanged"),
        ("CANARY", 0, ("vllm-1",), ("vllm-2", "vllm-3"), "unchanged"),
        ("ROLLOUT", 1, ("vllm-2",), ("vllm-3",), "unchanged"),
        ("ROLLOUT", 2, ("vllm-3",), (), "before"),
    ]
    case = judge.cases[-1]
    assert dict(case.settings) == {"kv_cache_dtype": "fp8"}
    assert [a.rule for a in case.addresses] == ["KVCacheFull"]
    judged = next(e for e in body["events"] if e["action"] == "judged")
    assert judged["actor"] == "judge:scripted" and judged["data"]["p99_ratio"] == 1.1
    assert [(v["stage"], v["batch"], v["decided_by"]) for v in body["verdicts"]] == [
        ("CANARY", 0, "judge:scripted"),
        ("ROLLOUT", 1, "judge:scripted"),
        ("ROLLOUT", 2, "judge:scripted"),
    ]
    assert "canary_review" not in actions(body)
    # The targets still report a full cache on vllm-1: validation says so, the workflow ends anyway.
    assert body["validation"]["outcome"] == "still_present", body["validation"]
    assert body["validation"]["instances"][0]["still_firing"] == ["KVCacheFull"]
    assert body["reason"].startswith("some addressed findings still hold: vllm-1: KVCacheFull")
    assert_trail_is_a_chain(body)


async def test_failures_roll_back_or_fail(aiohttp_client: Any, make_settings: Any, tmp_path: Path) -> None:
    settings, _ = await fleet_settings(aiohttp_client, make_settings, tmp_path)
    fleet = FleetExecutor(fail={("lone", "apply"), ("vllm-2", "apply")})
    judge = ScriptedJudge(JudgeOutcome.PASS)
    agent = await start_agent(aiohttp_client, settings, executors=registry(fleet), judge=judge)

    # The canary's own change failed: nothing is in effect, nothing to undo.
    wid = (await create(agent, instance_id="lone", executor="fleet", auto_approve=True))["workflow_id"]
    body = await wait_for(agent, wid, lambda b: b["status"] == "FAILED")
    assert body["reason"] == f"step {wid}/CANARY/0/lone failed: engine refused"
    assert [s["status"] for s in body["stages"]][2:] == ["FAILED", "SKIPPED", "SKIPPED"]

    # A rollout step failed: the canary is rolled back.
    wid = (await create(agent, executor="fleet", auto_approve=True))["workflow_id"]
    body = await wait_for(agent, wid, lambda b: b["status"] == "ROLLED_BACK")
    assert [key.split("/", 1)[1] for key, _ in fleet.calls][-3:] == [
        "CANARY/0/vllm-1",
        "ROLLOUT/1/vllm-2",
        "ROLLBACK/0/vllm-1",
    ]
    assert fleet.calls[-1][1] == {"kv_cache_dtype": "auto"}
    assert body["reason"].startswith(f"step {wid}/ROLLOUT/1/vllm-2 failed")


async def test_a_failed_rollback_waits_for_a_person(
    aiohttp_client: Any, make_settings: Any, tmp_path: Path
) -> None:
    settings, _ = await fleet_settings(aiohttp_client, make_settings, tmp_path)
    fleet = FleetExecutor(fail={("vllm-1", "rollback")})
    agent = await start_agent(
        aiohttp_client, settings, executors=registry(fleet), judge=ScriptedJudge(JudgeOutcome.FAIL)
    )
    wid = (await create(agent, executor="fleet", auto_approve=True))["workflow_id"]
    body = await wait_for(agent, wid, waiting("attention", "ROLLBACK"))
    assert body["canary"]["verdict"] == "fail" and body["canary"]["decided_by"] == "judge:scripted"
    # FAILED, with the reason, and waiting for a person: the group is still held.
    assert body["status"] == "FAILED" and body["reason"].startswith("rollback failed: ")
    assert "may still run the new settings" in body["reason"]
    assert next(s for s in body["stages"] if s["name"] == "ROLLBACK")["status"] == "FAILED"
    status, conflict = await post(agent, WF, {"instance_id": "vllm-2"})
    assert status == 409 and conflict["error"]["details"]["active_workflow_id"] == wid
    status, _ = await post(agent, f"{WF}/{wid}/cancel")
    assert status == 409  # already rolling back
    fleet.fail.clear()
    status, body = await post(agent, f"{WF}/{wid}/resume")  # try the rollback again
    assert status == 200 and body["status"] == "IN_PROGRESS"
    body = await wait_for(agent, wid, lambda b: b["status"] == "ROLLED_BACK")
    rollback = body["steps"][-1]
    assert rollback["kind"] == "rollback" and rollback["attempts"] == 2 and rollback["outcome"] == "applied"
    assert body["reason"] == "canary failed: scripted fail"
    assert actions(body)[-5:] == ["rollback_failed", "resumed", "step_rerun", "step_applied", "rolled_back"]
    assert_trail_is_a_chain(body)


async def test_every_non_pending_status_refuses_approval_and_rejection(
    aiohttp_client: Any, make_settings: Any, tmp_path: Path
) -> None:
    settings, _ = await fleet_settings(aiohttp_client, make_settings, tmp_path)
    agent = await start_agent(aiohttp_client, settings)
    _, body = await get(agent, f"{WF}/{(await create(agent))['workflow_id']}")
    pending = Workflow.model_validate(body)
    for status in WorkflowStatus:
        wf = pending.model_copy(update={"status": status})
        for decide in (approve, reject):
            if status is WorkflowStatus.PENDING_APPROVAL:
                assert decide(wf, "x", None, wf.created_at).workflow.status is not status
                continue
            with pytest.raises(ConflictError) as raised:
                decide(wf, "x", None, wf.created_at)
            assert raised.value.details["status"] == status.value
