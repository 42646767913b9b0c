"""One collection: fetch an instance's engine and GPU metrics, parse, normalize, and shape the result
as the API's CollectResponse. The previous snapshot of each instance gives the window."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

import polars as pl

from perfagent.clock import utc_now
from perfagent.errors import CollectionError, PerfAgentError
from perfagent.exposition import ParseReport, parse_exposition_report
from perfagent.history import ScrapeRecord
from perfagent.models import (
    CacheMetrics,
    CollectResponse,
    EngineName,
    GpuMetrics,
    Instance,
    LatencyPercentiles,
    ParseWarning,
    RequestMetrics,
    ScrapeInfo,
    ThroughputMetrics,
    WindowInfo,
)
from perfagent.normalize import Normalized, RawSnapshot, normalize
from perfagent.scrape import Fetched, Scraper

MAX_WARNINGS = 50  # a wholly broken body should not produce a megabyte of warnings


@dataclass(frozen=True, slots=True)
class Target:
    instance_id: str
    engine: EngineName
    metrics_url: str
    dcgm_url: str | None = None
    gpu_selector: Mapping[str, str] = field(default_factory=dict)


def target_of(instance: Instance) -> Target:
    return Target(
        instance_id=instance.id,
        engine=instance.engine,
        metrics_url=instance.metrics_url,
        dcgm_url=instance.dcgm_url,
        gpu_selector=instance.gpu_selector,
    )


@dataclass(slots=True)
class SnapshotCache:
    """The last raw snapshot per instance, the start of the next window."""

    _last: dict[str, tuple[str, RawSnapshot]] = field(default_factory=dict)

    def get(self, target: Target) -> RawSnapshot | None:
        entry = self._last.get(target.instance_id)
        # A different URL under the same id is a different server: its counters are not comparable.
        return entry[1] if entry is not None and entry[0] == target.metrics_url else None

    def put(self, target: Target, snapshot: RawSnapshot) -> None:
        self.restore(target.instance_id, target.metrics_url, snapshot)

    def restore(self, instance_id: str, metrics_url: str, snapshot: RawSnapshot) -> None:
        self._last[instance_id] = (metrics_url, snapshot)


def _parse_or_fail(fetched: Fetched) -> ParseReport:
    report = parse_exposition_report(fetched.text)
    if report.samples.height == 0:
        if report.skipped:
            first = report.skipped[0]
            raise CollectionError(
                f"no valid sample in the body from {fetched.url}; "
                f"first bad line {first.line}: {first.reason}",
                {
                    "url": fetched.url,
                    "line": first.line,
                    "text": first.text,
                    "reason": first.reason,
                    "bad_lines": len(report.skipped),
                },
            )
        raise CollectionError(
            f"the body from {fetched.url} holds no samples", {"url": fetched.url, "bytes": fetched.bytes}
        )
    return report


@dataclass(frozen=True, slots=True)
class Collection:
    """Everything one successful collection produced."""

    target: Target
    normalized: Normalized
    warnings: list[ParseWarning]
    scrapes: list[ScrapeInfo]
    samples: pl.DataFrame
    dcgm_samples: pl.DataFrame | None
    duration_seconds: float

    def record(self) -> ScrapeRecord:
        n = self.normalized
        return ScrapeRecord(
            instance_id=self.target.instance_id,
            at=n.window.end,
            metrics_url=self.target.metrics_url,
            ok=True,
            duration_seconds=self.duration_seconds,
            window_kind=n.window.kind,
            window_seconds=n.window.seconds,
            engine_version=n.engine_version_hint,
            raw=n.raw.model_dump_json(),
            values=dict(n.values),
            samples=self.samples,
            dcgm_samples=self.dcgm_samples,
        )


def failure_record(target: Target, at: datetime, error: PerfAgentError, duration: float) -> ScrapeRecord:
    return ScrapeRecord(
        instance_id=target.instance_id,
        at=at,
        metrics_url=target.metrics_url,
        ok=False,
        duration_seconds=duration,
        error=f"{error.code}: {error.message}",
    )


async def collect(scraper: Scraper, snapshots: SnapshotCache, target: Target) -> Collection:
    """Scrape and normalize one instance. Raises PerfAgentError subclasses on failure."""
    started = time.perf_counter()
    engine_task = asyncio.ensure_future(scraper.fetch(target.metrics_url))
    dcgm_task = (
        asyncio.ensure_future(scraper.fetch(target.dcgm_url, field="dcgm_url")) if target.dcgm_url else None
    )
    try:
        fetched = await engine_task
    except BaseException:
        if dcgm_task is not None:
            dcgm_task.cancel()
        raise
    at = utc_now()
    warnings: list[ParseWarning] = []
    dcgm_fetched: Fetched | None = None
    if dcgm_task is not None:
        try:
            dcgm_fetched = await dcgm_task
        except PerfAgentError as exc:
            # GPU metrics are an addition; the engine's numbers still stand without them.
            warnings.append(ParseWarning(line=0, text=target.dcgm_url or "", reason=f"dcgm: {exc.message}"))

    # Parsing and normalizing a large scrape is CPU work: keep it off the event loop.
    def _work() -> tuple[ParseReport, ParseReport | None, Normalized]:
        report = _parse_or_fail(fetched)
        dcgm_report = parse_exposition_report(dcgm_fetched.text) if dcgm_fetched is not None else None
        normalized = normalize(
            target.engine.value,
            report.samples,
            at=at,
            previous=snapshots.get(target),
            dcgm=dcgm_report.samples if dcgm_report is not None else None,
            gpu_selector=dict(target.gpu_selector) or None,
        )
        return report, dcgm_report, normalized

    report, dcgm_report, normalized = await asyncio.to_thread(_work)
    snapshots.put(target, normalized.raw)
    for source, rep in (("", report), ("dcgm: ", dcgm_report)):
        if rep is not None:
            warnings.extend(
                ParseWarning(line=s.line, text=s.text, reason=source + s.reason) for s in rep.skipped
            )
    scrapes = [
        ScrapeInfo(
            url=fetched.url,
            bytes=fetched.bytes,
            duration_seconds=fetched.duration_seconds,
            samples=report.samples.height,
        )
    ]
    if dcgm_fetched is not None and dcgm_report is not None:
        scrapes.append(
            ScrapeInfo(
                url=dcgm_fetched.url,
                bytes=dcgm_fetched.bytes,
                duration_seconds=dcgm_fetched.duration_seconds,
                samples=dcgm_report.samples.height,
            )
        )
    return Collection(
        target=target,
        normalized=normalized,
        warnings=warnings[:MAX_WARNINGS],
        scrapes=scrapes,
        samples=report.samples,
        dcgm_samples=dcgm_report.samples if dcgm_report is not None else None,
        duration_seconds=time.perf_counter() - started,
    )


def build_response(collection: Collection) -> CollectResponse:
    """Lay the flat catalog values out in the spec's groups (plus the agent's additions)."""
    target, n = collection.target, collection.normalized
    warnings, scrapes = collection.warnings, collection.scrapes
    v = n.values
    usage = v.get("kv_cache_usage")
    return CollectResponse(
        instance_id=target.instance_id,
        timestamp=n.window.end,
        request_metrics=RequestMetrics(
            success_total=v.get("requests_success_total"),
            failure_total=v.get("requests_failure_total"),
            time_to_first_token_seconds=v.get("ttft_seconds"),
            time_per_output_token_seconds=v.get("itl_seconds"),
            e2e_request_latency_seconds=v.get("e2e_latency_seconds"),
            queue_time_seconds=v.get("queue_time_seconds"),
            request_rate=v.get("request_rate"),
            error_rate=v.get("error_rate"),
        ),
        gpu_metrics=GpuMetrics(
            cache_usage_perc=None if usage is None else usage * 100.0,  # the spec shows percent
            memory_usage_bytes=v.get("gpu_memory_used_bytes"),
            num_requests_running=v.get("requests_running"),
            num_requests_waiting=v.get("requests_waiting"),
            memory_total_bytes=v.get("gpu_memory_total_bytes"),
            gpu_utilization=v.get("gpu_utilization"),
            kv_cache_capacity_tokens=v.get("kv_cache_capacity_tokens"),
        ),
        throughput_metrics=ThroughputMetrics(
            tokens_per_second=v.get("generation_tokens_per_second"),
            generation_tokens_total=v.get("generation_tokens_total"),
            prompt_tokens_total=v.get("prompt_tokens_total"),
            prompt_tokens_per_second=v.get("prompt_tokens_per_second"),
        ),
        latency={
            short: LatencyPercentiles(
                mean=v.get(base), p50=v.get(f"{base}_p50"), p90=v.get(f"{base}_p90"), p99=v.get(f"{base}_p99")
            )
            for short, base in (
                ("ttft", "ttft_seconds"),
                ("itl", "itl_seconds"),
                ("e2e", "e2e_latency_seconds"),
                ("queue", "queue_time_seconds"),
            )
        },
        cache_metrics=CacheMetrics(
            prefix_cache_hit_rate=v.get("prefix_cache_hit_rate"),
            preemptions_total=v.get("preemptions_total"),
            preemption_rate=v.get("preemption_rate"),
        ),
        quantities=dict(v),
        window=WindowInfo(
            kind=n.window.kind, start=n.window.start, end=n.window.end, seconds=n.window.seconds
        ),
        engine=target.engine,
        engine_version=n.engine_version_hint,
        approximations=dict(n.approximations),
        flags=dict(n.flags),
        warnings=warnings,
        scrapes=scrapes,
    )
