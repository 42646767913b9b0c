"""POST /analysis/backtest over real HTTP: the simulated day from the agent's own DuckDB history,
inline rules to tune, Prometheus as the source, every failure in the error envelope; and the CLI
going through a running agent."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from perfagent.app import create_app
from perfagent.backtest import BacktestReport
from perfagent.settings import Settings
from tests import simday
from tests.prometheus import backfilled_prometheus
from tests.test_backtest import prometheus_day
from tests.test_error_shape import assert_envelope

Client = TestClient[web.Request, web.Application]
DAY = timedelta(days=1)
PATH = "/api/v1/analysis/backtest"

TUNED = """
groups:
  - name: tuned
    rules:
      # The built-in QueueBuildup with a longer `for`: the day's 40-minute overload still fires it.
      - name: QueueBuildup
        type: QUEUE_BUILDUP
        quantity: requests_waiting
        op: ">"
        over: 1m
        reduce: min
        thresholds: {MEDIUM: 5, HIGH: 20, CRITICAL: 50}
        for: 30m
        recommendation: Add replicas.
"""


@pytest.fixture(scope="module")
def day() -> datetime:
    return simday.day_start()


@pytest.fixture(scope="module")
def day_db(tmp_path_factory: pytest.TempPathFactory, day: datetime) -> Path:
    path = tmp_path_factory.mktemp("day") / "history.duckdb"
    asyncio.run(simday.write_day(path, day))
    return path


def _fleet(**labels: str) -> list[dict[str, Any]]:
    """The simulated fleet as configured instances; nothing listens at their URLs (port 9)."""
    return [
        {"id": i, "engine": e, "metrics_url": "http://127.0.0.1:9/metrics", "labels": labels}
        for i, e in simday.engines().items()
    ]


@pytest.fixture
def day_settings(day_db: Path, tmp_path: Path, make_settings: Callable[..., Settings]) -> Settings:
    db = tmp_path / "agent.duckdb"
    shutil.copy(day_db, db)  # the agent writes to its file: each test gets its own copy
    return make_settings(db_path=db, polling_interval=3600, instances=_fleet())


@pytest.fixture
async def day_agent(aiohttp_client: Any, day_settings: Settings) -> Client:
    client: Client = await aiohttp_client(create_app(day_settings))
    return client


def _range(day: datetime, **extra: Any) -> dict[str, Any]:
    return {"start": day.isoformat(), "end": (day + DAY).isoformat(), **extra}


async def test_backtest_of_the_day_through_the_api(day_agent: Client, day: datetime) -> None:
    response = await day_agent.post(PATH, json=_range(day))
    assert response.status == 200, await response.text()
    report = BacktestReport.model_validate(await response.json())
    assert report.source == "history" and report.step_seconds == simday.STEP
    fired = {(e.instance_id, e.rule) for e in report.episodes}
    assert {(i.instance_id, rule) for i in simday.INCIDENTS for rule in i.rules} <= fired
    assert {instance for instance, _ in fired} == {i.instance_id for i in simday.INCIDENTS}
    assert {i.instance_id: i.engine for i in report.instances} == simday.engines()


async def test_one_instance_one_rule_and_a_limit(day_agent: Client, day: datetime) -> None:
    body = _range(day, instance_id="vllm-0", rule_names=["QueueBuildup", "HighTTFT"], step="1m", limit=1)
    response = await day_agent.post(PATH, json=body)
    assert response.status == 200
    report = BacktestReport.model_validate(await response.json())
    assert report.step_seconds == 60
    assert [r.rule for r in report.rules] == ["HighTTFT", "QueueBuildup"]  # the rule set's order
    assert [i.instance_id for i in report.instances] == ["vllm-0"]
    assert len(report.episodes) == 1 and report.episodes_truncated
    assert sum(r.episodes for r in report.rules) == 2  # the summaries count every episode


async def test_inline_rules_tune_a_rule(day_agent: Client, day: datetime) -> None:
    body = _range(day, instance_id="vllm-0", rules=TUNED, rule_names=["QueueBuildup"])
    response = await day_agent.post(PATH, json=body)
    assert response.status == 200
    report = BacktestReport.model_validate(await response.json())
    [summary] = report.rules
    assert summary.for_seconds == 1800
    [episode] = report.episodes
    assert episode.fired_at - episode.pending_at == timedelta(minutes=30)
    assert episode.pending_at >= day + timedelta(hours=3)


async def test_a_range_without_history_is_empty_with_a_note(day_agent: Client, day: datetime) -> None:
    body = {"start": (day - 3 * DAY).isoformat(), "end": (day - 2 * DAY).isoformat()}
    response = await day_agent.post(PATH, json=body)
    assert response.status == 200
    report = BacktestReport.model_validate(await response.json())
    assert report.episodes == [] and all(r.episodes == 0 for r in report.rules)
    assert any("no data" in note for note in report.notes)


BAD_REQUESTS: list[tuple[dict[str, Any], str]] = [
    ({"since": "7d", "start": "2026-01-01T00:00:00Z"}, "since"),
    ({"since": "yesterday"}, "since"),
    ({"start": "1h", "end": "2h"}, "start"),
    ({"step": "soon"}, "step"),
    ({"step": "0s"}, "step"),
    ({"source": "graphite"}, "source"),
    ({"rule_names": ["NoSuchRule"]}, "rule_names"),
    ({"rules": {"../escape.yaml": "groups: []"}}, "rules"),
    ({"limit": -1}, "limit"),
    # Over the limits: 4 instances x 40 days at 1 s.
    ({"since": "40d", "step": "1s"}, "step"),
]


async def test_bad_requests_are_validation_errors(day_agent: Client) -> None:
    """One agent for every case: each is a 400 naming the field."""
    for body, field in BAD_REQUESTS:
        response = await day_agent.post(PATH, json=body)
        assert response.status == 400, body
        payload = await response.json()
        assert_envelope(payload, 400, "VALIDATION_ERROR")
        assert payload["error"]["details"]["field"] == field, body


async def test_invalid_inline_rules_name_the_file_rule_and_line(day_agent: Client) -> None:
    bad = TUNED.replace("quantity: requests_waiting", "quantity: requests_queued")
    response = await day_agent.post(PATH, json={"rules": {"tuned.yaml": bad}})
    assert response.status == 400
    payload = await response.json()
    assert_envelope(payload, 400, "VALIDATION_ERROR")
    [problem] = payload["error"]["details"]["problems"]
    assert problem["file"] == "tuned.yaml" and problem["rule"] == "QueueBuildup"
    assert problem["line"] == TUNED.splitlines().index("        quantity: requests_waiting") + 1
    assert "unknown quantity 'requests_queued'" in problem["message"]
    assert payload["error"]["message"].startswith("invalid rules: tuned.yaml:")


async def test_unknown_instance_without_history_is_not_found(day_agent: Client) -> None:
    response = await day_agent.post(PATH, json={"instance_id": "nobody"})
    assert response.status == 404
    assert_envelope(await response.json(), 404, "NOT_FOUND")


async def test_prometheus_source_needs_prometheus_url(day_agent: Client) -> None:
    response = await day_agent.post(PATH, json={"source": "prometheus"})
    assert response.status == 400
    payload = await response.json()
    assert_envelope(payload, 400, "VALIDATION_ERROR")
    assert payload["error"]["details"] == {"field": "source", "setting": "prometheus_url"}


# --- Prometheus -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory, day: datetime) -> Iterator[str]:
    with backfilled_prometheus(tmp_path_factory.mktemp("prometheus"), prometheus_day(day)) as url:
        yield url


async def test_backtest_from_prometheus(
    aiohttp_client: Any, make_settings: Callable[..., Settings], prometheus: str, day: datetime
) -> None:
    instances = [
        {
            "id": t,
            "engine": "vllm",
            "metrics_url": "http://127.0.0.1:9/metrics",
            "labels": {"job": "vllm", "instance": t},
        }
        for t in ("a", "b")
    ]
    settings = make_settings(prometheus_url=prometheus, polling_interval=3600, instances=instances)
    agent: Client = await aiohttp_client(create_app(settings))
    body = {
        "source": "prometheus",
        "start": day.isoformat(),
        "end": (day + timedelta(hours=4)).isoformat(),
        "rule_names": ["QueueBuildup"],
        "step": "1m",
    }
    response = await agent.post(PATH, json=body)
    assert response.status == 200, await response.text()
    report = BacktestReport.model_validate(await response.json())
    assert report.source == "prometheus"
    [episode] = report.episodes
    assert (episode.instance_id, episode.pending_at, episode.fired_at, episode.resolved_at) == (
        "a",
        day + timedelta(hours=1),
        day + timedelta(hours=1, minutes=2),
        day + timedelta(hours=1, minutes=40),
    )


async def test_prometheus_down_is_service_unavailable(
    aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    instance = {
        "id": "a",
        "engine": "vllm",
        "metrics_url": "http://127.0.0.1:9/metrics",
        "labels": {"instance": "a"},
    }
    settings = make_settings(
        prometheus_url="http://127.0.0.1:9", prometheus_retries=0, polling_interval=3600, instances=[instance]
    )
    agent: Client = await aiohttp_client(create_app(settings))
    response = await agent.post(PATH, json={"source": "prometheus", "since": "1h"})
    assert response.status == 503
    payload = await response.json()
    assert_envelope(payload, 503, "SERVICE_UNAVAILABLE")
    assert payload["error"]["details"]["dependency"] == "prometheus"


# --- the CLI through a running agent ------------------------------------------------------------------


async def test_cli_uses_the_running_agent(aiohttp_server: Any, day_settings: Settings, day: datetime) -> None:
    server = await aiohttp_server(create_app(day_settings))
    result = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "perfagent",
            "backtest",
            "--url",
            str(server.make_url("")).rstrip("/"),
            "--db",
            str(day_settings.db_path),
            "--from",
            day.isoformat(),
            "--to",
            (day + DAY).isoformat(),
            "--rule",
            "KVCachePreemption",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "the running agent's API" in result.stderr
    report = BacktestReport.model_validate_json(result.stdout)
    assert {(e.instance_id, e.rule) for e in report.episodes} == {
        (i.instance_id, "KVCachePreemption") for i in simday.INCIDENTS if "KVCachePreemption" in i.rules
    }
