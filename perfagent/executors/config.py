"""The `executors` setting: how the command, http and sim executors reach an engine.

Everything here comes from the agent's own settings (config file or `PERFAGENT_EXECUTORS*`
environment), never from an API request: a command template or a control URL chosen by an API user
would turn the agent into a remote shell or an open proxy.
"""

from __future__ import annotations

import re
from typing import Final

from pydantic import BaseModel, ConfigDict, Field, field_validator

# `{name}` or `{label:NAME}`; anything else in braces is left as written.
PLACEHOLDER: Final = re.compile(r"\{(label:[A-Za-z_][A-Za-z0-9_.-]*|[a-z_]+)\}")
PLACEHOLDERS: Final = ("instance_id", "engine", "metrics_url", "flags", "settings_json", "step_key")
FLAGS: Final = "{flags}"


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CommandConfig(_Config):
    """An argument list run per instance, e.g. `["/opt/bin/restart-engine", "{instance_id}", "{flags}"]`."""

    argv: list[str] = Field(min_length=1, description="Program and arguments; placeholders per argument.")
    timeout_seconds: float = Field(600.0, gt=0, description="Kill the command after this long (FAILED).")
    idempotent: bool = Field(
        False, description="The script honours PERFAGENT_STEP_KEY: a step cut off by a crash may run again."
    )

    @field_validator("argv")
    @classmethod
    def _check_argv(cls, value: list[str]) -> list[str]:
        if not value[0] or PLACEHOLDER.search(value[0]):
            raise ValueError("argv[0] must be a fixed program path, not a placeholder")
        for arg in value:
            for match in PLACEHOLDER.finditer(arg):
                name = match.group(1)
                if not name.startswith("label:") and name not in PLACEHOLDERS:
                    known = ", ".join("{" + p + "}" for p in (*PLACEHOLDERS, "label:NAME"))
                    raise ValueError(f"unknown placeholder {match.group(0)} in {arg!r}; known: {known}")
            # {flags} becomes several arguments, so it cannot sit inside a longer one.
            if FLAGS in arg and arg != FLAGS:
                raise ValueError(f"{FLAGS} must be a whole argument, not part of {arg!r}")
        return value


class HttpConfig(_Config):
    """Where each instance's control endpoint is: the `urls` map first, then the instance's label."""

    urls: dict[str, str] = Field(default_factory=dict, description="Control URL per instance id.")
    url_label: str | None = Field(
        "control_url", description="Instance label holding its control URL; null: only `urls` is used."
    )
    timeout_seconds: float = Field(30.0, gt=0, description="Seconds one control request may take.")
    idempotent: bool = Field(
        False, description="The endpoint honours Idempotency-Key: a step cut off by a crash may be re-sent."
    )


class SimConfig(_Config):
    timeout_seconds: float = Field(10.0, gt=0, description="Seconds one simulator request may take.")


class ExecutorsConfig(_Config):
    """The `executors` setting."""

    command: CommandConfig | None = Field(None, description="The command executor; unset: not available.")
    http: HttpConfig = Field(default_factory=HttpConfig)
    sim: SimConfig = Field(default_factory=SimConfig)
