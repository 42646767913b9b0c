"""The Prometheus client: real queries on a backfilled Prometheus; bounded retries and timeouts
against loopback servers that misbehave on purpose."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from perfagent.errors import AnalysisError, ServiceUnavailableError
from perfagent.promclient import MAX_POINTS, PromClient, fit_step, matrix_frame, points
from tests.conftest import free_port
from tests.prometheus import backfilled_prometheus, openmetrics

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


async def test_range_and_instant_queries_read_backfilled_history(tmp_path: Path) -> None:
    start = T0.timestamp()
    samples = [(start + 15 * i, float(i)) for i in range(241)]  # 1 h of 15 s samples, value = index
    text = openmetrics([("queue_depth", "gauge", {"instance": "a"}, samples)])
    with backfilled_prometheus(tmp_path, text) as url:
        client = PromClient(url, timeout=5, retries=1)
        try:
            result = await client.query_range(
                "queue_depth", T0, T0 + timedelta(minutes=10), timedelta(seconds=60)
            )
            frame = matrix_frame(result)
            assert frame.height == 11
            assert frame["value"].to_list() == [float(4 * i) for i in range(11)]
            assert frame["ts"].to_list()[0] == T0
            instant = matrix_frame(await client.query("queue_depth", T0 + timedelta(minutes=30)))
            assert instant["value"].to_list() == [120.0]
            assert instant["labels"].str.json_decode().struct.field("instance").to_list() == ["a"]
        finally:
            client.close()


async def test_bad_promql_is_an_analysis_error_not_a_retry(tmp_path: Path) -> None:
    text = openmetrics([("up_gauge", "gauge", {}, [(T0.timestamp(), 1.0)])])
    with backfilled_prometheus(tmp_path, text) as url:
        client = PromClient(url, timeout=5, retries=2)
        try:
            with pytest.raises(AnalysisError, match="refused the query"):
                await client.query("sum(", T0)
        finally:
            client.close()


async def test_unavailable_prometheus_retries_a_bounded_number_of_times(
    aiohttp_server: AiohttpServer,
) -> None:
    calls = 0

    async def overloaded(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.Response(status=503, text="overloaded")

    app = web.Application()
    app.router.add_route("*", "/api/v1/query", overloaded)
    server = await aiohttp_server(app)
    client = PromClient(str(server.make_url("")), timeout=2, retries=2, backoff=0.01)
    try:
        with pytest.raises(ServiceUnavailableError) as caught:
            await client.query("up")
    finally:
        client.close()
    assert calls == 3  # the first attempt and exactly two retries
    assert caught.value.details["dependency"] == "prometheus"


async def test_a_slow_prometheus_times_out_without_blocking_the_event_loop(
    aiohttp_server: AiohttpServer,
) -> None:
    release = asyncio.Event()

    async def hangs(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"status": "success", "data": {"resultType": "vector", "result": []}})

    app = web.Application()
    app.router.add_route("*", "/api/v1/query", hangs)
    server = await aiohttp_server(app)
    client = PromClient(str(server.make_url("")), timeout=0.5, retries=1, backoff=0.01)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.05)
            ticks += 1

    beat = asyncio.create_task(ticker())
    try:
        with pytest.raises(ServiceUnavailableError, match="unavailable"):
            await client.query("up")
    finally:
        beat.cancel()
        release.set()
        client.close()
    assert ticks >= 5  # the loop kept running while the request waited on its own thread


async def test_unreachable_prometheus_is_service_unavailable() -> None:
    client = PromClient(f"http://127.0.0.1:{free_port()}", timeout=1, retries=1, backoff=0.01)
    try:
        with pytest.raises(ServiceUnavailableError, match="unavailable"):
            await client.ping()
    finally:
        client.close()


async def test_range_over_the_point_limit_is_refused_before_sending() -> None:
    client = PromClient(f"http://127.0.0.1:{free_port()}", timeout=1, retries=0)
    try:
        with pytest.raises(AnalysisError, match="11000"):
            await client.query_range("up", T0, T0 + timedelta(days=7), timedelta(seconds=15))
    finally:
        client.close()


def test_fit_step_keeps_every_range_under_the_point_limit() -> None:
    for days in (1, 7, 30, 90):
        end = T0 + timedelta(days=days)
        step = fit_step(T0, end, timedelta(seconds=15))
        assert points(T0, end, step) <= MAX_POINTS
        assert step >= timedelta(seconds=15)
    assert fit_step(T0, T0 + timedelta(hours=1), timedelta(seconds=15)) == timedelta(seconds=15)


def test_matrix_frame_reads_special_values() -> None:
    frame = matrix_frame([{"metric": {"a": "1"}, "values": [[1.5, "NaN"], [2.5, "+Inf"], [3.5, "2"]]}])
    values = frame["value"].to_list()
    assert math.isnan(values[0]) and values[1] == math.inf and values[2] == 2.0
    assert frame.schema == pl.Schema(
        {"labels": pl.String(), "ts": pl.Datetime("us", "UTC"), "value": pl.Float64()}
    )
