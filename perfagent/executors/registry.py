"""The executors an agent can use, by name, and which one a workflow gets when it names none."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

from perfagent.canary import MANUAL, STATISTICAL
from perfagent.errors import ConfigError
from perfagent.executors.base import Executor
from perfagent.executors.command import CommandExecutor
from perfagent.executors.dry_run import DryRunExecutor
from perfagent.executors.http import HttpExecutor
from perfagent.executors.sim import SimExecutor, sim_endpoint
from perfagent.models import Instance, InstanceSource
from perfagent.settings import Settings

SIM = "sim"
# Executors that change engines themselves: their workflows are judged by the statistical judge unless
# the request asks for a person. dry_run (a person applies each change) and others default to a person.
CHANGES_ENGINES = frozenset({"sim", "command", "http"})


def simulated(instance: Instance) -> bool:
    """The demo fleet's instances, and any whose metrics URL is a simulator's (`perfagent sim`)."""
    return instance.source is InstanceSource.SIMULATOR or sim_endpoint(instance.metrics_url) is not None


class ExecutorRegistry:
    def __init__(self, default: str) -> None:
        self.default = default
        self._executors: dict[str, Executor] = {}

    def register(self, executor: Executor) -> None:
        self._executors[executor.name] = executor

    def get(self, name: str) -> Executor | None:
        return self._executors.get(name)

    def names(self) -> list[str]:
        return sorted(self._executors)

    def __contains__(self, name: object) -> bool:
        return name in self._executors

    def default_for(self, instance: Instance) -> str:
        """`sim` for simulated instances (it is the only executor that can change them), else the
        `workflow_executor` setting."""
        if simulated(instance) and SIM in self._executors:
            return SIM
        return self.default

    def default_judge(self, executor: str) -> str:
        return STATISTICAL if executor in CHANGES_ENGINES else MANUAL

    async def close(self) -> None:
        """Close what executors hold open (the http and sim client sessions)."""
        for executor in self._executors.values():
            closer: Callable[[], Awaitable[None]] | None = getattr(executor, "close", None)
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer()


def build_executors(settings: Settings) -> ExecutorRegistry:
    """dry_run, http and sim always; command only when `executors.command` is configured. The
    `workflow_executor` setting must name a registered one."""
    registry = ExecutorRegistry(settings.workflow_executor)
    registry.register(DryRunExecutor())
    registry.register(HttpExecutor.from_settings(settings))
    registry.register(SimExecutor.from_settings(settings))
    if settings.executors.command is not None:
        registry.register(CommandExecutor.from_settings(settings))
    if settings.workflow_executor not in registry:
        raise ConfigError(
            f"workflow_executor {settings.workflow_executor!r} is not an available executor "
            f"({', '.join(registry.names())})"
        )
    return registry
