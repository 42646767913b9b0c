"""Findings over time: pending, firing after `for`, kept for `keep_firing_for`, resolved; restart-safe."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from perfagent.detect import RESULT_SCHEMA
from perfagent.findings import STATE_SCHEMA, TRANSITION_SCHEMA, FindingTracker, Step
from perfagent.rules import LoadedRule, Rule

T0 = datetime(2025, 3, 1, tzinfo=UTC)
STEP = timedelta(seconds=15)


def tracker(for_: str = "0s", keep: str = "0s", name: str = "R") -> FindingTracker:
    rule = Rule.model_validate(
        {
            "name": name,
            "type": "QUEUE_BUILDUP",
            "quantity": "requests_waiting",
            "op": ">",
            "thresholds": {"MEDIUM": 5, "HIGH": 20},
            "for": for_,
            "keep_firing_for": keep,
            "recommendation": "r",
        }
    )
    return FindingTracker.from_rules([LoadedRule(rule, Path("t.yaml"), 1, "g", None, False)])


def results(at: datetime, *rows: tuple[str, str]) -> pl.DataFrame:
    """Evaluation results at `at`: (instance, severity) pairs of rule R that hold."""
    data: dict[str, list[Any]] = {name: [] for name in RESULT_SCHEMA}
    for instance, severity in rows:
        for name in RESULT_SCHEMA:
            data[name].append(None)
        data["instance_id"][-1], data["rule"][-1], data["severity"][-1] = instance, "R", severity
        data["type"][-1], data["engine"][-1], data["window_end"][-1] = "QUEUE_BUILDUP", "vllm", at
        data["value"][-1] = 30.0 if severity == "HIGH" else 6.0
    return pl.DataFrame(data, schema=RESULT_SCHEMA)


def run(t: FindingTracker, timeline: list[str | None], state: pl.DataFrame | None = None) -> list[Step]:
    """Advance through one instance's timeline: a severity where the rule holds, None where not."""
    steps = []
    state = t.empty_state() if state is None else state
    for i, severity in enumerate(timeline):
        at = T0 + i * STEP
        step = t.advance(state, results(at, *([("a", severity)] if severity else [])), at)
        state = step.state
        steps.append(step)
    return steps


def states(steps: list[Step]) -> list[str | None]:
    return [s.state["state"].to_list()[0] if s.state.height else None for s in steps]


def kinds(steps: list[Step]) -> list[list[str]]:
    return [s.transitions["kind"].to_list() for s in steps]


def test_pending_then_firing_after_for() -> None:
    steps = run(tracker(for_="45s"), ["MEDIUM"] * 5)
    assert states(steps) == ["pending", "pending", "pending", "firing", "firing"]
    assert kinds(steps) == [[], [], [], ["fired"], []]
    fired = steps[3].transitions.row(0, named=True)
    assert (fired["first_seen"], fired["fired_at"], fired["last_seen"]) == (T0, T0 + 3 * STEP, T0 + 3 * STEP)


def test_an_interruption_resets_pending() -> None:
    steps = run(tracker(for_="30s"), ["MEDIUM", "MEDIUM", None, "MEDIUM", "MEDIUM", "MEDIUM"])
    assert states(steps) == ["pending", "pending", None, "pending", "pending", "firing"]
    assert all(not k for k in kinds(steps)[:5])  # a dropped pending finding is no transition
    assert steps[5].state["first_seen"].item() == T0 + 3 * STEP


def test_keep_firing_for_then_resolved() -> None:
    steps = run(tracker(keep="30s"), ["MEDIUM", None, "MEDIUM", None, None, None])
    assert states(steps) == ["firing", "firing", "firing", "firing", None, None]
    assert kinds(steps) == [["fired"], [], [], [], ["resolved"], []]
    resolved = steps[4].transitions.row(0, named=True)
    assert resolved["resolved_at"] == T0 + 4 * STEP and resolved["last_seen"] == T0 + 2 * STEP
    assert resolved["first_seen"] == T0 and resolved["fired_at"] == T0


def test_severity_changes_while_firing() -> None:
    steps = run(tracker(), ["MEDIUM", "HIGH", "HIGH", "MEDIUM"])
    assert kinds(steps) == [["fired"], ["severity_changed"], [], ["severity_changed"]]
    change = steps[1].transitions.row(0, named=True)
    assert (change["previous_severity"], change["severity"], change["value"]) == ("MEDIUM", "HIGH", 30.0)


def test_findings_are_per_instance_and_a_removed_rule_resolves() -> None:
    t = tracker()
    state = t.advance(t.empty_state(), results(T0, ("a", "MEDIUM"), ("b", "HIGH")), T0).state
    assert state.select("instance_id", "state", "severity").rows() == [
        ("a", "firing", "MEDIUM"),
        ("b", "firing", "HIGH"),
    ]
    # A tracker without rule R (it was deleted from the rule files) resolves its findings.
    other = tracker(name="Other", keep="1h")
    step = other.advance(state, results(T0 + STEP), T0 + STEP)
    assert step.state.is_empty() and step.transitions["kind"].to_list() == ["resolved", "resolved"]


def test_state_survives_a_restart_through_storage() -> None:
    t = tracker(for_="30s", keep="30s")
    timeline = ["MEDIUM", "MEDIUM", "MEDIUM", None, None, None]
    straight = run(t, timeline)
    # Stop after three evaluations, persist the state (Arrow IPC here; DuckDB in the agent), resume.
    first = run(t, timeline[:3])
    buffer = io.BytesIO()
    first[-1].state.write_ipc(buffer)
    buffer.seek(0)
    restored = pl.read_ipc(buffer)
    resumed = []
    state = restored
    for i, severity in enumerate(timeline[3:], start=3):
        at = T0 + i * STEP
        step = t.advance(state, results(at, *([("a", severity)] if severity else [])), at)
        state = step.state
        resumed.append(step)
    for a, b in zip(straight[3:], resumed, strict=True):
        assert a.state.equals(b.state) and a.transitions.equals(b.transitions)
    assert straight[0].state.schema == STATE_SCHEMA and straight[2].transitions.schema == TRANSITION_SCHEMA


def test_replay_over_evaluate_series_rows() -> None:
    t = tracker(for_="15s")
    series = pl.concat([results(T0 + i * STEP, ("a", "MEDIUM")) for i in (0, 1, 2)])
    steps = list(t.replay(series, [T0 + i * STEP for i in range(4)]))
    assert states(steps) == ["pending", "firing", "firing", None]


# --- the property: never fires before `for`; resolves exactly `keep_firing_for` after the last true ---


@settings(max_examples=60, deadline=None)
@given(
    timeline=st.lists(st.booleans(), min_size=1, max_size=24),
    for_steps=st.integers(0, 5),
    keep_steps=st.integers(0, 5),
)
def test_for_and_keep_firing_for_timelines(timeline: list[bool], for_steps: int, keep_steps: int) -> None:
    t = tracker(for_=f"{15 * for_steps}s", keep=f"{15 * keep_steps}s")
    steps = run(t, ["MEDIUM" if holds else None for holds in timeline] + [None] * (keep_steps + 1))
    held = timeline + [False] * (keep_steps + 1)
    # A plain model of the same rules, one evaluation at a time.
    state: str | None = None
    since = last_true = 0
    for i, step in enumerate(steps):
        was = state == "firing"
        if held[i]:
            if state is None:
                state, since = "pending", i
            last_true = i
            if state == "pending" and i - since >= for_steps:
                state = "firing"
        elif state == "pending" or (state == "firing" and i - last_true >= keep_steps):
            state = None
        firing = state == "firing"
        assert (step.state.height and step.state["state"].item() == "firing") == firing, (i, steps)
        fired = "fired" in step.transitions["kind"].to_list()
        resolved = "resolved" in step.transitions["kind"].to_list()
        assert fired == (firing and not was)
        assert resolved == (was and not firing)
        if fired:
            # Never before the condition held at every evaluation of the last `for`.
            assert i >= for_steps and all(held[i - for_steps : i + 1])
        if resolved:
            # Exactly keep_firing_for after the last evaluation at which it held.
            assert last_true is not None and i - last_true == max(keep_steps, 1)
            assert not any(held[last_true + 1 : i + 1])
