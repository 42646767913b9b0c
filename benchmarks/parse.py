"""Parser benchmark: perfagent.exposition against prometheus_client, on every capture, in one run.

For each input, every round times `parse_exposition`, `parse_exposition_report` and
prometheus_client's `text_string_to_metric_families` with every sample materialized
(`[s for f in families for s in f.samples]`), interleaved (in rotating order) so machine noise hits
all three alike. The best round is reported, the median next to it. Then the same on a larger synthetic input: the
TGI capture repeated with renamed metrics (about 1 MB at the default 10 copies).

    .venv/bin/python benchmarks/parse.py [--rounds N] [--big-rounds N] [--copies N]
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import polars as pl
from prometheus_client.parser import text_string_to_metric_families

from perfagent.exposition import parse_exposition, parse_exposition_report

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
GOAL_RATIO = 10.0


def _prometheus_client(text: str) -> int:
    return len([s for f in text_string_to_metric_families(text) for s in f.samples])


def _ours(text: str) -> int:
    return parse_exposition(text).height


def _ours_report(text: str) -> int:
    return parse_exposition_report(text).samples.height


PARSERS: dict[str, Callable[[str], int]] = {
    "ours": _ours,
    "report": _ours_report,
    "prometheus_client": _prometheus_client,
}


@dataclass
class Timing:
    """Seconds per round of one parser on one input."""

    rounds: list[float]

    @property
    def best(self) -> float:
        return min(self.rounds)

    @property
    def median(self) -> float:
        return statistics.median(self.rounds)


def measure(texts: dict[str, str], rounds: int) -> dict[str, dict[str, Timing]]:
    """Timings per input and parser; every parser must find the same number of samples."""
    for name, text in texts.items():  # warm-up, and a cross-check of the sample counts
        counts = {parser: parse(text) for parser, parse in PARSERS.items()}
        assert len(set(counts.values())) == 1, f"{name}: sample counts differ: {counts}"
    timings = {name: {parser: Timing([]) for parser in PARSERS} for name in texts}
    order = list(PARSERS)
    for _ in range(rounds):
        gc.collect()
        # Rotate who goes first: a Polars call right after a long stretch of pure Python finds
        # Polars' worker threads asleep and pays for waking them (up to ~0.5 ms here).
        order = order[1:] + order[:1]
        for name, text in texts.items():
            for parser in order:
                start = time.perf_counter()
                PARSERS[parser](text)
                timings[name][parser].rounds.append(time.perf_counter() - start)
    return timings


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.3f}"


def report(texts: dict[str, str], timings: dict[str, dict[str, Timing]]) -> float:
    """Print one line per input and the totals; return the total ratio prometheus_client / ours."""
    print(
        f"{'input':<58} {'kB':>6} {'ours':>8} {'(med)':>8} {'report':>8} "
        f"{'prom_cl':>8} {'(med)':>8} {'ratio':>6} {'ratio_r':>7}"
    )
    total = {parser: 0.0 for parser in PARSERS}
    for name, text in texts.items():
        t = timings[name]
        for parser in PARSERS:
            total[parser] += t[parser].best
        ours, rep, theirs = t["ours"], t["report"], t["prometheus_client"]
        print(
            f"{name[:58]:<58} {len(text.encode()) / 1e3:6.1f} {_ms(ours.best)} {_ms(ours.median)} "
            f"{_ms(rep.best)} {_ms(theirs.best)} {_ms(theirs.median)} "
            f"{theirs.best / ours.best:5.1f}x {theirs.best / rep.best:6.1f}x"
        )
    ratio = total["prometheus_client"] / total["ours"]
    print(
        f"{'TOTAL (sum of best times, ms)':<58} {'':6} {_ms(total['ours'])} {'':8} {_ms(total['report'])} "
        f"{_ms(total['prometheus_client'])} {'':8} {ratio:5.1f}x "
        f"{total['prometheus_client'] / total['report']:6.1f}x"
    )
    return ratio


def synthetic(copies: int) -> str:
    """The TGI capture `copies` times, each copy's metric names prefixed differently."""
    tgi = next(FIXTURES.glob("tgi-*.prom")).read_text()
    return "".join(tgi.replace("tgi_", f"tgi{i}_") for i in range(copies))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=30, help="rounds over the captures (default 30)")
    parser.add_argument(
        "--big-rounds", type=int, default=5, help="rounds over the synthetic input (default 5)"
    )
    parser.add_argument(
        "--copies", type=int, default=10, help="TGI copies in the synthetic input (default 10)"
    )
    args = parser.parse_args()

    print(
        f"Python {platform.python_version()}, Polars {pl.__version__}, "
        f"prometheus_client {version('prometheus_client')}, {platform.machine()}, "
        f"Polars thread pool {pl.thread_pool_size()}"
    )
    print(f"best of {args.rounds} rounds; 'report' is parse_exposition_report, ratio_r uses it\n")
    captures = {path.name: path.read_text() for path in sorted(FIXTURES.glob("*.prom"))}
    ratio = report(captures, measure(captures, args.rounds))
    verdict = "met" if ratio >= GOAL_RATIO else "NOT met"
    print(f"goal: total ratio >= {GOAL_RATIO:.0f}x on the captures: {verdict} ({ratio:.1f}x)\n")

    big = {f"synthetic: TGI x{args.copies}, renamed": synthetic(args.copies)}
    print(f"best of {args.big_rounds} rounds")
    report(big, measure(big, args.big_rounds))


if __name__ == "__main__":
    main()
