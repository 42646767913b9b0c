"""The catalog of normalized quantities: every number perfagent reports, with its unit and meaning."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Final


class Unit(StrEnum):
    """Units of normalized quantities; every engine's native unit is converted to one of these."""

    RATIO = "ratio"  # 0-1
    PERCENT = "percent"  # 0-100; no catalog quantity uses it today (everything is normalized to ratio)
    SECONDS = "seconds"
    BYTES = "bytes"
    REQUESTS = "requests"
    TOKENS = "tokens"
    COUNT = "count"
    PER_SECOND = "per_second"
    TOKENS_PER_SECOND = "tokens_per_second"


class Kind(StrEnum):
    """How a quantity is obtained, which decides what an engine map may feed it."""

    GAUGE = "gauge"  # instantaneous value at the scrape
    COUNTER = "counter"  # cumulative total since the engine process started
    RATE = "rate"  # counter delta over the window's seconds (None on a first scrape)
    RATIO = "ratio"  # ratio of counter deltas over the window, or an engine's own ratio gauge
    MEAN = "mean"  # histogram delta(_sum) / delta(_count) over the window
    QUANTILE = "quantile"  # histogram_quantile over bucket deltas of the window


@dataclass(frozen=True, slots=True)
class Quantity:
    """One normalized quantity."""

    name: str
    unit: Unit
    kind: Kind
    description: str
    # Quantities computed from other catalog quantities; engine maps never map these directly.
    derived_from: tuple[str, ...] = ()
    quantile: float | None = None  # for Kind.QUANTILE

    @property
    def mappable(self) -> bool:
        """True when engine maps name the metrics behind this quantity."""
        return not self.derived_from


# Latency quantiles reported for every latency histogram, as (suffix, q).
QUANTILE_SUFFIXES: Final[tuple[tuple[str, float], ...]] = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))

_LATENCIES: Final[tuple[tuple[str, str], ...]] = (
    ("ttft_seconds", "Time to first token"),
    ("itl_seconds", "Inter-token latency (time between consecutive output tokens)"),
    ("e2e_latency_seconds", "End-to-end request latency, arrival to last token"),
    ("queue_time_seconds", "Time a request waited in the queue before it was scheduled"),
)


def _latencies() -> tuple[Quantity, ...]:
    out: list[Quantity] = []
    for name, text in _LATENCIES:
        out.append(Quantity(name, Unit.SECONDS, Kind.MEAN, f"{text}: mean over the window."))
        out.extend(
            Quantity(
                f"{name}_{suffix}",
                Unit.SECONDS,
                Kind.QUANTILE,
                f"{text}: {suffix} over the window, interpolated within histogram buckets.",
                derived_from=(name,),
                quantile=q,
            )
            for suffix, q in QUANTILE_SUFFIXES
        )
    return tuple(out)


QUANTITIES: Final[tuple[Quantity, ...]] = (
    Quantity("requests_running", Unit.REQUESTS, Kind.GAUGE, "Requests in the running batch."),
    Quantity(
        "requests_waiting", Unit.REQUESTS, Kind.GAUGE, "Requests waiting to be scheduled (queue depth)."
    ),
    Quantity(
        "kv_cache_usage",
        Unit.RATIO,
        Kind.GAUGE,
        "Fraction of the KV cache in use, 0-1 (worst engine or rank); None when the engine exports no"
        " KV capacity.",
    ),
    Quantity("kv_cache_capacity_tokens", Unit.TOKENS, Kind.GAUGE, "KV-cache capacity in tokens."),
    Quantity(
        "kv_cache_used_tokens",
        Unit.TOKENS,
        Kind.GAUGE,
        "Tokens held in the KV cache (TGI: token budget reserved by the current batch).",
    ),
    Quantity("requests_success_total", Unit.REQUESTS, Kind.COUNTER, "Requests finished successfully."),
    Quantity("requests_failure_total", Unit.REQUESTS, Kind.COUNTER, "Requests finished with a failure."),
    Quantity(
        "request_rate",
        Unit.PER_SECOND,
        Kind.RATE,
        "Finished requests (success + failure) per second over the window.",
        derived_from=("requests_success_total", "requests_failure_total"),
    ),
    Quantity(
        "error_rate",
        Unit.RATIO,
        Kind.RATIO,
        "Failures among finished requests in the window, 0-1.",
        derived_from=("requests_success_total", "requests_failure_total"),
    ),
    Quantity("prompt_tokens_total", Unit.TOKENS, Kind.COUNTER, "Prompt (prefill) tokens processed."),
    Quantity("generation_tokens_total", Unit.TOKENS, Kind.COUNTER, "Output (decode) tokens generated."),
    Quantity(
        "prompt_tokens_per_second",
        Unit.TOKENS_PER_SECOND,
        Kind.RATE,
        "Prompt tokens processed per second over the window.",
        derived_from=("prompt_tokens_total",),
    ),
    Quantity(
        "generation_tokens_per_second",
        Unit.TOKENS_PER_SECOND,
        Kind.RATE,
        "Output tokens generated per second over the window.",
        derived_from=("generation_tokens_total",),
    ),
    Quantity("preemptions_total", Unit.COUNT, Kind.COUNTER, "Requests preempted (SGLang: retracted)."),
    Quantity(
        "preemption_rate",
        Unit.PER_SECOND,
        Kind.RATE,
        "Preemptions per second over the window.",
        derived_from=("preemptions_total",),
    ),
    Quantity(
        "prefix_cache_hit_rate",
        Unit.RATIO,
        Kind.RATIO,
        "Fraction of looked-up prompt tokens found in the prefix cache, 0-1.",
    ),
    *_latencies(),
    Quantity("gpu_memory_used_bytes", Unit.BYTES, Kind.GAUGE, "GPU framebuffer memory used (DCGM)."),
    Quantity(
        "gpu_memory_total_bytes",
        Unit.BYTES,
        Kind.GAUGE,
        "GPU framebuffer memory, free + used + reserved (DCGM).",
    ),
    Quantity("gpu_utilization", Unit.RATIO, Kind.GAUGE, "Time a kernel was running, 0-1 (DCGM GPU_UTIL)."),
    Quantity(
        "gpu_engine_active",
        Unit.RATIO,
        Kind.GAUGE,
        "Graphics-engine active ratio, 0-1 (DCGM PROF_GR_ENGINE_ACTIVE; works on MIG).",
    ),
    Quantity(
        "gpu_dram_active",
        Unit.RATIO,
        Kind.GAUGE,
        "Memory-interface active ratio, 0-1 (DCGM PROF_DRAM_ACTIVE; the decode-saturation signal).",
    ),
)

CATALOG: Final[Mapping[str, Quantity]] = MappingProxyType({q.name: q for q in QUANTITIES})
