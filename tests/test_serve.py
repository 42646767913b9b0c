"""`perfagent serve` as a real process: start-up logs, the demo fleet, clean SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.conftest import free_port


@contextmanager
def serving(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PERFAGENT_")}
    full_env.update(env or {})
    log = (tmp_path / "agent.log").open("a")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "perfagent",
            "serve",
            "--port",
            str(port),
            "--db",
            str(tmp_path / "a.duckdb"),
            *args,
        ],
        stdout=log,
        stderr=log,
        text=True,
        env=full_env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(base + "/api/v1/health", timeout=1):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"agent did not start: {agent_log(tmp_path)[-3000:]}") from None
                time.sleep(0.1)
        yield base, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def agent_log(tmp_path: Path) -> str:
    return (tmp_path / "agent.log").read_text()


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_default_serve_runs_a_simulated_fleet(tmp_path: Path) -> None:
    """`make run`'s defaults: a mixed simulated fleet, polled, with history, live from the start."""
    with serving(tmp_path, "--dev", env={"PERFAGENT_POLLING_INTERVAL": "0.5"}) as (base, process):
        instances = _get(base + "/api/v1/instances")
        assert {i["source"] for i in instances} == {"simulator"}
        assert {i["engine"] for i in instances} == {"vllm", "tgi", "sglang"}
        assert all(i["labels"]["simulated"] == "true" for i in instances)
        sim = _get(base + "/sim/instances")
        assert {s["id"] for s in sim["instances"]} == {i["id"] for i in instances}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            history = _get(
                base + "/api/v1/metrics/history?instance_id=vllm-0&since=5m&fields=requests_success_total"
            )
            if history["count"] >= 3 and history["points"][-1]["values"]["requests_success_total"]:
                break
            time.sleep(0.5)
        assert history["count"] >= 3
        assert all(p["ok"] for p in history["points"])
        assert history["points"][-1]["values"]["requests_success_total"] > 0  # the simulator serves traffic
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
    assert process.returncode == 0
    assert "vllm-0 (vllm, simulator)" in agent_log(tmp_path)


def test_dev_serve_with_the_captures_demo_fleet_and_clean_sigterm(tmp_path: Path) -> None:
    with serving(tmp_path, "--dev", env={"PERFAGENT_DEMO_FLEET": "captures"}) as (base, process):
        instances = _get(base + "/api/v1/instances")
        assert {i["source"] for i in instances} == {"demo"}
        demo = next(i for i in instances if i["id"] == "demo-vllm-v0")
        collected = _post(
            base + "/api/v1/metrics/collect",
            {
                "instance_id": demo["id"],
                "instance_type": "vllm",
                "metrics_url": demo["metrics_url"],
                "dcgm_url": demo["dcgm_url"],
            },
        )
        assert collected["gpu_metrics"]["num_requests_running"] == 3
        assert collected["gpu_metrics"]["memory_usage_bytes"] > 0
        assert _get(base + "/api/v1/health/detailed")["dependencies"]["instances"] == "healthy"
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
    stderr = agent_log(tmp_path)
    assert process.returncode == 0
    assert str((tmp_path / "a.duckdb").resolve()) in stderr  # where the DB is
    assert "demo-vllm-v1 (vllm, demo)" in stderr  # which instances were loaded
    assert "any target may be fetched" in stderr  # --dev says so


def test_json_logs(tmp_path: Path) -> None:
    with serving(tmp_path, env={"PERFAGENT_LOG_FORMAT": "json", "PERFAGENT_DEMO_FLEET": "off"}) as (
        _,
        process,
    ):
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
    stderr = agent_log(tmp_path)
    started = [json.loads(line) for line in stderr.splitlines() if '"started"' in line or "started" in line]
    assert started, stderr
    entry = started[0]
    assert entry["level"] == "INFO"
    assert entry["db"] == str((tmp_path / "a.duckdb").resolve())
    assert entry["instances"] == []
    assert entry["allowed_targets"] == ["localhost", "127.0.0.0/8", "::1/128"]
