"""`perfagent rules check PATH…` and `perfagent rules test FILE…`: validate rule files, run rule tests.

`check` validates rule files or directories (with the built-in rules underneath, so it also reports
which built-in rules a file replaces), and the SLO files of a directory's `slos/` (or an SLO file or
directory named directly); `test` runs rule unit tests (see `perfagent.ruletest`). Both
exit 0 on success and 1 otherwise, printing one `file:line: …` line per problem on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from perfagent.rules import BUILTIN_RULES_DIR, RuleFileError, load_rules
from perfagent.ruletest import run_test_file
from perfagent.slo import SLO_DIR_NAME, SloFileError, load_slos


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("rules", help="check rule files and run rule unit tests")
    actions = parser.add_subparsers(dest="rules_command", required=True)
    check = actions.add_parser("check", help="validate rule files or directories of them")
    check.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="a rule file or a directory")
    test = actions.add_parser("test", help="run rule unit tests (promtool-style test files)")
    test.add_argument("files", nargs="+", type=Path, metavar="FILE", help="a rule test file")


def _is_builtin(path: Path) -> bool:
    try:
        return path.resolve() == BUILTIN_RULES_DIR.resolve()
    except OSError:
        return False


def _is_slo_path(path: Path) -> bool:
    """An SLO directory (`…/slos`) or a file in one: SLOs have their own loader and format."""
    return path.name == SLO_DIR_NAME or path.parent.name == SLO_DIR_NAME


def _check(paths: Sequence[Path]) -> int:
    user = [p for p in paths if not _is_builtin(p)]
    rule_paths = [p for p in user if not _is_slo_path(p)]
    slo_paths = [p for p in user if _is_slo_path(p)]
    slo_paths += [p / SLO_DIR_NAME for p in rule_paths if (p / SLO_DIR_NAME).is_dir()]
    problems: list[str] = []
    try:
        ruleset = load_rules(rule_paths)
    except RuleFileError as exc:
        problems += [str(p) for p in exc.problems]
    try:
        sloset = load_slos(slo_paths)
    except SloFileError as exc:
        problems += [str(p) for p in exc.problems]
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"FAILED: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    checked = [r for r in ruleset if not r.builtin] if rule_paths else list(ruleset)
    files = {r.file for r in checked}
    print(f"OK: {len(checked)} rule(s) in {len(files)} file(s)")
    for r in checked:
        if r.replaces is not None:
            print(f"  {r.file}:{r.line}: rule '{r.name}' replaces the built-in rule in {r.replaces}")
    slos = [s for s in sloset if not s.builtin] if user else list(sloset)
    if slos or not user:
        print(f"OK: {len(slos)} SLO(s) in {len({s.file for s in slos})} file(s)")
    return 0


def _test(files: Sequence[Path]) -> int:
    passed = failed = 0
    for path in files:
        outcome = run_test_file(path)
        for error in outcome.errors:
            print(error, file=sys.stderr)
        failed += bool(outcome.errors)
        for test in outcome.tests:
            if test.passed:
                passed += 1
                print(f"  ok    {path}: {test.name}")
                continue
            failed += 1
            print(f"  FAIL  {path}: {test.name}")
            for failure in test.failures:
                print(failure)
    status = "OK" if not failed else "FAILED"
    print(f"{status}: {passed} passed, {failed} failed")
    return 0 if not failed else 1


def run(args: argparse.Namespace) -> int:
    if args.rules_command == "check":
        return _check(args.paths)
    if args.rules_command == "test":
        return _test(args.files)
    return 2  # argparse rejects unknown sub-commands before this


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point (`python -m perfagent.rules_cli`), until `perfagent rules` is wired."""
    parser = argparse.ArgumentParser(prog="perfagent")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
