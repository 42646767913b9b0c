"""Engine settings as command-line arguments: render them as flags, and set them in a container's
full argument list.

Settings use the real flag keys (`max_num_seqs`); a value of None means "unset, back to the
engine's default", which on a command line is the flag's absence.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from perfagent.optimization_spec import EngineOptimizations, cli_name, config_key, load_engine_optimizations


def _spelling(spec: EngineOptimizations, token: str) -> str | None:
    """The flag key a `--flag`, `--flag=value` or `--no-flag` token sets, if it is a documented one."""
    name = token.partition("=")[0]
    key = config_key(name)
    if key in spec.flags:
        return key
    return next((k for k, flag in spec.flags.items() if flag.negation == name), None)


def _value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, dict | list) else str(value)


def flag_args(engine: str, settings: Mapping[str, Any]) -> list[str]:
    """Arguments that set every non-None value, e.g. ["--max-num-seqs", "128"]. A false boolean is
    its negation (`--no-enable-prefix-caching`), or nothing for a flag that has none."""
    spec = load_engine_optimizations(engine)
    args: list[str] = []
    for key, value in settings.items():
        if value is None:
            continue
        flag = spec.flags.get(key)
        if isinstance(value, bool) or (flag is not None and flag.type == "bool"):
            if value:
                args.append(cli_name(key))
            elif flag is not None and flag.negation:
                args.append(flag.negation)
            continue
        args += [cli_name(key), _value(value)]
    return args


def unset_flags(engine: str, settings: Mapping[str, Any]) -> list[str]:
    """Flags that go back to the engine default by being absent from the command line."""
    spec = load_engine_optimizations(engine)
    out = []
    for key, value in settings.items():
        flag = spec.flags.get(key)
        if value is None or (value is False and (flag is None or not flag.negation)):
            out.append(cli_name(key))
    return out


def args_with(engine: str, args: Sequence[str], settings: Mapping[str, Any]) -> list[str]:
    """`args` with every flag of `settings` removed, in any spelling (`--x v`, `--x=v`, `--no-x`),
    and the new values appended; arguments that are no documented flag (`--model ...`) stay as they are."""
    spec = load_engine_optimizations(engine)
    kept: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        key = _spelling(spec, token) if token.startswith("--") else None
        if key is None or key not in settings:
            kept.append(token)
            i += 1
            continue
        takes_value = "=" not in token and spec.flags[key].type != "bool"
        has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
        i += 2 if takes_value and has_value else 1
    return kept + flag_args(engine, settings)
