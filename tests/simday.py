"""A simulated day of a mixed fleet with incidents at known times, through the poller's scrape path.

Each scrape is the simulator's exposition text, parsed and normalized exactly as the poller does
(previous snapshot and all). A day of four instances is 11,520 scrapes, several minutes of CPU, so
the day is generated once into `tests/fixtures/sim-day.parquet` (offsets from the day's start, so
tests place it on any date) and `tests/test_backtest.py` checks a live regeneration of its start
against the file. Regenerate after changing the simulator or normalization:

    .venv/bin/python -m tests.simday
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import polars as pl

from perfagent.exposition import parse_exposition
from perfagent.history import QUANTITY_COLUMNS, ScrapeRecord, scrape_frame
from perfagent.normalize import RawSnapshot, normalize
from perfagent.sim.fleet import SimFleet
from perfagent.store import Store

FIXTURE: Final = Path(__file__).parent / "fixtures" / "sim-day.parquet"
STEP: Final = 30  # seconds between scrapes
DAY: Final = 86_400
SEED: Final = 11
# The fleet: SimFleet("mixed", 4) is vllm-0, tgi-1, sglang-2, vllm-3, all at the steady load.
INSTANCES: Final = 4


@dataclass(frozen=True, slots=True)
class Incident:
    """A load change on one instance, and the rules it should fire (and no other)."""

    instance_id: str
    load: dict[str, Any]
    start: timedelta  # from the day's start
    end: timedelta  # the load returns to steady
    primary: str  # the rule that names the incident
    rules: frozenset[str]  # the built-in rules it fires: the primary and the symptoms that come with it
    onset: timedelta  # how long the simulator takes to show the symptom after the load changes
    drain: timedelta  # how long the symptoms take to clear after the load returns to steady


INCIDENTS: Final = (
    # About 1.2x what the instance can serve once its KV cache is full: the queue grows, the KV cache
    # fills (the trend rules warn first) and preempts, and both latencies follow; the backlog drains
    # within minutes afterwards.
    Incident(
        "vllm-0",
        {"scenario": "overload", "rate": 13.0},
        timedelta(hours=3),
        timedelta(hours=3, minutes=40),
        "QueueBuildup",
        frozenset(
            {
                "QueueBuildup",
                "QueueGrowing",
                "KVCacheFullSoon",
                "KVCachePreemption",
                "HighTTFT",
                "HighInterTokenLatency",
            }
        ),
        onset=timedelta(minutes=1),
        drain=timedelta(minutes=10),
    ),
    # Long contexts past the KV capacity: preemptions within about three minutes, then a queue.
    # The workload shares no prefixes, so the prefix-cache rule fires too (rightly: its guard is
    # prompt traffic, which is there).
    Incident(
        "vllm-3",
        {"scenario": "kv_exhaustion"},
        timedelta(hours=14),
        timedelta(hours=14, minutes=30),
        "KVCachePreemption",
        frozenset(
            {
                "KVCachePreemption",
                "KVCacheFullSoon",
                "QueueBuildup",
                "QueueGrowing",
                "HighTTFT",
                "HighInterTokenLatency",
                "LowPrefixCacheHitRate",
            }
        ),
        onset=timedelta(minutes=3),
        drain=timedelta(minutes=10),
    ),
    # A phase of long unique prompts below the queueing point: nothing from the prefix cache, and
    # long prefills stall the decode batch.
    Incident(
        "sglang-2",
        {"scenario": "long_prompts_no_reuse", "rate": 2.0},
        timedelta(hours=9),
        timedelta(hours=10),
        "LowPrefixCacheHitRate",
        frozenset({"LowPrefixCacheHitRate", "HighInterTokenLatency"}),
        onset=timedelta(minutes=2),
        drain=timedelta(minutes=2),
    ),
)


def generate(seconds: int = DAY, *, progress: bool = False) -> pl.DataFrame:
    """Scrape the fleet every STEP seconds for `seconds`, incidents included: one row per scrape
    (instance_id, offset seconds from the start, window_kind, engine_version, every quantity)."""
    fleet = SimFleet("mixed", INSTANCES, seed=SEED, clock="manual", epoch=0.0)
    origin = datetime(2000, 1, 1, tzinfo=UTC)  # normalize needs times; only offsets are kept
    changes = sorted(
        [(i.start, i.instance_id, i.load) for i in INCIDENTS]
        + [(i.end, i.instance_id, {"scenario": "steady"}) for i in INCIDENTS],
        key=lambda change: change[0],
    )
    previous: dict[str, RawSnapshot] = {}
    rows: list[dict[str, Any]] = []
    for offset in range(STEP, seconds + 1, STEP):
        for at, instance_id, load in changes:
            if offset - STEP < at.total_seconds() <= offset:
                fleet.advance(at.total_seconds() - (offset - STEP), ids=[instance_id])
                fleet.set_load(load, ids=[instance_id])
        for inst in fleet.instances.values():
            fleet.advance(offset - inst.now, ids=[inst.id])
            text = fleet.render(inst.id)
            assert text is not None  # nobody restarts: no knob changes
            n = normalize(
                inst.engine,
                parse_exposition(text),
                at=origin + timedelta(seconds=offset),
                previous=previous.get(inst.id),
            )
            previous[inst.id] = n.raw
            rows.append(
                {
                    "instance_id": inst.id,
                    "offset": offset,
                    "window_kind": n.window.kind,
                    "engine_version": n.engine_version_hint,
                    **{q: n.values.get(q) for q in QUANTITY_COLUMNS},
                }
            )
        if progress and offset % 3600 == 0:
            print(f"{offset // 3600} h", file=sys.stderr, flush=True)
    return pl.DataFrame(
        rows,
        schema={
            "instance_id": pl.String,
            "offset": pl.Int64,
            "window_kind": pl.String,
            "engine_version": pl.String,
            **dict.fromkeys(QUANTITY_COLUMNS, pl.Float64),
        },
        orient="row",
    )


def day_start() -> datetime:
    """Where tests place the day: the UTC midnight two days ago, inside any retention."""
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=2)


def records(day: datetime) -> list[ScrapeRecord]:
    """The stored day as the scrape records the poller hands the history writer."""
    frame = pl.read_parquet(FIXTURE)
    quantities = [q for q in QUANTITY_COLUMNS if q in frame.columns]
    return [
        ScrapeRecord(
            row["instance_id"],
            day + timedelta(seconds=row["offset"]),
            f"http://{row['instance_id']}/metrics",
            True,
            0.01,
            window_kind=row["window_kind"],
            window_seconds=None if row["window_kind"] == "lifetime" else float(STEP),
            engine_version=row["engine_version"],
            values={q: row[q] for q in quantities},
        )
        for row in frame.iter_rows(named=True)
    ]


async def write_day(path: Path, day: datetime) -> None:
    """The day, placed at `day`, written into a DuckDB history file the way the agent writes it."""
    store = await Store.open(path)
    try:
        await store.write_history(scrape_frame(records(day)), pl.DataFrame())
    finally:
        await store.close()


def engines() -> dict[str, str]:
    fleet = SimFleet("mixed", INSTANCES, seed=SEED, clock="manual", epoch=0.0)
    return {i.id: i.engine for i in fleet.instances.values()}


def main() -> None:
    frame = generate(progress=True)
    # Drop all-null columns' cost, not the columns: zstd keeps the file small.
    frame.write_parquet(FIXTURE, compression="zstd", compression_level=19, statistics=False)
    print(f"wrote {frame.height} scrapes to {FIXTURE} ({FIXTURE.stat().st_size:,} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
