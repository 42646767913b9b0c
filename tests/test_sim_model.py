"""The load and engine model: bottlenecks on purpose, knob directions, restarts, invariants, cost.

Readings come from the rendered exposition (what an agent would scrape) unless a test is about the
model's internals (the property test). Every test uses the manual clock and a fixed seed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from perfagent.sim import KnobError, SimFleet
from perfagent.sim.knobs import SCENARIOS, EngineName, LoadSpec, apply_knobs, apply_load, defaults
from perfagent.sim.model import EngineModel
from perfagent.sim.render_vllm import layout as vllm_layout
from perfagent.sim.spec import Hardware, build_spec


def scrape(fleet: SimFleet, instance_id: str) -> dict[str, float]:
    """Sample name (with sorted labels when there are any) -> value."""
    text = fleet.render(instance_id)
    assert text is not None, f"{instance_id} is restarting"
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(
                f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in ("engine", "model_name")
            )
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def run(
    engine: EngineName,
    load: Mapping[str, Any],
    seconds: float,
    knobs: Mapping[str, Any] | None = None,
    seed: int = 1,
) -> dict[str, float]:
    fleet = SimFleet(
        engine, 1, seed=seed, clock="manual", load=dict(load), settings={engine: dict(knobs or {})}
    )
    fleet.advance(seconds)
    return scrape(fleet, f"{engine}-0")


def mean(m: Mapping[str, float], hist: str) -> float:
    return m[f"{hist}_sum"] / max(m[f"{hist}_count"], 1.0)


# -- bottlenecks on purpose -----------------------------------------------------------------------


def test_idle_produces_nothing() -> None:
    m = run("vllm", {"scenario": "idle"}, 600)
    assert m["vllm:num_requests_running"] == m["vllm:num_requests_waiting"] == 0
    assert m["vllm:num_preemptions_total"] == m["vllm:prompt_tokens_total"] == 0
    assert m["vllm:e2e_request_latency_seconds_count"] == 0
    assert m["vllm:kv_cache_usage_perc"] == 0


def test_overload_queues_and_queue_time_grows() -> None:
    steady = run("vllm", {"scenario": "steady"}, 300)
    over = run("vllm", {"scenario": "overload"}, 300)
    assert steady["vllm:num_requests_waiting"] == 0
    assert over["vllm:num_requests_waiting"] > 100
    assert mean(over, "vllm:request_queue_time_seconds") > 10 * max(
        mean(steady, "vllm:request_queue_time_seconds"), 0.1
    )
    assert mean(over, "vllm:time_to_first_token_seconds") > 10 * mean(
        steady, "vllm:time_to_first_token_seconds"
    )


def test_kv_exhaustion_preempts_and_fills_the_cache() -> None:
    fleet = SimFleet("vllm", 1, seed=1, clock="manual", load="kv_exhaustion")
    fleet.advance(120)
    before = scrape(fleet, "vllm-0")["vllm:num_preemptions_total"]
    fleet.advance(300)
    after = scrape(fleet, "vllm-0")
    assert after["vllm:num_preemptions_total"] > before >= 0
    assert after["vllm:num_preemptions_total"] > 20
    assert after["vllm:kv_cache_usage_perc"] > 0.9


def test_sglang_kv_exhaustion_shows_high_token_usage_and_a_queue() -> None:
    m = run("sglang", {"scenario": "kv_exhaustion"}, 420)
    assert m["sglang:token_usage{engine_type=unified,pp_rank=0,tp_rank=0}"] > 0.9
    assert m["sglang:num_queue_reqs{engine_type=unified,pp_rank=0,tp_rank=0}"] > 0


def test_long_prompts_without_reuse_mean_high_ttft_and_no_hits() -> None:
    long = run("vllm", {"scenario": "long_prompts_no_reuse"}, 300)
    steady = run("vllm", {"scenario": "steady"}, 300)
    assert mean(long, "vllm:time_to_first_token_seconds") > 5 * mean(
        steady, "vllm:time_to_first_token_seconds"
    )
    assert long["vllm:prefix_cache_hits_total"] == 0 < long["vllm:prefix_cache_queries_total"]


def test_slow_decode_raises_inter_token_latency_with_batch_size() -> None:
    slow = run("vllm", {"scenario": "slow_decode"}, 240)
    steady = run("vllm", {"scenario": "steady"}, 240)
    assert slow["vllm:num_requests_running"] > 10 * steady["vllm:num_requests_running"]
    assert mean(slow, "vllm:inter_token_latency_seconds") > 3 * mean(
        steady, "vllm:inter_token_latency_seconds"
    )
    assert slow["vllm:kv_cache_usage_perc"] < 0.9  # decode-bound, not KV-bound
    capped = run("vllm", {"scenario": "slow_decode"}, 240, {"max_num_seqs": 64})
    assert mean(capped, "vllm:inter_token_latency_seconds") < mean(slow, "vllm:inter_token_latency_seconds")


# -- knobs change behaviour in the direction the real engines do ----------------------------------


def test_more_kv_memory_or_fp8_means_fewer_preemptions() -> None:
    near_capacity = {"scenario": "kv_exhaustion", "rate": 1.2}
    small = run("vllm", near_capacity, 600, {"gpu_memory_utilization": 0.6})
    big = run("vllm", near_capacity, 600, {"gpu_memory_utilization": 0.9})
    fp8 = run("vllm", near_capacity, 600, {"gpu_memory_utilization": 0.6, "kv_cache_dtype": "fp8"})
    assert small["vllm:num_preemptions_total"] > 20
    assert big["vllm:num_preemptions_total"] < small["vllm:num_preemptions_total"] / 4
    assert fp8["vllm:num_preemptions_total"] < small["vllm:num_preemptions_total"] / 4
    assert mean(big, "vllm:request_queue_time_seconds") < mean(small, "vllm:request_queue_time_seconds")


def test_fewer_max_num_seqs_means_less_throughput_under_load() -> None:
    full = run("vllm", {"scenario": "overload"}, 240)
    capped = run("vllm", {"scenario": "overload"}, 240, {"max_num_seqs": 32})
    assert capped["vllm:generation_tokens_total"] < 0.8 * full["vllm:generation_tokens_total"]
    assert capped["vllm:num_requests_running"] <= 32
    assert capped["vllm:num_requests_waiting"] > full["vllm:num_requests_waiting"]


def test_prefix_caching_with_shared_prefixes_raises_the_hit_rate() -> None:
    shared = {"scenario": "steady", "prefix_share": 0.7}
    on = run("vllm", shared, 240)
    off = run("vllm", shared, 240, {"enable_prefix_caching": False})
    assert on["vllm:prefix_cache_hits_total"] / on["vllm:prefix_cache_queries_total"] > 0.5
    assert off["vllm:prefix_cache_hits_total"] == 0
    # Cached prefixes are not recomputed: less prefill work, lower TTFT.
    assert mean(on, "vllm:time_to_first_token_seconds") < mean(off, "vllm:time_to_first_token_seconds")
    assert on["vllm:request_prefill_kv_computed_tokens_sum"] < 0.6 * on["vllm:request_prompt_tokens_sum"]


SGL = "{engine_type=unified,pp_rank=0,tp_rank=0}"


def test_sglang_high_conservativeness_queues_while_token_usage_stays_low() -> None:
    # Outputs far below max_tokens: the scheduler reserves for tokens that never come.
    load = {"rate": 12, "prompt_tokens": 1000, "output_tokens": 200, "max_tokens": 4096, "prefix_share": 0.0}
    careful = run("sglang", load, 300, {"schedule_conservativeness": 1.5, "mem_fraction_static": 0.3})
    bold = run("sglang", load, 300, {"schedule_conservativeness": 0.3, "mem_fraction_static": 0.3})
    assert careful[f"sglang:num_queue_reqs{SGL}"] > 0
    assert careful[f"sglang:token_usage{SGL}"] < 0.9
    assert bold[f"sglang:token_usage{SGL}"] > careful[f"sglang:token_usage{SGL}"]
    assert bold["sglang:generation_tokens_total"] > careful["sglang:generation_tokens_total"]


def test_sglang_lpm_raises_the_hit_rate_with_shared_prefixes() -> None:
    load = {"rate": 12, "prompt_tokens": 2000, "output_tokens": 100, "prefix_share": 0.8, "prefix_groups": 32}
    hit = {}
    for policy in ("fcfs", "lpm"):
        m = run("sglang", load, 300, {"schedule_policy": policy, "mem_fraction_static": 0.3})
        hit[policy] = m["sglang:cached_tokens_total"] / m["sglang:prompt_tokens_total"]
    assert hit["lpm"] > hit["fcfs"] + 0.05


def test_tgi_rejects_over_max_concurrent_requests() -> None:
    # (The text has no _total; prometheus_client's parser adds it to counter samples.)
    low = run("tgi", {"scenario": "overload"}, 120, {"max_concurrent_requests": 32})
    high = run("tgi", {"scenario": "overload"}, 120, {"max_concurrent_requests": 512})
    overloaded = "tgi_request_failure_total{err=overloaded}"
    assert low[overloaded] > 0.5 * low["tgi_request_count_total"]
    assert high.get(overloaded, 0.0) < low[overloaded]
    assert low["tgi_batch_current_size"] <= 32
    assert low["tgi_request_count_total"] == high["tgi_request_count_total"]  # the same offered load


def test_info_metrics_report_the_settings_in_force() -> None:
    fleet = SimFleet("mixed", 3, seed=1, clock="manual", load="steady", restart_seconds=10)
    before = scrape(fleet, "vllm-0")
    blocks = next(k for k in before if k.startswith("vllm:cache_config_info"))
    fleet.apply_settings(
        {"gpu_memory_utilization": 0.95, "kv_cache_dtype": "fp8", "block_size": 32}, ids=["vllm-0"]
    )
    fleet.apply_settings({"schedule_conservativeness": 1.5, "schedule_policy": "lpm"}, ids=["sglang-2"])
    fleet.apply_settings({"max_concurrent_requests": 64}, ids=["tgi-1"])
    fleet.advance(20)
    after = scrape(fleet, "vllm-0")
    info = next(k for k in after if k.startswith("vllm:cache_config_info"))
    assert "gpu_memory_utilization=0.95" in info and "cache_dtype=fp8" in info and "block_size=32" in info
    gpu_blocks = {k: int(k.split("num_gpu_blocks=")[1].split(",")[0]) for k in (blocks, info)}
    assert gpu_blocks[info] * 32 > 2 * gpu_blocks[blocks] * 16  # fp8 + more memory: over twice the tokens
    sgl = next(k for k in scrape(fleet, "sglang-2") if k.startswith("sglang:server_args_info"))
    assert "schedule_conservativeness=1.5" in sgl and "schedule_policy=lpm" in sgl
    tgi = next(k for k in scrape(fleet, "tgi-1") if k.startswith("tgi_sim_settings_info"))
    assert "max_concurrent_requests=64" in tgi and "max_batch_total_tokens=None" not in tgi


def test_a_knob_change_restarts_the_instance_and_resets_counters() -> None:
    fleet = SimFleet("vllm", 1, seed=1, clock="manual", load="steady", restart_seconds=30)
    fleet.advance(300)
    before = scrape(fleet, "vllm-0")
    [(_, restarted)] = fleet.apply_settings({"max_num_seqs": 128})
    assert restarted
    assert fleet.render("vllm-0") is None  # /metrics answers 503 while the engine restarts
    fleet.advance(29)
    assert fleet.render("vllm-0") is None
    fleet.advance(6)
    after = scrape(fleet, "vllm-0")
    assert after["process_start_time_seconds"] == before["process_start_time_seconds"] + 300
    assert after["vllm:generation_tokens_created"] > before["vllm:generation_tokens_created"]
    assert 0 < after["vllm:generation_tokens_total"] < 0.1 * before["vllm:generation_tokens_total"]
    assert after["vllm:e2e_request_latency_seconds_count"] < before["vllm:e2e_request_latency_seconds_count"]
    # Same settings again: nothing to restart.
    assert fleet.apply_settings({"max_num_seqs": 128}) == [(fleet.instance("vllm-0"), False)]


@pytest.mark.parametrize(
    ("engine", "knobs", "knob"),
    [
        ("vllm", {"max_num_seq": 8}, "max_num_seq"),
        ("vllm", {"max_num_seqs": "8"}, "max_num_seqs"),  # strict: a string is not an int
        ("vllm", {"kv_cache_dtype": "int4"}, "kv_cache_dtype"),
        ("vllm", {"gpu_memory_utilization": 0.15}, "gpu_memory_utilization"),  # no room for KV: won't start
        ("vllm", {"enable_chunked_prefill": False, "max_num_batched_tokens": 2048}, "max_num_batched_tokens"),
        ("tgi", {"max_input_tokens": 9000}, "max_input_tokens"),
        ("tgi", {"max_num_seqs": 8}, "max_num_seqs"),
        ("sglang", {"schedule_policy": "lifo"}, "schedule_policy"),
        ("sglang", {"mem_fraction_static": 0.2}, "mem_fraction_static"),
    ],
)
def test_bad_knobs_are_refused_with_their_name(engine: EngineName, knobs: dict[str, Any], knob: str) -> None:
    fleet = SimFleet(engine, 1, seed=1, clock="manual", load="idle")
    with pytest.raises(KnobError) as err:
        fleet.apply_settings(knobs)
    assert err.value.knob == knob
    assert knob in err.value.message
    assert fleet.instance(f"{engine}-0").restarts == 0


def test_load_changes_need_no_restart_and_scenarios_compose() -> None:
    load = apply_load(SCENARIOS["steady"], {"scenario": "overload", "prompt_tokens": 500})
    assert (load.scenario, load.rate, load.prompt_tokens) == ("overload", SCENARIOS["overload"].rate, 500)
    assert apply_load(load, {"rate": 1.0}).scenario == "custom"
    with pytest.raises(KnobError) as err:
        apply_load(load, {"scenario": "nope"})
    assert err.value.knob == "scenario"
    fleet = SimFleet("vllm", 1, seed=1, clock="manual", load="idle")
    fleet.advance(60)
    fleet.set_load({"scenario": "steady"})
    fleet.advance(60)
    assert fleet.instance("vllm-0").restarts == 0
    assert scrape(fleet, "vllm-0")["vllm:request_success_total{finished_reason=stop}"] > 0


# -- determinism and cost -------------------------------------------------------------------------


def test_same_seed_same_output_however_time_is_advanced() -> None:
    one = SimFleet("mixed", 3, seed=7, clock="manual", load="steady", epoch=1.7e9)
    many = SimFleet("mixed", 3, seed=7, clock="manual", load="steady", epoch=1.7e9)
    one.advance(150)
    for _ in range(150):
        many.advance(1.0)
    for instance_id in one.instances:
        assert one.render(instance_id) == many.render(instance_id)
    other = SimFleet("mixed", 3, seed=8, clock="manual", load="steady", epoch=1.7e9)
    other.advance(150)
    assert other.render("vllm-0") != one.render("vllm-0")


def test_one_simulated_hour_at_moderate_load_is_cheap() -> None:
    fleet = SimFleet("vllm", 1, seed=1, clock="manual", load="steady")
    start = time.process_time()
    fleet.advance(3600)
    assert time.process_time() - start < 2.0
    assert scrape(fleet, "vllm-0")["vllm:request_success_total{finished_reason=stop}"] > 5000


def test_twenty_instances_in_real_time_use_well_under_a_tenth_of_a_core() -> None:
    fleet = SimFleet("mixed", 20, seed=1, clock="manual", load="steady")
    fleet.advance(10)
    start = time.process_time()
    for _ in range(20):  # the real-clock server advances every instance about once a second
        fleet.advance(1.0)
    assert (time.process_time() - start) / 20 < 0.05


# -- invariants -----------------------------------------------------------------------------------

loads = st.builds(
    LoadSpec,
    rate=st.floats(0.0, 40.0),
    prompt_tokens=st.floats(1.0, 6000.0),
    output_tokens=st.floats(1.0, 2000.0),
    prefix_share=st.floats(0.0, 1.0),
    prefix_groups=st.integers(1, 64),
    max_tokens=st.integers(1, 4096),
)
KNOBS: dict[EngineName, st.SearchStrategy[dict[str, Any]]] = {
    "vllm": st.fixed_dictionaries(
        {
            "max_num_seqs": st.integers(1, 512),
            "gpu_memory_utilization": st.sampled_from([0.5, 0.9]),
            "enable_prefix_caching": st.booleans(),
            "block_size": st.sampled_from([8, 16, 128]),
            "max_num_batched_tokens": st.sampled_from([512, 8192]),
        }
    ),
    "sglang": st.fixed_dictionaries(
        {
            "schedule_conservativeness": st.floats(0.1, 3.0),
            "schedule_policy": st.sampled_from(["fcfs", "lpm"]),
            "mem_fraction_static": st.sampled_from([0.35, 0.88]),
            "max_running_requests": st.integers(1, 512),
        }
    ),
    "tgi": st.fixed_dictionaries(
        {"max_concurrent_requests": st.integers(1, 256), "max_batch_size": st.integers(1, 256)}
    ),
}


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[EngineName, dict[str, Any], list[tuple[LoadSpec, float]]]:
    engine: EngineName = draw(st.sampled_from(["vllm", "sglang", "tgi"]))
    return (
        engine,
        draw(KNOBS[engine]),
        draw(st.lists(st.tuples(loads, st.floats(0.1, 40.0)), min_size=1, max_size=4)),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_counters_monotonic_usage_bounded_and_requests_conserved(
    case: tuple[EngineName, dict[str, Any], list[tuple[LoadSpec, float]]],
) -> None:
    engine, knobs, phases = case
    hw = Hardware()
    s = apply_knobs(engine, defaults(engine), knobs)
    model = EngineModel(
        build_spec(engine, s, hw), hw, vllm_layout("v1", 8192), np.random.default_rng(0), 0.0, phases[0][0]
    )
    previous = model.counters.as_dict()
    t = 0.0
    for load, seconds in phases:
        model.set_load(load)
        for _ in range(3):
            t += seconds / 3
            model.advance_to(t)
            now = model.counters.as_dict()
            assert all(now[k] >= previous[k] - 1e-6 for k in now), "a counter went down"
            previous = now
            g = model.gauges
            assert 0.0 <= g.kv_usage <= 1.0
            assert g.waiting >= 0 and g.running >= 0
            assert g.running <= model.spec.max_seqs
            c = model.counters
            rejected = c.rejected_overloaded + c.rejected_validation
            assert c.arrived == c.finished + g.running + g.waiting + rejected
            hist_counts = [h.count for h in model.hist.values() if h.count]
            assert all(np.isfinite(hist_counts))
