"""SIGKILL a real `perfagent serve` in each stage of a workflow and restart it on the same DuckDB file:
the workflow is there, waits for what it waited for or goes on from its last persisted step, and no
step runs twice (each step's record and its events appear once).

The fleet is three vLLM-like targets on loopback (deployment group g1, vllm-1's KV cache full),
served from this process; the agent polls them every 0.2 s.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from perfagent.clock import utc_now
from perfagent.store import Store
from perfagent.workflow_machine import approve, begin_step, start
from perfagent.workflow_steps import RunStep, next_action
from perfagent.workflow_store import WorkflowStore
from tests.conftest import free_port
from tests.test_closed_loop import KV_RULES
from tests.test_serve import serving
from tests.test_workflows_api import FAST_RULES, FULL, HEALTHY, exposition

WF = "/api/v1/workflows"
Fleet = dict[str, dict[str, float]]


@pytest.fixture
def fleet() -> Iterator[tuple[str, Fleet]]:
    """The targets, on a loopback port: (base URL, their numbers, which a test may change)."""
    state: Fleet = {"vllm-1": dict(FULL), "vllm-2": dict(HEALTHY), "vllm-3": dict(HEALTHY)}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = exposition(**state[self.path.rsplit("/", 1)[-1]]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()


def agent_env(tmp_path: Path, base: str, **extra: str) -> dict[str, str]:
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)
    (rules / "fast.yaml").write_text(FAST_RULES)
    instances = [
        {
            "id": name,
            "engine": "vllm",
            "metrics_url": f"{base}/m/{name}",
            "labels": {"deployment_group": "g1"},
        }
        for name in ("vllm-1", "vllm-2", "vllm-3")
    ]
    return {
        "PERFAGENT_INSTANCES": json.dumps(instances),
        "PERFAGENT_RULES_DIR": str(rules),
        "PERFAGENT_POLLING_INTERVAL": "0.2",
        "PERFAGENT_HISTORY_FLUSH_INTERVAL": "0.2",
        **extra,
    }


def call(url: str, body: Any = None, *, method: str | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url,
        data=data,
        method=method or ("POST" if data is not None else "GET"),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def post(base: str, path: str, body: Any = None) -> Any:
    status, answer = call(base + path, {} if body is None else body, method="POST")
    assert status in (200, 201), answer
    return answer


def wait_for(base: str, wid: str, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    body: dict[str, Any] = {}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        _, body = call(f"{base}{WF}/{wid}")
        if check(body):
            return body
        time.sleep(0.05)
    raise AssertionError(f"workflow never reached the state: {body}")


def waiting(what: str, stage: str) -> Callable[[dict[str, Any]], bool]:
    return lambda b: b["waiting_for"] == what and b["current_stage"] == stage


def steps_waiting(n: int) -> Callable[[dict[str, Any]], bool]:
    """The n-th step was handed to a person."""
    return lambda b: b["waiting_for"] == "confirm" and len(b["steps"]) == n


def create(base: str, **body: Any) -> str:
    """A workflow on vllm-1, once the agent has stored a scrape of it (the analysis reads history)."""
    deadline = time.monotonic() + 20
    while call(f"{base}/api/v1/metrics/history?instance_id=vllm-1&since=1h")[1]["count"] == 0:
        assert time.monotonic() < deadline, "no scrape stored"
        time.sleep(0.05)
    created = post(base, WF, {"instance_id": "vllm-1", "instance_type": "vllm", **body})
    return str(created["workflow_id"])


def kill(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    assert process.returncode == -signal.SIGKILL


def actions(body: dict[str, Any]) -> list[str]:
    return [e["action"] for e in body["events"]]


def assert_each_step_ran_once(body: dict[str, Any]) -> None:
    steps = body["steps"]
    assert all(s["attempts"] == 1 for s in steps), steps
    for action in ("step_started", "step_waiting"):
        keys = [e["data"]["step"] for e in body["events"] if e["action"] == action]
        assert sorted(keys) == sorted(s["key"] for s in steps), (action, keys)


def test_sigkill_in_approval(tmp_path: Path, fleet: tuple[str, Fleet]) -> None:
    env = agent_env(tmp_path, fleet[0])
    with serving(tmp_path, env=env) as (base, process):
        wid = create(base)
        kill(process)
    with serving(tmp_path, env=env) as (base, process):
        _, body = call(f"{base}{WF}/{wid}")
        assert (body["status"], body["waiting_for"], body["current_stage"]) == (
            "PENDING_APPROVAL",
            "approval",
            "APPROVAL",
        )
        assert actions(body) == ["created"] and body["steps"] == []
        post(base, f"{WF}/{wid}/approve")
        body = wait_for(base, wid, waiting("confirm", "CANARY"))
        assert_each_step_ran_once(body)


def test_sigkill_in_canary(tmp_path: Path, fleet: tuple[str, Fleet]) -> None:
    env = agent_env(tmp_path, fleet[0])
    with serving(tmp_path, env=env) as (base, process):
        wid = create(base, auto_approve=True)
        before = wait_for(base, wid, waiting("confirm", "CANARY"))
        kill(process)
    with serving(tmp_path, env=env) as (base, process):
        _, body = call(f"{base}{WF}/{wid}")
        # Still waiting for the person to apply the change: the dry_run step was not handed out again.
        assert (body["status"], body["waiting_for"], body["current_stage"]) == (
            "IN_PROGRESS",
            "confirm",
            "CANARY",
        )
        assert body["events"] == before["events"] and body["steps"] == before["steps"]
        post(base, f"{WF}/{wid}/confirm")
        before = wait_for(base, wid, waiting("canary_review", "CANARY"))
        kill(process)
    with serving(tmp_path, env=env) as (base, process):
        _, body = call(f"{base}{WF}/{wid}")
        assert body["events"] == before["events"] and body["waiting_for"] == "canary_review"
        post(base, f"{WF}/{wid}/resume", {"verdict": "pass"})
        body = wait_for(base, wid, waiting("confirm", "ROLLOUT"))
        assert_each_step_ran_once(body)
        assert actions(body).count("canary_review") == 1


def test_sigkill_in_rollout(tmp_path: Path, fleet: tuple[str, Fleet]) -> None:
    env = agent_env(tmp_path, fleet[0])
    with serving(tmp_path, env=env) as (base, process):
        wid = create(base, auto_approve=True)
        wait_for(base, wid, waiting("confirm", "CANARY"))
        post(base, f"{WF}/{wid}/confirm")
        wait_for(base, wid, waiting("canary_review", "CANARY"))
        post(base, f"{WF}/{wid}/resume")
        before = wait_for(base, wid, waiting("confirm", "ROLLOUT"))
        kill(process)
    with serving(tmp_path, env=env) as (base, process):
        _, body = call(f"{base}{WF}/{wid}")
        assert body["events"] == before["events"] and body["steps"] == before["steps"]
        assert [s["instance_id"] for s in body["steps"]] == ["vllm-1", "vllm-2"]
        post(base, f"{WF}/{wid}/confirm")
        before = wait_for(base, wid, waiting("canary_review", "ROLLOUT"))  # rollout batch 1 in review
        kill(process)
    with serving(tmp_path, env=env) as (base, process):
        _, body = call(f"{base}{WF}/{wid}")
        assert body["events"] == before["events"] and body["review"]["instances"] == ["vllm-2"]
        post(base, f"{WF}/{wid}/resume")
        body = wait_for(base, wid, steps_waiting(3))
        assert body["steps"][-1]["instance_id"] == "vllm-3"
        assert_each_step_ran_once(body)


async def _approved_and_stopped_mid_step(db: Path, wid: str) -> str:
    """What the agent writes from an approval until its executor runs the canary step, and no
    further: the state a SIGKILL while the executor ran leaves behind. Written by the same functions
    the API and the engine call, on the agent's file."""
    store = await Store.open(db)
    try:
        workflows = WorkflowStore(store)
        await workflows.transition(wid, lambda wf, _: approve(wf, "operator", None, utc_now()))
        await workflows.transition(wid, lambda wf, _: start(wf, utc_now()))
        wf, steps = await workflows.get(wid), await workflows.steps(wid)
        assert wf is not None
        action = next_action(wf, steps, utc_now(), 0.0)
        assert isinstance(action, RunStep)
        t = await workflows.transition(wid, lambda wf, _: begin_step(wf, action.step, utc_now()))
        return t.steps[0].key
    finally:
        await store.close()


def test_sigkill_mid_step(tmp_path: Path, fleet: tuple[str, Fleet]) -> None:
    env = agent_env(tmp_path, fleet[0])
    with serving(tmp_path, env=env) as (base, process):
        wid = create(base)
        kill(process)
    key = asyncio.run(_approved_and_stopped_mid_step(tmp_path / "a.duckdb", wid))
    with serving(tmp_path, env=env) as (base, process):
        # dry_run is idempotent by key (it only writes the change down): the step in doubt runs again,
        # leaving one record, and the trail says why.
        body = wait_for(base, wid, waiting("confirm", "CANARY"))
        [step] = body["steps"]
        assert step["key"] == key and step["attempts"] == 2 and step["state"] == "done"
        assert step["record"]["ran"]["cli_args"] == ["--kv-cache-dtype", "fp8"]
        assert actions(body) == [
            "created",
            "approved",
            "started",
            "step_started",
            "step_rerun",
            "step_waiting",
        ]
        rerun = body["events"][4]
        assert "found started but not done after a restart" in rerun["reason"]
        post(base, f"{WF}/{wid}/confirm")
        wait_for(base, wid, waiting("canary_review", "CANARY"))


def test_sigkill_in_validation(tmp_path: Path, fleet: tuple[str, Fleet]) -> None:
    base_url, state = fleet
    env = agent_env(tmp_path, base_url, PERFAGENT_WORKFLOW_VALIDATION_DELAY="5")
    with serving(tmp_path, env=env) as (base, process):
        wid = create(base, auto_approve=True)
        wait_for(base, wid, waiting("confirm", "CANARY"))
        post(base, f"{WF}/{wid}/confirm")
        wait_for(base, wid, waiting("canary_review", "CANARY"))
        post(base, f"{WF}/{wid}/resume")
        for n in (2, 3):
            wait_for(base, wid, steps_waiting(n))
            if n == 3:
                for name in state:
                    state[name].update(HEALTHY)  # the change worked
            post(base, f"{WF}/{wid}/confirm")
            wait_for(base, wid, waiting("canary_review", "ROLLOUT"))
            post(base, f"{WF}/{wid}/resume")
        before = wait_for(base, wid, lambda b: b["current_stage"] == "VALIDATION")
        assert before["status"] == "IN_PROGRESS" and "validated" not in actions(before)
        kill(process)  # within the 5 s VALIDATION waits for scrapes taken after the change
    killed_at = utc_now()
    with serving(tmp_path, env=env) as (base, process):
        body = wait_for(base, wid, lambda b: b["status"] == "COMPLETED")
        assert actions(body).count("validated") == 1
        validated = next(e for e in body["events"] if e["action"] == "validated")
        assert validated["at"] > killed_at.isoformat().replace("+00:00", "Z")  # done once, by the new agent
        assert body["validation"]["outcome"] == "resolved", body["validation"]
        assert_each_step_ran_once(body)


@pytest.fixture
def sim_fleet(tmp_path: Path) -> Iterator[str]:
    """`perfagent sim` as its own process (it outlives the agent's SIGKILL): three vLLM instances whose
    long contexts outgrow the KV cache, at 30x real time. Yields its base URL."""
    port = free_port()
    log = (tmp_path / "sim.log").open("w")
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "perfagent", "sim", "--engine", "vllm", "--instances", "3"),
            *("--port", str(port), "--scenario", "kv_exhaustion", "--speed", "30"),
            *("--restart-seconds", "10", "--seed", "7"),
        ],
        stdout=log,
        stderr=log,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(base + "/instances", timeout=1):
                    break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, "perfagent sim did not start"
                time.sleep(0.1)
        yield base
    finally:
        process.kill()
        process.wait()
        log.close()


def sim_views(base: str) -> dict[str, dict[str, Any]]:
    _, listed = call(base + "/instances")
    return {v["id"]: v for v in listed["instances"]}


def test_sigkill_while_the_statistical_judge_waits_on_the_canary(tmp_path: Path, sim_fleet: str) -> None:
    """The automatic path: the sim executor changes the canary, the agent dies inside the judging
    window, and the restarted agent judges the same change (never applied again) and rolls it out."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "fast.yaml").write_text(KV_RULES)
    instances = [
        {
            "id": name,
            "engine": "vllm",
            "metrics_url": f"{sim_fleet}/instances/{name}/metrics",
            "labels": {"deployment_group": "g1"},
        }
        for name in ("vllm-0", "vllm-1", "vllm-2")
    ]
    env = {
        "PERFAGENT_INSTANCES": json.dumps(instances),
        "PERFAGENT_RULES_DIR": str(rules),
        "PERFAGENT_POLLING_INTERVAL": "0.25",
        "PERFAGENT_HISTORY_FLUSH_INTERVAL": "0.25",
        "PERFAGENT_CANARY_WARMUP": "3",
        "PERFAGENT_CANARY_WINDOW": "3",
        "PERFAGENT_WORKFLOW_VALIDATION_DELAY": "1",
    }
    with serving(tmp_path, env=env) as (base, process):
        deadline = time.monotonic() + 30
        while True:  # the KV cache fills within two simulated minutes: the finding fires
            _, found = call(f"{base}/api/v1/analysis/findings?active=true&instance_id=vllm-0")
            if any(f["rule"] == "FastKVPreemption" and f["fired_at"] for f in found["findings"]):
                break
            assert time.monotonic() < deadline, "no KV finding"
            time.sleep(0.2)
        created = post(base, WF, {"instance_id": "vllm-0", "auto_approve": True})
        wid = created["workflow_id"]
        assert (created["executor"], created["judge"]) == ("sim", "statistical")
        before = wait_for(base, wid, lambda b: bool(b["steps"]) and b["steps"][0]["outcome"] == "applied")
        assert before["current_stage"] == "CANARY" and before["verdicts"] == []
        kill(process)  # inside the warm-up and window the judge waits out
    views = sim_views(sim_fleet)
    assert (views["vllm-0"]["restarts"], views["vllm-0"]["settings"]["kv_cache_dtype"]) == (1, "fp8")

    with serving(tmp_path, env=env) as (base, process):
        deadline = time.monotonic() + 45
        while True:
            _, body = call(f"{base}{WF}/{wid}")
            if body["status"] not in ("IN_PROGRESS", "APPROVED") or body["waiting_for"]:
                break
            assert time.monotonic() < deadline, body["current_stage"]
            time.sleep(0.2)
    assert body["status"] == "COMPLETED", (body["reason"], [v["reason"] for v in body["verdicts"]])
    # The canary step ran once, before the crash; the restarted agent only judged it.
    canary = body["steps"][0]
    assert canary["key"] == before["steps"][0]["key"] and canary["attempts"] == 1
    assert canary["done_at"] == before["steps"][0]["done_at"]
    assert all(s["attempts"] == 1 for s in body["steps"]) and len(body["steps"]) == 3
    keys = [e["data"]["step"] for e in body["events"] if e["action"] == "step_started"]
    assert sorted(keys) == sorted(s["key"] for s in body["steps"])
    assert [(v["batch"], v["verdict"]) for v in body["verdicts"]] == [(0, "pass"), (1, "pass"), (2, "pass")]
    assert body["events"][: len(before["events"])] == before["events"]
    # The simulator agrees: one restart per instance, the canary's included.
    views = sim_views(sim_fleet)
    assert {n: (v["restarts"], v["settings"]["kv_cache_dtype"]) for n, v in views.items()} == {
        n: (1, "fp8") for n in ("vllm-0", "vllm-1", "vllm-2")
    }
