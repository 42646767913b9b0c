"""Fetching `/metrics` bodies: one shared aiohttp session, a per-target timeout, a size cap and
bounded concurrency, so a slow, dead or huge target never blocks or breaks the others."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp

from perfagent.errors import CollectionError, ServiceUnavailableError
from perfagent.targets import TargetPolicy

ACCEPT = "text/plain;version=0.0.4;q=0.9,*/*;q=0.1"  # the classic text format is what we parse
_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class Fetched:
    url: str
    text: str
    bytes: int
    duration_seconds: float


class Scraper:
    """Owns the one client session; create it inside a running loop and `close()` it on shutdown."""

    def __init__(
        self, policy: TargetPolicy, *, timeout: float, max_bytes: int, concurrency: int, user_agent: str
    ) -> None:
        self.policy = policy
        self.timeout = timeout
        self.max_bytes = max_bytes
        self._limit = asyncio.Semaphore(concurrency)
        self._session = aiohttp.ClientSession(
            # Connection reuse matters at fleet scale; the per-host limit keeps one target from
            # taking every connection.
            connector=aiohttp.TCPConnector(limit=concurrency, limit_per_host=4),
            headers={"Accept": ACCEPT, "User-Agent": user_agent},
        )

    async def close(self) -> None:
        await self._session.close()

    async def fetch(self, url: str, *, field: str = "metrics_url") -> Fetched:
        """GET one target; raise ServiceUnavailableError (unreachable, timeout, 5xx) or
        CollectionError (4xx, too large, undecodable) with the URL in the details."""
        self.policy.check(url, field=field)
        async with self._limit:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(self.timeout):
                    body = await self._get(url)
            except TimeoutError as exc:
                raise ServiceUnavailableError(
                    f"instance at {url} did not answer within {self.timeout:g} s",
                    {"url": url, "reason": "timeout", "timeout_seconds": self.timeout},
                ) from exc
            except aiohttp.ClientError as exc:
                raise ServiceUnavailableError(
                    f"instance at {url} is not reachable: {exc}",
                    {"url": url, "reason": "unreachable", "error": type(exc).__name__},
                ) from exc
            duration = time.perf_counter() - started
        return Fetched(
            url=url, text=body.decode("utf-8", errors="replace"), bytes=len(body), duration_seconds=duration
        )

    async def _get(self, url: str) -> bytes:
        async with self._session.get(url, allow_redirects=False) as response:
            if response.status >= 500:
                raise ServiceUnavailableError(
                    f"instance at {url} answered HTTP {response.status}",
                    {"url": url, "reason": "http_status", "status": response.status},
                )
            if response.status != 200:
                raise CollectionError(
                    f"instance at {url} answered HTTP {response.status}, not a metrics page",
                    {"url": url, "reason": "http_status", "status": response.status},
                )
            declared = response.content_length
            if declared is not None and declared > self.max_bytes:
                raise self._too_large(url)
            body = bytearray()
            async for chunk in response.content.iter_chunked(_CHUNK):
                body += chunk
                if len(body) > self.max_bytes:
                    raise self._too_large(url)
            return bytes(body)

    def _too_large(self, url: str) -> CollectionError:
        return CollectionError(
            f"metrics body from {url} exceeds scrape_max_bytes ({self.max_bytes} bytes)",
            {"url": url, "reason": "too_large", "max_bytes": self.max_bytes},
        )
