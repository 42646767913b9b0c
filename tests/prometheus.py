"""A real Prometheus server for tests: Debian's `prometheus` binary on a free loopback port."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import free_port


def _debian_binary(name: str) -> str:
    """A binary of Debian's `prometheus` package: missing fails under CI and skips elsewhere."""
    found = shutil.which(name)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; `make test` installs Debian's prometheus package")
        pytest.skip(f"{name} is not installed (make test installs it)")
    return found


def prometheus_binary() -> str:
    return _debian_binary("prometheus")


def promtool_binary() -> str:
    return _debian_binary("promtool")


@contextmanager
def running_prometheus(
    workdir: Path, scrape_configs: str = "", *, extra_args: Sequence[str] = ()
) -> Iterator[str]:
    """Start Prometheus with the given scrape_configs YAML block; yield its base URL."""
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n" + scrape_configs)
    process = subprocess.Popen(
        [
            prometheus_binary(),
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
            *extra_args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "/-/ready", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                err = process.stderr.read().decode() if process.stderr else ""
                raise RuntimeError(f"prometheus did not become ready: {err[-2000:]}")
            time.sleep(0.1)
        yield url
    finally:
        if process.stderr is not None:
            process.stderr.close()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def openmetrics(series: Sequence[tuple[str, str, dict[str, str], Sequence[tuple[float, float]]]]) -> str:
    """OpenMetrics text for `promtool tsdb create-blocks-from openmetrics`.

    `series` is (family, type, labels, [(unix seconds, value), ...]) per series; samples of one family
    must be written together, and the input needs timestamps in seconds and a final `# EOF`.
    """
    lines: list[str] = []
    typed: set[str] = set()
    for family, kind, labels, samples in series:
        if family not in typed:
            lines.append(f"# TYPE {family} {kind}")
            typed.add(family)
        name = f"{family}_total" if kind == "counter" else family
        rendered = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for ts, value in samples:
            lines.append(f"{name}{{{rendered}}} {value!r} {ts:.3f}")
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


def backfill(workdir: Path, text: str, args: Sequence[str] = ()) -> Path:
    """Write `text` (OpenMetrics) into a new TSDB under `workdir` with promtool; return the TSDB dir.

    `args` go to promtool: days of data write far faster as a few long blocks
    (`--max-block-duration=24h`) than as the default 2 h ones."""
    source = workdir / "backfill.om"
    source.write_text(text)
    tsdb = workdir / "tsdb"
    done = subprocess.run(
        [promtool_binary(), "tsdb", "create-blocks-from", "openmetrics", *args, str(source), str(tsdb)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"promtool backfill failed: {done.stderr[-2000:]}")
    return tsdb


@contextmanager
def backfilled_prometheus(
    workdir: Path, text: str, scrape_configs: str = "", backfill_args: Sequence[str] = ()
) -> Iterator[str]:
    """A real Prometheus serving the history in `text` (OpenMetrics, see `openmetrics`).

    Retention is lifted so old backfilled blocks are not deleted on start-up, and the lookback delta
    stays Prometheus's default 5m (what the agent's rules assume).
    """
    backfill(workdir, text, backfill_args)
    with running_prometheus(
        workdir, scrape_configs, extra_args=["--storage.tsdb.retention.time=100y"]
    ) as url:
        yield url
