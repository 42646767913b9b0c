"""Rule files: the validated models and the one loader for built-in and user rules.

A rule file follows Prometheus alerting-rule files (`groups:` of `rules:`) and adds what this domain
needs: a bottleneck `type`, a severity ladder of thresholds in the catalog unit of the `quantity` read,
extra `and:` conditions, and an optional look-back window (`over`, `reduce`), whose reduction may be a
trend (`slope`, or `predict` with `ahead`, as PromQL's `deriv` and `predict_linear`). Every problem
names the file, the rule and the line; built-in rules go through the same loader as users' own.
"""

from __future__ import annotations

import difflib
import itertools
import re
import string
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Final

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    FiniteFloat,
    StringConstraints,
    ValidationInfo,
    field_validator,
)
from pydantic import ValidationError as PydanticValidationError

from perfagent.catalog import CATALOG, Quantity, Unit
from perfagent.errors import FileProblemsError
from perfagent.models import EngineName

BUILTIN_RULES_DIR: Final[Path] = Path(__file__).resolve().parent.parent / "rules"
RULE_FILE_SUFFIXES: Final[frozenset[str]] = frozenset({".yaml", ".yml"})


class Severity(StrEnum):
    """Severity rungs, lowest first (the order is the ladder's order)."""

    LOW = "LOW"
    MEDIUM = "MEDIUM"
    HIGH = "HIGH"
    CRITICAL = "CRITICAL"


SEVERITY_RANK: Final[Mapping[str, int]] = {s.value: i for i, s in enumerate(Severity)}


class BottleneckType(StrEnum):
    """The spec's bottleneck types."""

    MEMORY_PRESSURE = "MEMORY_PRESSURE"
    HIGH_LATENCY = "HIGH_LATENCY"
    LOW_THROUGHPUT = "LOW_THROUGHPUT"
    QUEUE_BUILDUP = "QUEUE_BUILDUP"
    CACHE_INEFFICIENCY = "CACHE_INEFFICIENCY"


class Op(StrEnum):
    GT = ">"
    GE = ">="
    LT = "<"
    LE = "<="

    @property
    def upward(self) -> bool:
        """True for `>`-style comparisons, whose ladder increases with severity."""
        return self in (Op.GT, Op.GE)

    def holds(self, value: float, threshold: float) -> bool:
        """Plain-Python comparison (the reference the vectorized engine is tested against)."""
        if self is Op.GT:
            return value > threshold
        if self is Op.GE:
            return value >= threshold
        if self is Op.LT:
            return value < threshold
        return value <= threshold


class Reduce(StrEnum):
    """How the samples of a look-back window become one value (nulls are skipped).

    `slope` and `predict` fit a least-squares line through the window's samples, as PromQL's
    `deriv(x[w])` (the slope, per second) and `predict_linear(x[w], ahead)` (the line's value `ahead`
    after the evaluation time) do; both need at least two samples.
    """

    MEAN = "mean"
    MAX = "max"
    MIN = "min"
    LAST = "last"
    SLOPE = "slope"
    PREDICT = "predict"

    @property
    def trend(self) -> bool:
        return self in (Reduce.SLOPE, Reduce.PREDICT)


# --- durations -------------------------------------------------------------------------------------

_DURATION_RE: Final = re.compile(
    r"^(?:(?P<y>\d+)y)?(?:(?P<w>\d+)w)?(?:(?P<d>\d+)d)?(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?"
    r"(?:(?P<s>\d+)s)?(?:(?P<ms>\d+)ms)?$"
)
_UNIT_MS: Final[tuple[tuple[str, int], ...]] = (
    ("y", 365 * 86_400_000),
    ("w", 7 * 86_400_000),
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1000),
    ("ms", 1),
)


def parse_duration(value: object) -> timedelta:
    """A Prometheus duration (`30s`, `5m`, `1h30m`, `0`) as a timedelta."""
    if isinstance(value, timedelta):
        return value
    if value == 0 and not isinstance(value, bool):
        return timedelta(0)
    if not isinstance(value, str):
        raise ValueError(f"expected a duration such as '30s', '5m' or '1h30m', got {value!r}")
    text = value.strip()
    if text == "0":
        return timedelta(0)
    match = _DURATION_RE.match(text)
    if not text or match is None:
        raise ValueError(f"bad duration {value!r}: use digits with y, w, d, h, m, s or ms, e.g. '5m'")
    ms = sum(int(match[u]) * factor for u, factor in _UNIT_MS if match[u] is not None)
    return timedelta(milliseconds=ms)


def format_duration(value: timedelta) -> str:
    """The Prometheus spelling of a duration (`1h30m`, `0s`)."""
    ms = int(value / timedelta(milliseconds=1))
    if ms == 0:
        return "0s"
    parts = []
    for unit, factor in _UNIT_MS:
        n, ms = divmod(ms, factor)
        if n:
            parts.append(f"{n}{unit}")
    return "".join(parts)


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


# --- annotation templates --------------------------------------------------------------------------

# What `{...}` may name in `summary` and `description`.
TEMPLATE_FIELDS: Final[frozenset[str]] = frozenset(
    {
        *("value", "threshold", "instance", "engine", "unit", "severity", "quantity", "rule", "type"),
        *("window", "ahead"),
    }
)
_NUMERIC_FIELDS: Final[frozenset[str]] = frozenset({"value", "threshold"})
_SPEC_RE: Final = re.compile(r"^\.(?P<digits>\d)(?P<kind>[f%])$")


@dataclass(frozen=True, slots=True)
class TemplatePart:
    """A literal followed by an optional field; `spec` is `''`, `.Nf` or `.N%` (numbers only)."""

    literal: str
    field: str | None = None
    spec: str = ""


def parse_template(text: str) -> tuple[TemplatePart, ...]:
    """Split a `str.format`-style template; raise ValueError naming a bad field or spec."""
    try:
        raw = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ValueError(f"bad template {text!r}: {exc}") from None
    parts = []
    for literal, name, spec, conversion in raw:
        if name is None:
            parts.append(TemplatePart(literal))
            continue
        if name not in TEMPLATE_FIELDS:
            known = ", ".join(f"{{{f}}}" for f in sorted(TEMPLATE_FIELDS))
            raise ValueError(
                f"unknown template field {{{name}}}{_did_you_mean(name, TEMPLATE_FIELDS)}; known: {known}"
            )
        if conversion:
            raise ValueError(f"template field {{{name}!{conversion}}}: conversions are not supported")
        if spec and (name not in _NUMERIC_FIELDS or not _SPEC_RE.match(spec)):
            raise ValueError(
                f"template field {{{name}:{spec}}}: only {{value}} and {{threshold}} take a format, "
                "and only '.Nf' (N decimals) or '.N%' (ratio as percent)"
            )
        parts.append(TemplatePart(literal, name, spec or ""))
    return tuple(parts)


def _did_you_mean(word: str, choices: frozenset[str] | Sequence[str]) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


# --- models ----------------------------------------------------------------------------------------


def _catalog(info: ValidationInfo) -> Mapping[str, Quantity]:
    context = info.context
    if isinstance(context, Mapping) and "catalog" in context:
        catalog: Mapping[str, Quantity] = context["catalog"]
        return catalog
    return CATALOG


def _check_quantity(name: str, info: ValidationInfo) -> str:
    catalog = _catalog(info)
    if name not in catalog:
        raise ValueError(f"unknown quantity '{name}'{_did_you_mean(name, list(catalog))}")
    return name


def _check_value_unit(
    value: float, quantity: str | None, info: ValidationInfo, reduce: Reduce | None = None
) -> None:
    """Thresholds are in the catalog unit of the quantity they compare with; a projection
    (`predict`) too. A slope is that unit per second, of either sign, so it has no range."""
    catalog = _catalog(info)
    if quantity is None or quantity not in catalog or reduce is Reduce.SLOPE:
        return  # the quantity error is reported on its own
    unit = catalog[quantity].unit
    if unit is Unit.RATIO and not 0 <= value <= 1:
        raise ValueError(f"{value} is outside 0-1, the unit of '{quantity}' (ratio): write 0.9, not 90")
    if unit is Unit.PERCENT and not 0 <= value <= 100:
        raise ValueError(f"{value} is outside 0-100, the unit of '{quantity}' (percent)")
    if value < 0:
        raise ValueError(f"{value} is negative, but '{quantity}' is in {unit.value}, never negative")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _positive_duration(value: timedelta | None) -> timedelta | None:
    if value is not None and value <= timedelta(0):
        raise ValueError("the duration must be longer than 0s")
    return value


class Condition(_Strict):
    """An extra condition that must hold together with the rule's own (`and:`). Its value's unit is
    checked by the rule, which knows the reduction a condition inherits."""

    quantity: str
    op: Op
    value: FiniteFloat
    reduce: Reduce | None = None  # default: the rule's
    ahead: Duration | None = None  # for `predict`; default: the rule's

    _quantity = field_validator("quantity")(_check_quantity)
    _ahead = field_validator("ahead")(_positive_duration)


class Annotations(_Strict):
    """Prometheus-style annotations; `{value}`, `{threshold}`, `{instance}`, `{unit}`… are filled in."""

    summary: str = ""
    description: str = ""
    runbook_url: str | None = None

    @field_validator("summary", "description")
    @classmethod
    def _template(cls, text: str) -> str:
        parse_template(text)
        return text


RuleName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_.:-]*$", max_length=128)]


class Rule(_Strict):
    """One rule. Field order matters: validators read the fields declared before them."""

    name: RuleName
    type: BottleneckType
    engines: tuple[EngineName, ...] | None = None  # None: every engine
    quantity: str
    op: Op
    over: Duration | None = None
    reduce: Reduce = Reduce.LAST
    thresholds: dict[Severity, FiniteFloat]
    and_: tuple[Condition, ...] = Field(default=(), alias="and")
    # After `and`: whether `ahead` is needed, or used at all, depends on the conditions too.
    ahead: Duration | None = Field(default=None, validate_default=True)
    for_: Duration = Field(default=timedelta(0), alias="for")
    keep_firing_for: Duration = timedelta(0)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: Annotations = Annotations()
    recommendation: Annotated[str, StringConstraints(min_length=1)]

    _quantity = field_validator("quantity")(_check_quantity)

    @field_validator("engines")
    @classmethod
    def _engines(cls, engines: tuple[EngineName, ...] | None) -> tuple[EngineName, ...] | None:
        if engines is not None and not engines:
            raise ValueError("empty list: omit `engines` to apply the rule to every engine")
        if engines is not None and len(set(engines)) != len(engines):
            raise ValueError("an engine is listed twice")
        return engines

    @field_validator("over")
    @classmethod
    def _window_positive(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and value <= timedelta(0):
            raise ValueError("the window must be longer than 0s")
        return value

    @field_validator("reduce")
    @classmethod
    def _reduce_needs_window(cls, value: Reduce, info: ValidationInfo) -> Reduce:
        # "over" missing from info.data means it failed to validate; that error is reported already.
        if value is not Reduce.LAST and "over" in info.data and info.data["over"] is None:
            raise ValueError(f"reduce: {value.value} needs a window: add `over:` (e.g. over: 5m)")
        return value

    @field_validator("thresholds")
    @classmethod
    def _ladder(cls, ladder: dict[Severity, float], info: ValidationInfo) -> dict[Severity, float]:
        if not ladder:
            raise ValueError("give at least one severity: LOW, MEDIUM, HIGH or CRITICAL")
        # Messages start with the offending rung, which the loader turns into that rung's line.
        for severity, value in ladder.items():
            try:
                _check_value_unit(value, info.data.get("quantity"), info, info.data.get("reduce"))
            except ValueError as exc:
                raise ValueError(f"{severity.value}: {exc}") from None
        op = info.data.get("op")
        rungs = sorted(ladder.items(), key=lambda kv: SEVERITY_RANK[kv[0]])
        for (low, a), (high, b) in itertools.pairwise(rungs):
            if op is not None and (a < b if op.upward else a > b):
                continue
            if op is not None:
                direction = "increase" if op.upward else "decrease"
                raise ValueError(
                    f"{high.value}: with op '{op.value}' thresholds must {direction} with severity, "
                    f"but {high.value} is {b} and {low.value} is {a}"
                )
        return dict(rungs)

    @field_validator("and_")
    @classmethod
    def _and_reduce(cls, conditions: tuple[Condition, ...], info: ValidationInfo) -> tuple[Condition, ...]:
        # Messages lead with the condition's index and field, which the loader turns into its line.
        for i, c in enumerate(conditions):
            if c.reduce not in (None, Reduce.LAST) and "over" in info.data and info.data["over"] is None:
                raise ValueError(f"{i}: reduce: {c.reduce.value} needs a window: add `over:` to the rule")
            try:
                _check_value_unit(c.value, c.quantity, info, c.reduce or info.data.get("reduce"))
            except ValueError as exc:
                raise ValueError(f"{i}: value: {exc}") from None
        return conditions

    @field_validator("ahead")
    @classmethod
    def _ahead(cls, ahead: timedelta | None, info: ValidationInfo) -> timedelta | None:
        """`ahead` is how far `predict` projects: required by it, positive, and an error elsewhere."""
        _positive_duration(ahead)
        reduce, conditions = info.data.get("reduce"), info.data.get("and_", ())
        if reduce is Reduce.PREDICT and ahead is None:
            raise ValueError("reduce: predict needs `ahead:`, how far to project (e.g. ahead: 10m)")
        for i, c in enumerate(conditions):
            effective = c.reduce or reduce
            if effective is Reduce.PREDICT and c.ahead is None and ahead is None:
                raise ValueError(f"and: {i}: reduce: predict needs `ahead:` on the condition or the rule")
            if effective is not Reduce.PREDICT and c.ahead is not None and effective is not None:
                raise ValueError(f"and: {i}: ahead: only `reduce: predict` projects ahead")
        uses = reduce is Reduce.PREDICT or any(
            c.reduce is Reduce.PREDICT and c.ahead is None for c in conditions
        )
        if ahead is not None and reduce is not None and not uses:
            raise ValueError("only `reduce: predict` projects ahead (here or in an `and:` condition)")
        return ahead

    def ahead_of(self, condition: Condition | None = None) -> timedelta | None:
        """How far the rule's (or a condition's) `predict` projects; None for other reductions."""
        reduce = self.reduce if condition is None else condition.reduce or self.reduce
        if reduce is not Reduce.PREDICT:
            return None
        return (condition.ahead if condition is not None else None) or self.ahead

    def ladder(self) -> list[tuple[Severity, float]]:
        """The rungs from the highest severity down (the order the engine tries them in)."""
        return sorted(self.thresholds.items(), key=lambda kv: -SEVERITY_RANK[kv[0]])


class Group(_Strict):
    """A group's own fields (its `rules:` are validated one by one)."""

    name: Annotated[str, StringConstraints(min_length=1)]
    interval: Duration | None = None
    rules: list[Any]

    @field_validator("interval")
    @classmethod
    def _positive(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and value <= timedelta(0):
            raise ValueError("the interval must be longer than 0s")
        return value


class RuleFile(_Strict):
    groups: list[Any] = Field(default_factory=list)


# --- loading ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RuleProblem:
    """One thing wrong in a rule file, printed as `file:line: rule 'x': message`."""

    file: Path
    line: int
    message: str
    rule: str | None = None
    group: str | None = None

    def __str__(self) -> str:
        where = f"rule '{self.rule}': " if self.rule else f"group '{self.group}': " if self.group else ""
        return f"{self.file}:{self.line}: {where}{self.message}"


class RuleFileError(FileProblemsError[RuleProblem]):
    """One or more rule files are invalid; `problems` lists every one found."""


@dataclass(frozen=True, slots=True)
class LoadedRule:
    """A validated rule and where it came from."""

    rule: Rule
    file: Path
    line: int
    group: str
    interval: timedelta | None  # the group's evaluation interval, None: the poller's
    builtin: bool
    replaces: Path | None = None  # the built-in file whose rule of the same name this one replaces

    @property
    def name(self) -> str:
        return self.rule.name


@dataclass(frozen=True, slots=True)
class RuleSet:
    """The rules in effect, built-ins first, each name once."""

    rules: tuple[LoadedRule, ...]
    files: tuple[Path, ...] = field(default=())

    def __iter__(self) -> Iterator[LoadedRule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def get(self, name: str) -> LoadedRule | None:
        return next((r for r in self.rules if r.name == name), None)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.rules)


def yaml_files(path: Path) -> list[Path]:
    """The files a rule or SLO path stands for: a file itself, or a directory's *.yaml/*.yml (not
    recursive)."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in RULE_FILE_SUFFIXES)
    return [path]


def node_line(node: yaml.Node) -> int:
    """The 1-based line a YAML node starts on."""
    return int(node.start_mark.line) + 1


def _child(node: yaml.Node, part: str | int) -> tuple[yaml.Node, int] | None:
    """The node under `part`, and the line to report for it (a key's line for mapping entries)."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                return value, node_line(key)
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
        item: yaml.Node = node.value[part]
        return item, node_line(item)
    return None


def child_node(node: yaml.Node, *path: str | int) -> yaml.Node | None:
    """The node at `path` under `node` (mapping keys and sequence indexes), or None."""
    for part in path:
        found = _child(node, part)
        if found is None:
            return None
        node = found[0]
    return node


def line_of(node: yaml.Node, loc: Sequence[str | int]) -> int:
    """The line of the deepest node on the path `loc` (a pydantic error location)."""
    line = node_line(node)
    for part in loc:
        found = _child(node, part)
        if found is None:
            break
        node, line = found
    return line


def _duplicate_keys(node: yaml.Node) -> Iterator[tuple[int, str]]:
    """PyYAML keeps the last of repeated keys silently; a repeated key is almost always a mistake."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    yield node_line(key), key.value
                seen.add(key.value)
            yield from _duplicate_keys(value)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            yield from _duplicate_keys(item)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `tuple[Condition, ...] | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _fields_at(model: type[BaseModel], parent: Sequence[str | int]) -> list[str]:
    """The field names (aliases) allowed at `parent` below `model`, for "did you mean" hints."""
    for part in parent:
        if isinstance(part, int):
            continue
        info = next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None)
        sub = _model_in(info.annotation) if info is not None else None
        if sub is None:
            return []
        model = sub
    return [f.alias or n for n, f in model.model_fields.items()]


_LEADING_KEY: Final = re.compile(r"^(?P<key>[A-Za-z_]+|\d+): (?P<rest>.*)$", re.DOTALL)


def validation_messages(
    exc: PydanticValidationError, model: type[BaseModel], node: yaml.Node | None = None
) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """(location, message) for each error, worded for people editing YAML.

    A validator message that starts with keys under the failing field (`MEDIUM: …`, `0: value: …`),
    or with a sibling of it (`reduce: …`), moves the location to that key, so the line reported is
    the offending rung, item or field's.
    """
    for err in exc.errors(include_url=False):
        loc: tuple[str | int, ...] = tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            name = str(loc[-1])
            yield loc, f"unknown field '{name}'{_did_you_mean(name, _fields_at(model, loc[:-1]))}"
            continue
        message = str(err["msg"]).removeprefix("Value error, ")
        first = True
        while node is not None and (lead := _LEADING_KEY.match(message)) is not None:
            key: str | int = int(lead["key"]) if lead["key"].isdigit() else lead["key"]
            if child_node(node, *loc, key) is not None:
                loc = (*loc, key)
            elif first and loc and child_node(node, *loc[:-1], key) is not None:
                loc = (*loc[:-1], key)  # e.g. a missing `ahead` reported at the `reduce` that needs it
            else:
                break
            message, first = lead["rest"], False
        path = ".".join(str(p) for p in loc if p != "[key]")
        yield loc, f"{path}: {message}" if path else message


def compose_yaml(text: str) -> tuple[yaml.Node | None, Any]:
    """The node tree (for line numbers) and the plain data of one YAML document."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return node, data


def read_yaml_file(path: Path) -> tuple[yaml.Node | None, Any, tuple[int, str] | None]:
    """A data file's node tree and plain data, or why it cannot be read: (line, message)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, None, (1, f"cannot read: {exc}")
    try:
        root, data = compose_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = int(mark.line) + 1 if mark is not None else 1
        return None, None, (line, f"not valid YAML: {exc}".replace("\n", " "))
    return root, data, None


def duplicate_key_problems(path: Path, root: yaml.Node) -> list[RuleProblem]:
    return [RuleProblem(path, line, f"duplicate key '{key}'") for line, key in _duplicate_keys(root)]


def load_rule_file(
    path: Path, *, builtin: bool = False, catalog: Mapping[str, Quantity] = CATALOG
) -> tuple[list[LoadedRule], list[RuleProblem]]:
    """Validate one file: its rules, and every problem found (all of them, not just the first)."""
    problems: list[RuleProblem] = []
    root, data, unreadable = read_yaml_file(path)
    if unreadable is not None:
        return [], [RuleProblem(path, *unreadable)]
    if root is None or data is None:
        return [], []  # an empty file holds no rules, as in Prometheus
    problems.extend(duplicate_key_problems(path, root))
    try:
        RuleFile.model_validate(data)
    except PydanticValidationError as exc:
        problems.extend(
            RuleProblem(path, line_of(root, loc), msg) for loc, msg in validation_messages(exc, RuleFile)
        )
        return [], problems

    context = {"catalog": catalog}
    loaded: list[LoadedRule] = []
    seen: dict[str, int] = {}
    for gi, raw_group in enumerate(data.get("groups") or []):
        gnode = child_node(root, "groups", gi)
        assert gnode is not None  # validated above
        gname = raw_group.get("name") if isinstance(raw_group, dict) else None
        gname = gname if isinstance(gname, str) else f"#{gi + 1}"
        try:
            group = Group.model_validate(raw_group)
        except PydanticValidationError as exc:
            for loc, msg in validation_messages(exc, Group, gnode):
                problems.append(RuleProblem(path, line_of(gnode, loc), msg, group=gname))
            continue
        for ri, raw_rule in enumerate(group.rules):
            rnode = child_node(gnode, "rules", ri) or gnode
            rname = raw_rule.get("name") if isinstance(raw_rule, dict) else None
            rname = rname if isinstance(rname, str) else f"#{ri + 1} of group '{group.name}'"
            try:
                rule = Rule.model_validate(raw_rule, context=context)
            except PydanticValidationError as exc:
                for loc, msg in validation_messages(exc, Rule, rnode):
                    problems.append(RuleProblem(path, line_of(rnode, loc), msg, rule=rname))
                continue
            if rule.name in seen:
                problems.append(
                    RuleProblem(
                        path,
                        node_line(rnode),
                        f"duplicate rule name (first defined at line {seen[rule.name]})",
                        rule=rule.name,
                    )
                )
                continue
            seen[rule.name] = node_line(rnode)
            loaded.append(LoadedRule(rule, path, node_line(rnode), group.name, group.interval, builtin))
    return loaded, sorted(problems, key=lambda p: p.line)


def load_rules(
    paths: Sequence[Path] = (),
    *,
    builtin: bool = True,
    catalog: Mapping[str, Quantity] = CATALOG,
) -> RuleSet:
    """The built-in rules (`rules/`) plus the rule files or directories in `paths`.

    A rule named like an earlier one replaces it: a user's copy of a built-in rule is how a threshold
    or target is changed. Two rules of the same name within one path are an error. Raises
    RuleFileError listing every problem of every file.
    """
    sources: list[tuple[Path, bool]] = [(BUILTIN_RULES_DIR, True)] if builtin else []
    sources.extend((Path(p), False) for p in paths)
    problems: list[RuleProblem] = []
    by_name: dict[str, LoadedRule] = {}
    files: list[Path] = []
    for source, is_builtin in sources:
        if not source.exists():
            problems.append(RuleProblem(source, 1, "no such file or directory"))
            continue
        in_source: dict[str, LoadedRule] = {}
        for path in yaml_files(source):
            files.append(path)
            loaded, found = load_rule_file(path, builtin=is_builtin, catalog=catalog)
            problems.extend(found)
            for lr in loaded:
                if lr.name in in_source:
                    first = in_source[lr.name]
                    problems.append(
                        RuleProblem(
                            path, lr.line, f"duplicate rule name (also in {first.file}:{first.line})", lr.name
                        )
                    )
                    continue
                in_source[lr.name] = lr
        for name, lr in in_source.items():
            previous = by_name.get(name)
            replaces = previous.file if previous is not None and previous.builtin else None
            by_name[name] = LoadedRule(
                lr.rule, lr.file, lr.line, lr.group, lr.interval, lr.builtin, replaces or lr.replaces
            )
    if problems:
        raise RuleFileError(problems)
    return RuleSet(tuple(by_name.values()), tuple(files))
