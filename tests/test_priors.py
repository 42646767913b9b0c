"""Observed effects from stored verdicts: per optimization, what its judged batches showed, on the
same model when there are verdicts on it, else on the engine."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from perfagent.judge import DEFAULT_METRICS, judge
from perfagent.priors import observed_effects
from perfagent.workflow_models import BatchVerdict
from perfagent.workflow_store import VerdictRow

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def row(
    workflow: str, optimization: str, model: str | None, ttft_factor: float, batch: int = 0
) -> VerdictRow:
    """A verdict with real statistics: the changed side's TTFT `ttft_factor` times the baseline's."""
    base = [1.0 + 0.01 * i for i in range(20)]
    samples = {s.name: [100.0 + i for i in range(20)] for s in DEFAULT_METRICS}
    canary = {**samples, "ttft": [ttft_factor * v for v in base]}
    statistics = judge(canary, {**samples, "ttft": base})
    verdict = BatchVerdict(
        stage="CANARY" if batch == 0 else "ROLLOUT",
        batch=batch,
        instances=["a"],
        baseline=["b"],
        baseline_kind="unchanged",
        statistics=statistics,
        verdict="pass" if statistics.outcome == "pass" else "fail",
        decided_by="judge:statistical",
        decided_at=T0 + timedelta(minutes=batch),
    )
    return VerdictRow(workflow, optimization, model, verdict)


def test_per_optimization_medians_and_counts() -> None:
    rows = [
        row("wf-1", "vllm.kv-cache-fp8", None, 0.5),
        row("wf-1", "vllm.kv-cache-fp8", None, 0.7, batch=1),
        row("wf-2", "vllm.fewer-seqs-itl", None, 3.0),
    ]
    observed = observed_effects(rows, "vllm", None)
    fp8, fewer = observed["vllm.kv-cache-fp8"], observed["vllm.fewer-seqs-itl"]
    assert (fp8.workflows, fp8.canaries, fp8.batches, fp8.passed, fp8.failed) == (1, 1, 2, 2, 0)
    assert fp8.median_relative_change["ttft"] == -0.4  # the median of -50 % and -30 %
    assert fp8.last_at == T0 + timedelta(minutes=1) and fp8.scope == "engine vllm"
    assert (fewer.failed, fewer.median_relative_change["ttft"]) == (1, 2.0)


def test_the_same_model_first_else_the_engine() -> None:
    rows = [
        row("wf-1", "vllm.kv-cache-fp8", "llama-8b", 0.5),
        row("wf-2", "vllm.kv-cache-fp8", "qwen-0.5b", 3.0),
    ]
    assert observed_effects(rows, "vllm", "llama-8b")["vllm.kv-cache-fp8"].scope == "model llama-8b"
    assert observed_effects(rows, "vllm", "llama-8b")["vllm.kv-cache-fp8"].batches == 1
    other = observed_effects(rows, "vllm", "mistral-7b")["vllm.kv-cache-fp8"]
    assert (other.scope, other.batches) == ("engine vllm", 2)
