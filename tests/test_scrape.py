"""The scraper: a slow or dead target never blocks the others; limits hold."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from perfagent.errors import CollectionError, ServiceUnavailableError
from perfagent.scrape import Scraper
from perfagent.targets import TargetPolicy
from tests.conftest import capture, free_port


def _scraper(**overrides: Any) -> Scraper:
    options: dict[str, Any] = {"timeout": 1.0, "max_bytes": 1 << 20, "concurrency": 8, "user_agent": "t"}
    options.update(overrides)
    return Scraper(TargetPolicy.from_entries(["127.0.0.0/8"]), **options)


async def test_slow_and_dead_targets_do_not_delay_the_others(targets: Any) -> None:
    server = await targets()
    good = str(server.make_url(f"/f/{capture('vllm-v1-recent').name}"))
    slow = str(server.make_url("/slow?seconds=30"))
    dead = f"http://127.0.0.1:{free_port()}/metrics"
    scraper = _scraper()
    try:
        started = time.perf_counter()
        tasks = [asyncio.ensure_future(scraper.fetch(u)) for u in (slow, dead, good, slow)]
        done = await tasks[2]
        good_elapsed = time.perf_counter() - started
        results = await asyncio.gather(*tasks, return_exceptions=True)
        total = time.perf_counter() - started
    finally:
        await scraper.close()
    assert done.bytes == capture("vllm-v1-recent").stat().st_size
    assert good_elapsed < 0.9  # answered while the slow targets were still hanging
    assert isinstance(results[0], ServiceUnavailableError) and results[0].details["reason"] == "timeout"
    assert isinstance(results[1], ServiceUnavailableError) and results[1].details["reason"] == "unreachable"
    assert total < 1.9  # the timeouts ran side by side, not one after the other


async def test_concurrency_is_bounded(targets: Any) -> None:
    server = await targets()
    url = str(server.make_url("/slow?seconds=0.3"))
    scraper = _scraper(concurrency=2)
    try:
        started = time.perf_counter()
        await asyncio.gather(*(scraper.fetch(url) for _ in range(4)))
        elapsed = time.perf_counter() - started
    finally:
        await scraper.close()
    assert elapsed >= 0.6  # four 0.3 s fetches, two at a time


async def test_size_cap(targets: Any) -> None:
    server = await targets()
    scraper = _scraper(max_bytes=100_000)
    try:
        with pytest.raises(CollectionError) as info:
            await scraper.fetch(str(server.make_url("/huge")))
        small = await scraper.fetch(str(server.make_url(f"/f/{capture('dcgm-exporter-T4').name}")))
    finally:
        await scraper.close()
    assert info.value.details["reason"] == "too_large"
    assert small.text.startswith("DCGM_FI_DEV_SM_CLOCK")
