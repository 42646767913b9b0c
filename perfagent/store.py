"""The DuckDB store. One connection, used from one worker thread, so blocking SQL never runs on the
event loop and DuckDB's single-writer connection is never shared between threads."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import polars as pl

from perfagent.errors import ConfigError, ServiceUnavailableError
from perfagent.findings import STATE_SCHEMA, Step
from perfagent.history import QUANTITY_COLUMNS, SCRAPE_SCHEMA
from perfagent.models import EngineName, Instance, InstanceSource, InstanceSpec

T = TypeVar("T")

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
    id VARCHAR PRIMARY KEY,
    engine VARCHAR NOT NULL,
    metrics_url VARCHAR NOT NULL,
    dcgm_url VARCHAR,
    gpu_selector JSON NOT NULL,
    labels JSON NOT NULL,
    source VARCHAR NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS finding_state (
    instance_id VARCHAR NOT NULL, rule VARCHAR NOT NULL, state VARCHAR NOT NULL, engine VARCHAR,
    type VARCHAR, severity VARCHAR, value DOUBLE, threshold DOUBLE, summary VARCHAR, description VARCHAR,
    recommendation VARCHAR, first_seen TIMESTAMPTZ, fired_at TIMESTAMPTZ, last_seen TIMESTAMPTZ
);
CREATE TABLE IF NOT EXISTS findings (
    instance_id VARCHAR NOT NULL, rule VARCHAR NOT NULL, first_seen TIMESTAMPTZ NOT NULL,
    engine VARCHAR, type VARCHAR, severity VARCHAR, max_severity VARCHAR, value DOUBLE, threshold DOUBLE,
    summary VARCHAR, description VARCHAR, recommendation VARCHAR,
    fired_at TIMESTAMPTZ, last_seen TIMESTAMPTZ, resolved_at TIMESTAMPTZ,
    PRIMARY KEY (instance_id, rule, first_seen)
);
CREATE TABLE IF NOT EXISTS samples (
    instance_id VARCHAR NOT NULL,
    ts TIMESTAMPTZ NOT NULL,
    source VARCHAR NOT NULL,
    name VARCHAR NOT NULL,
    labels STRUCT(name VARCHAR, value VARCHAR)[] NOT NULL,
    value DOUBLE
);
"""

_DUCK_TYPES = {pl.String: "VARCHAR", pl.Boolean: "BOOLEAN", pl.Float64: "DOUBLE"}


def _scrapes_ddl() -> str:
    """The scrapes table: one row per scrape, one DOUBLE column per catalog quantity."""
    columns = []
    for name, dtype in SCRAPE_SCHEMA.items():
        sql = "TIMESTAMPTZ" if isinstance(dtype, pl.Datetime) else _DUCK_TYPES[dtype]  # type: ignore[index]
        columns.append(f'"{name}" {sql}' + (" NOT NULL" if name in {"instance_id", "ts", "ok"} else ""))
    return f"CREATE TABLE IF NOT EXISTS scrapes ({', '.join(columns)})"


class Store:
    """Owns the DuckDB connection; every call hops to the store's own thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="duckdb")
        self._conn: duckdb.DuckDBPyConnection | None = None
        self._closed = False

    @classmethod
    async def open(cls, path: Path) -> Store:
        store = cls(path)
        await store._run(store._open_sync)
        return store

    def _open_sync(self) -> None:
        if str(self.path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = duckdb.connect(str(self.path))
        except duckdb.Error as exc:
            # The usual cause: another process (a running agent) holds the file's lock.
            raise ConfigError(f"cannot open database {self.path}: {exc}") from exc
        conn.execute(_SCHEMA)
        conn.execute(_scrapes_ddl())
        # A catalog that grew since the file was created: add the new quantities as columns.
        present = {
            row[0]
            for row in conn.execute(
                "SELECT column_name FROM duckdb_columns() WHERE table_name = 'scrapes'"
            ).fetchall()
        }
        for name in QUANTITY_COLUMNS:
            if name not in present:
                conn.execute(f'ALTER TABLE scrapes ADD COLUMN "{name}" DOUBLE')
        conn.execute(
            "INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT (key) DO NOTHING",
            [str(SCHEMA_VERSION)],
        )
        self._conn = conn

    async def close(self) -> None:
        """Close the connection and the worker thread; closing twice is harmless."""
        if self._closed:
            return
        self._closed = True

        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._run(_close)
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed and fn.__name__ != "_close":
            raise ServiceUnavailableError("database is closed", {"dependency": "database"})
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._finished, fn, *args)

    def _finished(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn`, then finish any result it left half-read (a `fetchone()`): DuckDB 2.0 refuses
        the next query on a connection with an unfinished result."""
        try:
            return fn(*args)
        finally:
            if self._conn is not None:
                self._conn.complete()

    async def run(self, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """Run `fn` with the connection on the store's thread: how other modules' tables (the
        workflows') share the one connection without sharing it between threads."""

        def _with_connection() -> T:
            return fn(self._db())

        return await self._run(_with_connection)

    def _db(self) -> duckdb.DuckDBPyConnection:
        if self._conn is None:
            raise ServiceUnavailableError("database is closed", {"dependency": "database"})
        return self._conn

    async def ping(self) -> None:
        """A real round trip: a query against the instances table."""

        def _ping() -> None:
            self._db().execute("SELECT count(*) FROM instances").fetchone()

        await self._run(_ping)

    # ---- instances ----------------------------------------------------------------------------

    async def list_instances(self) -> list[Instance]:
        def _list() -> list[Instance]:
            rows = self._db().execute("SELECT * FROM instances ORDER BY id").fetchall()
            return [_instance(row) for row in rows]

        return await self._run(_list)

    async def get_instance(self, instance_id: str) -> Instance | None:
        def _get() -> Instance | None:
            row = self._db().execute("SELECT * FROM instances WHERE id = ?", [instance_id]).fetchone()
            return None if row is None else _instance(row)

        return await self._run(_get)

    async def insert_instance(self, spec: InstanceSpec, source: InstanceSource, at: datetime) -> bool:
        """Insert unless the id exists; True when inserted."""

        def _insert() -> bool:
            db = self._db()
            if db.execute("SELECT 1 FROM instances WHERE id = ?", [spec.id]).fetchone():
                return False
            db.execute("INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?)", _row(spec, source, at))
            return True

        return await self._run(_insert)

    async def sync_config_instances(self, specs: Sequence[InstanceSpec], at: datetime) -> None:
        """Make the config-file instances in the table match the file (API-added ones stay)."""

        def _sync() -> None:
            db = self._db()
            db.execute("BEGIN")
            try:
                db.execute("DELETE FROM instances WHERE source = ?", [InstanceSource.CONFIG.value])
                for spec in specs:
                    db.execute("DELETE FROM instances WHERE id = ?", [spec.id])
                    db.execute(
                        "INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        _row(spec, InstanceSource.CONFIG, at),
                    )
                db.execute("COMMIT")
            except Exception:
                db.execute("ROLLBACK")
                raise

        await self._run(_sync)

    async def delete_instance(self, instance_id: str) -> bool:
        def _delete() -> bool:
            db = self._db()
            found = db.execute("SELECT 1 FROM instances WHERE id = ?", [instance_id]).fetchone()
            db.execute("DELETE FROM instances WHERE id = ?", [instance_id])
            return found is not None

        return await self._run(_delete)

    # ---- history ------------------------------------------------------------------------------

    async def write_history(self, scrapes: pl.DataFrame, samples: pl.DataFrame) -> None:
        """Insert one batch in one transaction: all of it is stored, or none of it."""

        def _write() -> None:
            db = self._db()
            db.execute("BEGIN")
            try:
                db.register("batch_scrapes", scrapes.to_arrow())
                db.execute("INSERT INTO scrapes BY NAME SELECT * FROM batch_scrapes")
                if samples.height:
                    db.register("batch_samples", samples.to_arrow())
                    db.execute("INSERT INTO samples BY NAME SELECT * FROM batch_samples")
                db.execute("COMMIT")
            except Exception:
                db.execute("ROLLBACK")
                raise
            finally:
                db.unregister("batch_scrapes")
                db.unregister("batch_samples")

        await self._run(_write)

    async def history(
        self, instance_id: str, since: datetime, until: datetime, fields: Sequence[str]
    ) -> pl.DataFrame:
        """Scrapes of one instance in [since, until], oldest first, with the asked-for quantities."""
        chosen = ", ".join(f'"{f}"' for f in fields)

        def _query() -> pl.DataFrame:
            sql = (
                "SELECT ts, ok, error, duration_seconds, window_kind, window_seconds"
                + (f", {chosen}" if chosen else "")
                + " FROM scrapes WHERE instance_id = ? AND ts >= ? AND ts <= ? ORDER BY ts"
            )
            table = self._db().sql(sql, params=[instance_id, since, until]).to_arrow_table()
            frame = pl.from_arrow(table)
            assert isinstance(frame, pl.DataFrame)
            return frame

        return await self._run(_query)

    async def last_snapshots(self) -> dict[str, tuple[str, str]]:
        """The newest successful scrape's raw snapshot per instance: {id: (metrics_url, json)}."""

        def _query() -> dict[str, tuple[str, str]]:
            rows = (
                self._db()
                .execute(
                    "SELECT instance_id, arg_max(metrics_url, ts), arg_max(raw, ts) FROM scrapes "
                    "WHERE ok AND raw IS NOT NULL GROUP BY instance_id"
                )
                .fetchall()
            )
            return {row[0]: (row[1], row[2]) for row in rows}

        return await self._run(_query)

    async def delete_history_before(self, cutoff: datetime) -> tuple[int, int]:
        """Enforce retention; returns (scrapes, samples) deleted."""

        def _delete() -> tuple[int, int]:
            db = self._db()
            scrapes = db.execute("DELETE FROM scrapes WHERE ts < ?", [cutoff]).fetchone()
            samples = db.execute("DELETE FROM samples WHERE ts < ?", [cutoff]).fetchone()
            return (int(scrapes[0]) if scrapes else 0, int(samples[0]) if samples else 0)

        return await self._run(_delete)

    # ---- findings -----------------------------------------------------------------------------

    async def recent_scrapes(
        self, since: datetime, until: datetime, quantities: Iterable[str], instance_id: str | None = None
    ) -> pl.DataFrame:
        """`read_recent_scrapes` on the store's connection."""
        return await self._run(lambda: read_recent_scrapes(self._db(), since, until, quantities, instance_id))

    async def count_scrapes(self, since: datetime, until: datetime, instance_id: str | None = None) -> int:
        """How many rows `recent_scrapes` would return: sized before they are read (backtests)."""

        def _query() -> int:
            sql = "SELECT count(*) FROM scrapes WHERE ok AND ts > ? AND ts <= ?" + (
                " AND instance_id = ?" if instance_id else ""
            )
            params: list[Any] = [since, until] + ([instance_id] if instance_id else [])
            row = self._db().execute(sql, params).fetchone()
            return int(row[0]) if row else 0

        return await self._run(_query)

    async def load_finding_state(self) -> pl.DataFrame:
        def _query() -> pl.DataFrame:
            frame = pl.from_arrow(self._db().sql("SELECT * FROM finding_state").to_arrow_table())
            assert isinstance(frame, pl.DataFrame)
            return frame.with_columns(
                pl.col(c).dt.convert_time_zone("UTC") for c in ("first_seen", "fired_at", "last_seen")
            ).cast(dict(STATE_SCHEMA))  # type: ignore[arg-type]

        return await self._run(_query)

    async def save_findings(self, step: Step) -> None:
        """Replace the state, upsert firing episodes, close resolved ones: one transaction."""
        firing = step.state.filter(pl.col("state") == "firing")
        resolved = step.transitions.filter(pl.col("kind") == "resolved")

        def _save() -> None:
            db = self._db()
            db.execute("BEGIN")
            try:
                db.execute("DELETE FROM finding_state")
                if step.state.height:
                    db.register("new_state", step.state.to_arrow())
                    db.execute("INSERT INTO finding_state BY NAME SELECT * FROM new_state")
                if firing.height:
                    db.register("firing", firing.to_arrow())
                    db.execute(
                        "INSERT INTO findings BY NAME SELECT instance_id, rule, first_seen, engine, type, severity, "
                        "severity AS max_severity, value, threshold, summary, description, recommendation, "
                        "fired_at, last_seen FROM firing ON CONFLICT DO UPDATE SET severity = excluded.severity, "
                        "value = excluded.value, threshold = excluded.threshold, last_seen = excluded.last_seen, "
                        "description = excluded.description, max_severity = CASE WHEN "
                        + _SEVERITY_ORDER.format("excluded.severity")
                        + " > "
                        + _SEVERITY_ORDER.format("findings.max_severity")
                        + " THEN excluded.severity ELSE findings.max_severity END"
                    )
                if resolved.height:
                    db.register("resolved", resolved.to_arrow())
                    db.execute(
                        "UPDATE findings SET resolved_at = r.resolved_at, last_seen = r.last_seen FROM resolved r "
                        "WHERE findings.instance_id = r.instance_id AND findings.rule = r.rule "
                        "AND findings.first_seen = r.first_seen"
                    )
                db.execute("COMMIT")
            except Exception:
                db.execute("ROLLBACK")
                raise
            finally:
                for name in ("new_state", "firing", "resolved"):
                    db.unregister(name)

        await self._run(_save)

    async def findings(self, where: Sequence[str], params: Sequence[Any], limit: int) -> pl.DataFrame:
        """Stored finding episodes matching SQL predicates over the findings table, newest first."""

        def _query() -> pl.DataFrame:
            sql = "SELECT * FROM findings" + (" WHERE " + " AND ".join(where) if where else "")
            sql += " ORDER BY fired_at DESC, instance_id, rule LIMIT ?"
            frame = pl.from_arrow(self._db().sql(sql, params=[*params, limit]).to_arrow_table())
            assert isinstance(frame, pl.DataFrame)
            return frame

        return await self._run(_query)


_SEVERITY_ORDER = "list_position(['LOW', 'MEDIUM', 'HIGH', 'CRITICAL'], {})"


def _row(spec: InstanceSpec, source: InstanceSource, at: datetime) -> list[Any]:
    return [
        spec.id,
        spec.engine.value,
        spec.metrics_url,
        spec.dcgm_url,
        json.dumps(spec.gpu_selector),
        json.dumps(spec.labels),
        source.value,
        at,
    ]


def _instance(row: tuple[Any, ...]) -> Instance:
    id_, engine, metrics_url, dcgm_url, gpu_selector, labels, source, created_at = row
    return Instance(
        id=id_,
        engine=EngineName(engine),
        metrics_url=metrics_url,
        dcgm_url=dcgm_url,
        gpu_selector=json.loads(gpu_selector),
        labels=json.loads(labels),
        source=InstanceSource(source),
        created_at=created_at,
    )


def read_recent_scrapes(
    db: duckdb.DuckDBPyConnection,
    since: datetime,
    until: datetime,
    quantities: Iterable[str],
    instance_id: str | None = None,
) -> pl.DataFrame:
    """Successful scrapes in (since, until] from `db`'s `scrapes` with the given quantity columns,
    ordered by instance and then time: each instance's rows together and in time order, the layout
    detection reduces per instance without sorting them again. A function of the connection, so
    the detection benchmark reads its data with this very query."""
    columns = ", ".join(f'"{q}"' for q in sorted(quantities) if q in QUANTITY_COLUMNS)
    sql = (
        f"SELECT instance_id, ts{', ' + columns if columns else ''} FROM scrapes "
        "WHERE ok AND ts > ? AND ts <= ?"
        + (" AND instance_id = ?" if instance_id else "")
        + " ORDER BY instance_id, ts"
    )
    params: list[Any] = [since, until] + ([instance_id] if instance_id else [])
    frame = pl.from_arrow(db.sql(sql, params=params).to_arrow_table())
    assert isinstance(frame, pl.DataFrame)
    return frame.with_columns(pl.col("ts").dt.convert_time_zone("UTC"))
