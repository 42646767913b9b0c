"""The one protocol every executor implements, and the record each step leaves.

A workflow step sets some engine flags on one instance. Steps must be idempotent: after a crash the
workflow engine may call `apply` again with the same `Action.key`, and the executor must not do the
change twice (or doing it twice must be harmless, e.g. setting the same values again). A rollback is
just another `apply` whose `settings` are the `previous` values of the forward step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Protocol

from perfagent.models import Instance


class StepOutcome(StrEnum):
    APPLIED = "applied"  # the change is in effect (or was already)
    WAITING = "waiting"  # handed to a person (dry_run): the workflow waits for `confirm`
    FAILED = "failed"  # the change could not be made; `message` says why


@dataclass(frozen=True, slots=True)
class Action:
    """Set `settings` on `instance`. `key` names the step (`<workflow>/<stage>/<n>/<instance>`) and is
    stable across restarts, so an executor can recognise a step it already carried out."""

    key: str
    instance: Instance
    settings: Mapping[str, Any]  # real engine flags with `-` → `_`, e.g. {"max_num_seqs": 128}
    previous: Mapping[str, Any] = field(default_factory=dict)  # what they replace: rollback values
    # The container's complete command-line args before this step, when known (a workflow's
    # `current_args`): lets dry_run write a patch of the whole list rather than of the flags alone.
    current_args: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class StepRecord:
    """What a step ran and what came back: stored verbatim in the workflow's audit trail."""

    outcome: StepOutcome
    ran: dict[str, Any]  # e.g. {"argv": [...]} or {"url": ..., "body": ...} or {"cli_args": [...]}
    returned: dict[str, Any]  # e.g. {"exit_code": 0, "stdout": "..."} or {"status": 200, "body": ...}
    message: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome.value,
            "ran": self.ran,
            "returned": self.returned,
            "message": self.message,
        }


class Executor(Protocol):
    """Carries out one `Action`. Never raises for a failed change: it returns a FAILED record."""

    name: ClassVar[str]

    async def apply(self, action: Action) -> StepRecord: ...


def rerun_safe(executor: Executor) -> bool:
    """Whether a step found started but never recorded as done (the agent died while it ran) may just
    run again. An executor opts in with a class attribute `idempotent = True` when applying the same
    `Action.key` twice is harmless by construction (dry_run only writes the change down); otherwise
    the workflow waits for a person (`waiting_for: attention`) rather than risk a second restart."""
    return getattr(executor, "idempotent", False) is True
