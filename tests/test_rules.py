"""The rule loader: the built-in rules load, and every rejection names the file, the rule and the line."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path

import pytest

from perfagent.catalog import CATALOG, Kind, Quantity, Unit
from perfagent.rules import (
    BUILTIN_RULES_DIR,
    Op,
    Reduce,
    RuleFileError,
    RuleProblem,
    Severity,
    format_duration,
    load_rules,
    parse_duration,
)

BUILTIN_NAMES = {
    "KVCachePreemption",
    "KVCacheFullSoon",
    "QueueBuildup",
    "QueueGrowing",
    "SGLangConservativeScheduling",
    "HighTTFT",
    "HighInterTokenLatency",
    "LowGenerationThroughput",
    "LowPrefixCacheHitRate",
}

GOOD_RULE = """\
groups:
  - name: g
    rules:
      - name: Good
        type: MEMORY_PRESSURE
        quantity: kv_cache_usage
        op: ">"
        thresholds: {MEDIUM: 0.8, HIGH: 0.9}
        recommendation: add memory
"""


def write(tmp_path: Path, text: str, name: str = "rules.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems(path: Path, catalog: Mapping[str, Quantity] = CATALOG) -> list[RuleProblem]:
    with pytest.raises(RuleFileError) as info:
        load_rules([path], builtin=False, catalog=catalog)
    return list(info.value.problems)


def only(path: Path, catalog: Mapping[str, Quantity] = CATALOG) -> RuleProblem:
    found = problems(path, catalog)
    assert len(found) == 1, "\n".join(map(str, found))
    return found[0]


def rule_file(body: str) -> str:
    """A file with one rule, the given lines (already indented for a rule) after its name."""
    head = "groups:\n  - name: g\n    rules:\n      - name: Bad\n"
    return head + textwrap.indent(textwrap.dedent(body), " " * 8)


BASE = """\
type: MEMORY_PRESSURE
quantity: kv_cache_usage
op: ">"
recommendation: r
"""


def test_builtin_rules_load_through_the_same_loader() -> None:
    ruleset = load_rules()
    assert set(ruleset.names) == BUILTIN_NAMES
    for lr in ruleset:
        assert lr.builtin and lr.file.parent == BUILTIN_RULES_DIR
        assert lr.rule.recommendation and lr.rule.annotations.description
        assert lr.rule.quantity in CATALOG


def test_every_builtin_threshold_block_starts_with_its_source() -> None:
    """Each `thresholds:` block opens with a comment naming where its numbers come from."""
    for path in sorted(BUILTIN_RULES_DIR.glob("*.yaml")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if line.strip() == "thresholds:":
                assert lines[i + 1].strip().startswith("#"), f"{path}:{i + 2}: threshold without a source"


def test_a_valid_file_loads(tmp_path: Path) -> None:
    ruleset = load_rules([write(tmp_path, GOOD_RULE)], builtin=False)
    (lr,) = ruleset.rules
    assert lr.name == "Good" and lr.line == 4 and lr.group == "g"
    assert lr.rule.op is Op.GT and lr.rule.reduce is Reduce.LAST
    assert lr.rule.ladder() == [(Severity.HIGH, 0.9), (Severity.MEDIUM, 0.8)]
    assert lr.rule.for_ == timedelta(0) and lr.rule.engines is None


def test_an_empty_file_holds_no_rules(tmp_path: Path) -> None:
    assert len(load_rules([write(tmp_path, "")], builtin=False)) == 0


@pytest.mark.parametrize(
    ("body", "line", "message"),
    [
        # A ratio threshold written as a percent.
        ("thresholds:\n  MEDIUM: 0.8\n  HIGH: 90\n", 11, r"thresholds\.HIGH: 90\.0 is outside 0-1"),
        # A ladder that does not increase with severity for '>'.
        (
            "thresholds:\n  MEDIUM: 0.9\n  HIGH: 0.8\n",
            11,
            r"thresholds\.HIGH: .* must increase with severity",
        ),
        # Unknown severity.
        ("thresholds:\n  SEVERE: 0.9\n", 10, r"thresholds\.SEVERE: Input should be 'LOW', 'MEDIUM'"),
        # An empty ladder.
        ("thresholds: {}\n", 9, r"at least one severity"),
        # Bad durations.
        ("thresholds: {LOW: 0.5}\nfor: 5 minutes\n", 10, r"for: bad duration '5 minutes'"),
        ("thresholds: {LOW: 0.5}\nover: 0s\n", 10, r"over: the window must be longer than 0s"),
        ("thresholds: {LOW: 0.5}\nkeep_firing_for: -1m\n", 10, r"keep_firing_for: bad duration"),
        # A reduction without a window.
        ("thresholds: {LOW: 0.5}\nreduce: mean\n", 10, r"reduce: mean needs a window"),
        # Trends: a window, `ahead` for predict and only for it, projections in the quantity's unit.
        ("thresholds: {LOW: 0.5}\nreduce: slope\n", 10, r"reduce: slope needs a window"),
        (
            "over: 5m\nreduce: predict\nthresholds: {HIGH: 1}\n",
            10,
            r"^reduce: predict needs `ahead:`, how far to project",
        ),
        (
            "over: 5m\nreduce: mean\nahead: 10m\nthresholds: {HIGH: 1}\n",
            11,
            r"^ahead: only `reduce: predict`",
        ),
        (
            "over: 5m\nreduce: predict\nahead: 0s\nthresholds: {HIGH: 1}\n",
            11,
            r"^ahead: the duration must be",
        ),
        (
            "over: 5m\nreduce: predict\nahead: 10m\nthresholds: {HIGH: 1.5}\n",
            12,
            r"thresholds\.HIGH: 1\.5 is outside 0-1",
        ),
        (
            "over: 5m\nthresholds: {LOW: 0.5}\nand:\n  - {quantity: requests_waiting, op: '>', value: 1, ahead: 5m}\n",
            12,
            r"^and\.0\.ahead: only `reduce: predict` projects ahead",
        ),
        (
            "over: 5m\nthresholds: {LOW: 0.5}\nand:\n  - quantity: requests_waiting\n    op: '>'\n"
            "    value: 1\n    reduce: predict\n",
            15,
            r"^and\.0\.reduce: predict needs `ahead:` on the condition or the rule",
        ),
        # A typo in a field name.
        ("tresholds: {LOW: 0.5}\n", 9, r"unknown field 'tresholds' \(did you mean 'thresholds'\?\)"),
        # Unknown engine.
        (
            "thresholds: {LOW: 0.5}\nengines: [vllm, triton]\n",
            10,
            r"engines\.1: Input should be 'vllm', 'tgi'",
        ),
        # A bad template field.
        (
            "thresholds: {LOW: 0.5}\nannotations:\n  summary: 'at {valu}'\n",
            11,
            r"unknown template field \{valu\} \(did you mean 'value'\?\)",
        ),
    ],
)
def test_rejections_name_file_rule_and_line(tmp_path: Path, body: str, line: int, message: str) -> None:
    path = write(tmp_path, rule_file(BASE + body))
    found = problems(path)
    # A misspelt field is also a missing one, reported too (on the rule's first line).
    assert len(found) == (2 if "tresholds" in body else 1), "\n".join(map(str, found))
    problem = next((p for p in found if re.search(message, p.message)), found[0])
    assert (problem.file, problem.rule, problem.line) == (path, "Bad", line), str(problem)
    assert re.search(message, problem.message), str(problem)
    assert str(problem).startswith(f"{path}:{line}: rule 'Bad': ")


def test_unknown_quantity_and_type(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        rule_file(
            """\
            type: MEMORY_PRESURE
            quantity: kv_usage
            op: ">"
            thresholds: {LOW: 0.5}
            recommendation: r
            """
        ),
    )
    found = {p.line: p.message for p in problems(path)}
    assert re.search(r"type: Input should be 'MEMORY_PRESSURE'", found[5])
    assert found[6] == "quantity: unknown quantity 'kv_usage' (did you mean 'kv_cache_usage'?)"


def test_falling_ladder_for_less_than_and_negative_units(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        groups:
          - name: g
            rules:
              - name: Rising
                type: LOW_THROUGHPUT
                quantity: generation_tokens_per_second
                op: "<"
                thresholds: {MEDIUM: 5, HIGH: 20}
                recommendation: r
              - name: Negative
                type: HIGH_LATENCY
                quantity: ttft_seconds_p99
                op: ">"
                thresholds: {HIGH: -1}
                and:
                  - {quantity: requests_waiting, op: ">", value: -2}
                recommendation: r
        """,
    )
    found = {(p.rule, p.line): p.message for p in problems(path)}
    assert re.search(r"thresholds\.HIGH: with op '<' thresholds must decrease", found["Rising", 8])
    assert re.search(
        r"thresholds\.HIGH: -1\.0 is negative, but 'ttft_seconds_p99' is in seconds", found["Negative", 14]
    )
    assert re.search(r"and\.0\.value: -2\.0 is negative", found["Negative", 16])


def test_percent_thresholds_are_0_to_100(tmp_path: Path) -> None:
    catalog = {**CATALOG, "busy_percent": Quantity("busy_percent", Unit.PERCENT, Kind.GAUGE, "test")}
    path = write(
        tmp_path,
        rule_file(
            "type: QUEUE_BUILDUP\nquantity: busy_percent\nop: '>'\nthresholds: {LOW: 50, HIGH: 120}\n"
            "recommendation: r\n"
        ),
    )
    problem = only(path, catalog=catalog)
    assert problem.line == 8 and "120.0 is outside 0-100" in problem.message
    path.write_text(path.read_text().replace("120", "95"))
    assert load_rules([path], builtin=False, catalog=catalog).names == ("Bad",)


def test_duplicate_rule_names_in_a_file(tmp_path: Path) -> None:
    text = GOOD_RULE + textwrap.indent(GOOD_RULE.split("rules:\n", 1)[1], "")
    path = write(tmp_path, text)
    problem = only(path)
    assert (problem.rule, problem.line) == ("Good", 10)
    assert "duplicate rule name (first defined at line 4)" in problem.message


def test_duplicate_rule_names_across_files_of_one_directory(tmp_path: Path) -> None:
    write(tmp_path, GOOD_RULE, "a.yaml")
    second = write(tmp_path, GOOD_RULE, "b.yaml")
    with pytest.raises(RuleFileError) as info:
        load_rules([tmp_path], builtin=False)
    (problem,) = info.value.problems
    assert (problem.file, problem.line, problem.rule) == (second, 4, "Good")
    assert "also in" in problem.message and "a.yaml:4" in problem.message


def test_duplicate_keys_yaml_errors_and_group_errors(tmp_path: Path) -> None:
    dup = write(tmp_path, GOOD_RULE + "        recommendation: again\n", "d.yaml")
    problem = only(dup)
    assert problem.line == 10 and problem.message == "duplicate key 'recommendation'"

    broken = write(tmp_path, "groups:\n  - name: g\n    rules: [\n", "y.yaml")
    problem = only(broken)
    assert problem.line == 4 and problem.message.startswith("not valid YAML")

    group = write(tmp_path, "groups:\n  - name: g\n    intervall: 30s\n    rules: []\n", "g.yaml")
    problem = only(group)
    assert (problem.group, problem.line) == ("g", 3)
    assert "unknown field 'intervall' (did you mean 'interval'?)" in problem.message
    assert str(problem) == f"{group}:3: group 'g': unknown field 'intervall' (did you mean 'interval'?)"

    top = write(tmp_path, "group:\n  - name: g\n", "t.yaml")
    problem = only(top)
    assert problem.line == 1 and "unknown field 'group' (did you mean 'groups'?)" in problem.message


def test_every_problem_of_a_file_is_reported(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        groups:
          - name: g
            rules:
              - name: One
                type: MEMORY_PRESSURE
                quantity: kv_cache_usage
                op: ">"
                thresholds: {HIGH: 2}
                recommendation: r
              - name: Two
                type: MEMORY_PRESSURE
                quantity: kv_cache_usage
                op: "=="
                thresholds: {HIGH: 0.5}
                recommendation: r
              - {name: Three}
        """,
    )
    found = [(p.rule, p.line) for p in problems(path)]
    assert ("One", 8) in found and ("Two", 13) in found
    assert ("Three", 16) in found  # each missing field of an inline rule points at the rule


def test_user_rule_replaces_the_builtin_of_the_same_name(tmp_path: Path) -> None:
    override = """\
        groups:
          - name: mine
            rules:
              - name: HighTTFT
                type: HIGH_LATENCY
                quantity: ttft_seconds_p99
                op: ">"
                thresholds: {HIGH: 0.5}
                recommendation: r
        """
    path = write(tmp_path, override)
    ruleset = load_rules([tmp_path])
    assert set(ruleset.names) == BUILTIN_NAMES
    mine = ruleset.get("HighTTFT")
    assert mine is not None and not mine.builtin and mine.file == path
    assert mine.replaces == BUILTIN_RULES_DIR / "latency.yaml"
    assert mine.rule.thresholds == {Severity.HIGH: 0.5}


def test_missing_path(tmp_path: Path) -> None:
    problem = only(tmp_path / "nope")
    assert problem.message == "no such file or directory"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("1h30m", timedelta(minutes=90)),
        ("0", timedelta(0)),
        ("250ms", timedelta(milliseconds=250)),
        ("1d", timedelta(days=1)),
    ],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected
    assert parse_duration(format_duration(expected)) == expected


@pytest.mark.parametrize("text", ["", "5", "1.5m", "m", "5 m", "-1s", "1m1h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match=r"bad duration|expected a duration"):
        parse_duration(text)


def test_trend_thresholds_and_conditions(tmp_path: Path) -> None:
    """A slope is the quantity's unit per second, of either sign; a condition inherits the rule's
    reduction (and `ahead`) and is checked with it."""
    path = write(
        tmp_path,
        """\
        groups:
          - name: g
            rules:
              - name: Falling
                type: LOW_THROUGHPUT
                quantity: generation_tokens_per_second
                op: "<"
                over: 5m
                reduce: slope
                thresholds: {LOW: -1, HIGH: -10}
                and:
                  - {quantity: requests_waiting, op: ">", value: -0.5}
                recommendation: r
              - name: Projected
                type: MEMORY_PRESSURE
                quantity: kv_cache_usage
                op: ">="
                over: 10m
                reduce: mean
                thresholds: {LOW: 0.5}
                and:
                  - {quantity: kv_cache_usage, op: ">=", value: 1, reduce: predict}
                ahead: 10m
                recommendation: r
        """,
    )
    ruleset = load_rules([path], builtin=False)
    falling, projected = ruleset.rules
    assert falling.rule.reduce is Reduce.SLOPE and falling.rule.ladder()[0] == (Severity.HIGH, -10)
    assert falling.rule.ahead_of() is None
    (condition,) = projected.rule.and_
    assert projected.rule.ahead_of() is None and projected.rule.ahead_of(condition) == timedelta(minutes=10)


def test_subdirectories_are_not_read(tmp_path: Path) -> None:
    """`rules/tests/` (rule unit tests) and `rules/slos/` (SLO files) sit under a rules directory:
    only the directory's own files are rule files."""
    write(tmp_path, GOOD_RULE)
    (tmp_path / "slos").mkdir()
    write(tmp_path / "slos", "slos: [{name: not a rule file}]\n", "availability.yaml")
    assert load_rules([tmp_path], builtin=False).names == ("Good",)
    assert all(p.parent == BUILTIN_RULES_DIR for p in load_rules().files)
