"""What an optimization measurably did before: the stored verdicts of past workflows, summarised per
optimization beside the recommender's prior (`estimated_improvement`).

Every judged batch with the judge's statistics counts: changed instances against unchanged peers
over the same window, or (the last batch, a group of one) against their own history just before.
Batches a person judged without statistics count in `passed`/`failed` only. Comparable instances run the same engine (optimization ids are per engine) and, when the asking
instance has a `model` label, the same model; with no verdict on that model, the engine's verdicts
are shown and `scope` says so.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence

from perfagent.recommend_models import Observed
from perfagent.workflow_models import Verdict
from perfagent.workflow_store import VerdictRow


def _summary(rows: Sequence[VerdictRow], scope: str) -> Observed:
    changes: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if row.verdict.statistics is None:
            continue
        for metric in row.verdict.statistics.metrics:
            if metric.relative_change is not None:
                changes[metric.name].append(metric.relative_change)
    return Observed(
        scope=scope,
        workflows=len({r.workflow_id for r in rows}),
        canaries=sum(1 for r in rows if r.verdict.batch == 0),
        batches=len(rows),
        passed=sum(1 for r in rows if r.verdict.verdict is Verdict.PASS),
        failed=sum(1 for r in rows if r.verdict.verdict is Verdict.FAIL),
        median_relative_change={k: round(statistics.median(v), 4) for k, v in sorted(changes.items())},
        last_at=max(r.verdict.decided_at for r in rows),
    )


def observed_effects(rows: Iterable[VerdictRow], engine: str, model: str | None) -> dict[str, Observed]:
    """Per optimization id, what its controlled verdicts on comparable instances showed."""
    by_id: dict[str, list[VerdictRow]] = defaultdict(list)
    for row in rows:
        by_id[row.optimization_id].append(row)
    out: dict[str, Observed] = {}
    for optimization_id, found in by_id.items():
        same_model = [r for r in found if model is not None and r.model == model]
        if same_model:
            out[optimization_id] = _summary(same_model, f"model {model}")
        else:
            out[optimization_id] = _summary(found, f"engine {engine}")
    return out
