"""Instances discovered from Prometheus by a series selector, e.g. every target of `{job="vllm"}`.

Each refresh asks Prometheus which engine metric names every matching (job, instance) exposes, infers
the engine from those names (the engine maps' own), and applies the operator's engine where it is
given: a disagreement is logged and kept on the instance as the `engine_inferred` label. Discovered
instances are analysed from PromQL alone (perfagent.promql_source): the agent never scrapes them.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from pydantic import BaseModel, ConfigDict, Field, field_validator

from perfagent.clock import utc_now
from perfagent.enginemap import (
    CounterRatioSource,
    CounterSource,
    GaugeSumSource,
    HistogramSource,
    HistogramSumSource,
    Source,
    load_engine_map,
)
from perfagent.errors import PerfAgentError
from perfagent.models import EngineName, Instance, InstanceSource
from perfagent.promclient import PromClient
from perfagent.promql import Matcher, SeriesSelector, alternation

log = logging.getLogger("perfagent.discovery")

IDENTITY_LABELS: Final = ("job", "instance")
_ID_BAD_CHARS = re.compile(r"[^A-Za-z0-9._:-]")
_ID_MAX = 128


class DiscoverySpec(BaseModel):
    """One `discovery` entry of the settings."""

    model_config = ConfigDict(extra="forbid")

    selector: str = Field(description='PromQL series selector of the targets, e.g. {job="vllm"}.')
    engine: EngineName | None = Field(
        None, description="The operator's engine for these targets; inferred from metric names when omitted."
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="Extra labels of every discovered instance, e.g. deployment_group."
    )
    refresh_interval: float = Field(60.0, gt=0, description="Seconds between refreshes of this selector.")

    @field_validator("selector")
    @classmethod
    def _valid_selector(cls, value: str) -> str:
        SeriesSelector.parse(value)  # its ValueError names the problem and the character
        return value

    @field_validator("labels")
    @classmethod
    def _no_identity(cls, value: dict[str, str]) -> dict[str, str]:
        taken = sorted(set(value) & {*IDENTITY_LABELS, "engine_inferred", "engine_version"})
        if taken:
            raise ValueError(f"labels {taken} are set by discovery from Prometheus")
        return value

    @property
    def parsed(self) -> SeriesSelector:
        return SeriesSelector.parse(self.selector)


@dataclass(frozen=True, slots=True)
class Target:
    """One (job, instance) matching a selector, with the engine metric names it exposes."""

    job: str | None
    instance: str
    names: frozenset[str]


# --- engines from metric names ----------------------------------------------------------------------


@functools.cache
def engine_names() -> Mapping[EngineName, frozenset[str]]:
    """Every sample name each engine map reads or recognises an era by."""
    out: dict[EngineName, frozenset[str]] = {}
    for engine in EngineName:
        emap = load_engine_map(engine.value)
        names: set[str] = {m for era in emap.eras for m in era.any_metric}
        for qmap in emap.quantities.values():
            for source in qmap.sources:
                for selector, histogram in _selectors(source):
                    names.update(
                        [selector + p for p in ("_bucket", "_sum", "_count")] if histogram else [selector]
                    )
                if isinstance(source, CounterSource):
                    names.update(source.absent_is_zero_when)
        out[engine] = frozenset(names)
    return out


def _selectors(source: Source) -> list[tuple[str, bool]]:
    """(metric, is_histogram) of every metric a source reads."""
    match source:
        case GaugeSumSource():
            return [(t.metric, False) for t in source.terms]
        case HistogramSumSource():
            return [(t.metric, True) for t in source.terms]
        case HistogramSource():
            return [(source.metric, True)]
        case CounterRatioSource():
            return [(source.numerator.metric, False), (source.denominator.metric, False)]
        case _:
            return [(source.metric, False)]


def infer_engine(names: frozenset[str]) -> EngineName | None:
    """The engine whose map knows most of `names`; None when none knows any."""
    scores = {engine: len(names & known) for engine, known in engine_names().items()}
    best = max(scores, key=lambda e: scores[e])
    return best if scores[best] else None


def version_hint(engine: EngineName, names: frozenset[str]) -> str | None:
    """The engine map's era hint from metric names alone (label-only eras are not visible here)."""
    for era in load_engine_map(engine.value).eras:
        if names.intersection(era.any_metric):
            return era.hint
    return None


def instance_id(job: str | None, instance: str) -> str:
    """A stable id from the job and instance labels, within the InstanceId constraints."""
    raw = instance if job is None else f"{job}-{instance}"
    clean = _ID_BAD_CHARS.sub("_", raw)
    if not clean[0].isalnum():
        clean = "t" + clean
    if clean == raw and len(clean) <= _ID_MAX:
        return clean
    # Changed or cut: a digest of the raw labels keeps two targets from sharing an id.
    digest = hashlib.sha1(raw.encode()).hexdigest()[:8]
    return f"{clean[: _ID_MAX - 9]}-{digest}"


# --- querying -----------------------------------------------------------------------------------------


def names_query(selector: SeriesSelector) -> str:
    """Engine metric names per (job, instance) among the series `selector` matches."""
    known = set().union(*engine_names().values())
    matchers = (*selector.label_matchers, Matcher("__name__", "=~", alternation(known)))
    query = f"group by (__name__, job, instance) ({{{', '.join(m.render() for m in matchers)}}})"
    if selector.selects_by_name:
        # A selector naming a metric picks targets by that metric; their other names are read apart.
        query += f" and on (job, instance) group by (job, instance) ({selector.render()})"
    return query


async def find_targets(
    client: PromClient, selector: SeriesSelector, at: datetime | None = None
) -> list[Target]:
    """The targets matching `selector` now (within Prometheus's 5-minute lookback)."""
    result = await client.query(names_query(selector), at)
    names: dict[tuple[str | None, str], set[str]] = {}
    for series in result:
        labels = series.get("metric", {})
        if "instance" not in labels or "__name__" not in labels:
            continue
        names.setdefault((labels.get("job"), labels["instance"]), set()).add(labels["__name__"])
    return [Target(job, inst, frozenset(found)) for (job, inst), found in sorted(names.items(), key=str)]


async def scrape_urls(client: PromClient) -> dict[tuple[str | None, str], str]:
    """(job, instance) -> the URL Prometheus scrapes; empty when the targets API cannot be read."""
    try:
        targets = await client.targets()
    except PerfAgentError as exc:
        log.warning("cannot read Prometheus's targets, guessing metrics URLs: %s", exc.message)
        return {}
    out: dict[tuple[str | None, str], str] = {}
    for target in targets:
        labels = target.get("labels", {})
        if "instance" in labels and target.get("scrapeUrl"):
            out[(labels.get("job"), labels["instance"])] = str(target["scrapeUrl"])
    return out


# --- the discovered fleet -------------------------------------------------------------------------


@dataclass(slots=True)
class Discovery:
    """The instances each `discovery` entry found at its last successful refresh."""

    client: PromClient
    specs: Sequence[DiscoverySpec]
    found: dict[int, list[Instance]] = field(default_factory=dict)  # by spec index
    first_seen: dict[str, datetime] = field(default_factory=dict)
    last_error: str | None = None
    _warned: set[tuple[str, str]] = field(default_factory=set)

    def instances(self) -> list[Instance]:
        """Every discovered instance, each id once (the first entry that found it wins)."""
        seen: dict[str, Instance] = {}
        for index in sorted(self.found):
            for inst in self.found[index]:
                seen.setdefault(inst.id, inst)
        return list(seen.values())

    async def refresh(self, index: int) -> list[Instance]:
        """Query Prometheus for entry `index`; on failure the previous list stays."""
        spec = self.specs[index]
        targets, urls = await asyncio.gather(find_targets(self.client, spec.parsed), scrape_urls(self.client))
        now = utc_now()
        found = [self._instance(spec, t, urls, now) for t in targets]
        self.found[index] = [i for i in found if i is not None]
        return self.found[index]

    async def run(self) -> None:
        """Refresh every entry on its own interval until cancelled."""
        await asyncio.gather(*(self._loop(i) for i in range(len(self.specs))))

    async def _loop(self, index: int) -> None:
        spec = self.specs[index]
        while True:
            try:
                found = await self.refresh(index)
                self.last_error = None
                log.debug("discovery %s: %d instances", spec.selector, len(found))
            except PerfAgentError as exc:
                self.last_error = exc.message
                log.warning("discovery %s failed, keeping the last targets: %s", spec.selector, exc.message)
            await asyncio.sleep(spec.refresh_interval)

    def _instance(
        self, spec: DiscoverySpec, target: Target, urls: Mapping[tuple[str | None, str], str], now: datetime
    ) -> Instance | None:
        inferred = infer_engine(target.names)
        engine = spec.engine or inferred
        if engine is None:
            return None
        ident = instance_id(target.job, target.instance)
        labels = {**spec.labels, "instance": target.instance}
        if target.job is not None:
            labels["job"] = target.job
        hint = version_hint(engine, target.names)
        if hint is not None:
            labels["engine_version"] = hint
        if inferred is not None and inferred != engine:
            # The operator's word stands; the disagreement stays visible on the instance.
            labels["engine_inferred"] = inferred.value
            if (ident, inferred.value) not in self._warned:
                self._warned.add((ident, inferred.value))
                log.warning(
                    "discovered %s: configured engine %s but its metrics look like %s; using %s",
                    ident,
                    engine.value,
                    inferred.value,
                    engine.value,
                    extra={"selector": spec.selector},
                )
        url = urls.get((target.job, target.instance)) or f"http://{target.instance}/metrics"
        try:
            return Instance(
                id=ident,
                engine=engine,
                metrics_url=url,
                labels=labels,
                source=InstanceSource.DISCOVERED,
                created_at=self.first_seen.setdefault(ident, now),
            )
        except ValueError as exc:
            log.warning("discovered target %s skipped: %s", ident, exc)
            return None
