"""Rule unit tests in the spirit of `promtool test rules`: input series in, expected firing findings out.

A test file names rule files (relative to itself) and holds tests; each test gives input series per
instance, sampled every `interval` from time 0, and `expect` blocks listing exactly the findings
(instance, rule, type, severity) firing at a time. The rules run through the real pipeline:
`evaluate_series`, then `FindingTracker` at every interval, so `for` and `keep_firing_for` count.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Final

import polars as pl
import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from pydantic import ValidationError as PydanticValidationError

from perfagent.catalog import CATALOG
from perfagent.detect import CompiledRules, compile_rules, evaluate_series
from perfagent.findings import FindingState, FindingTracker
from perfagent.models import EngineName
from perfagent.rules import (
    BottleneckType,
    Duration,
    RuleFileError,
    Severity,
    child_node,
    compose_yaml,
    duplicate_key_problems,
    format_duration,
    line_of,
    load_rules,
    validation_messages,
)

EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_NUMBER: Final = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_EXPANDING: Final = re.compile(rf"^(?P<a>{_NUMBER})(?:(?P<sign>[-+])(?P<b>{_NUMBER}))?x(?P<n>\d+)$")


def expand_series(notation: str | Sequence[float | None]) -> list[float | None]:
    """Values from promtool's expanding notation, or an explicit list (null: no sample).

    `a+bxn` is `a a+b … a+n*b` (n+1 values), `a-bxn` likewise downwards, `axn` is `a` n+1 times,
    `_` is a missing sample, `_xn` is n missing samples, `stale` counts as missing. Generated values
    are rounded to 12 decimals, so `0.5+0.1x3` ends at exactly 0.8.
    """
    if not isinstance(notation, str):
        return [None if v is None else float(v) for v in notation]
    values: list[float | None] = []
    for token in notation.split():
        if token in ("_", "stale"):
            values.append(None)
        elif token.startswith("_x") and token[2:].isdigit():
            values.extend([None] * int(token[2:]))
        elif (match := _EXPANDING.match(token)) is not None:
            a, n = float(match["a"]), int(match["n"])
            b = float(match["b"] or 0) * (-1 if match["sign"] == "-" else 1)
            values.extend(round(a + i * b, 12) for i in range(n + 1))
        elif re.fullmatch(_NUMBER, token):
            values.append(float(token))
        else:
            raise ValueError(f"bad series token {token!r}: use numbers, 'a+bxn', 'a-bxn', 'axn', '_', '_xn'")
    return values


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Series = str | list[float | None]


class InputSeries(_Strict):
    instance: Annotated[str, StringConstraints(min_length=1)]
    engine: EngineName
    values: dict[str, Series]

    @field_validator("values")
    @classmethod
    def _known(cls, values: dict[str, Series]) -> dict[str, Series]:
        for quantity, notation in values.items():
            if quantity not in CATALOG:
                raise ValueError(f"unknown quantity '{quantity}'")
            try:
                expand_series(notation)
            except ValueError as exc:
                raise ValueError(f"{quantity}: {exc}") from None
        return values


class ExpectedFinding(_Strict):
    instance: str
    rule: str
    severity: Severity
    type: BottleneckType | None = None  # default: the rule's


class Expectation(_Strict):
    at: Duration
    firing: list[ExpectedFinding] = Field(default_factory=list)


class RuleTest(_Strict):
    name: Annotated[str, StringConstraints(min_length=1)]
    interval: Duration = timedelta(seconds=15)
    input_series: list[InputSeries]
    expect: list[Expectation]

    @field_validator("interval")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("the interval must be longer than 0s")
        return value


class RuleTestFile(_Strict):
    rule_files: list[str]
    tests: list[Any]


@dataclass(frozen=True, slots=True)
class TestOutcome:
    """One test: passed when `failures` is empty (each failure is a readable paragraph)."""

    file: Path
    name: str
    failures: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass(frozen=True, slots=True)
class FileOutcome:
    """A test file: its tests' outcomes, or the errors that kept it from running."""

    file: Path
    tests: tuple[TestOutcome, ...] = ()
    errors: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return not self.errors and all(t.passed for t in self.tests)


def _frame(test: RuleTest, horizon: int) -> pl.DataFrame:
    """One row per instance per interval step up to `horizon`, null where a series has no value."""
    columns: dict[str, list[Any]] = {"instance_id": [], "engine": [], "ts": []}
    quantities = sorted({q for s in test.input_series for q in s.values})
    for q in quantities:
        columns[q] = []
    for series in test.input_series:
        expanded = {q: expand_series(v) for q, v in series.values.items()}
        steps = max([horizon + 1, *(len(v) for v in expanded.values())])
        for i in range(steps):
            columns["instance_id"].append(series.instance)
            columns["engine"].append(series.engine.value)
            columns["ts"].append(EPOCH + i * test.interval)
            for q in quantities:
                values = expanded.get(q, [])
                columns[q].append(values[i] if i < len(values) else None)
    schema = pl.Schema(
        {
            "instance_id": pl.String(),
            "engine": pl.String(),
            "ts": pl.Datetime("us", "UTC"),
            **{q: pl.Float64() for q in quantities},
        }
    )
    return pl.DataFrame(columns, schema=schema)


_Key = tuple[str, str]  # instance, rule
_Found = tuple[str, str]  # type, severity


def _describe(instance: str, rule: str, found: _Found) -> str:
    return f"instance={instance} rule={rule} type={found[0]} severity={found[1]}"


def _compare(expected: dict[_Key, _Found], actual: dict[_Key, _Found]) -> list[str]:
    lines: list[str] = []
    differ = sorted(k for k in expected.keys() & actual.keys() if expected[k] != actual[k])
    missing = sorted(expected.keys() - actual.keys())
    extra = sorted(actual.keys() - expected.keys())
    if differ:
        lines.append("  firing, but not as expected:")
        for k in differ:
            lines.append(f"    {_describe(*k, expected[k])}")
            lines.append(f"      got type={actual[k][0]} severity={actual[k][1]}")
    if missing:
        lines.append("  expected, but not firing:")
        lines.extend(f"    {_describe(*k, expected[k])}" for k in missing)
    if extra:
        lines.append("  firing, but not expected:")
        lines.extend(f"    {_describe(*k, actual[k])}" for k in extra)
    return lines


def _run_test(path: Path, test: RuleTest, expect_lines: list[int], compiled: CompiledRules) -> TestOutcome:
    types = {cr.name: cr.source.rule.type.value for cr in compiled.rules}
    problems: list[str] = []
    for i, exp in enumerate(test.expect):
        if exp.at % test.interval or exp.at < timedelta(0):
            problems.append(
                f"{path}:{expect_lines[i]}: test '{test.name}': at {format_duration(exp.at)} is not a "
                f"multiple of the interval {format_duration(test.interval)}"
            )
        for f in exp.firing:
            if f.rule not in types:
                problems.append(
                    f"{path}:{expect_lines[i]}: test '{test.name}': rule '{f.rule}' is not in the rule files"
                )
    if problems:
        return TestOutcome(path, test.name, tuple(problems))
    horizon = max(int(exp.at / test.interval) for exp in test.expect) if test.expect else 0
    series = evaluate_series(compiled, _frame(test, horizon))
    tracker = FindingTracker.from_rules(compiled)
    times = [EPOCH + i * test.interval for i in range(horizon + 1)]
    snapshots: dict[datetime, dict[_Key, _Found]] = {}
    for step in tracker.replay(series, times):
        firing = step.state.filter(pl.col("state") == FindingState.FIRING.value)
        snapshots[step.at] = {
            (r["instance_id"], r["rule"]): (r["type"], r["severity"]) for r in firing.iter_rows(named=True)
        }
    failures: list[str] = []
    for i, exp in enumerate(test.expect):
        expected = {
            (f.instance, f.rule): ((f.type.value if f.type else types[f.rule]), f.severity.value)
            for f in exp.firing
        }
        diff = _compare(expected, snapshots[EPOCH + exp.at])
        if diff:
            head = f"{path}:{expect_lines[i]}: test '{test.name}': at {format_duration(exp.at)}:"
            failures.append("\n".join([head, *diff]))
    return TestOutcome(path, test.name, tuple(failures))


def run_test_file(path: Path) -> FileOutcome:
    """Load the rule files a test file names and run each of its tests."""
    try:
        root, data = compose_yaml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        return FileOutcome(path, errors=(f"{path}:1: cannot read test file: {exc}".replace("\n", " "),))
    if root is None:
        return FileOutcome(path, errors=(f"{path}:1: empty test file",))
    duplicates = duplicate_key_problems(path, root)
    if duplicates:
        return FileOutcome(path, errors=tuple(str(p) for p in duplicates))
    try:
        spec = RuleTestFile.model_validate(data)
    except PydanticValidationError as exc:
        messages = validation_messages(exc, RuleTestFile, root)
        return FileOutcome(path, errors=tuple(f"{path}:{line_of(root, loc)}: {m}" for loc, m in messages))
    try:
        ruleset = load_rules([path.parent / f for f in spec.rule_files], builtin=False)
    except RuleFileError as exc:
        return FileOutcome(path, errors=tuple(str(p) for p in exc.problems))
    compiled = compile_rules(ruleset)
    outcomes: list[TestOutcome] = []
    errors: list[str] = []
    for i, raw in enumerate(spec.tests):
        node = child_node(root, "tests", i) or root
        name = raw.get("name") if isinstance(raw, dict) else None
        label = name if isinstance(name, str) else f"#{i + 1}"
        try:
            test = RuleTest.model_validate(raw)
        except PydanticValidationError as exc:
            messages = validation_messages(exc, RuleTest, node)
            errors.extend(f"{path}:{line_of(node, loc)}: test '{label}': {m}" for loc, m in messages)
            continue
        expect_lines = [line_of(node, ("expect", j)) for j in range(len(test.expect))]
        outcomes.append(_run_test(path, test, expect_lines, compiled))
    return FileOutcome(path, tuple(outcomes), tuple(errors))


def run_test_files(paths: Sequence[Path]) -> Iterator[FileOutcome]:
    for path in paths:
        yield run_test_file(path)
