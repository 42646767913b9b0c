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
    # Called once the scrapes a tick started have finished (rule evaluation); never overlapped.
    on_cycle: Callable[[], Awaitable[None]] | None = None
    health: dict[str, ScrapeHealth] = field(default_factory=dict)
    stats: PollerStats = field(default_factory=PollerStats)
    _inflight: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _cycle: asyncio.Task[None] | None = None

    async def run(self, instances: Callable[[], Awaitable[list[Instance]]]) -> None:
        """Tick forever at a fixed rate (not fixed delay) until cancelled."""
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        try:
            while True:
                self.stats.ticks += 1
                self.stats.last_tick_at = time.monotonic()
                started: list[asyncio.Task[None]] = []
                try:
                    for instance in await instances():
                        task = self._start(instance)
                        if task is not None:
                            started.append(task)
                except PerfAgentError as exc:
                    log.warning("cannot list instances: %s", exc.message)
                if self.on_cycle is not None and (self._cycle is None or self._cycle.done()):
                    self._cycle = asyncio.create_task(self._finish_cycle(started), name="poll-cycle")
                next_tick += self.interval
                now = loop.time()
                if next_tick < now:  # the loop itself fell behind: skip, do not burst
                    behind = int((now - next_tick) // self.interval) + 1
                    self.stats.missed_ticks += behind
                    next_tick += behind * self.interval
                await asyncio.sleep(next_tick - now)
        finally:
            pending = [*self._inflight.values(), *([self._cycle] if self._cycle else [])]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _finish_cycle(self, tasks: list[asyncio.Task[None]]) -> None:
        if tasks:
            await asyncio.wait(tasks)  # each scrape is bounded by scrape_timeout
        assert self.on_cycle is not None
        try:
            await self.on_cycle()
        except Exception:  # evaluation failing must not stop polling; the log says why
            log.exception("evaluation after the poll cycle failed")

    def _start(self, instance: Instance) -> asyncio.Task[None] | None:
        running = self._inflight.get(instance.id)
        if running is not None and not running.done():
            self.stats.skipped += 1
            return None
        task = asyncio.create_task(self.poll(instance), name=f"poll-{instance.id}")
        self._inflight[instance.id] = task
        return task

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
