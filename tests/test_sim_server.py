"""The simulated fleet's control and metrics API over real HTTP (pytest-aiohttp), and the CLI glue."""

from __future__ import annotations

import argparse
import shlex
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from perfagent.sim import SimFleet, cli
from tests.conftest import AiohttpClient

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def client(aiohttp_client: AiohttpClient) -> Client:
    fleet = SimFleet("mixed", 3, seed=1, clock="manual", load="steady", restart_seconds=20)
    return await aiohttp_client(fleet.app())


async def json_of(resp: Any, status: int) -> Any:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    return await resp.json()


def assert_error(body: dict[str, Any], code: str, mention: str) -> None:
    assert body["error"]["code"] == code
    assert mention in body["error"]["message"]
    assert "timestamp" in body


async def value(client: Client, instance_id: str, sample: str) -> float:
    resp = await client.get(f"/instances/{instance_id}/metrics")
    assert resp.status == 200
    for fam in text_string_to_metric_families(await resp.text()):
        for s in fam.samples:
            if s.name == sample:
                return float(s.value)
    raise AssertionError(f"{sample} not exposed by {instance_id}")


async def test_instances_are_listed_as_simulated_with_their_metrics_urls(client: Client) -> None:
    body = await json_of(await client.get("/instances"), 200)
    assert body["simulated"] is True and body["clock"] == "manual"
    ids = [i["id"] for i in body["instances"]]
    assert ids == ["vllm-0", "tgi-1", "sglang-2"]
    first = body["instances"][0]
    assert first["simulated"] is True
    assert (first["engine"], first["version"]) == ("vllm", "v1")
    assert first["metrics_url"].endswith("/instances/vllm-0/metrics")
    assert first["metrics_url"].startswith("http://127.0.0.1:")
    assert first["settings"]["max_num_seqs"] == 1024 and first["load"]["scenario"] == "steady"
    detail = await json_of(await client.get("/instances/sglang-2"), 200)
    assert detail["capacity"]["kv_cache_tokens"] > 0 and "running" in detail["state_detail"]


async def test_metrics_endpoint_serves_prometheus_text(client: Client) -> None:
    for instance_id in ("vllm-0", "tgi-1", "sglang-2"):
        resp = await client.get(f"/instances/{instance_id}/metrics")
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        names = {f.name for f in text_string_to_metric_families(await resp.text())}
        assert "perfagent_simulator_info" in names


async def test_advance_moves_simulated_time_and_the_counters(client: Client) -> None:
    body = await json_of(await client.post("/instances/vllm-0/advance", json={"seconds": 120}), 200)
    assert body["sim_time"] == 120
    assert await value(client, "vllm-0", "vllm:generation_tokens_total") > 0
    others = await json_of(await client.get("/instances"), 200)
    assert [i["sim_time"] for i in others["instances"]] == [120, 0, 0]
    everyone = await json_of(await client.post("/advance", json={"seconds": 30}), 200)
    assert [i["sim_time"] for i in everyone["instances"]] == [150, 30, 30]


async def test_unknown_instance_is_404(client: Client) -> None:
    for method, path in [
        ("GET", "/instances/nope"),
        ("GET", "/instances/nope/metrics"),
        ("POST", "/instances/nope/load"),
        ("POST", "/instances/nope/settings"),
        ("POST", "/instances/nope/advance"),
    ]:
        resp = await client.request(method, path, json={"seconds": 1})
        assert_error(await json_of(resp, 404), "NOT_FOUND", "nope")
    resp = await client.post("/load", json={"instances": ["vllm-0", "nope"], "rate": 1})
    assert_error(await json_of(resp, 404), "NOT_FOUND", "nope")


@pytest.mark.parametrize(
    ("path", "body", "knob"),
    [
        ("/instances/vllm-0/settings", {"max_num_seqz": 8}, "max_num_seqz"),
        ("/instances/vllm-0/settings", {"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ("/instances/tgi-1/settings", {"max_num_seqs": 8}, "max_num_seqs"),  # a vLLM knob on TGI
        ("/instances/sglang-2/settings", {"schedule_policy": "random"}, "schedule_policy"),
        ("/settings", {"engine": "vllm", "block_size": 12}, "block_size"),
        ("/settings", {"max_num_seqs": 64}, "max_num_seqs"),  # all instances: TGI and SGLang refuse it
        ("/instances/vllm-0/load", {"rate": -1}, "rate"),
        ("/instances/vllm-0/load", {"scenario": "chaos"}, "scenario"),
        ("/load", {"engine": "llama.cpp", "rate": 1}, "engine"),
        ("/instances/vllm-0/advance", {"seconds": "soon"}, "seconds"),
    ],
)
async def test_bad_knobs_and_fields_are_400_naming_them(
    client: Client, path: str, body: dict[str, Any], knob: str
) -> None:
    err = await json_of(await client.post(path, json=body), 400)
    assert_error(err, "VALIDATION_ERROR", knob)
    assert err["error"]["details"]["knob"] == knob
    listed = await json_of(await client.get("/instances"), 200)
    assert all(i["restarts"] == 0 and i["state"] == "serving" for i in listed["instances"])


async def test_malformed_body_is_400(client: Client) -> None:
    resp = await client.post(
        "/instances/vllm-0/settings", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert_error(await json_of(resp, 400), "VALIDATION_ERROR", "JSON")
    resp = await client.post("/instances/vllm-0/load", json=[1, 2])
    assert_error(await json_of(resp, 400), "VALIDATION_ERROR", "object")


async def test_settings_restart_the_instance_and_reset_its_counters(client: Client) -> None:
    await client.post("/advance", json={"seconds": 120})
    before = await value(client, "vllm-0", "vllm:request_success_total")
    start = await value(client, "vllm-0", "process_start_time_seconds")
    body = await json_of(await client.post("/instances/vllm-0/settings", json={"max_num_seqs": 256}), 200)
    assert body["restarted"] is True and body["instance"]["state"] == "restarting"
    assert body["instance"]["settings"]["max_num_seqs"] == 256
    resp = await client.get("/instances/vllm-0/metrics")
    assert resp.status == 503
    await client.post("/instances/vllm-0/advance", json={"seconds": 25})
    assert await value(client, "vllm-0", "process_start_time_seconds") == start + 120
    assert await value(client, "vllm-0", "vllm:request_success_total") < before
    # Group settings by engine restart only that engine's instances.
    body = await json_of(
        await client.post("/settings", json={"engine": "sglang", "mem_fraction_static": 0.8}), 200
    )
    assert [(i["instance"]["id"], i["restarted"]) for i in body["instances"]] == [("sglang-2", True)]


async def test_load_changes_apply_without_restart(client: Client) -> None:
    body = await json_of(await client.post("/instances/tgi-1/load", json={"scenario": "overload"}), 200)
    assert body["load"]["scenario"] == "overload" and body["load"]["rate"] == 30.0
    await client.post("/instances/tgi-1/advance", json={"seconds": 60})
    assert await value(client, "tgi-1", "tgi_request_failure_total") > 0  # over max_concurrent_requests
    group = await json_of(await client.post("/load", json={"engine": "vllm", "rate": 0.5}), 200)
    assert [(i["id"], i["load"]["rate"], i["restarts"]) for i in group["instances"]] == [("vllm-0", 0.5, 0)]


async def test_advance_is_refused_on_the_real_clock(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(SimFleet("vllm", 1, seed=1, clock="real", load="idle").app())
    assert_error(
        await json_of(await client.post("/advance", json={"seconds": 5}), 409), "CONFLICT", "real clock"
    )
    resp = await client.get("/instances/vllm-0/metrics")
    assert resp.status == 200


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="perfagent")
    commands = parser.add_subparsers(dest="command", required=True)
    cli.add_parser(commands)
    return parser.parse_args(argv)


def test_cli_flags_build_the_fleet() -> None:
    args = parse(
        shlex.split(
            "sim --engine mixed --instances 4 --clock manual --seed 5 --scenario overload --rate 2.5 "
            "--prefix-share 0.4 --set sglang:schedule_policy=lpm --set vllm:max_num_seqs=64 "
            "--vllm-version v0 --model m/x"
        )
    )
    assert (args.command, args.port) == ("sim", 8100)
    fleet = cli.fleet_from_args(args)
    assert list(fleet.instances) == ["vllm-0", "tgi-1", "sglang-2", "vllm-3"]
    vllm, sglang = fleet.instance("vllm-3"), fleet.instance("sglang-2")
    assert (vllm.version, vllm.model_name, vllm.settings.model_dump()["max_num_seqs"]) == ("v0", "m/x", 64)
    assert sglang.settings.model_dump()["schedule_policy"] == "lpm"
    assert (vllm.load.scenario, vllm.load.rate, vllm.load.prefix_share) == ("overload", 2.5, 0.4)


def test_cli_refuses_bad_knobs(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(parse(["sim", "--set", "max_num_seqs=0"])) == 2
    assert "max_num_seqs" in capsys.readouterr().err
