"""Rule unit tests (`perfagent rules test`) and `perfagent rules check`."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import pytest

from perfagent import rules_cli
from perfagent.rules import BUILTIN_RULES_DIR
from perfagent.ruletest import expand_series, run_test_file

BUILTIN_TESTS = sorted((BUILTIN_RULES_DIR / "tests").glob("*.yaml"))

QUEUE_TEST = """\
rule_files: [{rules}]
tests:
  - name: queue
    interval: 15s
    input_series:
      - instance: vllm-0
        engine: vllm
        values:
          requests_waiting: "0x3 8x15 30x7 0x12"
    expect:
      - at: 3m45s
        firing:
          - {{ instance: vllm-0, rule: QueueBuildup, type: QUEUE_BUILDUP, severity: {severity} }}
      - at: 5m45s
        firing: []
"""


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="perfagent")
    rules_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return rules_cli.run(parser.parse_args(argv))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_the_builtin_rules_have_tests() -> None:
    tested = {p.stem for p in BUILTIN_TESTS}
    assert tested == {p.stem for p in BUILTIN_RULES_DIR.glob("*.yaml")}


@pytest.mark.parametrize("path", BUILTIN_TESTS, ids=lambda p: p.name)
def test_builtin_rule_tests_pass(path: Path) -> None:
    outcome = run_test_file(path)
    assert not outcome.errors, outcome.errors
    assert outcome.tests, "no tests in file"
    assert outcome.passed, "\n".join(f for t in outcome.tests for f in t.failures)


def test_a_wrong_expectation_fails_readably(tmp_path: Path) -> None:
    rules = BUILTIN_RULES_DIR / "queue.yaml"
    path = write(tmp_path / "t.yaml", QUEUE_TEST.format(rules=rules, severity="HIGH"))
    outcome = run_test_file(path)
    assert not outcome.passed and not outcome.errors
    (test,) = outcome.tests
    assert test.failures == (
        f"{path}:11: test 'queue': at 3m45s:\n"
        "  firing, but not as expected:\n"
        "    instance=vllm-0 rule=QueueBuildup type=QUEUE_BUILDUP severity=HIGH\n"
        "      got type=QUEUE_BUILDUP severity=MEDIUM",
        f"{path}:14: test 'queue': at 5m45s:\n"
        "  firing, but not expected:\n"
        "    instance=vllm-0 rule=QueueBuildup type=QUEUE_BUILDUP severity=HIGH",
    )
    assert cli("rules", "test", str(path)) == 1


def test_a_missing_finding_is_named(tmp_path: Path) -> None:
    text = QUEUE_TEST.format(rules=BUILTIN_RULES_DIR / "queue.yaml", severity="MEDIUM").replace(
        'requests_waiting: "0x3 8x15 30x7 0x12"', 'requests_waiting: "0x40"'
    )
    (test,) = run_test_file(write(tmp_path / "t.yaml", text)).tests
    assert "expected, but not firing:\n    instance=vllm-0 rule=QueueBuildup" in test.failures[0]


def test_bad_test_files_name_the_line(tmp_path: Path) -> None:
    text = QUEUE_TEST.format(rules=BUILTIN_RULES_DIR / "queue.yaml", severity="MEDIUM")
    typo = write(tmp_path / "a.yaml", text.replace("input_series", "input_serie"))
    outcome = run_test_file(typo)
    assert (
        f"{typo}:5: test 'queue': unknown field 'input_serie' (did you mean 'input_series'?)"
        in outcome.errors
    )

    off_grid = write(tmp_path / "b.yaml", text.replace("at: 3m45s", "at: 3m40s"))
    (test,) = run_test_file(off_grid).tests
    assert test.failures == (f"{off_grid}:11: test 'queue': at 3m40s is not a multiple of the interval 15s",)

    notation = write(tmp_path / "c.yaml", text.replace("0x3 8x15", "0x3 8y15"))
    (error,) = run_test_file(notation).errors
    assert error.startswith(
        f"{notation}:9: test 'queue': input_series.0.values.requests_waiting: bad series token"
    )

    bad_rules = write(
        tmp_path / "d.yaml", text.replace(str(BUILTIN_RULES_DIR / "queue.yaml"), "missing.yaml")
    )
    assert run_test_file(bad_rules).errors == (f"{tmp_path / 'missing.yaml'}:1: no such file or directory",)


@pytest.mark.parametrize(
    ("notation", "values"),
    [
        ("1 2 3", [1.0, 2.0, 3.0]),
        ("-2+4x3", [-2.0, 2.0, 6.0, 10.0]),
        ("1-2x4", [1.0, -1.0, -3.0, -5.0, -7.0]),
        ("1x4", [1.0] * 5),
        ("1 _x3 stale", [1.0, None, None, None, None]),
        ("0.5+0.1x3", [0.5, 0.6, 0.7, 0.8]),
        ("_ 1e3", [None, 1000.0]),
    ],
)
def test_expanding_notation(notation: str, values: list[float | None]) -> None:
    assert expand_series(notation) == values


def test_explicit_lists() -> None:
    assert expand_series([1, None, 2.5]) == [1.0, None, 2.5]


def test_check_accepts_the_builtin_rules(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("rules", "check", str(BUILTIN_RULES_DIR)) == 0
    assert capsys.readouterr().out.startswith("OK: 9 rule(s) in 5 file(s)")


def test_check_reports_an_override(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (BUILTIN_RULES_DIR / "latency.yaml").read_text(encoding="utf-8").replace("MEDIUM: 2", "MEDIUM: 1")
    path = write(tmp_path / "latency.yaml", text)
    assert cli("rules", "check", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK: 2 rule(s) in 1 file(s)")
    assert (
        f"{path}:8: rule 'HighTTFT' replaces the built-in rule in {BUILTIN_RULES_DIR / 'latency.yaml'}" in out
    )


def test_check_fails_on_a_bad_directory_naming_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(
        tmp_path / "bad.yaml",
        """\
        groups:
          - name: g
            rules:
              - name: Broken
                type: MEMORY_PRESSURE
                quantity: kv_cache_usage
                op: ">"
                thresholds: {HIGH: 95}
                recommendation: r
        """,
    )
    assert cli("rules", "check", str(tmp_path)) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        f"{tmp_path / 'bad.yaml'}:8: rule 'Broken': thresholds.HIGH: 95.0 is outside 0-1, the unit of "
        "'kv_cache_usage' (ratio): write 0.9, not 90"
    )
    assert err[-1] == "FAILED: 1 problem(s)"


def test_check_validates_the_slos_of_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(
        tmp_path / "slos" / "ttft.yaml",
        """\
        slos:
          - name: my-ttft
            engines: [vllm]
            histogram: ttft_seconds
            threshold: 2
            objective: 0.95
        """,
    )
    assert cli("rules", "check", str(tmp_path)) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"{tmp_path / 'slos' / 'ttft.yaml'}:")
    assert "slo 'my-ttft'" in err[0] and "bucket edge" in err[0]
    assert err[-1] == "FAILED: 1 problem(s)"


def test_check_accepts_a_valid_slo_file_named_directly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path / "slos" / "ttft.yaml",
        """\
        slos:
          - name: my-ttft
            engines: [vllm]
            histogram: ttft_seconds
            threshold: 2.5
            objective: 0.99
        """,
    )
    assert cli("rules", "check", str(path)) == 0
    assert "OK: 1 SLO(s) in 1 file(s)" in capsys.readouterr().out


def test_test_command_runs_the_builtin_tests(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("rules", "test", *map(str, BUILTIN_TESTS)) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("OK: ")
