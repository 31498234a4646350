"""procorch's Dask backend against plain Dask, on a cluster of real processes.

Starts a ``dask scheduler`` and two ``dask worker --nthreads 1`` processes
with nannies on loopback (this venv's ``dask`` command, allowed-failures 0),
then measures, each side by side with plain ``distributed``:

- the per-call floor: a call of one no-op step, against ``client.submit(f).result()``;
- throughput: no-op steps per second with as many in flight as the cluster
  has threads, against a ``client.submit`` loop keeping as many in flight
  (and ``client.map``, for reference);
- the per-crash cost: a batch of a segfaulting step and an ordinary one,
  against a plain task that segfaults (``KilledWorker`` after one death),
  and how long the cluster takes to have both workers back.

Run: ``python benchmarks/bench_dask.py [--calls 30] [--steps 400]``. It
prints a Markdown table; the figures in docs/design.md come from it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import distributed
import psutil

import procorch
from procorch import AgentExecutor, AgentStepSpec, EventSink, StepOutcome

DASK = Path(sys.executable).parent / "dask"


@contextlib.contextmanager
def real_cluster(workers: int = 2, threads: int = 1) -> Iterator[str]:
    """A scheduler and ``workers`` nanny-managed workers on loopback; the scheduler's address."""
    with tempfile.TemporaryDirectory() as where:
        scheduler_file = Path(where, "scheduler.json")
        env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
        processes = []
        try:
            processes.append(
                subprocess.Popen(
                    [
                        str(DASK),
                        "scheduler",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        "0",
                        "--no-dashboard",
                        "--scheduler-file",
                        str(scheduler_file),
                    ],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            deadline = time.monotonic() + 120
            while True:
                try:
                    address: str = json.loads(scheduler_file.read_text())["address"]
                    break
                except (OSError, ValueError, KeyError):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the scheduler did not start") from None
                    time.sleep(0.05)
            for number in range(workers):
                processes.append(
                    subprocess.Popen(
                        [
                            str(DASK),
                            "worker",
                            address,
                            "--host",
                            "127.0.0.1",
                            "--nthreads",
                            str(threads),
                            "--no-dashboard",
                            "--name",
                            f"w{number}",
                        ],
                        env=env,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            with distributed.Client(address, set_as_default=False) as client:
                client.wait_for_workers(workers, timeout=120)
            yield address
        finally:
            for process in processes:
                with contextlib.suppress(psutil.NoSuchProcess):
                    tree = psutil.Process(process.pid)
                    for member in [*tree.children(recursive=True), tree]:
                        with contextlib.suppress(psutil.NoSuchProcess):
                            member.kill()
                process.wait(timeout=30)


class NoOp(AgentExecutor):
    """Every step succeeds at once; agent 'segfault' kills its worker, 'hang' sleeps."""

    def execute_step(self, spec: AgentStepSpec, events: EventSink) -> StepOutcome:
        if spec.agent == "segfault":
            ctypes.string_at(0)
        elif spec.agent == "hang":
            time.sleep(3600)
        return StepOutcome(spec.task_id, spec.task_id, spec.agent, "", True)


def noop(x: int) -> int:
    return x


def segfault(x: int) -> int:
    ctypes.string_at(0)
    return x


def specs(count: int, agent: str = "ok") -> list[AgentStepSpec]:
    return [AgentStepSpec(f"s{i}", agent, "d", "p") for i in range(count)]


def wait_for_both(client: Any, workers: int = 2) -> float:
    """Seconds until ``workers`` workers are up again (after a crash)."""
    start = time.perf_counter()
    client.wait_for_workers(workers, timeout=120)
    while len(client.scheduler_info()["workers"]) < workers:
        time.sleep(0.01)
    return time.perf_counter() - start


def measure(address: str, calls: int, steps: int) -> list[tuple[str, str, str]]:
    rows = []
    with distributed.Client(address, set_as_default=False) as client:
        backend = procorch.DaskBackend(client)
        threads = procorch.cluster_threads(client) or 1

        procorch.execute_steps_parallel(NoOp(), specs(1), backend=backend)  # warm up
        floor = []
        for _ in range(calls):
            start = time.perf_counter()
            procorch.execute_steps_parallel(NoOp(), specs(1), backend=backend)
            floor.append(time.perf_counter() - start)
        plain_floor = []
        for i in range(calls):
            start = time.perf_counter()
            client.submit(noop, i, pure=False).result()
            plain_floor.append(time.perf_counter() - start)
        rows.append(
            (
                "one-step call (median)",
                f"{statistics.median(floor) * 1000:.0f} ms",
                f"{statistics.median(plain_floor) * 1000:.0f} ms (submit + result)",
            )
        )

        start = time.perf_counter()
        out = procorch.execute_steps_parallel(
            NoOp(), specs(steps), backend=backend, concurrency=threads
        )
        ours = steps / (time.perf_counter() - start)
        assert all(o.success for o in out)
        start = time.perf_counter()
        in_flight = distributed.as_completed(
            [client.submit(noop, i, pure=False) for i in range(threads)], loop=client.loop
        )
        sent = threads
        for future in in_flight:
            future.result()
            if sent < steps:
                in_flight.add(client.submit(noop, sent, pure=False))
                sent += 1
        plain = steps / (time.perf_counter() - start)
        start = time.perf_counter()
        client.gather(client.map(noop, range(steps), pure=False))
        mapped = steps / (time.perf_counter() - start)
        rows.append(
            (
                f"throughput, {steps} no-op steps, {threads} in flight",
                f"{ours:.0f} steps/s",
                f"{plain:.0f} steps/s (submit loop); {mapped:.0f} (client.map)",
            )
        )

        start = time.perf_counter()
        out = procorch.execute_steps_parallel(
            NoOp(),
            [AgentStepSpec("x", "segfault", "d", "p"), AgentStepSpec("ok", "ok", "d", "p")],
            backend=backend,
        )
        crash = time.perf_counter() - start
        assert out[0].error is not None and out[0].error.kind == "crash" and out[1].success
        back = wait_for_both(client)
        start = time.perf_counter()
        try:
            client.submit(segfault, 0, pure=False).result()
        except distributed.scheduler.KilledWorker:
            pass
        plain_crash = time.perf_counter() - start
        plain_back = wait_for_both(client)
        rows.append(
            (
                "batch with one segfault (2 worker deaths)",
                f"{crash:.2f} s, then {back:.2f} s until both workers are back "
                f"({out[0].error.signal})",
                f"{plain_crash:.2f} s to KilledWorker (1 death), then {plain_back:.2f} s",
            )
        )

        start = time.perf_counter()
        out = procorch.execute_steps_parallel(
            NoOp(),
            [AgentStepSpec("h", "hang", "d", "p")],
            step_timeout=0.5,
            backend=backend,
        )
        stopped = time.perf_counter() - start
        assert out[0].error is not None and out[0].error.kind == "timeout"
        back = wait_for_both(client)
        address = next(iter(client.scheduler_info()["workers"]))
        start = time.perf_counter()
        client.restart_workers([address])
        restart = time.perf_counter() - start
        rows.append(
            (
                "a step past its 0.5 s limit (its worker restarted)",
                f"{stopped:.2f} s, then {back:.2f} s until its worker is back",
                f"{restart:.2f} s for client.restart_workers",
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=30, help="one-step calls to time")
    parser.add_argument("--steps", type=int, default=400, help="steps for the throughput")
    args = parser.parse_args()
    with real_cluster() as address:
        rows = measure(address, args.calls, args.steps)
    print("| two `dask worker --nthreads 1` with nannies, loopback | procorch | plain Dask |")
    print("| --- | --- | --- |")
    for row in rows:
        print(f"| {' | '.join(row)} |")


if __name__ == "__main__":
    main()
