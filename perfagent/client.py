"""A small synchronous Python client for the agent's REST API (standard library only)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote, urlencode


class AgentAPIError(Exception):
    """The agent answered with its error envelope."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any]) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details


class PerformanceAgentClient:
    """One method per endpoint; each returns the decoded JSON body or raises AgentAPIError."""

    def __init__(self, base_url: str = "http://localhost:8002", *, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def _call(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None) -> Any:
        url = f"{self.base_url}/api/v1{path}"
        if query:
            url += "?" + urlencode({k: v for k, v in query.items() if v is not None})
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                error = json.loads(raw)["error"]
            except (ValueError, KeyError, TypeError):
                raise AgentAPIError(exc.code, "HTTP_ERROR", raw.decode(errors="replace")[:200], {}) from exc
            raise AgentAPIError(exc.code, error["code"], error["message"], error.get("details", {})) from exc
        return json.loads(raw) if raw else None

    # health and configuration
    def health(self) -> dict[str, Any]:
        return dict(self._call("GET", "/health"))

    def health_detailed(self) -> dict[str, Any]:
        return dict(self._call("GET", "/health/detailed"))

    def config(self) -> dict[str, Any]:
        return dict(self._call("GET", "/config"))

    def capabilities(self) -> dict[str, Any]:
        return dict(self._call("GET", "/capabilities"))

    # metrics
    def collect_metrics(
        self,
        instance_id: str,
        instance_type: str,
        metrics_url: str,
        *,
        dcgm_url: str | None = None,
        gpu_selector: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "instance_id": instance_id,
            "instance_type": instance_type,
            "metrics_url": metrics_url,
        }
        if dcgm_url is not None:
            body["dcgm_url"] = dcgm_url
        if gpu_selector:
            body["gpu_selector"] = gpu_selector
        return dict(self._call("POST", "/metrics/collect", body))

    def metrics_history(
        self,
        instance_id: str,
        *,
        since: str = "1h",
        until: str | None = None,
        fields: list[str] | None = None,
        limit: int | None = None,
    ) -> dict[str, Any]:
        query = {
            "instance_id": instance_id,
            "since": since,
            "until": until,
            "fields": ",".join(fields) if fields else None,
            "limit": limit,
        }
        return dict(self._call("GET", "/metrics/history", query=query))

    # analysis and optimization
    def detect_bottlenecks(
        self, instance_id: str, metrics: dict[str, Any] | None = None, *, instance_type: str | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"instance_id": instance_id}
        if metrics is not None:
            body["metrics"] = metrics
        if instance_type is not None:
            body["instance_type"] = instance_type
        return dict(self._call("POST", "/analysis/detect-bottlenecks", body))

    def findings(self, **filters: Any) -> dict[str, Any]:
        """Filters: instance_id, type, severity, active (bool), since, until, limit."""
        query = {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in filters.items()}
        return dict(self._call("GET", "/analysis/findings", query=query))

    def backtest(self, **body: Any) -> dict[str, Any]:
        """Fields: since or start/end, instance_id, source, step, rules, rule_names, limit."""
        return dict(self._call("POST", "/analysis/backtest", body))

    def recommend(
        self,
        instance_id: str,
        instance_type: str,
        bottlenecks: list[dict[str, Any]],
        current_config: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "instance_id": instance_id,
            "instance_type": instance_type,
            "bottlenecks": bottlenecks,
        }
        if current_config is not None:
            body["current_config"] = current_config
        return dict(self._call("POST", "/optimization/recommend", body))

    # instances
    def list_instances(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/instances"))

    def get_instance(self, instance_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/instances/{quote(instance_id, safe='')}"))

    def add_instance(
        self,
        instance_id: str,
        engine: str,
        metrics_url: str,
        *,
        dcgm_url: str | None = None,
        gpu_selector: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"id": instance_id, "engine": engine, "metrics_url": metrics_url}
        if dcgm_url is not None:
            body["dcgm_url"] = dcgm_url
        if gpu_selector:
            body["gpu_selector"] = gpu_selector
        if labels:
            body["labels"] = labels
        return dict(self._call("POST", "/instances", body))

    def delete_instance(self, instance_id: str) -> None:
        self._call("DELETE", f"/instances/{quote(instance_id, safe='')}")
