"""The engines' real tuning knobs (ENGINES.md §6) as pydantic schemas, the load spec and scenario presets.

Knob names are the engines' own CLI flags with ``-`` → ``_``. Values are validated strictly (a JSON
string is not an int) and a bad or unknown knob raises `KnobError` naming it, so the control API can
answer 400 with the knob's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

EngineName = Literal["vllm", "tgi", "sglang"]
ENGINES: tuple[EngineName, ...] = ("vllm", "tgi", "sglang")
VllmVersion = Literal["v0", "v1"]


class KnobError(ValueError):
    """A knob (or load field) the simulated engine would refuse; `knob` names it."""

    def __init__(self, knob: str, message: str) -> None:
        super().__init__(message)
        self.knob = knob
        self.message = message


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class VllmSettings(_Strict):
    """vLLM engine args. Defaults are V1's for a >=70 GiB GPU (OpenAI server); `defaults("vllm","v0")`
    gives V0's."""

    max_num_seqs: int = Field(1024, ge=1, le=8192)
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    max_num_batched_tokens: int = Field(8192, ge=16, le=1_048_576)
    enable_prefix_caching: bool = True
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] = "auto"
    block_size: Literal[8, 16, 32, 64, 128] = 16
    enable_chunked_prefill: bool = True
    max_model_len: int = Field(8192, ge=64, le=131_072)


class TgiSettings(_Strict):
    """TGI launcher flags (``launcher.md``). ``None`` means "let TGI infer it" as the launcher does."""

    max_batch_total_tokens: int | None = Field(None, ge=1)
    max_concurrent_requests: int = Field(128, ge=1, le=100_000)
    max_batch_prefill_tokens: int | None = Field(None, ge=1)  # None: max_input_tokens + 50
    max_batch_size: int | None = Field(None, ge=1)
    # TGI has no "auto" value: leaving the flag unset keeps the model dtype; "auto" stands for that.
    kv_cache_dtype: Literal["auto", "fp8_e4m3fn", "fp8_e5m2"] = "auto"
    max_input_tokens: int = Field(7168, ge=1, le=131_071)
    max_total_tokens: int = Field(8192, ge=2, le=131_072)


class SglangSettings(_Strict):
    """SGLang server args (``hyperparameter_tuning.md``)."""

    mem_fraction_static: float = Field(0.88, gt=0.0, lt=1.0)
    max_running_requests: int | None = Field(None, ge=1)
    chunked_prefill_size: int = Field(8192, ge=-1)  # -1 disables chunking
    schedule_conservativeness: float = Field(1.0, gt=0.0, le=10.0)
    schedule_policy: Literal["fcfs", "lpm"] = "fcfs"
    kv_cache_dtype: Literal["auto", "fp8_e4m3", "fp8_e5m2"] = "auto"
    disable_radix_cache: bool = False


Settings = VllmSettings | TgiSettings | SglangSettings

_MODELS: Mapping[EngineName, type[VllmSettings] | type[TgiSettings] | type[SglangSettings]] = (
    MappingProxyType({"vllm": VllmSettings, "tgi": TgiSettings, "sglang": SglangSettings})
)


def defaults(engine: EngineName, version: VllmVersion = "v1") -> Settings:
    """The settings an engine starts with when no flag is given."""
    if engine == "vllm" and version == "v0":
        # V0 (<=0.7): 256 sequences, no prefix caching, no chunked prefill, and then
        # max_num_batched_tokens must hold a whole max_model_len prompt.
        return VllmSettings(
            max_num_seqs=256,
            max_num_batched_tokens=8192,
            enable_prefix_caching=False,
            enable_chunked_prefill=False,
        )
    return _MODELS[engine]()


def knob_names(engine: EngineName) -> tuple[str, ...]:
    return tuple(_MODELS[engine].model_fields)


def _first_error(exc: pydantic.ValidationError, engine: str, allowed: tuple[str, ...]) -> KnobError:
    err = exc.errors()[0]
    knob = str(err["loc"][0]) if err["loc"] else "?"
    if err["type"] == "extra_forbidden":
        return KnobError(knob, f"unknown {engine} knob {knob!r}; known: {', '.join(allowed)}")
    return KnobError(knob, f"invalid value for {engine} knob {knob!r}: {err['msg']} (got {err['input']!r})")


def apply_knobs(engine: EngineName, current: Settings, changes: Mapping[str, Any]) -> Settings:
    """`current` with `changes` applied, validated; raises `KnobError` naming the first bad knob."""
    model = _MODELS[engine]
    if not isinstance(changes, Mapping):
        raise KnobError("settings", "settings must be a JSON object of knob names to values")
    merged = {**current.model_dump(), **changes}
    try:
        return model.model_validate(merged)
    except pydantic.ValidationError as exc:
        raise _first_error(exc, engine, knob_names(engine)) from None


class LoadSpec(_Strict):
    """Offered load of one instance: Poisson arrivals, lognormal prompt/output lengths with these means."""

    rate: float = Field(0.0, ge=0.0, le=10_000.0)  # requests per second
    prompt_tokens: float = Field(1000.0, ge=1.0, le=131_072.0)  # mean prompt length
    output_tokens: float = Field(250.0, ge=1.0, le=131_072.0)  # mean output length (before max_tokens)
    prefix_share: float = Field(0.0, ge=0.0, le=1.0)  # share of prompt tokens that is a shared prefix
    prefix_groups: int = Field(4, ge=1, le=4096)  # distinct shared prefixes (system prompts, templates)
    max_tokens: int = Field(1024, ge=1, le=131_072)  # the max_tokens clients send
    scenario: str = "custom"


# Presets calibrated for the default hardware (Llama-3.1-8B, bf16, one 80 GB GPU) at default
# settings; see the module docstring of `perfagent.sim.model` for the capacity arithmetic.
SCENARIOS: Mapping[str, LoadSpec] = MappingProxyType(
    {
        "idle": LoadSpec(rate=0.0, scenario="idle"),
        "steady": LoadSpec(
            rate=3.0, prompt_tokens=1000, output_tokens=250, prefix_share=0.3, scenario="steady"
        ),
        # ~2x the prefill capacity: the waiting queue and queue time grow without bound (TGI rejects
        # beyond max_concurrent_requests instead).
        "overload": LoadSpec(
            rate=30.0, prompt_tokens=1000, output_tokens=250, prefix_share=0.3, scenario="overload"
        ),
        # Long contexts that keep growing, just past the default vLLM's KV capacity: usage reaches 1
        # and requests are preempted within ~2 minutes. fp8 KV removes it; at 1.2 req/s (near
        # capacity) so does more gpu_memory_utilization, while at this rate preemptions track throughput.
        "kv_exhaustion": LoadSpec(
            rate=1.4, prompt_tokens=5000, output_tokens=1500, max_tokens=2048, scenario="kv_exhaustion"
        ),
        # Long unique prompts: prefill-bound, high TTFT, prefix-cache hit rate ~0.
        "long_prompts_no_reuse": LoadSpec(
            rate=3.5, prompt_tokens=4000, output_tokens=150, max_tokens=512, scenario="long_prompts_no_reuse"
        ),
        # Short prompts, long outputs near decode saturation (~6k tok/s): batches of hundreds, ITL ~50-65 ms,
        # KV about half used. Fewer max_num_seqs lowers ITL (and queues instead).
        "slow_decode": LoadSpec(
            rate=7.0, prompt_tokens=200, output_tokens=800, max_tokens=2048, scenario="slow_decode"
        ),
    }
)

_LOAD_FIELDS = tuple(f for f in LoadSpec.model_fields if f != "scenario")


def apply_load(current: LoadSpec, changes: Mapping[str, Any]) -> LoadSpec:
    """`current` updated by `changes`: an optional ``scenario`` preset first, then explicit fields."""
    if not isinstance(changes, Mapping):
        raise KnobError("load", "load must be a JSON object")
    changes = dict(changes)
    base, label = current, "custom"
    if "scenario" in changes:
        name = changes.pop("scenario")
        if not isinstance(name, str) or name not in SCENARIOS:
            raise KnobError("scenario", f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
        base, label = SCENARIOS[name], name
    if not changes:
        return base
    try:
        return LoadSpec.model_validate({**base.model_dump(), **changes, "scenario": label})
    except pydantic.ValidationError as exc:
        raise _first_error(exc, "load", _LOAD_FIELDS) from None
