"""SIGKILL at any moment loses at most the batch in flight; a restart reopens the same file.
SIGTERM flushes what was scraped and exits cleanly."""

from __future__ import annotations

import random
import signal
import time
import urllib.request
from pathlib import Path

import duckdb
from prometheus_client.parser import text_string_to_metric_families

from tests.test_serve import _get, serving

# The captures demo fleet: six instances served by the agent itself, nothing else to start.
FAST = {
    "PERFAGENT_DEMO_FLEET": "captures",
    "PERFAGENT_POLLING_INTERVAL": "0.2",
    "PERFAGENT_HISTORY_FLUSH_INTERVAL": "0.3",
}


def _stored(db: Path) -> int:
    with duckdb.connect(str(db), read_only=True) as conn:
        row = conn.execute("SELECT count(*) FROM scrapes").fetchone()
    assert row is not None
    return int(row[0])


def _finished_scrapes(base: str) -> int:
    """Scrapes the agent has finished (and so queued for history), from its own /metrics."""
    with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
        text = response.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return int(sum(s.value for s in families["perfagent_scrapes"].samples if s.name.endswith("_total")))


def test_sigkill_keeps_everything_acknowledged_and_restarts_on_the_same_file(tmp_path: Path) -> None:
    rng = random.Random(7)
    acknowledged = 0
    for _ in range(3):
        with serving(tmp_path, env=FAST) as (base, process):
            # Everything acknowledged before the previous kill is still there after the restart.
            restored = _get(base + "/api/v1/metrics/history?instance_id=demo-vllm-v1&since=1h")["count"]
            assert restored >= acknowledged
            time.sleep(rng.uniform(0.3, 1.2))
            # The history endpoint flushes before answering: these scrapes are acknowledged as stored.
            acknowledged = _get(base + "/api/v1/metrics/history?instance_id=demo-vllm-v1&since=1h")["count"]
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
        assert process.returncode == -signal.SIGKILL
    assert acknowledged > 0
    with duckdb.connect(str(tmp_path / "a.duckdb"), read_only=True) as conn:
        row = conn.execute("SELECT count(*) FROM scrapes WHERE instance_id = 'demo-vllm-v1'").fetchone()
    assert row is not None and row[0] >= acknowledged


def test_sigkill_loses_only_the_unwritten_batch_and_sigterm_flushes(tmp_path: Path) -> None:
    # The timer never flushes here; each poll cycle's evaluation writes the cycle's scrapes first.
    slow_flush = {**FAST, "PERFAGENT_HISTORY_FLUSH_INTERVAL": "3600"}
    with serving(tmp_path, env=slow_flush) as (base, process):
        time.sleep(1.0)
        finished = _finished_scrapes(base)
        time.sleep(0.6)  # the next cycles complete, and with them the write of those scrapes
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    assert finished >= 6
    assert _stored(tmp_path / "a.duckdb") >= finished  # only scrapes after the last cycle's write can be lost
    with serving(tmp_path, env=slow_flush) as (base, process):
        time.sleep(1.0)
        finished = _finished_scrapes(base)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
    assert process.returncode == 0
    assert finished >= 6  # at least one tick of the six demo instances
    assert _stored(tmp_path / "a.duckdb") >= finished  # every finished scrape was written at exit
