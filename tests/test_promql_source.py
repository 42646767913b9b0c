"""PromQL-only analysis against a real Prometheus: what Prometheus computes from its scrapes of a
simulated fleet agrees with what the agent computes from its own scrapes of the same instances; a
30-day window is computed inside PromQL under the point limit; a Prometheus that is down is a clear
SERVICE_UNAVAILABLE."""

from __future__ import annotations

import asyncio
import bisect
import math
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from perfagent.catalog import CATALOG, Kind
from perfagent.clock import utc_now
from perfagent.collect import SnapshotCache, collect, target_of
from perfagent.errors import ServiceUnavailableError
from perfagent.models import EngineName, Instance, InstanceSource
from perfagent.normalize import Normalized
from perfagent.promclient import MAX_POINTS, PromClient, points
from perfagent.promql_source import frame_schema, instant_frame, range_frame
from perfagent.scrape import Scraper
from perfagent.sim.fleet import SimFleet
from perfagent.targets import TargetPolicy
from tests.conftest import free_port
from tests.prometheus import backfilled_prometheus, running_prometheus
from tests.promfleet import SimTarget, scrape_configs, scraped_after, targets_of

# Per-second rates divide by wall-clock seconds: the agent by the time between its two scrapes,
# Prometheus by its (extrapolated) window. Only the real-clock test compares them.
RATES = frozenset(name for name, q in CATALOG.items() if q.kind is Kind.RATE)
GPU = frozenset(name for name in CATALOG if name.startswith("gpu_"))  # no DCGM in the simulator


@contextmanager
def _client(url: str) -> Iterator[PromClient]:
    client = PromClient(url, timeout=5, retries=0)
    try:
        yield client
    finally:
        client.close()


@asynccontextmanager
async def _scraper() -> AsyncIterator[Scraper]:
    scraper = Scraper(
        TargetPolicy.from_entries(["127.0.0.0/8"]),
        timeout=5,
        max_bytes=1 << 24,
        concurrency=4,
        user_agent="test",
    )
    try:
        yield scraper
    finally:
        await scraper.close()


async def _fleet(
    aiohttp_server: AiohttpServer, *, clock: str, load: dict[str, Any], seconds: float = 0.0
) -> tuple[list[SimFleet], list[SimTarget]]:
    """vLLM V1, TGI and SGLang on one sim server, vLLM V0 on another (manual clock: `seconds` on)."""
    mixed = SimFleet("mixed", 3, seed=1, clock=clock, load=load)  # type: ignore[arg-type]
    v0 = SimFleet("vllm", 1, seed=2, clock=clock, vllm_version="v0", load=load)  # type: ignore[arg-type]
    for fleet in (mixed, v0):
        if clock == "manual":
            fleet.advance(seconds)
    s1: TestServer = await aiohttp_server(mixed.app())
    s0: TestServer = await aiohttp_server(v0.app())
    return [mixed, v0], targets_of(mixed, s1) + targets_of(v0, s0, prefix="v0-")


def _same(agent: float | None, prom: float | None, *, exact: bool) -> bool:
    if agent is None or prom is None:
        return agent is None and prom is None
    return agent == prom if exact else math.isclose(agent, prom, rel_tol=1e-9, abs_tol=1e-12)


async def test_promql_agrees_with_the_agents_own_scrapes(
    tmp_path: Path, aiohttp_server: AiohttpServer
) -> None:
    """Manual clock: the fleet holds state A, then jumps to state B. The agent scrapes A and B; every
    Prometheus sample is A or B too, so gauges and counters are the same numbers, and ratios of
    increases (means, quantiles, hit and error rates) agree as well: Prometheus's extrapolation
    scales numerator and denominator alike."""
    fleets, targets = await _fleet(aiohttp_server, clock="manual", load={"scenario": "steady"}, seconds=600)
    instances = [t.as_instance() for t in targets]
    with running_prometheus(tmp_path, scrape_configs(targets)) as url, _client(url) as client:
        async with _scraper() as scraper:
            cache = SnapshotCache()
            began = utc_now()
            await scraped_after(client, began, len(targets))
            await asyncio.sleep(2)  # a few samples of state A
            for inst in instances:
                await collect(scraper, cache, target_of(inst))
            for fleet in fleets:
                fleet.advance(60)
            await scraped_after(client, utc_now(), len(targets))
            mine: dict[str, Normalized] = {}
            for inst in instances:
                mine[inst.id] = (await collect(scraper, cache, target_of(inst))).normalized
            at = utc_now()
            frame = await instant_frame(client, instances, CATALOG, at, at - began)

    assert frame.schema == frame_schema(CATALOG)
    assert sorted(frame["instance_id"]) == sorted(i.id for i in instances)
    compared = 0
    for row in frame.iter_rows(named=True):
        normalized = mine[row["instance_id"]]
        assert normalized.window.kind == "since_previous"
        for name, quantity in CATALOG.items():
            if name in RATES:
                continue
            exact = quantity.kind in (Kind.GAUGE, Kind.COUNTER)
            agent, prom = normalized.values[name], row[name]
            assert _same(agent, prom, exact=exact), (row["instance_id"], name, agent, prom)
            compared += agent is not None
    # Every engine fed most of the catalog: nothing passed by both sides being null.
    assert compared >= 4 * 15
    by_id = {r["instance_id"]: r for r in frame.iter_rows(named=True)}
    assert by_id["tgi-1"]["kv_cache_usage"] is None  # TGI exports no KV capacity, here as in normalize
    assert by_id["vllm-0"]["ttft_seconds_p99"] is not None
    assert by_id["v0-vllm-0"]["queue_time_seconds"] is None  # the simulated V0 has no queue histogram


async def test_rates_agree_over_the_same_window(tmp_path: Path, aiohttp_server: AiohttpServer) -> None:
    """Real clock, steady load: per-second rates over the agent's window between two scrapes and
    Prometheus's rate over the same span estimate the same traffic. Prometheus's samples sit up to
    1 s from the agent's scrapes and it extrapolates to the window's edges, so the two differ by the
    arrivals in those edges: ten requests a second over 15 s keep that within a few percent."""
    _, targets = await _fleet(aiohttp_server, clock="real", load={"scenario": "steady", "rate": 10.0})
    instances = [t.as_instance() for t in targets]
    with running_prometheus(tmp_path, scrape_configs(targets)) as url, _client(url) as client:
        async with _scraper() as scraper:
            cache = SnapshotCache()
            await scraped_after(client, utc_now(), len(targets))
            await asyncio.sleep(3)  # traffic is flowing in every instance
            for inst in instances:
                await collect(scraper, cache, target_of(inst))
            started = utc_now()
            await asyncio.sleep(15)
            mine = {i.id: (await collect(scraper, cache, target_of(i))).normalized for i in instances}
            at = utc_now()
            await scraped_after(client, at, len(targets))
            frame = await instant_frame(client, instances, RATES, at, at - started)
    for row in frame.iter_rows(named=True):
        values = mine[row["instance_id"]].values
        for name in ("prompt_tokens_per_second", "generation_tokens_per_second", "request_rate"):
            agent, prom = values[name], row[name]
            assert agent is not None and prom is not None, (row["instance_id"], name)
            assert prom == pytest.approx(agent, rel=0.15), (row["instance_id"], name, agent, prom)
        # Both sides know the same rates: TGI exports no preemption counter to either.
        assert (row["preemption_rate"] is None) == (values["preemption_rate"] is None), row["instance_id"]


# --- a long window: 30 days, backfilled -----------------------------------------------------------

END = datetime(2026, 10, 31, tzinfo=UTC)
DAYS = 30
START = END - timedelta(days=DAYS)
# promtool writes one block per 2 hours of data: four 2-hour stretches of one-minute samples keep the
# backfill to seconds while the series still span the whole 30 days (a counter that grows steadily
# across the gaps, as a real one would).
CHUNKS = (*(START + timedelta(days=d) for d in (0, 10, 20)), END - timedelta(hours=2))
CHUNK = timedelta(hours=2)
STAMPS = sorted(
    {(c + timedelta(minutes=m)).timestamp() for c in CHUNKS for m in range(121)} | {END.timestamp()}
)
TOKENS_PER_SECOND = 100.0
BOUNDS = ("1.0", "2.5", "+Inf")
SHARES = (0.5, 0.9, 1.0)  # cumulative share of requests per bucket: p50 = 1.0 s, p90 = 2.5 s
MEAN_SECONDS = 1.2
LONG = ("requests_waiting", "generation_tokens_per_second", "e2e_latency_seconds")
QUANTILES = ("e2e_latency_seconds_p50", "e2e_latency_seconds_p90")


def _waiting(ts: float) -> float:
    return float((ts // 86400) % 7)


def _history() -> str:
    """OpenMetrics of one vLLM instance: a queue gauge (the day of the week), a token counter and a
    latency histogram, one request a second."""
    t0 = START.timestamp()
    ident = 'instance="a",job="vllm"'
    lines = ["# TYPE vllm:num_requests_waiting gauge"]
    lines += [f"vllm:num_requests_waiting{{{ident}}} {_waiting(ts)} {ts:.0f}" for ts in STAMPS]
    lines.append("# TYPE vllm:generation_tokens counter")
    lines += [
        f"vllm:generation_tokens_total{{{ident}}} {TOKENS_PER_SECOND * (ts - t0)} {ts:.0f}" for ts in STAMPS
    ]
    family = "vllm:e2e_request_latency_seconds"
    lines.append(f"# TYPE {family} histogram")
    for bound, share in zip(BOUNDS, SHARES, strict=True):
        lines += [f'{family}_bucket{{{ident},le="{bound}"}} {share * (ts - t0)} {ts:.0f}' for ts in STAMPS]
    lines += [f"{family}_sum{{{ident}}} {MEAN_SECONDS * (ts - t0)} {ts:.0f}" for ts in STAMPS]
    lines += [f"{family}_count{{{ident}}} {ts - t0} {ts:.0f}" for ts in STAMPS]
    return "\n".join([*lines, "# EOF", ""])


def _inside_a_chunk(since: datetime, until: datetime) -> bool:
    return any(c <= since and until <= c + CHUNK for c in CHUNKS)


async def test_a_30_day_window_is_computed_in_promql_under_the_point_limit(tmp_path: Path) -> None:
    instance = Instance(
        id="a",
        engine=EngineName.VLLM,
        metrics_url="http://a/metrics",
        labels={"job": "vllm", "instance": "a"},
        source=InstanceSource.CONFIG,
        created_at=END,
    )
    step = timedelta(seconds=15)
    assert points(START, END, step) > MAX_POINTS  # fetched raw at this step, Prometheus would refuse it
    with backfilled_prometheus(tmp_path, _history()) as url, _client(url) as client:
        frame = await range_frame(client, [instance], [*LONG, *QUANTILES], START, END, step)
        whole = await instant_frame(client, [instance], [*LONG, *QUANTILES], END, timedelta(days=DAYS))

    # The step was widened to fit the range in the point limit; each point's rate and latencies cover
    # that step, computed by Prometheus from the samples inside it.
    widened = timedelta(seconds=math.ceil(DAYS * 86400 / (MAX_POINTS - 1)))
    assert points(START, END, widened) <= MAX_POINTS
    assert set(frame["ts"].diff().drop_nulls().to_list()) >= {widened}
    assert all((ts - START) % widened == timedelta(0) for ts in frame["ts"])
    for row in frame.iter_rows(named=True):
        ts: datetime = row["ts"]
        latest = STAMPS[bisect.bisect_right(STAMPS, ts.timestamp()) - 1]
        assert row["requests_waiting"] == _waiting(latest), row  # a gauge: its latest sample
        if _inside_a_chunk(ts - widened, ts):
            assert row["generation_tokens_per_second"] == pytest.approx(TOKENS_PER_SECOND), row
            assert row["e2e_latency_seconds"] == pytest.approx(MEAN_SECONDS), row
            assert row["e2e_latency_seconds_p50"] == pytest.approx(1.0), row
    assert sum(_inside_a_chunk(ts - widened, ts) for ts in frame["ts"]) >= 4 * 25
    # One point over the whole 30 days: rate, mean and quantiles over the window, inside PromQL.
    [row] = whole.iter_rows(named=True)
    assert row["ts"] == END
    assert row["generation_tokens_per_second"] == pytest.approx(TOKENS_PER_SECOND)
    assert row["e2e_latency_seconds"] == pytest.approx(MEAN_SECONDS)
    assert row["e2e_latency_seconds_p50"] == pytest.approx(1.0)
    assert row["e2e_latency_seconds_p90"] == pytest.approx(2.5)


async def test_prometheus_down_is_service_unavailable() -> None:
    instance = Instance(
        id="a",
        engine=EngineName.VLLM,
        metrics_url="http://a/metrics",
        labels={"job": "vllm", "instance": "a"},
        source=InstanceSource.CONFIG,
        created_at=END,
    )
    client = PromClient(f"http://127.0.0.1:{free_port()}", timeout=1, retries=1, backoff=0.01)
    try:
        with pytest.raises(ServiceUnavailableError) as caught:
            await range_frame(client, [instance], LONG, END - timedelta(hours=1), END, timedelta(seconds=30))
    finally:
        client.close()
    assert caught.value.details["dependency"] == "prometheus"
    assert "Prometheus" in caught.value.message


async def test_no_queryable_instance_is_an_empty_frame_without_a_query() -> None:
    unlabelled = Instance(
        id="b",
        engine=EngineName.TGI,
        metrics_url="http://b/metrics",
        source=InstanceSource.API,
        created_at=END,
    )
    client = PromClient(f"http://127.0.0.1:{free_port()}", timeout=1, retries=0)  # nothing listens
    try:
        frame = await range_frame(
            client, [unlabelled], LONG, END - timedelta(hours=1), END, timedelta(minutes=1)
        )
    finally:
        client.close()
    assert frame.height == 0
    assert frame.schema == frame_schema(LONG)


def test_unknown_quantities_are_refused() -> None:
    with pytest.raises(ValueError, match="ttft_secs"):
        frame_schema(["ttft_secs"])
