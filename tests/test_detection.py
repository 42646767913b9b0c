"""Detection on the simulator: each bottleneck driven on purpose yields its type and severity, idle
and steady load yield nothing, and findings are stored, resolved and restored through DuckDB."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from perfagent.detect import compile_rules
from perfagent.detection import Detector
from perfagent.exposition import parse_exposition
from perfagent.findings import FindingTracker
from perfagent.history import ScrapeRecord, sample_frame, scrape_frame
from perfagent.normalize import RawSnapshot, normalize
from perfagent.rules import load_rules
from perfagent.sim.fleet import SimFleet
from perfagent.store import Store

T0 = datetime(2026, 1, 1, tzinfo=UTC)
STEP = 15  # seconds between scrapes, a common Prometheus interval

ITL_TARGET_RULE = """
groups:
  - name: slo
    rules:
      # Replaces the built-in of the same name: an interactive service's own ITL target.
      - name: HighInterTokenLatency
        type: HIGH_LATENCY
        quantity: itl_seconds_p99
        op: ">"
        over: 5m
        reduce: mean
        thresholds: {MEDIUM: 0.07, HIGH: 0.14}
        for: 2m
        recommendation: Cap the batch or use speculative decoding.
"""


class Pipeline:
    """The poller's path minus HTTP: simulator → parse → normalize → DuckDB → rules → findings."""

    def __init__(self, store: Store, detector: Detector, fleet: SimFleet) -> None:
        self.store, self.detector, self.fleet = store, detector, fleet
        self.previous: dict[str, RawSnapshot] = {}
        self.at = T0

    async def run(self, minutes: float) -> None:
        engines = {i.id: i.engine for i in self.fleet.instances.values()}
        for _ in range(int(minutes * 60 / STEP)):
            self.fleet.advance(STEP)
            self.at += timedelta(seconds=STEP)
            records = []
            for instance_id, engine in engines.items():
                text = self.fleet.render(instance_id)
                assert text is not None
                samples = parse_exposition(text)
                n = normalize(engine, samples, at=self.at, previous=self.previous.get(instance_id))
                self.previous[instance_id] = n.raw
                records.append(
                    ScrapeRecord(
                        instance_id,
                        self.at,
                        "sim",
                        True,
                        0.0,
                        window_kind=n.window.kind,
                        raw=n.raw.model_dump_json(),
                        values=dict(n.values),
                        samples=samples,
                    )
                )
            await self.store.write_history(scrape_frame(records), sample_frame(records))
            await self.detector.run_cycle(self.at, engines)

    def firing(self, instance_id: str) -> dict[str, tuple[str, str]]:
        """rule -> (type, severity) of the findings firing on `instance_id`."""
        state = self.detector.state
        return {
            r["rule"]: (r["type"], r["severity"])
            for r in state.iter_rows(named=True)
            if r["instance_id"] == instance_id and r["state"] == "firing"
        }


def _rule_paths(tmp_path: Path, rules: str | None) -> list[Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    if rules is None:
        return []
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "slo.yaml").write_text(rules)
    return [tmp_path / "rules"]


async def _pipeline(
    tmp_path: Path, engine: str, load: Mapping[str, Any], rules: str | None = None
) -> Pipeline:
    paths = _rule_paths(tmp_path, rules)
    compiled = compile_rules(load_rules(paths))
    store = await Store.open(tmp_path / "d.duckdb")
    fleet = SimFleet(engine, 1, seed=3, clock="manual")  # type: ignore[arg-type]
    fleet.set_load(dict(load))
    return Pipeline(store, Detector(store, compiled, FindingTracker.from_rules(compiled)), fleet)


CASES = [
    # engine, load, rule that must fire, (type, severity)
    ("vllm", {"scenario": "overload"}, "QueueBuildup", ("QUEUE_BUILDUP", "CRITICAL")),
    ("sglang", {"scenario": "overload"}, "QueueBuildup", ("QUEUE_BUILDUP", "CRITICAL")),
    ("vllm", {"scenario": "kv_exhaustion"}, "KVCachePreemption", ("MEMORY_PRESSURE", "CRITICAL")),
    (
        "vllm",
        {"scenario": "long_prompts_no_reuse"},
        "LowPrefixCacheHitRate",
        ("CACHE_INEFFICIENCY", "MEDIUM"),
    ),
    ("vllm", {"scenario": "long_prompts_no_reuse"}, "HighTTFT", ("HIGH_LATENCY", "HIGH")),
    (
        "sglang",
        {"scenario": "long_prompts_no_reuse"},
        "LowPrefixCacheHitRate",
        ("CACHE_INEFFICIENCY", "MEDIUM"),
    ),
    ("tgi", {"scenario": "kv_exhaustion"}, "HighTTFT", ("HIGH_LATENCY", "CRITICAL")),
]


@pytest.mark.parametrize(
    ("engine", "load", "rule", "expected"), CASES, ids=[f"{c[0]}-{c[1]['scenario']}-{c[2]}" for c in CASES]
)
async def test_simulated_bottleneck_is_detected(
    tmp_path: Path, engine: str, load: dict[str, Any], rule: str, expected: tuple[str, str]
) -> None:
    pipe = await _pipeline(tmp_path, engine, load)
    try:
        await pipe.run(minutes=8)
        assert pipe.firing(f"{engine}-0").get(rule) == expected, pipe.firing(f"{engine}-0")
    finally:
        await pipe.store.close()


async def test_slow_decode_against_the_services_own_itl_target(tmp_path: Path) -> None:
    """Slow decode without overload: only the latency target the operator set catches it."""
    pipe = await _pipeline(tmp_path / "slow", "vllm", {"scenario": "slow_decode"}, rules=ITL_TARGET_RULE)
    steady = await _pipeline(tmp_path / "steady", "vllm", {"scenario": "steady"}, rules=ITL_TARGET_RULE)
    try:
        await pipe.run(minutes=8)
        await steady.run(minutes=8)
        firing = pipe.firing("vllm-0")
        assert firing["HighInterTokenLatency"] == ("HIGH_LATENCY", "MEDIUM")
        assert not {"QueueBuildup", "KVCachePreemption"} & set(firing)  # not a capacity problem
        assert "HighInterTokenLatency" not in steady.firing("vllm-0")  # the same target, normal decode
    finally:
        await pipe.store.close()
        await steady.store.close()


@pytest.mark.parametrize("engine", ["vllm", "tgi", "sglang"])
@pytest.mark.parametrize("scenario", ["idle", "steady"])
async def test_idle_and_steady_yield_nothing(tmp_path: Path, engine: str, scenario: str) -> None:
    pipe = await _pipeline(tmp_path, engine, {"scenario": scenario})
    try:
        await pipe.run(minutes=6)
        assert pipe.detector.state.height == 0, pipe.detector.state.to_dicts()
    finally:
        await pipe.store.close()


async def test_findings_are_stored_resolved_and_restored(tmp_path: Path) -> None:
    pipe = await _pipeline(tmp_path, "vllm", {"scenario": "overload"})
    try:
        await pipe.run(minutes=5)
        assert pipe.firing("vllm-0")["QueueBuildup"][0] == "QUEUE_BUILDUP"
        stored = await pipe.store.findings(["rule = ?"], ["QueueBuildup"], 10)
        assert stored.height == 1
        episode = stored.row(0, named=True)
        assert episode["resolved_at"] is None
        assert episode["fired_at"] - episode["first_seen"] >= timedelta(minutes=2)  # the rule's `for`

        # A restart resumes the same state from DuckDB: no finding fires twice.
        restored = Detector(pipe.store, pipe.detector.compiled, pipe.detector.tracker)
        await restored.restore()
        assert restored.state.sort("rule").to_dicts() == pipe.detector.state.sort("rule").to_dicts()

        # The load goes away: the queue drains and the finding resolves after keep_firing_for.
        pipe.fleet.set_load({"scenario": "idle"})
        await pipe.run(minutes=60)
        assert "QueueBuildup" not in pipe.firing("vllm-0")
        stored = await pipe.store.findings(["rule = ?"], ["QueueBuildup"], 10)
        assert stored.height == 1
        episode = stored.row(0, named=True)
        assert episode["resolved_at"] is not None
        assert episode["resolved_at"] - episode["last_seen"] >= timedelta(minutes=1)  # keep_firing_for
        assert episode["max_severity"] == "CRITICAL"
    finally:
        await pipe.store.close()
