"""`perfagent history`: ask the running agent's API, or read the DuckDB file when no agent runs.

DuckDB lets one process hold a database file for writing, so while an agent runs the file is its;
the CLI then goes through the API and opens the file itself only when no agent answers.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from perfagent.catalog import CATALOG
from perfagent.client import AgentAPIError, PerformanceAgentClient
from perfagent.clock import utc_now
from perfagent.history import QUANTITY_COLUMNS
from perfagent.timespec import parse_moment


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("history", help="what an instance looked like over a time range")
    parser.add_argument("instance_id")
    parser.add_argument("--since", default="1h", help="ISO time or duration ago (default 1h)")
    parser.add_argument("--until", default=None, help="ISO time or duration ago (default now)")
    parser.add_argument("--fields", default=None, help="comma-separated quantities (default: a summary set)")
    parser.add_argument("--url", default="http://127.0.0.1:8002", help="the agent's base URL")
    parser.add_argument("--db", type=Path, default=Path("data/perfagent.duckdb"), help="DuckDB file")
    parser.add_argument("--format", choices=["table", "csv", "json"], default="table")


DEFAULT_FIELDS = (
    "requests_running",
    "requests_waiting",
    "kv_cache_usage",
    "ttft_seconds",
    "itl_seconds",
    "generation_tokens_per_second",
    "preemption_rate",
)


def _from_api(args: argparse.Namespace, fields: list[str]) -> pl.DataFrame:
    client = PerformanceAgentClient(args.url, timeout=10)
    body = client.metrics_history(args.instance_id, since=args.since, until=args.until, fields=fields)
    rows = [{"ts": p["ts"], "ok": p["ok"], **p["values"]} for p in body["points"]]
    return pl.DataFrame(rows, schema={"ts": pl.String, "ok": pl.Boolean, **{f: pl.Float64 for f in fields}})


def _from_file(args: argparse.Namespace, fields: list[str]) -> pl.DataFrame:
    now = utc_now()
    since = parse_moment(args.since, now=now)
    until = parse_moment(args.until, now=now) if args.until else now
    columns = ", ".join(f'"{f}"' for f in fields)
    with duckdb.connect(str(args.db), read_only=True) as db:
        table = db.sql(
            f"SELECT strftime(ts, '%Y-%m-%dT%H:%M:%S.%gZ') AS ts, ok, {columns} FROM scrapes "
            "WHERE instance_id = ? AND ts >= ? AND ts <= ? ORDER BY ts",
            params=[args.instance_id, since, until],
        ).to_arrow_table()
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame


def run(args: argparse.Namespace) -> int:
    fields = [f.strip() for f in args.fields.split(",")] if args.fields else list(DEFAULT_FIELDS)
    unknown = [f for f in fields if f not in CATALOG]
    if unknown:
        print(
            f"perfagent history: unknown field {unknown[0]!r}; known: {', '.join(QUANTITY_COLUMNS)}",
            file=sys.stderr,
        )
        return 2
    try:
        frame = _from_api(args, fields)
        print(f"source: the running agent's API at {args.url}", file=sys.stderr)
    except AgentAPIError as exc:
        print(f"perfagent history: {exc}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        if not args.db.exists():
            print(f"perfagent history: no agent at {args.url} and no database at {args.db}", file=sys.stderr)
            return 1
        try:
            frame = _from_file(args, fields)
        except (duckdb.Error, ValueError) as exc:
            print(
                f"perfagent history: no agent at {args.url}, and {args.db} cannot be read: {exc}",
                file=sys.stderr,
            )
            return 1
        print(f"source: the DuckDB file {args.db} (no agent answered at {args.url})", file=sys.stderr)
    _print(frame, args.format)
    return 0


def _print(frame: pl.DataFrame, fmt: str) -> None:
    if fmt == "csv":
        sys.stdout.write(frame.write_csv())
    elif fmt == "json":
        rows: list[dict[str, Any]] = frame.to_dicts()
        sys.stdout.write(json.dumps(rows) + "\n")
    else:
        with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200, tbl_hide_dataframe_shape=True):
            print(frame)
