"""The agent's own /metrics: its health per instance, clean for `promtool check metrics`."""

from __future__ import annotations

import asyncio
import subprocess
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from perfagent.app import create_app
from tests.conftest import capture, free_port
from tests.prometheus import promtool_binary


async def test_own_metrics_report_scrape_health(
    aiohttp_client: Any, make_settings: Any, targets: Any
) -> None:
    fleet = await targets()
    settings = make_settings(
        polling_interval=0.2,
        instances=[
            {
                "id": "good",
                "engine": "tgi",
                "metrics_url": str(fleet.make_url(f"/f/{capture('tgi-3.x').name}")),
            },
            {"id": "dead", "engine": "vllm", "metrics_url": f"http://127.0.0.1:{free_port()}/metrics"},
        ],
    )
    client = await aiohttp_client(create_app(settings))
    await asyncio.sleep(0.7)
    response = await client.get("/metrics")
    assert response.status == 200
    text = await response.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    up = {s.labels["instance"]: s.value for s in families["perfagent_instance_up"].samples}
    assert up == {"good": 1.0, "dead": 0.0}
    errors = {
        s.labels["instance"]: s.value
        for s in families["perfagent_scrape_errors"].samples
        if s.name.endswith("_total")
    }
    assert errors["good"] == 0 and errors["dead"] >= 3
    assert families["perfagent_poller_ticks"].samples[0].value >= 3
    result = await asyncio.to_thread(
        subprocess.run,
        [promtool_binary(), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""
