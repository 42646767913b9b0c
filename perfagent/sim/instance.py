"""One simulated inference server: its engine model, settings, offered load and restarts.

Applying a knob restarts the instance, as on a real engine: the process stops, ``/metrics`` answers 503
for `restart_seconds`, then a fresh engine starts with every counter at 0 and a new
``process_start_time_seconds``. Requests that were in flight, or arrive while it is down, are lost.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from perfagent.sim import render_sglang, render_tgi, render_vllm
from perfagent.sim.exposition import RenderContext
from perfagent.sim.knobs import (
    EngineName,
    LoadSpec,
    Settings,
    TgiSettings,
    VllmSettings,
    VllmVersion,
    apply_knobs,
    apply_load,
)
from perfagent.sim.model import EngineModel
from perfagent.sim.spec import EngineSpec, Hardware, build_spec

VERSIONS = {"tgi": "3.x", "sglang": "0.5.x"}


def layout(engine: EngineName, version: str, settings: Settings) -> dict[str, list[float]]:
    if isinstance(settings, VllmSettings):
        return render_vllm.layout(version, settings.max_model_len)
    if isinstance(settings, TgiSettings):
        return render_tgi.layout(settings.max_input_tokens, settings.max_total_tokens)
    return render_sglang.layout()


class SimInstance:
    """A simulated server with its own simulated clock (`now`, seconds since the fleet started)."""

    def __init__(
        self,
        instance_id: str,
        engine: EngineName,
        *,
        settings: Settings,
        load: LoadSpec,
        rng: np.random.Generator,
        epoch: float,
        vllm_version: VllmVersion = "v1",
        model_name: str = "meta-llama/Llama-3.1-8B-Instruct",
        hardware: Hardware | None = None,
        restart_seconds: float = 30.0,
        tick: float = 0.25,
    ) -> None:
        self.id = instance_id
        self.engine: EngineName = engine
        self.version = vllm_version if engine == "vllm" else VERSIONS[engine]
        self._vllm_version: VllmVersion = vllm_version
        self.model_name = model_name
        self.hw = hardware or Hardware()
        self.restart_seconds = restart_seconds
        self.tick = tick
        self.epoch = epoch  # wall-clock epoch seconds at simulated time 0
        self.rng = rng
        self.load = load
        self.settings = settings
        self.spec: EngineSpec = build_spec(engine, settings, self.hw, vllm_version)
        self.now = 0.0
        self.process_start = 0.0  # simulated time the current process started
        self.up_at = 0.0  # ... and began serving
        self.restarts = 0
        self.model = self._new_model(start=0.0)

    def _new_model(self, start: float) -> EngineModel:
        return EngineModel(
            self.spec,
            self.hw,
            layout(self.engine, self.version, self.settings),
            self.rng,
            start=start,
            load=self.load,
            tick=self.tick,
        )

    # -- control ------------------------------------------------------------------------------------

    @property
    def restarting(self) -> bool:
        return self.now < self.up_at

    def advance_to(self, t: float) -> None:
        if t <= self.now:
            return
        self.now = t
        if t >= self.up_at:
            self.model.advance_to(t)

    def set_load(self, changes: Mapping[str, Any]) -> LoadSpec:
        """Change the offered load (no restart); raises `KnobError` naming a bad field."""
        self.load = apply_load(self.load, changes)
        self.model.set_load(self.load)
        return self.load

    def validate_settings(self, changes: Mapping[str, Any]) -> tuple[Settings, EngineSpec]:
        settings = apply_knobs(self.engine, self.settings, changes)
        return settings, build_spec(self.engine, settings, self.hw, self._vllm_version)

    def apply_settings(self, changes: Mapping[str, Any]) -> bool:
        """Apply knobs; a change restarts the instance. Returns whether it restarted."""
        settings, spec = self.validate_settings(changes)
        if settings == self.settings:
            return False
        self.settings, self.spec = settings, spec
        self.restart()
        return True

    def restart(self) -> None:
        self.restarts += 1
        self.process_start = self.now
        self.up_at = self.now + self.restart_seconds
        self.model = self._new_model(start=self.up_at)

    # -- views --------------------------------------------------------------------------------------

    def render(self) -> str | None:
        """The /metrics body, or None while restarting (the endpoint then answers 503)."""
        if self.restarting:
            return None
        ctx = RenderContext(
            model=self.model,
            engine=self.engine,
            version=self.version,
            instance_id=self.id,
            model_name=self.model_name,
            settings=self.settings.model_dump(),
            spec=self.spec,
            process_start=self.epoch + self.process_start,
            created=self.epoch + self.up_at,
            startup_seconds=self.restart_seconds,
        )
        if self.engine == "vllm":
            return render_vllm.render(ctx)
        if self.engine == "tgi":
            return render_tgi.render(ctx)
        return render_sglang.render(ctx)

    def view(self, origin: str = "") -> dict[str, Any]:
        return {
            "id": self.id,
            "engine": self.engine,
            "version": self.version,
            "model": self.model_name,
            "metrics_url": f"{origin}/instances/{self.id}/metrics",
            "simulated": True,
            "state": "restarting" if self.restarting else "serving",
            "sim_time": self.now,
            "process_start_time_seconds": self.epoch + self.process_start,
            "up_at": self.up_at,
            "restarts": self.restarts,
            "settings": self.settings.model_dump(),
            "load": self.load.model_dump(),
        }

    def detail(self, origin: str = "") -> dict[str, Any]:
        """The view plus the engine's current state and totals (what the exposition is made of)."""
        m, g = self.model, self.model.gauges
        return {
            **self.view(origin),
            "capacity": {
                "kv_cache_tokens": self.spec.kv_tokens,
                "kv_blocks": m.kv_blocks,
                "max_running": self.spec.max_seqs,
                "prefill_chunk_tokens": self.spec.chunk,
            },
            "state_detail": {
                "running": g.running,
                "waiting": g.waiting,
                "kv_cache_usage": g.kv_usage,
                "kv_used_tokens": g.kv_used_tokens,
                "reserved_tokens": g.reserved_tokens,
                "new_token_ratio": g.new_token_ratio,
                "generation_tokens_per_s": m.gen_rate.value,
                "prefix_cache_hit_rate": m.cache_hit_rate,
            },
            "totals": m.counters.as_dict(),
        }
