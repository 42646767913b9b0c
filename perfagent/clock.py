"""Time helpers: every timestamp the agent handles is timezone-aware UTC."""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso_z(moment: datetime) -> str:
    """ISO 8601 with a `Z` suffix, the form the API spec's examples use (and pydantic emits)."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
