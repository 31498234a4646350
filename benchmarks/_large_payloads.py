"""The trials of bench_large_arguments.py and bench_large_results.py, each pool in its own process.

``main(kind)`` starts ``python <bench> --trial POOL`` for every round,
alternating the pools, so that each pool's parent memory is measured alone
(no other pool's leftovers in the same process) and a busy moment of the
machine falls on both. A trial process warms its pool with one small call,
resets its peak resident memory (``/proc/self/clear_refs``), runs ``TRIALS``
trials of 3 calls, and prints ``RESULT {json}``: the times and the peak
resident memory above where it stood after the warm-up (``VmHWM`` minus
``VmRSS``), the caller's own 100 MiB argument excluded.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor

SIZE = 100 * 2**20
CALLS = 3
TRIALS = 2  # per process
ROUNDS = 3  # processes per pool
POOLS = ("procorch ProcessPool", "ProcessPoolExecutor")


def blob(size: int) -> bytes:
    """A result of ``size`` bytes."""
    return b"x" * size


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    assert match is not None
    return int(match.group(1)) * 1024


def _make(name: str) -> Executor:
    if name == "procorch ProcessPool":
        import procorch

        return procorch.ProcessPool(2)
    return ProcessPoolExecutor(2)


def _arguments(pool: Executor, data: bytes) -> None:
    futures = [pool.submit(len, data) for _ in range(CALLS)]
    for future in futures:
        assert future.result(timeout=600) == SIZE


def _results(pool: Executor, data: bytes) -> None:
    futures = [pool.submit(blob, SIZE) for _ in range(CALLS)]
    results = [future.result(timeout=600) for future in futures]
    assert all(len(result) == SIZE for result in results)


def trial(kind: str, name: str) -> None:
    """One process: warm the pool, then TRIALS trials; prints RESULT {json}."""
    run: Callable[[Executor, bytes], None] = _arguments if kind == "arguments" else _results
    data = os.urandom(SIZE) if kind == "arguments" else b""
    pool = _make(name)
    try:
        pool.submit(len, b"x").result(timeout=120)
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # VmHWM starts again from here
        base = _status("VmRSS")
        times = []
        for _ in range(TRIALS):
            start = time.perf_counter()
            run(pool, data)
            times.append(time.perf_counter() - start)
        peak = _status("VmHWM") - base
    finally:
        pool.shutdown()
    print("RESULT " + json.dumps({"times": times, "peak": peak}), flush=True)


def main(kind: str, what: str) -> None:
    """Run every round, print the table and the machine."""
    if len(sys.argv) == 3 and sys.argv[1] == "--trial":
        trial(kind, sys.argv[2])
        return
    times: dict[str, list[float]] = {name: [] for name in POOLS}
    peaks: dict[str, list[int]] = {name: [] for name in POOLS}
    for number in range(ROUNDS):
        order = POOLS if number % 2 == 0 else POOLS[::-1]
        for name in order:
            done = subprocess.run(
                [sys.executable, sys.argv[0], "--trial", name],
                capture_output=True,
                text=True,
                timeout=900,
                check=True,
            )
            line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
            result = json.loads(line.removeprefix("RESULT "))
            times[name] += result["times"]
            peaks[name].append(result["peak"])
    count = ROUNDS * TRIALS
    print(f"{CALLS} calls each {what} {SIZE // 2**20} MiB, 2 workers, {count} trials")
    print(f"{'pool':<24}{'median s':>10}{'min s':>8}{'max s':>8}{'peak MiB':>10}")
    for name in POOLS:
        values = times[name]
        peak = max(peaks[name]) / 2**20
        print(
            f"{name:<24}{statistics.median(values):>10.2f}{min(values):>8.2f}"
            f"{max(values):>8.2f}{peak:>10.0f}"
        )
    print(
        "peak MiB: the parent's largest resident memory above its level after the warm-up "
        "(the caller's own argument excluded)"
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )
