"""The command executor runs real scripts: argv built from the settings' template only, no shell,
exit codes, timeouts and the step key recorded."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from perfagent.errors import ConfigError
from perfagent.executors.base import Action, Executor, StepOutcome, rerun_safe
from perfagent.executors.command import TAIL_BYTES, CommandExecutor
from perfagent.executors.config import CommandConfig
from perfagent.models import EngineName, Instance, InstanceSource
from perfagent.settings import Settings, load_settings

RECORDER = """
import json, os, sys
with open(sys.argv[1], "a") as out:
    out.write(json.dumps({"argv": sys.argv[2:], "key": os.environ.get("PERFAGENT_STEP_KEY")}) + "\\n")
print("restarted", sys.argv[2])
"""


def _instance(**labels: str) -> Instance:
    return Instance(
        id="vllm-a",
        engine=EngineName.VLLM,
        metrics_url="http://127.0.0.1:8000/metrics",
        labels=labels,
        source=InstanceSource.CONFIG,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


def _action(settings: dict[str, Any], **labels: str) -> Action:
    return Action(key="wf-1/canary/0/vllm-a", instance=_instance(**labels), settings=settings)


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


def _calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def recorder(tmp_path: Path) -> Callable[..., tuple[CommandExecutor, Path]]:
    def build(*args: str, **config: Any) -> tuple[CommandExecutor, Path]:
        log = tmp_path / "calls.jsonl"
        script = _script(tmp_path, "restart.py", RECORDER)
        argv = [sys.executable, str(script), str(log), *args]
        return CommandExecutor(CommandConfig(argv=argv, **config)), log

    return build


async def test_placeholders_expand_per_argument(
    recorder: Callable[..., tuple[CommandExecutor, Path]],
) -> None:
    executor, log = recorder(
        "{instance_id}",
        "--engine={engine}",
        "{metrics_url}",
        "{label:deployment_group}",
        "{flags}",
        "{settings_json}",
        "key={step_key}",
    )
    settings = {"max_num_seqs": 128, "enable_prefix_caching": False, "gpu_memory_utilization": 0.95}
    record = await executor.apply(_action(settings, deployment_group="chat"))
    assert record.outcome is StepOutcome.APPLIED, record.message
    [call] = _calls(log)
    assert call["argv"] == [
        "vllm-a",
        "--engine=vllm",
        "http://127.0.0.1:8000/metrics",
        "chat",
        "--max-num-seqs",
        "128",
        "--no-enable-prefix-caching",
        "--gpu-memory-utilization",
        "0.95",
        json.dumps(settings, sort_keys=True),
        "key=wf-1/canary/0/vllm-a",
    ]
    assert call["key"] == "wf-1/canary/0/vllm-a"  # PERFAGENT_STEP_KEY
    assert record.ran["argv"][-1] == "key=wf-1/canary/0/vllm-a"
    assert record.ran["env"]["PERFAGENT_STEP_KEY"] == "wf-1/canary/0/vllm-a"
    assert record.returned["exit_code"] == 0
    assert record.returned["stdout_tail"] == "restarted vllm-a\n"
    assert record.returned["timed_out"] is False


async def test_values_reach_the_script_verbatim_never_through_a_shell(
    tmp_path: Path, recorder: Callable[..., tuple[CommandExecutor, Path]]
) -> None:
    executor, log = recorder("{flags}")
    marker = tmp_path / "pwned"
    hostile = f"$(touch {marker}); `touch {marker}` {{metrics_url}} {{label:x}}"
    record = await executor.apply(_action({"kv_cache_dtype": hostile}))
    assert record.outcome is StepOutcome.APPLIED, record.message
    assert _calls(log)[0]["argv"] == ["--kv-cache-dtype", hostile]  # one argument, placeholders left alone
    assert not marker.exists()


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"max_num_seqs": "--model=/etc/passwd"}, "starts with '-'"),
        ({"Max-Num-Seqs": 1}, "snake_case"),
        ({"max_num_seqs": [1, 2]}, "string, number"),
        ({"kv_cache_dtype": "fp8\n--evil"}, "control character"),
    ],
)
async def test_values_that_could_inject_options_are_refused(
    recorder: Callable[..., tuple[CommandExecutor, Path]], settings: dict[str, Any], problem: str
) -> None:
    executor, log = recorder("{flags}")
    record = await executor.apply(_action(settings))
    assert record.outcome is StepOutcome.FAILED
    assert problem in record.message
    assert not _calls(log)  # nothing ran


async def test_a_missing_label_fails_before_running(
    recorder: Callable[..., tuple[CommandExecutor, Path]],
) -> None:
    executor, log = recorder("{label:pod}")
    record = await executor.apply(_action({"max_num_seqs": 64}))
    assert record.outcome is StepOutcome.FAILED
    assert "no label 'pod'" in record.message
    assert not _calls(log)


async def test_a_failing_script_is_failed_with_its_output(tmp_path: Path) -> None:
    noisy = "x" * (2 * TAIL_BYTES)
    script = _script(
        tmp_path,
        "fail.py",
        f"import sys\nprint({noisy!r})\nprint('cannot restart', file=sys.stderr)\nsys.exit(3)\n",
    )
    executor = CommandExecutor(CommandConfig(argv=[sys.executable, str(script)]))
    record = await executor.apply(_action({"max_num_seqs": 64}))
    assert record.outcome is StepOutcome.FAILED
    assert record.returned["exit_code"] == 3
    assert "exited with code 3" in record.message
    assert record.returned["stderr_tail"] == "cannot restart\n"
    assert len(record.returned["stdout_tail"]) == TAIL_BYTES  # only the tail is kept


async def test_a_hanging_script_is_killed_at_the_timeout(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    # The script starts a child of its own, as restart scripts do; the whole group must die.
    script = _script(
        tmp_path,
        "hang.py",
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n",
    )
    executor = CommandExecutor(CommandConfig(argv=[sys.executable, str(script)], timeout_seconds=1.5))
    started = time.monotonic()
    record = await executor.apply(_action({"max_num_seqs": 64}))
    assert time.monotonic() - started < 10
    assert record.outcome is StepOutcome.FAILED
    assert record.returned["timed_out"] is True
    assert "timeout" in record.message
    assert record.returned["stdout_tail"] == "started\n"
    child = int(pid_file.read_text())
    assert await asyncio.to_thread(_reaped, child)


def _reaped(pid: int) -> bool:
    """Whether `pid` is gone (or a zombie waiting for init): SIGKILL is delivered asynchronously."""
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists() or "Z" in _state(pid):
            return True
        time.sleep(0.05)
    return False


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except OSError:
        return "Z"


async def test_a_daemonizing_script_does_not_hold_the_step(tmp_path: Path) -> None:
    """A restart script that leaves the engine running in the background returns at once."""
    script = _script(
        tmp_path,
        "daemon.py",
        "import subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(5)'])\n"
        "print('engine started')\n",
    )
    executor = CommandExecutor(CommandConfig(argv=[sys.executable, str(script)], timeout_seconds=30))
    started = time.monotonic()
    record = await executor.apply(_action({"max_num_seqs": 64}))
    assert record.outcome is StepOutcome.APPLIED
    assert time.monotonic() - started < 4
    assert record.returned["stdout_tail"] == "engine started\n"


async def test_a_missing_program_is_failed(tmp_path: Path) -> None:
    executor = CommandExecutor(CommandConfig(argv=[str(tmp_path / "no-such-script")]))
    record = await executor.apply(_action({"max_num_seqs": 64}))
    assert record.outcome is StepOutcome.FAILED
    assert "cannot run" in record.message


def test_the_template_comes_from_settings_only(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """The executor is built from Settings (config file or environment); an Action has no field that
    could carry a template, and a settings value is never expanded as one (see the verbatim test)."""
    assert "argv" not in Action.__dataclass_fields__
    with pytest.raises(ConfigError, match=r"executors\.command"):
        CommandExecutor.from_settings(make_settings())
    config = tmp_path / "perfagent.yaml"
    config.write_text(
        "executors:\n  command:\n    argv: [/opt/restart.sh, '{instance_id}', '{flags}']\n    timeout_seconds: 90\n"
    )
    executor = CommandExecutor.from_settings(load_settings(config_file=config, db_path=tmp_path / "d.duckdb"))
    assert executor.config.argv == ["/opt/restart.sh", "{instance_id}", "{flags}"]
    assert executor.config.timeout_seconds == 90
    assert executor.idempotent is False  # a re-run after a crash needs the operator's word
    assert not rerun_safe(executor)
    protocol: Executor = executor  # mypy checks it implements the protocol
    assert protocol.name == "command"


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["/bin/restart", "{nonsense}"], "unknown placeholder"),
        (["/bin/restart", "--flags={flags}"], "whole argument"),
        (["{instance_id}"], "argv[0]"),
        ([], "at least 1"),
    ],
)
def test_bad_templates_stop_start_up(tmp_path: Path, argv: list[str], problem: str) -> None:
    with pytest.raises(ConfigError, match=r"executors\.command\.argv") as info:
        load_settings(executors={"command": {"argv": argv}}, db_path=tmp_path / "d.duckdb")
    assert problem in str(info.value)
