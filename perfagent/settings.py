"""Agent settings: command-line flags, then `PERFAGENT_*` environment variables, then the YAML config
file, then defaults. Every field is documented in the README's settings table (a test checks it)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from perfagent.discovery import DiscoverySpec
from perfagent.errors import ConfigError
from perfagent.executors.config import ExecutorsConfig
from perfagent.models import EngineName, InstanceSpec

# Hosts every deployment may scrape without configuration: the machine itself.
DEFAULT_ALLOWED_TARGETS = ("127.0.0.0/8", "::1/128", "localhost")
ALLOW_ANY = "*"


class Settings(BaseSettings):
    """Everything the agent can be told; see the README's settings table."""

    model_config = SettingsConfigDict(
        env_prefix="PERFAGENT_", extra="forbid", validate_default=True, env_nested_delimiter="__"
    )

    host: str = Field("127.0.0.1", description="Address the HTTP server binds to.")
    port: int = Field(8002, ge=0, le=65535, description="Port of the HTTP server.")
    db_path: Path = Field(
        Path("data/perfagent.duckdb"), description="DuckDB file holding instances and history."
    )
    config_file: Path | None = Field(None, description="Optional YAML file with settings and instances.")
    rules_dir: Path | None = Field(None, description="Directory of user rule files, added to the built-ins.")
    log_format: Literal["text", "json"] = Field("text", description="Log line format.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Lowest logged level."
    )
    agent_id: str = Field("performance-agent", min_length=1, description="Name reported by /config.")
    polling_interval: float = Field(30.0, gt=0, description="Seconds between polls of every instance.")
    retention_days: float = Field(7.0, gt=0, description="Days of history kept; older scrapes are deleted.")
    history_flush_interval: float = Field(
        1.0, gt=0, description="Seconds between batched history writes (a crash loses at most one batch)."
    )
    scrape_timeout: float = Field(5.0, gt=0, description="Seconds one scrape of one target may take.")
    scrape_max_bytes: int = Field(16 * 1024 * 1024, gt=0, description="Largest /metrics body accepted.")
    scrape_concurrency: int = Field(32, ge=1, description="Most targets scraped at once.")
    allowed_targets: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ALLOWED_TARGETS),
        description="Hosts and CIDRs the agent may fetch from; `*` allows any.",
    )
    dev: bool = Field(False, description="Development mode: allow any target and say so at start-up.")
    demo_fleet: Literal["sim", "captures", "off"] = Field(
        "sim",
        description="With no instance configured: serve a simulated fleet (`sim`), the bundled real captures "
        "(`captures`), or nothing (`off`).",
    )
    demo_fleet_size: int = Field(6, ge=1, le=100, description="Instances of the simulated demo fleet.")
    demo_fleet_dir: Path | None = Field(
        None, description="Directory of captures for the demo fleet (default: the checkout's tests/fixtures)."
    )
    prometheus_url: str | None = Field(None, description="Prometheus server to read from and health-check.")
    prometheus_timeout: float = Field(10.0, gt=0, description="Seconds one Prometheus request may take.")
    prometheus_retries: int = Field(
        2, ge=0, le=10, description="Retries of a Prometheus request refused as overloaded or unreachable."
    )
    discovery: list[DiscoverySpec] = Field(
        default_factory=list,
        description="Series selectors whose targets are discovered from Prometheus and analysed by PromQL.",
    )
    redoc_dir: Path | None = Field(
        None, description="Directory holding redoc.standalone.js (default: node_modules)."
    )
    workflow_executor: str = Field(
        "dry_run",
        min_length=1,
        description="Executor of workflows that name none (simulated instances use `sim` when available).",
    )
    workflow_validation_delay: float = Field(
        120.0,
        ge=0,
        description="Seconds after the last change before a workflow's VALIDATION re-runs detection.",
    )
    canary_warmup: float = Field(
        120.0,
        ge=0,
        description="Seconds after a batch's change left out of its judgement (restart, cold caches).",
    )
    canary_window: float = Field(
        600.0,
        gt=0,
        description="Seconds after the warm-up the statistical judge compares a batch over (at least "
        "12 polling intervals).",
    )
    canary_alpha: float = Field(
        0.05, gt=0, lt=1, description="False-alarm bound of the statistical judge over all its tests."
    )
    instances: list[InstanceSpec] = Field(
        default_factory=list, description="Instances to watch (normally given in the config file)."
    )
    executors: ExecutorsConfig = Field(
        default_factory=ExecutorsConfig,
        description="How workflow steps change engines: `command` template, `http` control URLs, `sim`.",
    )

    @field_validator("allowed_targets")
    @classmethod
    def _check_targets(cls, value: list[str]) -> list[str]:
        for entry in value:
            if entry == ALLOW_ANY or (not any(ch in entry for ch in "/:") and not entry[:1].isdigit()):
                continue  # a hostname or the wildcard
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError as exc:
                raise ValueError(f"{entry!r} is neither a hostname nor an IP network") from exc
        return value

    @model_validator(mode="after")
    def _unique_instances(self) -> Settings:
        seen: set[str] = set()
        for spec in self.instances:
            if spec.id in seen:
                raise ValueError(f"instance id {spec.id!r} is listed twice")
            seen.add(spec.id)
        return self

    @model_validator(mode="after")
    def _discovery_needs_prometheus(self) -> Settings:
        if self.discovery and not self.prometheus_url:
            raise ValueError("discovery needs prometheus_url: instances are discovered from Prometheus")
        return self

    @property
    def allow_any_target(self) -> bool:
        return self.dev or ALLOW_ANY in self.allowed_targets

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Flags (init) beat the environment, which beats the file, which beats defaults.
        return (init_settings, env_settings, YamlFileSource(settings_cls))


class YamlFileSource(PydanticBaseSettingsSource):
    """Reads the YAML config file named by the flag or by `PERFAGENT_CONFIG_FILE`."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns the whole mapping

    def __call__(self) -> dict[str, Any]:
        path = self.current_state.get("config_file")
        if not path:
            return {}
        return read_config_file(Path(path))


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path}{where}: invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of settings at the top level")
    return data


def load_settings(**overrides: Any) -> Settings:
    """Build settings from flags (`overrides`, None meaning "not given"), env, file and defaults.

    Raises ConfigError naming each bad setting, so start-up stops with a readable message.
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from exc


__all__ = ["ALLOW_ANY", "EngineName", "Settings", "load_settings", "read_config_file"]
