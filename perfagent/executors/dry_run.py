"""The dry_run executor: changes nothing, writes the change down for a person.

Each step's record holds the change as exact command-line flags (`cli_args`, plus `unset`: flags to
remove so the engine default applies) and as a Kubernetes strategic-merge patch of the container's
args. A container's `args` is a plain list of strings with no merge key, so a strategic-merge patch
replaces the whole list: the patch therefore carries the complete new list, built from the
workflow's `current_args` with the changed flags replaced. Without `current_args` the patch can only
list the changed flags, and `args_complete: false` says that applying it as is would drop every
other argument. The workflow then waits for `POST /workflows/{id}/confirm`.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from perfagent.engine_args import args_with, flag_args, unset_flags
from perfagent.executors.base import Action, StepOutcome, StepRecord

CONTAINER_LABEL = "container"  # instance label naming the engine's container in its pod


def container_name(action: Action) -> str:
    """The container to patch: the instance's `container` label, else the engine's name."""
    return action.instance.labels.get(CONTAINER_LABEL) or action.instance.engine.value


def kubernetes_patch(container: str, args: list[str]) -> dict[str, Any]:
    """A strategic-merge patch of a pod template: `containers` merges by `name`, `args` is replaced."""
    return {"spec": {"template": {"spec": {"containers": [{"name": container, "args": args}]}}}}


class DryRunExecutor:
    name: ClassVar[str] = "dry_run"
    # Rendering the same action twice renders the same record: a step in doubt after a crash reruns.
    idempotent: ClassVar[bool] = True

    async def apply(self, action: Action) -> StepRecord:
        engine = action.instance.engine.value
        complete = action.current_args is not None
        args = args_with(engine, action.current_args or (), action.settings)
        container = container_name(action)
        patch = kubernetes_patch(container, args)
        ran: dict[str, Any] = {
            "instance_id": action.instance.id,
            "cli_args": flag_args(engine, action.settings),
            "unset": unset_flags(engine, action.settings),
            "settings": dict(action.settings),
            "kubernetes_patch": patch,
            "patch_type": "strategic",
            "container": container,
            "args_complete": complete,
            "kubectl": f"kubectl patch deployment <name> --type strategic --patch '{json.dumps(patch)}'",
        }
        if complete:
            message = (
                f"apply the change to {action.instance.id} (the patch holds its complete new args), "
                "then confirm the workflow"
            )
        else:
            message = (
                f"apply {' '.join(ran['cli_args']) or 'the change'} to {action.instance.id}, then confirm the "
                "workflow; the container's current args are unknown, so the patch lists only the changed flags "
                "and would replace all others: merge them into its args, or give `current_args`"
            )
        return StepRecord(StepOutcome.WAITING, ran=ran, returned={}, message=message)
