"""vLLM exposition: V1 (names, labels and buckets of the 2026 kOps capture) and V0 (the 0.5.x capture).

V1 labels every engine series with ``model_name`` and ``engine="0"`` and emits ``*_created``; V0 uses
``model_name`` only and called ``disable_created_metrics()`` (ENGINES.md §0, §1). Families the real
server adds beside the engine's (``python_*``, most ``process_*``, ``http_*``) are not simulated,
except ``process_start_time_seconds``, which restarts change.
"""

from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric

from perfagent.sim.exposition import (
    RenderContext,
    counter,
    gauge,
    generate,
    histogram,
    label_value,
    one_two_five,
    sim_families,
)

# ENGINES.md §1.4
V1_TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]
V1_TTFT += [20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
V0_TTFT = V1_TTFT[:16]
V0_TPOT = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]
V1_ITL = [*V0_TPOT, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
V1_PHASE = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0]
V1_PHASE += [120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
V0_E2E = [1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0]  # 0.4/0.5, as in the 0.5.x capture
N_PARAM = [1.0, 2.0, 5.0, 10.0, 20.0]
ITERATION = [1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0]
FINISHED_REASONS = ("stop", "length", "abort", "error", "repetition")  # all pre-created in V1
SLEEP_HELP = (
    "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; "
    "weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2."
)


def layout(version: str, max_model_len: int) -> dict[str, list[float]]:
    """Histogram channels of the model → bucket bounds, per vLLM version."""
    tokens = one_two_five(max_model_len)
    if version == "v0":
        return {
            "ttft": V0_TTFT,
            "itl": V0_TPOT,
            "e2e": V0_E2E,
            "prompt_tokens": tokens,
            "gen_tokens": tokens,
            "best_of": N_PARAM,
            "n": N_PARAM,
        }
    return {
        "ttft": V1_TTFT,
        "itl": V1_ITL,
        "tpot_request": V1_ITL,
        "e2e": V1_PHASE,
        "queue": V1_PHASE,
        "inference": V1_PHASE,
        "prefill": V1_PHASE,
        "decode": V1_PHASE,
        "prompt_tokens": tokens,
        "gen_tokens": tokens,
        "max_gen_tokens": tokens,
        "max_tokens": tokens,
        "prefill_kv_computed": tokens,
        "n": N_PARAM,
        "iteration_tokens": ITERATION,
    }


def _cache_config_v1(ctx: RenderContext) -> dict[str, str]:
    """CacheConfig as the kOps V1 capture prints it; the knobs in force replace the defaults."""
    s = ctx.settings
    return {
        "block_size": label_value(s["block_size"]),
        "cache_dtype": label_value(s["kv_cache_dtype"]),
        "calculate_kv_scales": "False",
        "cpu_kvcache_space_bytes": "None",
        "cpu_offload_gb": "0",
        "cpu_offload_params": "set()",
        "enable_prefix_caching": label_value(s["enable_prefix_caching"]),
        "engine": "0",
        "gpu_memory_utilization": label_value(s["gpu_memory_utilization"]),
        "is_attention_free": "False",
        "kv_cache_memory_bytes": "None",
        "kv_offloading_backend": "native",
        "kv_offloading_size": "None",
        "kv_sharing_fast_prefill": "False",
        "mamba_block_size": "None",
        "mamba_cache_dtype": "auto",
        "mamba_cache_mode": "none",
        "mamba_page_size_padded": "None",
        "mamba_ssm_cache_dtype": "auto",
        "num_cpu_blocks": "None",
        "num_gpu_blocks": str(ctx.model.kv_blocks),
        "num_gpu_blocks_override": "None",
        "prefix_caching_hash_algo": "sha256",
        "sliding_window": "None",
        "swap_space": "4.0",
    }


def _v1(ctx: RenderContext) -> list[Metric]:
    c, g, h = ctx.model.counters, ctx.model.gauges, ctx.model.hist
    lab = {"engine": "0", "model_name": ctx.model_name}
    cr = ctx.created

    def one(name: str, doc: str, value: float) -> Metric:
        return counter(name, doc, lab, [({}, value)], cr)

    hit_tokens = c.prompt_tokens - c.local_compute_tokens
    mfu = "(for Model Flops Utilization calculations)."
    fams: list[Metric] = [
        one(
            "vllm:estimated_flops_per_gpu",
            f"Estimated number of floating point operations per GPU {mfu}",
            c.flops,
        ),
        one(
            "vllm:estimated_read_bytes_per_gpu",
            f"Estimated number of bytes read from memory per GPU {mfu}",
            c.read_bytes,
        ),
        one(
            "vllm:estimated_write_bytes_per_gpu",
            f"Estimated number of bytes written to memory per GPU {mfu}",
            c.write_bytes,
        ),
        gauge("vllm:num_requests_running", "Number of requests in model execution batches.", lab, g.running),
        gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", lab, g.waiting),
    ]
    sleep = GaugeMetricFamily("vllm:engine_sleep_state", SLEEP_HELP, labels=[*lab, "sleep_state"])
    for state, value in (("awake", 1.0), ("weights_offloaded", 0.0), ("discard_all", 0.0)):
        sleep.add_metric([*lab.values(), state], value)
    fams += [
        sleep,
        gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", lab, g.kv_usage),
        one(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            c.prefix_queries,
        ),
        one(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", c.prefix_hits
        ),
        one(
            "vllm:external_prefix_cache_queries",
            "External prefix cache queries from KV connector cross-instance cache sharing, "
            "in terms of number of queried tokens.",
            0.0,
        ),
        one(
            "vllm:external_prefix_cache_hits",
            "External prefix cache hits from KV connector cross-instance cache sharing, "
            "in terms of number of cached tokens.",
            0.0,
        ),
        one("vllm:mm_cache_queries", "Multi-modal cache queries, in terms of number of queried items.", 0.0),
        one("vllm:mm_cache_hits", "Multi-modal cache hits, in terms of number of cached items.", 0.0),
        one("vllm:num_preemptions", "Cumulative number of preemption from the engine.", c.preemptions),
        one("vllm:prompt_tokens", "Number of prefill tokens processed.", c.prompt_tokens),
        counter(
            "vllm:prompt_tokens_by_source",
            "Number of prompt tokens by source.",
            lab,
            [
                ({"source": "local_compute"}, c.local_compute_tokens),
                ({"source": "local_cache_hit"}, hit_tokens),
                ({"source": "external_kv_transfer"}, 0.0),
            ],
            cr,
        ),
        one("vllm:prompt_tokens_cached", "Number of cached prompt tokens (local + external).", hit_tokens),
        one("vllm:prompt_tokens_recomputed", "Number of cached tokens recomputed for forward pass.", 0.0),
        one("vllm:generation_tokens", "Number of generation tokens processed.", c.generation_tokens),
        counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            lab,
            [({"finished_reason": r}, _finished(ctx, r)) for r in FINISHED_REASONS],
            cr,
        ),
    ]
    hists = [
        ("vllm:request_prompt_tokens", "Number of prefill tokens processed.", "prompt_tokens"),
        ("vllm:request_generation_tokens", "Number of generation tokens processed.", "gen_tokens"),
        ("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.", "iteration_tokens"),
        (
            "vllm:request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.",
            "max_gen_tokens",
        ),
        ("vllm:request_params_n", "Histogram of the n request parameter.", "n"),
        ("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", "max_tokens"),
        ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", "ttft"),
        ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", "itl"),
        (
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            "tpot_request",
        ),
        ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", "e2e"),
        ("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", "queue"),
        (
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            "inference",
        ),
        (
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            "prefill",
        ),
        (
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            "decode",
        ),
        (
            "vllm:request_prefill_kv_computed_tokens",
            "Histogram of new KV tokens computed during prefill (excluding cached tokens).",
            "prefill_kv_computed",
        ),
    ]
    fams += [histogram(name, doc, lab, h[ch], cr) for name, doc, ch in hists]
    fams.append(
        gauge(
            "vllm:cache_config_info", "Information of the LLMEngine CacheConfig", _cache_config_v1(ctx), 1.0
        )
    )
    return fams


def _finished(ctx: RenderContext, reason: str) -> float:
    c = ctx.model.counters
    return {"stop": c.finished_stop, "length": c.finished_length}.get(reason, 0.0)


def _v0(ctx: RenderContext) -> list[Metric]:
    m, c, g, h = ctx.model, ctx.model.counters, ctx.model.gauges, ctx.model.hist
    s = ctx.settings
    lab = {"model_name": ctx.model_name}
    bytes_per_block = s["block_size"] * ctx.model.hw.kv_bytes_per_token(ctx.spec.kv_fp8)
    swap = 4 * 2**30
    # <=0.5 exported CacheConfig as a prometheus Info ("information of cache_config"), no model_name.
    info = InfoMetricFamily(
        "vllm:cache_config",
        "information of cache_config",
        value={
            "block_size": label_value(s["block_size"]),
            "cache_dtype": label_value(s["kv_cache_dtype"]),
            "cpu_kvcache_space_bytes": str(swap),
            "enable_prefix_caching": label_value(s["enable_prefix_caching"]),
            "gpu_memory_utilization": label_value(s["gpu_memory_utilization"]),
            "num_cpu_blocks": str(swap // bytes_per_block),
            "num_gpu_blocks": str(m.kv_blocks),
            "num_gpu_blocks_override": "None",
            "sliding_window": "None",
            "swap_space_bytes": str(swap),
        },
    )
    # V0 created the finished_reason series on first use.
    reasons = [
        ({"finished_reason": r}, _finished(ctx, r)) for r in FINISHED_REASONS if _finished(ctx, r) >= 1
    ]
    fams: list[Metric] = [
        info,
        gauge("vllm:num_requests_running", "Number of requests currently running on GPU.", lab, g.running),
        gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", lab, g.waiting),
        gauge("vllm:num_requests_swapped", "Number of requests swapped to CPU.", lab, 0.0),
        gauge("vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage.", lab, g.kv_usage),
        gauge("vllm:cpu_cache_usage_perc", "CPU KV-cache usage. 1 means 100 percent usage.", lab, 0.0),
        counter(
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine.",
            lab,
            [({}, c.preemptions)],
            None,
        ),
        counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", lab, [({}, c.prompt_tokens)], None
        ),
        counter(
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            lab,
            [({}, c.generation_tokens)],
            None,
        ),
        histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            lab,
            h["ttft"],
            None,
        ),
        histogram(
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds.",
            lab,
            h["itl"],
            None,
        ),
        histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.",
            lab,
            h["e2e"],
            None,
        ),
        histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", lab, h["prompt_tokens"], None
        ),
        histogram(
            "vllm:request_generation_tokens",
            "Number of generation tokens processed.",
            lab,
            h["gen_tokens"],
            None,
        ),
        histogram(
            "vllm:request_params_best_of",
            "Histogram of the best_of request parameter.",
            lab,
            h["best_of"],
            None,
        ),
        histogram("vllm:request_params_n", "Histogram of the n request parameter.", lab, h["n"], None),
        counter("vllm:request_success", "Count of successfully processed requests.", lab, reasons, None),
        gauge(
            "vllm:avg_prompt_throughput_toks_per_s",
            "Average prefill throughput in tokens/s.",
            lab,
            m.prompt_rate.value,
        ),
        gauge(
            "vllm:avg_generation_throughput_toks_per_s",
            "Average generation throughput in tokens/s.",
            lab,
            m.gen_rate.value,
        ),
    ]
    return fams


def render(ctx: RenderContext) -> str:
    process = gauge(
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
        {},
        ctx.process_start,
    )
    engine = _v0(ctx) if ctx.version == "v0" else _v1(ctx)
    return generate([process, *engine, *sim_families(ctx)])
