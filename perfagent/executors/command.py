"""The command executor: run the operator's script (e.g. a restart script) once per instance and step.

The argument list comes from `executors.command.argv` in the agent's settings only; an `Action` carries
values, never a template. It is run with no shell: placeholders are replaced inside single arguments,
`{flags}` becomes one argument per CLI token, and a substituted value is never expanded again. So a
setting value such as `$(reboot)` or `{metrics_url}` reaches the script as that literal text.

Placeholders: `{instance_id}`, `{engine}`, `{metrics_url}`, `{label:NAME}` (an instance label; a missing
label fails the step before anything runs), `{flags}` (e.g. `--max-num-seqs 128 --enable-prefix-caching`),
`{settings_json}` (the settings as one JSON object), `{step_key}`.

Idempotency: the step key is given as `{step_key}` and in the environment as `PERFAGENT_STEP_KEY`, so a
script can recognise a step it already did. The workflow engine never re-runs a command step whose
completion it recorded. A step cut off before its record was stored (the agent died mid-run) is run
again, with the same key, only when `executors.command.idempotent` says the script honours the key;
otherwise the workflow waits for a person.

Outcome: exit code 0 is APPLIED; any other exit code, a program that cannot be started, or the timeout
(the whole process group is killed) is FAILED. The record keeps the argv, the exit code and the last
4 kB of stdout and stderr. Output goes to temporary files, not pipes: a restart script that leaves the
engine running in the background (holding the pipes) must not keep the step waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import tempfile
import time
from collections.abc import Mapping
from typing import IO, Any, ClassVar

from perfagent.engine_args import flag_args
from perfagent.errors import ConfigError
from perfagent.executors.base import Action, StepOutcome, StepRecord
from perfagent.executors.config import FLAGS, PLACEHOLDER, CommandConfig
from perfagent.settings import Settings

TAIL_BYTES = 4096
STEP_KEY_ENV = "PERFAGENT_STEP_KEY"
INSTANCE_ENV = "PERFAGENT_INSTANCE_ID"
_FLAG_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_KILL_GRACE_S = 5.0


class StepRefused(Exception):
    """The step cannot be turned into a command; nothing was run."""


def check_settings(settings: Mapping[str, Any]) -> None:
    """Refuse values that could smuggle extra options into a script's argv.

    Flags must be snake_case names and values scalars (null: back to the engine default, left out of
    `{flags}`); a string must not start with `-` (it would read as an option) nor hold a newline or NUL.
    """
    for name, value in settings.items():
        if not _FLAG_NAME.match(name):
            raise StepRefused(f"setting name {name!r} is not a snake_case engine flag")
        if isinstance(value, str):
            if value.startswith("-") or any(ch in value for ch in "\n\r\0"):
                raise StepRefused(f"value of {name} ({value!r}) starts with '-' or holds a control character")
        elif value is not None and not isinstance(value, bool | int | float):
            raise StepRefused(f"value of {name} must be a string, number, boolean or null, not {value!r}")


def expand(argv: list[str], action: Action) -> list[str]:
    """The template with the action's values put in; raises StepRefused for a missing label."""
    instance = action.instance
    values = {
        "instance_id": instance.id,
        "engine": instance.engine.value,
        "metrics_url": instance.metrics_url,
        "settings_json": json.dumps(dict(action.settings), sort_keys=True),
        "step_key": action.key,
    }

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name.startswith("label:"):
            label = name.removeprefix("label:")
            if label not in instance.labels:
                raise StepRefused(f"instance {instance.id} has no label {label!r} ({match.group(0)} in argv)")
            return instance.labels[label]
        return values[name]

    out: list[str] = []
    for arg in argv:
        if arg == FLAGS:
            out += flag_args(instance.engine.value, action.settings)
        else:
            out.append(PLACEHOLDER.sub(replace, arg))  # one pass: substituted text is not rescanned
    return out


def _tail(file: IO[bytes]) -> str:
    file.seek(0, os.SEEK_END)
    size = file.tell()
    file.seek(max(0, size - TAIL_BYTES))
    return file.read().decode("utf-8", errors="replace")


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class CommandExecutor:
    """Runs `executors.command.argv` for each step, with no shell."""

    name: ClassVar[str] = "command"

    def __init__(self, config: CommandConfig) -> None:
        self.config = config
        self.idempotent = config.idempotent  # read by `rerun_safe`: only the operator can vouch for it

    @classmethod
    def from_settings(cls, settings: Settings) -> CommandExecutor:
        if settings.executors.command is None:
            raise ConfigError("the command executor needs executors.command.argv in the config file")
        return cls(settings.executors.command)

    async def apply(self, action: Action) -> StepRecord:
        timeout = self.config.timeout_seconds
        try:
            check_settings(action.settings)
            argv = expand(self.config.argv, action)
        except StepRefused as exc:
            return StepRecord(StepOutcome.FAILED, {"argv_template": list(self.config.argv)}, {}, str(exc))
        env = {**os.environ, STEP_KEY_ENV: action.key, INSTANCE_ENV: action.instance.id}
        ran: dict[str, Any] = {
            "argv": argv,
            "env": {STEP_KEY_ENV: action.key, INSTANCE_ENV: action.instance.id},
            "timeout_seconds": timeout,
        }
        started = time.monotonic()
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    env=env,
                    start_new_session=True,  # its own process group, so a timeout kills its children too
                )
            except OSError as exc:
                return StepRecord(
                    StepOutcome.FAILED,
                    ran,
                    {"error": str(exc)},
                    f"cannot run {argv[0]}: {exc.strerror or exc}",
                )
            timed_out, code = False, None
            try:
                async with asyncio.timeout(timeout):
                    code = await proc.wait()
            except TimeoutError:
                timed_out = True
                _kill_group(proc.pid)
                with contextlib.suppress(TimeoutError):  # SIGKILL cannot be refused; this is a backstop
                    async with asyncio.timeout(_KILL_GRACE_S):
                        code = await proc.wait()
            finally:
                if proc.returncode is None:  # cancelled: leave nothing running behind the workflow
                    _kill_group(proc.pid)
            returned = {
                "exit_code": code,
                "timed_out": timed_out,
                "duration_seconds": round(time.monotonic() - started, 3),
                "stdout_tail": _tail(out),
                "stderr_tail": _tail(err),
            }
        if timed_out:
            return StepRecord(StepOutcome.FAILED, ran, returned, f"killed after {timeout:g} s (timeout)")
        if code != 0:
            return StepRecord(StepOutcome.FAILED, ran, returned, f"{argv[0]} exited with code {code}")
        return StepRecord(StepOutcome.APPLIED, ran, returned, "")
