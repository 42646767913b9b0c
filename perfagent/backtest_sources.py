"""Where backtests read their data and rules: the history DuckDB file (when no agent holds it),
Prometheus (PromQL computing the rules' quantities), and rule files sent inline to the API."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final

import duckdb
import polars as pl

from perfagent.backtest import check_rows, data_start, grid
from perfagent.clock import utc_now
from perfagent.detect import CompiledRules
from perfagent.discovery import find_targets, infer_engine, instance_id
from perfagent.history import QUANTITY_COLUMNS
from perfagent.models import EngineName, Instance, InstanceSource
from perfagent.promclient import MAX_POINTS, PromClient
from perfagent.promql import SeriesSelector
from perfagent.promql_source import identity, range_frame
from perfagent.rules import RuleFileError, RuleProblem, RuleSet, load_rules

INLINE_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}\.ya?ml$")


# --- the history file ------------------------------------------------------------------------------


def _engine_of_hint(hint: str | None) -> str | None:
    """The engine an `engine_version` hint names (`vllm-v1` -> vllm): hints start with the engine."""
    head = (hint or "").split("-", 1)[0]
    return head if head in {e.value for e in EngineName} else None


def read_history_file(
    db: Path, compiled: CompiledRules, start: datetime, end: datetime, instance: str | None = None
) -> tuple[pl.DataFrame, dict[str, str | None]]:
    """The rules' quantities from the DuckDB file, opened read-only, and each instance's engine.

    Engines come from the `instances` table, else from the last scrape's engine-version hint (the
    demo fleet and deleted instances are not in the table).
    """
    since = data_start(compiled, start)
    where = "ok AND ts > ? AND ts <= ?" + (" AND instance_id = ?" if instance else "")
    params: list[Any] = [since, end] + ([instance] if instance else [])
    with duckdb.connect(str(db), read_only=True) as conn:
        present = {
            row[0]
            for row in conn.execute(
                "SELECT column_name FROM duckdb_columns() WHERE table_name = 'scrapes'"
            ).fetchall()
        }
        columns = [q for q in sorted(compiled.quantities) if q in present and q in QUANTITY_COLUMNS]
        [(counted,)] = conn.execute(f"SELECT count(*) FROM scrapes WHERE {where}", params).fetchall()
        check_rows(int(counted))
        select = ", ".join(["instance_id", "ts", *(f'"{q}"' for q in columns)])
        table = conn.sql(
            f"SELECT {select} FROM scrapes WHERE {where} ORDER BY ts", params=params
        ).to_arrow_table()
        engines: dict[str, str | None] = {
            row[1]: _engine_of_hint(row[0])
            for row in conn.execute(
                "SELECT arg_max(engine_version, ts), instance_id FROM scrapes "
                "WHERE engine_version IS NOT NULL GROUP BY instance_id"
            ).fetchall()
        }
        engines.update(
            {row[0]: row[1] for row in conn.execute("SELECT id, engine FROM instances").fetchall()}
        )
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame.with_columns(pl.col("ts").dt.convert_time_zone("UTC")), engines


# --- Prometheus -----------------------------------------------------------------------------------


def labelled_instance(label: str, engine: EngineName) -> Instance:
    """An instance whose series carry `instance="<label>"` (the id is the label itself)."""
    return Instance(
        id=label,
        engine=engine,
        metrics_url=f"http://{label}/metrics",  # never fetched: the data comes from Prometheus
        labels={"instance": label},
        source=InstanceSource.CONFIG,
        created_at=utc_now(),
    )


async def discovered_instances(client: PromClient, selector: str, at: datetime) -> list[Instance]:
    """The targets of `selector` Prometheus knew at `at`, named and typed as discovery does."""
    found: list[Instance] = []
    for target in await find_targets(client, SeriesSelector.parse(selector), at):
        engine = infer_engine(target.names)
        if engine is None:
            continue
        labels = {"instance": target.instance} | ({"job": target.job} if target.job is not None else {})
        found.append(
            Instance(
                id=instance_id(target.job, target.instance),
                engine=engine,
                metrics_url=f"http://{target.instance}/metrics",
                labels=labels,
                source=InstanceSource.DISCOVERED,
                created_at=utc_now(),
            )
        )
    return found


def unlabelled(instances: Sequence[Instance]) -> list[str]:
    """Instances Prometheus cannot be asked about: no `instance` label to match their series."""
    return [i.id for i in instances if identity(i) is None]


async def prometheus_frame(
    client: PromClient,
    instances: Sequence[Instance],
    compiled: CompiledRules,
    start: datetime,
    end: datetime,
    step: timedelta,
) -> pl.DataFrame:
    """The rules' quantities at every evaluation time (and the look-back before the first), computed
    by PromQL, in range queries short enough that Prometheus keeps the step as asked."""
    first, count = grid(start, end, step)
    lead = -(-compiled.max_window // step)  # whole steps of look-back before the first evaluation
    check_rows(len(instances) * (count + lead))
    if not count or not instances:
        return pl.DataFrame(
            {"instance_id": [], "ts": []}, schema={"instance_id": pl.String, "ts": pl.Datetime("us", "UTC")}
        )
    at, last = first - lead * step, first + (count - 1) * step
    per_call = MAX_POINTS - 1000  # margin under the limit, so fit_step never widens the step
    parts: list[pl.DataFrame] = []
    while at <= last:
        until = min(last, at + (per_call - 1) * step)
        parts.append(await range_frame(client, instances, compiled.quantities, at, until, step))
        at = until + step
    return pl.concat(parts, how="diagonal_relaxed")


# --- inline rules ------------------------------------------------------------------------------------


def load_inline_rules(texts: Mapping[str, str], paths: Sequence[Path] = ()) -> RuleSet:
    """The built-ins, the rule files or directories in `paths`, then `texts` (file name -> YAML) on
    top, through the one loader. Problems name the given file names, not a temporary directory."""
    bad = [name for name in texts if not INLINE_NAME.match(name)]
    if bad:
        raise ValueError(f"rule file name {bad[0]!r} must look like 'slo.yaml' (letters, digits, ._-)")
    with tempfile.TemporaryDirectory(prefix="perfagent-rules-") as tmp:
        folder = Path(tmp)
        for name, text in texts.items():
            (folder / name).write_text(text, encoding="utf-8")
        try:
            ruleset = load_rules([*paths, folder] if texts else list(paths))
        except RuleFileError as exc:
            raise RuleFileError([_renamed(p, folder) for p in exc.problems]) from None
    return RuleSet(
        tuple(replace(r, file=Path(r.file.name)) if r.file.parent == folder else r for r in ruleset),
        tuple(Path(f.name) if f.parent == folder else f for f in ruleset.files),
    )


def _renamed(problem: RuleProblem, folder: Path) -> RuleProblem:
    return replace(problem, file=Path(problem.file.name)) if problem.file.parent == folder else problem
