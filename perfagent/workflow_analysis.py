"""Detection for workflows: the analysis that opens one (findings over the instance's stored history,
then the recommender's plan) and the validation that closes it (the rules again, over the scrapes
taken since the change)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import polars as pl

from perfagent.demo import DemoFleet, SimDemo
from perfagent.detect import evaluate
from perfagent.detection import Detector, with_engines
from perfagent.errors import PerfAgentError
from perfagent.executors.sim import sim_endpoint
from perfagent.history import QUANTITY_COLUMNS, HistoryWriter
from perfagent.models import Instance
from perfagent.optimizer import Plan, plan
from perfagent.recommend_models import Addressed, Bottleneck, Optimization
from perfagent.scrape import Scraper
from perfagent.store import Store
from perfagent.workflow_models import InstanceValidation, Validation

GROUP_LABEL = "deployment_group"
_LATEST_WINDOW = timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class Analysis:
    bottlenecks: list[Bottleneck]
    plan: Plan
    insufficient: int  # rules that lacked data to decide


def deployment_group(instance: Instance) -> str | None:
    return instance.labels.get(GROUP_LABEL) or None


def group_members(instance: Instance, fleet: Iterable[Instance]) -> list[Instance]:
    """The instance first, then the others of its deployment group on the same engine, by id."""
    group = deployment_group(instance)
    if group is None:
        return [instance]
    peers = sorted(
        (
            i
            for i in fleet
            if i.id != instance.id and i.engine == instance.engine and deployment_group(i) == group
        ),
        key=lambda i: i.id,
    )
    return [instance, *peers]


def simulated_config(demo: DemoFleet | SimDemo | None, instance_id: str) -> dict[str, Any] | None:
    """A simulated instance's settings, which the simulator knows exactly (real flag keys)."""
    if not isinstance(demo, SimDemo) or instance_id not in demo.fleet.instances:
        return None
    settings = demo.fleet.instances[instance_id].settings.model_dump()
    return {k: v for k, v in settings.items() if v is not None}


async def simulator_settings(scraper: Scraper, instance: Instance) -> dict[str, Any] | None:
    """A simulated instance's settings as its simulator reports them (`GET <base>/instances/<id>`),
    for instances of a `perfagent sim` the agent watches; None for anything else."""
    endpoint = sim_endpoint(instance.metrics_url)
    if endpoint is None:
        return None
    try:
        view = json.loads((await scraper.fetch(endpoint.instance_url, field="sim_url")).text)
    except (PerfAgentError, ValueError):
        return None
    settings = view.get("settings") if isinstance(view, dict) else None
    if not isinstance(settings, dict) or view.get("simulated") is not True:
        return None
    return {k: v for k, v in settings.items() if v is not None}


async def _latest_quantities(store: Store, instance_id: str, now: datetime) -> dict[str, float | None]:
    """The newest stored value of each catalog quantity: the metrics the recommender's conditions read."""
    frame = await store.recent_scrapes(now - _LATEST_WINDOW, now, QUANTITY_COLUMNS, instance_id)
    latest: dict[str, float | None] = {}
    for row in frame.iter_rows(named=True):
        latest.update({k: v for k, v in row.items() if k in QUANTITY_COLUMNS and v is not None})
    return latest


async def analyse(
    store: Store,
    detector: Detector,
    history: HistoryWriter,
    instance: Instance,
    engines: Mapping[str, str],
    current_config: Mapping[str, Any] | None,
    now: datetime,
) -> Analysis:
    """Findings on `instance` over its stored history (as POST /analysis/detect-bottlenecks with only
    an instance id), and the optimizations they call for."""
    await history.flush()
    evaluation = await detector.evaluate_history(now, engines, instance.id)
    mine = evaluation.results.filter(pl.col("instance_id") == instance.id)
    bottlenecks = [
        Bottleneck(
            type=row["type"],
            severity=row["severity"],
            description=row["description"],
            metric_name=row["quantity"],
            current_value=row["value"],
            threshold_value=row["threshold"],
            recommendation=row["recommendation"],
            detected_at=evaluation.at,
            rule=row["rule"],
        )
        for row in mine.iter_rows(named=True)
    ]
    metrics = await _latest_quantities(store, instance.id, now)
    insufficient = evaluation.insufficient.filter(pl.col("instance_id") == instance.id)["rule"].n_unique()
    return Analysis(bottlenecks, plan(instance.engine, bottlenecks, current_config, metrics), insufficient)


def carried_out(optimization: Optimization) -> bool:
    """Only engine flags are changed automatically: no new weights, no change of the deployment."""
    return (
        optimization.auto_applicable
        and bool(optimization.config_changes)
        and not optimization.requires_new_weights
        and not optimization.deployment_changes
    )


def why_not_carried_out(optimization: Optimization) -> str:
    if optimization.requires_new_weights:
        return "needs new weights"
    if optimization.deployment_changes:
        return "changes the deployment, not the engine"
    return "advice only"


async def validate(
    store: Store,
    detector: Detector,
    history: HistoryWriter,
    instance_ids: Sequence[str],
    engine: str,
    addresses: Sequence[Addressed],
    since: datetime,
    now: datetime,
) -> Validation:
    """The rules over the scrapes of `instance_ids` taken after `since` only, so what held before the
    change cannot count; `resolved` when none of the addressed findings holds on any instance."""
    await history.flush()
    start = max(since, now - detector.compiled.max_window)
    frame = await store.recent_scrapes(start, now, detector.compiled.quantities)
    frame = frame.filter(pl.col("instance_id").is_in(list(instance_ids)))
    engines = {i: engine for i in instance_ids}
    evaluation = await asyncio.to_thread(evaluate, detector.compiled, with_engines(frame, engines), now)
    rules = {a.rule for a in addresses if a.rule}
    types = {a.type.value for a in addresses if not a.rule}
    counts = dict(frame.group_by("instance_id").len().iter_rows())
    results: list[InstanceValidation] = []
    for instance_id in instance_ids:
        firing = evaluation.results.filter(pl.col("instance_id") == instance_id)
        still = sorted(
            r["rule"] for r in firing.iter_rows(named=True) if r["rule"] in rules or r["type"] in types
        )
        other = sorted(set(firing["rule"].to_list()) - set(still))
        results.append(
            InstanceValidation(
                instance_id=instance_id,
                scrapes=int(counts.get(instance_id, 0)),
                still_firing=still,
                other_findings=other,
            )
        )
    outcome: Literal["resolved", "still_present", "no_data"] = "resolved"
    if any(r.still_firing for r in results):
        outcome = "still_present"
    elif any(r.scrapes == 0 for r in results):
        outcome = "no_data"
    return Validation(outcome=outcome, since=since, at=now, instances=results)
