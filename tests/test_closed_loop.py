"""The loop closed over real HTTP: `perfagent sim` (the real simulator server, real clock at 30x) on
loopback, the real agent polling it into a real DuckDB file, the real sim executor changing the
simulated engines and the statistical judge deciding from what they report.

A deployment group of three vLLM instances is overloaded through the simulator's control API. The
agent detects it, recommends, and a workflow carries the recommended change through approval, the
canary, two judged rollout batches and validation to COMPLETED with the finding resolved. A harmful
change (fewer sequences under a decode-heavy load) is judged worse on the canary and rolled back by
itself. The DuckDB file holds every step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import duckdb
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from perfagent.app import create_app
from perfagent.settings import Settings
from perfagent.sim.fleet import SimFleet
from perfagent.sim.server import build_app
from tests.conftest import AiohttpClient, AiohttpServer
from tests.test_workflows_api import actions, assert_trail_is_a_chain

Client = TestClient[web.Request, web.Application]
API, WF = "/api/v1", "/api/v1/workflows"
SPEED = 30.0  # simulated seconds per second: the 10 s restart takes 0.33 s, a minute of load 2 s
GROUP = ("vllm-0", "vllm-1", "vllm-2")

# Rules without `for`, on windows of seconds (the built-in ones wait minutes before firing). The KV
# rule's CRITICAL rung puts fp8 KV first among the recommendations, as on a real fleet.
KV_RULES = """
groups:
  - name: closed-loop
    rules:
      - name: FastKVPreemption
        type: MEMORY_PRESSURE
        engines: [vllm]
        quantity: kv_cache_usage
        op: ">"
        over: 3s
        reduce: max
        thresholds: {HIGH: 0.9, CRITICAL: 0.95}
        and:
          - { quantity: preemption_rate, op: ">", value: 0 }
        keep_firing_for: 2s
        recommendation: Store the KV cache in fp8.
"""
ITL_RULES = """
groups:
  - name: closed-loop
    rules:
      - name: FastSlowDecode
        type: HIGH_LATENCY
        engines: [vllm]
        quantity: itl_seconds
        op: ">"
        over: 3s
        reduce: mean
        thresholds: {HIGH: 0.04}
        keep_firing_for: 2s
        recommendation: Fewer sequences per step.
"""


@dataclass
class Loop:
    agent: Client
    sim: TestServer
    fleet: SimFleet
    db: Path


async def start_loop(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: Callable[..., Settings],
    tmp_path: Path,
    *,
    rules: str,
    knobs: dict[str, Any] | None = None,
    canary_warmup: float = 3.0,
    canary_window: float = 3.0,
) -> Loop:
    """Three simulated vLLM instances at the steady load (group g1), and the agent watching them."""
    fleet = SimFleet(
        "vllm", 3, seed=7, clock="real", speed=SPEED, restart_seconds=10, settings={"vllm": knobs or {}}
    )
    sim = await aiohttp_server(build_app(fleet))
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "fast.yaml").write_text(rules)
    instances = [
        {
            "id": name,
            "engine": "vllm",
            "metrics_url": str(sim.make_url(f"/instances/{name}/metrics")),
            "labels": {"deployment_group": "g1"},
        }
        for name in GROUP
    ]
    settings = make_settings(
        instances=instances,
        rules_dir=tmp_path / "rules",
        polling_interval=0.25,
        history_flush_interval=0.25,
        # By default 90 s of simulated time each: the warm-up covers the restart and the ramp up to
        # a steady batch; the window is the floor of 12 polls (3 s).
        canary_warmup=canary_warmup,
        canary_window=canary_window,
        workflow_validation_delay=1.0,
    )
    agent: Client = await aiohttp_client(create_app(settings))
    return Loop(agent, sim, fleet, settings.db_path)


async def sim_call(loop: Loop, method: str, path: str, body: Any = None) -> Any:
    """The simulator's control API, over HTTP as an operator would use it."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, loop.sim.make_url(path), json=body) as response,
    ):
        assert response.status == 200, await response.text()
        return await response.json()


async def get(loop: Loop, path: str, **params: str) -> Any:
    response = await loop.agent.get(path, params=params)
    assert response.status == 200, await response.text()
    return await response.json()


async def post(loop: Loop, path: str, body: Any = None) -> tuple[int, Any]:
    response = await loop.agent.post(path, json=body if body is not None else {})
    return response.status, await response.json()


async def until(check: Callable[[], Any], what: str, seconds: float = 30.0) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        found = await check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {seconds:g} s")
        await asyncio.sleep(0.2)


async def firing(loop: Loop, rule: str, instance_id: str) -> Any:
    async def check() -> Any:
        found = await get(loop, f"{API}/analysis/findings", active="true", instance_id=instance_id)
        return [f for f in found["findings"] if f["rule"] == rule and f["fired_at"]]

    return await until(check, f"{rule} firing on {instance_id}")


async def ended(loop: Loop, wid: str, seconds: float) -> dict[str, Any]:
    async def check() -> Any:
        body = await get(loop, f"{WF}/{wid}")
        return body if body["status"] not in ("APPROVED", "IN_PROGRESS") or body["waiting_for"] else None

    body: dict[str, Any] = await until(check, f"workflow {wid} to end", seconds)
    return body


def history(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Read the agent's DuckDB file (after the agent has closed it)."""
    with duckdb.connect(str(db), read_only=True) as conn:
        return conn.execute(sql, list(params)).fetchall()


def explain(body: dict[str, Any]) -> str:
    """The verdicts' per-metric decisions, for a failure message."""
    lines = [f"{body['status']}: {body['reason']}"]
    for v in body["verdicts"]:
        lines.append(f"{v['stage']} {v['batch']} {v['verdict']}: {v['reason']}")
        for m in (v["statistics"] or {}).get("metrics", []):
            lines.append(f"  {m['name']}: {m['decision']} - {m['reason']} (spread x{m['spread_ratio']})")
    return "\n".join(lines)


def assert_statistics(verdict: dict[str, Any]) -> None:
    """The judge's evidence is there: per metric n, U, p and the effect size, on both sides."""
    metrics = {m["name"]: m for m in verdict["statistics"]["metrics"]}
    assert set(metrics) == {"ttft", "itl", "e2e_latency", "throughput", "error_rate", "preemption_rate"}
    for name in ("ttft", "itl", "e2e_latency", "throughput"):
        m = metrics[name]
        assert m["n_canary"] >= 10 and m["n_baseline"] >= 10, m
        assert m["u"] is not None and m["p_worse"] is not None and m["effect_size"] is not None, m
    assert verdict["statistics"]["correction"] == "holm" and verdict["window"]["since"]


async def test_overload_detected_fixed_canaried_rolled_out_and_resolved(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: Any, tmp_path: Path
) -> None:
    loop = await start_loop(aiohttp_server, aiohttp_client, make_settings, tmp_path, rules=KV_RULES)
    # Overload the group: long contexts that outgrow the KV cache, through the simulator's control API.
    await sim_call(loop, "POST", "/load", {"scenario": "kv_exhaustion"})
    await firing(loop, "FastKVPreemption", "vllm-0")

    status, created = await post(loop, WF, {"instance_id": "vllm-0", "instance_type": "vllm"})
    assert status == 201, created
    assert created["status"] == "PENDING_APPROVAL"
    assert "FastKVPreemption" in [b["rule"] for b in created["bottlenecks"]]
    assert created["change"]["optimization_id"] == "vllm.kv-cache-fp8"
    assert created["change"]["settings"] == {"kv_cache_dtype": "fp8"}
    # What the simulator reports is what the change starts from and what a rollback would restore.
    assert created["change"]["previous"] == {name: {"kv_cache_dtype": "auto"} for name in GROUP}
    assert (created["executor"], created["judge"]) == ("sim", "statistical")
    assert created["batches"] == [["vllm-0"], ["vllm-1"], ["vllm-2"]]
    wid = created["workflow_id"]
    status, approved = await post(loop, f"{WF}/{wid}/approve", {"approved_by": "alice"})
    assert status == 200 and approved["status"] == "APPROVED"

    body = await ended(loop, wid, seconds=40)
    assert body["status"] == "COMPLETED", explain(body)
    assert body["validation"]["outcome"] == "resolved", body["validation"]
    assert body["reason"] == "the addressed findings are gone"
    assert all(s["status"] == "COMPLETED" for s in body["stages"]), body["stages"]
    # Every batch judged by the statistics, none by a person: the canary and batch 1 against the
    # instances not changed yet, the last batch against its own history before the change.
    verdicts = body["verdicts"]
    assert [
        (v["stage"], v["batch"], v["instances"], v["baseline"], v["baseline_kind"]) for v in verdicts
    ] == [
        ("CANARY", 0, ["vllm-0"], ["vllm-1", "vllm-2"], "unchanged"),
        ("ROLLOUT", 1, ["vllm-1"], ["vllm-2"], "unchanged"),
        ("ROLLOUT", 2, ["vllm-2"], [], "before"),
    ]
    assert verdicts[2]["window"]["baseline_until"] <= verdicts[2]["window"]["since"]
    assert all(v["verdict"] == "pass" and v["decided_by"] == "judge:statistical" for v in verdicts)
    for verdict in verdicts:
        assert_statistics(verdict)
        # Confirmed from the engine's own info metric, before anything was judged.
        [report] = verdict["effect"]
        [check] = report["checks"]
        assert (check["status"], check["source"]) == ("confirmed", "vllm:cache_config_info{cache_dtype}")
    canary = {m["name"]: m for m in verdicts[0]["statistics"]["metrics"]}
    assert canary["preemption_rate"]["decision"] == "better", canary["preemption_rate"]
    assert body["canary"]["verdict"] == "pass" and body["canary"]["decided_by"] == "judge:statistical"
    assert "canary_review" not in actions(body) and "confirmed" not in actions(body)
    assert_trail_is_a_chain(body)

    # The simulator ran each step once: one restart per instance, fp8 everywhere.
    views = {v["id"]: v for v in (await sim_call(loop, "GET", "/instances"))["instances"]}
    assert {n: (v["settings"]["kv_cache_dtype"], v["restarts"]) for n, v in views.items()} == {
        n: ("fp8", 1) for n in GROUP
    }

    # The bottleneck is gone: its findings resolve once their keep_firing_for has passed.
    async def resolved() -> bool:
        active = await get(loop, f"{API}/analysis/findings", active="true")
        return not [f for f in active["findings"] if f["rule"] == "FastKVPreemption"]

    await until(resolved, "FastKVPreemption to resolve", 10)

    # Beside its prior, the recommendation now shows what fp8 KV did here.
    status, advice = await post(
        loop,
        f"{API}/optimization/recommend",
        {
            "instance_id": "vllm-0",
            "instance_type": "vllm",
            "bottlenecks": [{"type": "MEMORY_PRESSURE", "severity": "HIGH"}],
        },
    )
    assert status == 200, advice
    fp8 = next(o for o in advice["optimizations"] if o["id"] == "vllm.kv-cache-fp8")
    assert fp8["estimated_improvement"]["memory_reduction"] == 0.5  # the prior, unchanged
    observed = fp8["observed"]
    assert (observed["workflows"], observed["canaries"], observed["batches"]) == (1, 1, 3)
    assert (observed["passed"], observed["failed"]) == (3, 0)
    assert observed["scope"] == "engine vllm"
    assert observed["median_relative_change"]["preemption_rate"] < 0
    assert (
        next(o for o in advice["optimizations"] if o["id"] == "vllm.gpu-memory-utilization")["observed"]
        is None
    )
    await loop.agent.close()

    # The DuckDB file shows every step.
    rows = history(loop.db, "SELECT action FROM workflow_events WHERE workflow_id = ? ORDER BY seq", wid)
    assert [r[0] for r in rows] == actions(body)
    assert actions(body) == [
        "created",
        "approved",
        "started",
        *["step_started", "step_applied", "judged"] * 3,
        "rollout_completed",
        "validated",
    ]
    steps = history(
        loop.db,
        "SELECT stage, instance_id, state, outcome, attempts FROM workflow_steps WHERE workflow_id = ? ORDER BY n",
        wid,
    )
    assert steps == [
        ("CANARY", "vllm-0", "done", "applied", 1),
        ("ROLLOUT", "vllm-1", "done", "applied", 1),
        ("ROLLOUT", "vllm-2", "done", "applied", 1),
    ]
    stored = history(
        loop.db,
        "SELECT stage, batch, optimization_id, baseline_kind, verdict FROM workflow_verdicts "
        "WHERE workflow_id = ? ORDER BY batch",
        wid,
    )
    assert stored == [
        ("CANARY", 0, "vllm.kv-cache-fp8", "unchanged", "pass"),
        ("ROLLOUT", 1, "vllm.kv-cache-fp8", "unchanged", "pass"),
        ("ROLLOUT", 2, "vllm.kv-cache-fp8", "before", "pass"),
    ]
    # ... and the scrapes the verdicts rest on: every instance before and after its change.
    scraped = history(
        loop.db,
        "SELECT instance_id, count(*) FILTER (WHERE kv_cache_usage > 0.9), count(*) FILTER (WHERE ok) "
        "FROM scrapes GROUP BY instance_id ORDER BY instance_id",
    )
    assert [r[0] for r in scraped] == list(GROUP) and all(r[1] > 0 and r[2] > 20 for r in scraped), scraped


async def test_a_harmful_change_is_judged_worse_and_rolled_back(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: Any, tmp_path: Path
) -> None:
    # Batches of up to 384 sequences keep up with a decode-heavy load, at a high inter-token latency;
    # 192 cannot: a queue builds on the canary. Both capacities are near the preset's 7 req/s (the
    # decode step grows with the batch), so bursts of arrivals can queue the baseline for a while and
    # the canary's queue takes minutes to stand out. Offline, in the simulator (seeds x how long the
    # rule took to fire): a 150 s warm-up and a 90 s window judged 7 of 40 "no change"; at 7.4/s the
    # baseline queues too; a 240 s warm-up and a 180 s window at 7/s judged 159 of 160 worse.
    loop = await start_loop(
        aiohttp_server,
        aiohttp_client,
        make_settings,
        tmp_path,
        rules=ITL_RULES,
        knobs={"max_num_seqs": 384},
        canary_warmup=8.0,
        canary_window=6.0,
    )
    await sim_call(loop, "POST", "/load", {"scenario": "slow_decode"})
    await firing(loop, "FastSlowDecode", "vllm-0")
    # The operator picks halving max_num_seqs for the latency: too few slots for this load.
    status, created = await post(
        loop,
        WF,
        {"instance_id": "vllm-0", "optimization_id": "vllm.fewer-seqs-itl", "auto_approve": True},
    )
    assert status == 201, created
    assert created["change"]["settings"]["max_num_seqs"] == 192
    previous = created["change"]["previous"]["vllm-0"]
    assert previous == {"max_num_seqs": 384, "max_num_batched_tokens": 8192}
    wid = created["workflow_id"]

    body = await ended(loop, wid, seconds=45)
    assert body["status"] == "ROLLED_BACK", explain(body)
    assert len(body["verdicts"]) == 1, explain(body)  # the canary's: nothing went further
    [verdict] = body["verdicts"]
    assert (verdict["stage"], verdict["verdict"], verdict["decided_by"]) == (
        "CANARY",
        "fail",
        "judge:statistical",
    )
    assert_statistics(verdict)
    assert "ttft" in verdict["failing_metrics"], explain(body)
    ttft = next(m for m in verdict["statistics"]["metrics"] if m["name"] == "ttft")
    assert ttft["decision"] == "worse" and ttft["effect_size"] > 0.33, explain(body)
    assert ttft["p_worse_adjusted"] <= 0.05, ttft
    # The workflow names the failing metrics.
    assert body["reason"].startswith("canary failed: worse on "), body["reason"]
    for name in verdict["failing_metrics"]:
        assert name in body["reason"]
    assert [(s["name"], s["status"]) for s in body["stages"]][2:] == [
        ("CANARY", "FAILED"),
        ("ROLLOUT", "SKIPPED"),
        ("VALIDATION", "SKIPPED"),
        ("ROLLBACK", "COMPLETED"),
    ]
    canary, rollback = body["steps"]
    assert (canary["outcome"], canary["record"]["returned"]["restarted"]) == ("applied", True)
    assert (rollback["kind"], rollback["instance_id"], rollback["settings"]) == (
        "rollback",
        "vllm-0",
        previous,
    )
    assert rollback["record"]["ran"]["body"] == previous
    assert_trail_is_a_chain(body)
    assert actions(body) == [
        "created",
        "started",
        "step_started",
        "step_applied",
        "judged",
        "step_started",
        "step_applied",
        "rolled_back",
    ]

    # The canary has its settings back; the others never changed.
    views = {v["id"]: v for v in (await sim_call(loop, "GET", "/instances"))["instances"]}
    assert views["vllm-0"]["settings"]["max_num_seqs"] == 384
    assert views["vllm-0"]["settings"]["max_num_batched_tokens"] == 8192
    assert {n: v["restarts"] for n, v in views.items()} == {"vllm-0": 2, "vllm-1": 0, "vllm-2": 0}

    # The failure is on record for the next recommendation.
    status, advice = await post(
        loop,
        f"{API}/optimization/recommend",
        {
            "instance_id": "vllm-0",
            "instance_type": "vllm",
            "bottlenecks": [{"type": "HIGH_LATENCY", "severity": "HIGH", "metric_name": "itl_seconds"}],
            "current_config": {"max_num_seqs": 384},
        },
    )
    assert status == 200, advice
    observed = next(o for o in advice["optimizations"] if o["id"] == "vllm.fewer-seqs-itl")["observed"]
    assert (observed["canaries"], observed["batches"], observed["passed"], observed["failed"]) == (1, 1, 0, 1)
    assert observed["median_relative_change"]["ttft"] > 0
    await loop.agent.close()
    rows = history(
        loop.db,
        "SELECT stage, kind, outcome FROM (SELECT stage, json_extract_string(doc, '$.kind') AS kind, outcome, "
        "started_at FROM workflow_steps WHERE workflow_id = ?) ORDER BY started_at",
        wid,
    )
    assert rows == [("CANARY", "apply", "applied"), ("ROLLBACK", "rollback", "applied")]
    stored = history(
        loop.db, "SELECT verdict, doc->>'$.failing_metrics' FROM workflow_verdicts WHERE workflow_id = ?", wid
    )
    assert stored[0][0] == "fail" and "ttft" in stored[0][1]
