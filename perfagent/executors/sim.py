"""The sim executor: set knobs through the simulator's control API (`perfagent sim`, or the demo fleet
mounted under `/sim` of the agent itself).

The simulator's address and its own instance id are read from the instance's metrics URL, which the
simulator serves at `<base>/instances/<sim id>/metrics`; the control endpoint is then
`POST <base>/instances/<sim id>/settings` with the knobs as a JSON object (the engines' flags with
`-` → `_`, the keys of a recommendation's `config_changes`). The URL must pass `allowed_targets`.

Idempotent by looking first: the executor GETs the instance and sends nothing when every knob already
has the wanted value (the record says so). Otherwise the simulator validates the knobs, applies them and
restarts the instance, as a real engine would; a knob it refuses fails the step naming the knob.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import aiohttp

from perfagent.executors._http import SessionOwner, TransportError, envelope_message, request_json
from perfagent.executors.base import Action, StepOutcome, StepRecord
from perfagent.executors.config import SimConfig
from perfagent.settings import Settings
from perfagent.targets import TargetPolicy

_METRICS_PATH = re.compile(r"^(?P<base>https?://.+?)/instances/(?P<id>[^/?#]+)/metrics$")


@dataclass(frozen=True, slots=True)
class SimEndpoint:
    base: str  # e.g. http://127.0.0.1:8002/sim
    instance_id: str  # the simulator's own id of the instance

    @property
    def instance_url(self) -> str:
        return f"{self.base}/instances/{self.instance_id}"

    @property
    def settings_url(self) -> str:
        return f"{self.instance_url}/settings"


def sim_endpoint(metrics_url: str) -> SimEndpoint | None:
    """The simulator endpoint behind a metrics URL of the form `<base>/instances/<id>/metrics`."""
    match = _METRICS_PATH.match(metrics_url)
    if match is None:
        return None
    return SimEndpoint(base=match.group("base"), instance_id=match.group("id"))


def same_value(a: Any, b: Any) -> bool:
    """Knob equality: booleans exactly, numbers within rounding, everything else by ==."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return bool(a == b)


class SimExecutor:
    """Sets knobs on simulated instances; `close()` it on shutdown."""

    name: ClassVar[str] = "sim"
    idempotent: ClassVar[bool] = True  # it looks before it sets, and the same knobs never restart

    def __init__(
        self, policy: TargetPolicy, config: SimConfig, *, session: aiohttp.ClientSession | None = None
    ) -> None:
        self.policy = policy
        self.config = config
        self._session = SessionOwner(session)

    @classmethod
    def from_settings(
        cls, settings: Settings, *, session: aiohttp.ClientSession | None = None
    ) -> SimExecutor:
        policy = TargetPolicy.from_entries(settings.allowed_targets, allow_any=settings.allow_any_target)
        return cls(policy, settings.executors.sim, session=session)

    async def close(self) -> None:
        await self._session.close()

    async def apply(self, action: Action) -> StepRecord:
        endpoint = sim_endpoint(action.instance.metrics_url)
        if endpoint is None:
            return StepRecord(
                StepOutcome.FAILED,
                {"metrics_url": action.instance.metrics_url},
                {},
                "not a simulated instance: its metrics URL is not <base>/instances/<id>/metrics",
            )
        settings = dict(action.settings)
        ran: dict[str, Any] = {"get": endpoint.instance_url, "step_key": action.key}
        if not self.policy.allows(endpoint.base):
            return StepRecord(
                StepOutcome.FAILED,
                ran,
                {"policy": "allowed_targets", "allowed": self.policy.describe()},
                f"simulator host is not in allowed_targets: {endpoint.base}",
            )
        session, timeout = self._session.get(), self.config.timeout_seconds
        try:
            current = await request_json(session, "GET", endpoint.instance_url, time_limit=timeout)
            if not current.ok or not isinstance(current.data, dict):
                return StepRecord(
                    StepOutcome.FAILED,
                    ran,
                    {"status": current.status, "body": current.recorded()},
                    f"simulator answered HTTP {current.status}: {envelope_message(current)}".rstrip(),
                )
            before = current.data.get("settings") or {}
            if all(name in before and same_value(before[name], value) for name, value in settings.items()):
                return StepRecord(
                    StepOutcome.APPLIED,
                    ran,
                    {"status": current.status, "already_applied": True, "settings": before},
                    "already in effect; nothing sent",
                )
            ran |= {"post": endpoint.settings_url, "body": settings}
            reply = await request_json(
                session,
                "POST",
                endpoint.settings_url,
                body=settings,
                headers={"Idempotency-Key": action.key},
                time_limit=timeout,
            )
        except TransportError as exc:
            return StepRecord(StepOutcome.FAILED, ran, {"error": str(exc)}, str(exc))
        if not reply.ok or not isinstance(reply.data, dict):
            return StepRecord(
                StepOutcome.FAILED,
                ran,
                {"status": reply.status, "body": reply.recorded()},
                f"simulator refused the settings (HTTP {reply.status}): {envelope_message(reply)}".rstrip(),
            )
        view = reply.data.get("instance") or {}
        return StepRecord(
            StepOutcome.APPLIED,
            ran,
            {
                "status": reply.status,
                "already_applied": False,
                "restarted": reply.data.get("restarted"),
                "settings": view.get("settings"),
            },
            "",
        )
