"""What procorch's own fork server costs and buys: worker start, server death, caller death.

- worker start: from ``Process.start()`` to the new worker running its first
  line of user code, for procorch's fork server (preloaded), the standard
  library's fork server given the same preload list (for reference), and
  loky's default start (fork, then exec a fresh interpreter);
- server death: the first worker started after the fork server was SIGKILLed
  while idle (that start includes a new server's start-up and preloads);
- caller death: from SIGKILL of a caller running two steps (each with a child
  process) to the moment its workers and their children are all gone.

Each figure is the median of several tries, interleaved where it compares.
Run: ``python benchmarks/bench_forkserver.py``.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

import psutil
from loky.backend import get_context

from procorch import _context

STARTS = 20
SERVER_DEATHS = 5
CALLER_DEATHS = 5


def _start_seconds(context: Any) -> float:
    """Seconds from start() until the new process has run its target's first line."""
    reader, writer = context.Pipe(duplex=False)
    process = context.Process(target=writer.send_bytes, args=(b"x",))
    start = time.perf_counter()
    process.start()
    reader.recv_bytes()
    elapsed = time.perf_counter() - start
    process.join()
    reader.close()
    writer.close()
    return elapsed


def bench_starts() -> dict[str, float]:
    stdlib = multiprocessing.get_context("forkserver")
    multiprocessing.set_forkserver_preload(_context._PRELOAD)
    contexts = {
        "procorch's fork server": _context.worker_context(),
        "standard library fork server, same preloads": stdlib,
        "loky's default start (fork + exec)": get_context("loky"),
    }
    for context in contexts.values():
        _start_seconds(context)  # start the servers
    times: dict[str, list[float]] = {name: [] for name in contexts}
    for _ in range(STARTS):
        for name, context in contexts.items():
            times[name].append(_start_seconds(context))
    return {name: statistics.median(values) for name, values in times.items()}


def bench_server_death() -> float:
    context = _context.worker_context()
    gaps = []
    for _ in range(SERVER_DEATHS):
        _start_seconds(context)
        pid = _context._server.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        gaps.append(_start_seconds(context))
    return statistics.median(gaps)


_CALLER = """
import os, sys, time
import procorch

class Sleeper(procorch.AgentExecutor):
    def execute_step(self, spec, events):
        import subprocess
        child = subprocess.Popen(["sleep", "3600"])
        Path(sys.argv[1], f"{os.getpid()}-{child.pid}").touch()
        time.sleep(3600)

specs = [procorch.AgentStepSpec(str(i), "a", "", "") for i in range(2)]
procorch.execute_steps_parallel(Sleeper(), specs)
"""


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def bench_caller_death() -> float:
    gaps = []
    for _ in range(CALLER_DEATHS):
        with tempfile.TemporaryDirectory() as state:
            caller = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_CALLER), state])
            deadline = time.monotonic() + 60
            while len(os.listdir(state)) < 2:
                assert time.monotonic() < deadline, "the steps never started"
                time.sleep(0.01)
            pids = [int(pid) for name in os.listdir(state) for pid in name.split("-")]
            start = time.perf_counter()
            caller.kill()
            while any(_alive(pid) for pid in pids):
                assert time.perf_counter() - start < 60, "workers outlived their caller"
                time.sleep(0.0005)
            gaps.append(time.perf_counter() - start)
            caller.wait()
    return statistics.median(gaps)


def main() -> None:
    starts = bench_starts()
    server_death = bench_server_death()
    caller_death = bench_caller_death()
    _context.stop_server()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(f"\nworker start, start() to its first line of user code, median of {STARTS}\n")
    print("| start method | ms |")
    print("|---|---:|")
    for name, seconds in starts.items():
        print(f"| {name} | {seconds * 1e3:.1f} |")
    print(
        f"\nfirst worker after the fork server was killed (median of {SERVER_DEATHS}): "
        f"{server_death * 1e3:.0f} ms"
    )
    print(
        f"caller SIGKILLed to its 2 workers and their children gone (median of {CALLER_DEATHS}): "
        f"{caller_death * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
