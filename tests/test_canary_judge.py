"""The statistical judge's decisions before and around the statistics: the warm-up, a change the
engine does not show, an engine that does not answer, a setting it cannot show, too little data.

Real parts: the simulator's server and a real capture on loopback, a real DuckDB file, the agent's
scraper. The verdicts on real traffic are in tests/test_closed_loop.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from perfagent.canary import BaselineKind, CanaryCase, JudgeOutcome
from perfagent.canary_judge import StatisticalJudge
from perfagent.clock import utc_now
from perfagent.history import HistoryWriter
from perfagent.models import EngineName, Instance, InstanceSource
from perfagent.scrape import Scraper
from perfagent.sim.fleet import SimFleet
from perfagent.sim.server import build_app
from perfagent.store import Store
from perfagent.targets import TargetPolicy
from tests.conftest import AiohttpServer, capture, free_port, targets_app

WARMUP, WINDOW, POLL = 2.0, 3.0, 0.25


@dataclass
class Rig:
    judge: StatisticalJudge
    instances: dict[str, Instance]


def _instance(instance_id: str, url: str) -> Instance:
    return Instance(
        id=instance_id,
        engine=EngineName.VLLM,
        metrics_url=url,
        source=InstanceSource.CONFIG,
        created_at=utc_now(),
    )


@pytest.fixture
async def rig(aiohttp_server: AiohttpServer, tmp_path: Path) -> AsyncIterator[Rig]:
    sim = await aiohttp_server(build_app(SimFleet("vllm", 2, clock="manual")))
    captures = await aiohttp_server(targets_app())
    instances = {
        "sim-0": _instance("sim-0", str(sim.make_url("/instances/vllm-0/metrics"))),
        "sim-1": _instance("sim-1", str(sim.make_url("/instances/vllm-1/metrics"))),
        "real": _instance("real", str(captures.make_url("/f/" + capture("vllm-v1-recent").name))),
        "down": _instance("down", f"http://127.0.0.1:{free_port()}/metrics"),
    }
    store = await Store.open(tmp_path / "judge.duckdb")
    scraper = Scraper(
        TargetPolicy.from_entries(["127.0.0.0/8"]),
        timeout=2,
        max_bytes=1 << 24,
        concurrency=4,
        user_agent="t",
    )
    history = HistoryWriter(store, flush_interval=60, retention=timedelta(days=1))

    async def lookup(instance_id: str) -> Instance | None:
        return instances.get(instance_id)

    # An agent up for a minute already: its patience runs from the change alone.
    judge = StatisticalJudge(
        store,
        history,
        scraper,
        lookup,
        warmup=WARMUP,
        window=WINDOW,
        polling_interval=POLL,
        started=utc_now() - timedelta(minutes=1),
    )
    try:
        yield Rig(judge, instances)
    finally:
        await scraper.close()
        await store.close()


def case(
    changed: str, settings: Mapping[str, Any], *, ago: float, baseline: tuple[str, ...] = ("sim-1",)
) -> CanaryCase:
    at = utc_now() - timedelta(seconds=ago)
    return CanaryCase(
        workflow_id="wf-test",
        engine=EngineName.VLLM,
        changed=(changed,),
        baseline=baseline,
        baseline_kind=BaselineKind.UNCHANGED if baseline else BaselineKind.BEFORE,
        settings=settings,
        changed_at=at,
        started_at=at,
        addresses=(),
    )


async def test_nothing_is_looked_at_during_the_warm_up(rig: Rig) -> None:
    judgement = await rig.judge.judge(case("down", {"kv_cache_dtype": "fp8"}, ago=0.5))
    assert judgement.outcome is JudgeOutcome.PENDING and judgement.reason.startswith("warm-up until")
    assert 1.0 <= judgement.retry_after <= WARMUP


async def test_a_change_the_engine_does_not_show_fails_naming_what_it_shows(rig: Rig) -> None:
    # The simulator still runs kv_cache_dtype auto: the step "succeeded", the engine says otherwise.
    judgement = await rig.judge.judge(case("sim-0", {"kv_cache_dtype": "fp8"}, ago=WARMUP + 0.1))
    assert judgement.outcome is JudgeOutcome.FAIL
    assert (
        judgement.reason
        == "the change is not in effect: sim-0 reports kv_cache_dtype='auto' (expected 'fp8')"
    )
    [report] = judgement.data["effect"]
    assert report["checks"][0]["source"] == "vllm:cache_config_info{cache_dtype}"


async def test_an_engine_that_does_not_answer_is_waited_for_then_left_to_a_person(rig: Rig) -> None:
    waiting = await rig.judge.judge(case("down", {"kv_cache_dtype": "fp8"}, ago=WARMUP + 0.1))
    assert waiting.outcome is JudgeOutcome.PENDING and waiting.reason == "waiting for down to answer"
    # The window is the 12-poll floor (3 s); past the warm-up and two windows a person looks.
    late = await rig.judge.judge(case("down", {"kv_cache_dtype": "fp8"}, ago=WARMUP + 2 * WINDOW + 0.1))
    assert late.outcome is JudgeOutcome.REVIEW and "down not readable since the change" in late.reason
    assert late.data["effect"][0]["checks"][0]["status"] == "unreachable"


async def test_an_agent_that_has_just_restarted_gives_the_batch_its_windows_again(rig: Rig) -> None:
    """It took no scrapes while it was down, so too little data is no reason to give up yet."""
    rig.judge.started = utc_now()
    late = case("down", {"kv_cache_dtype": "fp8"}, ago=WARMUP + 2 * WINDOW + 0.1)
    assert (await rig.judge.judge(late)).outcome is JudgeOutcome.PENDING
    judgement = await rig.judge.judge(
        case("real", {"enable_prefix_caching": True}, ago=WARMUP + 2 * WINDOW + 0.1)
    )
    assert judgement.outcome is JudgeOutcome.PENDING and "collecting more" in judgement.reason


async def test_unverifiable_settings_do_not_block_and_too_little_data_goes_to_a_person(rig: Rig) -> None:
    # A real vLLM exports no max_num_seqs: unverifiable, recorded, not blocking. With no history the
    # judge waits for data while it may still come...
    settings = {"max_num_seqs": 128, "enable_prefix_caching": True}
    pending = await rig.judge.judge(case("real", settings, ago=WARMUP + WINDOW + 0.1))
    assert pending.outcome is JudgeOutcome.PENDING and "collecting more until" in pending.reason
    # ... and then hands the batch to a person, with what it found.
    review = await rig.judge.judge(case("real", settings, ago=WARMUP + 2 * WINDOW + 0.1))
    assert review.outcome is JudgeOutcome.REVIEW and review.reason.startswith("inconclusive: ")
    checks = {c["setting"]: c["status"] for c in review.data["effect"][0]["checks"]}
    assert checks == {"max_num_seqs": "unverifiable", "enable_prefix_caching": "confirmed"}
    assert review.data["statistics"]["outcome"] == "inconclusive"
    assert review.data["window"]["until"] > review.data["window"]["since"]


async def test_a_group_of_one_is_compared_with_its_own_past(rig: Rig) -> None:
    review = await rig.judge.judge(
        case("real", {"enable_prefix_caching": True}, ago=WARMUP + 2 * WINDOW + 1, baseline=())
    )
    assert review.outcome is JudgeOutcome.REVIEW
    window = review.data["window"]
    # The baseline window ends where the change began and is as long as the judged one.
    assert window["baseline_until"] < window["since"]
    assert set(window) == {"since", "until", "baseline_since", "baseline_until"}
