"""The background poller: every `polling_interval` seconds it scrapes every watched instance.

Each tick starts one cycle and does not wait for it, so a slow cycle never delays the schedule. A
cycle fetches all its instances at once, then parses their bodies in batches, one Polars query per
batch (Polars' fixed cost per query is paid once per batch, not once per body):

* the first batch holds every body that arrived before all the cycle's fetches were done, or before
  `batch_window` seconds passed, whichever is first; a failed fetch is recorded at once and waited
  for by nobody;
* after that, each body that was still on its way (a slow target, up to `scrape_timeout`) is
  parsed as soon as the previous batch is done, together with any that arrived meanwhile.

So a slow target delays the others' records by `batch_window` at most (plus the parse of a batch
already running), and only its own beyond that.
An instance whose previous scrape is still running is skipped for that tick rather than scraped
twice at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from perfagent.clock import utc_now
from perfagent.collect import Collection, Fetch, SnapshotCache, failure_record, fetch, process, target_of
from perfagent.errors import PerfAgentError
from perfagent.history import HistoryWriter
from perfagent.models import Instance, ScrapeHealth
from perfagent.scrape import Scraper

log = logging.getLogger("perfagent.poller")

MAX_BATCH_WINDOW = 1.0  # seconds; a healthy fleet answers well within it


@dataclass(slots=True)
class PollerStats:
    ticks: int = 0
    skipped: int = 0  # instance-ticks skipped because the previous scrape was still running
    missed_ticks: int = 0  # ticks the loop itself could not start on time
    last_tick_at: float | None = None  # monotonic
    batches: int = 0  # parse batches (one Polars query each)
    parsed_bodies: int = 0  # bodies in those batches (engine and dcgm)


@dataclass(slots=True)
class Poller:
    scraper: Scraper
    snapshots: SnapshotCache
    history: HistoryWriter
    interval: float
    # Called once the scrapes a tick started have finished (rule evaluation); never overlapped.
    on_cycle: Callable[[], Awaitable[None]] | None = None
    # How long a cycle's first batch waits for slow fetches; None: a quarter of the interval, at
    # most MAX_BATCH_WINDOW.
    batch_window: float | None = None
    health: dict[str, ScrapeHealth] = field(default_factory=dict)
    stats: PollerStats = field(default_factory=PollerStats)
    # Instance id -> the cycle scraping it, from the fetch until its outcome is recorded. A cycle
    # releases only its own claims: the instance may be claimed by a later cycle by then.
    _inflight: dict[str, object] = field(default_factory=dict)
    _cycles: set[asyncio.Task[None]] = field(default_factory=set)
    _evaluation: asyncio.Task[None] | None = None

    async def run(self, instances: Callable[[], Awaitable[list[Instance]]]) -> None:
        """Tick forever at a fixed rate (not fixed delay) until cancelled."""
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        try:
            while True:
                self.stats.ticks += 1
                self.stats.last_tick_at = time.monotonic()
                listed: list[Instance] = []
                try:
                    listed = await instances()
                except PerfAgentError as exc:
                    log.warning("cannot list instances: %s", exc.message)
                cycle = asyncio.create_task(self.poll_once(listed), name="poll-cycle")
                self._cycles.add(cycle)
                cycle.add_done_callback(self._cycle_done)
                if self.on_cycle is not None and (self._evaluation is None or self._evaluation.done()):
                    self._evaluation = asyncio.create_task(self._finish_cycle(cycle), name="poll-evaluation")
                next_tick += self.interval
                now = loop.time()
                if next_tick < now:  # the loop itself fell behind: skip, do not burst
                    behind = int((now - next_tick) // self.interval) + 1
                    self.stats.missed_ticks += behind
                    next_tick += behind * self.interval
                await asyncio.sleep(next_tick - now)
        finally:
            pending = [*self._cycles, *([self._evaluation] if self._evaluation else [])]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def _cycle_done(self, cycle: asyncio.Task[None]) -> None:
        self._cycles.discard(cycle)
        if not cycle.cancelled() and (exc := cycle.exception()) is not None:
            log.error("poll cycle failed", exc_info=exc)  # a bug; the next tick starts afresh

    async def _finish_cycle(self, cycle: asyncio.Task[None]) -> None:
        await asyncio.wait([cycle])  # each scrape is bounded by scrape_timeout
        assert self.on_cycle is not None
        try:
            await self.on_cycle()
        except Exception:  # evaluation failing must not stop polling; the log says why
            log.exception("evaluation after the poll cycle failed")

    async def poll_once(self, instances: Sequence[Instance]) -> None:
        """One cycle: fetch every instance not still in flight, parse and record them in batches."""
        cycle = object()
        due: list[Instance] = []
        for instance in instances:
            if instance.id in self._inflight:
                self.stats.skipped += 1
            else:
                self._inflight[instance.id] = cycle
                due.append(instance)
        tasks = [asyncio.create_task(self._fetch(i, cycle), name=f"fetch-{i.id}") for i in due]
        try:
            window = self.batch_window
            if window is None:
                window = min(self.interval / 4, MAX_BATCH_WINDOW)
            pending: set[asyncio.Task[Fetch | None]] = set(tasks)
            timeout: float | None = window
            while pending:
                # The first wait returns when every fetch is done or the window has passed; the next
                # ones as soon as one more is done, taking all that are done by then.
                when = asyncio.ALL_COMPLETED if timeout is not None else asyncio.FIRST_COMPLETED
                done, pending = await asyncio.wait(pending, timeout=timeout, return_when=when)
                timeout = None
                fetched = [f for f in (task.result() for task in done) if f is not None]
                if fetched:
                    await self._process(fetched, cycle)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for instance in due:
                self._release(instance.id, cycle)

    def _release(self, instance_id: str, cycle: object) -> None:
        if self._inflight.get(instance_id) is cycle:
            del self._inflight[instance_id]

    async def _fetch(self, instance: Instance, cycle: object) -> Fetch | None:
        """Fetch one instance's bodies; a failure is recorded here, and None returned."""
        target = target_of(instance)
        started = time.perf_counter()
        at = utc_now()
        try:
            return await fetch(self.scraper, target)
        except PerfAgentError as exc:
            duration = time.perf_counter() - started
            self._failed(instance.id, at, f"{exc.code}: {exc.message}", duration)
            self.history.add(failure_record(target, at, exc, duration))
        except Exception as exc:  # a bug must not stop the poller; it is logged and recorded
            log.exception("scrape of %s failed unexpectedly", instance.id)
            self._failed(instance.id, at, f"INTERNAL_ERROR: {type(exc).__name__}: {exc}", None)
        self._release(instance.id, cycle)
        return None

    async def _process(self, fetched: list[Fetch], cycle: object) -> None:
        """Parse one batch off the event loop, then record each instance's outcome."""
        self.stats.batches += 1
        self.stats.parsed_bodies += sum(len(f.texts) for f in fetched)
        previous = [self.snapshots.get(f.target) for f in fetched]
        try:
            results = await asyncio.to_thread(process, fetched, previous)
        except Exception as exc:  # a parser bug: every instance of the batch fails, the poller goes on
            log.exception("parsing a batch of %d instances failed", len(fetched))
            for f in fetched:
                self._release(f.target.instance_id, cycle)
                self._failed(f.target.instance_id, f.at, f"INTERNAL_ERROR: {type(exc).__name__}: {exc}", None)
            return
        for f, result in zip(fetched, results, strict=True):
            instance_id = f.target.instance_id
            self._release(instance_id, cycle)
            if isinstance(result, Collection):
                self.snapshots.put(f.target, result.normalized.raw)
                health = self.health.setdefault(instance_id, ScrapeHealth())
                health.scrapes_total += 1
                health.last_success = result.normalized.window.end
                health.last_duration_seconds = result.duration_seconds
                self.history.add(result.record())
            elif isinstance(result, PerfAgentError):  # e.g. a body with no valid sample
                self._failed(instance_id, f.at, f"{result.code}: {result.message}", f.seconds)
                self.history.add(failure_record(f.target, f.at, result, f.seconds))
            else:
                log.error("processing %s failed unexpectedly", instance_id, exc_info=result)
                self._failed(instance_id, f.at, f"INTERNAL_ERROR: {type(result).__name__}: {result}", None)

    def _failed(self, instance_id: str, at: datetime, error: str, duration: float | None) -> None:
        health = self.health.setdefault(instance_id, ScrapeHealth())
        health.scrapes_total += 1
        health.errors_total += 1
        health.last_error = error
        health.last_error_at = at
        if duration is not None:
            health.last_duration_seconds = duration
