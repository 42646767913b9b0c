"""The one exception hierarchy; each error knows its HTTP status and the spec's error code.

`perfagent.middleware` maps every `PerfAgentError` (and aiohttp's own HTTP errors) to the spec's
JSON error envelope in one place, so no handler builds an error body itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Generic, TypeVar

from perfagent.clock import iso_z, utc_now


class PerfAgentError(Exception):
    """Base of every error the agent reports to a client."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "INTERNAL_ERROR"

    def __init__(self, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details or {})


class ValidationError(PerfAgentError):
    """The request is malformed: bad JSON, a missing or wrongly typed field, an unknown value."""

    status = 400
    code = "VALIDATION_ERROR"


class TargetNotAllowedError(ValidationError):
    """A metrics URL points at a host outside `allowed_targets`."""


class NotFoundError(PerfAgentError):
    status = 404
    code = "NOT_FOUND"


class ConflictError(PerfAgentError):
    """The request contradicts current state (e.g. an instance id that already exists)."""

    status = 409
    code = "CONFLICT"


class CollectionError(PerfAgentError):
    """A target answered, but what it answered cannot be used (no valid sample, too large, HTTP 4xx)."""

    status = 500
    code = "COLLECTION_ERROR"


class AnalysisError(PerfAgentError):
    status = 500
    code = "ANALYSIS_ERROR"


class WorkflowError(PerfAgentError):
    status = 500
    code = "WORKFLOW_ERROR"


class ServiceUnavailableError(PerfAgentError):
    """A dependency (an instance, the database, Prometheus) cannot be reached or timed out."""

    status = 503
    code = "SERVICE_UNAVAILABLE"


class ConfigError(Exception):
    """Start-up configuration is invalid; the message names the setting, file or line."""


P = TypeVar("P")


class FileProblemsError(ConfigError, Generic[P]):
    """Data files (rules, SLOs) are invalid; `problems` lists every one found, each printing as one
    `file:line: …` line, and the message is those lines."""

    def __init__(self, problems: Sequence[P]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def error_body(code: str, message: str, details: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The spec's error envelope, the only error shape the API returns."""
    return {
        "error": {"code": code, "message": message, "details": dict(details or {})},
        "timestamp": iso_z(utc_now()),
    }
