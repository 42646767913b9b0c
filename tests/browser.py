"""Headless Chromium for tests that must see what a browser really renders.

The browser runs as a subprocess driven from the test's event loop, so an aiohttp server started
by the same test keeps serving while the page loads. It is cut off from every host but the
loopback one, like the offline machines perfagent must work on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import pytest

CHROMIUM: Final = Path("/usr/bin/chromium")

_FLAGS: Final = (
    "--headless",
    "--no-sandbox",  # containers and CI runners lack the user namespaces the sandbox needs
    "--disable-gpu",
    "--disable-quic",
    "--disable-dev-shm-usage",  # a container's small /dev/shm crashes renderers
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--mute-audio",
    # Loopback is reached directly; every other host fails to resolve, so a page that would need the
    # internet (a CDN script, a web font) renders broken here instead of passing by luck.
    "--no-proxy-server",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
)


def in_ci() -> bool:
    """Whether `CI` is set (to anything but an explicit false), as CI services do."""
    return os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}


def require_chromium() -> Path:
    """Chromium's path; skips the test when it is missing, but fails under CI, where it must be."""
    if CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    if in_ci():
        pytest.fail(f"{CHROMIUM} is missing but CI is set: the Makefile must install chromium")
    pytest.skip(f"{CHROMIUM} is not installed (install chromium to run the browser tests)")


async def _run_chromium(args: Sequence[str], *, timeout_s: float) -> bytes:
    """Run Chromium with `args` after the common flags; its stdout, or an error with its stderr."""
    chromium = require_chromium()
    # A fresh profile per run: no state leaks between tests. Cleanup errors are ignored because a
    # helper process may still be writing to it for a moment after the browser exits.
    with tempfile.TemporaryDirectory(prefix="perfagent-chromium-", ignore_cleanup_errors=True) as profile:
        proc = await asyncio.create_subprocess_exec(
            str(chromium),
            *_FLAGS,
            f"--user-data-dir={profile}",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            # Its own process group, so a hung browser is ended with all its helper processes (the
            # group id cannot be reused before the unreaped browser process is waited for).
            start_new_session=True,
        )
        try:
            stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.communicate()
            raise AssertionError(f"chromium did not finish within {timeout_s} s: {' '.join(args)}") from None
    log = stderr.decode(errors="replace")
    if proc.returncode != 0:
        raise AssertionError(f"chromium exited with {proc.returncode}:\n{log[-2000:]}")
    # Headless Chromium exits 0 even when the page did not load; it only says so on stderr.
    failed = [line for line in log.splitlines() if "Page load failed" in line]
    if failed:
        raise AssertionError(f"chromium could not load the page: {failed[0]}")
    return stdout


async def dump_dom(url: str, *, budget_ms: int = 15000, timeout_s: float = 60.0) -> str:
    """The DOM of `url` after its scripts ran for up to `budget_ms` of virtual time, as HTML.

    Virtual time runs ahead whenever the page is idle, so a page that is done early costs little.
    """
    out = await _run_chromium([f"--virtual-time-budget={budget_ms}", "--dump-dom", url], timeout_s=timeout_s)
    return out.decode(errors="replace")


async def screenshot(
    url: str,
    path: Path,
    *,
    size: tuple[int, int] = (1280, 900),
    budget_ms: int = 15000,
    timeout_s: float = 60.0,
) -> Path:
    """Save a PNG of `url` as rendered in a `size` window; for looking at a page while developing."""
    await _run_chromium(
        [
            f"--virtual-time-budget={budget_ms}",
            f"--window-size={size[0]},{size[1]}",
            f"--screenshot={path}",
            url,
        ],
        timeout_s=timeout_s,
    )
    if not await asyncio.to_thread(path.is_file):
        raise AssertionError(f"chromium wrote no screenshot to {path}")
    return path
