"""Recommendations: the per-engine optimizations data, its loader, and the pure recommender."""

from __future__ import annotations

import copy
import json
import math
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from perfagent.optimization_spec import (
    EngineOptimizations,
    Flag,
    OptimizationsError,
    load_engine_optimizations,
    load_optimizations_file,
)
from perfagent.optimizer import (
    Plan,
    build_response,
    latency_aspect,
    normalize_config,
    plan,
    recommend,
)
from perfagent.recommend_models import (
    Bottleneck,
    Optimization,
    OptimizationType,
    RecommendRequest,
    Severity,
    SkipReason,
)

ENGINES = ("vllm", "tgi", "sglang")
GIB = 1024**3

# The spec's exact request (API.md, POST /optimization/recommend).
SPEC_EXAMPLE: dict[str, Any] = {
    "instance_id": "vllm-1",
    "instance_type": "vllm",
    "bottlenecks": [{"type": "MEMORY_PRESSURE", "severity": "HIGH", "description": "High memory usage"}],
    "current_config": {"max_batch_size": 32, "quantization": None},
}

# The flags the issue names, per engine: each must be documented in the engine's file.
ISSUE_FLAGS = {
    "vllm": {
        "--gpu-memory-utilization",
        "--max-num-seqs",
        "--max-num-batched-tokens",
        "--enable-prefix-caching",
        "--kv-cache-dtype",
        "--quantization",
        "--speculative-config",
        "--enable-chunked-prefill",
    },
    "tgi": {
        "--max-batch-total-tokens",
        "--max-concurrent-requests",
        "--max-batch-size",
        "--quantize",
        "--kv-cache-dtype",
        "--speculate",
    },
    "sglang": {
        "--mem-fraction-static",
        "--max-running-requests",
        "--chunked-prefill-size",
        "--schedule-conservativeness",
        "--schedule-policy",
    },
}


def bn(type_: str, severity: str = "HIGH", **extra: Any) -> dict[str, Any]:
    return {"type": type_, "severity": severity, **extra}


def by_id(result: Plan | list[Optimization]) -> dict[str, Optimization]:
    opts = result.optimizations if isinstance(result, Plan) else result
    return {o.id: o for o in opts}


def skipped(result: Plan) -> dict[str, SkipReason]:
    return {s.id: s.reason for s in result.skipped}


def cli_flags(opt: Optimization) -> set[str]:
    return {arg for arg in opt.cli_args if arg.startswith("--")}


def same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return bool(a == b)


# ---- the data ---------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_builtin_files_load_and_document_the_issue_flags(engine: str) -> None:
    spec = load_engine_optimizations(engine)
    assert spec.engine.value == engine
    assert load_engine_optimizations(engine) is spec  # validated once per process
    assert ISSUE_FLAGS[engine] <= spec.documented_cli()
    types = {o.type for o in spec.optimizations}
    assert {
        OptimizationType.QUANTIZATION,
        OptimizationType.KV_CACHE,
        OptimizationType.BATCHING,
        OptimizationType.SPECULATIVE_DECODING,
        OptimizationType.SCALE_OUT,
    } <= types
    for opt in spec.optimizations:
        assert opt.estimated_improvement.basis.strip()
        if opt.requires_new_weights:
            assert not opt.auto_applicable


@pytest.mark.parametrize(
    ("engine", "bottleneck", "config", "metrics", "expected"),
    [
        ("vllm", bn("MEMORY_PRESSURE"), {}, {}, {"--kv-cache-dtype": "fp8", "--max-num-seqs": "128"}),
        ("vllm", bn("MEMORY_PRESSURE"), {}, {}, {"--gpu-memory-utilization": "0.92"}),
        (
            "vllm",
            bn("HIGH_LATENCY", metric_name="ttft_seconds_p99", current_value=5.0),
            {"max_num_batched_tokens": 2048},
            {},
            {"--max-num-batched-tokens": "4096", "--enable-prefix-caching": None},
        ),
        (
            "vllm",
            bn("HIGH_LATENCY", metric_name="itl_seconds_p99", current_value=0.5),
            {},
            {},
            {
                "--speculative-config": json.dumps(
                    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}
                ),
                "--max-num-seqs": "128",
            },
        ),
        (
            "vllm",
            bn("QUEUE_BUILDUP"),
            {"max_num_seqs": 64},
            {"kv_cache_usage": 0.5, "requests_running": 64.0},
            {"--max-num-seqs": "128"},
        ),
        ("vllm", bn("LOW_THROUGHPUT"), {}, {}, {"--quantization": "fp8"}),
        ("vllm", bn("CACHE_INEFFICIENCY", "LOW"), {}, {}, {"--enable-prefix-caching": None}),
        ("tgi", bn("MEMORY_PRESSURE"), {}, {}, {"--kv-cache-dtype": "fp8_e5m2", "--quantize": "awq"}),
        (
            "tgi",
            bn("HIGH_LATENCY", description="Time to first token high"),
            {},
            {},
            {"--max-waiting-tokens": "10"},
        ),
        ("tgi", bn("HIGH_LATENCY", rule="HighInterTokenLatency"), {}, {}, {"--speculate": "2"}),
        (
            "tgi",
            bn("QUEUE_BUILDUP"),
            {"max_batch_size": 32},
            {"requests_running": 32.0},
            {"--max-batch-size": "64"},
        ),
        ("tgi", bn("LOW_THROUGHPUT"), {"max_batch_size": 32}, {}, {"--max-batch-size": "64"}),
        (
            "tgi",
            bn("HIGH_LATENCY", metric_name="itl_seconds_p99"),
            {"max_batch_total_tokens": 65536},
            {},
            {"--max-batch-total-tokens": "32768"},
        ),
        (
            "sglang",
            bn("MEMORY_PRESSURE"),
            {},
            {"kv_cache_usage": 0.97, "preemption_rate": 0.2, "requests_waiting": 0.0},
            {"--schedule-conservativeness": "1.3", "--kv-cache-dtype": "fp8_e5m2"},
        ),
        (
            "sglang",
            bn("QUEUE_BUILDUP"),
            {},
            {"kv_cache_usage": 0.5, "requests_waiting": 12.0},
            {"--schedule-conservativeness": "0.3"},
        ),
        (
            "sglang",
            bn("HIGH_LATENCY", metric_name="itl_seconds_p99"),
            {"max_running_requests": 64},
            {},
            {"--max-running-requests": "32", "--speculative-algorithm": "NGRAM"},
        ),
        ("sglang", bn("HIGH_LATENCY", metric_name="ttft_seconds_p99"), {}, {}, {"--schedule-policy": "lpm"}),
        ("sglang", bn("CACHE_INEFFICIENCY"), {}, {}, {"--schedule-policy": "lpm"}),
        (
            "sglang",
            bn("LOW_THROUGHPUT"),
            {},
            {"kv_cache_usage": 0.95, "requests_waiting": 3.0},
            {"--quantization": "fp8"},
        ),
    ],
)
def test_each_bottleneck_type_gets_the_engines_real_flags(
    engine: str,
    bottleneck: dict[str, Any],
    config: dict[str, Any],
    metrics: dict[str, float],
    expected: dict[str, str | None],
) -> None:
    opts = recommend(engine, [bottleneck], config, metrics)
    spec = load_engine_optimizations(engine)
    args: dict[str, str | None] = {}
    for opt in opts:
        assert cli_flags(opt) <= spec.documented_cli()
        assert opt.engine.value == engine
        assert opt.addresses and opt.addresses[0].type.value == bottleneck["type"]
        # config_changes keys are the CLI flags without dashes, e.g. max_num_seqs for --max-num-seqs.
        assert {"--" + k.replace("_", "-") for k in opt.config_changes} == cli_flags(opt)
        tokens = iter(opt.cli_args)
        for token in tokens:
            is_bool = spec.flags[token[2:].replace("-", "_")].type == "bool"
            args[token] = None if is_bool else next(tokens)
    for flag, value in expected.items():
        assert flag in args, f"{flag} missing from {args}"
        assert args[flag] == value


def test_tgi_has_no_prefix_caching_flag_and_says_so() -> None:
    result = plan("tgi", [bn("CACHE_INEFFICIENCY")])
    assert result.optimizations == ()
    assert skipped(result) == {"tgi.prefix-caching": SkipReason.NOT_APPLICABLE}


# ---- the spec's example -----------------------------------------------------------------------


def test_spec_example_request_answers_with_real_vllm_flags() -> None:
    request = RecommendRequest.model_validate(SPEC_EXAMPLE)
    now = datetime(2024, 1, 1, tzinfo=UTC)
    response = build_response(request, now)
    body = json.loads(response.model_dump_json())
    assert body["instance_id"] == "vllm-1"
    assert body["recommendation_timestamp"].startswith("2024-01-01T00:00:00")
    for opt in body["optimizations"]:
        # The spec's documented fields, with its shapes.
        assert {"type", "priority", "description", "estimated_improvement", "config_changes", "risks"} <= set(
            opt
        )
        assert opt["priority"] in {"LOW", "MEDIUM", "HIGH", "CRITICAL"}
        assert isinstance(opt["estimated_improvement"]["basis"], str)
        assert all(isinstance(v, float) for k, v in opt["estimated_improvement"].items() if k != "basis")
        assert isinstance(opt["risks"], list) and opt["risks"]
        assert not set(opt["config_changes"]) & {"max_batch_size", "block_size"}  # answers use real flags
    opts = by_id(response.optimizations)
    quant = opts["vllm.quantization-int4-awq"]
    assert quant.type is OptimizationType.QUANTIZATION and quant.priority is Severity.HIGH
    assert quant.config_changes == {"quantization": "awq_marlin"}
    assert quant.cli_args == ["--quantization", "awq_marlin"]
    assert quant.requires_new_weights and not quant.auto_applicable and quant.requires_restart
    assert quant.estimated_improvement.model_extra == {"memory_reduction": 0.7}
    kv = opts["vllm.kv-cache-fp8"]
    assert kv.type is OptimizationType.KV_CACHE
    assert kv.config_changes == {"kv_cache_dtype": "fp8"}
    assert not kv.requires_new_weights and kv.auto_applicable
    # max_batch_size is the documented alias of --max-num-seqs: 32 halves to 16.
    batching = opts["vllm.fewer-seqs-preemption"]
    assert batching.config_changes == {"max_num_seqs": 16}
    assert batching.current_values == {"max_num_seqs": 32}
    assert response.normalized_config.values == {"max_num_seqs": 32, "quantization": None}
    assert [(a.given, a.flag) for a in response.normalized_config.aliases] == [
        ("max_batch_size", "max_num_seqs")
    ]
    # fp8 weights would set the same flag: reported as a conflict, not proposed alongside awq.
    conflict = next(s for s in response.skipped if s.id == "vllm.quantization-fp8")
    assert conflict.reason is SkipReason.CONFLICT and conflict.config_changes == {"quantization": "fp8"}


def test_fp8_weight_quantization_needs_no_new_weights_and_names_its_gpu_caveat() -> None:
    fp8 = by_id(recommend("vllm", [bn("LOW_THROUGHPUT")]))["vllm.quantization-fp8"]
    assert fp8.config_changes == {"quantization": "fp8"}
    assert not fp8.requires_new_weights and not fp8.auto_applicable
    assert "Hopper" in fp8.description and "Ada" in fp8.description


# ---- current_config: aliases and what is already in force -------------------------------------


@pytest.mark.parametrize(
    ("engine", "given", "flag"),
    [
        ("vllm", "max_batch_size", "max_num_seqs"),
        ("tgi", "max_batch_size", "max_batch_size"),
        ("sglang", "max_batch_size", "max_running_requests"),
        ("vllm", "quantization", "quantization"),
        ("tgi", "quantization", "quantize"),
        ("sglang", "quantization", "quantization"),
        ("vllm", "kv_cache_dtype", "kv_cache_dtype"),
        ("vllm", "mem_fraction_static", "gpu_memory_utilization"),
        ("sglang", "gpu_memory_utilization", "mem_fraction_static"),
        ("sglang", "block_size", "page_size"),
        ("vllm", "block_size", "block_size"),
        ("vllm", "max-num-seqs", "max_num_seqs"),
        ("vllm", "--max-num-seqs", "max_num_seqs"),
        ("tgi", "--max-concurrent-requests", "max_concurrent_requests"),
    ],
)
def test_generic_keys_are_read_as_the_engines_flags(engine: str, given: str, flag: str) -> None:
    spec = load_engine_optimizations(engine)
    value = {"int": 32, "float": 0.85, "str": "awq", "bool": True, "json": {}}[spec.flags[flag].type]
    normalized = normalize_config(spec, {given: value})
    assert normalized.values == {flag: value}
    assert not normalized.unrecognized and not normalized.invalid


@pytest.mark.parametrize(
    ("engine", "bottleneck", "flag"),
    [
        ("vllm", bn("MEMORY_PRESSURE"), "max_num_seqs"),
        ("tgi", bn("HIGH_LATENCY", metric_name="itl_seconds_p99"), "max_batch_size"),
        ("sglang", bn("HIGH_LATENCY", metric_name="itl_seconds_p99"), "max_running_requests"),
    ],
)
def test_values_are_computed_from_the_alias_and_answered_as_real_flags(
    engine: str, bottleneck: dict[str, Any], flag: str
) -> None:
    opts = recommend(engine, [bottleneck], {"max_batch_size": 64})
    changed = {k: v for o in opts for k, v in o.config_changes.items()}
    assert changed[flag] == 32
    assert "max_batch_size" not in changed or engine == "tgi"


def test_unknown_and_unreadable_keys_are_reported_and_kept() -> None:
    spec = load_engine_optimizations("vllm")
    normalized = normalize_config(
        spec,
        {
            "block_size": 16,
            "schedule_conservativeness": 0.3,  # an SGLang flag: not vLLM's
            "max_num_seqs": "lots",
            "gpu_memory_utilization": 1.5,
            "quantization": "int4",  # the spec's generic value
            "max_batch_size": 64,
            "--max-num-seqs": 128,  # the real flag wins over its alias
        },
    )
    assert normalized.unrecognized == {"schedule_conservativeness": 0.3}
    assert normalized.values["max_num_seqs"] == 128 and normalized.values["quantization"] == "int4"
    problems = {p.key: p.reason for p in normalized.invalid}
    assert set(problems) == {"max_num_seqs", "gpu_memory_utilization", "max_batch_size"}
    assert "range" in problems["gpu_memory_utilization"]
    assert any("int4" in note for note in normalized.notes)
    response = build_response(
        RecommendRequest.model_validate(
            {**SPEC_EXAMPLE, "current_config": {"my_custom_knob": 7, "max_batch_size": 32}}
        ),
        datetime.now(UTC),
    )
    assert response.normalized_config.unrecognized == {"my_custom_knob": 7}


@pytest.mark.parametrize(
    ("engine", "bottleneck", "config", "absent", "reason"),
    [
        (
            "vllm",
            bn("CACHE_INEFFICIENCY"),
            {"enable_prefix_caching": True},
            "vllm.prefix-caching",
            "already_in_force",
        ),
        (
            "vllm",
            bn("CACHE_INEFFICIENCY"),
            {"enable-prefix-caching": "true"},
            "vllm.prefix-caching",
            "already_in_force",
        ),
        ("vllm", bn("MEMORY_PRESSURE"), {"kv_cache_dtype": "fp8"}, "vllm.kv-cache-fp8", "already_configured"),
        (
            "vllm",
            bn("MEMORY_PRESSURE"),
            {"kv_cache_dtype": "fp8_e5m2"},
            "vllm.kv-cache-fp8",
            "already_configured",
        ),
        (
            "tgi",
            bn("MEMORY_PRESSURE"),
            {"kv_cache_dtype": "fp8_e4m3fn"},
            "tgi.kv-cache-fp8",
            "already_configured",
        ),
        (
            "sglang",
            bn("MEMORY_PRESSURE"),
            {"kv_cache_dtype": "fp8_e4m3"},
            "sglang.kv-cache-fp8",
            "already_configured",
        ),
        (
            "vllm",
            bn("MEMORY_PRESSURE"),
            {"quantization": "int4"},
            "vllm.quantization-int4-awq",
            "already_configured",
        ),
        (
            "tgi",
            bn("MEMORY_PRESSURE"),
            {"quantization": "gptq"},
            "tgi.quantization-int4-awq",
            "already_configured",
        ),
        (
            "sglang",
            bn("LOW_THROUGHPUT"),
            {"quantize": "fp8"},
            "sglang.quantization-fp8",
            "already_configured",
        ),
        (
            "vllm",
            bn("HIGH_LATENCY", metric_name="itl_seconds_p99"),
            {"speculative_config": '{"method": "eagle", "num_speculative_tokens": 2}'},
            "vllm.speculative-ngram",
            "already_configured",
        ),
        (
            "tgi",
            bn("HIGH_LATENCY", rule="HighInterTokenLatency"),
            {"speculate": 3},
            "tgi.speculate-ngram",
            "already_configured",
        ),
        (
            "sglang",
            bn("CACHE_INEFFICIENCY"),
            {"schedule_policy": "lpm"},
            "sglang.schedule-policy-lpm",
            "already_in_force",
        ),
        (
            "sglang",
            bn("CACHE_INEFFICIENCY"),
            {"disable_radix_cache": True},
            "sglang.schedule-policy-lpm",
            "already_configured",
        ),
    ],
)
def test_never_proposes_what_current_config_has(
    engine: str, bottleneck: dict[str, Any], config: dict[str, Any], absent: str, reason: str
) -> None:
    result = plan(engine, [bottleneck], config)
    assert absent not in by_id(result)
    assert skipped(result)[absent] == SkipReason(reason)


def test_a_reported_prefix_cache_hit_means_prefix_caching_is_on() -> None:
    result = plan("vllm", [bn("CACHE_INEFFICIENCY")], {}, {"prefix_cache_hit_rate": 0.04})
    assert result.optimizations == ()
    assert skipped(result) == {"vllm.prefix-caching": SkipReason.CONDITION_NOT_MET}


# ---- values: computed from current config, bounded --------------------------------------------


@pytest.mark.parametrize(
    ("current", "expected"),
    [
        (None, 0.92),
        (0.85, 0.92),
        (0.5, 0.92),
        (0.92, 0.94),
        (0.93, 0.95),
        (0.949, 0.95),
        (0.95, None),
        (0.97, None),
    ],
)
def test_gpu_memory_utilization_rises_to_092_and_is_capped_at_095(
    current: float | None, expected: float | None
) -> None:
    config = {} if current is None else {"gpu_memory_utilization": current}
    result = plan("vllm", [bn("MEMORY_PRESSURE")], config)
    opt = by_id(result).get("vllm.gpu-memory-utilization")
    if expected is None:
        assert opt is None
        assert skipped(result)["vllm.gpu-memory-utilization"] is SkipReason.AT_BOUND
    else:
        assert opt is not None and opt.config_changes == {"gpu_memory_utilization": expected}
        assert opt.current_values == {"gpu_memory_utilization": 0.9 if current is None else current}
        assert bool(opt.notes) == (current is None)  # a value from the default says so


def test_no_free_gpu_memory_means_no_raise() -> None:
    metrics = {"gpu_memory_total_bytes": 80.0 * GIB, "gpu_memory_used_bytes": 78.0 * GIB}
    result = plan("vllm", [bn("MEMORY_PRESSURE")], {}, metrics)
    assert skipped(result)["vllm.gpu-memory-utilization"] is SkipReason.CONDITION_NOT_MET
    assert result.facts["gpu_memory_free_bytes"] == 2.0 * GIB


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({}, {"max_num_seqs": 128}),  # from the assumed default 256
        ({"max_num_seqs": 300}, {"max_num_seqs": 150}),
        ({"max_num_seqs": 12}, {"max_num_seqs": 8}),
        (
            {"max_num_seqs": 64, "max_num_batched_tokens": 8192},
            {"max_num_seqs": 32, "max_num_batched_tokens": 4096},
        ),
        ({"max_num_seqs": 64, "max_num_batched_tokens": 2048}, {"max_num_seqs": 32}),  # at its 2048 floor
        ({"max_num_seqs": 8}, None),
    ],
)
def test_preemptions_halve_max_num_seqs_within_bounds(
    config: dict[str, Any], expected: dict[str, Any] | None
) -> None:
    result = plan("vllm", [bn("MEMORY_PRESSURE")], config, {"preemption_rate": 0.5})
    opt = by_id(result).get("vllm.fewer-seqs-preemption")
    if expected is None:
        assert opt is None and skipped(result)["vllm.fewer-seqs-preemption"] is SkipReason.AT_BOUND
    else:
        assert opt is not None and opt.config_changes == expected


def test_no_preemptions_no_smaller_batch() -> None:
    result = plan("vllm", [bn("MEMORY_PRESSURE")], {}, {"preemption_rate": 0.0})
    assert skipped(result)["vllm.fewer-seqs-preemption"] is SkipReason.CONDITION_NOT_MET


@pytest.mark.parametrize(
    ("config", "metrics", "outcome"),
    [
        ({"max_num_seqs": 600}, {"kv_cache_usage": 0.4, "requests_running": 600.0}, 1024),
        ({"max_num_seqs": 1024}, {"kv_cache_usage": 0.4}, SkipReason.AT_BOUND),
        # The default varies with the GPU (256 or 1024): raising it needs the real value.
        ({}, {"kv_cache_usage": 0.4}, SkipReason.MISSING_INPUT),
        ({"max_num_seqs": 64}, {}, SkipReason.MISSING_INPUT),  # KV headroom unknown
        ({"max_num_seqs": 64}, {"kv_cache_usage": 0.85}, SkipReason.CONDITION_NOT_MET),
        (
            {"max_num_seqs": 64},
            {"kv_cache_usage": 0.4, "requests_running": 20.0},
            SkipReason.CONDITION_NOT_MET,
        ),
    ],
)
def test_queue_raises_max_num_seqs_only_with_kv_headroom(
    config: dict[str, Any], metrics: dict[str, float], outcome: int | SkipReason
) -> None:
    result = plan("vllm", [bn("QUEUE_BUILDUP")], config, metrics)
    if isinstance(outcome, SkipReason):
        assert skipped(result)["vllm.more-seqs"] is outcome
    else:
        assert by_id(result)["vllm.more-seqs"].config_changes == {"max_num_seqs": outcome}


@pytest.mark.parametrize(("current", "expected"), [(None, 10), (20, 10), (5, 2), (1, None)])
def test_tgi_max_waiting_tokens_from_its_default_20(current: int | None, expected: int | None) -> None:
    config = {} if current is None else {"max_waiting_tokens": current}
    result = plan("tgi", [bn("HIGH_LATENCY", metric_name="ttft_seconds_p99")], config)
    opt = by_id(result).get("tgi.max-waiting-tokens")
    assert (opt.config_changes["max_waiting_tokens"] if opt else None) == expected


def test_tgi_backpressure_from_its_default_128_is_advice_for_severe_queues() -> None:
    opts = by_id(recommend("tgi", [bn("QUEUE_BUILDUP", "CRITICAL")]))
    back = opts["tgi.backpressure"]
    assert back.config_changes == {"max_concurrent_requests": 64}
    assert back.current_values == {"max_concurrent_requests": 128}
    assert back.priority is Severity.HIGH and not back.auto_applicable  # a rung below CRITICAL
    assert "tgi.backpressure" not in by_id(recommend("tgi", [bn("QUEUE_BUILDUP", "MEDIUM")]))


# ---- SGLang: scheduling, not memory, when requests queue with the pool under 0.9 ---------------


@pytest.mark.parametrize(
    "bottlenecks",
    [
        [bn("MEMORY_PRESSURE"), bn("QUEUE_BUILDUP", "MEDIUM")],
        [bn("MEMORY_PRESSURE")],
        [bn("QUEUE_BUILDUP", "MEDIUM")],
    ],
)
def test_sglang_queue_with_low_token_usage_is_scheduling_not_memory(
    bottlenecks: list[dict[str, Any]],
) -> None:
    result = plan("sglang", bottlenecks, {}, {"requests_waiting": 15.0, "kv_cache_usage": 0.55})
    opts = result.optimizations
    sched = by_id(result)["sglang.schedule-less-conservative"]
    assert sched.config_changes == {"schedule_conservativeness": 0.3}
    assert sched.current_values == {"schedule_conservativeness": 1.0}  # SGLang's default
    assert opts[0] is sched
    assert {o.type for o in opts} <= {OptimizationType.SCHEDULING, OptimizationType.SCALE_OUT}
    assert not any(o.type in (OptimizationType.KV_CACHE, OptimizationType.QUANTIZATION) for o in opts)
    if any(b["type"] == "MEMORY_PRESSURE" for b in bottlenecks):
        assert skipped(result)["sglang.kv-cache-fp8"] is SkipReason.CONDITION_NOT_MET


def test_sglang_rule_finding_alone_carries_the_evidence() -> None:
    finding = {
        "type": "QUEUE_BUILDUP",
        "severity": "MEDIUM",
        "rule": "SGLangConservativeScheduling",
        "quantity": "kv_cache_usage",
        "value": 0.42,
        "threshold": 0.7,
        "instance_id": "sglang-0",
        "summary": "sglang-0 queues requests with the KV pool 42% used",
    }
    opt = recommend("sglang", [finding])[0]
    assert opt.config_changes == {"schedule_conservativeness": 0.3}
    assert opt.addresses[0].rule == "SGLangConservativeScheduling"
    assert opt.addresses[0].current_value == 0.42


def test_sglang_retractions_make_scheduling_more_conservative() -> None:
    metrics = {"kv_cache_usage": 0.97, "preemption_rate": 0.3, "requests_waiting": 4.0}
    result = plan("sglang", [bn("MEMORY_PRESSURE", "CRITICAL")], {"mem_fraction_static": 0.85}, metrics)
    opts = by_id(result)
    assert opts["sglang.schedule-more-conservative"].config_changes == {"schedule_conservativeness": 1.3}
    assert opts["sglang.mem-fraction-static"].config_changes == {"mem_fraction_static": 0.88}
    assert "sglang.schedule-less-conservative" in skipped(result)
    assert opts["sglang.schedule-more-conservative"].priority is Severity.CRITICAL


def test_sglang_conservativeness_already_below_03_is_not_raised_to_it() -> None:
    result = plan(
        "sglang", [bn("QUEUE_BUILDUP")], {"schedule_conservativeness": 0.2}, {"kv_cache_usage": 0.5}
    )
    assert skipped(result)["sglang.schedule-less-conservative"] is SkipReason.AT_BOUND


# ---- latency kinds, priorities, order and deduplication --------------------------------------


@pytest.mark.parametrize(
    ("fields", "aspect"),
    [
        ({"metric_name": "ttft_seconds_p99"}, "ttft"),
        ({"metric_name": "ttft"}, "ttft"),  # the spec's example metric name
        ({"rule": "HighTTFT"}, "ttft"),
        ({"description": "Time to first token exceeds threshold"}, "ttft"),
        ({"metric_name": "itl_seconds_p99"}, "itl"),
        ({"rule": "HighInterTokenLatency"}, "itl"),
        ({"metric_name": "time_per_output_token_seconds"}, "itl"),
        ({"description": "Slow response times"}, None),
        ({"metric_name": "e2e_latency_seconds_p99"}, None),
    ],
)
def test_latency_aspect(fields: dict[str, str], aspect: str | None) -> None:
    assert latency_aspect(Bottleneck.model_validate(bn("HIGH_LATENCY", **fields))) == aspect


def test_unknown_latency_kind_gets_both_kinds_of_advice() -> None:
    ids = set(by_id(recommend("vllm", [bn("HIGH_LATENCY", description="Slow responses")])))
    assert {"vllm.prefix-caching", "vllm.speculative-ngram", "vllm.fewer-seqs-itl"} <= ids


@pytest.mark.parametrize("severity", list(Severity))
def test_priority_is_the_severity_addressed(severity: Severity) -> None:
    opts = by_id(recommend("vllm", [bn("MEMORY_PRESSURE", severity.value)]))
    assert opts["vllm.kv-cache-fp8"].priority is severity


def test_sorted_by_priority_then_rank() -> None:
    bottlenecks = [
        bn("CACHE_INEFFICIENCY", "LOW"),
        bn("MEMORY_PRESSURE", "CRITICAL"),
        bn("HIGH_LATENCY", "MEDIUM", metric_name="itl_seconds_p99"),
    ]
    opts = recommend("vllm", bottlenecks, {"max_num_seqs": 128})
    order = list(Severity)
    keys = [(-order.index(o.priority), o.rank) for o in opts]
    assert keys == sorted(keys)
    assert opts[0].priority is Severity.CRITICAL and opts[-1].priority is Severity.LOW
    assert opts[-1].type is OptimizationType.PREFIX_CACHING


def test_same_change_for_two_bottlenecks_is_one_optimization_addressing_both() -> None:
    bottlenecks = [bn("MEMORY_PRESSURE", "MEDIUM"), bn("HIGH_LATENCY", "HIGH", metric_name="itl_seconds_p99")]
    result = plan("vllm", bottlenecks, {"max_num_seqs": 64})
    batching = [o for o in result.optimizations if "max_num_seqs" in o.config_changes]
    assert len(batching) == 1
    assert {a.type.value for a in batching[0].addresses} == {"MEMORY_PRESSURE", "HIGH_LATENCY"}
    assert batching[0].priority is Severity.HIGH
    assert SkipReason.DUPLICATE in skipped(result).values()


def test_contradicting_changes_keep_the_higher_priority_one() -> None:
    # TTFT wants more batched tokens, preemptions want fewer: the CRITICAL one wins.
    bottlenecks = [
        bn("HIGH_LATENCY", "CRITICAL", metric_name="ttft_seconds_p99"),
        bn("MEMORY_PRESSURE", "MEDIUM"),
    ]
    result = plan("vllm", bottlenecks, {"max_num_seqs": 256, "max_num_batched_tokens": 8192})
    changes = [o.config_changes.get("max_num_batched_tokens") for o in result.optimizations]
    assert [c for c in changes if c is not None] == [16384]
    # The loser's optional batched-tokens change is dropped; its max_num_seqs change stays.
    lower = by_id(result)["vllm.fewer-seqs-preemption"]
    assert lower.config_changes == {"max_num_seqs": 128}
    assert any(n.startswith("max_num_batched_tokens left as is") for n in lower.notes)


def test_a_required_change_in_conflict_skips_the_whole_optimization() -> None:
    bottlenecks = [bn("QUEUE_BUILDUP", "CRITICAL"), bn("MEMORY_PRESSURE", "LOW")]
    config = {"max_num_seqs": 64}
    metrics = {"kv_cache_usage": 0.5, "requests_running": 64.0, "preemption_rate": 1.0}
    result = plan("vllm", bottlenecks, config, metrics)
    assert by_id(result)["vllm.more-seqs"].config_changes == {"max_num_seqs": 128}
    conflict = next(s for s in result.skipped if s.id == "vllm.fewer-seqs-preemption")
    assert conflict.reason is SkipReason.CONFLICT
    assert "conflicts with vllm.more-seqs" in conflict.detail


# ---- request model ----------------------------------------------------------------------------


def test_request_validation() -> None:
    with pytest.raises(ValidationError, match="not catalog quantities: kv_usage"):
        RecommendRequest.model_validate({**SPEC_EXAMPLE, "metrics": {"kv_usage": 0.5}})
    with pytest.raises(ValidationError):
        RecommendRequest.model_validate({**SPEC_EXAMPLE, "instance_type": "triton"})
    with pytest.raises(ValidationError):
        RecommendRequest.model_validate(
            {**SPEC_EXAMPLE, "bottlenecks": [{"type": "SLOW", "severity": "HIGH"}]}
        )
    with pytest.raises(ValidationError):
        RecommendRequest.model_validate({**SPEC_EXAMPLE, "surprise": 1})
    request = RecommendRequest.model_validate(
        {**SPEC_EXAMPLE, "bottlenecks": [{"type": "memory_pressure", "severity": "high", "engine": "vllm"}]}
    )
    assert request.bottlenecks[0].type.value == "MEMORY_PRESSURE"
    assert request.bottlenecks[0].model_extra == {"engine": "vllm"}
    assert RecommendRequest.model_validate({**SPEC_EXAMPLE, "current_config": None}).current_config is None


def test_no_bottleneck_no_optimization() -> None:
    result = plan("sglang", [], {"max_running_requests": 64})
    assert result.optimizations == () and result.skipped == ()


# ---- malformed optimization files -------------------------------------------------------------


def _vllm_data() -> dict[str, Any]:
    text = (Path(__file__).parent.parent / "perfagent" / "optimizations" / "vllm.yaml").read_text("utf-8")
    data: dict[str, Any] = yaml.safe_load(text)
    return data


def _opt(data: dict[str, Any], ident: str) -> dict[str, Any]:
    found: dict[str, Any] = next(o for o in data["optimizations"] if o["id"] == ident)
    return found


Mutation = Callable[[dict[str, Any]], None]

MUTATIONS: list[tuple[str, Mutation, str]] = [
    (
        "unknown flag",
        lambda d: _opt(d, "fewer-seqs-preemption")["changes"].update(
            {"max_num_sequences": {"multiply": 0.5}}
        ),
        "optimizations[fewer-seqs-preemption].changes: 'max_num_sequences' is not a flag",
    ),
    (
        "wrong value type",
        lambda d: _opt(d, "kv-cache-fp8")["changes"]["kv_cache_dtype"].update({"set": 8}),
        "optimizations[kv-cache-fp8].changes: kv_cache_dtype: set: expected a string",
    ),
    (
        "undocumented value",
        lambda d: _opt(d, "kv-cache-fp8")["changes"]["kv_cache_dtype"].update({"set": "int8"}),
        "not a documented value",
    ),
    (
        "no basis",
        lambda d: _opt(d, "kv-cache-fp8")["estimated_improvement"].pop("basis"),
        "optimizations[kv-cache-fp8].estimated_improvement.basis: Field required",
    ),
    (
        "unknown improvement key",
        lambda d: _opt(d, "kv-cache-fp8")["estimated_improvement"].update({"speedup": 2.0}),
        "optimizations[kv-cache-fp8].estimated_improvement: 'speedup' is not one of",
    ),
    (
        "unknown metric",
        lambda d: _opt(d, "gpu-memory-utilization")["require"][0].update({"metric": "gpu_free"}),
        "optimizations[gpu-memory-utilization].require[0]: metric 'gpu_free' is not a catalog quantity",
    ),
    (
        "unknown config key in a condition",
        lambda d: _opt(d, "kv-cache-fp8")["skip_if"][0].update({"config": "kv_dtype"}),
        "optimizations[kv-cache-fp8].skip_if: config 'kv_dtype' is not a flag",
    ),
    (
        "bad operator",
        lambda d: _opt(d, "gpu-memory-utilization")["require"][0].update({"op": "=>"}),
        "optimizations[gpu-memory-utilization].require[0].op",
    ),
    (
        "placeholder without a change",
        lambda d: _opt(d, "kv-cache-fp8").update({"description": "x {new[max_num_seqs]}"}),
        "optimizations[kv-cache-fp8]: description: {new[max_num_seqs]}",
    ),
    (
        "bad default",
        lambda d: d["flags"]["max_num_seqs"].update({"default": "many"}),
        "flags.max_num_seqs: default: expected a number",
    ),
    (
        "shared rank",
        lambda d: _opt(d, "more-seqs").update({"rank": 10}),
        "rank 10 is shared by kv-cache-fp8, more-seqs",
    ),
    (
        "advice applied automatically",
        lambda d: _opt(d, "quantization-int4-awq").update({"auto_applicable": True}),
        "optimizations[quantization-int4-awq]: an optimization needing new weights is advice",
    ),
    (
        "flag change without restart",
        lambda d: _opt(d, "kv-cache-fp8").update({"requires_restart": False}),
        "optimizations[kv-cache-fp8]: requires_restart must be true",
    ),
    (
        "unknown bottleneck type",
        lambda d: _opt(d, "kv-cache-fp8").update({"triggers": [{"bottleneck": "MEMORY_PRESURE"}]}),
        "optimizations[kv-cache-fp8].triggers[0].bottleneck",
    ),
    (
        "set and multiply",
        lambda d: _opt(d, "more-seqs")["changes"]["max_num_seqs"].update({"set": 12}),
        "optimizations[more-seqs].changes.max_num_seqs: give either set, or multiply",
    ),
    (
        "typo in a key",
        lambda d: _opt(d, "more-seqs").update({"risk": ["x"]}),
        "optimizations[more-seqs].risk: Extra inputs are not permitted",
    ),
    (
        "alias taken twice",
        lambda d: d["flags"]["block_size"].update({"aliases": ["max_batch_size"]}),
        "alias 'max_batch_size' of 'block_size' is already 'max_num_seqs'",
    ),
    ("wrong engine", lambda d: d.update({"engine": "tgi"}), "at engine: 'tgi' does not match the file name"),
]


@pytest.mark.parametrize(
    ("mutation", "message"), [(m, msg) for _, m, msg in MUTATIONS], ids=[n for n, _, _ in MUTATIONS]
)
def test_malformed_optimizations_are_rejected_naming_file_and_key(
    tmp_path: Path, mutation: Mutation, message: str
) -> None:
    data = copy.deepcopy(_vllm_data())
    mutation(data)
    path = tmp_path / "vllm.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    with pytest.raises(OptimizationsError) as info:
        load_optimizations_file(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [("engine: [vllm\n", "not valid YAML"), ("- just a list\n", "expected a mapping")],
)
def test_unparsable_optimizations_are_rejected(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "vllm.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(OptimizationsError, match=message):
        load_optimizations_file(path)
    with pytest.raises(OptimizationsError, match="cannot read"):
        load_optimizations_file(tmp_path / "absent.yaml")


def test_the_valid_file_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "vllm.yaml"
    path.write_text(yaml.safe_dump(_vllm_data()), encoding="utf-8")
    assert load_optimizations_file(path) == load_engine_optimizations("vllm")


# ---- properties -------------------------------------------------------------------------------


def _value_strategy(flag: Flag) -> st.SearchStrategy[Any]:
    if flag.type == "bool":
        return st.booleans()
    if flag.type == "json":
        return st.sampled_from([{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}])
    if flag.type == "str":
        return st.sampled_from(flag.choices or (str(flag.default or "x"),))
    low, high = flag.range or (0.0, 4096.0)
    if flag.type == "int":
        return st.integers(int(low), int(min(high, 70000)))
    return st.floats(low, high, allow_nan=False).map(lambda v: round(v, 3))


def _configs(spec: EngineOptimizations) -> st.SearchStrategy[dict[str, Any]]:
    optional = {name: st.none() | _value_strategy(flag) for name, flag in spec.flags.items()}
    return st.fixed_dictionaries({}, optional=optional)


_BOTTLENECKS = st.lists(
    st.builds(
        bn,
        st.sampled_from(
            ["MEMORY_PRESSURE", "HIGH_LATENCY", "LOW_THROUGHPUT", "QUEUE_BUILDUP", "CACHE_INEFFICIENCY"]
        ),
        st.sampled_from([s.value for s in Severity]),
        metric_name=st.sampled_from([None, "ttft_seconds_p99", "itl_seconds_p99", "e2e_latency_seconds_p99"]),
    ),
    max_size=6,
)
_METRICS = st.fixed_dictionaries(
    {},
    optional={
        "kv_cache_usage": st.floats(0, 1),
        "requests_waiting": st.integers(0, 200).map(float),
        "requests_running": st.integers(0, 2000).map(float),
        "preemption_rate": st.floats(0, 5),
        "prefix_cache_hit_rate": st.floats(0, 1),
        "gpu_memory_total_bytes": st.just(80.0 * GIB),
        "gpu_memory_used_bytes": st.floats(0, 80.0 * GIB),
    },
)


@pytest.mark.parametrize("engine", ENGINES)
def test_properties_over_any_bottlenecks_and_config(engine: str) -> None:
    spec = load_engine_optimizations(engine)
    documented = spec.documented_cli()
    order = list(Severity)

    @settings(max_examples=150, deadline=None)
    @given(bottlenecks=_BOTTLENECKS, config=_configs(spec), metrics=_METRICS)
    def check(bottlenecks: list[dict[str, Any]], config: dict[str, Any], metrics: dict[str, float]) -> None:
        result = plan(engine, bottlenecks, config, metrics)
        in_force = result.normalized_config.values
        assert not result.normalized_config.invalid and not result.normalized_config.unrecognized
        set_flags: Counter[str] = Counter()
        for opt in result.optimizations:
            for flag, value in opt.config_changes.items():
                # Never re-propose a value already in force.
                assert not (in_force.get(flag) is not None and same(in_force[flag], value)), (opt.id, flag)
                bounds = spec.flags[flag].range
                if bounds is not None:
                    assert bounds[0] <= value <= bounds[1]
                set_flags[flag] += 1
            assert {a for a in opt.cli_args if a.startswith("--")} <= documented
            assert not (opt.requires_new_weights and opt.auto_applicable)
            assert opt.requires_restart == bool(opt.config_changes)
            assert opt.addresses
        # No two optimizations set one flag (so never to different values).
        assert all(count == 1 for count in set_flags.values()), set_flags
        keys = [(-order.index(o.priority), o.rank) for o in result.optimizations]
        assert keys == sorted(keys)

    check()
