"""Engine maps: which exposed metrics feed each catalog quantity, loaded and validated from YAML."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from perfagent.catalog import CATALOG, Kind

BUILTIN_ENGINES: tuple[str, ...] = ("vllm", "tgi", "sglang", "dcgm")

Aggregate = Literal["sum", "max", "min", "mean"]


class EngineMapError(ValueError):
    """An engine map file is unreadable or invalid."""


def canonical_metric(name: str) -> str:
    """Matching form of a metric name: OTel and other tools rewrite `:` to `_` (ENGINES.md rule 2)."""
    return name.lower().replace(":", "_")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Selector(_Model):
    """Series of one metric, optionally restricted by label values."""

    metric: str = Field(min_length=1)
    # Label value must be one of these; a series without the label does not match.
    where: Mapping[str, tuple[str, ...]] = Field(default_factory=dict)
    # Label value must not be one of these; a series without the label matches.
    where_not: Mapping[str, tuple[str, ...]] = Field(default_factory=dict)

    @property
    def series_id(self) -> str:
        """PromQL-like text naming the selection, used as the key of stored snapshots."""
        parts = [f'{k}=~"{"|".join(v)}"' for k, v in sorted(self.where.items())]
        parts += [f'{k}!~"{"|".join(v)}"' for k, v in sorted(self.where_not.items())]
        return f"{self.metric}{{{','.join(parts)}}}" if parts else self.metric


class Term(Selector):
    """One addend of a gauge_sum."""

    optional: bool = False  # an absent optional term counts as 0 (DCGM FB_RESERVED is not always exported)


class _SourceBase(_Model):
    # Eras (EngineMap.eras hints) this source applies to; empty means every era.
    eras: tuple[str, ...] = ()
    # Set when the source only approximates the quantity; copied into Normalized.approximations.
    approximation: str | None = None


class GaugeSource(Selector, _SourceBase):
    """An instantaneous gauge, aggregated across series."""

    kind: Literal["gauge"]
    aggregate: Aggregate
    scale: float = 1.0  # multiplies the aggregated value (percent -> ratio, MiB -> bytes)
    valid_range: tuple[float, float] | None = None  # raw values outside are sentinels and dropped


class GaugeSumSource(_SourceBase):
    """Sum of several gauges, each aggregated across series."""

    kind: Literal["gauge_sum"]
    terms: tuple[Term, ...] = Field(min_length=2)
    aggregate: Aggregate
    scale: float = 1.0


class InfoSource(Selector, _SourceBase):
    """An info-style gauge whose number lives in its labels: the product of the named labels."""

    kind: Literal["info"]
    product_of_labels: tuple[str, ...] = Field(min_length=1)
    aggregate: Aggregate


class CounterSource(Selector, _SourceBase):
    """A cumulative counter (or a histogram's `_sum`/`_count`), summed across series."""

    kind: Literal["counter"]
    # Counters created on first increment are simply missing before it: when any of these metrics is
    # present, a missing counter is 0 rather than unknown.
    absent_is_zero_when: tuple[str, ...] = ()


class CounterRatioSource(_SourceBase):
    """Ratio of two counters' deltas over the window."""

    kind: Literal["counter_ratio"]
    numerator: Selector
    denominator: Selector


class HistogramSource(Selector, _SourceBase):
    """A histogram; buckets, `_sum` and `_count` are summed across series (by `le` for buckets)."""

    kind: Literal["histogram"]


class HistogramSumSource(_SourceBase):
    """A quantity approximated as the sum of several histograms' means and quantiles."""

    kind: Literal["histogram_sum"]
    terms: tuple[Selector, ...] = Field(min_length=2)


Source = Annotated[
    GaugeSource
    | GaugeSumSource
    | InfoSource
    | CounterSource
    | CounterRatioSource
    | HistogramSource
    | HistogramSumSource,
    Field(discriminator="kind"),
]

# Which source kinds may feed a quantity of each catalog kind.
_ALLOWED: Mapping[Kind, frozenset[str]] = {
    Kind.GAUGE: frozenset({"gauge", "gauge_sum", "info"}),
    Kind.COUNTER: frozenset({"counter"}),
    Kind.RATIO: frozenset({"counter_ratio", "gauge"}),
    Kind.MEAN: frozenset({"histogram", "histogram_sum"}),
}


class QuantityMap(_Model):
    """Sources of one quantity in priority order: the first one present in a scrape wins, never a sum."""

    sources: tuple[Source, ...]

    @field_validator("sources")
    @classmethod
    def _not_empty(cls, value: tuple[Source, ...]) -> tuple[Source, ...]:
        if not value:
            raise ValueError("at least one source is needed")
        return value


class Era(_Model):
    """An engine version era, recognised by metric names or labels it alone exposes."""

    hint: str = Field(min_length=1)
    any_metric: tuple[str, ...] = ()  # any of these sample names present in the scrape
    any_label: tuple[str, ...] = ()  # any of these labels on a series of a metric this map uses

    @model_validator(mode="after")
    def _needs_a_rule(self) -> Self:
        if not self.any_metric and not self.any_label:
            raise ValueError(f"era {self.hint!r} needs any_metric or any_label")
        return self


class EngineMap(_Model):
    """All sources of one engine (or of dcgm-exporter)."""

    engine: str = Field(min_length=1)
    description: str = ""
    # Labels whose values repeat one state (SGLang tp_rank/pp_rank): such series collapse by max first.
    replica_labels: tuple[str, ...] = ()
    # Series carrying any of these labels are not the engine's own (the vLLM router adds `server`).
    drop_series_with_labels: tuple[str, ...] = ()
    # First matching era gives Normalized.engine_version_hint.
    eras: tuple[Era, ...] = ()
    quantities: Mapping[str, QuantityMap]

    @field_validator("quantities", mode="before")
    @classmethod
    def _known_quantities(cls, value: object) -> object:
        # Checked before the sources so a misspelt quantity is reported with any other error.
        for name in value if isinstance(value, Mapping) else ():
            quantity = CATALOG.get(name)
            if quantity is None:
                raise ValueError(f"quantity {name!r} is not in the catalog (perfagent/catalog.py)")
            if not quantity.mappable:
                derived = ", ".join(quantity.derived_from)
                raise ValueError(f"quantity {name!r} is derived from {derived} and cannot be mapped")
        return value

    @field_validator("quantities")
    @classmethod
    def _source_kinds_fit(cls, value: Mapping[str, QuantityMap]) -> Mapping[str, QuantityMap]:
        for name, qmap in value.items():
            quantity = CATALOG[name]
            allowed = _ALLOWED[quantity.kind]
            for i, source in enumerate(qmap.sources):
                if source.kind not in allowed:
                    raise ValueError(
                        f"quantity {name!r} source {i}: kind {source.kind!r} cannot feed a {quantity.kind} "
                        f"quantity (allowed: {', '.join(sorted(allowed))})"
                    )
        return value

    @model_validator(mode="after")
    def _sources_consistent(self) -> Self:
        hints = {era.hint for era in self.eras}
        for name, qmap in self.quantities.items():
            for i, source in enumerate(qmap.sources):
                if (
                    isinstance(source, CounterSource)
                    and source.absent_is_zero_when
                    and i < len(qmap.sources) - 1
                ):
                    # It would always count as present and hide the sources after it.
                    raise ValueError(
                        f"quantity {name!r} source {i}: absent_is_zero_when only on the last source"
                    )
                unknown = set(source.eras) - hints
                if unknown:
                    raise ValueError(
                        f"quantity {name!r} source {i}: unknown era(s) {sorted(unknown)} "
                        f"(declared: {sorted(hints)})"
                    )
        return self


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "<top level>"
        lines.append(f"  at {where}: {err['msg']}")
    return "\n".join(lines)


def parse_engine_map(text: str, *, origin: str, expect_engine: str | None = None) -> EngineMap:
    """Validate engine map YAML text; errors name `origin` (the file) and the offending key."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise EngineMapError(f"{origin}: not valid YAML: {exc}") from exc
    try:
        emap = EngineMap.model_validate(data)
    except ValidationError as exc:
        raise EngineMapError(f"{origin}: invalid engine map:\n{_describe(exc)}") from exc
    if expect_engine is not None and emap.engine != expect_engine:
        raise EngineMapError(f"{origin}: at engine: {emap.engine!r} does not match the file name")
    return emap


def load_engine_map_file(path: Path) -> EngineMap:
    """Load and validate one engine map file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise EngineMapError(f"{path}: cannot read: {exc}") from exc
    return parse_engine_map(text, origin=str(path), expect_engine=path.stem)


@functools.cache
def load_engine_map(engine: str) -> EngineMap:
    """The built-in map of `engine` (vllm, tgi, sglang or dcgm), validated once per process."""
    if engine not in BUILTIN_ENGINES:
        raise ValueError(f"unknown engine {engine!r}; expected one of {', '.join(BUILTIN_ENGINES)}")
    resource = resources.files("perfagent").joinpath("engines", f"{engine}.yaml")
    return parse_engine_map(resource.read_text(encoding="utf-8"), origin=str(resource), expect_engine=engine)
