"""Large arguments: 3 calls each given 100 MiB, ProcessPool against ProcessPoolExecutor.

Both pools have 2 workers, each in a process of its own per round (rounds
alternate the pools), warmed up by one small call first; each trial submits
3 calls whose argument is the same ``bytes`` of 100 MiB and which return its
length, and waits for all three. Prints the time (median, min, max) and the
parent's peak resident memory above its level after the warm-up, and
records the machine (see ``_large_payloads.py``).

procorch pickles a call over 1 MiB straight into the lane's inbox pipe when
it is sent, and the worker unpickles it straight from there
(``procorch/_inbox.py``).

Run: ``python benchmarks/bench_large_arguments.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _large_payloads

if __name__ == "__main__":
    _large_payloads.main("arguments", "given")
