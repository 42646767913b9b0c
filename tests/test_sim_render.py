"""The simulator's exposition against the real captures: family names, types, label-name sets, bucket
layouts and HELP lines, per engine and version (ENGINES.md §0-§3, tests/fixtures/SOURCES.md)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from perfagent.sim import SimFleet
from perfagent.sim.knobs import EngineName
from perfagent.sim.render_tgi import rust_f64
from tests.conftest import capture

# Families a real server exposes beside the engine's own, which the simulator does not model:
# the Python runtime and process collectors and prometheus-fastapi-instrumentator's http_* series
# (ENGINES.md rule 6). vLLM's process_start_time_seconds IS simulated (restarts change it).
NOT_ENGINE = ("python_", "process_", "http_")
SIM_ONLY = {"perfagent_simulator_info", "perfagent_simulator_settings_info"}


@dataclass(frozen=True)
class Family:
    type: str
    labels: frozenset[str]
    buckets: tuple[str, ...]  # `le` strings in order, for histograms


def families(text: str) -> dict[str, Family]:
    out: dict[str, Family] = {}
    for fam in text_string_to_metric_families(text):
        labels: set[str] = set()
        les: list[str] = []
        for s in fam.samples:
            labels |= set(s.labels) - {"le", "quantile"}
            if s.name.endswith("_bucket") and s.labels["le"] not in les:
                les.append(s.labels["le"])
        out[fam.name] = Family(fam.type, frozenset(labels), tuple(les))
    return out


def help_lines(text: str) -> dict[tuple[str, str], str]:
    """(HELP or TYPE, family) -> the rest of the line."""
    return {(kind, name): rest for kind, name, rest in re.findall(r"^# (HELP|TYPE) (\S+) ?(.*)$", text, re.M)}


def simulated(
    engine: EngineName, knobs: Mapping[str, Any], load: Mapping[str, Any], version: str = "v1"
) -> str:
    fleet = SimFleet(
        engine,
        1,
        seed=1,
        clock="manual",
        vllm_version="v0" if version == "v0" else "v1",
        settings={engine: dict(knobs)},
        load=dict(load),
    )
    fleet.advance(180)
    text = fleet.render(f"{engine}-0")
    assert text is not None
    return text


def engine_families(fams: Mapping[str, Family]) -> dict[str, Family]:
    return {n: f for n, f in fams.items() if not n.startswith(NOT_ENGINE)}


# Short outputs and small prompts, so that every family of the captures is recorded at least once
# (TGI registers a series on its first update: validation failures need prompts > max_input_tokens).
BUSY = {"rate": 8.0, "prompt_tokens": 300, "output_tokens": 100, "max_tokens": 100, "prefix_share": 0.3}


@pytest.mark.parametrize(
    ("engine", "version", "fixture", "knobs"),
    [
        ("vllm", "v1", "vllm-v1-recent", {}),
        # The 0.5.x capture is facebook/opt-125m: max_model_len 2048 sets its token buckets (1-2-5 up to it).
        ("vllm", "v0", "vllm-v0-0.5.x", {"max_model_len": 2048, "max_num_batched_tokens": 2048}),
        # The TGI capture ran with max_input_tokens=511 and max_total_tokens=512 (SOURCES.md).
        ("tgi", "v1", "tgi-3.x", {"max_input_tokens": 511, "max_total_tokens": 512}),
    ],
)
def test_families_labels_and_buckets_equal_the_capture(
    engine: EngineName, version: str, fixture: str, knobs: dict[str, Any]
) -> None:
    text = simulated(engine, knobs, BUSY, version)
    real_text = capture(fixture).read_text()
    sim, real = families(text), engine_families(families(real_text))
    for name, fam in real.items():
        assert name in sim, f"{name} missing from the simulated {engine} {version}"
        assert sim[name] == fam, f"{name}: simulated {sim[name]} != captured {fam}"
    extra = set(engine_families(sim)) - set(real) - SIM_ONLY - {"tgi_sim_settings_info"}
    assert not extra, f"families the capture does not have: {sorted(extra)}"
    # HELP and TYPE lines are the engine's own, character for character (TGI prints no HELP for some).
    real_help = {k: v for k, v in help_lines(real_text).items() if not k[1].startswith(NOT_ENGINE)}
    sim_help = help_lines(text)
    for key, value in real_help.items():
        assert sim_help.get(key) == value, key


def test_tgi_le_strings_are_rust_floats_exactly_as_captured() -> None:
    text = simulated("tgi", {"max_input_tokens": 511, "max_total_tokens": 512}, BUSY)
    real = capture("tgi-3.x").read_text()
    for name in ("tgi_request_duration", "tgi_request_input_length", "tgi_request_generated_tokens"):
        pattern = rf'^{name}_bucket\{{le="([^"]+)"\}}'
        assert re.findall(pattern, text, re.M) == re.findall(pattern, real, re.M)
    assert 'le="0.00015000000000000001"' in text
    assert len(re.findall(r"^tgi_batch_next_size_bucket", text, re.M)) == 1025  # 1..1024 and +Inf
    assert not re.search(r"^tgi_\w+_total", text, re.M)  # no _total suffix on TGI counters
    assert "# TYPE tgi_request_skipped_tokens summary" in text
    assert (rust_f64(128.0), rust_f64(1e-7), rust_f64(0.1 * 3)) == ("128", "0.0000001", "0.30000000000000004")


def test_tgi_series_appear_only_once_recorded() -> None:
    fleet = SimFleet("tgi", 1, seed=1, clock="manual", load="idle")
    fleet.advance(60)
    text = fleet.render("tgi-0")
    assert text is not None
    assert set(families(text)) == SIM_ONLY | {"tgi_sim_settings_info"}
    assert text.endswith("\n\n")  # one blank line after every family, as the Rust exporter prints


def test_vllm_v0_has_no_created_and_model_name_only() -> None:
    text = simulated("vllm", {}, BUSY, "v0")
    assert "_created" not in text
    for name, fam in engine_families(families(text)).items():
        if name.startswith("vllm:") and name != "vllm:cache_config_info" and fam.labels:
            assert fam.labels - {"finished_reason"} == {"model_name"}, name


def test_vllm_v1_labels_engine_and_created_series() -> None:
    fams = families(simulated("vllm", {}, BUSY))
    for name, fam in fams.items():
        if name.startswith("vllm:") and name != "vllm:cache_config_info":
            assert {"model_name", "engine"} <= fam.labels, name
        if fam.type in ("counter", "histogram") and name.startswith("vllm:"):
            assert f"{name}_created" in fams, name


# SGLang: the Datadog fixture is curated (SOURCES.md: 1-2 buckets per histogram, no engine_type), so
# names are compared with it, label sets with the >=0.4.4 collector, and buckets with ENGINES.md §3.3.
SGLANG_SCHEDULER = frozenset({"model_name", "engine_type", "tp_rank", "pp_rank"})
SGLANG_LABEL_EXCEPTIONS = {
    # Tokenizer-manager counters carry model_name only (collector.py TokenizerMetricsCollector;
    # ENGINES.md §3.1); the fixture shows tp_rank on them.
    "sglang:prompt_tokens": frozenset({"model_name"}),
    "sglang:generation_tokens": frozenset({"model_name"}),
    "sglang:cached_tokens": frozenset({"model_name"}),
    "sglang:num_requests": frozenset({"model_name"}),
    # queue_time is a SchedulerMetricsCollector histogram (scheduler labels); the fixture shows model_name.
    "sglang:queue_time_seconds": SGLANG_SCHEDULER,
}
SGLANG_BUCKETS = {  # ENGINES.md §3.3 (mid-2025 collector defaults)
    "sglang:time_to_first_token_seconds": [
        0.1,
        0.2,
        0.4,
        0.6,
        0.8,
        1,
        2,
        4,
        6,
        8,
        10,
        20,
        40,
        60,
        80,
        100,
        200,
        400,
    ],
    "sglang:inter_token_latency_seconds": [
        *(0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.060, 0.080),
        *(0.100, 0.200, 0.400, 0.600, 0.800, 1, 2, 4, 6, 8),
    ],
    "sglang:e2e_request_latency_seconds": [
        *(0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 600, 1200),
        *(1800, 2400),
    ],
    "sglang:queue_time_seconds": [
        *(0.0, 0.1, 0.2, 0.5, 1, 2, 3, 4, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 100, 200, 300),
        *(400, 500, 600, 700, 800, 900, 1000, 1200, 1400, 1600, 1800, 2000, 2500, 3000),
    ],
}


def test_sglang_names_match_the_capture_and_labels_the_collector() -> None:
    sim = families(simulated("sglang", {}, BUSY))
    real = engine_families(families(capture("sglang-0.5.10").read_text()))
    for name, fam in real.items():
        assert name in sim, f"{name} missing from the simulated SGLang"
        assert sim[name].type == fam.type, name
        if name in SGLANG_LABEL_EXCEPTIONS:
            assert sim[name].labels == SGLANG_LABEL_EXCEPTIONS[name], name
        elif "tp_rank" in fam.labels:  # scheduler gauges: >=0.4.4 adds engine_type and pp_rank (§3.1)
            assert sim[name].labels == SGLANG_SCHEDULER, name
        else:
            assert sim[name].labels == fam.labels, name
    for name, bounds in SGLANG_BUCKETS.items():
        assert [float(le) for le in sim[name].buckets] == [*map(float, bounds), float("inf")], name
    assert "sglang:num_retracted_requests" in sim  # the retraction (preemption) counter (§3.2)
    assert "process_start_time_seconds" not in sim  # multiprocess registry: no process_* families


@pytest.mark.parametrize("engine", ["vllm", "tgi", "sglang"])
def test_every_instance_says_it_is_simulated(engine: EngineName) -> None:
    text = simulated(engine, {}, {"scenario": "idle"})
    assert re.search(r"^# HELP perfagent_simulator_info SIMULATED", text, re.M)
    info = next(f for f in text_string_to_metric_families(text) if f.name == "perfagent_simulator_info")
    assert info.samples[0].labels["engine"] == engine
    assert info.samples[0].labels["instance"] == f"{engine}-0"
    assert info.samples[0].value == 1.0


def test_mixed_fleet_is_round_robin_and_each_speaks_its_engine() -> None:
    fleet = SimFleet("mixed", 4, seed=3, clock="manual", load="steady")
    assert list(fleet.instances) == ["vllm-0", "tgi-1", "sglang-2", "vllm-3"]
    fleet.advance(30)
    prefixes = {"vllm-0": "vllm:", "tgi-1": "tgi_", "sglang-2": "sglang:", "vllm-3": "vllm:"}
    for instance_id, prefix in prefixes.items():
        text = fleet.render(instance_id)
        assert text is not None
        names = set(families(text)) - SIM_ONLY - {"process_start_time_seconds"}
        assert names, instance_id
        assert all(n.startswith(prefix) for n in names), instance_id
