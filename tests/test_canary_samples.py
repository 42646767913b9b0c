"""The judge's samples from a real DuckDB history, and the whole canary on the simulator: change one
instance through the sim executor, confirm it, scrape both over HTTP into history, judge."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from perfagent.canary_samples import canary_samples
from perfagent.effect import EffectStatus, confirm_effect
from perfagent.errors import PerfAgentError
from perfagent.executors.base import Action, StepOutcome
from perfagent.executors.config import SimConfig
from perfagent.executors.sim import SimExecutor
from perfagent.exposition import parse_exposition
from perfagent.history import HistoryWriter, ScrapeRecord
from perfagent.judge import DEFAULT_METRICS, Decision, Outcome, judge
from perfagent.models import EngineName, Instance, InstanceSource
from perfagent.normalize import RawSnapshot, normalize
from perfagent.scrape import Scraper
from perfagent.sim.fleet import SimFleet
from perfagent.store import Store
from perfagent.targets import TargetPolicy
from tests.conftest import AiohttpServer

T0 = datetime(2026, 3, 1, tzinfo=UTC)
STEP = 15  # seconds between scrapes
LOOPBACK = TargetPolicy.from_entries(["127.0.0.0/8"])
TTFT = [s for s in DEFAULT_METRICS if s.name in ("ttft", "throughput")]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / "history.duckdb")
    yield s
    await s.close()


def _record(
    instance: str, seconds: float, ttft: float | None, *, ok: bool = True, kind: str = "since_previous"
) -> ScrapeRecord:
    return ScrapeRecord(
        instance,
        T0 + timedelta(seconds=seconds),
        "http://127.0.0.1/metrics",
        ok,
        0.01,
        window_kind=kind if ok else None,
        window_seconds=STEP if ok and kind == "since_previous" else None,
        values={"ttft_seconds": ttft, "generation_tokens_per_second": 100.0} if ok else {},
    )


async def test_samples_are_windows_after_the_warm_up_with_baselines_pooled(store: Store) -> None:
    writer = HistoryWriter(store, flush_interval=60, retention=timedelta(days=3650))
    rows = [
        _record("canary", 0, 9.0),  # before the change
        _record("canary", 30, 8.0),  # inside the warm-up
        _record("canary", 80, 7.0),  # its window (65-80 s) began inside the warm-up (ends at 70 s)
        _record("canary", 95, 1.0),
        _record("canary", 110, None),  # no request finished in this window: no TTFT sample
        _record("canary", 125, None, ok=False),  # a failed scrape
        _record("canary", 140, 2.0),
        _record("b1", 95, 0.5, kind="lifetime"),  # the agent's first scrape: a lifetime mean
        _record("b1", 110, 0.6),
        _record("b2", 110, 0.7),
        _record("b2", 200, 0.8),  # after the end
        _record("other", 110, 50.0),  # not in the group
    ]
    for row in rows:
        writer.add(row)
    assert await writer.flush() == len(rows)
    samples = await canary_samples(
        store,
        canary_id="canary",
        baseline_ids=["b1", "b2"],
        start=T0 + timedelta(seconds=10),
        end=T0 + timedelta(seconds=150),
        warmup=timedelta(seconds=60),
        specs=TTFT,
    )
    assert samples.since == T0 + timedelta(seconds=70)
    assert samples.canary["ttft"].tolist() == [1.0, 2.0]
    assert sorted(samples.baseline["ttft"].tolist()) == [0.6, 0.7]
    assert samples.canary["throughput"].tolist() == [100.0, 100.0, 100.0]
    with pytest.raises(ValueError, match="its own baseline"):
        await canary_samples(
            store, canary_id="b1", baseline_ids=["b1"], start=T0, end=T0, warmup=timedelta(0), specs=TTFT
        )


class SimCanary:
    """The poller's path over real HTTP, with simulated time: the simulator's manual clock moves in
    STEP-second steps and each scrape is stamped T0 + simulated time, as a real poller would stamp it."""

    def __init__(self, fleet: SimFleet, instances: list[Instance], scraper: Scraper, store: Store) -> None:
        self.fleet, self.instances, self.scraper = fleet, instances, scraper
        self.writer = HistoryWriter(store, flush_interval=60, retention=timedelta(days=3650))
        self.previous: dict[str, RawSnapshot] = {}
        self.seconds = 0.0

    @property
    def now(self) -> datetime:
        return T0 + timedelta(seconds=self.seconds)

    async def run(self, seconds: float) -> None:
        for _ in range(int(seconds // STEP)):
            self.fleet.advance(STEP)
            self.seconds += STEP
            for inst in self.instances:
                try:
                    fetched = await self.scraper.fetch(inst.metrics_url)
                except PerfAgentError as exc:  # 503 while the instance restarts
                    self.writer.add(
                        ScrapeRecord(inst.id, self.now, inst.metrics_url, False, 0.0, error=exc.message)
                    )
                    continue
                n = normalize(
                    "vllm", parse_exposition(fetched.text), at=self.now, previous=self.previous.get(inst.id)
                )
                self.previous[inst.id] = n.raw
                self.writer.add(
                    ScrapeRecord(
                        inst.id,
                        self.now,
                        inst.metrics_url,
                        True,
                        0.0,
                        window_kind=n.window.kind,
                        window_seconds=n.window.seconds,
                        values=dict(n.values),
                    )
                )
        await self.writer.flush()


async def _canary(
    aiohttp_server: AiohttpServer, store: Store, change: dict[str, Any], seed: int
) -> tuple[Any, Any, Any]:
    """Two vLLM instances under the same steady load; `change` goes to the first; judge 10 minutes
    after a 60 s warm-up."""
    fleet = SimFleet("vllm", 2, seed=seed, clock="manual", load="steady", restart_seconds=30)
    server = await aiohttp_server(fleet.app())
    instances = [
        Instance(
            id=sim_id,
            engine=EngineName.VLLM,
            metrics_url=str(server.make_url(f"/instances/{sim_id}/metrics")),
            labels={"deployment_group": "chat"},
            source=InstanceSource.SIMULATOR,
            created_at=T0,
        )
        for sim_id in fleet.instances
    ]
    scraper = Scraper(LOOPBACK, timeout=5.0, max_bytes=16 * 1024 * 1024, concurrency=4, user_agent="test")
    executor = SimExecutor(LOOPBACK, SimConfig())
    try:
        canary = SimCanary(fleet, instances, scraper, store)
        await canary.run(120)  # both serve the load for two minutes first
        changed_at = canary.now
        step = await executor.apply(Action("wf/canary/0/vllm-0", instances[0], change))
        assert step.outcome is StepOutcome.APPLIED, step.message
        warmup = timedelta(seconds=60)
        await canary.run(warmup.total_seconds())
        effect = await confirm_effect(instances[0], change, scraper)
        await canary.run(600)
        samples = await canary_samples(
            store,
            canary_id="vllm-0",
            baseline_ids=["vllm-1"],
            start=changed_at,
            end=canary.now,
            warmup=warmup,
        )
    finally:
        await executor.close()
        await scraper.close()
    return step, effect, judge(samples.canary, samples.baseline)


async def test_a_harmful_change_fails_on_latency(aiohttp_server: AiohttpServer, store: Store) -> None:
    # Four sequences at a time cannot carry 3 requests/s of 250-token answers: requests queue.
    step, effect, verdict = await _canary(aiohttp_server, store, {"max_num_seqs": 4}, seed=4)
    assert step.returned["restarted"] is True
    assert effect.status is EffectStatus.CONFIRMED  # max_num_seqs, as the simulator reports it
    assert verdict.outcome is Outcome.FAIL, verdict.reason
    decisions = {m.name: m for m in verdict.metrics}
    for name in ("ttft", "e2e_latency"):
        assert decisions[name].decision is Decision.WORSE, decisions[name].reason
        assert decisions[name].effect_size is not None and decisions[name].effect_size > 0.9
        assert decisions[name].n_canary == 40 and decisions[name].n_baseline == 40
    assert decisions["throughput"].decision is Decision.WORSE  # a queueing canary serves less
    assert set(verdict.regressions) >= {"ttft", "e2e_latency"}


@pytest.mark.parametrize("seed", [4, 9])
async def test_the_same_settings_never_fail(aiohttp_server: AiohttpServer, store: Store, seed: int) -> None:
    # The "change" is the default: nothing is sent, nothing restarts, both instances stay alike.
    step, effect, verdict = await _canary(aiohttp_server, store, {"max_num_seqs": 1024}, seed=seed)
    assert step.returned["already_applied"] is True
    assert effect.status is EffectStatus.CONFIRMED
    assert verdict.outcome in (Outcome.PASS, Outcome.INCONCLUSIVE), verdict.reason
    assert verdict.regressions == []
    assert all(m.n_canary >= 40 for m in verdict.metrics)
