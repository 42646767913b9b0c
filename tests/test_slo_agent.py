"""SLOs in the running agent: a burning budget becomes a finding in GET /analysis/findings and in the
agent's /metrics, with the budget and burn-rate gauges, and the exposition stays clean for promtool."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from perfagent.app import create_app
from perfagent.clock import utc_now
from perfagent.context import AGENT
from perfagent.errors import ConfigError
from perfagent.history import ScrapeRecord
from perfagent.models import EngineName, InstanceSource, InstanceSpec
from perfagent.normalize import HistogramSnapshot, RawSnapshot
from perfagent.settings import Settings
from tests.conftest import free_port
from tests.prometheus import promtool_binary

TTFT = "vllm:time_to_first_token_seconds"


def _record(instance: str, minutes_ago: float, good: float, bad: float) -> ScrapeRecord:
    at = utc_now() - timedelta(minutes=minutes_ago)
    total = good + bad
    snapshot = HistogramSnapshot(
        sum=0.3 * good + 4 * bad,
        count=total,
        bounds=(0.5, 2.5, 5.0),
        counts=(good, good, total),
        inf_count=total,
    )
    raw = RawSnapshot(engine="vllm", at=at, histograms={TTFT: snapshot})
    return ScrapeRecord(instance, at, "http://x/metrics", True, 0.01, raw=raw.model_dump_json())


async def test_a_burning_budget_is_a_finding_and_a_gauge(
    aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    client = await aiohttp_client(create_app(make_settings(polling_interval=3600)))
    agent = client.app[AGENT]
    spec = InstanceSpec(
        id="hot", engine=EngineName.VLLM, metrics_url=f"http://127.0.0.1:{free_port()}/metrics"
    )
    await agent.store.insert_instance(spec, InstanceSource.API, utc_now())
    # 20 minutes of scrapes in which 90% of requests took over 2.5 s: burn rate 0.9 / 0.05 = 18 in every
    # window, over the 14.4 of the CRITICAL pair (1h and 5m).
    for k in range(40):
        agent.history.add(_record("hot", 20 - k / 2, good=1000 + 10 * k, bad=90 * k))
    await agent.detect_cycle()

    body = await (await client.get("/api/v1/analysis/findings", params={"instance_id": "hot"})).json()
    (finding,) = body["findings"]
    assert finding["rule"] == "slo:vllm-ttft" and finding["type"] == "HIGH_LATENCY"
    assert finding["severity"] == "CRITICAL" and finding["active"] is True
    assert finding["value"] == pytest.approx(18.0) and finding["threshold"] == 14.4
    assert "1h" in finding["summary"] and "5m" in finding["summary"]

    text = await (await client.get("/metrics")).text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    active = {
        (s.labels["rule"], s.labels["severity"]) for s in families["perfagent_bottleneck_active"].samples
    }
    assert ("slo:vllm-ttft", "CRITICAL") in active
    budget = {
        (s.labels["slo"], s.labels["instance"]): s.value
        for s in families["perfagent_slo_error_budget_remaining"].samples
    }
    assert budget == {("vllm-ttft", "hot"): pytest.approx(1 - 18.0)}  # overspent 17 times over
    burn = {
        s.labels["window"]: s.value
        for s in families["perfagent_slo_burn_rate"].samples
        if s.labels["instance"] == "hot"
    }
    assert burn.keys() == {"5m", "30m", "1h", "2h", "6h", "1d", "3d", "30d"}
    assert all(v == pytest.approx(18.0) for v in burn.values())
    objectives = {s.labels["slo"]: s.value for s in families["perfagent_slo_objective"].samples}
    assert objectives["vllm-ttft"] == 0.95 and objectives["itl"] == 0.99
    checked = await asyncio.to_thread(
        subprocess.run,
        [promtool_binary(), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), checked


def test_a_bad_slo_file_stops_start_up(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    slos = tmp_path / "rules" / "slos"
    slos.mkdir(parents=True)
    (slos / "mine.yaml").write_text(
        "slos:\n  - name: mine\n    engines: [vllm]\n    histogram: ttft_seconds\n    threshold: 2\n"
        "    objective: 0.95\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match=r"mine\.yaml:5: slo 'mine': threshold: 2 s is not a bucket edge"):
        create_app(make_settings(rules_dir=tmp_path / "rules"))
