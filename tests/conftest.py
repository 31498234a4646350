from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import psutil
import pytest

import procorch

# Run under ``nohup ... &`` (or any parent that ignores SIGINT), every child a test starts
# would inherit the ignored SIGINT, and the Ctrl-C tests would wait out their bounds.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


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
    described = []
    for process in left:  # killed here, so that one leak fails one test, not every later one
        try:
            described.append((process.pid, process.cmdline()))
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=10)
    assert not left, f"processes left behind: {described}"


@pytest.fixture
def bounded_time() -> Iterator[None]:
    """Fail a test that takes more than a minute: a guard against hangs, not a speed claim."""
    start = time.monotonic()
    yield
    elapsed = time.monotonic() - start
    assert elapsed < 60, f"the test took {elapsed:.0f} s"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A Dask test starts a cluster of its own: each one is also slow."""
    for item in items:
        if item.get_closest_marker("dask") is not None:
            item.add_marker(pytest.mark.slow)
