"""The frames a worker writes on its lane's channel, and their codec.

Each lane has its own one-way pipe from its worker to the parent. For every
step the worker writes ``_Started``, then any number of ``_Progress``, then
``_Done``; between steps it may write ``_Retire`` instead of starting the
next one, when it has grown too large to keep. A pipe carries one writer's
frames in order, so the parent never sees a step's progress after its
outcome, and a worker that dies mid-write can only spoil its own lane's
channel, which dies with it.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import msgspec

from ._model import StepOutcome


class _Started(msgspec.Struct, tag="s", array_like=True):
    pid: int


class _Progress(msgspec.Struct, tag="p", array_like=True):
    data: Any


class _Done(msgspec.Struct, tag="d", array_like=True):
    outcome: StepOutcome
    duration: float


class _Retire(msgspec.Struct, tag="r", array_like=True):
    """The worker grew past the call's recycle threshold and stopped taking steps."""

    rss: int


_Frame = _Started | _Progress | _Done | _Retire

_encode = msgspec.msgpack.Encoder().encode
_decode_frame = msgspec.msgpack.Decoder(_Frame).decode


def _progress_frame(data: Any) -> bytes:
    """An event sink's frame for ``data``, or a TypeError naming the trouble."""
    try:
        return _encode(_Progress(data))
    except TypeError as exc:
        raise TypeError(f"event data must be encodable by msgspec: {exc}") from None


# On the pipe, each frame is its length (4 bytes, little-endian) then its bytes.
_LENGTH = struct.Struct("<I")
_READ_SIZE = 1 << 16


def _write_frame(fd: int, payload: bytes) -> None:
    """Write one frame to ``fd`` (blocking until all of it is in the pipe)."""
    view = memoryview(_LENGTH.pack(len(payload)) + payload)
    while view:
        view = view[os.write(fd, view) :]


# A step that floods its sink outruns the parent; whatever the pipe buffers
# is how late its events arrive. Linux's default 64 KiB holds ~5,000 small
# events: p99 latency 12 ms with two flooding steps. 8 KiB bounds it at about
# 5 ms (p99), for ~20 % of peak event throughput (still ~370,000 a second),
# and dispatch is unaffected: frames are read in one gulp all the same.
_PIPE_BYTES = 8 * 1024
_F_SETPIPE_SZ = 1031  # Linux's fcntl command; elsewhere pipes keep their size


def _shrink_pipe(fd: int) -> None:
    try:
        import fcntl

        fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_BYTES)
    except (ImportError, OSError):
        pass


class _FrameReader:
    """Reads whole frames from a pipe without ever blocking.

    The parent reads whatever the pipe holds in 64 KiB gulps (one system call
    for hundreds of small frames) and keeps a frame cut short by its
    writer's death in the buffer, where it is simply never completed.
    """

    __slots__ = ("_buffer", "_fd", "eof")

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        _shrink_pipe(fd)
        self._fd = fd
        self._buffer = bytearray()
        self.eof = False  # every writer is gone

    def read(self) -> list[bytes]:
        """The complete frames available now, in order."""
        while not self.eof:
            try:
                chunk = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                break
            if not chunk:
                self.eof = True
                break
            self._buffer += chunk
            if len(chunk) < _READ_SIZE:
                break
        frames = []
        buffer = self._buffer
        start = 0
        while len(buffer) - start >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(buffer, start)
            end = start + _LENGTH.size + size
            if end > len(buffer):
                break
            frames.append(bytes(buffer[start + _LENGTH.size : end]))
            start = end
        del buffer[:start]
        return frames


def _tree_rss(pid: int) -> int:
    """Resident bytes of process ``pid`` and all its descendants (0 if it is gone).

    Reads /proc directly on Linux (tens of microseconds a process); elsewhere
    psutil, whose search for children scans every process on the machine.
    """
    if not _HAVE_PROC_CHILDREN:
        return _tree_rss_psutil(pid)
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/statm", "rb") as statm:
                total += int(statm.read().split()[1]) * _PAGE_SIZE
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children", "rb") as children:
                    pending.extend(int(child) for child in children.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue  # it exited while we looked
    return total


def _tree_rss_psutil(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        total = int(root.memory_info().rss)
        for child in root.children(recursive=True):
            try:
                total += int(child.memory_info().rss)
            except psutil.NoSuchProcess:
                pass
        return total
    except psutil.NoSuchProcess:
        return 0


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_HAVE_PROC_CHILDREN = os.path.exists(f"/proc/self/task/{os.getpid()}/children")

# How much of what a step printed a failed outcome keeps: the end, where the
# error usually is.
_PRINTED_TAIL_BYTES = 4096


def _read_tail(path: str) -> str:
    """The last _PRINTED_TAIL_BYTES of a capture file, as text ('' if absent)."""
    try:
        with open(path, "rb") as captured:
            size = captured.seek(0, os.SEEK_END)
            captured.seek(max(0, size - _PRINTED_TAIL_BYTES))
            return captured.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
