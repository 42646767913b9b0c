"""Burn rates two ways: the same generated histogram counters backfilled into a real Prometheus (read with
PromQL) and written into the agent's DuckDB history (read by the SLO evaluator) give the same findings,
burn rates and budgets, at several evaluation times.

Why they agree exactly: scrapes are at 7 s past each minute and evaluations on the minute, so no sample
sits on a window's edge (Prometheus 2.x selects [t - w, t], 3.x (t - w, t]; both pick the same samples).
Both sides count the increases between consecutive samples inside the window; PromQL then extrapolates
them to the window's edges, by one factor for a scrape's bucket and count series alike (same timestamps),
which cancels in bad / total. The one exception, PromQL's clamp of the extrapolation at a counter's zero,
needs a window that starts within a minute or so of a restart: no evaluation here has one.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from perfagent.burnrate import COUNTS_SCHEMA, SloEvaluation, evaluate, increments
from perfagent.history import ScrapeRecord, scrape_frame
from perfagent.normalize import HistogramSnapshot, RawSnapshot
from perfagent.promclient import PromClient
from perfagent.slo import SloSet, load_slos
from perfagent.slo_history import BATCH, SloEvaluator, read_counts
from perfagent.slo_promql import prometheus_ratios
from perfagent.store import Store
from tests.prometheus import backfilled_prometheus

DAY0 = datetime(2026, 11, 1, tzinfo=UTC)  # evaluations fall on whole minutes after it
T0 = DAY0 + timedelta(seconds=7)  # scrapes at :07 past every other minute
STEP = timedelta(minutes=2)
SCRAPES = (4 * 1440 + 120) // 2
DAY = timedelta(days=1)
HOUR = timedelta(hours=1)

SLOS = """\
slos:
  - {name: vllm-ttft, engines: [vllm], histogram: ttft_seconds, threshold: 2.5, objective: 0.95, period: 3d}
  - {name: sglang-ttft, engines: [sglang], histogram: ttft_seconds, threshold: 1, objective: 0.95, period: 3d}
  - {name: tgi-queue, engines: [tgi], histogram: queue_time_seconds, threshold: 0.4988, objective: 0.95, period: 3d}
"""

# Abbreviated bucket lists (the threshold and one edge below it; slow requests land in +Inf) keep the
# backfill small; `le` printed as each engine's client prints it: Python's repr for vLLM and SGLang,
# Rust's shortest float for TGI.
VLLM_EDGES = ("0.5", "2.5")
SGLANG_EDGES = ("0.4", "1.0")
TGI_EDGES = ("0.09852612533569335", "0.49878850951194753")


@dataclass(frozen=True)
class Server:
    """One simulated engine series: requests per minute, the bad share over time, restarts."""

    instance: str
    engine: str
    metric: str
    edges: tuple[str, ...]
    good_le: str  # good requests land in this bucket, bad ones in +Inf
    per_scrape: int  # requests finished between two scrapes
    labels: tuple[tuple[str, str], ...] = ()
    bad: tuple[tuple[datetime, datetime, float], ...] = ()  # (from, to, share) periods; 1% otherwise
    restart: datetime | None = None
    base: tuple[int, int] = (400_000, 4_000)  # (good, bad) counted before the data starts

    def share(self, at: datetime) -> float:
        if self.per_scrape == 0:
            return 0.0
        return next((s for start, end, s in self.bad if start <= at < end), 0.01)


VLLM_TTFT = "vllm:time_to_first_token_seconds"
SERVERS = (
    # Two data-parallel engines of one vLLM instance: the agent sums them, PromQL sums by instance.
    Server("vllm-a", "vllm", VLLM_TTFT, VLLM_EDGES, "0.5", 600, (("engine", "0"),)),
    Server("vllm-a", "vllm", VLLM_TTFT, VLLM_EDGES, "0.5", 600, (("engine", "1"),)),
    # An incident: 80% of requests over 2.5 s for three hours.
    Server(
        "vllm-b",
        "vllm",
        VLLM_TTFT,
        VLLM_EDGES,
        "2.5",
        1200,
        bad=((T0 + 3 * DAY, T0 + 3 * DAY + 3 * HOUR, 0.8),),
    ),
    # A slow burn (20% for a day and a half), with an engine restart in the middle of it.
    Server(
        "sglang-c",
        "sglang",
        "sglang:time_to_first_token_seconds",
        SGLANG_EDGES,
        "0.4",
        600,
        bad=((T0 + 1.5 * DAY, T0 + 3 * DAY, 0.2),),
        restart=T0 + 2 * DAY,
    ),
    Server("tgi-d", "tgi", "tgi_request_queue_duration", TGI_EDGES, "0.09852612533569335", 400),
    Server("vllm-idle", "vllm", VLLM_TTFT, VLLM_EDGES, "0.5", 0),
)
ENGINES = {s.instance: s.engine for s in SERVERS}


def _cumulative(server: Server) -> Iterator[tuple[datetime, float, float]]:
    """(time, cumulative good, cumulative bad) at every scrape."""
    good, bad = server.base
    for k in range(SCRAPES):
        at = T0 + k * STEP
        if server.restart is not None and at - STEP < server.restart <= at:
            good, bad = 0, 0  # the new process starts counting from zero
        n_bad = round(server.per_scrape * server.share(at))
        good, bad = good + server.per_scrape - n_bad, bad + n_bad
        yield at, float(good), float(bad)


def _buckets(server: Server, good: float) -> list[float]:
    return [good * (float(le) >= float(server.good_le)) for le in server.edges]


def openmetrics_text() -> str:
    """Every server as an OpenMetrics histogram family, one series after another, timestamps in seconds."""
    lines: list[str] = []
    typed: set[str] = set()
    for server in SERVERS:
        if server.metric not in typed:
            lines.append(f"# TYPE {server.metric} histogram")
            typed.add(server.metric)
        points = list(_cumulative(server))
        base = [("instance", server.instance), *server.labels]

        def series(
            name: str,
            extra: list[tuple[str, str]],
            values: list[float],
            base: list[tuple[str, str]] = base,
            points: list[tuple[datetime, float, float]] = points,
        ) -> None:
            labels = ",".join(f'{k}="{v}"' for k, v in [*base, *extra])
            lines.extend(
                f"{name}{{{labels}}} {v} {at.timestamp():.3f}"
                for (at, _, _), v in zip(points, values, strict=True)
            )

        for i, le in enumerate(server.edges):
            series(f"{server.metric}_bucket", [("le", le)], [_buckets(server, g)[i] for _, g, b in points])
        series(f"{server.metric}_bucket", [("le", "+Inf")], [g + b for _, g, b in points])
        series(f"{server.metric}_count", [], [g + b for _, g, b in points])
        series(f"{server.metric}_sum", [], [0.3 * g + 4.0 * b for _, g, b in points])
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


def scrape_records() -> list[ScrapeRecord]:
    """The same scrapes as the agent stores them: one per instance and minute, engines' series summed."""
    by_key: dict[tuple[str, datetime], dict[str, list[float]]] = {}
    for server in SERVERS:
        for at, good, bad in _cumulative(server):
            sums = by_key.setdefault(
                (server.instance, at), {"buckets": [0.0] * len(server.edges), "total": [0.0], "sum": [0.0]}
            )
            sums["buckets"] = [x + y for x, y in zip(sums["buckets"], _buckets(server, good), strict=True)]
            sums["total"][0] += good + bad
            sums["sum"][0] += 0.3 * good + 4.0 * bad
    metric = {s.instance: s for s in SERVERS}
    records = []
    for (instance, at), sums in sorted(by_key.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        server = metric[instance]
        snapshot = HistogramSnapshot(
            sum=sums["sum"][0],
            count=sums["total"][0],
            bounds=tuple(float(le) for le in server.edges),
            counts=tuple(sums["buckets"]),
            inf_count=sums["total"][0],
        )
        raw = RawSnapshot(engine=server.engine, at=at, histograms={server.metric: snapshot})
        records.append(
            ScrapeRecord(instance, at, f"http://{instance}/metrics", True, 0.01, raw=raw.model_dump_json())
        )
    return records


async def write_history(store: Store) -> None:
    records = scrape_records()
    for i in range(0, len(records), 5000):
        await store.write_history(scrape_frame(records[i : i + 5000]), pl.DataFrame())


# The findings each evaluation time must give (instance, SLO, severity), worked out from the shares:
EXPECTED = {
    # c has burned 4x for 1.5 days: 1d/2h > 3 (MEDIUM) and 3d/6h > 1 (LOW); MEDIUM is reported.
    DAY0 + 3 * DAY - 2 * HOUR: {("sglang-c", "slo:sglang-ttft", "MEDIUM")},
    # b's incident, 1.5 h in: 16x over 1 h and 5 m (CRITICAL). c stopped 1.5 h ago: 2 h window at 1.15x,
    # but 6 h at 3x and 3 d at 2x still exceed 1 (LOW).
    DAY0 + 3 * DAY + 1.5 * HOUR: {
        ("vllm-b", "slo:vllm-ttft", "CRITICAL"),
        ("sglang-c", "slo:sglang-ttft", "LOW"),
    },
    # b recovered 30 min ago: 6 h still burns 8x but 30 m only 0.2x, so the HIGH pair no longer fires.
    DAY0 + 3 * DAY + 3.5 * HOUR: {("sglang-c", "slo:sglang-ttft", "LOW")},
    # c's 6 h window is clean again: nothing fires.
    DAY0 + 4 * DAY + HOUR: set(),
}


def _findings(evaluation: SloEvaluation) -> set[tuple[str, str, str]]:
    return {(r["instance_id"], r["rule"], r["severity"]) for r in evaluation.results.iter_rows(named=True)}


def _by_key(frame: pl.DataFrame, value: str) -> dict[tuple[object, ...], float | None]:
    keys = [c for c in frame.columns if c != value]
    return {tuple(r[k] for k in keys): r[value] for r in frame.iter_rows(named=True)}


def _same(a: dict[tuple[object, ...], float | None], b: dict[tuple[object, ...], float | None]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        other = b[key]
        assert (value is None) == (other is None), key
        if value is not None and other is not None:
            assert other == pytest.approx(value, rel=1e-6, abs=1e-9), key


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "slos.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture
def slos(tmp_path: Path) -> SloSet:
    return load_slos([_write(tmp_path, SLOS)], builtin=False)


async def test_prometheus_and_history_give_the_same_findings(tmp_path: Path, slos: SloSet) -> None:
    store = await Store.open(tmp_path / "agent.duckdb")
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    try:
        await write_history(store)
        evaluator = SloEvaluator(store, slos)
        with backfilled_prometheus(
            workdir, openmetrics_text(), backfill_args=["--max-block-duration=24h"]
        ) as url:
            client = PromClient(url, timeout=20, retries=1)
            try:
                for at, expected in EXPECTED.items():
                    from_history = await evaluator.evaluate(at, ENGINES)
                    from_prometheus = evaluate(slos, await prometheus_ratios(client, slos, at), ENGINES, at)
                    assert _findings(from_history) == _findings(from_prometheus) == expected, at
                    _same(_by_key(from_history.burn, "burn_rate"), _by_key(from_prometheus.burn, "burn_rate"))
                    _same(
                        _by_key(from_history.budgets, "error_budget_remaining"),
                        _by_key(from_prometheus.budgets, "error_budget_remaining"),
                    )
                    _same(
                        _by_key(from_history.results.select("instance_id", "rule", "value"), "value"),
                        _by_key(from_prometheus.results.select("instance_id", "rule", "value"), "value"),
                    )
                    # No burn rate sits so close to its pair's factor that rounding could flip a finding.
                    burn = _by_key(from_history.burn, "burn_rate")
                    for (slo, instance, window), rate in burn.items():
                        loaded = slos.get(str(slo))
                        assert loaded is not None
                        for pair in loaded.slo.alerts:
                            if rate is not None and window in (pair.long, pair.short):
                                assert abs(rate - pair.factor) > 0.05, (at, slo, instance, window, rate)
                    # Every instance is measured; the idle one has no number, never a made-up 0 or 1.
                    budgets = _by_key(from_history.budgets, "error_budget_remaining")
                    assert {k[1] for k in budgets} == set(ENGINES)
                    assert budgets[("vllm-ttft", "vllm-idle")] is None
                    assert all(
                        v is not None and math.isfinite(v) for k, v in budgets.items() if k[1] != "vllm-idle"
                    )
            finally:
                client.close()
    finally:
        await store.close()


async def test_counts_are_kept_incrementally_and_recounted_when_the_slos_change(
    tmp_path: Path, slos: SloSet
) -> None:
    store = await Store.open(tmp_path / "agent.duckdb")
    try:
        await write_history(store)
        evaluator = SloEvaluator(store, slos)
        at = DAY0 + 4 * DAY
        since = at - slos.span
        newer = sum(1 for r in scrape_records() if r.at > since)
        assert await evaluator.refresh(at) == newer  # in batches of BATCH, each seeding the next
        assert newer > BATCH
        assert await evaluator.refresh(at) == 0  # up to date
        rows = await store.run(lambda conn: read_counts(conn, since, at + DAY))
        assert rows.height == rows.unique(["instance_id", "ts", "histogram", "le"]).height == newer
        # The stored increases are those of the whole series at once: batches joined up exactly.
        again = increments(rows.select(list(COUNTS_SCHEMA))).collect()
        assert again.select("d_bad", "d_total").equals(rows.select("d_bad", "d_total"))
        assert rows["prev_ts"].null_count() == len({r.instance_id for r in scrape_records()})

        # Another edge is another count: the stored counts are recounted from the scrapes.
        changed = load_slos(
            [_write(tmp_path, SLOS.replace("threshold: 1,", "threshold: 10,"))], builtin=False
        )
        assert await SloEvaluator(store, changed).refresh(at) == newer
        # Moving on drops the rows no window reaches any more.
        later = at + HOUR
        await SloEvaluator(store, changed).refresh(later)
        kept = await store.run(lambda conn: read_counts(conn, datetime(2000, 1, 1, tzinfo=UTC), later))
        assert kept.select(pl.col("ts").min()).item() > later - slos.span
    finally:
        await store.close()
