"""The background poller: every `polling_interval` seconds it scrapes every watched instance.

Each tick starts one scrape per instance and does not wait for them, so a slow or dead target never
delays the schedule of the others; an instance whose previous scrape is still running (it can take
up to `scrape_timeout`) is skipped for that tick rather than scraped twice at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from perfagent.clock import utc_now
from perfagent.collect import SnapshotCache, collect, failure_record, target_of
from perfagent.errors import PerfAgentError
from perfagent.history import HistoryWriter
from perfagent.models import Instance, ScrapeHealth
from perfagent.scrape import Scraper

log = logging.getLogger("perfagent.poller")


@dataclass(slots=True)
class PollerStats:
    ticks: int = 0
    skipped: int = 0  # instance-ticks skipped because the previous scrape was still running
    missed_ticks: int = 0  # ticks the loop itself could not start on time
    last_tick_at: float | None = None  # monotonic


@dataclass(slots=True)
class Poller:
    scraper: Scraper
    snapshots: SnapshotCache
    history: HistoryWriter
    interval: float
    health: dict[str, ScrapeHealth] = field(default_factory=dict)
    stats: PollerStats = field(default_factory=PollerStats)
    _inflight: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    async def run(self, instances: Callable[[], Awaitable[list[Instance]]]) -> None:
        """Tick forever at a fixed rate (not fixed delay) until cancelled."""
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        try:
            while True:
                self.stats.ticks += 1
                self.stats.last_tick_at = time.monotonic()
                try:
                    for instance in await instances():
                        self._start(instance)
                except PerfAgentError as exc:
                    log.warning("cannot list instances: %s", exc.message)
                next_tick += self.interval
                now = loop.time()
                if next_tick < now:  # the loop itself fell behind: skip, do not burst
                    behind = int((now - next_tick) // self.interval) + 1
                    self.stats.missed_ticks += behind
                    next_tick += behind * self.interval
                await asyncio.sleep(next_tick - now)
        finally:
            for task in self._inflight.values():
                task.cancel()
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)

    def _start(self, instance: Instance) -> None:
        running = self._inflight.get(instance.id)
        if running is not None and not running.done():
            self.stats.skipped += 1
            return
        self._inflight[instance.id] = asyncio.create_task(self.poll(instance), name=f"poll-{instance.id}")

    async def poll(self, instance: Instance) -> None:
        """Scrape one instance, record its health and queue its history record."""
        target = target_of(instance)
        started = time.perf_counter()
        at = utc_now()
        health = self.health.setdefault(instance.id, ScrapeHealth())
        try:
            collection = await collect(self.scraper, self.snapshots, target)
        except PerfAgentError as exc:
            health.scrapes_total += 1
            health.errors_total += 1
            health.last_error = f"{exc.code}: {exc.message}"
            health.last_error_at = at
            health.last_duration_seconds = time.perf_counter() - started
            self.history.add(failure_record(target, at, exc, health.last_duration_seconds))
            return
        except Exception as exc:  # a bug must not stop the poller; it is logged and recorded
            log.exception("scrape of %s failed unexpectedly", instance.id)
            health.scrapes_total += 1
            health.errors_total += 1
            health.last_error = f"INTERNAL_ERROR: {type(exc).__name__}: {exc}"
            health.last_error_at = at
            return
        health.scrapes_total += 1
        health.last_success = collection.normalized.window.end
        health.last_duration_seconds = collection.duration_seconds
        self.history.add(collection.record())
