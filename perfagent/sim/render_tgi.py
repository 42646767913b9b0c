"""TGI 3.x exposition, hand-rendered the way the Rust ``metrics-exporter-prometheus`` crate prints it.

As in the real capture (ENGINES.md §2): counters have no ``_total``; only ``method``/``err``/``reason``
labels; ``le`` values are Rust f64 Display (``0.00015000000000000001``, ``128``); families without a
description print no HELP line; one blank line after each family; ``tgi_request_skipped_tokens`` is a
summary; a series appears only once it has been recorded (so a fresh server shows almost nothing).
Family order follows the capture. ``tgi_sim_settings_info`` is SIMULATOR-ONLY.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from decimal import Decimal

from perfagent.sim.exposition import SIM_INFO, SIM_INFO_HELP, SIM_SETTINGS, SIM_SETTINGS_HELP, RenderContext
from perfagent.sim.stats import Hist


def duration_buckets() -> list[float]:
    """server.rs: 35 buckets, 0.0001 multiplied by 1.5 before each push."""
    out, value = [], 0.0001
    for _ in range(35):
        value *= 1.5
        out.append(value)
    return out


def linear_buckets(total: int) -> list[float]:
    """server.rs: 100 buckets of total/100 (input length: max_input_tokens; generated: max_total_tokens)."""
    return [(total / 100.0) * (x + 1) for x in range(100)]


BATCH_SIZE_BUCKETS = [float(x + 1) for x in range(1024)]
QUANTILES = ("0", "0.5", "0.9", "0.95", "0.99", "0.999", "1")
DURATIONS = {
    "e2e",
    "validation",
    "queue",
    "inference",
    "mean_time_per_token",
    "concat_decode",
    *(
        f"{kind}_{method}"
        for kind in ("forward", "decode", "filter", "infer")
        for method in ("prefill", "decode")
    ),
}


def layout(max_input_tokens: int, max_total_tokens: int) -> dict[str, list[float]]:
    out = dict.fromkeys(DURATIONS, duration_buckets())
    out["prompt_tokens"] = linear_buckets(max_input_tokens)
    out["max_tokens"] = linear_buckets(max_total_tokens)
    out["gen_tokens"] = linear_buckets(max_total_tokens)
    out["batch_next_size"] = BATCH_SIZE_BUCKETS
    out["skipped_tokens"] = []
    return out


def rust_f64(value: float) -> str:
    """Rust's `Display` for f64: shortest round-trip digits, never an exponent, integers without '.0'."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e16:
        return str(int(value))
    text = repr(value)
    return format(Decimal(text), "f") if "e" in text else text


def _labels(pairs: Sequence[tuple[str, str]]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}" if pairs else ""


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, doc: str | None, body: list[str]) -> None:
        if not body:
            return  # the crate registers a series on its first update
        if doc:
            self.lines.append(f"# HELP {name} {doc}")
        self.lines.append(f"# TYPE {name} {kind}")
        self.lines.extend(body)
        self.lines.append("")

    def scalar(
        self, name: str, kind: str, doc: str | None, series: Sequence[tuple[Sequence[tuple[str, str]], float]]
    ) -> None:
        body = [
            f"{name}{_labels(lab)} {rust_f64(math.floor(v + 1e-9) if kind == 'counter' else v)}"
            for lab, v in series
        ]
        self.family(name, kind, doc, body)

    def histogram(
        self, name: str, doc: str | None, series: Sequence[tuple[Sequence[tuple[str, str]], Hist]]
    ) -> None:
        body: list[str] = []
        for lab, hist in series:
            cumulative = hist.cumulative()
            if cumulative[-1] < 1:
                continue
            for bound, count in zip([*hist.upper_bounds, math.inf], cumulative, strict=True):
                body.append(f"{name}_bucket{_labels([*lab, ('le', rust_f64(bound))])} {rust_f64(count)}")
            body.append(f"{name}_sum{_labels(lab)} {rust_f64(hist.sum)}")
            body.append(f"{name}_count{_labels(lab)} {rust_f64(cumulative[-1])}")
        self.family(name, "histogram", doc, body)


def _nonzero(
    series: Sequence[tuple[Sequence[tuple[str, str]], float]],
) -> list[tuple[Sequence[tuple[str, str]], float]]:
    return [(lab, v) for lab, v in series if v >= 1]


def render(ctx: RenderContext) -> str:
    c, g, h = ctx.model.counters, ctx.model.gauges, ctx.model.hist
    w = _Writer()
    prefill, decode = (("method", "prefill"),), (("method", "decode"),)
    w.scalar("tgi_request_success", "counter", "Number of successful requests", _nonzero([((), c.finished)]))
    w.scalar("tgi_batch_concat", "counter", None, _nonzero([((("reason", "chunking"),), c.concats)]))
    w.scalar("tgi_request_count", "counter", "Total number of requests", _nonzero([((), c.arrived)]))
    failures = [
        ((("err", "validation"),), c.rejected_validation),
        ((("err", "overloaded"),), c.rejected_overloaded),
    ]
    w.scalar("tgi_request_failure", "counter", None, _nonzero(failures))
    calls = _nonzero([(prefill, c.prefill_steps), (decode, c.decode_steps)])
    doc = "Number of successful inference calls per method (prefill or decode)"
    w.scalar("tgi_batch_inference_success", "counter", doc, calls)
    w.scalar("tgi_batch_inference_count", "counter", "Inference calls per method (prefill or decode)", calls)
    if c.arrived >= 1:  # the router sets the queue gauge when it appends the first request
        w.scalar("tgi_queue_size", "gauge", "Current queue size", [((), float(g.waiting))])
    if c.new_batches >= 1:  # the batching task sets these once it has a batch
        w.scalar(
            "tgi_batch_current_max_tokens",
            "gauge",
            "Maximum tokens for the current batch",
            [((), g.reserved_tokens)],
        )
        w.scalar("tgi_batch_current_size", "gauge", "Current batch size", [((), float(g.running))])
    w.histogram("tgi_request_input_length", "Input token length per request", [((), h["prompt_tokens"])])
    w.histogram("tgi_request_max_new_tokens", "Maximum new tokens per request", [((), h["max_tokens"])])
    w.histogram("tgi_request_inference_duration", "Request inference duration", [((), h["inference"])])
    skipped = h["skipped_tokens"]
    if skipped.count >= 1:
        body = [f'tgi_request_skipped_tokens{{quantile="{q}"}} 0' for q in QUANTILES]
        body += [f"tgi_request_skipped_tokens_sum {rust_f64(skipped.sum)}"]
        body += [f"tgi_request_skipped_tokens_count {rust_f64(math.floor(skipped.count + 1e-9))}"]
        w.family("tgi_request_skipped_tokens", "summary", "Speculated tokens per request", body)
    per_method = "per method (prefill or decode)"
    w.histogram(
        "tgi_batch_forward_duration",
        f"Batch forward duration {per_method}",
        [(prefill, h["forward_prefill"]), (decode, h["forward_decode"])],
    )
    w.histogram("tgi_request_duration", "Request duration", [((), h["e2e"])])
    w.histogram("tgi_request_validation_duration", "Request validation duration", [((), h["validation"])])
    w.histogram("tgi_request_queue_duration", "Request queue duration", [((), h["queue"])])
    w.histogram(
        "tgi_batch_filter_duration",
        f"Time spent filtering batches and sending generated tokens {per_method}",
        [(decode, h["filter_decode"]), (prefill, h["filter_prefill"])],
    )
    w.histogram(
        "tgi_batch_inference_duration",
        "Batch inference duration",
        [(prefill, h["infer_prefill"]), (decode, h["infer_decode"])],
    )
    w.histogram(
        "tgi_request_mean_time_per_token_duration",
        "Mean time per token per request",
        [((), h["mean_time_per_token"])],
    )
    w.histogram("tgi_batch_concat_duration", None, [(decode, h["concat_decode"])])
    w.histogram("tgi_request_generated_tokens", "Generated tokens per request", [((), h["gen_tokens"])])
    w.histogram(
        "tgi_batch_decode_duration",
        f"Time spent decoding a batch {per_method}",
        [(prefill, h["decode_prefill"]), (decode, h["decode_decode"])],
    )
    w.histogram("tgi_batch_next_size", "Batch size of the next batch", [((), h["batch_next_size"])])
    settings = [(k, str(v)) for k, v in ctx.settings.items()]
    in_force = {
        "max_batch_total_tokens": str(ctx.spec.kv_tokens),
        "max_batch_prefill_tokens": str(ctx.spec.chunk),
    }
    settings = [(k, in_force.get(k, v)) for k, v in settings]
    w.scalar(
        "tgi_sim_settings_info",
        "gauge",
        "SIMULATOR ONLY (perfagent sim; TGI exports no such metric): launcher settings in force",
        [(settings, 1.0)],
    )
    info = [
        ("engine", ctx.engine),
        ("version", ctx.version),
        ("instance", ctx.instance_id),
        ("model", ctx.model_name),
    ]
    w.scalar(SIM_INFO, "gauge", SIM_INFO_HELP, [(info, 1.0)])
    w.scalar(
        SIM_SETTINGS, "gauge", SIM_SETTINGS_HELP, [([(k, str(v)) for k, v in ctx.settings.items()], 1.0)]
    )
    return "\n".join(w.lines) + "\n"
