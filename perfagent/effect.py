"""Did the change take effect? Ask the engine, not the executor.

An executor reporting success says a command ran or an endpoint answered; only the engine itself can
say which settings it runs with. Before a canary is judged, each expected setting is checked against:

1. vLLM's `vllm:cache_config_info` (an info gauge, and a prometheus `Info` in <=0.5): its labels carry
   the KV-cache settings, e.g. `gpu_memory_utilization`, `enable_prefix_caching`, `cache_dtype`
   (the `--kv-cache-dtype` flag), `block_size`, `swap_space` (`swap_space_bytes` before V1).
2. A simulated instance (its exposition has `perfagent_simulator_info`): the settings the simulator
   reports at `GET <base>/instances/<id>`.

A setting neither shows (e.g. vLLM's `max_num_seqs`, anything on real TGI or SGLang, which export no
settings metric) is `unverifiable`, said as such rather than assumed. When the metrics cannot be read
(e.g. the engine is still restarting) every setting is `unreachable`: try again after the warm-up.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any, Final

import polars as pl
from pydantic import BaseModel

from perfagent.errors import PerfAgentError
from perfagent.executors.sim import same_value, sim_endpoint
from perfagent.exposition import parse_exposition
from perfagent.models import Instance
from perfagent.scrape import Scraper

VLLM_INFO: Final = "vllm:cache_config_info"
SIM_INFO: Final = "perfagent_simulator_info"
# vLLM flag -> cache_config_info label(s) and the factor from label to flag units. Only settings whose
# meaning is the same on both sides are listed; anything else is unverifiable.
VLLM_LABELS: Final[Mapping[str, tuple[tuple[str, float], ...]]] = {
    "gpu_memory_utilization": (("gpu_memory_utilization", 1.0),),
    "enable_prefix_caching": (("enable_prefix_caching", 1.0),),
    "kv_cache_dtype": (("cache_dtype", 1.0),),
    "block_size": (("block_size", 1.0),),
    "num_gpu_blocks_override": (("num_gpu_blocks_override", 1.0),),
    "cpu_offload_gb": (("cpu_offload_gb", 1.0),),
    "swap_space": (("swap_space", 1.0), ("swap_space_bytes", 1.0 / 2**30)),  # GiB on the CLI
    "kv_cache_memory_bytes": (("kv_cache_memory_bytes", 1.0),),
    "prefix_caching_hash_algo": (("prefix_caching_hash_algo", 1.0),),
    "calculate_kv_scales": (("calculate_kv_scales", 1.0),),
}
_TRUE, _FALSE = frozenset({"true", "1"}), frozenset({"false", "0"})


class EffectStatus(StrEnum):
    CONFIRMED = "confirmed"  # the engine reports the expected value
    MISMATCH = "mismatch"  # the engine reports another value (`observed`)
    UNVERIFIABLE = "unverifiable"  # the engine does not report this setting at all
    UNREACHABLE = "unreachable"  # the engine could not be asked now (restarting, down)


class SettingCheck(BaseModel):
    setting: str
    expected: Any
    status: EffectStatus
    observed: Any = None
    source: str | None = None  # e.g. "vllm:cache_config_info", "simulator"
    reason: str = ""


class EffectReport(BaseModel):
    instance_id: str
    checks: list[SettingCheck]

    @property
    def status(self) -> EffectStatus:
        """Worst first: a mismatch, then unreachable, then confirmed (unverifiable ones listed apart)."""
        statuses = {c.status for c in self.checks}
        for status in (EffectStatus.MISMATCH, EffectStatus.UNREACHABLE):
            if status in statuses:
                return status
        if statuses and statuses <= {EffectStatus.UNVERIFIABLE}:
            return EffectStatus.UNVERIFIABLE
        return EffectStatus.CONFIRMED

    @property
    def unverifiable(self) -> list[str]:
        return [c.setting for c in self.checks if c.status is EffectStatus.UNVERIFIABLE]


def _label_matches(expected: Any, observed: str, factor: float) -> bool:
    """Whether a label value (Python's str() of the engine's value) equals the expected setting."""
    text = observed.strip()
    if isinstance(expected, bool):
        return (text.lower() in _TRUE) if expected else (text.lower() in _FALSE)
    if isinstance(expected, int | float):
        try:
            value = float(text) * factor
        except ValueError:
            return False
        return math.isclose(value, float(expected), rel_tol=1e-6, abs_tol=1e-9)
    if expected is None:
        return text == "None"
    return text == str(expected)


def _info_labels(samples: pl.DataFrame, name: str) -> list[dict[str, str]]:
    rows = samples.filter(pl.col("name") == name)["labels"].to_list()
    return [{pair["name"]: pair["value"] for pair in row} for row in rows]


def check_vllm_info(samples: pl.DataFrame, expected: Mapping[str, Any]) -> dict[str, SettingCheck]:
    """The settings `vllm:cache_config_info` shows; a series per engine (data parallel) must all agree."""
    series = _info_labels(samples, VLLM_INFO)
    out: dict[str, SettingCheck] = {}
    if not series:
        return out
    for setting, want in expected.items():
        for label, factor in VLLM_LABELS.get(setting, ()):
            observed = [s[label] for s in series if label in s]
            if not observed:
                continue
            wrong = sorted({o for o in observed if not _label_matches(want, o, factor)})
            out[setting] = SettingCheck(
                setting=setting,
                expected=want,
                status=EffectStatus.MISMATCH if wrong else EffectStatus.CONFIRMED,
                observed=wrong[0] if len(wrong) == 1 else (wrong or observed[0]),
                source=f"{VLLM_INFO}{{{label}}}",
                reason=f"the engine reports {label}={', '.join(wrong)}" if wrong else "",
            )
            break
    return out


def check_sim_view(view: Mapping[str, Any], expected: Mapping[str, Any]) -> dict[str, SettingCheck]:
    """The settings a simulated instance reports in its control API view."""
    settings = view.get("settings")
    if not isinstance(settings, Mapping):
        return {}
    out: dict[str, SettingCheck] = {}
    for setting, want in expected.items():
        if setting not in settings:
            continue
        got = settings[setting]
        ok = same_value(got, want)
        out[setting] = SettingCheck(
            setting=setting,
            expected=want,
            status=EffectStatus.CONFIRMED if ok else EffectStatus.MISMATCH,
            observed=got,
            source="simulator",
            reason="" if ok else f"the simulator reports {setting}={got!r}",
        )
    return out


def _unreachable(instance_id: str, expected: Iterable[tuple[str, Any]], why: str) -> EffectReport:
    checks = [
        SettingCheck(setting=s, expected=v, status=EffectStatus.UNREACHABLE, reason=why) for s, v in expected
    ]
    return EffectReport(instance_id=instance_id, checks=checks)


async def confirm_effect(instance: Instance, expected: Mapping[str, Any], scraper: Scraper) -> EffectReport:
    """Check each expected setting against what the engine (or the simulator) reports now."""
    try:
        fetched = await scraper.fetch(instance.metrics_url)
    except PerfAgentError as exc:
        return _unreachable(instance.id, expected.items(), f"metrics not readable: {exc.message}")
    samples = parse_exposition(fetched.text)
    found: dict[str, SettingCheck] = {}
    if instance.engine.value == "vllm":
        found |= check_vllm_info(samples, expected)
    endpoint = sim_endpoint(instance.metrics_url)
    simulated = endpoint is not None and samples.filter(pl.col("name") == SIM_INFO).height > 0
    if endpoint is not None and simulated and set(expected) - set(found):
        try:
            view = json.loads((await scraper.fetch(endpoint.instance_url, field="sim_url")).text)
        except (PerfAgentError, ValueError) as exc:
            reason = exc.message if isinstance(exc, PerfAgentError) else "not JSON"
            return _unreachable(instance.id, expected.items(), f"simulator view not readable: {reason}")
        rest = {k: v for k, v in expected.items() if k not in found}
        found |= check_sim_view(view if isinstance(view, dict) else {}, rest)
    where = "the simulator" if simulated else f"{instance.engine.value}'s metrics"
    checks = [
        found.get(setting)
        or SettingCheck(
            setting=setting,
            expected=want,
            status=EffectStatus.UNVERIFIABLE,
            reason=f"{setting} is not reported by {where}",
        )
        for setting, want in expected.items()
    ]
    return EffectReport(instance_id=instance.id, checks=checks)
