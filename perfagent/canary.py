"""How a workflow decides on a changed batch: the judge protocol, and the manual judge (a person).

The canary is batch 0; each ROLLOUT batch is judged the same way. Once a batch's change is in effect
the workflow engine asks the workflow's judge about it. `pass` goes on (the next batch, or
VALIDATION), `fail` rolls back every change that may be in effect, `pending` asks again after
`retry_after` seconds (an automatic judge waiting for the warm-up, the window or the engine), and
`review` hands the decision to a person: the workflow waits with `waiting_for: canary_review` until
`POST /workflows/{id}/resume` brings a verdict. The statistical judge is `perfagent.canary_judge`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from perfagent.models import EngineName
from perfagent.recommend_models import Addressed

MANUAL = "manual"
STATISTICAL = "statistical"


class JudgeOutcome(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    PENDING = "pending"
    REVIEW = "review"


class BaselineKind(StrEnum):
    """What a batch is compared with (see the README's "Rollout in batches")."""

    UNCHANGED = "unchanged"  # the group's instances still on the old settings, over the same window
    BEFORE = "before"  # the same instances just before the change: the last batch, or a group of one


@dataclass(frozen=True, slots=True)
class CanaryCase:
    """What a judge needs: the changed instances, what they are compared with, what changed and when."""

    workflow_id: str
    engine: EngineName
    changed: tuple[str, ...]  # instance ids of the batch under judgement
    baseline: tuple[str, ...]  # empty for BaselineKind.BEFORE
    baseline_kind: BaselineKind
    settings: Mapping[str, Any]
    changed_at: datetime  # when the batch's last change came into effect (applied, or confirmed by a person)
    started_at: datetime  # when the batch's first step began: its BEFORE window ends there
    addresses: tuple[Addressed, ...]  # the bottlenecks the change is meant to remove
    stage: str = "CANARY"
    batch: int = 0  # 0: the canary; 1, 2, ...: rollout batches

    @property
    def canary(self) -> str:
        return self.changed[0]

    def describe(self) -> str:
        what = "the canary" if self.batch == 0 else f"rollout batch {self.batch}"
        against = {
            BaselineKind.UNCHANGED: f"against {', '.join(self.baseline)} (unchanged)",
            BaselineKind.BEFORE: "against their own history before the change",
        }[self.baseline_kind]
        return f"{what} ({', '.join(self.changed)}) {against}"


@dataclass(frozen=True, slots=True)
class Judgement:
    outcome: JudgeOutcome
    reason: str
    data: dict[str, Any] = field(default_factory=dict)  # evidence, stored in the audit trail
    retry_after: float = 5.0  # seconds; PENDING only


class CanaryJudge(Protocol):
    name: str

    async def judge(self, case: CanaryCase) -> Judgement: ...


class ManualJudge:
    """No automatic judgement: every batch goes to a person."""

    name = MANUAL

    async def judge(self, case: CanaryCase) -> Judgement:
        return Judgement(
            JudgeOutcome.REVIEW,
            f"look at {case.describe()}, then resume with a verdict "
            '({"verdict": "pass"} goes on, "fail" rolls back)',
        )
