from __future__ import annotations

import time
from collections.abc import Iterator

import psutil
import pytest

import procorch


def _workers() -> list[psutil.Process]:
    """Child processes other than the resource trackers (which live as long as we do)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if any("resource_tracker" in part for part in child.cmdline()):
                continue
        except psutil.NoSuchProcess:
            continue
        found.append(child)
    return found


@pytest.fixture
def no_leaked_processes() -> Iterator[None]:
    """Fail the test if any worker process outlives procorch.shutdown()."""
    yield
    procorch.shutdown()
    deadline = time.monotonic() + 10
    while _workers() and time.monotonic() < deadline:
        time.sleep(0.05)
    left = _workers()
    assert not left, f"processes left behind: {[(p.pid, p.cmdline()) for p in left]}"


@pytest.fixture
def bounded_time() -> Iterator[None]:
    """Fail a test that takes more than a minute: a guard against hangs, not a speed claim."""
    start = time.monotonic()
    yield
    elapsed = time.monotonic() - start
    assert elapsed < 60, f"the test took {elapsed:.0f} s"
