"""Engine maps: the built-in YAML files and the validating loader (perfagent.enginemap)."""

from __future__ import annotations

from pathlib import Path

import pytest

from perfagent.catalog import CATALOG, QUANTITIES, Kind, Unit
from perfagent.enginemap import (
    BUILTIN_ENGINES,
    CounterRatioSource,
    EngineMapError,
    GaugeSource,
    HistogramSource,
    load_engine_map,
    load_engine_map_file,
)

GOOD = """\
engine: {engine}
quantities:
  requests_running:
    sources:
      - {{kind: gauge, metric: "x:running", aggregate: sum}}
"""

# A counter that counts as present when missing would hide every source after it.
SHADOWING = """\
engine: {engine}
quantities:
  prompt_tokens_total:
    sources:
      - {{kind: counter, metric: "x:new", absent_is_zero_when: ["x:running"]}}
      - {{kind: counter, metric: "x:old"}}
"""


def _write(tmp_path: Path, text: str, engine: str = "custom") -> Path:
    path = tmp_path / f"{engine}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _metrics(engine: str, quantity: str) -> list[str]:
    out = []
    for source in load_engine_map(engine).quantities[quantity].sources:
        if isinstance(source, CounterRatioSource):
            out.append(source.numerator.metric)
        elif isinstance(source, GaugeSource | HistogramSource):
            out.append(source.metric)
    return out


@pytest.mark.parametrize("engine", BUILTIN_ENGINES)
def test_builtin_maps_load_and_use_catalog_quantities(engine: str) -> None:
    emap = load_engine_map(engine)
    assert emap.engine == engine
    assert emap.quantities
    assert set(emap.quantities) <= set(CATALOG)
    assert load_engine_map(engine) is emap  # cached per process


def test_every_mappable_engine_quantity_is_mapped_by_some_engine() -> None:
    mapped = {q for e in BUILTIN_ENGINES for q in load_engine_map(e).quantities}
    assert {q.name for q in QUANTITIES if q.mappable} == mapped


def test_catalog_names_units_and_latency_variants() -> None:
    assert CATALOG["kv_cache_usage"].unit is Unit.RATIO
    assert CATALOG["gpu_memory_used_bytes"].unit is Unit.BYTES
    assert CATALOG["generation_tokens_per_second"].unit is Unit.TOKENS_PER_SECOND
    for base in ("ttft_seconds", "itl_seconds", "e2e_latency_seconds", "queue_time_seconds"):
        assert CATALOG[base].kind is Kind.MEAN
        assert [CATALOG[f"{base}_{p}"].quantile for p in ("p50", "p90", "p99")] == [0.5, 0.9, 0.99]
    assert not any(q.unit is Unit.PERCENT for q in QUANTITIES)


def test_new_names_come_before_old_ones() -> None:
    assert _metrics("vllm", "kv_cache_usage") == ["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"]
    assert _metrics("vllm", "itl_seconds") == [
        "vllm:inter_token_latency_seconds",
        "vllm:time_per_output_token_seconds",
    ]
    assert _metrics("vllm", "prefix_cache_hit_rate") == [
        "vllm:prefix_cache_hits_total",
        "vllm:gpu_prefix_cache_hits_total",
        "vllm:gpu_prefix_cache_hit_rate",
    ]
    assert _metrics("sglang", "requests_running") == [
        "sglang:num_running_reqs",
        "sglang:num_requests_running",
    ]
    assert _metrics("sglang", "itl_seconds") == [
        "sglang:inter_token_latency_seconds",
        "sglang:time_per_output_token_seconds",
    ]
    assert _metrics("sglang", "queue_time_seconds") == [
        "sglang:queue_time_seconds",
        "sglang:waiting_request_latency_seconds",
    ]


def test_tgi_has_no_kv_usage_source() -> None:
    assert "kv_cache_usage" not in load_engine_map("tgi").quantities


def test_sglang_percent_era_is_data() -> None:
    emap = load_engine_map("sglang")
    first_gauge = next(
        s for s in emap.quantities["prefix_cache_hit_rate"].sources if isinstance(s, GaugeSource)
    )
    assert first_gauge.eras == ("sglang-0.3",)
    assert first_gauge.scale == 0.01
    assert emap.replica_labels[:2] == ("tp_rank", "pp_rank")


def test_a_good_custom_file_loads(tmp_path: Path) -> None:
    emap = load_engine_map_file(_write(tmp_path, GOOD.format(engine="custom")))
    assert list(emap.quantities) == ["requests_running"]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (GOOD.replace("requests_running", "requests_runing"), "requests_runing"),
        (GOOD.replace("aggregate: sum", "aggregate: total"), "aggregate"),
        (GOOD.replace("aggregate: sum", "agregate: sum"), "agregate"),
        (GOOD.replace("kind: gauge", "kind: gauges"), "kind"),
        (GOOD.replace("requests_running", "request_rate"), "request_rate"),
        (
            GOOD.replace("kind: gauge, metric", "kind: counter, metric").replace(", aggregate: sum", ""),
            "counter",
        ),
        (GOOD.replace("aggregate: sum", "aggregate: sum, eras: [v9]"), "v9"),
        (GOOD.replace("    sources:\n", "    sources: []\n").split("      - ")[0], "sources"),
        (GOOD + "surprise: 1\n", "surprise"),
        (SHADOWING, "absent_is_zero_when"),
    ],
    ids=[
        "unknown-quantity",
        "bad-aggregate",
        "typo-key",
        "bad-kind",
        "derived-quantity",
        "kind-mismatch",
        "unknown-era",
        "no-sources",
        "extra-top-level",
        "zero-rule-shadows-later-source",
    ],
)
def test_bad_file_error_names_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    path = _write(tmp_path, text.format(engine="custom"))
    with pytest.raises(EngineMapError) as info:
        load_engine_map_file(path)
    message = str(info.value)
    assert str(path) in message
    assert key in message


def test_yaml_syntax_error_names_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "engine: [unclosed\n")
    with pytest.raises(EngineMapError, match="not valid YAML") as info:
        load_engine_map_file(path)
    assert str(path) in str(info.value)


def test_engine_must_match_file_name(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD.format(engine="other"), engine="custom")
    with pytest.raises(EngineMapError, match="engine") as info:
        load_engine_map_file(path)
    assert str(path) in str(info.value)


def test_unknown_builtin_engine() -> None:
    with pytest.raises(ValueError, match="unknown engine"):
        load_engine_map("triton")
