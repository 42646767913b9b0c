"""Detection as a service: after every poll cycle, evaluate the rules over the fleet's stored history,
fold the result into the findings' `for`/`keep_firing_for` state, and persist both in DuckDB.

The pure parts live in `detect` (evaluation) and `findings` (the state machine); this module only
loads their inputs and stores their outputs, off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import datetime

import polars as pl

from perfagent.detect import CompiledRules, Evaluation, engine_lookup, evaluate
from perfagent.findings import FindingTracker, Step
from perfagent.store import Store

log = logging.getLogger("perfagent.detection")


def with_engines(frame: pl.DataFrame, engines: Mapping[str, str]) -> pl.DataFrame:
    """Scrape rows carry no engine; rules filter on it, so join it from the instance list."""
    return frame.join(engine_lookup(engines), on="instance_id", how="left")


@dataclass(slots=True)
class Detector:
    store: Store
    compiled: CompiledRules
    tracker: FindingTracker
    pool: Executor | None = None  # evaluate()'s threads; the app keeps one for its life
    state: pl.DataFrame = field(default_factory=FindingTracker.empty_state)
    evaluations: int = 0
    last_seconds: float | None = None
    last_at: datetime | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def restore(self) -> None:
        """Resume the findings' state from the store, so `for` timers survive restarts."""
        self.state = await self.store.load_finding_state()

    async def evaluate_history(
        self,
        at: datetime,
        engines: Mapping[str, str],
        instance_id: str | None = None,
        extra: pl.DataFrame | None = None,
    ) -> Evaluation:
        """Evaluate every rule at `at` over the stored scrapes of the rules' widest window, plus
        `extra` rows of the same shape (instances analysed from PromQL)."""
        frame = await self.store.recent_scrapes(
            at - self.compiled.max_window, at, self.compiled.quantities, instance_id
        )
        if extra is not None and extra.height:
            frame = pl.concat([frame, extra], how="diagonal_relaxed")
        # Engines per instance, not joined onto every row: the rules need one engine per instance.
        return await asyncio.to_thread(evaluate, self.compiled, frame, at, engines=engines, pool=self.pool)

    async def run_cycle(
        self,
        at: datetime,
        engines: Mapping[str, str],
        extra: pl.DataFrame | None = None,
        more_results: pl.DataFrame | None = None,
    ) -> Step:
        """One evaluation of the whole fleet (`extra`: rows computed by Prometheus), folded into the
        persisted findings with `more_results` (RESULT_SCHEMA rows of other evaluations: SLO burn rates)."""
        async with self._lock:  # cycles never overlap: each one reads the state the last one wrote
            started = time.perf_counter()
            evaluation = await self.evaluate_history(at, engines, extra=extra)
            results = evaluation.results
            if more_results is not None and more_results.height:
                results = pl.concat([results, more_results], how="diagonal_relaxed")
            step = self.tracker.advance(self.state, results, at)
            await self.store.save_findings(step)
            self.state = step.state
            self.evaluations += 1
            self.last_seconds = time.perf_counter() - started
            self.last_at = at
            fired = step.transitions.filter(pl.col("kind") == "fired")
            for row in fired.iter_rows(named=True):
                log.info(
                    "finding fired: %s on %s (%s %s)",
                    row["rule"],
                    row["instance_id"],
                    row["type"],
                    row["severity"],
                    extra={"value": row["value"], "threshold": row["threshold"]},
                )
            return step
