"""The DuckDB store: operations follow one another on its one connection without interfering."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from perfagent.models import EngineName, InstanceSource, InstanceSpec
from perfagent.store import Store


async def test_a_half_read_result_does_not_block_the_next_query(tmp_path: Path) -> None:
    """DuckDB 2.0 refuses a query while an earlier `execute()` result is unfinished; an existence
    check reads one row only, so the store must finish it (a 500 on /analysis/findings before)."""
    store = await Store.open(tmp_path / "s.duckdb")
    try:
        spec = InstanceSpec(id="a", engine=EngineName.VLLM, metrics_url="http://127.0.0.1:1/metrics")
        now = datetime.now(UTC)
        assert await store.insert_instance(spec, InstanceSource.API, now)
        assert not await store.insert_instance(spec, InstanceSource.API, now)  # the one-row check
        assert (await store.findings([], [], 10)).height == 0
        assert (await store.history("a", now - timedelta(hours=1), now, ["requests_running"])).height == 0
        assert await store.delete_instance("a")
        await store.ping()
        assert await store.list_instances() == []
    finally:
        await store.close()


async def test_retention_deletes_only_what_is_older(tmp_path: Path) -> None:
    from perfagent.history import HistoryWriter, ScrapeRecord

    store = await Store.open(tmp_path / "r.duckdb")
    try:
        writer = HistoryWriter(store, flush_interval=60, retention=timedelta(days=7))
        now = datetime.now(UTC)
        for age_days in (10, 8, 6, 1):
            writer.add(
                ScrapeRecord(
                    "a", now - timedelta(days=age_days), "u", True, 0.1, values={"requests_running": age_days}
                )
            )
        assert await writer.flush() == 4
        assert await writer.enforce_retention(force=True) == (2, 0)
        kept = await store.history("a", now - timedelta(days=30), now, ["requests_running"])
        assert kept["requests_running"].to_list() == [6.0, 1.0]
        assert await writer.enforce_retention() == (0, 0)  # checked at most every few minutes
    finally:
        await store.close()


async def test_recent_scrapes_are_by_instance_then_time(tmp_path: Path) -> None:
    """Detection reads each instance's rows together and in time order without sorting them: the
    store returns them so, however the scrapes of a round interleave, and leaves failed ones out."""
    from perfagent.history import HistoryWriter, ScrapeRecord

    store = await Store.open(tmp_path / "o.duckdb")
    try:
        writer = HistoryWriter(store, flush_interval=60, retention=timedelta(days=7))
        now = datetime.now(UTC).replace(microsecond=0)
        # Rounds 15 s apart; within a round, b is scraped before a in odd rounds, after in even.
        for r in range(4):
            base = now - timedelta(seconds=60 - 15 * r)
            order = ("b", "a") if r % 2 else ("a", "b")
            for i, name in enumerate(order):
                ok = not (name == "a" and r == 2)
                writer.add(
                    ScrapeRecord(
                        name, base + timedelta(seconds=i), "u", ok, 0.1, values={"requests_running": r}
                    )
                )
        assert await writer.flush() == 8
        frame = await store.recent_scrapes(now - timedelta(minutes=5), now, ["requests_running"])
        assert frame["instance_id"].to_list() == ["a"] * 3 + ["b"] * 4
        assert frame.filter(frame["instance_id"] == "a")["requests_running"].to_list() == [0.0, 1.0, 3.0]
        for name in ("a", "b"):
            assert frame.filter(frame["instance_id"] == name)["ts"].is_sorted()
    finally:
        await store.close()
