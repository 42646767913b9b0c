"""Workflows over real HTTP: the agent polls a fleet of vLLM targets on loopback, one of them with a
full KV cache, and the workflow API carries the change through approval, canary, rollout and
validation with the dry_run executor. Every transition is in the audit trail; every bad request gets
the error envelope."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from perfagent.app import create_app
from perfagent.settings import Settings
from tests.test_error_shape import assert_envelope

Client = TestClient[web.Request, web.Application]
WF = "/api/v1/workflows"

# Rules without `for`, so the first scrape decides: a full KV cache, and a queue.
FAST_RULES = """
groups:
  - name: fast
    rules:
      - name: KVCacheFull
        type: MEMORY_PRESSURE
        quantity: kv_cache_usage
        op: ">"
        thresholds: {HIGH: 0.9}
        keep_firing_for: 0s
        recommendation: Use an fp8 KV cache.
      - name: Queue
        type: QUEUE_BUILDUP
        quantity: requests_waiting
        op: ">"
        thresholds: {HIGH: 20}
        keep_firing_for: 0s
        recommendation: Add replicas.
"""
FULL, HEALTHY = {"kv": 0.97, "waiting": 0.0}, {"kv": 0.4, "waiting": 0.0}


def exposition(kv: float, waiting: float) -> str:
    return (
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        f'vllm:kv_cache_usage_perc{{model_name="m",engine="0"}} {kv}\n'
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{model_name="m",engine="0"} 8\n'
        "# TYPE vllm:num_requests_waiting gauge\n"
        f'vllm:num_requests_waiting{{model_name="m",engine="0"}} {waiting}\n'
    )


def fleet_app(state: dict[str, dict[str, float]]) -> web.Application:
    """vLLM-like targets whose numbers the test sets: /m/<name>."""

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=exposition(**state[request.match_info["name"]]))

    app = web.Application()
    app.router.add_get("/m/{name}", metrics)
    return app


async def fleet_settings(
    aiohttp_client: Any, make_settings: Callable[..., Settings], tmp_path: Path, **overrides: Any
) -> tuple[Settings, dict[str, dict[str, float]]]:
    """Targets vllm-1..3 (deployment group g1, vllm-1's KV cache full), and alone: solo (healthy),
    queued (a queue), lone (KV full); settings for an agent watching them, and their numbers."""
    state = {
        "vllm-1": dict(FULL),
        "vllm-2": dict(HEALTHY),
        "vllm-3": dict(HEALTHY),
        "solo": dict(HEALTHY),
        "queued": {"kv": 0.4, "waiting": 40.0},
        "lone": dict(FULL),
    }
    target = await aiohttp_client(fleet_app(state))
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)
    (rules / "fast.yaml").write_text(FAST_RULES)
    group = {"deployment_group": "g1"}
    instances = [
        {
            "id": name,
            "engine": "vllm",
            "metrics_url": str(target.make_url(f"/m/{name}")),
            "labels": group if name.startswith("vllm-") else {},
        }
        for name in state
    ]
    values: dict[str, Any] = {
        "polling_interval": 0.2,
        "history_flush_interval": 0.2,
        "rules_dir": rules,
        "instances": instances,
        "workflow_validation_delay": 1.0,
        **overrides,
    }
    return make_settings(**values), state


async def start_agent(aiohttp_client: Any, settings: Settings, **app_options: Any) -> Client:
    """The agent, once the first scrapes of its fleet are stored (the analysis reads stored history)."""
    agent: Client = await aiohttp_client(create_app(settings, **app_options))
    for _ in range(100):
        response = await agent.get("/api/v1/metrics/history", params={"instance_id": "lone", "since": "1h"})
        if (await response.json())["count"] > 0:
            break
        await asyncio.sleep(0.05)
    return agent


async def start_fleet_agent(
    aiohttp_client: Any, make_settings: Callable[..., Settings], tmp_path: Path, **overrides: Any
) -> tuple[Client, dict[str, dict[str, float]]]:
    settings, state = await fleet_settings(aiohttp_client, make_settings, tmp_path, **overrides)
    return await start_agent(aiohttp_client, settings), state


async def post(agent: Client, path: str, body: Any = None) -> tuple[int, Any]:
    response = await agent.post(path, json=body) if body is not None else await agent.post(path)
    return response.status, await response.json()


async def get(agent: Client, path: str, **params: str) -> tuple[int, Any]:
    response = await agent.get(path, params=params)
    return response.status, await response.json()


async def wait_for(
    agent: Client, workflow_id: str, check: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Poll GET /workflows/{id} until `check` holds (the engine runs in the background)."""
    body: dict[str, Any] = {}
    for _ in range(200):
        _, body = await get(agent, f"{WF}/{workflow_id}")
        if check(body):
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"workflow never reached the state: {body}")


def waiting(what: str | None, stage: str | None = None) -> Callable[[dict[str, Any]], bool]:
    return lambda b: b["waiting_for"] == what and (stage is None or b["current_stage"] == stage)


def actions(body: dict[str, Any]) -> list[str]:
    return [e["action"] for e in body["events"]]


def assert_trail_is_a_chain(body: dict[str, Any]) -> None:
    """Each event starts where the one before it ended: no transition is missing from the trail."""
    events = body["events"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["from_status"] is None
    for before, after in itertools.pairwise(events):
        assert after["from_status"] == before["to_status"], (before, after)
        assert after["from_stage"] == before["to_stage"], (before, after)
        assert after["at"] >= before["at"]
    last = events[-1]
    assert (last["to_status"], last["to_stage"], last["waiting_for"]) == (
        body["status"],
        body["current_stage"],
        body["waiting_for"],
    )


async def create(agent: Client, **body: Any) -> dict[str, Any]:
    status, created = await post(agent, WF, {"instance_id": "vllm-1", "instance_type": "vllm", **body})
    assert status == 201, created
    return dict(created)


async def test_lifecycle_over_http_every_transition_in_the_audit_trail(
    aiohttp_client: Any, make_settings: Any, tmp_path: Path
) -> None:
    agent, state = await start_fleet_agent(aiohttp_client, make_settings, tmp_path)
    # The spec's request, word for word.
    status, created = await post(
        agent,
        WF,
        {
            "instance_id": "vllm-1",
            "instance_type": "vllm",
            "workflow_type": "optimization",
            "auto_approve": False,
        },
    )
    assert status == 201
    assert created["workflow_id"].startswith("wf-")
    assert created["status"] == "PENDING_APPROVAL" and created["requires_approval"] is True
    assert created["instance_id"] == "vllm-1"
    assert created["waiting_for"] == "approval" and created["current_stage"] == "APPROVAL"
    assert [b["rule"] for b in created["bottlenecks"]] == ["KVCacheFull"]
    first = created["optimizations"][0]
    assert first["type"] == "KV_CACHE" and first["description"] and first["selected"] is True
    assert created["change"]["settings"] == {"kv_cache_dtype": "fp8"}
    assert created["change"]["cli_args"] == ["--kv-cache-dtype", "fp8"]
    assert created["instances"] == ["vllm-1", "vllm-2", "vllm-3"] and created["deployment_group"] == "g1"
    assert created["executor"] == "dry_run"
    assert [(s["name"], s["status"]) for s in created["stages"]] == [
        ("ANALYSIS", "COMPLETED"),
        ("APPROVAL", "IN_PROGRESS"),
        ("CANARY", "PENDING"),
        ("ROLLOUT", "PENDING"),
        ("VALIDATION", "PENDING"),
    ]
    wid = created["workflow_id"]

    # The spec's approve: a bare POST, answered with the spec's shape.
    status, approved = await post(agent, f"{WF}/{wid}/approve")
    assert status == 200
    assert approved["workflow_id"] == wid and approved["status"] == "APPROVED"
    assert approved["approved_by"] == "operator" and approved["approved_at"]

    # CANARY: the dry_run change for vllm-1, waiting for a person to apply it.
    body = await wait_for(agent, wid, waiting("confirm", "CANARY"))
    assert body["status"] == "IN_PROGRESS" and 0 < body["progress"] < 1
    [canary] = body["steps"]
    assert canary["instance_id"] == "vllm-1" and canary["outcome"] == "waiting" and canary["attempts"] == 1
    ran = canary["record"]["ran"]
    assert ran["cli_args"] == ["--kv-cache-dtype", "fp8"]
    assert ran["kubernetes_patch"] == {
        "spec": {
            "template": {"spec": {"containers": [{"name": "vllm", "args": ["--kv-cache-dtype", "fp8"]}]}}
        }
    }
    assert ran["args_complete"] is False
    assert canary["previous"] == {
        "kv_cache_dtype": "auto"
    }  # vLLM's documented default: what rollback restores

    status, body = await post(agent, f"{WF}/{wid}/confirm", {"confirmed_by": "alice"})
    assert status == 200
    body = await wait_for(agent, wid, waiting("canary_review", "CANARY"))
    canary_stage = next(s for s in body["stages"] if s["name"] == "CANARY")
    assert canary_stage["status"] == "IN_PROGRESS" and canary_stage["progress"] == 0.5

    # A person's look at the canary: pass rolls out in batches, vllm-2 then vllm-3, each a dry_run step
    # that a person applies and then judges like the canary.
    status, body = await post(agent, f"{WF}/{wid}/resume", {"verdict": "pass", "resumed_by": "bob"})
    assert status == 200 and body["canary"]["verdict"] == "pass" and body["canary"]["decided_by"] == "bob"
    assert body["batches"] == [["vllm-1"], ["vllm-2"], ["vllm-3"]]
    for name, against in (("vllm-2", "against vllm-3 (unchanged)"), ("vllm-3", "against their own history")):
        body = await wait_for(agent, wid, waiting("confirm", "ROLLOUT"))
        assert body["steps"][-1]["instance_id"] == name
        if name == "vllm-3":
            for name_ in ("vllm-1", "vllm-2", "vllm-3"):
                state[name_].update(HEALTHY)  # the change worked: the cache is no longer full
        status, _ = await post(agent, f"{WF}/{wid}/confirm")
        assert status == 200
        body = await wait_for(agent, wid, waiting("canary_review", "ROLLOUT"))
        assert body["review"]["instances"] == [name]
        assert against in body["reason"]
        status, _ = await post(agent, f"{WF}/{wid}/resume")
        assert status == 200

    body = await wait_for(agent, wid, lambda b: b["status"] == "COMPLETED")
    assert body["progress"] == 1.0 and body["current_stage"] is None and body["waiting_for"] is None
    assert all(s["status"] == "COMPLETED" for s in body["stages"]), body["stages"]
    assert body["validation"]["outcome"] == "resolved", body["validation"]
    assert [v["instance_id"] for v in body["validation"]["instances"]] == ["vllm-1", "vllm-2", "vllm-3"]
    assert all(v["scrapes"] > 0 and not v["still_firing"] for v in body["validation"]["instances"])
    assert actions(body) == [
        "created",
        "approved",
        "started",
        "step_started",
        "step_waiting",
        "confirmed",
        "canary_review",
        "resumed",
        "step_started",
        "step_waiting",
        "confirmed",
        "canary_review",
        "resumed",
        "step_started",
        "step_waiting",
        "confirmed",
        "canary_review",
        "resumed",
        "rollout_completed",
        "validated",
    ]
    assert_trail_is_a_chain(body)
    by_action: dict[str, Any] = {}
    for event in body["events"]:
        by_action.setdefault(event["action"], event)  # the first of each
    assert by_action["approved"]["actor"] == "operator"
    assert by_action["confirmed"]["actor"] == "alice"
    assert by_action["resumed"]["actor"] == "bob"
    assert by_action["started"]["actor"] == "perfagent"
    assert by_action["canary_review"]["actor"] == "judge:manual"
    assert by_action["step_waiting"]["data"]["record"]["outcome"] == "waiting"
    assert [s["attempts"] for s in body["steps"]] == [1, 1, 1]
    assert [(v["stage"], v["batch"], v["verdict"], v["decided_by"]) for v in body["verdicts"]] == [
        ("CANARY", 0, "pass", "bob"),
        ("ROLLOUT", 1, "pass", "operator"),
        ("ROLLOUT", 2, "pass", "operator"),
    ]
    assert [v["baseline_kind"] for v in body["verdicts"]] == ["unchanged", "unchanged", "before"]

    # Listed, and counted on the agent's own /metrics.
    status, listed = await get(agent, WF)
    assert status == 200
    assert [(w["workflow_id"], w["status"], w["instance_id"]) for w in listed] == [
        (wid, "COMPLETED", "vllm-1")
    ]
    assert set(listed[0]) >= {"workflow_id", "status", "instance_id", "created_at"}
    text = await (await agent.get("/metrics")).text()
    samples = {
        s.labels["status"]: s.value
        for f in text_string_to_metric_families(text)
        if f.name == "perfagent_workflows"
        for s in f.samples
    }
    assert samples["COMPLETED"] == 1 and samples["IN_PROGRESS"] == 0


async def test_nothing_to_do_is_created_completed_with_the_reason(
    aiohttp_client: Any, make_settings: Any, tmp_path: Path
) -> None:
    agent, _ = await start_fleet_agent(aiohttp_client, make_settings, tmp_path)
    status, body = await post(agent, WF, {"instance_id": "solo", "instance_type": "vllm"})
    assert status == 201
    assert (
        body["status"] == "COMPLETED" and body["optimizations"] == [] and body["requires_approval"] is False
    )
    assert body["reason"].startswith("no bottleneck found on solo")
    assert [(s["name"], s["status"]) for s in body["stages"]][:2] == [
        ("ANALYSIS", "COMPLETED"),
        ("APPROVAL", "SKIPPED"),
    ]
    assert actions(body) == ["created"]

    # A queue: the recommendations (more replicas) are advice, never carried out.
    status, body = await post(agent, WF, {"instance_id": "queued"})
    assert status == 201 and body["status"] == "COMPLETED" and body["change"] is None
    assert "vllm.replicas" in [o["id"] for o in body["optimizations"]]
    assert not any(o["selected"] for o in body["optimizations"])
    assert body["reason"].startswith("no optimization can be carried out automatically")
    assert "vllm.replicas changes the deployment, not the engine" in body["reason"]


async def test_analysis_workflow_recommends_only(
    aiohttp_client: Any, make_settings: Any, tmp_path: Path
) -> None:
    agent, _ = await start_fleet_agent(aiohttp_client, make_settings, tmp_path)
    body = await create(agent, workflow_type="analysis")
    assert body["status"] == "COMPLETED" and body["workflow_type"] == "analysis" and body["change"] is None
    assert body["optimizations"] and not any(o["selected"] for o in body["optimizations"])
    assert [s["name"] for s in body["stages"]] == ["ANALYSIS"]
    _, capabilities = await get(agent, "/api/v1/capabilities")
    assert capabilities["capabilities"]["workflows"] == ["optimization", "analysis"]
    # Never blocks its group: an optimization workflow on the same instance opens next to it.
    assert (await create(agent))["status"] == "PENDING_APPROVAL"


async def test_auto_approve_skips_approval(aiohttp_client: Any, make_settings: Any, tmp_path: Path) -> None:
    agent, _ = await start_fleet_agent(aiohttp_client, make_settings, tmp_path)
    created = await create(agent, auto_approve=True)
    assert created["status"] == "APPROVED" and created["requires_approval"] is False
    assert next(s for s in created["stages"] if s["name"] == "APPROVAL")["status"] == "SKIPPED"
    body = await wait_for(agent, created["workflow_id"], waiting("confirm", "CANARY"))
    assert actions(body)[:3] == ["created", "started", "step_started"]
    assert_trail_is_a_chain(body)


async def test_the_judge_follows_the_executor_unless_the_request_chooses(
    aiohttp_client: Any, make_settings: Any, tmp_path: Path
) -> None:
    agent, _ = await start_fleet_agent(aiohttp_client, make_settings, tmp_path)
    # dry_run: a person applies each change, so by default a person judges it too.
    created = await create(agent)
    assert (created["executor"], created["judge"]) == ("dry_run", "manual")
    # Asked for, the statistical judge checks the confirmed change from the engine's metrics.
    status, alone = await post(agent, WF, {"instance_id": "lone", "judge": "statistical"})
    assert status == 201 and (alone["executor"], alone["judge"]) == ("dry_run", "statistical")
    assert alone["batches"] == [["lone"]]
    created_event = alone["events"][0]
    assert created_event["data"]["judge"] == "statistical"


async def test_approve_and_reject_conflicts(aiohttp_client: Any, make_settings: Any, tmp_path: Path) -> None:
    agent, _ = await start_fleet_agent(aiohttp_client, make_settings, tmp_path)
    wid = (await create(agent))["workflow_id"]
    status, rejected = await post(agent, f"{WF}/{wid}/reject", {"reason": "Risk too high for production"})
    assert status == 200
    assert rejected == {
        "workflow_id": wid,
        "status": "REJECTED",
        "rejected_at": rejected["rejected_at"],
        "rejected_by": "operator",
        "reason": "Risk too high for production",
    }
    for action in ("approve", "reject"):
        status, body = await post(agent, f"{WF}/{wid}/{action}")
        assert status == 409
        assert_envelope(body, 409, "CONFLICT")
        assert (
            body["error"]["details"]["workflow_id"] == wid
            and body["error"]["details"]["status"] == "REJECTED"
        )
    for action in ("confirm", "resume", "cancel"):
        status, body = await post(agent, f"{WF}/{wid}/{action}")
        assert status == 409
        assert_envelope(body, 409, "CONFLICT")
    _, body = await get(agent, f"{WF}/{wid}")
    assert actions(body) == ["created", "rejected"]  # refused requests leave no trace
    assert body["rejected_by"] == "operator" and body["reason"] == "Risk too high for production"
    assert_trail_is_a_chain(body)


async def test_concurrent_approvals_exactly_one_wins(
    aiohttp_client: Any, make_settings: Any, tmp_path: Path
) -> None:
    agent, _ = await start_fleet_agent(aiohttp_client, make_settings, tmp_path)
    # Two instances with a full cache in two groups: one race each.
    for instance_id, second, actor in (
        ("vllm-1", "approve", "approved_by"),
        ("lone", "reject", "rejected_by"),
    ):
        wid = (await create(agent, instance_id=instance_id))["workflow_id"]
        results = await asyncio.gather(
            post(agent, f"{WF}/{wid}/approve", {"approved_by": "alice"}),
            post(agent, f"{WF}/{wid}/{second}", {actor: "bob"}),
        )
        assert sorted(status for status, _ in results) == [200, 409], results
        loser = next(body for status, body in results if status == 409)
        assert_envelope(loser, 409, "CONFLICT")
        assert loser["error"]["details"]["workflow_id"] == wid
        _, body = await get(agent, f"{WF}/{wid}")
        decided = [e for e in body["events"] if e["action"] in ("approved", "rejected")]
        assert len(decided) == 1
        winner = next(b for status, b in results if status == 200)
        assert decided[0]["actor"] == winner.get("approved_by", winner.get("rejected_by"))


async def test_one_active_optimization_per_deployment_group(
    aiohttp_client: Any, make_settings: Any, tmp_path: Path
) -> None:
    agent, _ = await start_fleet_agent(aiohttp_client, make_settings, tmp_path)
    first = (await create(agent))["workflow_id"]
    status, body = await post(agent, WF, {"instance_id": "vllm-2"})  # another member of g1
    assert status == 409
    assert_envelope(body, 409, "CONFLICT")
    assert body["error"]["details"]["active_workflow_id"] == first
    assert body["error"]["details"]["deployment_group"] == "g1"
    assert first in body["error"]["message"]
    # Other groups are free; once the first has ended the group is free again.
    assert (await post(agent, WF, {"instance_id": "solo"}))[0] == 201
    await post(agent, f"{WF}/{first}/reject")
    assert (await create(agent))["status"] == "PENDING_APPROVAL"
    status, listed = await get(agent, WF, instance_id="vllm-3")  # a group member finds its group's workflows
    assert status == 200 and len(listed) == 2
    _, listed = await get(agent, WF, status="REJECTED")
    assert [w["workflow_id"] for w in listed] == [first]
    _, listed = await get(agent, WF, limit="1")
    assert len(listed) == 1


async def test_cancel_rolls_back_what_may_be_applied(
    aiohttp_client: Any, make_settings: Any, tmp_path: Path
) -> None:
    agent, _ = await start_fleet_agent(aiohttp_client, make_settings, tmp_path)
    config = {"kv_cache_dtype": "fp8_e5m2", "gpu_memory_utilization": 0.85}  # fp8 KV in use: more memory next
    wid = (await create(agent, auto_approve=True, current_config=config))["workflow_id"]
    await wait_for(agent, wid, waiting("confirm", "CANARY"))
    status, body = await post(agent, f"{WF}/{wid}/cancel", {"reason": "maintenance window closed"})
    assert status == 200 and body["current_stage"] == "ROLLBACK" and body["status"] == "IN_PROGRESS"
    body = await wait_for(agent, wid, waiting("confirm", "ROLLBACK"))
    rollback = body["steps"][-1]
    assert rollback["kind"] == "rollback" and rollback["instance_id"] == "vllm-1"
    # The value given in current_config is what comes back.
    assert body["steps"][0]["settings"] == {"gpu_memory_utilization": 0.92}
    assert rollback["record"]["ran"]["cli_args"] == ["--gpu-memory-utilization", "0.85"]
    status, body = await post(agent, f"{WF}/{wid}/cancel")
    assert status == 409  # already rolling back
    await post(agent, f"{WF}/{wid}/confirm")
    body = await wait_for(agent, wid, lambda b: b["status"] == "ROLLED_BACK")
    assert [(s["name"], s["status"]) for s in body["stages"]][2:] == [
        ("CANARY", "FAILED"),
        ("ROLLOUT", "SKIPPED"),
        ("VALIDATION", "SKIPPED"),
        ("ROLLBACK", "COMPLETED"),
    ]
    cancelled = next(e for e in body["events"] if e["action"] == "cancelled")
    assert cancelled["reason"] == "cancelled by operator: maintenance window closed"
    assert actions(body)[-4:] == ["step_started", "step_waiting", "confirmed", "rolled_back"]
    assert_trail_is_a_chain(body)

    # Before any change, cancelling is rejecting.
    wid = (await create(agent))["workflow_id"]
    status, body = await post(agent, f"{WF}/{wid}/cancel")
    assert status == 200 and body["status"] == "REJECTED" and body["steps"] == []


async def test_failed_canary_verdict_rolls_back(
    aiohttp_client: Any, make_settings: Any, tmp_path: Path
) -> None:
    agent, _ = await start_fleet_agent(aiohttp_client, make_settings, tmp_path)
    wid = (await create(agent, auto_approve=True))["workflow_id"]
    await wait_for(agent, wid, waiting("confirm", "CANARY"))
    status, body = await post(agent, f"{WF}/{wid}/resume")
    assert status == 409  # waiting for confirm, not for a verdict
    assert_envelope(body, 409, "CONFLICT")
    await post(agent, f"{WF}/{wid}/confirm")
    await wait_for(agent, wid, waiting("canary_review"))
    status, body = await post(agent, f"{WF}/{wid}/resume", {"verdict": "fail", "reason": "p99 TTFT doubled"})
    assert status == 200 and body["current_stage"] == "ROLLBACK"
    body = await wait_for(agent, wid, waiting("confirm", "ROLLBACK"))
    assert body["steps"][-1]["settings"] == {"kv_cache_dtype": "auto"}
    await post(agent, f"{WF}/{wid}/confirm")
    body = await wait_for(agent, wid, lambda b: b["status"] == "ROLLED_BACK")
    assert body["reason"] == "canary failed: p99 TTFT doubled"
    assert body["canary"]["verdict"] == "fail"


async def test_current_args_give_a_complete_patch(
    aiohttp_client: Any, make_settings: Any, tmp_path: Path
) -> None:
    agent, _ = await start_fleet_agent(aiohttp_client, make_settings, tmp_path)
    args = ["--model", "meta-llama/Llama-3.1-8B-Instruct", "--kv-cache-dtype=auto", "--max-num-seqs", "256"]
    wid = (await create(agent, auto_approve=True, current_args=args))["workflow_id"]
    body = await wait_for(agent, wid, waiting("confirm", "CANARY"))
    ran = body["steps"][0]["record"]["ran"]
    assert ran["args_complete"] is True
    assert ran["kubernetes_patch"]["spec"]["template"]["spec"]["containers"] == [
        {
            "name": "vllm",
            "args": [
                "--model",
                "meta-llama/Llama-3.1-8B-Instruct",
                "--max-num-seqs",
                "256",
                "--kv-cache-dtype",
                "fp8",
            ],
        }
    ]


async def test_bad_requests_get_the_envelope(aiohttp_client: Any, make_settings: Any, tmp_path: Path) -> None:
    agent, _ = await start_fleet_agent(aiohttp_client, make_settings, tmp_path)
    cases: list[tuple[str, str, Any, int, str, dict[str, Any]]] = [
        ("GET", f"{WF}/wf-nope", None, 404, "NOT_FOUND", {"workflow_id": "wf-nope"}),
        ("POST", f"{WF}/wf-nope/approve", None, 404, "NOT_FOUND", {"workflow_id": "wf-nope"}),
        ("POST", f"{WF}/wf-nope/cancel", {}, 404, "NOT_FOUND", {}),
        ("POST", WF, {"instance_id": "nobody"}, 404, "NOT_FOUND", {"instance_id": "nobody"}),
        (
            "POST",
            WF,
            {"instance_id": "vllm-1", "instance_type": "tgi"},
            400,
            "VALIDATION_ERROR",
            {"field": "instance_type", "allowed_values": ["vllm"]},
        ),
        (
            "POST",
            WF,
            {"instance_id": "vllm-1", "instance_type": "triton"},
            400,
            "VALIDATION_ERROR",
            {"field": "instance_type", "allowed_values": ["vllm", "tgi", "sglang"]},
        ),
        (
            "POST",
            WF,
            {"instance_id": "vllm-1", "workflow_type": "yolo"},
            400,
            "VALIDATION_ERROR",
            {"field": "workflow_type", "allowed_values": ["optimization", "analysis"]},
        ),
        (
            "POST",
            WF,
            {"instance_id": "vllm-1", "executor": "ssh"},
            400,
            "VALIDATION_ERROR",
            {"field": "executor", "allowed_values": ["dry_run", "http", "sim"]},
        ),
        (
            "POST",
            WF,
            {"instance_id": "vllm-1", "auto_approve": "maybe"},
            400,
            "VALIDATION_ERROR",
            {"field": "auto_approve"},
        ),
        (
            "POST",
            WF,
            {"instance_id": "vllm-1", "judge": "oracle"},
            400,
            "VALIDATION_ERROR",
            {"field": "judge", "allowed_values": ["statistical", "manual"]},
        ),
        ("POST", WF, {"instance_type": "vllm"}, 400, "VALIDATION_ERROR", {"field": "instance_id"}),
        ("POST", WF, [1, 2], 400, "VALIDATION_ERROR", {"field": "body"}),
        (
            "POST",
            f"{WF}/wf-nope/approve",
            {"approved_by": "x", "sudo": True},
            400,
            "VALIDATION_ERROR",
            {"field": "sudo"},
        ),
        (
            "POST",
            f"{WF}/wf-nope/resume",
            {"verdict": "maybe"},
            400,
            "VALIDATION_ERROR",
            {"field": "verdict", "allowed_values": ["pass", "fail"]},
        ),
        ("POST", f"{WF}/wf-nope/reject", {"reason": 3}, 400, "VALIDATION_ERROR", {"field": "reason"}),
    ]
    for method, path, body, status, code, details in cases:
        response = await agent.request(method, path, json=body)
        got = await response.json()
        assert response.status == status, (path, body, got)
        assert_envelope(got, status, code)
        assert details.items() <= got["error"]["details"].items(), (path, body, got)
    # Advice is never carried out: the optimizations that can be are named (which ones depends on the
    # metrics of the moment, e.g. whether preemptions were seen yet).
    status, got = await post(agent, WF, {"instance_id": "vllm-1", "optimization_id": "vllm.replicas"})
    assert status == 400
    assert_envelope(got, 400, "VALIDATION_ERROR")
    allowed = got["error"]["details"]["allowed_values"]
    assert got["error"]["details"]["field"] == "optimization_id"
    assert "vllm.kv-cache-fp8" in allowed and "vllm.replicas" not in allowed
    response = await agent.post(WF, data=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status == 400
    assert_envelope(await response.json(), 400, "VALIDATION_ERROR")
    for params, field in (
        ({"status": "DONE"}, "status"),
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"colour": "red"}, "colour"),
    ):
        status, got = await get(agent, WF, **params)
        assert status == 400, params
        assert_envelope(got, 400, "VALIDATION_ERROR")
        assert got["error"]["details"]["field"] == field
    _, got = await get(agent, WF, status="DONE")
    assert got["error"]["details"]["allowed_values"] == [
        "PENDING_APPROVAL",
        "APPROVED",
        "REJECTED",
        "IN_PROGRESS",
        "COMPLETED",
        "FAILED",
        "ROLLED_BACK",
    ]
    # Nothing of the above created or changed anything.
    assert (await get(agent, WF))[1] == []
