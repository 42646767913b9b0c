"""One collection: fetch an instance's engine and GPU metrics, parse, normalize, and shape the result
as the API's CollectResponse. The previous snapshot of each instance gives the window.

Fetching (I/O) and processing (CPU) are separate steps so that the poller can fetch a whole tick's
instances and parse their bodies in one batch."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import polars as pl

from perfagent.clock import utc_now
from perfagent.errors import CollectionError, PerfAgentError
from perfagent.exposition import ParseReport, parse_expositions
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


def _check(fetched: Fetched, report: ParseReport) -> None:
    """Raise CollectionError when the engine body held no sample at all."""
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


@dataclass(frozen=True, slots=True)
class Fetch:
    """An instance's bodies as fetched: the I/O half of a collection, waiting to be parsed."""

    target: Target
    engine: Fetched
    dcgm: Fetched | None
    at: datetime  # when the engine body arrived: the end of the window
    warnings: tuple[ParseWarning, ...]  # a failed dcgm fetch
    seconds: float  # from the start of the fetch until every body was in hand

    @property
    def texts(self) -> list[str]:
        return [self.engine.text] if self.dcgm is None else [self.engine.text, self.dcgm.text]


async def fetch(scraper: Scraper, target: Target) -> Fetch:
    """Fetch an instance's engine body and, if it has one, its dcgm body, concurrently.

    Raises PerfAgentError subclasses when the engine body cannot be had; a dcgm failure is a warning.
    """
    started = time.perf_counter()
    engine_task = asyncio.ensure_future(scraper.fetch(target.metrics_url))
    dcgm_task = (
        asyncio.ensure_future(scraper.fetch(target.dcgm_url, field="dcgm_url")) if target.dcgm_url else None
    )
    try:
        engine = await engine_task
    except BaseException:
        if dcgm_task is not None:
            dcgm_task.cancel()
        raise
    at = utc_now()
    warnings: list[ParseWarning] = []
    dcgm: Fetched | None = None
    if dcgm_task is not None:
        try:
            dcgm = await dcgm_task
        except PerfAgentError as exc:
            # GPU metrics are an addition; the engine's numbers still stand without them.
            warnings.append(ParseWarning(line=0, text=target.dcgm_url or "", reason=f"dcgm: {exc.message}"))
    return Fetch(target, engine, dcgm, at, tuple(warnings), time.perf_counter() - started)


def process(fetches: Sequence[Fetch], previous: Sequence[RawSnapshot | None]) -> list[Collection | Exception]:
    """Parse every body of `fetches` in one query, then normalize each instance (blocking: run it
    off the event loop). `previous[i]` starts the window of `fetches[i]`.

    An instance that fails (no valid sample, a normalization error) gets its exception in its place
    and fails alone. Malformed text never makes the parser raise (bad lines are skipped), so an
    exception from the parser itself is a bug, and it fails the whole call.
    """
    started = time.perf_counter()
    reports = iter(parse_expositions([text for f in fetches for text in f.texts]))
    parse_seconds = time.perf_counter() - started
    total_bytes = sum(len(text) for f in fetches for text in f.texts) or 1
    results: list[Collection | Exception] = []
    for f, prev in zip(fetches, previous, strict=True):
        report = next(reports)
        dcgm_report = next(reports) if f.dcgm is not None else None
        # Each instance is charged its share of the batch's parse (by size), not the whole batch's.
        share = parse_seconds * sum(len(text) for text in f.texts) / total_bytes
        try:
            results.append(_normalize(f, report, dcgm_report, prev, f.seconds + share))
        except Exception as exc:  # handed back: the caller reports it against this instance alone
            results.append(exc)
    return results


def _normalize(
    f: Fetch,
    report: ParseReport,
    dcgm_report: ParseReport | None,
    previous: RawSnapshot | None,
    seconds: float,
) -> Collection:
    started = time.perf_counter()
    target = f.target
    _check(f.engine, report)
    normalized = normalize(
        target.engine.value,
        report.samples,
        at=f.at,
        previous=previous,
        dcgm=dcgm_report.samples if dcgm_report is not None else None,
        gpu_selector=dict(target.gpu_selector) or None,
    )
    warnings = list(f.warnings)
    for source, rep in (("", report), ("dcgm: ", dcgm_report)):
        if rep is not None:
            warnings.extend(
                ParseWarning(line=s.line, text=s.text, reason=source + s.reason) for s in rep.skipped
            )
    scrapes = [
        ScrapeInfo(
            url=f.engine.url,
            bytes=f.engine.bytes,
            duration_seconds=f.engine.duration_seconds,
            samples=report.samples.height,
        )
    ]
    if f.dcgm is not None and dcgm_report is not None:
        scrapes.append(
            ScrapeInfo(
                url=f.dcgm.url,
                bytes=f.dcgm.bytes,
                duration_seconds=f.dcgm.duration_seconds,
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
        duration_seconds=seconds + time.perf_counter() - started,
    )


async def collect(scraper: Scraper, snapshots: SnapshotCache, target: Target) -> Collection:
    """Scrape and normalize one instance. Raises PerfAgentError subclasses on failure."""
    fetched = await fetch(scraper, target)
    # Parsing and normalizing a large scrape is CPU work: keep it off the event loop.
    [result] = await asyncio.to_thread(process, [fetched], [snapshots.get(target)])
    if isinstance(result, Exception):
        raise result
    snapshots.put(target, result.normalized.raw)
    return result


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
