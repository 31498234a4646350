"""Whether the test suite holds on a busy machine: it runs while busy loops hold every core.

One busy loop (a Python ``while True: pass``) per core starts first and runs for the whole
check; the suite then runs ``--runs`` times in a row (3 by default), each in a fresh
``python -m pytest``. The table gives each run's exit status and time; the check fails if
any run fails. Arguments after ``--`` go to pytest (``-- -m "not slow"``, ``-- -x``).

Run: ``python benchmarks/stress_suite.py`` (or ``tox -e stress``), from the repository root.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

BUSY_LOOP = "while True:\n    pass\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of the suite (default 3)")
    parser.add_argument(
        "--loops", type=int, default=os.cpu_count() or 1, help="busy loops (default: one a core)"
    )
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest, after --")
    options = parser.parse_args()
    cores = os.cpu_count()
    print(f"machine: {platform.platform()}, {cores} cores, Python {platform.python_version()}")
    print(f"busy loops: {options.loops}; pytest {' '.join(options.pytest_args) or '(whole suite)'}")
    loops = [
        subprocess.Popen([sys.executable, "-c", BUSY_LOOP], start_new_session=True)
        for _ in range(options.loops)
    ]
    results = []
    try:
        for run in range(1, options.runs + 1):
            begin = time.monotonic()
            status = subprocess.call([sys.executable, "-m", "pytest", "-q", *options.pytest_args])
            elapsed = time.monotonic() - begin
            load = os.getloadavg()[0]
            results.append((run, status, elapsed, load))
            print(f"-- run {run}: exit {status} in {elapsed:.0f} s (load {load:.1f})", flush=True)
    finally:
        for loop in loops:
            loop.kill()
        for loop in loops:
            loop.wait()
    print()
    print("| run | exit | seconds | load average (1 min) at the end |")
    print("|----:|-----:|--------:|--------------------------------:|")
    for run, status, elapsed, load in results:
        print(f"| {run} | {status} | {elapsed:.0f} | {load:.1f} |")
    return 0 if all(status == 0 for _, status, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
