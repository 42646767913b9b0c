"""The sim executor against real simulators: `perfagent sim`'s app, and the demo fleet under the agent's
own /sim."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from perfagent.app import create_app
from perfagent.executors.base import Action, Executor, StepOutcome, rerun_safe
from perfagent.executors.config import SimConfig
from perfagent.executors.sim import SimExecutor, sim_endpoint
from perfagent.models import EngineName, Instance, InstanceSource
from perfagent.sim.fleet import SimFleet
from perfagent.targets import TargetPolicy
from tests.conftest import AiohttpClient, AiohttpServer, free_port

LOOPBACK = TargetPolicy.from_entries(["127.0.0.0/8"])


def _instance(
    metrics_url: str, engine: EngineName = EngineName.VLLM, instance_id: str = "canary"
) -> Instance:
    return Instance(
        id=instance_id,
        engine=engine,
        metrics_url=metrics_url,
        source=InstanceSource.CONFIG,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


async def _sim(aiohttp_server: AiohttpServer, engine: str = "vllm") -> tuple[SimFleet, TestServer]:
    fleet = SimFleet(engine, 2, seed=1, clock="manual")  # type: ignore[arg-type]
    return fleet, await aiohttp_server(fleet.app())


def test_the_endpoint_is_read_from_the_metrics_url() -> None:
    endpoint = sim_endpoint("http://127.0.0.1:8002/sim/instances/vllm-0/metrics")
    assert endpoint is not None
    assert endpoint.base == "http://127.0.0.1:8002/sim"
    assert endpoint.settings_url == "http://127.0.0.1:8002/sim/instances/vllm-0/settings"
    assert sim_endpoint("http://127.0.0.1:8000/metrics") is None


async def test_sets_knobs_then_recognises_them(aiohttp_server: AiohttpServer) -> None:
    fleet, server = await _sim(aiohttp_server)
    # The agent's id differs from the simulator's: the URL names the simulated instance.
    action = Action(
        key="wf/canary/0/canary",
        instance=_instance(str(server.make_url("/instances/vllm-1/metrics"))),
        settings={"max_num_seqs": 64, "enable_prefix_caching": False},
        previous={"max_num_seqs": 1024, "enable_prefix_caching": True},
    )
    executor = SimExecutor(LOOPBACK, SimConfig())
    try:
        first = await executor.apply(action)
        again = await executor.apply(action)  # a re-run after a crash: nothing is sent, no restart
    finally:
        await executor.close()
    assert first.outcome is StepOutcome.APPLIED, first.message
    assert first.returned["restarted"] is True and first.returned["already_applied"] is False
    assert first.ran["post"] == str(server.make_url("/instances/vllm-1/settings"))
    assert first.ran["body"] == {"max_num_seqs": 64, "enable_prefix_caching": False}
    assert again.outcome is StepOutcome.APPLIED
    assert again.returned["already_applied"] is True and "post" not in again.ran
    assert again.message == "already in effect; nothing sent"
    sim = fleet.instance("vllm-1")
    assert sim.restarts == 1
    assert (
        sim.settings.model_dump() | {"max_num_seqs": 64, "enable_prefix_caching": False}
        == sim.settings.model_dump()
    )
    assert fleet.instance("vllm-0").restarts == 0
    assert rerun_safe(executor)
    protocol: Executor = executor  # mypy checks it implements the protocol
    assert protocol.name == "sim"


async def test_a_refused_knob_fails_naming_it(aiohttp_server: AiohttpServer) -> None:
    fleet, server = await _sim(aiohttp_server, "tgi")
    executor = SimExecutor(LOOPBACK, SimConfig())
    try:
        url = str(server.make_url("/instances/tgi-0/metrics"))
        bad = await executor.apply(Action("k1", _instance(url, EngineName.TGI), {"max_num_seqs": 8}))
        assert bad.outcome is StepOutcome.FAILED
        assert bad.returned["status"] == 400
        assert "unknown tgi knob 'max_num_seqs'" in bad.message
        gone = str(server.make_url("/instances/tgi-9/metrics"))
        missing = await executor.apply(Action("k2", _instance(gone, EngineName.TGI), {"max_batch_size": 8}))
        assert missing.outcome is StepOutcome.FAILED and "HTTP 404" in missing.message
    finally:
        await executor.close()
    assert fleet.instance("tgi-0").restarts == 0


async def test_non_simulated_and_disallowed_instances_fail(aiohttp_server: AiohttpServer) -> None:
    _, server = await _sim(aiohttp_server)
    executor = SimExecutor(TargetPolicy.from_entries(["10.0.0.0/8"]), SimConfig())
    try:
        plain = await executor.apply(
            Action("k", _instance("http://10.0.0.5:8000/metrics"), {"max_num_seqs": 8})
        )
        assert plain.outcome is StepOutcome.FAILED and "not a simulated instance" in plain.message
        url = str(server.make_url("/instances/vllm-0/metrics"))
        refused = await executor.apply(Action("k", _instance(url), {"max_num_seqs": 8}))
        assert refused.outcome is StepOutcome.FAILED and "allowed_targets" in refused.message
    finally:
        await executor.close()


async def test_the_demo_fleet_under_the_agents_own_sim(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: Any
) -> None:
    port = free_port()
    settings = make_settings(demo_fleet="sim", demo_fleet_size=3, port=port, polling_interval=3600)
    server = await aiohttp_server(create_app(settings), port=port)
    client: TestClient[Any, Any] = await aiohttp_client(server)
    listed = await (await client.get("/api/v1/instances")).json()
    vllm = next(i for i in listed if i["engine"] == "vllm")
    assert "/sim/instances/" in vllm["metrics_url"]
    executor = SimExecutor.from_settings(settings)
    try:
        record = await executor.apply(
            Action(
                "demo/canary/0/" + vllm["id"],
                _instance(vllm["metrics_url"], instance_id=vllm["id"]),
                {"max_num_seqs": 32},
            )
        )
    finally:
        await executor.close()
    assert record.outcome is StepOutcome.APPLIED, record.message
    view = await (await client.get(f"/sim/instances/{vllm['id']}")).json()
    assert view["settings"]["max_num_seqs"] == 32
    assert view["state"] == "restarting"
