"""Nothing a step starts outlives it.

A step may start processes that leave its worker's process group, or even
its session (a daemon: fork, ``setsid()``, fork again), so killing the
worker's process group is not enough. procorch uses what the kernel offers:

- **A cgroup (v2) per lane**, where procorch may create one (a writable
  cgroup2 mount whose cgroups have ``cgroup.kill``, Linux 5.14+). The lane's
  directory holds two cgroups, ``a`` and ``b``; the worker lives in one of
  them, and so does everything its steps start, wherever it goes in the
  process tree. After each step the worker reads its cgroup's ``cgroup.procs``
  (one ``pread``, about 4 us); if anything but itself is there, it moves to
  the other cgroup and writes ``cgroup.kill`` in the one it left. When the
  parent kills a lane (crash, time limit, memory, cancel, Ctrl-C, shutdown),
  it writes ``cgroup.kill`` in the lane's directory, which takes the worker
  and every process of the lane at once. Escapes: a process that moves
  itself to another cgroup (root can), which no mechanism short of a
  container with its own cgroup namespace stops.
- **Otherwise, a child subreaper** (``PR_SET_CHILD_SUBREAPER``): orphans of a
  step's processes come back to the worker instead of init, so after each
  step the worker's children are exactly what the step left running; the
  worker kills them (and their descendants) and reaps them. Escapes: a step
  that crashes its worker leaves its daemons to the next subreaper up (init),
  where only the process-group kill reaches those that stayed in the group.
"""

from __future__ import annotations

import ctypes
import glob
import os
import signal
import sys
import threading
import time

# How long the kernel may take to empty a killed cgroup before procorch gives up waiting.
_KILL_WAIT_SECONDS = 10.0

_PR_SET_CHILD_SUBREAPER = 36


def _cgroup2_base() -> str | None:
    """The cgroup2 directory under which procorch makes lane cgroups, or None.

    ``PROCORCH_CGROUPS=0`` in the environment turns lane cgroups off (the
    subreaper is used instead), for a system whose cgroups procorch must not touch.
    """
    if not sys.platform.startswith("linux") or os.environ.get("PROCORCH_CGROUPS") == "0":
        return None
    try:
        with open("/proc/self/cgroup") as own:
            relative = next(
                (line.split("::", 1)[1].strip() for line in own if line.startswith("0::")), None
            )
        with open("/proc/self/mountinfo") as mounts:
            points = [
                line.split()[4]
                for line in mounts
                if " - cgroup2 " in line and " rw" in line.split(" - ")[0]
            ]
    except OSError:
        return None
    if relative is None:
        return None
    for point in points:
        base = os.path.join(point, relative.lstrip("/"))
        if os.path.exists(os.path.join(base, "cgroup.procs")) and os.access(base, os.W_OK):
            return base
    return None


_base: str | None = None
_base_known = False
_base_lock = threading.Lock()


def _lane_base() -> str | None:
    global _base, _base_known
    with _base_lock:
        if not _base_known:
            _base = _cgroup2_base()
            _base_known = True
            if _base is not None:
                _sweep_stale(_base)
        return _base


class LaneCgroup:
    """The parent's handle on one lane's cgroup directory."""

    def __init__(self, path: str) -> None:
        self.path = path

    @classmethod
    def create(cls, name: str) -> LaneCgroup | None:
        """A fresh lane cgroup, or None where procorch may not make one."""
        base = _lane_base()
        if base is None:
            return None
        path = os.path.join(base, f"procorch-{os.getpid()}-{name}")
        try:
            os.mkdir(path)
            for half in ("a", "b"):
                os.mkdir(os.path.join(path, half))
            if not os.path.exists(os.path.join(path, "cgroup.kill")):
                raise OSError("this kernel's cgroups have no cgroup.kill")
        except OSError:
            _remove_tree(path)
            return None
        return cls(path)

    def pids(self) -> list[int]:
        """Every process of the lane: the worker and all its steps started, wherever they went."""
        found: list[int] = []
        for half in ("a", "b"):
            try:
                with open(os.path.join(self.path, half, "cgroup.procs"), "rb") as procs:
                    found.extend(int(pid) for pid in procs.read().split())
            except OSError:
                continue
        return found

    def kill(self) -> None:
        """SIGKILL every process of the lane, the worker included, wherever it went."""
        _kill(self.path)

    def remove(self) -> None:
        """Kill what is left, wait for the lane to empty, and remove its directories."""
        _kill(self.path)
        _wait_empty(self.path)
        _remove_tree(self.path)


def _kill(path: str) -> None:
    try:
        with open(os.path.join(path, "cgroup.kill"), "w") as kill:
            kill.write("1")
    except OSError:
        pass


def _wait_empty(path: str) -> None:
    deadline = time.monotonic() + _KILL_WAIT_SECONDS
    while time.monotonic() < deadline:
        try:
            with open(os.path.join(path, "cgroup.events")) as events:
                if "populated 0" in events.read():
                    return
        except OSError:
            return
        time.sleep(0.001)


def _remove_tree(path: str) -> None:
    for half in ("a", "b"):
        try:
            os.rmdir(os.path.join(path, half))
        except OSError:
            pass
    try:
        os.rmdir(path)
    except OSError:
        pass


def remove_lanes_of(owner: int) -> None:
    """Kill and remove every lane cgroup of process ``owner`` (which is gone or done)."""
    base = _lane_base()
    if base is None:
        return
    for path in glob.glob(os.path.join(base, f"procorch-{owner}-*")):
        _kill(path)
        _wait_empty(path)
        _remove_tree(path)


def _sweep_stale(base: str) -> None:
    """Remove the lane cgroups of procorch processes that died without cleaning up."""
    for path in glob.glob(os.path.join(base, "procorch-*-*")):
        try:
            owner = int(os.path.basename(path).split("-")[1])
        except ValueError:
            continue
        try:
            os.kill(owner, 0)
            continue  # alive (or another process by now: leave it, it may be in use)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _kill(path)
        _wait_empty(path)
        _remove_tree(path)


# -- in the worker ----------------------------------------------------------------------


class StepContainment:
    """In a worker: after each step, make sure nothing the step started is still running."""

    def __init__(self, lane_path: str | None) -> None:
        self._pid = os.getpid()
        self._halves: tuple[str, str] | None = None
        self._procs_fd: int | None = None
        self._alone = f"{self._pid}\n".encode()
        if lane_path is not None:
            try:
                halves = (os.path.join(lane_path, "a"), os.path.join(lane_path, "b"))
                self._enter(halves[0])
                self._halves = halves
            except OSError:
                self._halves = None
        if self._halves is None:
            _become_subreaper()
            self._children_fd = os.open(f"/proc/self/task/{self._pid}/children", os.O_RDONLY)
        # Threads of the worker's own; a step's leftover threads may own children.
        self._own_threads = threading.active_count()

    @property
    def mechanism(self) -> str:
        return "cgroup" if self._halves is not None else "subreaper"

    def _enter(self, half: str) -> None:
        with open(os.path.join(half, "cgroup.procs"), "w") as procs:
            procs.write(str(self._pid))
        if self._procs_fd is not None:
            os.close(self._procs_fd)
        self._procs_fd = os.open(os.path.join(half, "cgroup.procs"), os.O_RDONLY)

    def clean_up(self) -> None:
        """Kill whatever the step left running; cheap (one read) when it left nothing."""
        if self._halves is not None:
            assert self._procs_fd is not None
            if os.pread(self._procs_fd, 4096, 0) != self._alone:
                self._kill_half()
            _reap()  # children that ended on their own are zombies, in no cgroup
        # A child that ended is listed (a zombie) until reaped, so an empty
        # list means nothing to kill and nothing to reap.
        elif os.pread(self._children_fd, 4096, 0) or threading.active_count() > self._own_threads:
            self._kill_descendants()
            _reap()

    def _kill_half(self) -> None:
        assert self._halves is not None
        left, other = self._halves
        try:
            self._enter(other)
        except OSError:
            return
        self._halves = (other, left)
        _kill(left)
        _wait_empty(left)

    def _kill_descendants(self) -> None:
        deadline = time.monotonic() + _KILL_WAIT_SECONDS
        while time.monotonic() < deadline:
            found = _descendants(self._pid)
            if not found:
                return
            for pid in found:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _reap()


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children", "rb") as children:
                    kids = [int(child) for child in children.read().split()]
            except OSError:
                continue
            found.extend(kids)
            pending.extend(kids)
    return found


def _reap() -> None:
    """Collect the exit status of every child that has ended (orphans come to a subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _become_subreaper() -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        except (OSError, AttributeError):
            pass
