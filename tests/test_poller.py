"""The background poller keeps its schedule with dead and slow targets in the fleet."""

from __future__ import annotations

import asyncio
import itertools
from datetime import datetime
from typing import Any

from perfagent.app import create_app
from perfagent.context import AGENT
from tests.conftest import capture, free_port


async def test_poller_keeps_its_interval_with_a_dead_and_a_slow_target(
    aiohttp_client: Any, make_settings: Any, targets: Any
) -> None:
    fleet = await targets()
    interval = 0.3
    settings = make_settings(
        polling_interval=interval,
        scrape_timeout=1.0,
        history_flush_interval=0.2,
        instances=[
            {
                "id": "good",
                "engine": "vllm",
                "metrics_url": str(fleet.make_url(f"/f/{capture('vllm-v0-llama3.1').name}")),
            },
            {"id": "slow", "engine": "vllm", "metrics_url": str(fleet.make_url("/slow?seconds=30"))},
            {"id": "dead", "engine": "tgi", "metrics_url": f"http://127.0.0.1:{free_port()}/metrics"},
        ],
    )
    client = await aiohttp_client(create_app(settings))
    await asyncio.sleep(2.5)
    agent = client.app[AGENT]

    response = await client.get("/api/v1/metrics/history", params={"instance_id": "good", "since": "1m"})
    points = (await response.json())["points"]
    times = [datetime.fromisoformat(p["ts"]) for p in points]
    assert len(times) >= 7  # 2.5 s at 0.3 s: 8 or 9 ticks
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    assert all(interval * 0.5 < g < interval * 1.5 for g in gaps), gaps
    assert all(p["ok"] for p in points)
    assert points[-1]["values"]["requests_running"] == 3

    # The slow target is never scraped twice at once, and each of its scrapes times out.
    assert agent.poller.stats.skipped >= 3
    slow = agent.poller.health["slow"]
    assert slow.last_success is None and slow.last_error is not None and "did not answer" in slow.last_error
    dead = agent.poller.health["dead"]
    assert dead.last_error is not None and "not reachable" in dead.last_error
    assert agent.poller.stats.missed_ticks == 0

    listed = {i["id"]: i["scrape"] for i in await (await client.get("/api/v1/instances")).json()}
    assert listed["good"]["last_success"] is not None and listed["good"]["last_error"] is None
    assert listed["dead"]["last_error"].startswith("SERVICE_UNAVAILABLE")
    failures = await (
        await client.get("/api/v1/metrics/history", params={"instance_id": "dead", "since": "1m"})
    ).json()
    assert failures["count"] >= 7 and not any(p["ok"] for p in failures["points"])
