"""What crash attribution costs: per-step overhead and the price of one crash.

procorch gives every worker its own single-worker loky executor (a lane) and
keeps one step in flight per lane, so a crash breaks only the culprit's lane.
This script measures what that costs against raw loky on the same machine,
with 2 workers, in one run:

- overhead per no-op step: procorch (bare, and with each per-step guard on),
  a raw loky submit-everything loop (the fastest loky can go, with no crash
  attribution at all), and raw loky with one task in flight per worker;
- crash cost: the time from a step's crash to the next step starting on the
  replacement worker (StepCrashed to StepStarted), median of several.

Run: ``python benchmarks/bench_attribution.py``.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loky
from _workloads import NoopExecutor, noop

import procorch
from procorch import AgentStepSpec, Event, StepCrashed, StepStarted

STEPS = 4000
REPEATS = 5
CRASHES = 10


def _specs(count: int, agent: str = "noop") -> list[AgentStepSpec]:
    return [AgentStepSpec(str(i), agent, "", "") for i in range(count)]


def bench_procorch(**guards: object) -> float:
    specs = _specs(STEPS)
    procorch.execute_steps_parallel(NoopExecutor(2), specs[:10])  # warm the workers
    start = time.perf_counter()
    outcomes = procorch.execute_steps_parallel(NoopExecutor(2), specs, **guards)
    elapsed = time.perf_counter() - start
    assert all(o.success for o in outcomes)
    return elapsed / STEPS


def bench_resumable() -> float:
    """Per-step cost with every success committed to a SQLite journal (fsync'd)."""
    specs = _specs(STEPS // 4)
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        outcomes = procorch.execute_steps_parallel_resumable(
            NoopExecutor(2), specs, "bench", os.path.join(scratch, "journal.db")
        )
        elapsed = time.perf_counter() - start
    assert all(o.success for o in outcomes)
    return elapsed / len(specs)


def bench_loky_pipelined() -> float:
    pool = loky.get_reusable_executor(max_workers=2)
    list(pool.map(noop, [str(i) for i in range(10)]))
    start = time.perf_counter()
    futures = [pool.submit(noop, str(i)) for i in range(STEPS)]
    for future in futures:
        future.result()
    return (time.perf_counter() - start) / STEPS


def bench_loky_one_in_flight() -> float:
    pools = [loky.ProcessPoolExecutor(max_workers=1) for _ in range(2)]
    for pool in pools:
        pool.submit(noop, "warm").result()
    start = time.perf_counter()
    for i in range(0, STEPS, 2):
        first = pools[0].submit(noop, str(i))
        second = pools[1].submit(noop, str(i + 1))
        first.result()
        second.result()
    elapsed = time.perf_counter() - start
    for pool in pools:
        pool.shutdown()
    return elapsed / STEPS


def bench_crash_recovery() -> float:
    """Median seconds from a crash to the next step starting on one lane."""
    gaps = []

    class Watch:
        crashed_at: float | None = None

        def __call__(self, event: Event) -> None:
            if isinstance(event, StepCrashed):
                self.crashed_at = time.perf_counter()
            elif isinstance(event, StepStarted) and self.crashed_at is not None:
                gaps.append(time.perf_counter() - self.crashed_at)
                self.crashed_at = None

    specs = []
    for i in range(CRASHES):
        specs += [
            AgentStepSpec(f"c{i}", "segfault", "", ""),
            AgentStepSpec(f"n{i}", "noop", "", ""),
        ]
    procorch.execute_steps_parallel(NoopExecutor(1), specs, events=Watch())
    return statistics.median(gaps)


def main() -> None:
    rows: dict[str, list[float]] = {
        "procorch (lanes)": [],
        "procorch, step_timeout=60": [],
        "procorch, capture_output": [],
        "procorch, memory_limit=1 GiB": [],
        "procorch, resumable (SQLite journal)": [],
        "loky, pipelined": [],
        "loky, one in flight": [],
    }
    for _ in range(REPEATS):  # interleaved, so drift hits every row alike
        rows["procorch (lanes)"].append(bench_procorch())
        rows["procorch, step_timeout=60"].append(bench_procorch(step_timeout=60))
        rows["procorch, capture_output"].append(bench_procorch(capture_output=True))
        rows["procorch, memory_limit=1 GiB"].append(bench_procorch(memory_limit=2**30))
        rows["procorch, resumable (SQLite journal)"].append(bench_resumable())
        rows["loky, pipelined"].append(bench_loky_pipelined())
        rows["loky, one in flight"].append(bench_loky_one_in_flight())
    recovery = bench_crash_recovery()
    procorch.shutdown()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(f"{STEPS} no-op steps on 2 workers, median of {REPEATS} runs\n")
    print("| pool | us per step | steps per second |")
    print("|---|---:|---:|")
    for name, values in rows.items():
        median = statistics.median(values)
        print(f"| {name} | {median * 1e6:.0f} | {1 / median:,.0f} |")
    print(f"\ncrash to next step started (1 lane, median of {CRASHES}): {recovery * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
