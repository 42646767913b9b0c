"""The background poller keeps its schedule with dead and slow targets in the fleet, and parses a
cycle's bodies in batches without letting a slow or broken target hold back the others."""

from __future__ import annotations

import asyncio
import itertools
from datetime import datetime
from typing import Any

from perfagent.app import create_app
from perfagent.clock import utc_now
from perfagent.context import AGENT
from perfagent.models import Instance, ScrapeHealth
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


def _instance(instance_id: str, engine: str, metrics_url: str, dcgm_url: str | None = None) -> Instance:
    return Instance.model_validate(
        {
            "id": instance_id,
            "engine": engine,
            "metrics_url": metrics_url,
            "dcgm_url": dcgm_url,
            "source": "api",
            "created_at": utc_now(),
        }
    )


async def test_one_cycle_parses_the_bodies_that_arrived_in_one_batch(
    aiohttp_client: Any, make_settings: Any, targets: Any
) -> None:
    fleet = await targets({"html": b"<html>\n<head><title>502 Bad Gateway</title></head>\n</html>\n"})

    def url(path: str) -> str:
        return str(fleet.make_url(path))

    good = {
        "vllm": _instance("vllm", "vllm", url(f"/f/{capture('vllm-v1-recent').name}")),
        "tgi": _instance("tgi", "tgi", url(f"/f/{capture('tgi-3.x').name}")),
        "sglang": _instance(
            "sglang",
            "sglang",
            url(f"/f/{capture('sglang-0.5.10').name}"),
            dcgm_url=url(f"/f/{capture('dcgm-exporter-L4-').name}"),
        ),
    }
    broken = _instance("broken", "vllm", url("/body/html"))
    slow = _instance("slow", "vllm", url("/slow?seconds=2"))
    dead = _instance("dead", "tgi", f"http://127.0.0.1:{free_port()}/metrics")
    # Nothing is configured, so the background poller scrapes nothing: this test drives the cycles.
    client = await aiohttp_client(create_app(make_settings(polling_interval=3600, scrape_timeout=5.0)))
    agent = client.app[AGENT]
    poller = agent.poller
    poller.batch_window = 0.5

    first = asyncio.create_task(poller.poll_once([*good.values(), broken, slow, dead]))
    fast = [*good, "broken"]
    # The fast bodies are recorded once the window has passed, without waiting for the slow one.
    while "slow" not in poller.health and not first.done():
        if all(poller.health.get(i, ScrapeHealth()).scrapes_total for i in fast):
            break
        await asyncio.sleep(0.01)
    assert "slow" not in poller.health
    assert all(poller.health[i].scrapes_total == 1 for i in fast)
    assert poller.stats.batches == 1
    assert poller.stats.parsed_bodies == 5  # vllm, tgi, sglang and its dcgm body, the HTML page

    # A cycle started meanwhile scrapes everything recorded, and skips only the slow instance,
    # whose scrape is still running.
    await poller.poll_once([*good.values(), broken, slow])
    assert poller.stats.skipped == 1
    assert poller.stats.batches == 2 and poller.stats.parsed_bodies == 10
    await first
    assert poller.stats.batches == 3 and poller.stats.parsed_bodies == 11  # the slow body, alone

    for instance_id in good:
        health = poller.health[instance_id]
        assert health.scrapes_total == 2 and health.errors_total == 0 and health.last_success is not None
    # The malformed body fails its own instance, in the same batch as the good ones.
    assert poller.health["broken"].errors_total == 2
    assert (poller.health["broken"].last_error or "").startswith("COLLECTION_ERROR: no valid sample")
    assert poller.health["slow"].last_success is not None and poller.health["slow"].errors_total == 0
    dead_health = poller.health["dead"]
    assert dead_health.last_error is not None and "not reachable" in dead_health.last_error

    # What the batched cycle recorded is what collecting the same target alone answers.
    for instance in good.values():
        response = await client.get(
            "/api/v1/metrics/history", params={"instance_id": instance.id, "since": "1m"}
        )
        points = (await response.json())["points"]
        assert [p["ok"] for p in points] == [True, True]
        alone = await client.post(
            "/api/v1/metrics/collect",
            json={
                "instance_id": f"{instance.id}-alone",
                "instance_type": instance.engine.value,
                "metrics_url": instance.metrics_url,
                "dcgm_url": instance.dcgm_url,
            },
        )
        assert alone.status == 200
        quantities = (await alone.json())["quantities"]
        assert quantities and points[0]["values"] == points[0]["values"] | quantities
