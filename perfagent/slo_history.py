"""SLOs over stored history: the counts burn rates need, kept in DuckDB, and the evaluation per cycle.

Every stored scrape already holds its histograms, cumulative and summed over the engine's series (the
`raw` RawSnapshot JSON of the `scrapes` table). Parsing that JSON for days of scrapes every cycle would
be wasteful, so what SLOs read (good = bucket at the edge, total = `_count`, and the reset-corrected
increases since the series' previous scrape) is projected once into `slo_counts`, incrementally:
`slo_progress` remembers the newest scrape counted per instance (one instance's scrapes are written in
time order). Each cycle then sums the stored increases per window inside DuckDB and hands Polars one row
per (series, window). Changing the SLO set's (histogram, edge) pairs recounts from the scrapes; rows
older than the longest period are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

import duckdb
import polars as pl

from perfagent.burnrate import (
    COUNTS_SCHEMA,
    INCREMENTS_SCHEMA,
    SUMS_SCHEMA,
    SloEvaluation,
    evaluate,
    increments,
    keyset,
    project_counts,
    ratios_from_sums,
    slo_keys,
    spans_of,
)
from perfagent.slo import SloSet
from perfagent.store import Store

log = logging.getLogger("perfagent.slo")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS slo_counts (
    instance_id VARCHAR NOT NULL, ts TIMESTAMPTZ NOT NULL, histogram VARCHAR NOT NULL, le DOUBLE NOT NULL,
    good DOUBLE NOT NULL, total DOUBLE NOT NULL, prev_ts TIMESTAMPTZ, d_bad DOUBLE, d_total DOUBLE
);
CREATE TABLE IF NOT EXISTS slo_progress (instance_id VARCHAR PRIMARY KEY, ts TIMESTAMPTZ NOT NULL);
"""
_PENDING = (
    "FROM scrapes s LEFT JOIN slo_progress p USING (instance_id) "
    "WHERE s.ok AND s.raw IS NOT NULL AND (p.ts IS NULL OR s.ts > p.ts)"
)
BATCH = 5000  # scrapes parsed per store call: other queries run between batches of a long recount


def _frame(conn: duckdb.DuckDBPyConnection, sql: str, params: list[object]) -> pl.DataFrame:
    frame = pl.from_arrow(conn.sql(sql, params=params).to_arrow_table())
    assert isinstance(frame, pl.DataFrame)
    return frame.with_columns(pl.col(pl.Datetime).dt.convert_time_zone("UTC"))


def _transaction(conn: duckdb.DuckDBPyConnection, body: Callable[[], None]) -> None:
    conn.execute("BEGIN")
    try:
        body()
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def refresh_counts(
    conn: duckdb.DuckDBPyConnection,
    pairs: str,
    since: datetime,
    project: Callable[[pl.DataFrame], pl.DataFrame],
    batch: int = BATCH,
) -> int:
    """Count up to `batch` scrapes newer than `since` not counted yet; returns how many were read (fewer
    than `batch`: up to date). `project` maps scrape rows (instance_id, ts, raw) to COUNTS rows."""
    conn.execute(_SCHEMA)
    # fetchall, never fetchone: DuckDB refuses the next query while a result is half-read.
    stored = conn.execute("SELECT value FROM meta WHERE key = 'slo_keyset'").fetchall()

    def _reset_and_trim() -> None:
        if stored != [(pairs,)]:
            conn.execute("DELETE FROM slo_counts")
            conn.execute("DELETE FROM slo_progress")
            conn.execute(
                "INSERT INTO meta VALUES ('slo_keyset', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [pairs],
            )
        conn.execute("DELETE FROM slo_counts WHERE ts <= ?", [since])

    _transaction(conn, _reset_and_trim)
    # A constant lower bound lets DuckDB skip row groups of old scrapes by their min/max.
    ((first,),) = conn.execute(f"SELECT min(s.ts) {_PENDING} AND s.ts > ?", [since]).fetchall()
    if first is None:
        return 0
    scrapes = _frame(
        conn,
        f"SELECT s.instance_id, s.ts, s.raw {_PENDING} AND s.ts >= ? ORDER BY s.ts LIMIT ?",
        [first, batch],
    )
    # Each series' newest stored sample seeds the increases of the new ones.
    seeds = _frame(
        conn,
        "SELECT instance_id, max(ts) AS ts, histogram, le, arg_max(good, ts) AS good, arg_max(total, ts) AS total "
        "FROM slo_counts GROUP BY instance_id, histogram, le",
        [],
    ).select(list(COUNTS_SCHEMA))
    fresh = project(scrapes).with_columns(fresh=pl.lit(True))
    rows = (
        increments(pl.concat([seeds.cast(dict(COUNTS_SCHEMA)).with_columns(fresh=pl.lit(False)), fresh]))  # type: ignore[arg-type]
        .filter(pl.col("fresh"))
        .collect()
        .select(list(INCREMENTS_SCHEMA))
    )
    progress = scrapes.group_by("instance_id").agg(pl.col("ts").max())

    def _insert() -> None:
        try:
            conn.register("slo_batch", rows.to_arrow())
            conn.register("slo_batch_progress", progress.to_arrow())
            conn.execute("INSERT INTO slo_counts BY NAME SELECT * FROM slo_batch")
            conn.execute(
                "INSERT INTO slo_progress BY NAME SELECT * FROM slo_batch_progress "
                "ON CONFLICT (instance_id) DO UPDATE SET ts = excluded.ts"
            )
        finally:
            conn.unregister("slo_batch")
            conn.unregister("slo_batch_progress")

    _transaction(conn, _insert)
    return scrapes.height


def read_sums(conn: duckdb.DuckDBPyConnection, at: datetime, spans: list[timedelta]) -> pl.DataFrame:
    """burnrate.window_sums over the stored increments, computed by DuckDB (SUMS_SCHEMA)."""
    conn.execute(_SCHEMA)
    first = f"{len(spans)} - (" + " + ".join("CAST(prev_ts > ? AS INTEGER)" for _ in spans) + ")"
    sql = (
        f"SELECT instance_id, histogram, le, CAST({first} AS INTEGER) AS first, sum(d_bad) AS bad, "
        "sum(d_total) AS total FROM slo_counts WHERE ts <= ? AND prev_ts > ? GROUP BY ALL"
    )
    table = conn.sql(sql, params=[*(at - w for w in spans), at, at - spans[-1]]).to_arrow_table()
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame.cast(dict(SUMS_SCHEMA))  # type: ignore[arg-type]


def read_counts(conn: duckdb.DuckDBPyConnection, since: datetime, until: datetime) -> pl.DataFrame:
    """Stored rows in (since, until] (INCREMENTS_SCHEMA), oldest first."""
    conn.execute(_SCHEMA)
    frame = _frame(conn, "SELECT * FROM slo_counts WHERE ts > ? AND ts <= ? ORDER BY ts", [since, until])
    return frame.select(list(INCREMENTS_SCHEMA)).cast(dict(INCREMENTS_SCHEMA))  # type: ignore[arg-type]


@dataclass(slots=True)
class SloEvaluator:
    """Evaluates every SLO over the fleet's stored history; `last` is what /metrics exports."""

    store: Store
    slos: SloSet
    last: SloEvaluation | None = None
    last_seconds: float | None = None  # how long the last evaluation took, counting included

    async def refresh(self, at: datetime) -> int:
        """Count the scrapes the SLOs' windows ending at `at` need and that are not counted yet."""
        since = at - self.slos.span
        keys = slo_keys(self.slos)
        pairs = keyset(self.slos)

        def _batch(conn: duckdb.DuckDBPyConnection) -> int:
            return refresh_counts(conn, pairs, since, lambda scrapes: project_counts(scrapes, keys))

        total = 0
        while (read := await self.store.run(_batch)) == BATCH:
            total += read
        if total:
            log.info("SLO counts: %d scrapes counted", total + read)
        return total + read

    async def evaluate(self, at: datetime, engines: Mapping[str, str]) -> SloEvaluation:
        """Burn rates, budgets and findings of every SLO at `at`."""
        if not len(self.slos):
            return SloEvaluation.empty(at)
        started = time.perf_counter()
        await self.refresh(at)
        spans = spans_of(self.slos)
        sums = await self.store.run(lambda conn: read_sums(conn, at, spans))

        def _work() -> SloEvaluation:
            return evaluate(self.slos, ratios_from_sums(sums, self.slos, spans), dict(engines), at)

        evaluation = await asyncio.to_thread(_work)
        self.last = evaluation
        self.last_seconds = time.perf_counter() - started
        return evaluation
