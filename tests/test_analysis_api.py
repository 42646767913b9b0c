"""POST /analysis/detect-bottlenecks, GET /analysis/findings and POST /optimization/recommend over HTTP."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from perfagent.app import create_app
from tests.conftest import capture
from tests.test_error_shape import assert_envelope

SPEC_METRICS = {
    "request_metrics": {
        "success_total": 1000,
        "failure_total": 10,
        "time_to_first_token_seconds": 0.05,
        "time_per_output_token_seconds": 0.02,
        "e2e_request_latency_seconds": 1.5,
    },
    "gpu_metrics": {
        "cache_usage_perc": 75.5,
        "memory_usage_bytes": 8589934592,
        "num_requests_running": 5,
        "num_requests_waiting": 2,
    },
    "throughput_metrics": {
        "tokens_per_second": 500.0,
        "generation_tokens_total": 50000,
        "prompt_tokens_total": 25000,
    },
}


async def _detect(agent: Any, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    response = await agent.post("/api/v1/analysis/detect-bottlenecks", json=body)
    return response.status, await response.json()


async def test_spec_example_metrics_are_healthy(agent: Any) -> None:
    """The spec's collect example: 75.5% KV, 2 waiting, fast tokens — no rule's threshold is crossed."""
    status, body = await _detect(agent, {"instance_id": "vllm-1", "metrics": SPEC_METRICS})
    assert status == 200, body
    assert body["instance_id"] == "vllm-1"
    assert body["bottlenecks"] == []
    assert body["analysis_timestamp"].endswith("Z")
    # What the example does not carry (latency percentiles) is listed, not guessed.
    assert {"rule": "HighTTFT", "quantity": "ttft_seconds_p99"} in [
        {"rule": i["rule"], "quantity": i["quantity"]} for i in body["insufficient_data"]
    ]


async def test_saturated_metrics_yield_typed_bottlenecks(agent: Any) -> None:
    metrics = {
        "gpu_metrics": {"cache_usage_perc": 96.0, "num_requests_waiting": 30, "num_requests_running": 200},
        "cache_metrics": {"preemption_rate": 2.0},
    }
    status, body = await _detect(
        agent, {"instance_id": "vllm-1", "instance_type": "vllm", "metrics": metrics}
    )
    assert status == 200, body
    found = {b["rule"]: b for b in body["bottlenecks"]}
    memory = found["KVCachePreemption"]
    assert (memory["type"], memory["severity"]) == ("MEMORY_PRESSURE", "CRITICAL")
    assert (memory["metric_name"], memory["current_value"], memory["threshold_value"]) == (
        "kv_cache_usage",
        0.96,
        0.95,
    )
    assert memory["unit"] == "ratio"
    assert memory["recommendation"]
    assert memory["evidence"]["source"] == "metrics"
    queue = found["QueueBuildup"]
    assert (queue["type"], queue["severity"], queue["current_value"]) == ("QUEUE_BUILDUP", "HIGH", 30.0)
    # Rules lacking data never appear as bottlenecks.
    assert not {i["rule"] for i in body["insufficient_data"]} & {b["rule"] for b in body["bottlenecks"]}


async def test_engine_specific_rules_follow_instance_type(agent: Any) -> None:
    metrics = {"gpu_metrics": {"cache_usage_perc": 40.0, "num_requests_waiting": 12}}
    _, sglang = await _detect(agent, {"instance_id": "s", "instance_type": "sglang", "metrics": metrics})
    _, vllm = await _detect(agent, {"instance_id": "v", "instance_type": "vllm", "metrics": metrics})
    assert "SGLangConservativeScheduling" in {b["rule"] for b in sglang["bottlenecks"]}
    assert "SGLangConservativeScheduling" not in {b["rule"] for b in vllm["bottlenecks"]}


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("vllm-v1-recent", set()),  # idle
        ("vllm-v0-0.5.x", set()),  # one request served
        ("vllm-v0-llama3.1", set()),  # light traffic: 3 running, 5 waiting (the first rung is "more than 5")
        ("tgi-3.x", {"HighTTFT"}),  # its approximated TTFT p99 is above 8 s (checked below)
        ("sglang-0.3.x", set()),
        ("sglang-0.5.10", set()),
    ],
)
async def test_fixtures_yield_what_their_numbers_support(
    agent: Any, targets: Any, prefix: str, expected: set[str]
) -> None:
    """Each capture, collected and analysed: only what its own numbers cross fires."""
    engine = prefix.split("-")[0]
    server = await targets()
    url = str(server.make_url(f"/f/{capture(prefix).name}"))
    collected = await (
        await agent.post(
            "/api/v1/metrics/collect", json={"instance_id": "f", "instance_type": engine, "metrics_url": url}
        )
    ).json()
    status, body = await _detect(agent, {"instance_id": "f", "instance_type": engine, "metrics": collected})
    assert status == 200, body
    assert {b["rule"] for b in body["bottlenecks"]} == expected
    waiting = collected["gpu_metrics"]["num_requests_waiting"]
    assert waiting is None or waiting <= 5  # QueueBuildup's first rung is "more than 5"
    for bottleneck in body["bottlenecks"]:  # the value is the collected one, past the reported rung
        assert bottleneck["current_value"] == collected["quantities"][bottleneck["metric_name"]]
        assert bottleneck["current_value"] > bottleneck["threshold_value"]


async def test_history_mode_and_errors(agent: Any) -> None:
    status, body = await _detect(agent, {"instance_id": "nobody"})
    assert status == 404
    assert_envelope(body, 404, "NOT_FOUND")
    status, body = await _detect(agent, {"instance_id": "x", "metrics": {"gpu_metrics": {"cache_usage": 5}}})
    assert status == 400
    assert body["error"]["details"]["field"] == "metrics.gpu_metrics.cache_usage"
    assert "cache_usage_perc" in body["error"]["details"]["allowed_values"]
    status, body = await _detect(
        agent, {"instance_id": "x", "metrics": {"gpu_metrics": {"cache_usage_perc": "full"}}}
    )
    assert status == 400
    status, body = await _detect(agent, {"instance_id": "x", "instance_type": "triton"})
    assert status == 400
    assert body["error"]["details"]["allowed_values"] == ["vllm", "tgi", "sglang"]
    response = await agent.get("/api/v1/analysis/findings", params={"severity": "SEVERE"})
    assert response.status == 400
    assert (await response.json())["error"]["details"]["field"] == "severity"


FAST_QUEUE_RULE = """
groups:
  - name: fast
    rules:
      - name: QueueBuildup     # replaces the built-in: no `for`, so the test needs no minutes
        type: QUEUE_BUILDUP
        quantity: requests_waiting
        op: ">"
        thresholds: {MEDIUM: 5, HIGH: 20}
        keep_firing_for: 0s
        recommendation: Add replicas.
"""


async def test_poller_raises_findings_listed_and_exported(
    aiohttp_client: Any, make_settings: Any, tmp_path: Path
) -> None:
    """Real time, real HTTP: a queue on a target makes the poller's evaluation fire a finding, which the
    findings API lists and the agent's /metrics exports; when the queue drains it resolves."""
    from aiohttp import web

    state = {"waiting": 30}

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            text="# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{model_name="m",engine="0"}} {state["waiting"]}\n'
            "# TYPE vllm:num_requests_running gauge\n"
            'vllm:num_requests_running{model_name="m",engine="0"} 8\n'
        )

    target = web.Application()
    target.router.add_get("/metrics", metrics)
    target_client = await aiohttp_client(target)
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "fast.yaml").write_text(FAST_QUEUE_RULE)
    settings = make_settings(
        polling_interval=0.3,
        rules_dir=tmp_path / "rules",
        instances=[{"id": "q", "engine": "vllm", "metrics_url": str(target_client.make_url("/metrics"))}],
    )
    agent = await aiohttp_client(create_app(settings))

    async def findings(**params: str) -> list[dict[str, Any]]:
        body = await (await agent.get("/api/v1/analysis/findings", params=params)).json()
        result: list[dict[str, Any]] = body["findings"]
        return result

    for _ in range(50):
        if await findings(active="true"):
            break
        await asyncio.sleep(0.1)
    active = await findings(active="true", type="QUEUE_BUILDUP")
    assert [(f["instance_id"], f["rule"], f["severity"]) for f in active] == [("q", "QueueBuildup", "HIGH")]
    assert active[0]["value"] == 30 and active[0]["threshold"] == 20
    text = await (await agent.get("/metrics")).text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    exported = [s.labels for s in families["perfagent_bottleneck_active"].samples]
    assert exported == [
        {"instance": "q", "type": "QUEUE_BUILDUP", "severity": "HIGH", "rule": "QueueBuildup"}
    ]
    assert families["perfagent_rule_evaluations"].samples[0].value >= 1

    state["waiting"] = 0
    for _ in range(50):
        if not await findings(active="true"):
            break
        await asyncio.sleep(0.1)
    resolved = await findings(active="false")
    assert len(resolved) == 1 and resolved[0]["resolved_at"] is not None
    assert await findings(active="true") == []


async def test_recommend_spec_example(agent: Any) -> None:
    body = {
        "instance_id": "vllm-1",
        "instance_type": "vllm",
        "bottlenecks": [{"type": "MEMORY_PRESSURE", "severity": "HIGH", "description": "High memory usage"}],
        "current_config": {"max_batch_size": 32, "quantization": None},
    }
    response = await agent.post("/api/v1/optimization/recommend", json=body)
    assert response.status == 200
    answer = await response.json()
    assert answer["instance_id"] == "vllm-1"
    assert answer["recommendation_timestamp"].endswith("Z")
    by_type = {o["type"]: o for o in answer["optimizations"]}
    assert {"KV_CACHE", "QUANTIZATION"} <= set(by_type)
    for optimization in answer["optimizations"]:
        assert {"priority", "description", "estimated_improvement", "config_changes", "risks"} <= set(
            optimization
        )
    kv_changes = [o["config_changes"] for o in answer["optimizations"] if o["type"] == "KV_CACHE"]
    assert {"kv_cache_dtype": "fp8"} in kv_changes  # a real vLLM flag, not a generic key
    batching = next(o for o in answer["optimizations"] if o["type"] == "BATCHING")
    assert batching["config_changes"] == {"max_num_seqs": 16}  # the spec's max_batch_size: 32, halved
    assert by_type["QUANTIZATION"]["requires_new_weights"] is True
    assert by_type["QUANTIZATION"]["auto_applicable"] is False
    bad = await agent.post("/api/v1/optimization/recommend", json={**body, "instance_type": "triton"})
    assert bad.status == 400
    assert_envelope(await bad.json(), 400, "VALIDATION_ERROR")
