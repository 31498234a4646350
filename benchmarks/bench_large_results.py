"""Large results: 3 calls each returning 100 MiB, ProcessPool against ProcessPoolExecutor.

Both pools have 2 workers and are warmed up by one small call first; each
trial submits 3 calls returning ``bytes`` of 100 MiB and waits for all three
results. procorch's result travels as raw bytes in the outcome (msgpack
``bin``), not as base64 text. Prints a table (median of ``REPEATS`` trials,
interleaved) and records the machine.

Run: ``python benchmarks/bench_large_results.py``.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procorch

SIZE = 100 * 2**20
CALLS = 3
REPEATS = 3


def blob(size: int) -> bytes:
    """A result of ``size`` bytes."""
    return b"x" * size


def _trial(pool: Executor) -> float:
    start = time.perf_counter()
    futures = [pool.submit(blob, SIZE) for _ in range(CALLS)]
    for future in futures:
        assert len(future.result(timeout=600)) == SIZE
    return time.perf_counter() - start


def main() -> None:
    pools: dict[str, Executor] = {
        "procorch ProcessPool": procorch.ProcessPool(2),
        "ProcessPoolExecutor": ProcessPoolExecutor(2),
    }
    times: dict[str, list[float]] = {name: [] for name in pools}
    try:
        for pool in pools.values():
            pool.submit(blob, 1).result(timeout=120)  # warm the workers
        for _ in range(REPEATS):
            for name, pool in pools.items():
                times[name].append(_trial(pool))
    finally:
        for pool in pools.values():
            pool.shutdown()
    print(f"{CALLS} results of {SIZE // 2**20} MiB, 2 workers, median of {REPEATS}")
    print(f"{'pool':<24}{'seconds':>10}")
    for name, values in times.items():
        print(f"{name:<24}{statistics.median(values):>10.2f}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


if __name__ == "__main__":
    main()
