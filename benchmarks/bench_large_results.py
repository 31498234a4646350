"""Large results: 3 calls each returning 100 MiB, ProcessPool against ProcessPoolExecutor.

Both pools have 2 workers, each in a process of its own per round (rounds
alternate the pools), warmed up by one small call first; each trial submits
3 calls returning ``bytes`` of 100 MiB and waits for all three results.
Prints the time (median, min, max) and the parent's peak resident memory
above its level after the warm-up (the three results included), and records
the machine (see ``_large_payloads.py``).

procorch's worker writes the pickled result beside its ``Done`` frame, and
the parent unpickles it straight from the buffer the frame was read into.

Run: ``python benchmarks/bench_large_results.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _large_payloads

if __name__ == "__main__":
    _large_payloads.main("results", "returning")
