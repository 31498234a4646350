"""Large arguments: 3 calls each given 100 MiB, ProcessPool against ProcessPoolExecutor.

Both pools have 2 workers and are warmed up by one small call first; each
trial submits 3 calls whose argument is the same ``bytes`` of 100 MiB and
which return its length, and waits for all three. procorch's arguments
travel as raw bytes beside the spec (msgpack ``bin``, see
``procorch/_payload.py``), not as base64 text in the prompt. Prints a table
(median of ``REPEATS`` trials, interleaved) and records the machine.

Run: ``python benchmarks/bench_large_arguments.py``.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from concurrent.futures import Executor, ProcessPoolExecutor

import procorch

SIZE = 100 * 2**20
CALLS = 3
REPEATS = 3


def _trial(pool: Executor, blob: bytes) -> float:
    start = time.perf_counter()
    futures = [pool.submit(len, blob) for _ in range(CALLS)]
    for future in futures:
        assert future.result(timeout=600) == SIZE
    return time.perf_counter() - start


def main() -> None:
    blob = os.urandom(SIZE)
    pools: dict[str, Executor] = {
        "procorch ProcessPool": procorch.ProcessPool(2),
        "ProcessPoolExecutor": ProcessPoolExecutor(2),
    }
    times: dict[str, list[float]] = {name: [] for name in pools}
    try:
        for pool in pools.values():
            pool.submit(len, b"x").result(timeout=120)  # warm the workers
        for _ in range(REPEATS):
            for name, pool in pools.items():
                times[name].append(_trial(pool, blob))
    finally:
        for pool in pools.values():
            pool.shutdown()
    print(f"{CALLS} calls each given {SIZE // 2**20} MiB, 2 workers, median of {REPEATS}")
    print(f"{'pool':<24}{'seconds':>10}")
    for name, values in times.items():
        print(f"{name:<24}{statistics.median(values):>10.2f}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


if __name__ == "__main__":
    main()
