"""How much memory a step's processes hold: the memory guard's one reading.

Resident memory (RSS, from ``/proc/<pid>/statm``, about 10 us a process)
counts a page shared by several processes once per process: a step that
allocates 80 MiB and forks 3 children reads as 400 MiB while using 100. The
proportional set size (PSS, ``/proc/<pid>/smaps_rollup``) shares each page
out among the processes that map it, so it sums to the real use, but costs
about 170 us a process. Since PSS is never above RSS, the guard reads RSS
first and pays for PSS only when RSS is over the cap: the cheap reading
clears every step that is under it, and only the real figure can kill one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

__all__ = ["memory_over", "pss", "rss", "tree_pids"]

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_HAVE_PROC = os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def tree_pids(pid: int) -> list[int]:
    """Process ``pid`` and all its descendants that are still alive."""
    if not _HAVE_PROC:
        return _tree_pids_psutil(pid)
    found = []
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except (FileNotFoundError, ProcessLookupError):
            continue  # it exited while we looked
        found.append(current)
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children", "rb") as children:
                    pending.extend(int(child) for child in children.read().split())
            except (FileNotFoundError, ProcessLookupError):
                continue
    return found


def rss(pids: Iterable[int]) -> int:
    """Resident bytes of these processes, shared pages counted once per process."""
    if not _HAVE_PROC:
        return _psutil_sum(pids, "rss")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as statm:
                total += int(statm.read().split()[1]) * _PAGE_SIZE
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def pss(pids: Iterable[int]) -> int:
    """Proportional set size of these processes: shared pages divided among their users."""
    if not _HAVE_PROC:
        return _psutil_sum(pids, "pss")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as rollup:
                for line in rollup:
                    if line.startswith(b"Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def memory_over(pids: list[int], limit: int) -> int | None:
    """The real memory of these processes if it is over ``limit``, else None (cheaply)."""
    if rss(pids) <= limit:
        return None
    used = pss(pids)
    return used if used > limit else None


def _tree_pids_psutil(pid: int) -> list[int]:
    import psutil

    try:
        root = psutil.Process(pid)
        return [pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def _psutil_sum(pids: Iterable[int], field: str) -> int:
    import psutil

    total = 0
    for pid in pids:
        try:
            process = psutil.Process(pid)
            info: Any = process.memory_full_info() if field == "pss" else process.memory_info()
            total += int(getattr(info, field, info.rss))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total
