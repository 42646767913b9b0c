"""JSON requests for the http and sim executors: timeout, no redirects, size-capped and recordable."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp

MAX_BODY_BYTES = 1024 * 1024  # read at most this much of a response
RECORDED_CHARS = 2000  # and keep at most this much of it in the step record


class TransportError(Exception):
    """No HTTP answer: timeout, refused connection, bad URL."""


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    text: str  # the body, truncated to RECORDED_CHARS
    data: Any  # the body parsed as JSON, or None when it is not JSON

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def recorded(self) -> Any:
        """What the step record keeps: the JSON body if it is small, else the truncated text."""
        if self.data is not None and len(json.dumps(self.data)) <= RECORDED_CHARS:
            return self.data
        return self.text


async def request_json(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    time_limit: float,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """One request; redirects are not followed (a control endpoint that moves is a misconfiguration, and
    following it could leave `allowed_targets`)."""
    try:
        async with session.request(
            method,
            url,
            json=body,
            headers=headers,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=time_limit),
        ) as response:
            raw = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                raw += chunk
                if len(raw) >= MAX_BODY_BYTES:
                    break
            status = response.status
    except TimeoutError as exc:
        raise TransportError(f"{method} {url} did not answer within {time_limit:g} s") from exc
    except (aiohttp.ClientError, ValueError) as exc:
        raise TransportError(f"{method} {url} failed: {type(exc).__name__}: {exc}") from exc
    text = raw.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    return Reply(status=status, text=text[:RECORDED_CHARS], data=data)


def envelope_message(reply: Reply) -> str:
    """The message of the project's (and the simulator's) JSON error envelope, else the body text."""
    if isinstance(reply.data, dict) and isinstance(reply.data.get("error"), dict):
        return str(reply.data["error"].get("message", ""))
    return reply.text[:200]


class SessionOwner:
    """An executor's client session: the one given, or its own, created inside the running loop."""

    def __init__(self, session: aiohttp.ClientSession | None) -> None:
        self._session = session
        self._owned = session is None

    def get(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        if self._owned and self._session is not None:
            await self._session.close()
            self._session = None
