"""Limits per step: the ``sandbox=`` guard.

``Sandbox`` names the limits; the worker applies them around each step and
takes them off after it, so a warm worker serves steps with and without a
sandbox alike. Each breach is a failed outcome whose ``error.kind`` names the
limit (``cpu_time``, ``open_files``, ``processes``, ``file_size``,
``network``) and whose message says which limit, and what it was.

How each is enforced, in the worker unless said otherwise:

- ``cpu_seconds``: ``RLIMIT_CPU`` set to the worker's CPU time so far plus
  the limit; the kernel sends SIGXCPU at it, which ends the worker, and the
  parent reads that signal as this breach (as root, the hard limit a second
  later SIGKILLs a step that ignores SIGXCPU).
- ``open_files``: ``RLIMIT_NOFILE`` just above the worker's own descriptors
  plus the limit; the step's next open fails with EMFILE.
- ``file_size``: ``RLIMIT_FSIZE``; the worker ignores SIGXFSZ, so a write past
  it fails with EFBIG instead of killing the worker.
- ``processes``: counted by the parent with the memory guard's readings (the
  lane's cgroup, or the worker's descendants), since ``RLIMIT_NPROC`` counts a
  user's processes, not a step's, and does not bind root; a step over it is
  killed.
- ``network=False``: the step runs in a network namespace of its own (made
  with ``unshare``, about 0.6 ms; the worker goes back with ``setns`` after
  the step) with no interface up, loopback included. It needs root or
  unprivileged user namespaces: where neither is available the call fails
  before any step starts, never silently unsandboxed.
- ``scratch_dir=True``: the step starts in a fresh private directory, which
  is also its ``TMPDIR``, removed when it ends.
- ``env``: the step's environment is exactly this mapping (plus ``TMPDIR``
  with ``scratch_dir``); the caller's is restored after it.

This is containment for careless and buggy code, not a security boundary
against a determined attacker: there is no syscall filter, the step shares
the worker's user, file system and kernel. See the README.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from typing import Any

import msgspec

__all__ = ["Sandbox"]


class Sandbox(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Limits for every step of a call; every field is off by default.

    - ``cpu_seconds``: CPU time a step may use (kind ``cpu_time`` past it).
    - ``open_files``: files and sockets a step may have open at once (``open_files``).
    - ``processes``: processes a step may have running at once, itself excluded
      (``processes``).
    - ``file_size``: bytes any file a step writes may grow to (``file_size``).
    - ``network``: False runs each step with no network at all, loopback
      included (``network`` when a step's connection fails for it).
    - ``scratch_dir``: True starts each step in a fresh private directory,
      also its ``TMPDIR``, removed when it ends.
    - ``env``: the step's whole environment (nothing of the caller's leaks
      unless listed).
    """

    cpu_seconds: float | None = None
    open_files: int | None = None
    processes: int | None = None
    file_size: int | None = None
    network: bool = True
    scratch_dir: bool = False
    env: dict[str, str] | None = None

    def __post_init__(self) -> None:
        for name in ("cpu_seconds", "open_files", "processes", "file_size"):
            value = getattr(self, name)
            if value is None:
                continue
            integral = name != "cpu_seconds"
            if isinstance(value, bool) or not isinstance(value, int if integral else (int, float)):
                kind = "an int" if integral else "a number"
                raise TypeError(f"{name} must be {kind} (got {value!r})")
            if value <= 0:
                raise ValueError(f"{name} must be > 0 (got {value!r})")
        if not isinstance(self.network, bool):
            raise TypeError(f"network must be True or False (got {self.network!r})")
        if not isinstance(self.scratch_dir, bool):
            raise TypeError(f"scratch_dir must be True or False (got {self.scratch_dir!r})")
        if self.env is not None:
            bad = [
                key
                for key, value in self.env.items()
                if not isinstance(key, str) or not isinstance(value, str) or "=" in key or not key
            ]
            if bad:
                raise ValueError(f"env must map names to strings (bad entry: {bad[0]!r})")


# -- in the parent ---------------------------------------------------------------------

_PROBE = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
sys.exit(0 if libc.unshare(0x40000000) == 0 else ctypes.get_errno())
"""


@functools.cache
def network_isolation_problem() -> str | None:
    """Why this machine cannot run a step without network, or None if it can (probed once)."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces are a Linux feature (this is {sys.platform})"
    try:
        probe = subprocess.run([sys.executable, "-c", _PROBE], timeout=30, capture_output=True)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"the network probe could not run: {exc}"
    if probe.returncode != 0:
        reason = os.strerror(probe.returncode) if probe.returncode < 256 else "unknown"
        return (
            f"this process may not create a network namespace ({reason}): run as root, or "
            "enable unprivileged user namespaces"
        )
    return None


def check_sandbox(sandbox: Any) -> Sandbox | None:
    """The call's sandbox, or an error raised before any step starts."""
    if sandbox is None:
        return None
    if not isinstance(sandbox, Sandbox):
        raise TypeError(f"sandbox must be a procorch.Sandbox (got {type(sandbox).__name__})")
    if not sandbox.network:
        problem = network_isolation_problem()
        if problem is not None:
            raise RuntimeError(f"sandbox network=False cannot be enforced here: {problem}")
    return sandbox


# -- in the worker ---------------------------------------------------------------------

_CLONE_NEWNET = 0x40000000
_NETWORK_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EADDRNOTAVAIL}


class StepJail:
    """The sandbox around one step in the worker: ``enter``, run the step, ``leave``."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self._limits: list[tuple[int, tuple[int, int]]] = []
        self._environ: dict[str, str] | None = None
        self._cwd: str | None = None
        self._scratch: str | None = None
        self._tempdir: str | None = None
        self._netns: int | None = None
        self._sigxfsz: Any = None

    def enter(self) -> None:
        box = self.sandbox
        if box.cpu_seconds is not None:
            used = sum(os.times()[:2])
            soft = int(used + box.cpu_seconds) + 1
            hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
            if os.geteuid() == 0:
                hard = soft + 1  # root can raise it back after the step
            self._limit(resource.RLIMIT_CPU, soft, hard)
        if box.open_files is not None:
            highest = max((int(fd) for fd in os.listdir("/proc/self/fd")), default=2)
            self._limit(resource.RLIMIT_NOFILE, highest + 1 + box.open_files, None)
        if box.file_size is not None:
            # A write past it fails with EFBIG instead of killing the worker.
            self._sigxfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            self._limit(resource.RLIMIT_FSIZE, box.file_size, None)
        if box.env is not None:
            self._environ = dict(os.environ)
            os.environ.clear()
            os.environ.update(box.env)
        if box.scratch_dir:
            self._cwd = os.getcwd()
            self._scratch = tempfile.mkdtemp(prefix="procorch-step-")
            os.chdir(self._scratch)
            if self._environ is None:
                self._environ = dict(os.environ)
            os.environ["TMPDIR"] = self._scratch
            self._tempdir = tempfile.tempdir
            tempfile.tempdir = self._scratch
        if not box.network:
            self._netns = os.open("/proc/self/ns/net", os.O_RDONLY)
            if _libc().unshare(_CLONE_NEWNET) != 0:
                os.close(self._netns)
                self._netns = None
                raise OSError(ctypes.get_errno(), "could not leave the network")

    def _limit(self, which: int, soft: int, hard: int | None) -> None:
        before = resource.getrlimit(which)
        new_hard = before[1] if hard is None else hard
        if new_hard != resource.RLIM_INFINITY:
            soft = min(soft, new_hard)
        resource.setrlimit(which, (soft, new_hard))
        self._limits.append((which, before))

    def leave(self) -> None:
        """Take every limit off again (the worker serves the next step as it was)."""
        if self._netns is not None:
            _libc().setns(self._netns, _CLONE_NEWNET)
            os.close(self._netns)
            self._netns = None
        for which, before in reversed(self._limits):
            try:
                resource.setrlimit(which, before)
            except (ValueError, OSError):
                pass
        self._limits.clear()
        if self._sigxfsz is not None:
            signal.signal(signal.SIGXFSZ, self._sigxfsz)
            self._sigxfsz = None
        if self._scratch is not None:
            assert self._cwd is not None
            try:
                os.chdir(self._cwd)
            except OSError:
                os.chdir("/")
            tempfile.tempdir = self._tempdir
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
        if self._environ is not None:
            os.environ.clear()
            os.environ.update(self._environ)
            self._environ = None

    def limit_of(self, kind: str) -> float | None:
        """The limit a breach of ``kind`` crossed, for ``StepError.limit``."""
        box = self.sandbox
        value = {
            "cpu_time": box.cpu_seconds,
            "open_files": box.open_files,
            "processes": box.processes,
            "file_size": box.file_size,
        }.get(kind)
        return None if value is None else float(value)

    def breach(self, exc: BaseException | None) -> tuple[str, str] | None:
        """The (kind, words) of the limit an exception of the step ran into, if any."""
        box = self.sandbox
        for link in _chain(exc):
            code = getattr(link, "errno", None)
            if box.open_files is not None and code == errno.EMFILE:
                return "open_files", f"it opened more than the {box.open_files} files allowed"
            if box.file_size is not None and code == errno.EFBIG:
                return "file_size", f"it wrote past the {box.file_size} bytes a file may hold"
            if not box.network and (code in _NETWORK_ERRNOS or isinstance(link, socket.gaierror)):
                return "network", "it tried to reach the network, which its sandbox forbids"
        return None


def _chain(exc: BaseException | None) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen and len(seen) < 20:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


@functools.cache
def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)
