"""The http executor: POST the new settings to the instance's own control endpoint.

The control URL is `executors.http.urls[<instance id>]` from the settings, else the instance label named
by `executors.http.url_label` (default `control_url`; set it to null to trust only the settings map).
Either way it must pass `allowed_targets`, like every URL the agent fetches; a URL outside it fails the
step naming the policy, and nothing is sent.

The request (JSON, documented for whoever writes the endpoint):

    POST <control_url>
    Idempotency-Key: <step key>
    {"step_key": "<workflow>/<stage>/<n>/<instance>", "instance_id": "...", "engine": "vllm",
     "settings": {"max_num_seqs": 128}, "previous": {"max_num_seqs": 256}}

`settings` are the engine's flags with `-` → `_` (null: back to the engine default); `previous` the
values they replace (what a rollback would set). The endpoint should treat a repeated step key as
already done; the agent re-sends a step cut off by a crash only when `executors.http.idempotent` says
it does, and otherwise waits for a person. Any 2xx answer is APPLIED; anything else, a timeout or no
answer is FAILED. Redirects are not followed. The record keeps the URL, the body, the status and the
answer (truncated).
"""

from __future__ import annotations

from typing import Any, ClassVar

import aiohttp

from perfagent.executors._http import SessionOwner, TransportError, envelope_message, request_json
from perfagent.executors.base import Action, StepOutcome, StepRecord
from perfagent.executors.config import HttpConfig
from perfagent.models import Instance
from perfagent.settings import Settings
from perfagent.targets import TargetPolicy


def request_body(action: Action) -> dict[str, Any]:
    return {
        "step_key": action.key,
        "instance_id": action.instance.id,
        "engine": action.instance.engine.value,
        "settings": dict(action.settings),
        "previous": dict(action.previous),
    }


class HttpExecutor:
    """POSTs each step to the instance's control URL; `close()` it on shutdown."""

    name: ClassVar[str] = "http"

    def __init__(
        self, policy: TargetPolicy, config: HttpConfig, *, session: aiohttp.ClientSession | None = None
    ) -> None:
        self.policy = policy
        self.config = config
        self.idempotent = config.idempotent  # read by `rerun_safe`: only the operator can vouch for it
        self._session = SessionOwner(session)

    @classmethod
    def from_settings(
        cls, settings: Settings, *, session: aiohttp.ClientSession | None = None
    ) -> HttpExecutor:
        policy = TargetPolicy.from_entries(settings.allowed_targets, allow_any=settings.allow_any_target)
        return cls(policy, settings.executors.http, session=session)

    async def close(self) -> None:
        await self._session.close()

    def control_url(self, instance: Instance) -> str | None:
        if instance.id in self.config.urls:
            return self.config.urls[instance.id]
        if self.config.url_label is not None:
            return instance.labels.get(self.config.url_label)
        return None

    async def apply(self, action: Action) -> StepRecord:
        url = self.control_url(action.instance)
        if url is None:
            where = f"executors.http.urls[{action.instance.id!r}]"
            if self.config.url_label is not None:
                where += f" or the instance label {self.config.url_label!r}"
            return StepRecord(StepOutcome.FAILED, {}, {}, f"no control URL: set {where}")
        body = request_body(action)
        ran: dict[str, Any] = {"url": url, "body": body, "headers": {"Idempotency-Key": action.key}}
        if not self.policy.allows(url):
            return StepRecord(
                StepOutcome.FAILED,
                ran,
                {"policy": "allowed_targets", "allowed": self.policy.describe()},
                f"control URL host is not in allowed_targets: {url}",
            )
        try:
            reply = await request_json(
                self._session.get(),
                "POST",
                url,
                body=body,
                headers={"Idempotency-Key": action.key},
                time_limit=self.config.timeout_seconds,
            )
        except TransportError as exc:
            return StepRecord(StepOutcome.FAILED, ran, {"error": str(exc)}, str(exc))
        returned = {"status": reply.status, "body": reply.recorded()}
        if not reply.ok:
            detail = envelope_message(reply)
            return StepRecord(
                StepOutcome.FAILED,
                ran,
                returned,
                f"control URL answered HTTP {reply.status}: {detail}".rstrip(),
            )
        return StepRecord(StepOutcome.APPLIED, ran, returned, "")
