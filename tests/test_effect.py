"""Confirming a change from the engine's own info metrics: real captures served on loopback, and the
simulator before and after a restart."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from perfagent.effect import EffectStatus, confirm_effect
from perfagent.executors.base import Action, StepOutcome
from perfagent.executors.config import SimConfig
from perfagent.executors.sim import SimExecutor
from perfagent.models import EngineName, Instance, InstanceSource
from perfagent.scrape import Scraper
from perfagent.sim.fleet import SimFleet
from perfagent.targets import TargetPolicy
from tests.conftest import AiohttpServer, capture

LOOPBACK = TargetPolicy.from_entries(["127.0.0.0/8"])
Targets = Callable[..., Awaitable[TestServer]]


@pytest.fixture
async def scraper() -> AsyncIterator[Scraper]:
    s = Scraper(LOOPBACK, timeout=2.0, max_bytes=16 * 1024 * 1024, concurrency=4, user_agent="test")
    yield s
    await s.close()


def _instance(url: str, engine: EngineName = EngineName.VLLM) -> Instance:
    return Instance(
        id="canary",
        engine=engine,
        metrics_url=url,
        source=InstanceSource.CONFIG,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


def _statuses(report: Any) -> dict[str, tuple[EffectStatus, Any]]:
    return {c.setting: (c.status, c.observed) for c in report.checks}


async def test_vllm_v1_capture_confirms_cache_config(targets: Targets, scraper: Scraper) -> None:
    server = await targets()
    url = str(server.make_url("/f/" + capture("vllm-v1-recent").name))
    expected = {
        "gpu_memory_utilization": 0.9,
        "enable_prefix_caching": True,
        "kv_cache_dtype": "auto",
        "block_size": 16,
        "swap_space": 4,
        "max_num_seqs": 256,
    }
    report = await confirm_effect(_instance(url), expected, scraper)
    statuses = _statuses(report)
    assert statuses["gpu_memory_utilization"][0] is EffectStatus.CONFIRMED
    assert statuses["enable_prefix_caching"][0] is EffectStatus.CONFIRMED
    assert statuses["kv_cache_dtype"][0] is EffectStatus.CONFIRMED
    assert statuses["block_size"][0] is EffectStatus.CONFIRMED
    assert statuses["swap_space"][0] is EffectStatus.CONFIRMED  # swap_space="4.0" (GiB) in V1
    assert statuses["max_num_seqs"][0] is EffectStatus.UNVERIFIABLE  # vLLM exports no such label
    assert report.unverifiable == ["max_num_seqs"]
    assert report.status is EffectStatus.CONFIRMED
    source = next(c.source for c in report.checks if c.setting == "kv_cache_dtype")
    assert source == "vllm:cache_config_info{cache_dtype}"


async def test_vllm_v0_capture_reports_mismatches(targets: Targets, scraper: Scraper) -> None:
    server = await targets()
    # The 0.5.x capture: prefix caching off, swap space in bytes.
    url = str(server.make_url("/f/" + capture("vllm-v0-0.5").name))
    expected = {
        "enable_prefix_caching": True,
        "gpu_memory_utilization": 0.95,
        "swap_space": 4,
        "kv_cache_dtype": "fp8",
    }
    report = await confirm_effect(_instance(url), expected, scraper)
    statuses = _statuses(report)
    assert statuses["enable_prefix_caching"] == (EffectStatus.MISMATCH, "False")
    assert statuses["gpu_memory_utilization"] == (EffectStatus.MISMATCH, "0.9")
    assert statuses["kv_cache_dtype"] == (EffectStatus.MISMATCH, "auto")
    assert statuses["swap_space"][0] is EffectStatus.CONFIRMED  # swap_space_bytes = 4 GiB
    assert report.status is EffectStatus.MISMATCH
    assert "the engine reports cache_dtype=auto" in {c.reason for c in report.checks}


@pytest.mark.parametrize(
    ("prefix", "engine"), [("tgi-3.x", EngineName.TGI), ("sglang-0.5", EngineName.SGLANG)]
)
async def test_engines_without_settings_metrics_are_unverifiable(
    targets: Targets, scraper: Scraper, prefix: str, engine: EngineName
) -> None:
    server = await targets()
    url = str(server.make_url("/f/" + capture(prefix).name))
    report = await confirm_effect(_instance(url, engine), {"max_batch_size": 32}, scraper)
    assert _statuses(report) == {"max_batch_size": (EffectStatus.UNVERIFIABLE, None)}
    assert report.status is EffectStatus.UNVERIFIABLE
    assert "not reported" in report.checks[0].reason


async def test_unreadable_metrics_are_unreachable(targets: Targets, scraper: Scraper) -> None:
    server = await targets()
    report = await confirm_effect(_instance(str(server.make_url("/status/503"))), {"block_size": 32}, scraper)
    assert report.status is EffectStatus.UNREACHABLE
    assert "metrics not readable" in report.checks[0].reason


async def test_a_simulated_change_is_unreachable_while_restarting_then_confirmed(
    aiohttp_server: AiohttpServer, scraper: Scraper
) -> None:
    fleet = SimFleet("mixed", 2, seed=2, clock="manual", restart_seconds=30)
    server = await aiohttp_server(fleet.app())
    vllm = _instance(str(server.make_url("/instances/vllm-0/metrics")))
    tgi = _instance(str(server.make_url("/instances/tgi-1/metrics")), EngineName.TGI)
    changes = {"max_num_seqs": 64, "gpu_memory_utilization": 0.85}
    executor = SimExecutor(LOOPBACK, SimConfig())
    try:
        assert (await executor.apply(Action("k", vllm, changes))).outcome is StepOutcome.APPLIED
        assert (
            await executor.apply(Action("k2", tgi, {"max_batch_size": 16}))
        ).outcome is StepOutcome.APPLIED
    finally:
        await executor.close()
    restarting = await confirm_effect(vllm, changes, scraper)
    assert restarting.status is EffectStatus.UNREACHABLE  # /metrics answers 503 until it is back

    fleet.advance(31)
    report = await confirm_effect(vllm, {**changes, "block_size": 32}, scraper)
    checks = {c.setting: c for c in report.checks}
    assert checks["gpu_memory_utilization"].status is EffectStatus.CONFIRMED
    assert checks["gpu_memory_utilization"].source == "vllm:cache_config_info{gpu_memory_utilization}"
    assert checks["max_num_seqs"].status is EffectStatus.CONFIRMED
    assert checks["max_num_seqs"].source == "simulator"  # not in cache_config_info: the simulator says
    assert checks["block_size"].status is EffectStatus.MISMATCH and checks["block_size"].observed == "16"

    tgi_report = await confirm_effect(tgi, {"max_batch_size": 16, "max_concurrent_requests": 5}, scraper)
    assert _statuses(tgi_report) == {
        "max_batch_size": (EffectStatus.CONFIRMED, 16),
        "max_concurrent_requests": (EffectStatus.MISMATCH, 128),
    }
