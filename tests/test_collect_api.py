"""POST /metrics/collect against loopback servers serving the real captures: the numbers the API
returns equal what the test computes by hand from the capture text."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import capture

Client = TestClient[web.Request, web.Application]
Targets = Callable[..., Awaitable[TestServer]]

_LABEL = re.compile(r'(\w+)="([^"]*)"')


def series(text: str, metric: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of exactly `metric` in `text`: a plain scan, independent of the agent's parser."""
    out = []
    for line in text.splitlines():
        if not line.startswith(metric) or line.startswith("#"):
            continue
        rest = line[len(metric) :]
        if rest[:1] not in {"{", " "}:
            continue  # a longer name sharing the prefix
        labels = dict(_LABEL.findall(rest.split("}")[0])) if rest.startswith("{") else {}
        out.append((labels, float(line.rsplit(" ", 1)[1])))
    return out


def total(text: str, metric: str, **match: str) -> float | None:
    found = [v for labels, v in series(text, metric) if all(labels.get(k) == w for k, w in match.items())]
    return sum(found) if found else None


def highest(text: str, metric: str) -> float | None:
    found = [v for _, v in series(text, metric)]
    return max(found) if found else None


def mean(text: str, histogram: str, **match: str) -> float | None:
    count = total(text, f"{histogram}_count", **match)
    if not count:
        return None
    s = total(text, f"{histogram}_sum", **match)
    assert s is not None
    return s / count


@dataclass(frozen=True)
class Expected:
    running: float | None
    waiting: float | None
    cache_perc: float | None
    ttft_mean: float | None
    prompt_tokens: float | None
    generation_tokens: float | None


def _vllm(text: str) -> Expected:
    usage = highest(text, "vllm:kv_cache_usage_perc")
    if usage is None:
        usage = highest(text, "vllm:gpu_cache_usage_perc")
    return Expected(
        running=total(text, "vllm:num_requests_running"),
        waiting=total(text, "vllm:num_requests_waiting"),
        cache_perc=None if usage is None else usage * 100,
        ttft_mean=mean(text, "vllm:time_to_first_token_seconds"),
        prompt_tokens=total(text, "vllm:prompt_tokens_total"),
        generation_tokens=total(text, "vllm:generation_tokens_total"),
    )


def _tgi(text: str) -> Expected:
    queue = mean(text, "tgi_request_queue_duration")
    prefill = mean(text, "tgi_batch_inference_duration", method="prefill")
    return Expected(
        running=total(text, "tgi_batch_current_size"),
        waiting=total(text, "tgi_queue_size"),
        cache_perc=None,  # TGI exports no KV capacity
        ttft_mean=None if queue is None or prefill is None else queue + prefill,
        prompt_tokens=total(text, "tgi_request_input_length_sum"),
        generation_tokens=total(text, "tgi_request_generated_tokens_sum"),
    )


def _sglang(text: str) -> Expected:
    running = highest(text, "sglang:num_running_reqs")
    waiting = highest(text, "sglang:num_queue_reqs")
    if running is None:  # v0.3.x names
        running = highest(text, "sglang:num_requests_running")
        waiting = highest(text, "sglang:num_requests_waiting")
    usage = highest(text, "sglang:token_usage")
    return Expected(
        running=running,
        waiting=waiting,
        cache_perc=None if usage is None else usage * 100,
        ttft_mean=mean(text, "sglang:time_to_first_token_seconds"),
        prompt_tokens=highest(text, "sglang:prompt_tokens_total"),
        generation_tokens=highest(text, "sglang:generation_tokens_total"),
    )


CASES = [
    ("vllm-v1-recent", "vllm", _vllm),
    ("vllm-v0-0.5.x", "vllm", _vllm),
    ("vllm-v0-llama3.1", "vllm", _vllm),
    ("vllm-HYBRID", "vllm", _vllm),
    ("tgi-3.x", "tgi", _tgi),
    ("sglang-0.3.x", "sglang", _sglang),
    ("sglang-0.5.10", "sglang", _sglang),
]


async def _collect(agent: Client, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    response = await agent.post("/api/v1/metrics/collect", json=body)
    return response.status, await response.json()


@pytest.mark.parametrize(("prefix", "engine", "expect"), CASES, ids=[c[0] for c in CASES])
async def test_collect_returns_hand_computed_values(
    agent: Client, targets: Targets, prefix: str, engine: str, expect: Callable[[str], Expected]
) -> None:
    path = capture(prefix)
    expected = expect(path.read_text())
    server = await targets()
    status, body = await _collect(
        agent,
        {
            "instance_id": "i-1",
            "instance_type": engine,
            "metrics_url": str(server.make_url(f"/f/{path.name}")),
        },
    )
    assert status == 200, body
    assert body["instance_id"] == "i-1"
    gpu, req, tput = body["gpu_metrics"], body["request_metrics"], body["throughput_metrics"]
    assert gpu["num_requests_running"] == expected.running
    assert gpu["num_requests_waiting"] == expected.waiting
    assert gpu["cache_usage_perc"] == pytest.approx(expected.cache_perc)
    assert req["time_to_first_token_seconds"] == pytest.approx(expected.ttft_mean)
    assert tput["prompt_tokens_total"] == expected.prompt_tokens
    assert tput["generation_tokens_total"] == expected.generation_tokens
    # First collection of this instance: lifetime means, and no rate can be known yet.
    assert body["window"]["kind"] == "lifetime"
    assert tput["tokens_per_second"] is None


async def test_collect_joins_dcgm_memory(agent: Client, targets: Targets) -> None:
    engine, dcgm = capture("vllm-v1-recent"), capture("dcgm-exporter-L4-")
    used_mib = total(dcgm.read_text(), "DCGM_FI_DEV_FB_USED")
    assert used_mib is not None
    server = await targets()
    status, body = await _collect(
        agent,
        {
            "instance_id": "i-1",
            "instance_type": "vllm",
            "metrics_url": str(server.make_url(f"/f/{engine.name}")),
            "dcgm_url": str(server.make_url(f"/f/{dcgm.name}")),
        },
    )
    assert status == 200, body
    assert body["gpu_metrics"]["memory_usage_bytes"] == used_mib * 1024 * 1024
    assert [s["url"].rsplit("/", 1)[1] for s in body["scrapes"]] == [engine.name, dcgm.name]


async def test_windowed_mean_and_rate_on_the_same_url(aiohttp_client: Any, make_settings: Any) -> None:
    """The target's counters advance between two collections; the second answer covers only the delta."""
    from perfagent.app import create_app

    state = {"count": 10, "sum": 2.0, "tokens": 1000}

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            text=(
                "# TYPE vllm:time_to_first_token_seconds histogram\n"
                f'vllm:time_to_first_token_seconds_bucket{{le="1.0"}} {state["count"]}\n'
                f'vllm:time_to_first_token_seconds_bucket{{le="+Inf"}} {state["count"]}\n'
                f"vllm:time_to_first_token_seconds_sum {state['sum']}\n"
                f"vllm:time_to_first_token_seconds_count {state['count']}\n"
                "# TYPE vllm:generation_tokens_total counter\n"
                f"vllm:generation_tokens_total {state['tokens']}\n"
            )
        )

    target = web.Application()
    target.router.add_get("/metrics", metrics)
    target_client = await aiohttp_client(target)
    agent = await aiohttp_client(create_app(make_settings()))
    body = {
        "instance_id": "w",
        "instance_type": "vllm",
        "metrics_url": str(target_client.make_url("/metrics")),
    }
    status, one = await _collect(agent, body)
    assert status == 200, one
    assert one["request_metrics"]["time_to_first_token_seconds"] == pytest.approx(0.2)
    state.update(count=20, sum=12.0, tokens=3000)
    status, two = await _collect(agent, body)
    assert status == 200, two
    assert two["window"]["kind"] == "since_previous"
    assert two["window"]["seconds"] > 0
    assert two["request_metrics"]["time_to_first_token_seconds"] == pytest.approx(1.0)  # 10 s / 10 requests
    rate = two["throughput_metrics"]["tokens_per_second"]
    assert rate == pytest.approx(2000 / two["window"]["seconds"], rel=1e-6)
    # The same id at another URL is another server: its counters start a new lifetime window.
    status, moved = await _collect(agent, {**body, "metrics_url": body["metrics_url"] + "?other"})
    assert status == 200, moved
    assert moved["window"]["kind"] == "lifetime"


# ---- errors ----------------------------------------------------------------------------------


def _assert_envelope(body: dict[str, Any], code: str) -> dict[str, Any]:
    assert set(body) == {"error", "timestamp"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["details"], dict)
    assert body["timestamp"].endswith("Z")
    details: dict[str, Any] = body["error"]["details"]
    return details


async def test_unknown_instance_type_is_a_validation_error(agent: Client) -> None:
    status, body = await _collect(
        agent, {"instance_id": "x", "instance_type": "triton", "metrics_url": "http://127.0.0.1:1/metrics"}
    )
    assert status == 400
    details = _assert_envelope(body, "VALIDATION_ERROR")
    assert details["field"] == "instance_type"
    assert details["allowed_values"] == ["vllm", "tgi", "sglang"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"instance_type": "vllm", "metrics_url": "http://127.0.0.1:1/m"}, "instance_id"),
        ({"instance_id": "x", "instance_type": "vllm"}, "metrics_url"),
        ({"instance_id": "x", "instance_type": "vllm", "metrics_url": "not a url"}, "metrics_url"),
        ({"instance_id": "x", "instance_type": "vllm", "metrics_url": "ftp://127.0.0.1/m"}, "metrics_url"),
        ({"instance_id": 5, "instance_type": "vllm", "metrics_url": "http://127.0.0.1:1/m"}, "instance_id"),
        ({"instance_id": "x", "instance_type": "vllm", "metrics_url": "http://127.0.0.1:1/m", "x": 1}, "x"),
    ],
)
async def test_bad_fields_name_the_field(agent: Client, body: dict[str, Any], field: str) -> None:
    status, answer = await _collect(agent, body)
    assert status == 400
    assert _assert_envelope(answer, "VALIDATION_ERROR")["field"] == field


async def test_body_that_is_not_json(agent: Client) -> None:
    response = await agent.post(
        "/api/v1/metrics/collect", data=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert response.status == 400
    assert _assert_envelope(await response.json(), "VALIDATION_ERROR")["field"] == "body"


async def test_unreachable_instance_is_service_unavailable(agent: Client) -> None:
    from tests.conftest import free_port

    url = f"http://127.0.0.1:{free_port()}/metrics"  # nothing listens there
    status, body = await _collect(agent, {"instance_id": "x", "instance_type": "vllm", "metrics_url": url})
    assert status == 503
    details = _assert_envelope(body, "SERVICE_UNAVAILABLE")
    assert details["url"] == url
    assert details["reason"] == "unreachable"


async def test_slow_instance_times_out_as_service_unavailable(agent: Client, targets: Targets) -> None:
    server = await targets()
    url = str(server.make_url("/slow?seconds=30"))
    status, body = await _collect(agent, {"instance_id": "x", "instance_type": "vllm", "metrics_url": url})
    assert status == 503
    assert _assert_envelope(body, "SERVICE_UNAVAILABLE")["reason"] == "timeout"


async def test_target_server_error_is_service_unavailable(agent: Client, targets: Targets) -> None:
    server = await targets()
    status, body = await _collect(
        agent,
        {"instance_id": "x", "instance_type": "vllm", "metrics_url": str(server.make_url("/status/502"))},
    )
    assert status == 503
    assert _assert_envelope(body, "SERVICE_UNAVAILABLE")["status"] == 502


async def test_target_not_found_is_a_collection_error(agent: Client, targets: Targets) -> None:
    server = await targets()
    status, body = await _collect(
        agent,
        {"instance_id": "x", "instance_type": "vllm", "metrics_url": str(server.make_url("/status/404"))},
    )
    assert status == 500
    assert _assert_envelope(body, "COLLECTION_ERROR")["status"] == 404


async def test_redirects_are_not_followed(agent: Client, targets: Targets) -> None:
    """A redirect could lead past allowed_targets, so the agent refuses it."""
    server = await targets()
    status, body = await _collect(
        agent, {"instance_id": "x", "instance_type": "vllm", "metrics_url": str(server.make_url("/redirect"))}
    )
    assert status == 500
    assert _assert_envelope(body, "COLLECTION_ERROR")["status"] == 302


async def test_body_with_no_valid_sample_names_the_first_bad_line(agent: Client, targets: Targets) -> None:
    page = b"<html>\n<body>not metrics</body>\n</html>\n"
    server = await targets({"page": page})
    status, body = await _collect(
        agent,
        {"instance_id": "x", "instance_type": "vllm", "metrics_url": str(server.make_url("/body/page"))},
    )
    assert status == 500
    details = _assert_envelope(body, "COLLECTION_ERROR")
    assert details["line"] == 1
    assert details["text"] == "<html>"
    assert details["bad_lines"] == 3
    assert "line 1" in body["error"]["message"]


async def test_oversized_body_is_refused(aiohttp_client: Any, make_settings: Any, targets: Targets) -> None:
    from perfagent.app import create_app

    agent = await aiohttp_client(create_app(make_settings(scrape_max_bytes=1_000_000)))
    server = await targets()
    status, body = await _collect(
        agent, {"instance_id": "x", "instance_type": "vllm", "metrics_url": str(server.make_url("/huge"))}
    )
    assert status == 500
    assert _assert_envelope(body, "COLLECTION_ERROR")["reason"] == "too_large"


async def test_unconvertible_dcgm_value_is_skipped_and_warned(agent: Client, targets: Targets) -> None:
    """dcgm-exporter prints `ERROR - FAILED TO CONVERT TO STRING` for some fields on MIG."""
    engine = capture("vllm-v1-recent")
    dcgm_text = capture("dcgm-exporter-L4-").read_text()
    bad = (
        'DCGM_FI_DEV_XID_ERRORS{gpu="0",GPU_I_PROFILE="1g.10gb",GPU_I_ID="7"} '
        "ERROR - FAILED TO CONVERT TO STRING"
    )
    lines = dcgm_text.splitlines()
    lines.insert(3, bad)
    server = await targets({"dcgm": ("\n".join(lines) + "\n").encode()})
    status, body = await _collect(
        agent,
        {
            "instance_id": "x",
            "instance_type": "vllm",
            "metrics_url": str(server.make_url(f"/f/{engine.name}")),
            "dcgm_url": str(server.make_url("/body/dcgm")),
        },
    )
    assert status == 200, body
    assert [(w["line"], w["reason"]) for w in body["warnings"]] == [(4, "dcgm: value is not a number")]
    used = total(dcgm_text, "DCGM_FI_DEV_FB_USED")
    assert used is not None
    assert body["gpu_metrics"]["memory_usage_bytes"] == used * 1024 * 1024


async def test_target_outside_allowed_targets_is_refused(
    aiohttp_client: Any, make_settings: Any, targets: Targets
) -> None:
    from perfagent.app import create_app

    agent = await aiohttp_client(create_app(make_settings(allowed_targets=["10.0.0.0/8"])))
    server = await targets()
    status, body = await _collect(
        agent, {"instance_id": "x", "instance_type": "vllm", "metrics_url": str(server.make_url("/f/x"))}
    )
    assert status == 400
    details = _assert_envelope(body, "VALIDATION_ERROR")
    assert details["field"] == "metrics_url"
    assert details["setting"] == "allowed_targets"
