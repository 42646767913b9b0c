"""Shared pieces of the simulated exposition: the render context and prometheus_client helpers.

vLLM and SGLang use Python prometheus_client themselves, so their output is produced by the same
library: custom collectors on a fresh `CollectorRegistry` and `generate_latest` (text 0.0.4). That
gives the exact HELP/TYPE layout, ``le="1.0"`` formatting, sorted labels and ``*_created`` series.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString as _float_to_go

from perfagent.sim.model import EngineModel
from perfagent.sim.spec import EngineSpec
from perfagent.sim.stats import Hist

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # "text/plain; version=0.0.4; charset=utf-8"
SIM_INFO = "perfagent_simulator_info"
SIM_INFO_HELP = (
    "SIMULATED inference server (perfagent sim): not a real engine; labels name the engine and "
    "version it imitates"
)
SIM_SETTINGS = "perfagent_simulator_settings_info"
SIM_SETTINGS_HELP = "SIMULATED inference server (perfagent sim): engine settings in force"
# prometheus_client's own `le` formatting ("1.0", "1.1e+06"); it is untyped upstream.
float_to_go = cast(Callable[[float], str], _float_to_go)


@dataclass(frozen=True)
class RenderContext:
    """Everything a renderer needs about one simulated instance at one moment."""

    model: EngineModel
    engine: str
    version: str
    instance_id: str
    model_name: str
    settings: Mapping[str, Any]  # knobs in force (as the user set them)
    spec: EngineSpec
    process_start: float  # epoch seconds the (simulated) process started
    created: float  # epoch seconds its metrics were created (after start-up)
    startup_seconds: float


def label_value(value: object) -> str:
    """Python's str(), which is how vLLM's cache_config_info prints its values (``True``, ``None``)."""
    return str(value)


def floor_count(value: float) -> float:
    """Counters of fluid events are printed as whole numbers."""
    return float(int(value + 1e-9))


class _Collector:
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def generate(families: Iterable[Metric]) -> str:
    """Render families exactly as prometheus_client's `generate_latest` does for a registry."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(families))
    return generate_latest(registry).decode("utf-8")


def gauge(name: str, doc: str, labels: Mapping[str, str], value: float) -> GaugeMetricFamily:
    fam = GaugeMetricFamily(name, doc, labels=list(labels))
    fam.add_metric(list(labels.values()), value)
    return fam


def counter(
    name: str,
    doc: str,
    labels: Mapping[str, str],
    series: Sequence[tuple[Mapping[str, str], float]],
    created: float | None,
) -> CounterMetricFamily:
    """A counter family; `series` adds extra labels (e.g. ``finished_reason``) to the base `labels`."""
    names = list(labels) + (list(series[0][0]) if series else [])
    fam = CounterMetricFamily(name, doc, labels=names)
    for extra, value in series:
        fam.add_metric([*labels.values(), *extra.values()], floor_count(value), created=created)
    return fam


def histogram(
    name: str, doc: str, labels: Mapping[str, str], hist: Hist, created: float | None
) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=list(labels))
    cumulative = hist.cumulative()
    buckets = [(float_to_go(b), c) for b, c in zip(hist.upper_bounds, cumulative, strict=False)]
    buckets.append(("+Inf", cumulative[-1]))
    fam.add_metric(list(labels.values()), buckets, hist.sum)
    if created is not None:
        fam.samples.append(Sample(name + "_created", dict(labels), created))
    return fam


def sim_families(ctx: RenderContext) -> list[Metric]:
    """The simulator's own labels: every simulated endpoint says so, and which settings are in force."""
    info = {
        "engine": ctx.engine,
        "version": ctx.version,
        "instance": ctx.instance_id,
        "model": ctx.model_name,
    }
    settings = {k: label_value(v) for k, v in ctx.settings.items()}
    return [gauge(SIM_INFO, SIM_INFO_HELP, info, 1.0), gauge(SIM_SETTINGS, SIM_SETTINGS_HELP, settings, 1.0)]


def one_two_five(max_value: int) -> list[float]:
    """vLLM's build_1_2_5_buckets: 1, 2, 5, 10, 20, 50, ... up to max_value."""
    out: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return out
            out.append(float(value))
        exponent += 1
