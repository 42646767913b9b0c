"""An operator's Prometheus, read through prometheus-api-client without ever blocking the event loop.

The client is synchronous (requests), has no default timeout and retries 5xx with unbounded-looking
backoff. Here every call has a timeout, retries are bounded (count and total backoff), and calls run
on an executor of their own, so a slow Prometheus can neither stall the loop nor starve the store's
or the parser's threads.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar

import polars as pl
import requests
from prometheus_api_client.exceptions import PrometheusApiClientException
from prometheus_api_client.prometheus_connect import PrometheusConnect
from urllib3.util.retry import Retry

from perfagent.errors import AnalysisError, ServiceUnavailableError

T = TypeVar("T")

MAX_POINTS: Final = 11_000
"""Prometheus refuses a range query of more points than this per series."""

MATRIX_SCHEMA: Final = pl.Schema(
    {"labels": pl.String(), "ts": pl.Datetime("us", "UTC"), "value": pl.Float64()}
)
"""A range (or instant) query result as a long frame; `labels` is the series' label set as JSON."""


def points(start: datetime, end: datetime, step: timedelta) -> int:
    """How many points per series a range query returns."""
    return int((end - start) / step) + 1


def fit_step(start: datetime, end: datetime, step: timedelta) -> timedelta:
    """`step`, widened to whole seconds until the range stays under Prometheus's point limit."""
    seconds = max(step.total_seconds(), 1.0)
    span = (end - start).total_seconds()
    if span / seconds + 1 > MAX_POINTS:
        seconds = math.ceil(span / (MAX_POINTS - 1))
    return timedelta(seconds=seconds)


class PromClient:
    """Async facade over `PrometheusConnect`: timeouts, bounded retries, its own thread pool."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        retries: int = 2,
        backoff: float = 0.5,
        workers: int = 4,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.workers = workers
        # Retry only idempotent reads, only on overload/unavailable answers and connect errors, and cap
        # the sleep between attempts so the worst case stays near (retries + 1) x timeout.
        retry = Retry(
            total=retries,
            connect=retries,
            read=0,  # a read timeout means Prometheus is busy evaluating: retrying doubles the load
            status=retries,
            backoff_factor=backoff,
            backoff_max=max(backoff * 4, 1.0),
            status_forcelist=(429, 502, 503, 504),
            allowed_methods=frozenset({"GET", "POST"}),
            respect_retry_after_header=False,
            raise_on_status=False,
        )
        self._prom = PrometheusConnect(
            url=self.url,
            headers=dict(headers or {}),
            retry=retry,
            timeout=timeout,  # type: ignore[arg-type]  # requests takes float seconds; the stub says int
            method="POST",
        )
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prometheus")
        self._deadline = timeout * (retries + 1) + max(backoff * 4, 1.0) * retries + 1.0

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))
        try:
            return await asyncio.wait_for(future, self._deadline)
        except TimeoutError as exc:
            raise self._unavailable(f"no answer within {self._deadline:.0f} s") from exc
        except requests.exceptions.RequestException as exc:
            # requests' messages embed the whole query URL (kilobytes for a fleet query): name the
            # failure's kind instead.
            raise self._unavailable(_brief(exc)) from exc
        except PrometheusApiClientException as exc:
            text = str(exc)
            if text.startswith("HTTP Status Code 4"):
                # 400/422: Prometheus understood the request and refused the query itself.
                raise AnalysisError(
                    f"Prometheus refused the query: {text[:500]}", {"prometheus_url": self.url}
                ) from exc
            raise self._unavailable(text[:500]) from exc

    def _unavailable(self, why: str) -> ServiceUnavailableError:
        return ServiceUnavailableError(
            f"Prometheus at {self.url} is unavailable: {why}",
            {"dependency": "prometheus", "prometheus_url": self.url},
        )

    async def ping(self) -> None:
        """Raise ServiceUnavailableError unless Prometheus answers its readiness check (/-/ready)."""

        def ready() -> int:
            # The library's own check only reads `/`; readiness (TSDB loaded) is what /-/ready reports.
            response = self._prom._session.get(
                f"{self.url}/-/ready", headers=self._prom.headers, timeout=self.timeout
            )
            return int(response.status_code)

        status = await self._call(ready)
        if status != 200:
            raise self._unavailable(f"HTTP {status} from /-/ready")

    async def query(self, promql: str, at: datetime | None = None) -> list[dict[str, Any]]:
        """An instant query; the raw `result` list (vector or scalar entries)."""
        params = {} if at is None else {"time": f"{at.timestamp():.3f}"}
        result: list[dict[str, Any]] = await self._call(self._prom.custom_query, promql, params)
        return result

    async def query_range(
        self, promql: str, start: datetime, end: datetime, step: timedelta
    ) -> list[dict[str, Any]]:
        """A range query; refuses (before sending) a range Prometheus would refuse."""
        n = points(start, end, step)
        if n > MAX_POINTS:
            raise AnalysisError(
                f"range query of {n} points per series exceeds Prometheus's {MAX_POINTS}: "
                "widen the step (fit_step) or compute the window in PromQL",
                {"points": n, "max_points": MAX_POINTS},
            )
        result: list[dict[str, Any]] = await self._call(
            self._prom.custom_query_range, promql, start, end, f"{step.total_seconds():g}s"
        )
        return result

    async def series(self, match: str, start: datetime, end: datetime) -> list[dict[str, str]]:
        """Label sets of the series matching `match` (a selector) between `start` and `end`."""
        result: list[dict[str, str]] = await self._call(self._prom.get_series, start, end, {"match[]": match})
        return result

    async def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets (`/api/v1/targets`): labels, scrapeUrl, health."""
        data: dict[str, Any] = await self._call(self._prom.get_targets, "active")
        targets: list[dict[str, Any]] = data.get("activeTargets", [])
        return targets

    def close(self) -> None:
        self._prom.close()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _brief(exc: requests.exceptions.RequestException) -> str:
    """What went wrong, without the request URL that requests puts in every message."""
    if isinstance(exc, requests.exceptions.Timeout):
        return "timed out"
    if isinstance(exc, requests.exceptions.ConnectionError):
        # The innermost cause (e.g. "Connection refused") is the useful part of urllib3's chain.
        cause: BaseException = exc
        while cause.__context__ is not None or (cause.args and isinstance(cause.args[0], BaseException)):
            nxt = (
                cause.args[0]
                if cause.args and isinstance(cause.args[0], BaseException)
                else cause.__context__
            )
            if nxt is None:
                break
            cause = nxt
        detail = str(cause).rsplit(":", 1)[-1].strip(" ')\"")
        return f"connection failed ({detail[:120]})" if detail else "connection failed"
    return type(exc).__name__


def matrix_frame(result: Sequence[Mapping[str, Any]]) -> pl.DataFrame:
    """A query result (matrix `values` or vector `value`) as one long frame in MATRIX_SCHEMA."""
    labels: list[str] = []
    stamps: list[datetime] = []
    values: list[float] = []
    for series in result:
        key = json.dumps(series.get("metric", {}), sort_keys=True)
        pairs = series.get("values") or ([series["value"]] if "value" in series else [])
        for ts, value in pairs:
            labels.append(key)
            stamps.append(datetime.fromtimestamp(float(ts), UTC))
            values.append(float(value))  # Prometheus sends "NaN", "+Inf", "-Inf" as strings
    return pl.DataFrame({"labels": labels, "ts": stamps, "value": values}, schema=MATRIX_SCHEMA)
