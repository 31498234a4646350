"""Where a step's standard output and error go when a call captures them.

Each worker points fds 1 and 2 at its lane's capture file, emptied at every
step start, so C code and child processes are caught too, and a step that
prints megabytes only grows a file. A failed step's outcome keeps the end.
"""

from __future__ import annotations

import os

__all__ = ["PRINTED_TAIL_BYTES", "read_tail"]

# How much of what a step printed a failed outcome keeps: the end, where the
# error usually is.
PRINTED_TAIL_BYTES = 4096


def read_tail(path: str) -> str:
    """The last PRINTED_TAIL_BYTES of a capture file, as text ('' if absent)."""
    try:
        with open(path, "rb") as captured:
            size = captured.seek(0, os.SEEK_END)
            captured.seek(max(0, size - PRINTED_TAIL_BYTES))
            return captured.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
