"""The dry_run executor writes the change down exactly: CLI flags, and a strategic-merge patch whose
`args` is the container's complete new list (args has no merge key, so a patch replaces it whole)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from perfagent.engine_args import args_with, flag_args, unset_flags
from perfagent.executors.base import Action, StepOutcome, rerun_safe
from perfagent.executors.dry_run import DryRunExecutor
from perfagent.models import EngineName, Instance, InstanceSource


def instance(engine: str = "vllm", **labels: str) -> Instance:
    return Instance(
        id="vllm-1",
        engine=EngineName(engine),
        metrics_url="http://127.0.0.1:8000/metrics",
        labels=labels,
        source=InstanceSource.CONFIG,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


@pytest.mark.parametrize(
    ("args", "settings", "expected"),
    [
        # A value after the flag, `=` spelling, underscores: each replaced, other args untouched.
        (
            ["--model", "m", "--max-num-seqs", "256", "--port", "8000"],
            {"max_num_seqs": 128},
            ["--model", "m", "--port", "8000", "--max-num-seqs", "128"],
        ),
        (
            ["--max-num-seqs=256", "--model", "m"],
            {"max_num_seqs": 128},
            ["--model", "m", "--max-num-seqs", "128"],
        ),
        (["--max_num_seqs", "256"], {"max_num_seqs": 128}, ["--max-num-seqs", "128"]),
        # Booleans take no value; their negation is the same flag.
        (
            ["--no-enable-prefix-caching", "--model", "m"],
            {"enable_prefix_caching": True},
            ["--model", "m", "--enable-prefix-caching"],
        ),
        (["--enable-prefix-caching"], {"enable_prefix_caching": False}, ["--no-enable-prefix-caching"]),
        # None: back to the engine default, which on a command line is the flag's absence.
        (["--kv-cache-dtype", "fp8", "--model", "m"], {"kv_cache_dtype": None}, ["--model", "m"]),
        # A JSON flag is one argument.
        (
            [],
            {"speculative_config": {"method": "ngram", "num_speculative_tokens": 4}},
            ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4}'],
        ),
    ],
)
def test_args_with_replaces_flags_in_any_spelling(
    args: list[str], settings: dict[str, Any], expected: list[str]
) -> None:
    assert args_with("vllm", args, settings) == expected


def test_flags_and_unset() -> None:
    settings = {"max_num_seqs": 128, "gpu_memory_utilization": 0.92, "kv_cache_dtype": None}
    assert flag_args("vllm", settings) == ["--max-num-seqs", "128", "--gpu-memory-utilization", "0.92"]
    assert unset_flags("vllm", settings) == ["--kv-cache-dtype"]


async def test_record_holds_exact_flags_and_a_complete_patch() -> None:
    action = Action(
        key="wf-1/CANARY/0/vllm-1",
        instance=instance(container="engine"),
        settings={"max_num_seqs": 128},
        previous={"max_num_seqs": 256},
        current_args=("--model", "meta-llama/Llama-3.1-8B-Instruct", "--max-num-seqs", "256"),
    )
    record = await DryRunExecutor().apply(action)
    assert record.outcome is StepOutcome.WAITING
    assert record.ran["cli_args"] == ["--max-num-seqs", "128"]
    assert record.ran["args_complete"] is True
    assert record.ran["patch_type"] == "strategic"
    assert record.ran["kubernetes_patch"] == {
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "engine",
                            "args": ["--model", "meta-llama/Llama-3.1-8B-Instruct", "--max-num-seqs", "128"],
                        }
                    ]
                }
            }
        }
    }
    assert record.returned == {}
    assert "confirm" in record.message


async def test_without_current_args_the_patch_says_it_is_partial() -> None:
    action = Action(key="k", instance=instance("sglang"), settings={"schedule_conservativeness": 0.3})
    record = await DryRunExecutor().apply(action)
    assert record.ran["cli_args"] == ["--schedule-conservativeness", "0.3"]
    assert record.ran["args_complete"] is False
    containers = record.ran["kubernetes_patch"]["spec"]["template"]["spec"]["containers"]
    assert containers == [{"name": "sglang", "args": ["--schedule-conservativeness", "0.3"]}]
    assert "current_args" in record.message


async def test_idempotent_by_key() -> None:
    """A step in doubt after a crash may run again: the same action renders the same record."""
    executor = DryRunExecutor()
    action = Action(
        key="k", instance=instance(), settings={"max_num_seqs": 64}, current_args=("--max-num-seqs", "256")
    )
    assert (await executor.apply(action)).as_dict() == (await executor.apply(action)).as_dict()
    assert rerun_safe(executor)
