"""Discovery from a real Prometheus scraping a simulated fleet: selectors find exactly their targets
with the right engines; the operator's engine wins where it disagrees; the agent lists discovered
instances, never scrapes them, and detects a bottleneck on one from PromQL alone."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient, AiohttpServer

from perfagent.app import create_app
from perfagent.clock import utc_now
from perfagent.context import AGENT
from perfagent.discovery import Discovery, DiscoverySpec, infer_engine, instance_id, names_query
from perfagent.errors import ConfigError, ServiceUnavailableError
from perfagent.models import EngineName, InstanceSource
from perfagent.promclient import PromClient
from perfagent.promql import SeriesSelector
from perfagent.settings import Settings
from perfagent.sim.fleet import SimFleet
from tests.prometheus import running_prometheus
from tests.promfleet import SimTarget, scrape_configs, scraped_after, targets_of

Client = TestClient[web.Request, web.Application]
WAIT = 30.0  # seconds a condition may take: Prometheus scrapes every second, the agent polls twice a second

# --- selectors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "metric", "matchers"),
    [
        ('{job="vllm"}', None, [("job", "=", "vllm")]),
        ("vllm:num_requests_running", "vllm:num_requests_running", []),
        (
            "  tgi_queue_size{ job =~ 'tgi|tgi-canary' , namespace!=\"dev\", } ",
            "tgi_queue_size",
            [("job", "=~", "tgi|tgi-canary"), ("namespace", "!=", "dev")],
        ),
        ('{__name__=~"sglang:.+"}', None, [("__name__", "=~", "sglang:.+")]),
        (r'{pod="a\"b", path=`C:\dir`}', None, [("pod", "=", 'a"b'), ("path", "=", r"C:\dir")]),
        ('{job!=""}', None, [("job", "!=", "")]),
    ],
)
def test_series_selectors_parse(text: str, metric: str | None, matchers: list[tuple[str, str, str]]) -> None:
    parsed = SeriesSelector.parse(text)
    assert parsed.metric == metric
    assert [(m.label, m.op, m.value) for m in parsed.matchers] == matchers
    assert SeriesSelector.parse(parsed.render()) == parsed  # rendering quotes values back correctly


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty selector"),
        ("{}", "empty selector"),
        ('{job="vllm"', "expected ',' or '}'"),
        ("{job=vllm}", "expected a quoted value"),
        ('{job=="vllm"}', "expected a quoted value"),
        ('{job~"vllm"}', "expected =, !=, =~ or !~"),
        ('{job=~".*"}', "does not match the empty string"),
        ('{job=""}', "does not match the empty string"),
        ("rate(x[5m])", "unexpected text"),
        ('{job="vllm"} or up', "unexpected text"),
        ('{job="\\q"}', "unknown escape"),
    ],
)
def test_bad_selectors_are_refused_with_the_reason(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        SeriesSelector.parse(text)


def test_discovery_settings_are_validated(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ConfigError, match=r"discovery\.0\.selector: .*expected ',' or '}'"):
        make_settings(prometheus_url="http://127.0.0.1:9090", discovery=[{"selector": '{job="vllm"'}])
    with pytest.raises(ConfigError, match="discovery needs prometheus_url"):
        make_settings(discovery=[{"selector": '{job="vllm"}'}])
    with pytest.raises(ConfigError, match=r"discovery\.0\.labels: .*'instance'"):
        make_settings(
            prometheus_url="http://127.0.0.1:9090",
            discovery=[{"selector": '{job="vllm"}', "labels": {"instance": "x"}}],
        )
    with pytest.raises(ConfigError, match=r"discovery\.0\.engine"):
        make_settings(
            prometheus_url="http://127.0.0.1:9090", discovery=[{"selector": '{job="vllm"}', "engine": "trt"}]
        )
    settings = make_settings(
        prometheus_url="http://127.0.0.1:9090",
        discovery=[{"selector": '{job="vllm"}', "engine": "vllm", "labels": {"deployment_group": "chat"}}],
    )
    assert settings.discovery == [
        DiscoverySpec(selector='{job="vllm"}', engine=EngineName.VLLM, labels={"deployment_group": "chat"})
    ]


def test_instance_ids_are_stable_and_valid() -> None:
    assert instance_id("vllm", "10.0.3.17:8000") == "vllm-10.0.3.17:8000"
    assert instance_id(None, "pod-a") == "pod-a"
    ugly = instance_id("vllm", "[::1]:8000/x")
    assert ugly == instance_id("vllm", "[::1]:8000/x")
    assert ugly.startswith("vllm-_::1_:8000_x-")  # readable, plus a digest of what was replaced
    assert ugly != instance_id("vllm", "[::1]:8000_x")
    assert len(instance_id("j", "x" * 300)) == 128


def test_engines_are_inferred_from_the_engine_maps_names() -> None:
    assert (
        infer_engine(frozenset({"vllm:num_requests_running", "vllm:gpu_cache_usage_perc"})) == EngineName.VLLM
    )
    assert infer_engine(frozenset({"tgi_queue_size", "tgi_request_duration_bucket"})) == EngineName.TGI
    assert infer_engine(frozenset({"sglang:num_running_reqs"})) == EngineName.SGLANG
    assert infer_engine(frozenset({"node_cpu_seconds_total"})) is None


def test_a_selector_naming_a_metric_keeps_only_its_targets() -> None:
    query = names_query(SeriesSelector.parse('vllm:num_requests_running{namespace="prod"}'))
    assert query.startswith('group by (__name__, job, instance) ({namespace="prod", __name__=~"')
    assert query.endswith(
        'and on (job, instance) group by (job, instance) (vllm:num_requests_running{namespace="prod"})'
    )


# --- discovery against a real Prometheus -----------------------------------------------------------


async def _sim_fleet(aiohttp_server: AiohttpServer, **kwargs: Any) -> tuple[list[SimFleet], list[SimTarget]]:
    """vLLM V1, TGI and SGLang on one sim server, vLLM V0 on another."""
    mixed = SimFleet("mixed", 3, seed=1, clock="manual", **kwargs)
    v0 = SimFleet("vllm", 1, seed=2, clock="manual", vllm_version="v0", **kwargs)
    for fleet in (mixed, v0):
        fleet.advance(120)
    mixed_server = await aiohttp_server(mixed.app())
    v0_server = await aiohttp_server(v0.app())
    return [mixed, v0], targets_of(mixed, mixed_server) + targets_of(v0, v0_server, prefix="v0-")


async def _node_exporter(aiohttp_server: AiohttpServer) -> str:
    """A target with metrics, none of them an engine's: discovery must pass it by."""

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text="node_load1 0.5\nprocess_cpu_seconds_total 12.5\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    server = await aiohttp_server(app)
    return f"  - job_name: node\n    static_configs:\n      - targets: ['{server.host}:{server.port}']\n"


async def test_discovery_finds_exactly_the_selected_targets(
    tmp_path: Path, aiohttp_server: AiohttpServer, caplog: pytest.LogCaptureFixture
) -> None:
    _, targets = await _sim_fleet(aiohttp_server)
    by_instance = {t.instance: t for t in targets}
    node = await _node_exporter(aiohttp_server)
    with running_prometheus(tmp_path, scrape_configs(targets, extra=node)) as url:
        client = PromClient(url, timeout=5, retries=0)
        try:
            await scraped_after(client, utc_now(), len(targets) + 1)
            specs = [
                DiscoverySpec(selector='{job="vllm"}', labels={"deployment_group": "chat"}),
                DiscoverySpec(selector='{job=~".+"}'),
                DiscoverySpec(selector="sglang:num_running_reqs"),
                DiscoverySpec(selector='{job="tgi"}', engine=EngineName.SGLANG),  # the operator's say
                DiscoverySpec(selector='{job="nothing-here"}'),
            ]
            discovery = Discovery(client, specs)
            with caplog.at_level(logging.WARNING, logger="perfagent.discovery"):
                found = [await discovery.refresh(i) for i in range(len(specs))]
                again = [await discovery.refresh(i) for i in range(len(specs))]
        finally:
            client.close()

    vllm, everything, sglang, tgi_as_sglang, nothing = found
    assert {i.id: i.labels["engine_version"] for i in vllm} == {
        "vllm-vllm-0": "vllm-v1",
        "vllm-v0-vllm-0": "vllm-v0",
    }
    for inst in vllm:
        target = by_instance[inst.labels["instance"]]
        assert inst.engine is EngineName.VLLM
        assert inst.source is InstanceSource.DISCOVERED
        assert inst.metrics_url == target.metrics_url  # where Prometheus scrapes it, from /api/v1/targets
        assert inst.labels["job"] == "vllm"
        assert inst.labels["deployment_group"] == "chat"
    assert {(i.id, i.engine) for i in everything} == {
        ("vllm-vllm-0", EngineName.VLLM),
        ("vllm-v0-vllm-0", EngineName.VLLM),
        ("tgi-tgi-1", EngineName.TGI),
        ("sglang-sglang-2", EngineName.SGLANG),
    }
    assert [(i.id, i.engine) for i in sglang] == [("sglang-sglang-2", EngineName.SGLANG)]
    assert nothing == []

    [overridden] = tgi_as_sglang
    assert overridden.engine is EngineName.SGLANG
    assert overridden.labels["engine_inferred"] == "tgi"
    warnings = [r.getMessage() for r in caplog.records if "tgi-tgi-1" in r.getMessage()]
    assert warnings == [
        "discovered tgi-tgi-1: configured engine sglang but its metrics look like tgi; using sglang"
    ]  # once, not at every refresh

    # Refreshing finds the same instances under the same ids, first seen when they were first found.
    assert [[(i.id, i.created_at) for i in f] for f in again] == [
        [(i.id, i.created_at) for i in f] for f in found
    ]
    assert len(discovery.instances()) == 4  # each id once across the entries


async def test_prometheus_down_keeps_the_last_discovered_instances(
    tmp_path: Path, aiohttp_server: AiohttpServer
) -> None:
    _, targets = await _sim_fleet(aiohttp_server)
    tasks: list[asyncio.Task[None]] = []
    clients: list[PromClient] = []
    try:
        with running_prometheus(tmp_path, scrape_configs(targets)) as url:
            client = PromClient(url, timeout=1, retries=0)
            clients.append(client)
            await scraped_after(client, utc_now(), len(targets))
            discovery = Discovery(client, [DiscoverySpec(selector='{job="vllm"}', refresh_interval=0.2)])
            tasks.append(asyncio.create_task(discovery.run()))
            await _until(lambda: len(discovery.instances()) == 2)
        # Prometheus has stopped.
        with pytest.raises(ServiceUnavailableError) as caught:
            await discovery.refresh(0)
        assert caught.value.details["dependency"] == "prometheus"
        await _until(lambda: discovery.last_error is not None)
        assert "unavailable" in (discovery.last_error or "")
        assert len(discovery.instances()) == 2  # the last known fleet stays
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in clients:
            client.close()


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(int(WAIT / 0.1)):
        if condition():
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"condition not met within {WAIT} s")


async def _until_async(condition: Callable[[], Awaitable[bool]]) -> None:
    for _ in range(int(WAIT / 0.2)):
        if await condition():
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"condition not met within {WAIT} s")


# --- the agent with a discovery config -------------------------------------------------------------

OVERLOADED = "vllm-vllm-0"


async def test_agent_lists_discovered_instances_and_detects_from_promql_alone(
    tmp_path: Path,
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: Callable[..., Settings],
) -> None:
    fleets, targets = await _sim_fleet(aiohttp_server)
    mixed = fleets[0]
    mixed.set_load({"scenario": "overload"}, ids=["vllm-0"])
    mixed.advance(300)  # the queue of vllm-0 is long and stays so: the manual clock holds it
    tgi = next(t for t in targets if t.sim_id == "tgi-1")
    with running_prometheus(tmp_path, scrape_configs(targets)) as url:
        settings = make_settings(
            prometheus_url=url,
            prometheus_timeout=5,
            polling_interval=0.5,
            discovery=[
                {"selector": '{job="vllm"}', "labels": {"deployment_group": "chat"}, "refresh_interval": 0.5}
            ],
            # One instance the agent scrapes itself, beside the discovered ones.
            instances=[{"id": "scraped-tgi", "engine": "tgi", "metrics_url": tgi.metrics_url}],
        )
        client: Client = await aiohttp_client(create_app(settings))
        agent = client.app[AGENT]

        async def listed() -> bool:
            response = await client.get("/api/v1/instances")
            return len(await response.json()) == 3

        await _until_async(listed)
        response = await client.get("/api/v1/instances")
        instances = {i["id"]: i for i in await response.json()}
        assert {i: v["source"] for i, v in instances.items()} == {
            "scraped-tgi": "config",
            "vllm-vllm-0": "discovered",
            "vllm-v0-vllm-0": "discovered",
        }
        assert instances[OVERLOADED]["labels"]["deployment_group"] == "chat"
        response = await client.get(f"/api/v1/instances/{OVERLOADED}")
        assert response.status == 200
        assert (await response.json())["engine"] == "vllm"

        # Discovery needs one scrape; a range query, whose ends Prometheus takes in whole seconds, a
        # couple more.
        assert agent.prometheus is not None
        await scraped_after(agent.prometheus, utc_now(), len(targets))
        await asyncio.sleep(1)
        response = await client.post("/api/v1/analysis/detect-bottlenecks", json={"instance_id": OVERLOADED})
        assert response.status == 200, await response.text()
        body = await response.json()
        queue = [b for b in body["bottlenecks"] if b["rule"] == "QueueBuildup"]
        assert queue and queue[0]["type"] == "QUEUE_BUILDUP", body
        assert queue[0]["severity"] == "CRITICAL"
        assert queue[0]["evidence"]["source"] == "prometheus"

        # The poll cycle evaluates the discovered instances too: the finding is pending (its `for`).
        await _until(lambda: OVERLOADED in agent.detector.state["instance_id"].to_list())
        pending = agent.detector.state.filter(agent.detector.state["instance_id"] == OVERLOADED)
        assert "QueueBuildup" in pending["rule"].to_list()
        # ...and never scrapes them: no scrape health, no stored history.
        assert set(agent.poller.health) == {"scraped-tgi"}
        response = await client.get("/api/v1/metrics/history", params={"instance_id": OVERLOADED})
        assert (await response.json())["count"] == 0

        scraped_before = agent.poller.health["scraped-tgi"].scrapes_total
        evaluations_before = agent.detector.evaluations

    # Prometheus is gone: PromQL analysis says so; the scraped instance is still polled and evaluated.
    response = await client.post("/api/v1/analysis/detect-bottlenecks", json={"instance_id": OVERLOADED})
    assert response.status == 503
    error = (await response.json())["error"]
    assert error["code"] == "SERVICE_UNAVAILABLE"
    assert error["details"]["dependency"] == "prometheus"
    assert "Prometheus" in error["message"]
    await _until(
        lambda: (
            agent.poller.health["scraped-tgi"].scrapes_total > scraped_before + 2
            and agent.detector.evaluations > evaluations_before + 2
        )
    )
    response = await client.get("/api/v1/instances")
    assert len(await response.json()) == 3  # the last discovered fleet is still listed
    response = await client.get("/api/v1/health/detailed")
    health = await response.json()
    assert health["dependencies"]["prometheus"] == "unhealthy"
    assert [i["instance_id"] for i in health["instances"]] == ["scraped-tgi"]  # discovered: not fetched
