"""Optimizations as data: the validated model of `perfagent/optimizations/<engine>.yaml` and its loader.

Each file lists the engine's documented flags (type, default, the
generic aliases the spec uses) and its optimizations: the bottlenecks that trigger each, conditions
on metrics and on the current config, flag changes as templates over current values with bounds,
and an estimated improvement with its basis. The recommender over this data is `perfagent.optimizer`.
"""

from __future__ import annotations

import functools
import json
import math
import operator
import re
import string
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from perfagent.catalog import CATALOG
from perfagent.models import EngineName
from perfagent.recommend_models import (
    BottleneckType,
    OptimizationType,
    Severity,
)

FlagType = Literal["int", "float", "bool", "str", "json"]
Op = Literal["<", "<=", ">", ">=", "==", "!="]

OPS: Final[Mapping[str, Callable[[float, float], bool]]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}
SEVERITY_ORDER: Final[tuple[Severity, ...]] = tuple(Severity)
# Quantities computed here from catalog ones, usable in conditions like catalog names.
DERIVED_METRICS: Final[Mapping[str, str]] = {
    "gpu_memory_free_bytes": "gpu_memory_total_bytes - gpu_memory_used_bytes (dcgm-exporter)",
}
DEPLOYMENT_KEYS: Final[frozenset[str]] = frozenset({"replicas_delta"})
IMPROVEMENT_KEYS: Final[frozenset[str]] = frozenset(
    {"memory_reduction", "kv_cache_capacity_gain", "throughput_gain", "latency_impact"}
)
_NAME = r"^[a-z][a-z0-9_]*$"
_TRUE: Final = frozenset({"true", "1", "yes", "on"})
_FALSE: Final = frozenset({"false", "0", "no", "off"})


class OptimizationsError(ValueError):
    """An optimizations file is unreadable or invalid."""


def cli_name(flag: str) -> str:
    """The command-line spelling of a flag key: max_num_seqs -> --max-num-seqs."""
    return "--" + flag.replace("_", "-")


def config_key(key: str) -> str:
    """The matching form of a current_config key: `--max-num-seqs` and `max_num_seqs` are one key."""
    return key.strip().lstrip("-").lower().replace("-", "_")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---- flags ------------------------------------------------------------------------------------


class Flag(_Model):
    """One documented engine flag; its key in `flags:` is the flag without dashes."""

    type: FlagType
    default: Any = None  # None: no single documented default (the engine chooses, or none is set)
    default_note: str = ""
    # The documented default depends on GPU or version: never raise a value from it.
    default_varies: bool = False
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()  # documented values of a str flag (others are kept, with a note)
    range: tuple[float, float] | None = None  # valid values of a numeric flag, inclusive
    negation: str | None = None  # CLI form of false for a bool flag, e.g. --no-enable-prefix-caching
    doc: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        numeric = self.type in ("int", "float")
        if self.range is not None and (not numeric or self.range[0] > self.range[1]):
            raise ValueError("range needs a numeric flag and low <= high")
        if self.choices and self.type != "str":
            raise ValueError("choices only for str flags")
        if self.negation is not None and (self.type != "bool" or not self.negation.startswith("--")):
            raise ValueError("negation only for bool flags, spelt --no-...")
        if self.default is not None:
            _, problem, _ = coerce(self, self.default)
            if problem:
                raise ValueError(f"default: {problem}")
        for alias in self.aliases:
            if not re.match(_NAME, alias):
                raise ValueError(f"alias {alias!r} must be snake_case")
        return self


def coerce(flag: Flag, value: Any) -> tuple[Any, str | None, str | None]:
    """`value` read as `flag`'s type: (value, problem that makes it unusable, note)."""
    if value is None:
        return None, None, None
    if flag.type == "bool":
        if isinstance(value, bool):
            return value, None, None
        if isinstance(value, int | str) and str(value).strip().lower() in _TRUE | _FALSE:
            return str(value).strip().lower() in _TRUE, None, None
        return None, f"expected a boolean, got {value!r}", None
    if flag.type in ("int", "float"):
        number: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                number = None
        if number is None or not math.isfinite(number):
            return None, f"expected a number, got {value!r}", None
        if flag.type == "int" and not number.is_integer():
            return None, f"expected an integer, got {value!r}", None
        if flag.range is not None and not flag.range[0] <= number <= flag.range[1]:
            return None, f"{value!r} is outside the valid range {list(flag.range)}", None
        return (int(number) if flag.type == "int" else number), None, None
    if flag.type == "str":
        if not isinstance(value, str) or not value.strip():
            return None, f"expected a string, got {value!r}", None
        text = value.strip()
        if flag.choices and text not in flag.choices:
            return (
                text,
                None,
                f"{text!r} is not a documented value ({', '.join(flag.choices)}); kept as given",
            )
        return text, None, None
    if isinstance(value, str):  # json
        try:
            value = json.loads(value)
        except ValueError:
            return None, f"expected a JSON object, got {value!r}", None
    if not isinstance(value, dict):
        return None, f"expected a JSON object, got {value!r}", None
    return value, None, None


# ---- changes and conditions -------------------------------------------------------------------


class Change(_Model):
    """A flag's new value: a literal (`set`) or computed from its current value (`multiply`, `add`).

    Computed: current * multiply + add, clamped to [at_least, at_most], rounded (int flags to an
    integer, float flags to `round` decimals). `direction` requires the result to move that way from
    the current value; `optional` drops just this change, not the optimization, when it cannot apply.
    """

    set: Any = None
    multiply: float | None = None
    add: float | None = None
    at_least: float | None = None
    at_most: float | None = None
    round: int | None = Field(None, ge=0, le=6)
    direction: Literal["raise", "lower"] | None = None
    optional: bool = False

    @property
    def literal(self) -> bool:
        return "set" in self.model_fields_set

    @model_validator(mode="after")
    def _one_form(self) -> Self:
        computed = self.multiply is not None or self.add is not None
        if computed == self.literal:
            raise ValueError("give either set, or multiply and/or add")
        if self.literal and self.set is None:
            raise ValueError("set: null is no change")
        if self.literal and (self.at_least, self.at_most, self.round) != (None, None, None):
            raise ValueError("at_least, at_most and round apply to computed values only")
        if self.at_least is not None and self.at_most is not None and self.at_least > self.at_most:
            raise ValueError("at_least is above at_most")
        return self


class MetricCondition(_Model):
    """A metric compared with a number, or with a flag's current value times `factor`."""

    metric: str
    op: Op
    value: float | None = None
    flag: str | None = None
    factor: float = 1.0
    if_missing: bool  # the truth value when the metric (or the flag's value) is unknown
    reason: str = Field(min_length=1)

    @model_validator(mode="after")
    def _one_side(self) -> Self:
        if (self.value is None) == (self.flag is None):
            raise ValueError("give either value or flag")
        if self.metric not in CATALOG and self.metric not in DERIVED_METRICS:
            raise ValueError(f"metric {self.metric!r} is not a catalog quantity (perfagent/catalog.py)")
        return self


class ConfigCondition(_Model):
    """A current_config value (after aliases) among `in`, or set / not set (null counts as not set)."""

    config: str
    in_: tuple[Any, ...] | None = Field(None, alias="in")
    is_set: bool | None = None
    reason: str = Field(min_length=1)

    @model_validator(mode="after")
    def _one_test(self) -> Self:
        if (self.in_ is None) == (self.is_set is None):
            raise ValueError("give either in or is_set")
        return self


def _leaf_kind(value: Any) -> str | None:
    if isinstance(value, Mapping):
        return next((k for k in ("metric", "config") if k in value), None)
    if isinstance(value, MetricCondition):
        return "metric"
    return "config" if isinstance(value, ConfigCondition) else None


Leaf = Annotated[
    Annotated[MetricCondition, Tag("metric")] | Annotated[ConfigCondition, Tag("config")],
    Discriminator(_leaf_kind),
]


class AnyOf(_Model):
    """Holds when any of its conditions holds."""

    any: tuple[Leaf, ...] = Field(min_length=2)
    reason: str = Field(min_length=1)


def _condition_kind(value: Any) -> str | None:
    if isinstance(value, Mapping) and "any" in value:
        return "any"
    return "any" if isinstance(value, AnyOf) else _leaf_kind(value)


Condition = Annotated[
    Annotated[MetricCondition, Tag("metric")]
    | Annotated[ConfigCondition, Tag("config")]
    | Annotated[AnyOf, Tag("any")],
    Discriminator(_condition_kind),
]


class Trigger(_Model):
    """A bottleneck type (HIGH_LATENCY optionally narrowed to ttft or itl) at or above a severity."""

    bottleneck: BottleneckType
    latency: Literal["ttft", "itl"] | None = None
    min_severity: Severity = Severity.LOW

    @model_validator(mode="after")
    def _latency_only_for_latency(self) -> Self:
        if self.latency is not None and self.bottleneck is not BottleneckType.HIGH_LATENCY:
            raise ValueError("latency narrows HIGH_LATENCY triggers only")
        return self


class ImprovementSpec(BaseModel):
    """Estimated improvement: numbers from IMPROVEMENT_KEYS, and the `basis` they rest on."""

    model_config = ConfigDict(extra="allow", frozen=True)
    __pydantic_extra__: dict[str, float] = Field(init=False)

    basis: str = Field(min_length=1)

    @model_validator(mode="after")
    def _known_numbers(self) -> Self:
        for key, value in (self.model_extra or {}).items():
            if key not in IMPROVEMENT_KEYS:
                raise ValueError(f"{key!r} is not one of {', '.join(sorted(IMPROVEMENT_KEYS))}")
            if not -1.0 <= value <= 10.0:
                raise ValueError(f"{key} = {value} is not a plausible fraction")
        return self


# ---- optimizations ----------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"^(new|old)\[([a-z0-9_]+)\]$")


def _flags_of(info: ValidationInfo) -> Mapping[str, Flag] | None:
    context = info.context
    return context.get("flags") if isinstance(context, Mapping) else None


def _check_condition(cond: MetricCondition | ConfigCondition | AnyOf, flags: Mapping[str, Flag]) -> None:
    if isinstance(cond, AnyOf):
        for leaf in cond.any:
            _check_condition(leaf, flags)
    elif isinstance(cond, ConfigCondition):
        if cond.config not in flags:
            raise ValueError(f"config {cond.config!r} is not a flag of this engine")
    elif cond.flag is not None:
        flag = flags.get(cond.flag)
        if flag is None or flag.type not in ("int", "float"):
            raise ValueError(f"flag {cond.flag!r} is not a numeric flag of this engine")


def _check_change(name: str, change: Change, flag: Flag) -> None:
    numeric = flag.type in ("int", "float")
    if not change.literal and not numeric:
        raise ValueError(f"{name}: multiply/add need a numeric flag, {name} is {flag.type}")
    if change.direction is not None and not numeric:
        raise ValueError(f"{name}: direction needs a numeric flag")
    if change.literal:
        value, problem, note = coerce(flag, change.set)
        if problem:
            raise ValueError(f"{name}: set: {problem}")
        if note:
            raise ValueError(f"{name}: set: {note}")
        if flag.type == "bool" and value is False and flag.negation is None:
            raise ValueError(f"{name}: set: false has no CLI form (no negation declared)")


class OptimizationSpec(_Model):
    """One optimization of one engine, as written in the YAML."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    type: OptimizationType
    rank: int = Field(ge=0)  # order among equal priorities; unique within the file
    triggers: tuple[Trigger, ...] = Field(min_length=1)
    require: tuple[Condition, ...] = ()  # all must hold, else skipped
    skip_if: tuple[Condition, ...] = ()  # any holding skips it
    changes: Mapping[str, Change] = Field(default_factory=dict)
    deployment: Mapping[str, int] = Field(default_factory=dict)
    description: str = Field(min_length=1)  # may name {new[flag]} and {old[flag]} of non-optional changes
    estimated_improvement: ImprovementSpec
    risks: tuple[str, ...] = Field(min_length=1)
    requires_restart: bool
    requires_new_weights: bool
    auto_applicable: bool
    priority_shift: int = Field(0, ge=-3, le=0)  # rungs below the addressed bottlenecks' severity

    @field_validator("changes")
    @classmethod
    def _known_flags(cls, value: Mapping[str, Change], info: ValidationInfo) -> Mapping[str, Change]:
        flags = _flags_of(info)
        if flags is not None:
            for name, change in value.items():
                if name not in flags:
                    raise ValueError(f"{name!r} is not a flag of this engine (flags:)")
                _check_change(name, change, flags[name])
        return value

    @field_validator("require", "skip_if")
    @classmethod
    def _known_inputs(
        cls, value: tuple[MetricCondition | ConfigCondition | AnyOf, ...], info: ValidationInfo
    ) -> tuple[MetricCondition | ConfigCondition | AnyOf, ...]:
        flags = _flags_of(info)
        if flags is not None:
            for cond in value:
                _check_condition(cond, flags)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if not self.changes and not self.deployment:
            raise ValueError("needs changes or deployment")
        unknown = set(self.deployment) - DEPLOYMENT_KEYS
        if unknown:
            raise ValueError(
                f"deployment: unknown key(s) {sorted(unknown)}; known: {sorted(DEPLOYMENT_KEYS)}"
            )
        # vLLM, TGI and SGLang read every flag at start only (ENGINES.md §6 lists no runtime knob).
        if self.requires_restart != bool(self.changes):
            raise ValueError("requires_restart must be true exactly when engine flags change")
        if self.requires_new_weights and self.auto_applicable:
            raise ValueError("an optimization needing new weights is advice: auto_applicable must be false")
        fixed = {name for name, change in self.changes.items() if not change.optional}
        for _, field_name, _, _ in string.Formatter().parse(self.description):
            if field_name is None:
                continue
            match = _PLACEHOLDER.match(field_name)
            if match is None or match.group(2) not in fixed:
                raise ValueError(
                    f"description: {{{field_name}}} must be {{new[flag]}} or {{old[flag]}} "
                    "of a non-optional change"
                )
        return self


class Unavailable(_Model):
    """An optimization type the engine has no flag for, reported as skipped when triggered."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    type: OptimizationType
    triggers: tuple[Trigger, ...] = Field(min_length=1)
    reason: str = Field(min_length=1)


class EngineOptimizations(_Model):
    """One engine's optimizations file."""

    engine: EngineName
    assumes: str = Field(min_length=1)  # the engine version and server the defaults belong to
    sources: tuple[str, ...] = Field(min_length=1)
    flags: Mapping[str, Flag] = Field(min_length=1)
    optimizations: tuple[OptimizationSpec, ...] = Field(min_length=1)
    unavailable: tuple[Unavailable, ...] = ()

    @field_validator("flags")
    @classmethod
    def _flag_names(cls, value: Mapping[str, Flag]) -> Mapping[str, Flag]:
        seen: dict[str, str] = {}
        for name, flag in value.items():
            if not re.match(_NAME, name):
                raise ValueError(f"flag {name!r} must be snake_case (the CLI flag without dashes)")
            for alias in flag.aliases:
                if alias in value or alias in seen:
                    owner = alias if alias in value else seen[alias]
                    raise ValueError(f"alias {alias!r} of {name!r} is already {owner!r}")
                seen[alias] = name
        return value

    @model_validator(mode="after")
    def _unique(self) -> Self:
        ids = [o.id for o in self.optimizations] + [u.id for u in self.unavailable]
        dup_ids = sorted({i for i in ids if ids.count(i) > 1})
        if dup_ids:
            raise ValueError(f"duplicate id(s) {dup_ids}")
        by_rank: dict[int, list[str]] = {}
        for o in self.optimizations:
            by_rank.setdefault(o.rank, []).append(o.id)
        for rank, owners in by_rank.items():
            if len(owners) > 1:
                raise ValueError(
                    f"rank {rank} is shared by {', '.join(owners)}; ranks order them and must differ"
                )
        return self

    @functools.cached_property
    def alias_index(self) -> Mapping[str, str]:
        """Alias -> real flag."""
        return {alias: name for name, flag in self.flags.items() for alias in flag.aliases}

    def documented_cli(self) -> frozenset[str]:
        """Every CLI spelling of the documented flags (with bool negations)."""
        names = {cli_name(name) for name in self.flags}
        names |= {flag.negation for flag in self.flags.values() if flag.negation}
        return frozenset(names)


# ---- loading ----------------------------------------------------------------------------------


def _location(loc: Sequence[int | str], data: Any) -> str:
    """A pydantic error location, with optimization ids instead of list indices."""
    text = ""
    node = data
    after_index = False
    for part in loc:
        if isinstance(part, int) and isinstance(node, list) and 0 <= part < len(node):
            node = node[part]
            ident = node.get("id") if isinstance(node, Mapping) else None
            text += f"[{ident}]" if ident else f"[{part}]"
            after_index = True
            continue
        if after_index and part in ("metric", "config", "any"):
            after_index = False
            continue  # the union tag pydantic puts after a condition's index, not a key of the file
        after_index = False
        text += f".{part}" if text else str(part)
        node = node.get(part) if isinstance(node, Mapping) else None
    return text or "<top level>"


def _describe(exc: ValidationError, data: Any, prefix: Sequence[str | int] = ()) -> str:
    return "\n".join(
        f"  at {_location([*prefix, *err['loc']], data)}: {err['msg'].removeprefix('Value error, ')}"
        for err in exc.errors(include_url=False)
    )


_FLAGS: Final = TypeAdapter(dict[str, Flag])


def parse_optimizations(text: str, *, origin: str, expect_engine: str | None = None) -> EngineOptimizations:
    """Validate optimizations YAML text; errors name `origin` (the file) and the offending key."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise OptimizationsError(f"{origin}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise OptimizationsError(f"{origin}: at <top level>: expected a mapping")
    try:
        flags = _FLAGS.validate_python(data.get("flags") or {})
    except ValidationError as exc:
        raise OptimizationsError(f"{origin}: invalid flags:\n{_describe(exc, data, ('flags',))}") from exc
    try:
        spec = EngineOptimizations.model_validate(data, context={"flags": flags})
    except ValidationError as exc:
        raise OptimizationsError(f"{origin}: invalid optimizations:\n{_describe(exc, data)}") from exc
    if expect_engine is not None and spec.engine.value != expect_engine:
        raise OptimizationsError(f"{origin}: at engine: {spec.engine.value!r} does not match the file name")
    return spec


def load_optimizations_file(path: Path) -> EngineOptimizations:
    """Load and validate one optimizations file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise OptimizationsError(f"{path}: cannot read: {exc}") from exc
    return parse_optimizations(text, origin=str(path), expect_engine=path.stem)


@functools.cache
def load_engine_optimizations(engine: str) -> EngineOptimizations:
    """The built-in optimizations of `engine` (vllm, tgi or sglang), validated once per process."""
    name = EngineName(engine).value
    resource = resources.files("perfagent").joinpath("optimizations", f"{name}.yaml")
    return parse_optimizations(resource.read_text(encoding="utf-8"), origin=str(resource), expect_engine=name)
