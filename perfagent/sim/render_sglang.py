"""SGLang exposition (>=0.4.4 / 0.5.x names and labels, ENGINES.md §3).

Scheduler-side series carry ``model_name, engine_type, tp_rank, pp_rank``; tokenizer-manager counters
and histograms carry ``model_name`` only (§3.1). Token counters advance when a request finishes, as
`TokenizerMetricsCollector.observe_one_finished_request` does. HELP strings and default buckets are
those of `python/sglang/srt/metrics/collector.py` (mid-2025), not the curated Datadog fixture's.
``sglang:server_args_info`` is SIMULATOR-ONLY: SGLang exports no settings metric. SGLang serves
/metrics from a prometheus_client ``MultiProcessCollector`` registry, which has no ``process_*``
families, so a restart shows only as counters starting over and new ``*_created`` values.
"""

from __future__ import annotations

from prometheus_client.core import Metric

from perfagent.sim.exposition import (
    RenderContext,
    counter,
    gauge,
    generate,
    histogram,
    label_value,
    sim_families,
)

TTFT = [0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0, 200.0, 400.0]
ITL = [0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.060, 0.080]
ITL += [0.100, 0.200, 0.400, 0.600, 0.800, 1.0, 2.0, 4.0, 6.0, 8.0]
E2E = [0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0, 200.0, 400.0]
E2E += [600.0, 1200.0, 1800.0, 2400.0]
QUEUE = [
    0.0,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    3.0,
    4.0,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    70.0,
    80.0,
    90.0,
]
QUEUE += [100.0, 200.0, 300.0, 400.0, 500.0, 600.0, 700.0, 800.0, 900.0, 1000.0, 1200.0, 1400.0, 1600.0]
QUEUE += [1800.0, 2000.0, 2500.0, 3000.0]
TOKENS = [100.0, 300.0, 500.0, 700.0, 1000.0, 1500.0, 2000.0, 3000.0, 4000.0, 5000.0, 6000.0, 7000.0, 8000.0]
TOKENS += [9000.0, 10000.0, 12000.0, 15000.0, 20000.0, 22000.0, 25000.0, 30000.0, 35000.0, 40000.0, 66000.0]
TOKENS += [99000.0, 132000.0, 300000.0, 600000.0, 900000.0, 1100000.0]
CUDA_GRAPH_MAX_BS = 256  # decode batches up to this size replay CUDA graphs


def layout() -> dict[str, list[float]]:
    return {
        "ttft": TTFT,
        "itl": ITL,
        "e2e": E2E,
        "queue": QUEUE,
        "prompt_tokens": TOKENS,
        "gen_tokens": TOKENS,
    }


def _server_args(ctx: RenderContext) -> dict[str, str]:
    """Settings in force, with derived defaults resolved (max_running_requests, max_total_num_tokens)."""
    args = {k: label_value(v) for k, v in ctx.settings.items()}
    args["max_running_requests"] = str(ctx.spec.max_seqs)
    args["max_total_num_tokens"] = str(ctx.spec.kv_tokens)
    return {"model_name": ctx.model_name, **args}


def render(ctx: RenderContext) -> str:
    m, c, g, h = ctx.model, ctx.model.counters, ctx.model.gauges, ctx.model.hist
    sched = {"engine_type": "unified", "model_name": ctx.model_name, "pp_rank": "0", "tp_rank": "0"}
    tok = {"model_name": ctx.model_name}
    cr = ctx.created

    def sg(name: str, doc: str, value: float) -> Metric:
        return gauge(f"sglang:{name}", doc, sched, value)

    def tc(name: str, doc: str, value: float) -> Metric:
        return counter(f"sglang:{name}", doc, tok, [({}, value)], cr)

    def sc(name: str, doc: str, value: float) -> Metric:
        return counter(f"sglang:{name}", doc, sched, [({}, value)], cr)

    cuda_graph = 1.0 if 0 < g.running <= CUDA_GRAPH_MAX_BS else 0.0
    fams: list[Metric] = [
        gauge(
            "sglang:http_requests_active",
            "Number of currently active HTTP requests",
            {"endpoint": "/generate", "method": "POST"},
            float(g.running + g.waiting),
        ),
        sg("num_running_reqs", "The number of running requests.", g.running),
        sg("num_queue_reqs", "The number of requests in the waiting queue.", g.waiting),
        sg("num_used_tokens", "The number of used tokens.", g.kv_used_tokens),
        sg("token_usage", "The token usage.", g.kv_usage),
        sg("cache_hit_rate", "The prefix cache hit rate.", m.cache_hit_rate),
        sg(
            "max_total_num_tokens", "Maximum total number of tokens in the KV cache pool.", ctx.spec.kv_tokens
        ),
        sg("gen_throughput", "The generation throughput (token/s).", m.gen_rate.value),
        sg("utilization", "The utilization.", m.busy.value),
        sg("is_cuda_graph", "Whether the batch is using CUDA graph.", cuda_graph),
        tc("prompt_tokens", "Number of prefill tokens processed.", c.prompt_tokens_done),
        tc("generation_tokens", "Number of generation tokens processed.", c.generation_tokens_done),
        tc("cached_tokens", "Number of cached prompt tokens.", c.cached_tokens_done),
        tc("num_requests", "Number of requests processed.", c.finished),
        tc("num_so_requests", "Number of structured output requests processed.", 0.0),
        tc("num_aborted_requests", "Number of requests aborted.", 0.0),
        sg("num_retracted_reqs", "The number of retracted requests.", g.retracted_last),
        sc("num_retracted_requests", "Total number of retracted requests.", c.preemptions),
        sc("num_retracted_input_tokens", "Total number of retracted input tokens.", c.preempted_input_tokens),
        sc(
            "num_retracted_output_tokens",
            "Total number of retracted output tokens.",
            c.preempted_output_tokens,
        ),
        sg("num_paused_reqs", "The number of paused requests by async weight sync.", 0.0),
        sg("num_grammar_queue_reqs", "The number of requests in the grammar waiting queue.", 0.0),
        sg("new_token_ratio", "The new token ratio.", g.new_token_ratio),
        sg("spec_accept_length", "The average acceptance length of speculative decoding.", 0.0),
        sg(
            "spec_accept_rate",
            "The average acceptance rate of speculative decoding "
            "(`accepted tokens / total draft tokens` in batch).",
            0.0,
        ),
        sg("engine_startup_time", "The time taken for the engine to start up.", ctx.startup_seconds),
        sg(
            "engine_load_weights_time",
            "The time taken for the engine to load weights.",
            0.3 * ctx.startup_seconds,
        ),
        histogram(
            "sglang:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            tok,
            h["ttft"],
            cr,
        ),
        histogram(
            "sglang:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            tok,
            h["itl"],
            cr,
        ),
        histogram(
            "sglang:e2e_request_latency_seconds",
            "Histogram of End-to-end request latency in seconds",
            tok,
            h["e2e"],
            cr,
        ),
        histogram(
            "sglang:queue_time_seconds", "Histogram of queueing time in seconds.", sched, h["queue"], cr
        ),
        histogram(
            "sglang:prompt_tokens_histogram", "Histogram of prompt token length.", tok, h["prompt_tokens"], cr
        ),
        histogram(
            "sglang:generation_tokens_histogram",
            "Histogram of generation token length.",
            tok,
            h["gen_tokens"],
            cr,
        ),
        gauge(
            "sglang:server_args_info",
            "SIMULATOR ONLY (perfagent sim; SGLang exports no such metric): server args in force",
            _server_args(ctx),
            1.0,
        ),
    ]
    return generate([*fams, *sim_families(ctx)])
