"""From knobs to engine behaviour: the simulated hardware and each engine's derived scheduling spec.

This is where the settings in force turn into capacities (KV tokens, batch slots, per-step token
budget) and policies (mixed vs stalling prefill, reservation, preemption). Settings a real engine
refuses to start with raise `KnobError` naming the knob, as the real start-up checks do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from perfagent.sim.knobs import (
    EngineName,
    KnobError,
    Settings,
    SglangSettings,
    TgiSettings,
    VllmSettings,
    VllmVersion,
)

GB = 1e9


@dataclass(frozen=True)
class Hardware:
    """One GPU serving one model. Defaults: Llama-3.1-8B-Instruct in bf16 on an 80 GB H100-class GPU."""

    gpu_memory_bytes: float = 80 * GB
    weights_bytes: float = 16.06 * GB
    # Non-KV runtime memory outside the weights: activations at the token budget, CUDA graphs.
    activation_bytes: float = 2.5 * GB
    params: float = 8.03e9
    layers: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    mem_bandwidth: float = 2.0e12  # effective HBM bytes/s (decode is memory-bound)
    compute_flops: float = 3.0e14  # effective FLOP/s (prefill is compute-bound)
    seq_overhead_s: float = 1.0e-4  # per sequence per step: sampling, detokenising, scheduling

    def kv_bytes_per_token(self, fp8: bool) -> int:
        """K and V for every layer and KV head; fp8 stores one byte per element instead of two."""
        return 2 * self.layers * self.kv_heads * self.head_dim * (1 if fp8 else 2)

    @property
    def step_base_s(self) -> float:
        """One forward pass reads every weight once."""
        return self.weights_bytes / self.mem_bandwidth

    @property
    def prefill_s_per_token(self) -> float:
        return 2.0 * self.params / self.compute_flops


EngineKind = Literal["vllm", "tgi", "sglang"]


@dataclass(frozen=True)
class EngineSpec:
    """What the model needs to know about one engine with its settings in force."""

    kind: EngineKind
    max_seqs: int  # running-batch slots
    kv_tokens: int  # KV capacity in tokens
    block: int  # allocation granularity in tokens (vLLM block_size; SGLang pages of 1)
    chunk: int  # prefill tokens per forward pass
    mixed: bool  # prefill chunks ride along with decodes in one step (vLLM); else decodes stall
    prefix_cache: bool
    kv_fp8: bool
    max_len: int  # prompt + output limit (vLLM max_model_len, TGI max_total_tokens)
    max_input: int  # longest prompt accepted (TGI validates; others clip to max_len - 1)
    max_concurrent: int | None = None  # TGI router limit: beyond it, 429 "overloaded"
    reserve_full: bool = False  # TGI: admission reserves prompt + max_new_tokens
    conservativeness: float | None = None  # SGLang new-token-ratio reservation
    lpm: bool = False  # SGLang longest-prefix-match ordering of the waiting queue
    retract_to_back: bool = False  # SGLang re-queues retracted requests at the back; vLLM at the front


def _kv_tokens(hw: Hardware, budget_bytes: float, fp8: bool) -> int:
    return max(0, int(budget_bytes // hw.kv_bytes_per_token(fp8)))


def vllm_spec(s: VllmSettings, hw: Hardware, version: VllmVersion = "v1") -> EngineSpec:
    fp8 = s.kv_cache_dtype != "auto"
    # vLLM profiles a forward pass, then gives the KV cache what is left of util x GPU memory.
    budget = hw.gpu_memory_bytes * s.gpu_memory_utilization - hw.weights_bytes - hw.activation_bytes
    blocks = _kv_tokens(hw, budget, fp8) // s.block_size
    if blocks <= 0:
        raise KnobError(
            "gpu_memory_utilization",
            f"No available memory for the cache blocks at gpu_memory_utilization={s.gpu_memory_utilization}",
        )
    if blocks * s.block_size < s.max_model_len:
        raise KnobError(
            "gpu_memory_utilization",
            f"max_model_len {s.max_model_len} is larger than the {blocks * s.block_size} tokens the KV cache "
            "can hold; raise gpu_memory_utilization or lower max_model_len",
        )
    if not s.enable_chunked_prefill and s.max_num_batched_tokens < s.max_model_len:
        raise KnobError(
            "max_num_batched_tokens",
            f"max_num_batched_tokens ({s.max_num_batched_tokens}) is smaller than max_model_len "
            f"({s.max_model_len}) with chunked prefill disabled",
        )
    return EngineSpec(
        kind="vllm",
        max_seqs=s.max_num_seqs,
        kv_tokens=blocks * s.block_size,
        block=s.block_size,
        chunk=s.max_num_batched_tokens,
        # V1 schedules prefill tokens and decodes in one step even without chunking (a whole prompt
        # must then fit the budget); V0 without chunked prefill runs prefill-only steps that stall decodes.
        mixed=version == "v1" or s.enable_chunked_prefill,
        prefix_cache=s.enable_prefix_caching,
        kv_fp8=fp8,
        max_len=s.max_model_len,
        max_input=s.max_model_len - 1,
    )


def tgi_auto_total_tokens(s: TgiSettings, hw: Hardware) -> int:
    """What TGI's warmup infers for max_batch_total_tokens: all memory left after weights/activations."""
    fp8 = s.kv_cache_dtype != "auto"
    return _kv_tokens(hw, 0.95 * (hw.gpu_memory_bytes - hw.weights_bytes - hw.activation_bytes), fp8)


def tgi_spec(s: TgiSettings, hw: Hardware) -> EngineSpec:
    if s.max_input_tokens >= s.max_total_tokens:
        raise KnobError(
            "max_input_tokens",
            f"max_input_tokens ({s.max_input_tokens}) must be < max_total_tokens ({s.max_total_tokens})",
        )
    prefill = s.max_batch_prefill_tokens or s.max_input_tokens + 50
    if prefill < s.max_input_tokens:
        raise KnobError(
            "max_batch_prefill_tokens",
            f"max_batch_prefill_tokens ({prefill}) must be >= max_input_tokens ({s.max_input_tokens})",
        )
    auto = tgi_auto_total_tokens(s, hw)
    total = min(s.max_batch_total_tokens, auto) if s.max_batch_total_tokens else auto
    if total < s.max_total_tokens:
        knob = "max_batch_total_tokens" if s.max_batch_total_tokens else "max_total_tokens"
        raise KnobError(
            knob, f"max_batch_total_tokens ({total}) must be >= max_total_tokens ({s.max_total_tokens})"
        )
    return EngineSpec(
        kind="tgi",
        max_seqs=s.max_batch_size or 1_000_000,
        kv_tokens=total,
        block=1,
        chunk=prefill,
        mixed=False,  # TGI runs a prefill forward for the new batch while the running batch waits
        prefix_cache=True,  # v3 backend default; it exports no prefix-cache metric
        kv_fp8=s.kv_cache_dtype != "auto",
        max_len=s.max_total_tokens,
        max_input=s.max_input_tokens,
        max_concurrent=s.max_concurrent_requests,
        reserve_full=True,
    )


def sglang_spec(s: SglangSettings, hw: Hardware) -> EngineSpec:
    fp8 = s.kv_cache_dtype != "auto"
    # mem_fraction_static covers weights + KV pool; activations live in the rest.
    tokens = _kv_tokens(hw, hw.gpu_memory_bytes * s.mem_fraction_static - hw.weights_bytes, fp8)
    if tokens < 8192:
        raise KnobError(
            "mem_fraction_static",
            f"mem_fraction_static={s.mem_fraction_static} leaves {tokens} KV tokens; not enough memory",
        )
    # SGLang sizes the request pool from the KV pool when max_running_requests is unset.
    max_running = s.max_running_requests or min(4096, max(2048, tokens // 8192 * 512))
    return EngineSpec(
        kind="sglang",
        max_seqs=max_running,
        kv_tokens=tokens,
        block=1,
        chunk=s.chunked_prefill_size if s.chunked_prefill_size > 0 else 16384,  # else max_prefill_tokens
        mixed=False,  # prefill (extend) batches run separately from decode batches by default
        prefix_cache=not s.disable_radix_cache,
        kv_fp8=fp8,
        max_len=8192,
        max_input=8191,
        conservativeness=s.schedule_conservativeness,
        lpm=s.schedule_policy == "lpm",
        retract_to_back=True,
    )


def build_spec(
    engine: EngineName, settings: Settings, hw: Hardware, version: VllmVersion = "v1"
) -> EngineSpec:
    if engine == "vllm" and isinstance(settings, VllmSettings):
        return vllm_spec(settings, hw, version)
    if engine == "tgi" and isinstance(settings, TgiSettings):
        return tgi_spec(settings, hw)
    if engine == "sglang" and isinstance(settings, SglangSettings):
        return sglang_spec(settings, hw)
    raise TypeError(f"settings {type(settings).__name__} do not belong to engine {engine}")
