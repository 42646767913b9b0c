"""Simulated fleet: vLLM, TGI and SGLang servers whose /metrics follow a load and engine model.

Every simulated endpoint says so (``perfagent_simulator_info``). Modules, one concern each:

* `knobs`: the engines' tuning knobs (validated), the load spec and the scenario presets
* `spec`: hardware, and how knobs turn into capacities and scheduling policies
* `model`: the tick-based load and engine model (equations in its docstring)
* `stats`: histogram/counter accumulators
* `exposition`, `render_vllm`, `render_tgi`, `render_sglang`: Prometheus text per engine and version
* `instance`, `fleet`: instances with restarts, the fleet and its clock (the Python API)
* `server`, `cli`: the aiohttp control/metrics API and ``perfagent sim``
"""

from perfagent.sim.fleet import ClockError, SimFleet, UnknownInstanceError
from perfagent.sim.knobs import SCENARIOS, KnobError, LoadSpec
from perfagent.sim.spec import Hardware

__all__ = ["SCENARIOS", "ClockError", "Hardware", "KnobError", "LoadSpec", "SimFleet", "UnknownInstanceError"]
