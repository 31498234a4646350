"""What one step attempt cost: ``StepUsage``, and the meter that measures it in a worker.

The worker measures around each step (``UsageMeter.begin`` before it,
``end`` after it and after its leftover processes were cleaned up)::

    begin: write "5" to /proc/self/clear_refs   (the process's peak RSS := its RSS now)
           getrusage(RUSAGE_SELF), RSS now (/proc/self/statm)
    end:   getrusage(RUSAGE_SELF), getrusage(RUSAGE_CHILDREN)  -> CPU deltas, the peak

``ru_maxrss`` is a lifetime high-water mark. Resetting the kernel's mark
(``clear_refs``, Linux) makes it the step's own peak, except that the kernel
also keeps the largest mark of any thread that exited (``signal->maxrss``),
which no reset lowers: when the reading right after the reset is above the
RSS of that instant, that stale mark is in the way, and the step's peak is
read from ``VmHWM`` in ``/proc/self/status`` instead (about 7 us more). Where
neither can be reset (not Linux, a read-only /proc), ``max_rss`` is the
worker's lifetime peak and ``max_rss_from`` says so (``"worker_peak"``).

Children: CPU is the delta of ``RUSAGE_CHILDREN``, which counts the
processes the worker waited for (a step's subprocesses, and its orphans that
the containment reaped), from the end of the step before: between steps the
worker reaps no child of its own, so one reading per step does (a thread a
step left running that reaps a child between steps would charge the next).
Their peak cannot be reset: ``children_max_rss`` is known when the largest
child ever waited for is one of this step's (the mark rose), or 0 when the
worker never waited for any child; otherwise it is None and listed in
``missing``.

For an attempt whose worker died or was killed (a crash, a time limit, the
memory cap), the parent fills what it knows with :func:`partial_usage`: the
wall time from the worker's start instant to its verdict, and the memory
guard's last reading where the guard read one; every other field is listed
in ``missing``. A Dask worker with several threads reports the wall time
alone the same way (its steps share one process).
"""

from __future__ import annotations

import os
import resource
import sys
from typing import Literal

import msgspec

__all__ = ["StepUsage", "UsageMeter", "partial_usage"]

MaxRssFrom = Literal["step_peak", "worker_peak", "guard_reading"]


class StepUsage(msgspec.Struct, frozen=True, kw_only=True):
    """What one step attempt cost, measured in the worker that ran it.

    - ``wall``: seconds from the step's start to its end (the worker's clock;
      for an attempt the parent ended, to the parent's verdict).
    - ``cpu_user``, ``cpu_system``: CPU seconds of the worker process during
      the step (all its threads).
    - ``max_rss``: bytes, the worker's peak resident memory during the step;
      ``max_rss_from`` says how it was known: ``"step_peak"`` (the kernel's
      high-water mark, reset before the step), ``"worker_peak"`` (the mark
      could not be reset: the worker's lifetime peak, an upper bound) or
      ``"guard_reading"`` (the parent's memory guard's last reading of the
      worker and its children, for an attempt killed by it).
    - ``children_cpu_user``, ``children_cpu_system``: CPU seconds of the
      child processes that ended during the step (its subprocesses);
      ``children_max_rss`` the largest one's peak, when known.
    - ``missing``: the names of the fields that could not be measured (they
      are None): for a crashed or killed attempt, all but ``wall`` and what
      the memory guard read.
    """

    wall: float
    cpu_user: float | None = None
    cpu_system: float | None = None
    max_rss: int | None = None
    max_rss_from: MaxRssFrom | None = None
    children_cpu_user: float | None = None
    children_cpu_system: float | None = None
    children_max_rss: int | None = None
    missing: tuple[str, ...] = ()

    @property
    def cpu(self) -> float | None:
        """All CPU seconds of the attempt, its own and its children's; None if not measured."""
        if self.cpu_user is None or self.cpu_system is None:
            return None
        return (
            self.cpu_user
            + self.cpu_system
            + (self.children_cpu_user or 0.0)
            + (self.children_cpu_system or 0.0)
        )


_MEASURED = (
    "cpu_user",
    "cpu_system",
    "max_rss",
    "children_cpu_user",
    "children_cpu_system",
    "children_max_rss",
)


def partial_usage(wall: float, memory: int | None = None) -> StepUsage:
    """The wall time (and the memory guard's reading) of an attempt: the rest is missing."""
    if memory is None:
        return StepUsage(wall=wall, missing=_MEASURED)
    missing = tuple(name for name in _MEASURED if name != "max_rss")
    return StepUsage(wall=wall, max_rss=memory, max_rss_from="guard_reading", missing=missing)


# ru_maxrss is in KiB on Linux, in bytes on macOS.
_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# The RSS read after the reset may trail the reset's own reading by what the
# interpreter allocated in between: a stale mark closer than this is taken
# for none (it can add at most this much to a peak).
_STALE_SLACK = 256 * 1024
_SELF = resource.RUSAGE_SELF
_CHILDREN = resource.RUSAGE_CHILDREN


def _open(path: str, flags: int) -> int | None:
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except OSError:
        return None


class UsageMeter:
    """Measures one step at a time in this process; see the module notes.

    Opens its /proc files once (per process: make it after a fork) and keeps
    them; ``begin`` and ``end`` cost a few microseconds together.
    """

    __slots__ = (
        "_children",
        "_clear_refs",
        "_getrusage",
        "_resettable",
        "_rss0",
        "_self",
        "_statm",
        "_status",
    )

    def __init__(self) -> None:
        self._clear_refs = _open("/proc/self/clear_refs", os.O_WRONLY)
        self._statm = _open("/proc/self/statm", os.O_RDONLY)
        self._status = _open("/proc/self/status", os.O_RDONLY)
        self._resettable = False
        self._rss0 = 0
        self._self: resource.struct_rusage | None = None
        self._getrusage = resource.getrusage
        self._children = self._getrusage(_CHILDREN)  # as it was when the last step ended

    def begin(self) -> None:
        """The step starts now."""
        reset = False
        if self._clear_refs is not None:
            try:
                os.write(self._clear_refs, b"5")
                reset = True
            except OSError:  # not permitted (an old kernel, a locked-down /proc)
                self._clear_refs = None
        self._self = self._getrusage(_SELF)
        self._resettable = reset
        if reset:
            self._rss0 = self._rss_now()

    def end(self, wall: float) -> StepUsage:
        """The step (and the clean-up of what it started) is over; ``wall`` as measured."""
        before, children_before = self._self, self._children
        assert before is not None, "end() without begin()"
        after = self._getrusage(_SELF)
        children = self._children = self._getrusage(_CHILDREN)
        max_rss_from: MaxRssFrom = "worker_peak"
        max_rss = after.ru_maxrss * _MAXRSS_UNIT
        if self._resettable:
            mark_at_begin = before.ru_maxrss * _MAXRSS_UNIT
            if mark_at_begin <= self._rss0 + _STALE_SLACK:
                max_rss_from = "step_peak"  # the mark is this step's own
            else:  # an exited thread's mark is in the way: read the process's own
                peak = self._vm_hwm()
                if peak is not None:
                    max_rss, max_rss_from = peak, "step_peak"
        children_max: int | None = None
        if children.ru_maxrss > children_before.ru_maxrss or children.ru_maxrss == 0:
            children_max = children.ru_maxrss * _MAXRSS_UNIT
        return StepUsage(
            wall=wall,
            cpu_user=round(after.ru_utime - before.ru_utime, 6),
            cpu_system=round(after.ru_stime - before.ru_stime, 6),
            max_rss=max_rss,
            max_rss_from=max_rss_from,
            children_cpu_user=round(children.ru_utime - children_before.ru_utime, 6),
            children_cpu_system=round(children.ru_stime - children_before.ru_stime, 6),
            children_max_rss=children_max,
            missing=() if children_max is not None else ("children_max_rss",),
        )

    def _rss_now(self) -> int:
        if self._statm is None:
            return 0
        try:
            return int(os.pread(self._statm, 128, 0).split()[1]) * _PAGE_SIZE
        except (OSError, ValueError, IndexError):
            return 0

    def _vm_hwm(self) -> int | None:
        if self._status is None:
            return None
        try:
            data = os.pread(self._status, 8192, 0)
            start = data.index(b"VmHWM:") + 6
            return int(data[start : data.index(b"kB", start)]) * 1024
        except (OSError, ValueError):
            return None
