"""History: every scrape's normalized quantities and its raw samples, batched into DuckDB.

Scrapes are queued in memory and written in one transaction per batch (Polars frames handed to DuckDB
as Arrow, never row by row), on the store's thread. A crash loses at most the batch not yet written;
a clean shutdown flushes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

import polars as pl

from perfagent.catalog import QUANTITIES

log = logging.getLogger("perfagent.history")

QUANTITY_COLUMNS: tuple[str, ...] = tuple(q.name for q in QUANTITIES)

# Families that describe the exporter process, not inference; dropped to keep raw history compact.
_NOT_STORED = ("python_", "process_", "http_")

SCRAPE_SCHEMA: dict[str, pl.DataType | type[pl.DataType]] = {
    "instance_id": pl.String,
    "ts": pl.Datetime("us", "UTC"),
    "metrics_url": pl.String,
    "ok": pl.Boolean,
    "error": pl.String,
    "duration_seconds": pl.Float64,
    "window_kind": pl.String,
    "window_seconds": pl.Float64,
    "engine_version": pl.String,
    "raw": pl.String,  # the RawSnapshot JSON that starts the next window
    **{name: pl.Float64 for name in QUANTITY_COLUMNS},
}


@dataclass(frozen=True, slots=True)
class ScrapeRecord:
    """One scrape's outcome, successful or not."""

    instance_id: str
    at: datetime
    metrics_url: str
    ok: bool
    duration_seconds: float | None
    error: str | None = None
    window_kind: str | None = None
    window_seconds: float | None = None
    engine_version: str | None = None
    raw: str | None = None
    values: dict[str, float | None] = field(default_factory=dict)
    samples: pl.DataFrame | None = None  # parsed engine samples (perfagent.exposition schema)
    dcgm_samples: pl.DataFrame | None = None


def scrape_frame(records: list[ScrapeRecord]) -> pl.DataFrame:
    rows = [
        {
            "instance_id": r.instance_id,
            "ts": r.at,
            "metrics_url": r.metrics_url,
            "ok": r.ok,
            "error": r.error,
            "duration_seconds": r.duration_seconds,
            "window_kind": r.window_kind,
            "window_seconds": r.window_seconds,
            "engine_version": r.engine_version,
            "raw": r.raw,
            **{name: r.values.get(name) for name in QUANTITY_COLUMNS},
        }
        for r in records
    ]
    return pl.DataFrame(rows, schema=SCRAPE_SCHEMA, orient="row")


def sample_frame(records: list[ScrapeRecord]) -> pl.DataFrame:
    """The raw samples of a batch: instance, time, source, name, labels, value."""
    parts = []
    for r in records:
        for source, frame in (("engine", r.samples), ("dcgm", r.dcgm_samples)):
            if frame is None or frame.height == 0:
                continue
            parts.append(
                frame.lazy()
                .filter(
                    ~pl.any_horizontal(pl.col("name").str.starts_with(p) for p in _NOT_STORED),
                    ~pl.col("name").str.ends_with("_created"),
                )
                .select(
                    pl.lit(r.instance_id).alias("instance_id"),
                    pl.lit(r.at).cast(pl.Datetime("us", "UTC")).alias("ts"),
                    pl.lit(source).alias("source"),
                    "name",
                    "labels",
                    "value",
                )
            )
    if not parts:
        return pl.DataFrame()
    return pl.concat(parts).collect()


class HistoryWriter:
    """Queues scrape records and writes them in batches."""

    def __init__(
        self,
        store: HistorySink,
        *,
        flush_interval: float,
        retention: timedelta,
        max_batch: int = 1000,
        retention_check_interval: float = 300.0,
    ) -> None:
        self._store = store
        self._retention = retention
        self._retention_check_interval = retention_check_interval
        self._last_retention: float | None = None
        self._flush_interval = flush_interval
        self._max_batch = max_batch
        self._pending: list[ScrapeRecord] = []
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self.last_write_lag_seconds: float | None = None
        self.written = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, record: ScrapeRecord) -> None:
        self._pending.append(record)
        if len(self._pending) >= self._max_batch:
            self._wake.set()

    async def run(self) -> None:
        """Flush every `flush_interval` seconds (or sooner when a batch fills) until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._flush_interval)
            self._wake.clear()
            try:
                await self.flush()
                await self.enforce_retention()
            except Exception:
                # Keep the records and retry next time: a transient store error must not lose data.
                log.exception("history write failed; will retry")

    async def enforce_retention(self, *, force: bool = False) -> tuple[int, int]:
        """Delete history older than the retention, at most every `retention_check_interval`."""
        now = time.monotonic()
        if (
            not force
            and self._last_retention is not None
            and now - self._last_retention < self._retention_check_interval
        ):
            return (0, 0)
        self._last_retention = now
        deleted = await self._store.delete_history_before(datetime.now(UTC) - self._retention)
        if any(deleted):
            log.info("retention: deleted %d scrapes and %d samples", *deleted)
        return deleted

    async def flush(self) -> int:
        async with self._lock:
            batch, self._pending = self._pending, []
            if not batch:
                return 0
            oldest = min(r.at for r in batch)
            started = time.perf_counter()
            try:
                await self._store.write_history(scrape_frame(batch), sample_frame(batch))
            except BaseException:
                self._pending[:0] = batch
                raise
            self.written += len(batch)
            self.last_write_lag_seconds = (datetime.now(oldest.tzinfo) - oldest).total_seconds()
            log.debug("wrote %d scrapes in %.3f s", len(batch), time.perf_counter() - started)
            return len(batch)


class HistorySink(Protocol):
    """What the writer needs of a store (the Store implements it)."""

    async def write_history(self, scrapes: pl.DataFrame, samples: pl.DataFrame) -> None: ...

    async def delete_history_before(self, cutoff: datetime) -> tuple[int, int]: ...
