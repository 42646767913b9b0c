"""Known bucket layouts of the engines' latency histograms (perfagent/engines/buckets.yaml).

SLOs count good requests from the cumulative bucket at `le = threshold`, which exists only when the
threshold is a bucket edge; this module answers which edges a histogram has on every engine version.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from importlib import resources
from typing import Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, model_validator

# A threshold written to 4 significant digits (TGI's 2.525 for 2.5251168294042348) names that edge.
EDGE_TOLERANCE = 1e-3


class Geometric(BaseModel):
    """`count` edges: `start` multiplied by `factor` before each one (TGI's server.rs loop)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: PositiveFloat
    factor: float = Field(gt=1.0)
    count: int = Field(ge=1, le=1000)

    def edges(self) -> tuple[float, ...]:
        # The same float multiplications as the engine, so the edges equal its `le` values exactly.
        out, value = [], self.start
        for _ in range(self.count):
            value *= self.factor
            out.append(value)
        return tuple(out)


class Layout(BaseModel):
    """The bucket edges of a histogram in some engine versions, and where they come from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = ""
    versions: str = Field(min_length=1)
    source: str = Field(min_length=1)
    edges: tuple[float, ...] = ()
    geometric: Geometric | None = None

    @model_validator(mode="after")
    def _one_form(self) -> Self:
        if bool(self.edges) == (self.geometric is not None):
            raise ValueError("give either `edges` or `geometric`")
        if self.edges and list(self.edges) != sorted(set(self.edges)):
            raise ValueError("edges must be strictly increasing")
        return self

    @property
    def bounds(self) -> tuple[float, ...]:
        return self.geometric.edges() if self.geometric is not None else self.edges


class BucketData(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    layouts: Mapping[str, Layout]
    histograms: Mapping[str, Mapping[str, tuple[str, ...]]]

    @model_validator(mode="after")
    def _known_layouts(self) -> Self:
        for engine, metrics in self.histograms.items():
            for metric, names in metrics.items():
                unknown = [n for n in names if n not in self.layouts]
                if unknown or not names:
                    raise ValueError(f"{engine} {metric}: unknown or no layouts {unknown}")
        return self

    def layouts_of(self, engine: str, metric: str) -> tuple[Layout, ...]:
        """Every known layout of `metric` on `engine`; empty when none is recorded."""
        names = self.histograms.get(engine, {}).get(metric, ())
        return tuple(self.layouts[n].model_copy(update={"name": n}) for n in names)


@functools.cache
def bucket_data() -> BucketData:
    """The bundled layouts, validated once per process (read-only data, like the engine maps)."""
    text = resources.files("perfagent").joinpath("engines", "buckets.yaml").read_text(encoding="utf-8")
    return BucketData.model_validate(yaml.safe_load(text))


def matching_edge(value: float, edges: tuple[float, ...]) -> float | None:
    """The edge `value` names (within EDGE_TOLERANCE, relative), or None."""
    for edge in edges:
        if math.isclose(value, edge, rel_tol=EDGE_TOLERANCE, abs_tol=1e-12):
            return edge
    return None


def common_edges(layouts: tuple[Layout, ...]) -> tuple[float, ...]:
    """Edges present in every layout (matched within the tolerance), from the first layout's values."""
    if not layouts:
        return ()
    first, *rest = layouts
    return tuple(e for e in first.bounds if all(matching_edge(e, other.bounds) is not None for other in rest))


def nearest(value: float, edges: tuple[float, ...]) -> tuple[float, ...]:
    """The edge just below `value` and the one just above it (those that exist)."""
    below = [e for e in edges if e < value]
    above = [e for e in edges if e > value]
    return tuple(([max(below)] if below else []) + ([min(above)] if above else []))
