"""Points in time as users write them: ISO 8601, or a duration ago such as `90s`, `30m`, `6h`, `7d`."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    match = _DURATION.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 30s, 15m, 6h, 7d or 1w")
    return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def parse_moment(text: str, *, now: datetime) -> datetime:
    """An ISO 8601 time (UTC when no offset is given) or a duration before `now`."""
    text = text.strip()
    if _DURATION.match(text):
        return now - parse_duration(text)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"{text!r} is neither an ISO 8601 time nor a duration like 6h") from exc
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
