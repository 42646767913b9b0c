"""The normalization stage against the real captures and hand-built scrapes (perfagent.normalize)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import polars as pl
import pytest

from perfagent.catalog import CATALOG
from perfagent.exposition import parse_exposition
from perfagent.normalize import Normalized, RawSnapshot, normalize

FIXTURES = Path(__file__).parent / "fixtures"
AT = datetime(2026, 3, 20, 12, 0, tzinfo=UTC)
MIB = 1024 * 1024

Expect = dict[str, float | None]


# --- an independent reading of the text: a regex over the sample lines ---------------------------


def series(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample line of `name`, read with a regex."""
    line = re.compile(rf"^{re.escape(name)}(?:\{{(.*?)\}})?[ \t]+(\S+)[ \t]*$", re.MULTILINE)
    return [
        (dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or "")), float(m.group(2)))
        for m in line.finditer(text)
    ]


def total(text: str, name: str, **where: str) -> float:
    """Sum of the samples of `name` whose labels equal `where`."""
    found = [v for labels, v in series(text, name) if all(labels.get(k) == w for k, w in where.items())]
    assert found, f"{name} {where} not in the text"
    return sum(found)


def biggest(text: str, name: str) -> float:
    return max(v for _, v in series(text, name))


def ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


def run(
    engine: str,
    text: str,
    *,
    at: datetime = AT,
    previous: RawSnapshot | None = None,
    dcgm: pl.DataFrame | None = None,
    gpu_selector: Mapping[str, str] | None = None,
) -> Normalized:
    samples = parse_exposition(text)
    return normalize(engine, samples, at=at, previous=previous, dcgm=dcgm, gpu_selector=gpu_selector)


def assert_values(n: Normalized, expect: Mapping[str, float | None]) -> None:
    for name, want in expect.items():
        got = n.values[name]
        if want is None:
            assert got is None, f"{name}: expected None, got {got}"
        else:
            assert got == pytest.approx(want, rel=1e-12), name


# --- every engine capture ---------------------------------------------------------------------------


def expect_vllm(text: str, *, kv: str, itl: str) -> Expect:
    finished = series(text, "vllm:request_success_total")
    failed = {"abort", "error"}  # ENGINES.md §1.1: request_success_total includes these
    success = sum(v for labels, v in finished if labels["finished_reason"] not in failed)
    failure = sum(v for labels, v in finished if labels["finished_reason"] in failed)
    config = series(text, "vllm:cache_config_info")
    return {
        "requests_running": total(text, "vllm:num_requests_running"),
        "requests_waiting": total(text, "vllm:num_requests_waiting"),
        "kv_cache_usage": biggest(text, kv),
        "kv_cache_capacity_tokens": sum(
            float(c["num_gpu_blocks"]) * float(c["block_size"]) for c, _ in config
        ),
        "requests_success_total": success,
        "requests_failure_total": failure,
        "error_rate": ratio(failure, success + failure),
        "prompt_tokens_total": total(text, "vllm:prompt_tokens_total"),
        "generation_tokens_total": total(text, "vllm:generation_tokens_total"),
        "preemptions_total": total(text, "vllm:num_preemptions_total"),
        "ttft_seconds": ratio(
            total(text, "vllm:time_to_first_token_seconds_sum"),
            total(text, "vllm:time_to_first_token_seconds_count"),
        ),
        "itl_seconds": ratio(total(text, f"{itl}_sum"), total(text, f"{itl}_count")),
        "e2e_latency_seconds": ratio(
            total(text, "vllm:e2e_request_latency_seconds_sum"),
            total(text, "vllm:e2e_request_latency_seconds_count"),
        ),
        # A first scrape has no window: rates are never invented.
        "request_rate": None,
        "prompt_tokens_per_second": None,
        "generation_tokens_per_second": None,
        "preemption_rate": None,
        # No DCGM frame given.
        "gpu_memory_used_bytes": None,
    }


def expect_tgi(text: str) -> Expect:
    success = total(text, "tgi_request_success")
    failure = total(text, "tgi_request_failure")
    queue = ratio(
        total(text, "tgi_request_queue_duration_sum"), total(text, "tgi_request_queue_duration_count")
    )
    prefill = ratio(
        total(text, "tgi_batch_inference_duration_sum", method="prefill"),
        total(text, "tgi_batch_inference_duration_count", method="prefill"),
    )
    assert queue is not None
    assert prefill is not None
    return {
        "requests_running": total(text, "tgi_batch_current_size"),
        "requests_waiting": total(text, "tgi_queue_size"),
        "kv_cache_usage": None,  # TGI exports no KV capacity (ENGINES.md §2)
        "kv_cache_capacity_tokens": None,
        "kv_cache_used_tokens": total(text, "tgi_batch_current_max_tokens"),
        "requests_success_total": success,
        "requests_failure_total": failure,
        "error_rate": failure / (success + failure),
        "prompt_tokens_total": total(text, "tgi_request_input_length_sum"),
        "generation_tokens_total": total(text, "tgi_request_generated_tokens_sum"),
        "preemptions_total": None,
        "prefix_cache_hit_rate": None,
        "ttft_seconds": queue + prefill,
        "queue_time_seconds": queue,
        "e2e_latency_seconds": ratio(
            total(text, "tgi_request_duration_sum"), total(text, "tgi_request_duration_count")
        ),
        "itl_seconds": ratio(
            total(text, "tgi_request_mean_time_per_token_duration_sum"),
            total(text, "tgi_request_mean_time_per_token_duration_count"),
        ),
    }


def expect_sglang_03(text: str) -> Expect:
    return {
        "requests_running": total(text, "sglang:num_requests_running"),
        "requests_waiting": total(text, "sglang:num_requests_waiting"),
        "kv_cache_usage": biggest(text, "sglang:token_usage"),
        "kv_cache_capacity_tokens": total(text, "sglang:max_total_num_tokens"),
        # v0.3 has no request counters: finished requests are e2e observations.
        "requests_success_total": total(text, "sglang:e2e_request_latency_seconds_count"),
        "requests_failure_total": None,
        "error_rate": None,
        "prompt_tokens_total": total(text, "sglang:prompt_tokens_total"),
        "generation_tokens_total": total(text, "sglang:generation_tokens_total"),
        # v0.3 prints a percent (10.61); the catalog unit is a ratio.
        "prefix_cache_hit_rate": biggest(text, "sglang:cache_hit_rate") / 100.0,
        "ttft_seconds": ratio(
            total(text, "sglang:time_to_first_token_seconds_sum"),
            total(text, "sglang:time_to_first_token_seconds_count"),
        ),
        "itl_seconds": ratio(
            total(text, "sglang:time_per_output_token_seconds_sum"),
            total(text, "sglang:time_per_output_token_seconds_count"),
        ),
        "queue_time_seconds": ratio(
            total(text, "sglang:waiting_request_latency_seconds_sum"),
            total(text, "sglang:waiting_request_latency_seconds_count"),
        ),
    }


def expect_sglang_05(text: str) -> Expect:
    return {
        # Scheduler gauges are per tp_rank: the worst rank, never the sum (ENGINES.md §3.1).
        "requests_running": biggest(text, "sglang:num_running_reqs"),
        "requests_waiting": biggest(text, "sglang:num_queue_reqs"),
        "kv_cache_usage": biggest(text, "sglang:token_usage"),
        "kv_cache_capacity_tokens": biggest(text, "sglang:max_total_num_tokens"),
        "kv_cache_used_tokens": biggest(text, "sglang:num_used_tokens"),
        "requests_success_total": total(text, "sglang:num_requests_total"),
        # No num_aborted_requests_total line: created on the first abort, so none happened.
        "requests_failure_total": 0.0 if not series(text, "sglang:num_aborted_requests_total") else None,
        "error_rate": 0.0,
        "prompt_tokens_total": total(text, "sglang:prompt_tokens_total"),
        "generation_tokens_total": total(text, "sglang:generation_tokens_total"),
        "prefix_cache_hit_rate": total(text, "sglang:cached_tokens_total")
        / total(text, "sglang:prompt_tokens_total"),
        "ttft_seconds": ratio(
            total(text, "sglang:time_to_first_token_seconds_sum"),
            total(text, "sglang:time_to_first_token_seconds_count"),
        ),
        "itl_seconds": ratio(
            total(text, "sglang:inter_token_latency_seconds_sum"),
            total(text, "sglang:inter_token_latency_seconds_count"),
        ),
        "queue_time_seconds": ratio(
            total(text, "sglang:queue_time_seconds_sum"), total(text, "sglang:queue_time_seconds_count")
        ),
    }


V0_NAMES = {"kv": "vllm:gpu_cache_usage_perc", "itl": "vllm:time_per_output_token_seconds"}
V1_NAMES = {"kv": "vllm:kv_cache_usage_perc", "itl": "vllm:inter_token_latency_seconds"}

ENGINE_CASES: list[tuple[str, str, str, Callable[[str], Expect]]] = [
    (
        "vllm-v1-recent-qwen2.5-0.5b-k8s-ai-conformance-kops.prom",
        "vllm",
        "vllm-v1",
        partial(expect_vllm, **V1_NAMES),
    ),
    (
        "vllm-v0-0.5.x-opt125m-datadog-integrations-core.prom",
        "vllm",
        "vllm-v0",
        partial(expect_vllm, **V0_NAMES),
    ),
    ("vllm-v0-llama3.1-8b-fp8-kubeai-EDITED.prom", "vllm", "vllm-v0", partial(expect_vllm, **V0_NAMES)),
    # A V0 capture with V1-era lines appended: the new names must win.
    ("vllm-HYBRID-v0capture-plus-v1-lines-datadog.prom", "vllm", "vllm-v0", partial(expect_vllm, **V1_NAMES)),
    ("tgi-3.x-datadog-integrations-core.prom", "tgi", "tgi-3", expect_tgi),
    ("sglang-0.3.x-gemma2-9b-name-label-sglang-docs.prom", "sglang", "sglang-0.3", expect_sglang_03),
    ("sglang-0.5.10-opt125m-datadog-CURATED.prom", "sglang", "sglang-0.4.4+", expect_sglang_05),
]


@pytest.mark.parametrize(
    ("name", "engine", "hint", "expect"), ENGINE_CASES, ids=[c[0][:22] for c in ENGINE_CASES]
)
def test_engine_capture(name: str, engine: str, hint: str, expect: Callable[[str], Expect]) -> None:
    text = fixture(name)
    n = run(engine, text)
    assert n.engine_version_hint == hint
    assert n.window.kind == "lifetime"
    assert n.window.seconds is None
    assert n.window.end == AT
    assert set(n.values) == set(CATALOG)
    assert all(v is None or math.isfinite(v) for v in n.values.values())
    assert_values(n, expect(text))


def test_kubeai_edited_line_is_counted() -> None:
    # The kubeai project appended `num_requests_waiting{model_name="other/OTHER"} 3`; one scrape is
    # one instance, so its waiting requests are the sum over every series.
    n = run("vllm", fixture("vllm-v0-llama3.1-8b-fp8-kubeai-EDITED.prom"))
    assert n.values["requests_waiting"] == 2.0 + 3.0


def test_fp8_ttft_quantiles_by_hand() -> None:
    n = run("vllm", fixture("vllm-v0-llama3.1-8b-fp8-kubeai-EDITED.prom"))
    # Buckets 0.04:1, 0.06:6, 0.08:9 of 9.
    # p50: rank 4.5 -> 0.04 + 0.02*3.5/5; p99: rank 8.91 -> 0.06 + 0.02*2.91/3.
    assert n.values["ttft_seconds_p50"] == pytest.approx(0.054)
    assert n.values["ttft_seconds_p99"] == pytest.approx(0.0794)


def test_tgi_ttft_is_an_approximation() -> None:
    n = run("tgi", fixture("tgi-3.x-datadog-integrations-core.prom"))
    for name in ("ttft_seconds", "ttft_seconds_p50", "ttft_seconds_p99", "itl_seconds"):
        assert name in n.approximations
    assert "tgi_request_queue_duration" in n.approximations["ttft_seconds"]
    assert "prefill" in n.approximations["ttft_seconds"]
    assert (
        n.sources["ttft_seconds"]
        == 'tgi_request_queue_duration + tgi_batch_inference_duration{method=~"prefill"}'
    )
    assert "kv_cache_usage" not in n.sources


DCGM_CASES = [
    (
        "dcgm-exporter-L4-k8s-ai-conformance-kops.prom",
        "vllm-v1-recent-qwen2.5-0.5b-k8s-ai-conformance-kops.prom",
    ),
    ("dcgm-exporter-L40S-k8s-ai-conformance-upcloud.prom", "tgi-3.x-datadog-integrations-core.prom"),
    (
        "dcgm-exporter-GRID-A100-vGPU-k8s-ai-conformance-vks.prom",
        "sglang-0.5.10-opt125m-datadog-CURATED.prom",
    ),
    (
        "dcgm-exporter-T4-loaded-k8s-ai-conformance-ericsson.prom",
        "vllm-v0-llama3.1-8b-fp8-kubeai-EDITED.prom",
    ),
]


@pytest.mark.parametrize(("dcgm_name", "engine_name"), DCGM_CASES, ids=[c[0][14:24] for c in DCGM_CASES])
def test_dcgm_capture_joined(dcgm_name: str, engine_name: str) -> None:
    dcgm_text = fixture(dcgm_name)
    engine = engine_name.split("-")[0]
    n = run(engine, fixture(engine_name), dcgm=parse_exposition(dcgm_text), gpu_selector={"gpu": "0"})
    used = total(dcgm_text, "DCGM_FI_DEV_FB_USED")
    memory = used + total(dcgm_text, "DCGM_FI_DEV_FB_FREE") + total(dcgm_text, "DCGM_FI_DEV_FB_RESERVED")
    assert_values(
        n,
        {
            "gpu_memory_used_bytes": used * MIB,
            "gpu_memory_total_bytes": memory * MIB,
            "gpu_utilization": total(dcgm_text, "DCGM_FI_DEV_GPU_UTIL") / 100.0,
        },
    )
    if series(dcgm_text, "DCGM_FI_PROF_DRAM_ACTIVE"):
        assert n.values["gpu_dram_active"] == pytest.approx(total(dcgm_text, "DCGM_FI_PROF_DRAM_ACTIVE"))
    else:  # the vGPU exposes only 11 fields
        assert n.values["gpu_dram_active"] is None


# --- names, eras and aggregation --------------------------------------------------------------------


def test_new_name_wins_over_old_one() -> None:
    text = fixture("vllm-HYBRID-v0capture-plus-v1-lines-datadog.prom")
    # Both cache-usage gauges are 0.0 in the capture; give them different values to tell them apart.
    text = text.replace(
        'vllm:kv_cache_usage_perc{model_name="facebook/opt-125m"} 0.0', "vllm:kv_cache_usage_perc 0.75"
    )
    text = text.replace(
        'vllm:gpu_cache_usage_perc{model_name="facebook/opt-125m"} 0.0', "vllm:gpu_cache_usage_perc 0.25"
    )
    n = run("vllm", text)
    assert n.values["kv_cache_usage"] == 0.75  # not 0.25, and not 1.0 (never added)
    assert n.sources["kv_cache_usage"] == "vllm:kv_cache_usage_perc"
    # ITL: 144 observations of inter_token_latency_seconds, not the 6 of time_per_output_token_seconds.
    assert n.values["itl_seconds"] == pytest.approx(0.6237391703762114 / 144)
    assert n.sources["itl_seconds"] == "vllm:inter_token_latency_seconds"
    assert n.values["prefix_cache_hit_rate"] == pytest.approx(64 / 117)
    assert n.values["queue_time_seconds"] == pytest.approx(7.358146831393242e-05 / 6)


TWO_ENGINES = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 4.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:num_requests_waiting{engine="1",model_name="m"} 2.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.2
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.6
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 10.0
vllm:request_success_total{engine="1",finished_reason="length",model_name="m"} 5.0
vllm:request_success_total{engine="0",finished_reason="abort",model_name="m"} 1.0
vllm:request_success_total{engine="1",finished_reason="error",model_name="m"} 2.0
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="100"} 1.0
vllm:cache_config_info{block_size="16",engine="1",num_gpu_blocks="50"} 1.0
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 2.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="1.0",model_name="m"} 4.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 4.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 4.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 1.0
vllm:time_to_first_token_seconds_bucket{engine="1",le="0.1",model_name="m"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="1",le="1.0",model_name="m"} 4.0
vllm:time_to_first_token_seconds_bucket{engine="1",le="+Inf",model_name="m"} 6.0
vllm:time_to_first_token_seconds_count{engine="1",model_name="m"} 6.0
vllm:time_to_first_token_seconds_sum{engine="1",model_name="m"} 9.0
"""


def test_vllm_engines_sum_counts_and_max_fractions() -> None:
    n = run("vllm", TWO_ENGINES)
    assert n.engine_version_hint == "vllm-v1"
    assert_values(
        n,
        {
            "requests_running": 7.0,
            "requests_waiting": 3.0,
            "kv_cache_usage": 0.6,  # worst engine
            "kv_cache_capacity_tokens": (100 + 50) * 16,
            "requests_success_total": 15.0,
            "requests_failure_total": 3.0,
            "error_rate": 3 / 18,
            # Buckets merged by le: 0.1:2, 1.0:8, +Inf:10. Mean 10/10; p50 rank 5 -> 0.1 + 0.9*3/6.
            "ttft_seconds": 1.0,
            "ttft_seconds_p50": 0.55,
            # p90 rank 9 > 8: in the +Inf bucket.
            "ttft_seconds_p90": None,
        },
    )
    assert n.flags["ttft_seconds_p90"] == "above highest finite bucket 1.0 s"
    assert n.lower_bounds["ttft_seconds_p90"] == 1.0


SGLANG_RANKS = """\
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{engine_type="unified",model_name="m",pp_rank="0",tp_rank="0"} 5
sglang:num_running_reqs{engine_type="unified",model_name="m",pp_rank="0",tp_rank="1"} 5
# TYPE sglang:token_usage gauge
sglang:token_usage{engine_type="unified",model_name="m",pp_rank="0",tp_rank="0"} 0.3
sglang:token_usage{engine_type="unified",model_name="m",pp_rank="0",tp_rank="1"} 0.4
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{dp_rank="0",model_name="m",tp_rank="0"} 2
sglang:num_queue_reqs{dp_rank="0",model_name="m",tp_rank="1"} 2
sglang:num_queue_reqs{dp_rank="1",model_name="m",tp_rank="0"} 3
sglang:num_queue_reqs{dp_rank="1",model_name="m",tp_rank="1"} 3
# TYPE sglang:cache_hit_rate gauge
sglang:cache_hit_rate{model_name="m",tp_rank="0"} 0.5
"""


def test_sglang_tp_rank_repetition_not_summed() -> None:
    n = run("sglang", SGLANG_RANKS)
    assert n.engine_version_hint == "sglang-0.4.4+"
    assert n.values["requests_running"] == 5.0  # the same 5 requests seen by two TP ranks
    assert n.values["kv_cache_usage"] == 0.4
    # Data-parallel ranks hold different requests: summed after the TP replicas collapse.
    assert n.values["requests_waiting"] == 2.0 + 3.0
    # A fraction gauge outside v0.3 is not rescaled.
    assert n.values["prefix_cache_hit_rate"] == 0.5


def test_sglang_03_percent_cache_hit_rate_scaled() -> None:
    n = run("sglang", fixture("sglang-0.3.x-gemma2-9b-name-label-sglang-docs.prom"))
    assert n.values["prefix_cache_hit_rate"] == pytest.approx(0.1061)
    assert n.sources["prefix_cache_hit_rate"] == "sglang:cache_hit_rate"


def test_sglang_03_detected_by_name_label_alone() -> None:
    n = run("sglang", 'sglang:cache_hit_rate{name="m"} 25.0\n')
    assert n.engine_version_hint == "sglang-0.3"
    assert n.values["prefix_cache_hit_rate"] == 0.25


def test_router_series_dropped_and_tool_renamed_names_matched() -> None:
    text = (
        'vllm:num_requests_running{server="http://a:8000"} 9\n'  # production-stack router re-export
        'vllm_num_requests_running{engine="0",model_name="m"} 2\n'  # OTel-style `_` for `:`
    )
    assert run("vllm", text).values["requests_running"] == 2.0


def test_lazily_created_counters_are_zero_on_a_live_engine() -> None:
    # TGI registers tgi_request_failure on the first failure; tgi_request_count shows the server is live.
    n = run("tgi", "tgi_request_count 5\ntgi_request_success 5\n")
    assert (n.values["requests_failure_total"], n.values["error_rate"]) == (0.0, 0.0)
    # An idle V0 vLLM has no request_success_total series before its first finished request.
    n = run("vllm", 'vllm:num_requests_running{model_name="m"} 0.0\n')
    assert (n.values["requests_success_total"], n.values["requests_failure_total"]) == (0.0, 0.0)
    assert n.values["error_rate"] is None  # 0 of 0
    # Without the witness nothing is known.
    assert run("tgi", "tgi_queue_size 0\n").values["requests_failure_total"] is None


def test_created_and_process_series_ignored() -> None:
    text = (
        'vllm:prompt_tokens_total{engine="0"} 5.0\n'
        'vllm:prompt_tokens_created{engine="0"} 1.7740114612876017e+09\n'
        'http_requests_total{handler="/v1/completions",method="POST",status="2xx"} 7.0\n'
        "process_cpu_seconds_total 10.9\n"
    )
    n = run("vllm", text)
    assert n.values["prompt_tokens_total"] == 5.0
    assert n.values["requests_success_total"] is None


def test_v0_prefix_hit_rate_sentinel_is_unknown() -> None:
    n = run("vllm", 'vllm:gpu_prefix_cache_hit_rate{model_name="m"} -1.0\n')
    assert n.values["prefix_cache_hit_rate"] is None  # -1 means prefix caching is off
    n = run("vllm", 'vllm:gpu_prefix_cache_hit_rate{model_name="m"} 0.25\n')
    assert n.values["prefix_cache_hit_rate"] == 0.25


def test_non_finite_values_become_none() -> None:
    n = run("vllm", 'vllm:kv_cache_usage_perc{engine="0"} NaN\nvllm:num_requests_running{engine="0"} +Inf\n')
    assert n.values["kv_cache_usage"] is None
    assert n.values["requests_running"] is None


def test_unrelated_or_empty_scrape_gives_all_none() -> None:
    for text in ("", 'python_info{version="3.10"} 1.0\nprocess_open_fds 49.0\n'):
        n = run("vllm", text)
        assert set(n.values) == set(CATALOG)
        assert all(v is None for v in n.values.values())
        assert n.engine_version_hint is None


def test_bad_arguments() -> None:
    frame = parse_exposition("")
    with pytest.raises(ValueError, match="unknown engine"):
        normalize("dcgm", frame, at=AT)
    with pytest.raises(ValueError, match="timezone"):
        normalize("vllm", frame, at=datetime(2026, 1, 1))


# --- windows ----------------------------------------------------------------------------------------


def vllm_scrape(
    *, success: float, prompt: float, preempted: float, ttft: tuple[float, float, float], ttft_sum: float
) -> str:
    """A small V1 scrape; `ttft` is the cumulative count of buckets 0.5, 1.0 and +Inf."""
    b05, b1, inf = ttft
    return f"""\
# TYPE vllm:request_success_total counter
vllm:request_success_total{{engine="0",finished_reason="stop"}} {success}
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{{engine="0"}} {prompt}
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{{engine="0"}} {2 * prompt}
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{{engine="0"}} {preempted}
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{{engine="0",le="0.5"}} {b05}
vllm:time_to_first_token_seconds_bucket{{engine="0",le="1.0"}} {b1}
vllm:time_to_first_token_seconds_bucket{{engine="0",le="+Inf"}} {inf}
vllm:time_to_first_token_seconds_count{{engine="0"}} {inf}
vllm:time_to_first_token_seconds_sum{{engine="0"}} {ttft_sum}
"""


FIRST = vllm_scrape(success=100, prompt=1000, preempted=0, ttft=(2, 4, 4), ttft_sum=2.0)
LATER = AT + timedelta(seconds=10)


def test_first_scrape_is_lifetime_and_has_no_rates() -> None:
    n = run("vllm", FIRST)
    assert n.window.kind == "lifetime"
    assert n.window.start is None
    for name in (
        "request_rate",
        "prompt_tokens_per_second",
        "generation_tokens_per_second",
        "preemption_rate",
    ):
        assert n.values[name] is None
    assert n.values["ttft_seconds"] == 0.5  # lifetime 2.0 / 4
    assert n.values["requests_success_total"] == 100.0


def test_windowed_mean_quantiles_and_rates() -> None:
    first = run("vllm", FIRST)
    second_text = vllm_scrape(success=130, prompt=1500, preempted=2, ttft=(2, 7, 10), ttft_sum=11.0)
    # The snapshot crosses a JSON round trip, as a caller storing it would do.
    previous = RawSnapshot.model_validate_json(first.raw.model_dump_json())
    n = run("vllm", second_text, at=LATER, previous=previous)
    assert n.window.kind == "since_previous"
    assert (n.window.start, n.window.end, n.window.seconds) == (AT, LATER, 10.0)
    lifetime = run("vllm", second_text, at=LATER)
    assert lifetime.values["ttft_seconds"] == pytest.approx(11.0 / 10)
    assert_values(
        n,
        {
            "ttft_seconds": (11.0 - 2.0) / (10 - 4),
            # Window buckets 0.5:0, 1.0:3, +Inf:6: p50 rank 3 -> 0.5 + 0.5*3/3; p99 in +Inf.
            "ttft_seconds_p50": 1.0,
            "ttft_seconds_p99": None,
            "request_rate": 30 / 10,
            "prompt_tokens_per_second": 500 / 10,
            "generation_tokens_per_second": 1000 / 10,
            "preemption_rate": 2 / 10,
            "requests_success_total": 130.0,  # totals stay cumulative
            "error_rate": 0.0,
        },
    )
    assert n.flags["ttft_seconds_p99"] == "above highest finite bucket 1.0 s"


def test_counter_reset_counts_from_zero() -> None:
    previous = run("vllm", FIRST).raw
    restarted = vllm_scrape(success=20, prompt=300, preempted=1, ttft=(1, 2, 2), ttft_sum=0.6)
    n = run("vllm", restarted, at=LATER, previous=previous)
    assert_values(
        n,
        {
            "request_rate": 20 / 10,
            "prompt_tokens_per_second": 300 / 10,
            "preemption_rate": 1 / 10,
            "ttft_seconds": 0.6 / 2,  # the restarted histogram is the window
        },
    )
    assert all(v is None or v >= 0 for v in n.values.values())


def test_window_without_new_requests_has_no_means() -> None:
    previous = run("vllm", FIRST).raw
    n = run("vllm", FIRST, at=LATER, previous=previous)
    assert_values(
        n,
        {"ttft_seconds": None, "ttft_seconds_p50": None, "request_rate": 0.0, "error_rate": None},
    )
    assert not n.flags


def test_unusable_previous_snapshot_falls_back_to_lifetime() -> None:
    previous = run("vllm", FIRST).raw
    wrong_engine = previous.model_copy(update={"engine": "sglang"})
    n = run("vllm", FIRST, at=LATER, previous=wrong_engine)
    assert n.window.kind == "lifetime"
    assert "sglang" in n.flags["window"]
    n = run("vllm", FIRST, at=AT, previous=previous)  # not later than the previous scrape
    assert n.window.kind == "lifetime"
    assert "window" in n.flags


def test_raw_snapshot_contents() -> None:
    raw = run("vllm", FIRST).raw
    assert raw.engine == "vllm"
    assert raw.at == AT
    assert raw.counters['vllm:request_success_total{finished_reason!~"abort|error"}'] == 100.0
    hist = raw.histograms["vllm:time_to_first_token_seconds"]
    assert (hist.bounds, hist.counts, hist.inf_count, hist.sum, hist.count) == (
        (0.5, 1.0),
        (2.0, 4.0),
        4.0,
        2.0,
        4.0,
    )


# --- GPU selection ----------------------------------------------------------------------------------

TWO_GPUS = """\
DCGM_FI_DEV_FB_USED{gpu="0",pod="a"} 100
DCGM_FI_DEV_FB_USED{gpu="1",pod="b"} 200
DCGM_FI_DEV_FB_FREE{gpu="0",pod="a"} 900
DCGM_FI_DEV_FB_FREE{gpu="1",pod="b"} 800
DCGM_FI_DEV_GPU_UTIL{gpu="0",pod="a"} 50
DCGM_FI_DEV_GPU_UTIL{gpu="1",pod="b"} 100
"""


def test_gpu_selector() -> None:
    dcgm = parse_exposition(TWO_GPUS)
    every = run("vllm", FIRST, dcgm=dcgm)
    # No FB_RESERVED in this exporter: total is free + used.
    assert_values(
        every,
        {"gpu_memory_used_bytes": 300 * MIB, "gpu_memory_total_bytes": 2000 * MIB, "gpu_utilization": 0.75},
    )
    one = run("vllm", FIRST, dcgm=dcgm, gpu_selector={"pod": "b"})
    assert_values(
        one,
        {"gpu_memory_used_bytes": 200 * MIB, "gpu_memory_total_bytes": 1000 * MIB, "gpu_utilization": 1.0},
    )
    none = run("vllm", FIRST, dcgm=dcgm, gpu_selector={"gpu": "7"})
    assert none.values["gpu_memory_used_bytes"] is None
    assert "gpu_selector" in none.flags["gpu_memory_used_bytes"]


def test_no_dcgm_frame_no_gpu_values() -> None:
    n = run("vllm", FIRST)
    assert n.values["gpu_memory_used_bytes"] is None
    assert n.values["gpu_utilization"] is None


def test_samples_frame_may_carry_extra_columns() -> None:
    frame = parse_exposition(FIRST).with_columns(pl.lit("x").alias("instance"))
    assert normalize("vllm", frame, at=AT).values["requests_success_total"] == 100.0
