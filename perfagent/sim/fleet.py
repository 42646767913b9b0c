"""A fleet of simulated instances and its clock; the Python API tests and backtests use in-process.

    fleet = SimFleet(engine="mixed", instances=3, seed=1, clock="manual")
    fleet.set_load({"scenario": "overload"}, ids=["vllm-0"])
    fleet.advance(600)                       # ten simulated minutes, in well under a second
    text = fleet.render("vllm-0")            # Prometheus text of that instance
    app = fleet.app()                        # the aiohttp control/metrics application

Clock ``manual``: simulated time moves only on `advance`. Clock ``real``: simulated time is wall time
since the fleet was created (times `speed`); reads bring instances up to date, and the server also
advances them in the background.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from perfagent.sim.instance import SimInstance
from perfagent.sim.knobs import (
    ENGINES,
    SCENARIOS,
    EngineName,
    KnobError,
    LoadSpec,
    Settings,
    VllmVersion,
    apply_knobs,
    apply_load,
    defaults,
)
from perfagent.sim.spec import Hardware

if TYPE_CHECKING:
    from aiohttp import web

FleetEngine = Literal["vllm", "tgi", "sglang", "mixed"]
Clock = Literal["real", "manual"]
DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


class ClockError(RuntimeError):
    """`advance` was called on a real-clock fleet."""


class UnknownInstanceError(KeyError):
    def __init__(self, instance_id: str) -> None:
        super().__init__(instance_id)
        self.instance_id = instance_id


def _engines(engine: FleetEngine, n: int) -> list[EngineName]:
    if engine == "mixed":
        return [ENGINES[i % len(ENGINES)] for i in range(n)]  # vllm, tgi, sglang, vllm, ...
    return [engine] * n


def resolve_load(load: LoadSpec | str | Mapping[str, Any] | None) -> LoadSpec:
    """A load spec from a scenario name, a dict of fields (on top of ``steady``), or None (``steady``)."""
    if load is None:
        return SCENARIOS["steady"]
    if isinstance(load, LoadSpec):
        return load
    if isinstance(load, str):
        return apply_load(SCENARIOS["steady"], {"scenario": load})
    return apply_load(SCENARIOS["steady"], load)


class SimFleet:
    """N simulated instances of vLLM, TGI and/or SGLang."""

    def __init__(
        self,
        engine: FleetEngine = "vllm",
        instances: int = 1,
        *,
        seed: int = 0,
        clock: Clock = "real",
        vllm_version: VllmVersion = "v1",
        model: str = DEFAULT_MODEL,
        load: LoadSpec | str | Mapping[str, Any] | None = None,
        settings: Mapping[str, Mapping[str, Any]] | None = None,
        restart_seconds: float = 30.0,
        tick: float = 0.25,
        speed: float = 1.0,
        hardware: Hardware | None = None,
        epoch: float | None = None,
    ) -> None:
        """`settings` maps an engine name to its initial knobs (in force from the start, no restart)."""
        if instances < 1:
            raise ValueError("a fleet needs at least one instance")
        if clock not in ("real", "manual"):
            raise ValueError(f"clock must be 'real' or 'manual', not {clock!r}")
        self.clock: Clock = clock
        self.speed = speed
        self.seed = seed
        self.epoch = time.time() if epoch is None else epoch
        self._mono0 = time.monotonic()
        base_load = resolve_load(load)
        initial = dict(settings or {})
        unknown = set(initial) - set(ENGINES)
        if unknown:
            raise KnobError(sorted(unknown)[0], f"settings are keyed by engine ({', '.join(ENGINES)})")
        streams = np.random.SeedSequence(seed).spawn(instances)
        self.instances: dict[str, SimInstance] = {}
        for i, (eng, stream) in enumerate(zip(_engines(engine, instances), streams, strict=True)):
            start: Settings = apply_knobs(eng, defaults(eng, vllm_version), initial.get(eng, {}))
            inst = SimInstance(
                f"{eng}-{i}",
                eng,
                settings=start,
                load=base_load,
                rng=np.random.default_rng(stream),
                epoch=self.epoch,
                vllm_version=vllm_version,
                model_name=model,
                hardware=hardware,
                restart_seconds=restart_seconds,
                tick=tick,
            )
            self.instances[inst.id] = inst

    # -- clock --------------------------------------------------------------------------------------

    def wall_now(self) -> float:
        """Simulated time the real clock has reached (seconds since the fleet was created)."""
        return (time.monotonic() - self._mono0) * self.speed

    def sync(self) -> None:
        """Real clock: bring every instance up to now. Manual clock: nothing moves."""
        if self.clock == "real":
            t = self.wall_now()
            for inst in self.instances.values():
                inst.advance_to(t)

    def advance(self, seconds: float, ids: Iterable[str] | None = None) -> None:
        """Manual clock: move simulated time forward for the selected (default: all) instances."""
        if self.clock != "manual":
            raise ClockError("the fleet runs on the real clock; start it with clock='manual' to advance it")
        if not seconds >= 0:
            raise ValueError("seconds must be >= 0")
        for inst in self.select(ids=ids):
            inst.advance_to(inst.now + seconds)

    # -- selection and control ----------------------------------------------------------------------

    def instance(self, instance_id: str) -> SimInstance:
        try:
            return self.instances[instance_id]
        except KeyError:
            raise UnknownInstanceError(instance_id) from None

    def select(self, *, engine: str | None = None, ids: Iterable[str] | None = None) -> list[SimInstance]:
        chosen = [self.instance(i) for i in ids] if ids is not None else list(self.instances.values())
        if engine is not None:
            if engine not in ENGINES:
                raise KnobError("engine", f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
            chosen = [inst for inst in chosen if inst.engine == engine]
        return chosen

    def set_load(
        self, changes: Mapping[str, Any], *, engine: str | None = None, ids: Iterable[str] | None = None
    ) -> list[SimInstance]:
        """Change the offered load of the selected instances (validated for all before any changes)."""
        chosen = self.select(engine=engine, ids=ids)
        self.sync()
        for inst in chosen:
            apply_load(inst.load, changes)
        for inst in chosen:
            inst.set_load(changes)
        return chosen

    def apply_settings(
        self, changes: Mapping[str, Any], *, engine: str | None = None, ids: Iterable[str] | None = None
    ) -> list[tuple[SimInstance, bool]]:
        """Apply knobs (validated for every selected instance first); changed instances restart."""
        chosen = self.select(engine=engine, ids=ids)
        self.sync()
        for inst in chosen:
            inst.validate_settings(changes)
        return [(inst, inst.apply_settings(changes)) for inst in chosen]

    def render(self, instance_id: str) -> str | None:
        """Prometheus text of one instance, or None while it restarts."""
        inst = self.instance(instance_id)
        self.sync()
        return inst.render()

    def app(self) -> web.Application:
        from perfagent.sim.server import build_app

        return build_app(self)
