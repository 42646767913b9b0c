"""Demo fleets: with no instance configured, the agent serves a fleet on its own port so every endpoint
answers with live data on a fresh machine: the simulated fleet (default) or the bundled real captures."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from perfagent.clock import utc_now
from perfagent.models import EngineName, Instance, InstanceSource
from perfagent.sim.fleet import SimFleet

SIM_PREFIX = "/sim"
# The default demo's load per instance, round-robin: most instances healthy, a few in trouble on
# purpose, so a newcomer sees findings within a minute.
SIM_SCENARIOS = ("steady", "steady", "steady", "overload", "steady", "long_prompts_no_reuse")

DEMO_PATH = "/demo/{name}/metrics"


@dataclass(frozen=True, slots=True)
class DemoMember:
    name: str
    engine: EngineName
    capture: str  # file name prefix in the demo directory
    dcgm_capture: str | None = None


MEMBERS = (
    DemoMember("demo-vllm-v1", EngineName.VLLM, "vllm-v1-recent", "dcgm-exporter-L4-"),
    DemoMember("demo-vllm-v0", EngineName.VLLM, "vllm-v0-llama3.1-8b-fp8", "dcgm-exporter-T4"),
    DemoMember("demo-vllm-v0-opt125m", EngineName.VLLM, "vllm-v0-0.5.x-opt125m"),
    DemoMember("demo-tgi", EngineName.TGI, "tgi-3.x", "dcgm-exporter-L40S"),
    DemoMember("demo-sglang", EngineName.SGLANG, "sglang-0.5.10", "dcgm-exporter-GRID-A100"),
    DemoMember("demo-sglang-v0.3", EngineName.SGLANG, "sglang-0.3.x"),
)


def default_demo_dir() -> Path:
    """The checkout's tests/fixtures: `make run` works from a clone without copying captures."""
    return Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def _find(directory: Path, prefix: str) -> Path | None:
    matches = sorted(directory.glob(f"{prefix}*.prom"))
    return matches[0] if matches else None


@dataclass(frozen=True, slots=True)
class DemoFleet:
    files: dict[str, Path]  # served name -> capture file
    instances: tuple[Instance, ...]

    @classmethod
    def build(cls, directory: Path, base_url: str) -> DemoFleet:
        files: dict[str, Path] = {}
        instances: list[Instance] = []
        now = utc_now()
        for member in MEMBERS:
            capture = _find(directory, member.capture)
            if capture is None:
                continue
            files[member.name] = capture
            dcgm_url = None
            if member.dcgm_capture and (dcgm := _find(directory, member.dcgm_capture)) is not None:
                files[f"{member.name}-dcgm"] = dcgm
                dcgm_url = base_url + DEMO_PATH.format(name=f"{member.name}-dcgm")
            instances.append(
                Instance(
                    id=member.name,
                    engine=member.engine,
                    metrics_url=base_url + DEMO_PATH.format(name=member.name),
                    dcgm_url=dcgm_url,
                    labels={"capture": capture.name, "deployment_group": f"demo-{member.engine.value}"},
                    source=InstanceSource.DEMO,
                    created_at=now,
                )
            )
        return cls(files=files, instances=tuple(instances))

    def setup_routes(self, app: web.Application) -> None:
        async def serve(request: web.Request) -> web.StreamResponse:
            path = self.files.get(request.match_info["name"])
            if path is None:
                raise web.HTTPNotFound()
            return web.Response(
                body=path.read_bytes(),
                content_type="text/plain",
                charset="utf-8",
                headers={"X-Perfagent-Demo": "real capture, replayed"},
            )

        app.router.add_get(DEMO_PATH, serve, name="demo-metrics")


@dataclass(frozen=True, slots=True)
class SimDemo:
    """A mixed simulated fleet on the agent's own port, under /sim (its control API included)."""

    fleet: SimFleet
    instances: tuple[Instance, ...]

    @classmethod
    def build(cls, size: int, base_url: str, *, seed: int = 0) -> SimDemo:
        fleet = SimFleet("mixed", size, seed=seed, clock="real")
        for i, instance_id in enumerate(fleet.instances):
            fleet.set_load({"scenario": SIM_SCENARIOS[i % len(SIM_SCENARIOS)]}, ids=[instance_id])
        now = utc_now()
        instances = tuple(
            Instance(
                id=sim.id,
                engine=EngineName(sim.engine),
                metrics_url=f"{base_url}{SIM_PREFIX}/instances/{sim.id}/metrics",
                labels={"simulated": "true", "deployment_group": f"sim-{sim.engine}"},
                source=InstanceSource.SIMULATOR,
                created_at=now,
            )
            for sim in fleet.instances.values()
        )
        return cls(fleet=fleet, instances=instances)

    def setup_routes(self, app: web.Application) -> None:
        app.add_subapp(SIM_PREFIX, self.fleet.app())
